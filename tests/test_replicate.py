"""replicate.py: the whole protocol at tiny scale, matched compute, seeds pooled into arms, and a rerun
that finds every phase done."""
import json
import os
import subprocess
import sys

import runs as R
from launch import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def replicate(out, *extra):
    return subprocess.run([sys.executable, "replicate.py", "--task", "gp-l", "--scale", "tiny", "--seeds", "0,1",
                           "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)


def test_tiny_replication_matches_compute_pools_seeds_and_resumes(tmp_path):
    run = replicate(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    gflops = lambda r: R.read_trainer_state(R.last_checkpoint(str(tmp_path / r)))["gflops"]  # noqa: E731
    init = gflops("init")
    rl = [gflops(f"rl-s{k}") - init for k in (0, 1)]
    sft = [gflops(f"sft-s{k}") - init for k in (0, 1)]
    per_sft_step = init / 2                                   # the initialization: 2 steps from a base model
    assert all(r > 0 for r in rl), rl
    assert all(abs(s - sum(rl) / 2) <= 2 * per_sft_step for s in sft), (rl, sft, per_sft_step)
    for arm in ("rl", "sft"):                                 # two checkpoints per run, every run starts at init
        for k in (0, 1):
            ckpts = sorted(os.listdir(tmp_path / f"{arm}-s{k}"))
            assert len([c for c in ckpts if c.startswith("step-")]) == 2
            first = sorted(c for c in ckpts if c.startswith("step-"))[0]
            state = R.read_trainer_state(str(tmp_path / f"{arm}-s{k}" / first))
            assert state["config"]["model"].endswith("init/step-000002")
    changes = json.loads((tmp_path / "fig6_gp-l.json").read_text())
    assert [(c["arm"], c["setting"], c["seeds"]) for c in changes] == [("rl", "ood_rule", 2), ("sft", "ood_rule", 2)]
    assert (tmp_path / "fig5_gp-l.png").exists() and (tmp_path / "fig6_gp-l.png").exists()
    evaluated = (tmp_path / "rl-s0" / "eval_gp-l.json").read_text()

    again = replicate(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for phase in ("init", "rl-s0", "rl-s1", "sft-s0", "sft-s1"):
        assert f"[{phase}] done" in again.stdout
    assert (tmp_path / "rl-s0" / "eval_gp-l.json").read_text() == evaluated   # stored results reused, not replayed


def test_bad_flags_are_one_line():
    for args, match in ((["--scale", "huge"], "scale='huge'"), (["--seeds", "0,x"], "seeds='0,x'"),
                        (["--task", "chess"], "unknown task 'chess'"),
                        (["--rl-updates", "3", "--checkpoints", "2"], "rl_updates=3 is not a multiple")):
        out = subprocess.run([sys.executable, "replicate.py", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=HANG_S)
        assert out.returncode == 2 and match in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr


def test_every_experiment_runs_its_arms_at_tiny_scale(tmp_path):
    for experiment in ("rl-from-base", "verify-iter", "prompt-diversity", "cot-sft", "sft-window"):
        run = replicate(tmp_path, "--seeds", "0", "--experiment", experiment)
        assert run.returncode == 0, (experiment, run.stderr[-3000:])
    config = lambda run: R.read_trainer_state(R.last_checkpoint(str(tmp_path / run)))["config"]  # noqa: E731
    assert [config(f"rl-v{k}-s0")["verify_iter"] for k in (1, 3, 5, 10)] == [1, 3, 5, 10]
    assert (tmp_path / "verify-iter" / "fig10_gp-l.png").exists()
    assert R.read_trainer_state(R.last_checkpoint(str(tmp_path / "rl-base-s0")))["init"] == "tiny-text"
    assert config("sft-diverse-s0")["prompt_diversity"] and config("sft-cot-s0")["reasoning"]
    import replicate as RE                                     # cot-sft evaluates at a budget reasoning fits in
    budgets = {e["key"]["max_new_tokens"] for e in json.loads((tmp_path / "sft-cot-s0" / "eval_gp-l.json")
                                                              .read_text())["checkpoints"]}
    assert budgets == {RE.COT_MAX_NEW_TOKENS}
    assert len([d for d in os.listdir(tmp_path / "init") if d.startswith("step-")]) == 2   # the SFT window
    picks = RE.window_checkpoints(str(tmp_path / "init"), "gp-l")
    arms = sorted(d for d in os.listdir(tmp_path) if d.startswith(("rl-early", "rl-peak", "rl-late")))
    assert len(arms) == len(set(picks.values())) == 2 and arms[0] == "rl-early-s0"   # one arm per checkpoint
    assert {os.path.abspath(R.read_trainer_state(R.last_checkpoint(str(tmp_path / a)))["init"]) for a in arms} == \
        {os.path.abspath(p) for p in picks.values()}
    assert (tmp_path / "sft-window" / "fig6_gp-l.json").exists()


def test_recognition_evaluates_one_attempt_and_draws_figure_8(tmp_path):
    run = subprocess.run([sys.executable, "replicate.py", "--task", "gp-vl", "--scale", "tiny", "--model", "tiny-vlm",
                          "--seeds", "0", "--experiment", "recognition", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "recognition" / "fig8_gp-vl.png").exists()
    stored = json.loads((tmp_path / "rl-s0" / "eval_gp-vl.json").read_text())["checkpoints"]
    one = [e for e in stored if e["key"]["verify_iter"] == 1]
    assert one and all(m["mean_attempts"] == 1 and "recognition_accuracy" in m
                       for e in one for m in e["settings"].values())
    bad = replicate(tmp_path / "x", "--experiment", "recognition")
    assert bad.returncode == 2 and "task gp-l shows no image" in bad.stderr


def test_a_deadline_keeps_what_finished_and_the_same_command_resumes(tmp_path):
    # 1.2 s from the start, the initialization's 60 steps (several seconds on a fast machine, more on a slow one) are
    # cut; before it starts, the study does milliseconds of work, so even a loaded machine starts it
    longer = ("--seeds", "0", "--init-steps", "60")
    cut = replicate(tmp_path, *longer, "--deadline-minutes", "0.02")
    assert cut.returncode == 0 and "deadline of 0.02 minutes reached" in cut.stdout, cut.stdout[-2000:]
    assert "--time-limit" in cut.stdout and R.last_checkpoint(str(tmp_path / "init"))
    assert not R.last_checkpoint(str(tmp_path / "init")).endswith("step-000060")
    again = replicate(tmp_path, *longer)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "--resume" in again.stdout.split("[init]")[1].splitlines()[0]        # the cut phase resumed
    assert (tmp_path / "fig6_gp-l.json").exists()


def test_gpu_small_preset_gives_its_phases_the_time_left(tmp_path):
    """The preset sized for one lent GPU's minutes (docs/replication.md; what it takes there is measured on a GPU):
    under its deadline a phase gets the time left as --time-limit, and it evaluates at the paper's sizes."""
    import replicate as RE
    run = subprocess.run([sys.executable, "replicate.py", "--task", "gp-l", "--scale", "gpu-small", "--dry-run",
                          "--out", str(tmp_path / "study")], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-2000:]
    init = next(line for line in run.stdout.splitlines() if line.startswith("[init] python train_sft.py"))
    left = float(init.split("--time-limit ")[1].split()[0])
    assert 600 < left <= 660 and "--steps 150" in init   # 11 minutes, less the moment the command took
    cfg = RE.ReplicateConfig(scale="gpu-small", out=str(tmp_path / "study"))
    assert (cfg.eval_episodes, cfg.eval_virl_routes) == (234, 48)


def test_under_a_second_left_is_still_a_time_limit(tmp_path, capsys, monkeypatch):
    import replicate as RE
    monkeypatch.setattr(RE.time, "time", lambda: 1000.0)        # a stopped clock: the test never races it
    cfg = RE.ReplicateConfig(scale="tiny", out=str(tmp_path), dry_run=True, deadline_minutes=1.0)
    cfg.started = 1000.0 - 59.7                                 # 0.3 s left: "0" would have meant no limit at all
    RE.command("init", ["train_sft.py"], cfg)
    limit = float(capsys.readouterr().out.split("--time-limit ")[1].split()[0])
    assert 0 < limit <= 0.3
