"""evaluate.py, eval_store.py, eval_report.py: results JSON, answers, plots, like-for-like episodes, metrics, CLI,
torchrun, the result store."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval_report as ER
import eval_store as ES
import evaluate as EV
import model as M
from launch import report, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run with two checkpoints of the same tiny weights at 0 and 2.5 GFLOPs."""
    run = tmp_path_factory.mktemp("runs") / "sft-tiny"
    src = M.resolve("tiny-text")
    for step, gflops in ((0, 0.0), (10, 2.5)):
        dst = run / f"step-{step:06d}"
        shutil.copytree(src, dst)
        (dst / "trainer_state.json").write_text(json.dumps({"step": step, "gflops": gflops}))
    return run


def test_evaluate_writes_results_answers_table_and_plots(run_folder, tmp_path, capsys):
    cfg = EV.EvalConfig(model=str(run_folder), task="gp-l", episodes=6, batch_size=3, max_new_tokens=12,
                        out=str(tmp_path / "out"))
    EV.evaluate(cfg)
    result = json.loads((run_folder / "eval_gp-l.json").read_text())
    assert result["run"] == "sft-tiny" and [c["gflops"] for c in result["checkpoints"]] == [0.0, 2.5]
    for ck in result["checkpoints"]:
        assert set(ck["settings"]) == {"id", "ood_rule"}
        for m in ck["settings"].values():
            assert {"episodes", "success", "success_se", "success_ci95", "mean_attempts", "mean_reward",
                    "outcomes", "format_valid", "seconds"} <= set(m)
            assert m["episodes"] == 6 and sum(m["outcomes"].values()) == m["mean_attempts"] * 6
            assert 1 <= m["mean_attempts"] <= 5 and 0 <= m["success_ci95"][0] <= m["success"] <= m["success_ci95"][1]
    answers = [json.loads(line) for line in (run_folder / "eval_gp-l_answers.jsonl").read_text().splitlines()]
    assert {a["outcome"] for a in answers} <= set(["correct", "wrong_value", "wrong_numbers", "illegal_formula"])
    # the same seed deals the same hands to both checkpoints, and identical weights answer identically
    by_ck = {}
    for a in answers:
        by_ck.setdefault(a["checkpoint"], []).append((a["setting"], a["episode"], a["attempt"], a["observation"],
                                                       a["response"]))
    first, second = by_ck.values()
    assert first == second and len(first) >= 12  # 6 episodes x 2 settings, at least one attempt each
    ood_obs = {a["observation"] for a in answers if a["setting"] == "ood_rule" and a["attempt"] == 1}
    assert all("K as 13" in o for o in ood_obs)
    assert (tmp_path / "out" / "fig5_gp-l.png").stat().st_size > 5000
    assert (tmp_path / "out" / "fig6_gp-l.png").stat().st_size > 5000
    assert "| sft-tiny | step-000010 | 2.5 |" in capsys.readouterr().out


def test_vl_and_virl_metrics(tmp_path):
    vl = EV.evaluate(EV.EvalConfig(model="tiny-vlm", task="gp-vl", episodes=2, batch_size=2, max_new_tokens=8,
                                   out=str(tmp_path), plots=False))
    assert set(vl[0]["checkpoints"][0]["settings"]) == {"id", "ood_rule", "ood_visual"}
    assert all("recognition_accuracy" in m for m in vl[0]["checkpoints"][0]["settings"].values())
    virl = EV.evaluate(EV.EvalConfig(model="tiny-text", task="virl-l", virl_routes=2, batch_size=2, max_new_tokens=8,
                                     out=str(tmp_path), plots=False))
    ck = virl[0]["checkpoints"][0]
    assert set(ck["settings"]) == {"id", "ood_rule", "id_heldout"}
    m = ck["settings"]["id"]
    assert ck["gflops"] == 0.0 and m["episodes"] == 2 and 0 <= m["per_step_accuracy"] <= 1
    lo, hi = m["per_step_accuracy_ci95"]
    assert lo <= m["per_step_accuracy"] <= hi and m["per_step_accuracy_se"] >= 0
    assert "recognition_accuracy" not in m
    # V-IRL's table leads with the protocol's per-step accuracy and keeps the other count and route success beside it
    assert m["per_step_accuracy_official"] <= m["per_step_accuracy"]   # the official count adds failed routes' samples
    assert "per-step accuracy [95% CI], per-step accuracy (official count), route success" in ER.markdown_table(
        virl, ["id"], "virl-l")
    assert "per-step accuracy (official count) [95% CI], per-step accuracy, route success" in ER.markdown_table(
        virl, ["id"], "virl-l", "official")


