"""vision_pretrain.py: the offline vision-language model (smolvlm-local's recipe) built small on tiny-text, its
save / load round trip, and one SFT step and one PPO update on each VL task with it."""
import json
import os
import random

import pytest
import torch

import env_points as G
import model as M
import model_zoo as Z
import replicate as RE
import train_ppo as P
import train_sft as S
import vision_pretrain as VP


def small(out, **kw):
    base = dict(language_model="tiny-text", out=str(out), hidden=32, layers=1, heads=2, tower_steps=3, tower_batch=4,
                align_steps=2, align_batch=2, eval_images=2)
    return VP.VisionConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "smolvlm-small"
    report = VP.pretrain(small(out))
    return str(out), report


def test_build_reports_recognition_and_saves_a_llava_folder(built):
    folder, report = built
    with open(os.path.join(folder, "pretraining.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    scores = report["recognition"]
    for key in ("cards_id", "cards_ood_visual", "hands_id", "hands_ood_visual", "intersection_id",
                "intersection_ood_visual"):
        assert 0 <= scores[key] <= 1, (key, scores)
    assert scores["chance_cards"] == pytest.approx(1 / 13) and 0 < scores["chance_hands"] < 0.001
    policy = M.load_policy(folder)
    assert policy.is_vlm and type(policy.model).__name__ == "LlavaForConditionalGeneration"
    fresh, _ = VP.build(small(folder))  # the same seed's untrained model: pretraining moved the tower
    tower = policy.model.model.vision_tower.state_dict()
    assert any(not torch.equal(tower[k], v) for k, v in fresh.model.vision_tower.state_dict().items())


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("language_lr", [5e-5, 0.0])
def test_stage_one_leaves_the_language_model_stage_two_the_tower(tmp_path, language_lr):
    cfg = small(tmp_path / "x", language_lr=language_lr)
    model, processor = VP.build(cfg)
    text = M.load_policy("tiny-text").model
    for name, weight in text.model.state_dict().items():  # the language model starts as tiny-text
        loaded = model.model.language_model.state_dict()[name]
        assert torch.equal(loaded[: weight.shape[0]] if name == "embed_tokens.weight" else loaded, weight), name
    cards = lambda: VP.card_sample(random.Random(0), VP.ALL_SUITS)  # noqa: E731
    streets = VP.Streets(("nyc",), seed=0)
    language, tower = snapshot(model.model.language_model), snapshot(model.model.vision_tower)
    projector = snapshot(model.model.multi_modal_projector)
    VP.train_tower(model, processor, cfg, cards, streets)
    assert not changed(language, model.model.language_model)
    assert changed(tower, model.model.vision_tower) and changed(projector, model.model.multi_modal_projector)
    tower, projector = snapshot(model.model.vision_tower), snapshot(model.model.multi_modal_projector)
    VP.align(M.Policy(model, processor, is_vlm=True), cfg, cards, streets)
    assert not changed(tower, model.model.vision_tower) and changed(projector, model.model.multi_modal_projector)
    assert changed(language, model.model.language_model) == (language_lr > 0)


def test_save_load_round_trip_reproduces_generation_and_scores(built, tmp_path):
    folder, _ = built
    a = M.load_policy(folder)
    a.save(str(tmp_path / "again"))
    b = M.load_policy(str(tmp_path / "again"))
    obs = G.GeneralPointsEnv(G.PointsConfig(vision=True), seed=3).reset()
    conv = [{"role": "user", "content": obs.text, "image": obs.image}]
    out_a = a.generate([conv], max_new_tokens=6, greedy=True)[0]
    out_b = b.generate([conv], max_new_tokens=6, greedy=True)[0]
    assert torch.equal(out_a.response_ids, out_b.response_ids)
    with torch.no_grad():
        scored_a = a(a.collate([out_a.prompt], [out_a.response_ids]))["logprobs"]
        scored_b = b(b.collate([out_a.prompt], [out_a.response_ids]))["logprobs"]
    assert torch.allclose(scored_a, scored_b, atol=1e-5)


@pytest.mark.parametrize("task", ["gp-vl", "virl-vl"])
def test_one_sft_step_and_one_ppo_update_on_each_vl_task(built, tmp_path, task):
    folder, _ = built
    S.train(S.SFTConfig(task=task, model=folder, examples=2, steps=1, batch_size=2, micro_batch=2, lr=1e-3,
                        warmup_steps=0, save_every=1, out=str(tmp_path / "sft")))
    with open(tmp_path / "sft" / "metrics.jsonl") as f:
        sft = [json.loads(line) for line in f]
    assert len(sft) == 1 and sft[0]["loss"] > 0
    sft_model = str(tmp_path / "sft" / "step-000001")
    P.train(P.PPOConfig(task=task, model=sft_model, updates=1, turns=4, envs=2, minibatch=4, micro_batch=2,
                        max_new_tokens=8, lr=1e-4, save_every=1, out=str(tmp_path / "ppo")))
    with open(tmp_path / "ppo" / "metrics.jsonl") as f:
        ppo = [json.loads(line) for line in f]
    assert len(ppo) == 1 and ppo[0]["answers"] == 4
    before = M.load_policy(sft_model).model.model.vision_tower.state_dict()
    after = M.load_policy(str(tmp_path / "ppo" / "step-000001")).model.model.vision_tower.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the whole model is post-trained


def test_replicate_picks_a_vision_language_model_for_the_vl_tasks():
    assert RE.ReplicateConfig(task="gp-vl", scale="cpu").model == "smolvlm-local"
    assert RE.ReplicateConfig(task="virl-vl", scale="tiny").model == "tiny-vlm"
    vl = RE.ReplicateConfig(task="virl-vl", scale="gpu")
    assert vl.model == "smolvlm-local" and vl.engine is False  # the engine serves text models
    assert RE.ReplicateConfig(task="gp-l", scale="gpu").engine is True
    assert RE.ReplicateConfig(task="gp-vl", scale="cpu", model="my-vlm").model == "my-vlm"


def test_captions_name_what_the_renderers_draw():
    rng = random.Random(0)
    image, caption, labels = VP.card_sample(rng, VP.ID_SUITS)
    assert [G.RANKS[i] for i in labels["ranks"]] == caption.split(", ") and image.size[0] > 0
    assert VP.read_ranks("10, A, 7 and K") == ["10", "A", "7", "K"]
    streets = VP.Streets(("nyc",), seed=0)
    _, caption, labels = streets.sample()
    assert caption.startswith(f"Intersection: {'yes' if labels['intersection'] else 'no'}.")
    assert len(labels["signs"]) == 4


@pytest.mark.parametrize("args, match", [
    (dict(hidden=30, heads=4), "hidden=30 is not a multiple of heads=4"),
    (dict(tower_steps=0), "tower_steps=0"),
    (dict(align_lr=0.0), "align_lr=0.0"),
    (dict(language_lr=-1.0), "language_lr=-1.0"),
])
def test_bad_config_is_one_line(args, match, tmp_path):
    with pytest.raises(ValueError, match=match) as e:
        small(tmp_path / "x", **args)
    assert "\n" not in str(e.value)


def test_smolvlm_local_is_a_builtin_name():
    assert "smolvlm-local" in Z.BUILTIN_NAMES


def test_a_folder_holding_other_files_is_refused_and_a_built_model_kept(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own")
    with pytest.raises(ValueError, match="holds files that are not a model this script built"):
        VP.VisionConfig(out=str(mine))
    assert (mine / "notes.txt").read_text() == "the user's own"       # nothing deleted
    built = tmp_path / "built"
    built.mkdir()
    (built / "pretraining.json").write_text('{"recognition": {"cards": 1.0}}')
    assert VP.pretrain(VP.VisionConfig(out=str(built))) == {"recognition": {"cards": 1.0}}   # kept: nothing runs


def test_loading_smolvlm_local_never_builds_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTRL_CACHE", str(tmp_path))   # an empty model cache
    with pytest.raises(ValueError, match=r"not built yet: build it once with `python vision_pretrain.py`"):
        M.load_policy("smolvlm-local")
    assert not any(tmp_path.iterdir())
