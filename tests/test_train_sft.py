"""train_sft.py: data, loss mask, overfitting, resume, 2-process gloo torchrun, bad configs."""
import json
import os
import subprocess
import sys

import pytest
import torch

import env_points as G
import model as M
import runs as R
import train_sft as S
from launch import HANG_S, report, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(tmp_path, **kw):
    base = dict(task="gp-l", model="tiny-text", examples=8, steps=4, batch_size=4, micro_batch=2, lr=1e-3,
                warmup_steps=1, save_every=2, out=str(tmp_path / "run"))
    return S.SFTConfig(**{**base, **kw})


def losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_expert_examples_are_correct_and_round_trip(tmp_path):
    exs = S.expert_examples("gp-l", 20, seed=3, revision_frac=0.5)
    assert len(exs) == 20
    revised = [e for e in exs if len(e["messages"]) == 3]
    assert 3 <= len(revised) <= 17
    for e in revised:
        assert e["messages"][1]["role"] == "assistant"
        assert e["messages"][2]["content"].startswith("You failed this trial")
    for e in exs:  # every target answer is one the verifier scores correct for its hand
        ranks = json.loads(e["response"])["cards"]
        assert G.verify(e["response"], ranks, G.PointsConfig()).outcome == "correct"
    path = tmp_path / "d.jsonl"
    out = subprocess.run([sys.executable, "train_sft.py", "--examples", "20", "--data-seed", "3",
                          "--revision-frac", "0.5", "--export-data", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0 and "wrote 20 examples" in out.stdout, out.stderr[-500:]
    back = S.read_examples(str(path))
    last_turns = lambda xs: [(x["messages"][-1]["content"], x["response"]) for x in xs]  # noqa: E731
    assert last_turns(back) == last_turns(exs)
    assert S.expert_examples("gp-vl", 1, seed=0, image_size=224)[0]["messages"][0]["image"].size == (224, 224)
    vl = S.expert_examples("virl-vl", 3, seed=0)
    S.write_examples(str(tmp_path / "v.jsonl"), vl)
    back = S.read_examples(str(tmp_path / "v.jsonl"))
    assert back[0]["messages"][0]["image"].size == vl[0]["messages"][0]["image"].size
    assert json.loads(back[1]["response"])["action"]  # V-IRL: one example per position
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user"}], "response": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not an example"):
        S.read_examples(str(tmp_path / "bad.jsonl"))


def test_loss_mask_covers_exactly_the_assistant_tokens():
    policy = M.load_policy("tiny-text")
    exs = S.expert_examples("gp-l", 3, seed=0, revision_frac=1.0)
    enc = S.encode_examples(policy, exs)
    eot = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for (prompt, resp), ex in zip(enc, exs):
        assert resp[-1].item() == eot and policy.tokenizer.decode(resp[:-1]) == ex["response"]
        assert ex["messages"][1]["content"] in policy.tokenizer.decode(prompt["input_ids"][0])  # feedback turn: prompt
    batch = policy.collate([p for p, _ in enc], [r for _, r in enc])
    total = int(batch["response_mask"].sum())
    assert total == sum(len(r) for _, r in enc)
    loss, _ = S.sft_loss(policy, batch, total)
    # reference: the full-sequence next-token cross-entropy, keeping only targets inside the response
    logits = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual, count = 0.0, 0
    for i, (prompt, resp) in enumerate(enc):
        p = prompt["input_ids"].shape[1]
        manual += torch.nn.functional.cross_entropy(logits[i, p - 1:p - 1 + len(resp)], resp, reduction="sum")
        count += len(resp)
    assert count == total and abs(loss.item() - manual.item() / count) < 1e-5


def test_tiny_model_overfits_a_handful_of_examples(tmp_path):
    S.train(cfg(tmp_path, examples=2, steps=80, batch_size=2, micro_batch=2, lr=1e-2, warmup_steps=2, save_every=80))
    curve = losses(tmp_path / "run")
    assert len(curve) == 80 and curve[-1] < curve[0] / 10, curve


def test_resume_reproduces_the_uninterrupted_run(tmp_path, killed_after_save):
    S.train(cfg(tmp_path / "a", steps=6, save_every=3))
    full = losses(tmp_path / "a" / "run")
    with killed_after_save("step-000003"):
        S.train(cfg(tmp_path / "b", steps=6, save_every=3))
    S.train(cfg(tmp_path / "b", steps=6, save_every=3, resume=True))
    resumed = losses(tmp_path / "b" / "run")
    assert len(resumed) == 6 and max(abs(a - b) for a, b in zip(full, resumed)) < 1e-5, (full, resumed)
    state = R.read_trainer_state(str(tmp_path / "b" / "run" / "step-000006"))
    assert state["step"] == 6 and state["gflops"] > 0 and state["tokens"] > 0 and state["config"]["task"] == "gp-l"
    # only the newest checkpoint keeps the optimizer state, the one --resume reads
    kept = [os.path.exists(tmp_path / r / "run" / f"step-00000{k}" / "optimizer.pt") for r in "ab" for k in (3, 6)]
    assert kept == [False, True, False, True]


def test_two_process_gloo_matches_one_process(tmp_path):
    args = ["--model", "tiny-text", "--examples", "8", "--steps", "3", "--batch-size", "4", "--micro-batch", "1",
            "--lr", "1e-3", "--warmup-steps", "1", "--save-every", "3"]
    one = subprocess.run([sys.executable, "train_sft.py", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, timeout=HANG_S)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun("train_sft.py", [*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, report(two)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    p1, p2 = M.load_policy(str(tmp_path / "one" / "step-000003")), M.load_policy(str(tmp_path / "two" / "step-000003"))
    w1, w2 = p1.model.get_input_embeddings().weight, p2.model.get_input_embeddings().weight
    assert (w1 - w2).abs().max() < 1e-4
    # resuming a sharded run: the full optimizer state is loaded on rank 0 and broadcast
    more = torchrun("train_sft.py", [*args, "--steps", "4", "--resume", "--out", str(tmp_path / "two")])
    assert more.returncode == 0, report(more)
    assert len(losses(tmp_path / "two")) == 4
    assert R.read_trainer_state(str(tmp_path / "two" / "step-000004"))["step"] == 4


@pytest.mark.parametrize("args,match", [(["--task", "chess"], "unknown task 'chess'"),
                                        (["--data", "/no/such.jsonl"], "data file '/no/such.jsonl' not found"),
                                        (["--steps", "0"], "steps=0"), (["--revision-frac", "2"], "revision_frac=2.0"),
                                        (["--model", "gpt-17"], "neither a known name"),
                                        (["--task", "gp-vl", "--image-size", "32"], "image_size=32")])
def test_bad_config_is_one_line(args, match, tmp_path):
    out = subprocess.run([sys.executable, "train_sft.py", "--out", str(tmp_path / "r"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 2 and match in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr[-500:]


def test_batch_not_divisible_by_ranks_stops_before_work(tmp_path):
    out = torchrun("train_sft.py", ["--model", "tiny-text", "--batch-size", "3", "--out", str(tmp_path / "r")])
    assert out.returncode != 0 and "batch_size=3 is not divisible by the 2 ranks" in out.stderr
    assert not (tmp_path / "r").exists()


def test_prompt_diversity_and_reasoning_data():
    plain = S.expert_examples("gp-l", 12, seed=1)
    assert S.expert_examples("gp-l", 12, seed=1, prompt_diversity=False) == plain           # the default is unchanged
    diverse = S.expert_examples("gp-l", 40, seed=1, prompt_diversity=True)
    assert len({e["messages"][0]["content"].split("\n")[0] for e in diverse}) >= 5         # many wordings
    for task in ("gp-l", "virl-l"):
        for e in S.expert_examples(task, 20, seed=2, reasoning=True):
            answer = json.loads(e["response"])
            assert list(answer)[0] == "thought" and len(answer["thought"]) > 20
    virl = S.expert_examples("virl-l", 150, seed=3, prompt_diversity=True, reasoning=True)  # about 10 routes
    assert len({e["messages"][0]["content"][:60] for e in virl}) >= 3