def test_id_evaluation_routes_are_training_routes_and_held_out_ones_are_not():
    from rollout import make_envs
    train = make_envs("virl-l", "id", 1, seed=0)[0].routes
    assert [r.route_id for r in make_envs("virl-l", "ood_rule", 1, seed=0)[0].routes] == [r.route_id for r in train]
    held = make_envs("virl-l", "id_heldout", 1, seed=0, n_routes=48)[0].routes
    walks = {(r.start, tuple(map(tuple, r.points))) for r in train}
    assert len(held) == 48 and sum((r.start, tuple(map(tuple, r.points))) in walks for r in held) <= 4


def test_sampling_follows_the_checkpoints_generation_config_unless_a_temperature_is_given(tmp_path):
    policy = M.load_policy("tiny-text")   # no sampling settings in its generation config: greedy, as generate does
    cfg = EV.EvalConfig(model="tiny-text", out=str(tmp_path))
    assert cfg.max_new_tokens == 256 and EV.sampling(policy, cfg)["greedy"]
    policy.model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9)   # Llama-3.2-Vision's
    assert EV.sampling(policy, cfg) == {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "greedy": False}
    set_t = EV.EvalConfig(model="tiny-text", out=str(tmp_path), temperature=0.2)
    assert EV.sampling(policy, set_t) == {"temperature": 0.2, "top_p": 1.0, "top_k": 0, "greedy": False}


def test_summary_counts_well_formed_answers_and_attempts():
    from rollout import Episode
    eps = [Episode(0, success=True, total_reward=4.0, outcomes=["illegal_formula", "correct"]),
           Episode(1, total_reward=-7.0,
                   outcomes=["wrong_numbers", "wrong_value", "illegal_formula", "context_exceeded"])]
    m = EV.summarize(eps, "gp-l")
    assert m["success"] == 0.5 and m["mean_attempts"] == 3.0 and m["mean_reward"] == -1.5
    assert m["format_valid"] == pytest.approx(3 / 6) and m["outcomes"]["illegal_formula"] == 2
    v = EV.summarize([Episode(0, outcomes=["invalid_action", "wrong_action", "correct", "correct"])], "virl-l")
    assert v["format_valid"] == 0.75 and v["per_step_accuracy"] == 0.5
    assert v["per_step_accuracy_se"] == pytest.approx(math.sqrt(0.25 / 4))
    assert v["per_step_accuracy_ci95"] == list(EV.wilson(2, 4))


def test_wilson_interval():
    lo, hi = EV.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = EV.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)


@pytest.mark.parametrize("args,match", [(["--task", "chess"], "unknown task 'chess'"),
                                        (["--task", "gp-l", "--settings", "ood_visual"], "no setting 'ood_visual'"),
                                        (["--model", "/no/such/model"], "neither a known name"),
                                        (["--episodes", "0"], "episodes=0")])
def test_cli_errors_are_one_line(args, match):
    out = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and match in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr


def test_torchrun_splits_episodes_and_gathers(tmp_path):
    run = tmp_path / "base"
    shutil.copytree(M.resolve("tiny-text"), run / "step-0")
    out = torchrun("evaluate.py", ["--model", str(run), "--task", "gp-l", "--episodes", "5", "--batch-size", "2",
                                   "--max-new-tokens", "8", "--out", str(tmp_path / "out"), "--no-plots"])
    assert out.returncode == 0, report(out)
    result = json.loads((run / "eval_gp-l.json").read_text())
    assert result["checkpoints"][0]["settings"]["id"]["episodes"] == 5
    episodes = {json.loads(line)["episode"] for line in (run / "eval_gp-l_answers.jsonl").read_text().splitlines()}
    assert episodes == set(range(5))


def test_curves_start_at_the_evaluated_initialization(tmp_path):
    ck = tmp_path / "ppo" / "step-000002"
    ck.mkdir(parents=True)
    sft = tmp_path / "sft" / "step-000020"
    (ck / "trainer_state.json").write_text(json.dumps({"step": 2, "gflops": 9.0, "config": {"model": str(sft) + "/"}}))
    entry = lambda path, g: {"path": str(path), "gflops": g, "settings": {}}  # noqa: E731
    results = [{"run": "tiny-text", "checkpoints": [entry("tiny-text", 0.0)]},
               {"run": "sft", "checkpoints": [entry(sft, 5.0)]},
               {"run": "ppo", "checkpoints": [entry(ck, 9.0)]}]
    linked = ER.with_initializations(results)
    assert [c["gflops"] for c in linked[2]["checkpoints"]] == [5.0, 9.0] and linked[2]["checkpoints"][0]["init"]
    assert linked[0] == results[0] and linked[1] == results[1]     # no trainer_state, or nothing evaluated to link
    assert len(results[2]["checkpoints"]) == 1                       # the results themselves are untouched


def test_seeds_pool_into_arms_with_a_t_interval():
    assert [ER.arm_of(n) for n in ("ppo-s2", "sft-seed10", "sft-gp-l", "init")] == ["ppo", "sft", "sft-gp-l", "init"]
    mean, (lo, hi) = ER.mean_ci95([1.0, 2.0, 6.0])
    # mean 3, sample sd sqrt(7), t(2) = 4.303: 3 -+ 4.303 * sqrt(7 / 3)
    half = 4.303 * math.sqrt(7 / 3)
    assert mean == 3.0 and lo == pytest.approx(3 - half) and hi == pytest.approx(3 + half)
    assert ER.mean_ci95([4.0]) == (4.0, None)

    def run(name, init_ood, last_ood):
        ck = lambda p: {"path": name, "gflops": 0.0,  # noqa: E731
                        "settings": {"id": {"success": 0.5}, "ood_rule": {"success": p}}}
        return {"run": name, "checkpoints": [ck(init_ood), ck(0.3), ck(last_ood)]}
    changes = ER.ood_changes([run("ppo-s0", 0.10, 0.15), run("ppo-s1", 0.10, 0.12), run("sft-s0", 0.10, 0.02)],
                             ["id", "ood_rule"], "gp-l")
    assert [(c["arm"], c["setting"], c["seeds"]) for c in changes] == [("ppo", "ood_rule", 2), ("sft", "ood_rule", 1)]
    assert changes[0]["deltas"] == pytest.approx([5.0, 2.0]) and changes[0]["mean"] == pytest.approx(3.5)
    assert changes[1]["mean"] == pytest.approx(-8.0) and changes[1]["ci95"] is None
    assert "| ppo | OOD rule | 2 | +3.5 |" in ER.changes_table(changes)
    lone = {**run("base", 0.10, 0.10), "checkpoints": run("base", 0.10, 0.10)["checkpoints"][:1]}
    assert ER.ood_changes([lone], ["id", "ood_rule"], "gp-l") == []        # one checkpoint: no change to report
    assert ER.changes_table([]).startswith("No OOD change to show")        # a sentence, not an empty table

    def virl_run(name, first, last):  # V-IRL: per-step accuracy moves, route success does not
        ck = lambda q: {"path": name, "gflops": 0.0,  # noqa: E731
                        "settings": {s: {"success": 0.0, "per_step_accuracy": q}
                                     for s in ("id", "ood_rule", "id_heldout")}}
        return {"run": name, "checkpoints": [ck(first), ck(last)]}
    changes = ER.ood_changes([virl_run("rl-s0", 0.80, 0.91)], ["id", "ood_rule", "id_heldout"], "virl-l")
    assert [(c["setting"], c["metric"]) for c in changes] == [("ood_rule", "per_step_accuracy")]  # held-out is ID
    assert changes[0]["mean"] == pytest.approx(11.0) and "per-step accuracy" in ER.changes_table(changes)


def test_stored_results_are_reused_and_redone_when_the_test_changes(run_folder, tmp_path, monkeypatch):
    cfg = dict(model=str(run_folder / "step-000010"), task="gp-l", episodes=3, batch_size=3, max_new_tokens=8,
               out=str(tmp_path), plots=False)
    first = EV.evaluate(EV.EvalConfig(**cfg, settings="id"))
    loads = []
    real = M.load_policy
    monkeypatch.setattr(M, "load_policy", lambda *a, **k: loads.append(a) or real(*a, **k))
    again = EV.evaluate(EV.EvalConfig(**cfg))               # id is stored: only ood_rule is played
    assert again[0]["checkpoints"][0]["settings"]["id"] == first[0]["checkpoints"][0]["settings"]["id"]
    assert len(loads) == 1 and set(again[0]["checkpoints"][0]["settings"]) == {"id", "ood_rule"}
    answers = (run_folder / "eval_gp-l_answers.jsonl").read_text().splitlines()
    assert {json.loads(a)["setting"] for a in answers} == {"id", "ood_rule"}
    EV.evaluate(EV.EvalConfig(**cfg))                        # everything stored: nothing is loaded
    assert len(loads) == 1
    EV.evaluate(EV.EvalConfig(**{**cfg, "episodes": 4}))      # another test: played again
    assert len(loads) == 2


def test_overwritten_weights_are_evaluated_again_and_their_old_result_kept_in_the_history(tmp_path, capsys):
    """Same path, step and GFLOPs, other weights (a rerun with --overwrite, another run copied over it): the stored
    result is not reused; it moves to eval_<task>_history.jsonl with its answers, and the new one replaces it."""
    run = tmp_path / "run"
    ckpt = run / "step-000010"
    shutil.copytree(M.resolve("tiny-text"), ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 10, "gflops": 2.5}))
    cfg = EV.EvalConfig(model=str(ckpt), task="gp-l", settings="id", episodes=2, batch_size=2, max_new_tokens=8,
                        out=str(tmp_path / "out"), plots=False)
    first = EV.evaluate(cfg)[0]["checkpoints"][0]
    assert EV.evaluate(cfg)[0]["checkpoints"][0] == first                      # unchanged: reused as it was
    assert not (run / "eval_gp-l_history.jsonl").exists()
    policy = M.load_policy(str(ckpt), device="cpu")
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    policy.save(str(ckpt))                                                      # the same folder, other weights
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 10, "gflops": 2.5}))
    capsys.readouterr()
    second = EV.evaluate(cfg)[0]["checkpoints"][0]
    assert "weights changed" in capsys.readouterr().out
    assert second["weights"] != first["weights"] and second["weights"] == ES.weights_digest(str(ckpt))
    stored = json.loads((run / "eval_gp-l.json").read_text())["checkpoints"]
    assert [e["weights"] for e in stored] == [second["weights"]]              # one result per checkpoint and key
    history = [json.loads(line) for line in (run / "eval_gp-l_history.jsonl").read_text().splitlines()]
    assert [h["entry"]["weights"] for h in history] == [first["weights"]]
    assert len(history[0]["answers"]) >= 2 and {a["setting"] for a in history[0]["answers"]} == {"id"}
    assert EV.evaluate(cfg)[0]["checkpoints"][0] == second                     # and the new result is reused


def test_the_store_reuses_only_the_same_weights_and_replaces_only_what_was_played(tmp_path, capsys):
    key, other = {"episodes": 3}, {"episodes": 4}
    a, b = str(tmp_path / "step-000001"), str(tmp_path / "step-000002")
    entry = lambda path, k: {"path": path, "step": 1, "gflops": 1.0, "weights": "w1", "key": k,  # noqa: E731
                             "settings": {"id": {"success": 0.5}}, "sampling": {"greedy": True}}
    answer = lambda path, k, s: {"checkpoint": path, "result": ES.result_id(path, k)[1], "setting": s}  # noqa: E731
    ES.write_run(str(tmp_path), "gp-l", {"run": "r", "checkpoints": [entry(a, key), entry(b, key), entry(a, other)]},
                 [answer(a, key, "id"), answer(b, key, "id"), answer(a, other, "id")])
    stored = ES.stored_results(str(tmp_path), "gp-l")
    assert stored[0][1] == entry(b, key) and stored[1][2] == answer(a, other, "id")   # read back as written

    fresh, carried, replaced = ES.reusable(stored, a, {"step": 1, "gflops": 1.0}, key, "w1")  # same weights and key
    assert fresh == entry(a, key) and carried == [answer(a, key, "id")] and replaced is None
    assert ES.reusable(stored, a, {"step": 2, "gflops": 3.0}, key, "w2") == (        # trained further: nothing holds
        {"path": a, "step": 2, "gflops": 3.0, "weights": "w2", "key": key, "settings": {}}, [], entry(a, key))
    assert ES.reusable(stored, a, {"step": 1, "gflops": 1.0}, key, "w3") == (        # same step, other weights
        {"path": a, "step": 1, "gflops": 1.0, "weights": "w3", "key": key, "settings": {}}, [], entry(a, key))
    assert ES.reusable(stored, str(tmp_path / "step-000003"), {}, key, "w1")[2] is None  # nothing stored: none replaced

    fresh["settings"]["ood_rule"] = {"success": 0.0}                                  # this call played ood_rule
    run, answers = ES.merged(stored, {"run": "r", "checkpoints": [fresh]}, carried + [answer(a, key, "ood_rule")])
    assert [(e["path"], e["key"]) for e in run["checkpoints"]] == [(b, key), (a, other), (a, key)]
    assert answers == [answer(b, key, "id"), answer(a, other, "id"), answer(a, key, "id"), answer(a, key, "ood_rule")]

    (tmp_path / "eval_gp-l.json").write_text("{not json")                              # unreadable: set aside
    assert ES.stored_results(str(tmp_path), "gp-l") == ([], []) and "set aside" in capsys.readouterr().out
    assert sorted(p.name.split(".unreadable-")[0] for p in tmp_path.glob("*.unreadable-*")) == [
        "eval_gp-l.json", "eval_gp-l_answers.jsonl"]
