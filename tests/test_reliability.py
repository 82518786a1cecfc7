"""Nothing lost, nothing run, nothing silently wrong: safe resume, torn saves, results that accumulate, run folders
that are not mixed, range-checked flags and one-line errors for bad files and paths."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import bench as B
import evaluate as EV
import model as M
import replicate as RE
import runs as R
import train_ppo as P
import train_sft as S
from runs import parse_config
from launch import HANG_S, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft(out, **kw):
    base = dict(task="gp-l", model="tiny-text", examples=4, steps=2, batch_size=2, micro_batch=2, lr=1e-3,
                warmup_steps=0, save_every=1, out=str(out))
    return S.SFTConfig(**{**base, **kw})


def one_line_error(cls, argv, capsys) -> str:
    """The single stderr line with which parsing `argv` into `cls` stops (exit code 2)."""
    with pytest.raises(SystemExit) as stop:
        parse_config(cls, argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.count("\n") == 0, err
    return err


# ---- 1. resume never runs code from a checkpoint ----

class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


def test_resume_refuses_an_optimizer_file_that_would_run_code(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    S.train(sft(tmp_path / "run"))
    with open(tmp_path / "run" / "step-000002" / "optimizer.pt", "wb") as f:
        pickle.dump({"state": RunsCode()}, f)
    out = subprocess.run([sys.executable, "train_sft.py", "--model", "tiny-text", "--examples", "4", "--steps", "3",
                          "--batch-size", "2", "--micro-batch", "2", "--save-every", "1", "--resume", "--lr", "1e-3",
                          "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 2 and "is not a plain optimizer state and was not loaded" in out.stderr, out.stderr[-800:]
    assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1 and not os.path.exists(MARKER)


# ---- 2. torn saves are ignored and cleaned up ----

def test_a_torn_save_is_ignored_by_evaluation_and_removed_by_the_next_run(tmp_path):
    S.train(sft(tmp_path / "run"))
    torn = tmp_path / "run" / ".step-000003.tmp-dead"
    shutil.copytree(tmp_path / "run" / "step-000002", torn)     # weights and all, as a kill after the writes leaves it
    shutil.copytree(tmp_path / "run" / "step-000002", tmp_path / "run" / ".step-000001.old-dead")
    runs = EV.find_runs(str(tmp_path / "run"), str(tmp_path / "eval"))
    assert [os.path.basename(c) for c in runs[0][2]] == ["step-000001", "step-000002"]
    assert R.last_checkpoint(str(tmp_path / "run")).endswith("step-000002")
    S.train(sft(tmp_path / "run", steps=3, resume=True))
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "metrics.jsonl"] + [f"step-00000{k}" for k in (1, 2, 3)]


# ---- 4. stored evaluation results accumulate ----

def test_evaluation_results_are_merged_never_dropped(tmp_path):
    run = tmp_path / "sft-tiny"
    for step in (1, 2):
        shutil.copytree(M.resolve("tiny-text"), run / f"step-00000{step}")
        (run / f"step-00000{step}" / "trainer_state.json").write_text(json.dumps({"step": step, "gflops": step}))
    cfg = dict(task="gp-l", episodes=2, batch_size=2, max_new_tokens=6, out=str(tmp_path / "out"), plots=False)

    def stored():
        data = json.loads((run / "eval_gp-l.json").read_text())
        return sorted((os.path.basename(e["path"]), e["key"]["episodes"], tuple(sorted(e["settings"])))
                      for e in data["checkpoints"])
    EV.evaluate(EV.EvalConfig(model=str(run / "step-000001"), settings="id", **cfg))
    EV.evaluate(EV.EvalConfig(model=str(run / "step-000002"), settings="id", **cfg))       # another checkpoint
    EV.evaluate(EV.EvalConfig(model=str(run / "step-000001"), settings="ood_rule", **cfg))  # another setting
    EV.evaluate(EV.EvalConfig(model=str(run / "step-000001"), settings="id", **{**cfg, "episodes": 1}))  # fewer
    assert stored() == [("step-000001", 1, ("id",)), ("step-000001", 2, ("id", "ood_rule")),
                        ("step-000002", 2, ("id",))]
    answers = [json.loads(line) for line in (run / "eval_gp-l_answers.jsonl").read_text().splitlines()]
    assert {(os.path.basename(a["checkpoint"]), a["setting"]) for a in answers} == {
        ("step-000001", "id"), ("step-000001", "ood_rule"), ("step-000002", "id")}
    assert len({a["result"] for a in answers if a["checkpoint"].endswith("1") and a["setting"] == "id"}) == 2


# ---- 5. a run folder holds one run ----

def test_a_new_run_into_a_used_run_folder_is_refused_unless_resumed_or_overwritten(tmp_path):
    S.train(sft(tmp_path / "run", steps=3))
    with pytest.raises(ValueError, match="already holds checkpoints .step-000001 ... step-000003.: pass --resume"):
        S.train(sft(tmp_path / "run"))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        P.train(P.PPOConfig(model="tiny-text", out=str(tmp_path / "run")))
    S.train(sft(tmp_path / "run", overwrite=True))            # explicit: the old steps and log go
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "metrics.jsonl", "step-000001", "step-000002"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


# ---- 6. every numeric flag is range-checked before any work ----

@pytest.mark.parametrize("cls,argv,match", [
    (P.PPOConfig, ["--lr", "nan"], "lr=nan: expected a finite number"),
    (P.PPOConfig, ["--top-p", "0"], "top_p=0.0: expected a share in (0, 1]"),
    (P.PPOConfig, ["--value-clip", "-1"], "value_clip=-1.0"),
    (S.SFTConfig, ["--grad-clip", "-1"], "grad_clip=-1.0: expected a positive number"),
    (S.SFTConfig, ["--warmup-steps", "-1"], "warmup_steps=-1"),
    (S.SFTConfig, ["--lr", "inf"], "lr=inf: expected a finite number"),
    (EV.EvalConfig, ["--temperature", "-1"], "temperature=-1.0: expected 0 (greedy) or a positive number"),
    (EV.EvalConfig, ["--top-p", "1.5"], "top_p=1.5"),
    (B.BenchConfig, ["--env-seconds", "-1"], "env_seconds=-1.0"),
    (B.BenchConfig, ["--cache-tokens", "-1"], "cache_tokens=-1"),
    (B.BenchConfig, ["--baseline-episodes", "-1"], "baseline_episodes=-1"),
    (RE.ReplicateConfig, ["--rl-lr", "0"], "rl_lr=0.0: expected a positive number"),
])
def test_bad_numbers_stop_with_one_line(cls, argv, match, capsys):
    assert match in one_line_error(cls, argv, capsys)


# ---- 7. bad files and paths: one line, before the model loads ----

def test_bad_paths_and_devices_stop_with_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file: expected a folder" in one_line_error(S.SFTConfig, ["--out", str(tmp_path / "file")], capsys)
    assert "lies under the file" in one_line_error(P.PPOConfig, ["--out", str(tmp_path / "file" / "run")], capsys)
    assert "is a file" in one_line_error(EV.EvalConfig, ["--out", str(tmp_path / "file")], capsys)
    assert "is a folder" in one_line_error(B.BenchConfig, ["--out", str(tmp_path)], capsys)
    assert "device='bogus': expected cpu, cuda" in one_line_error(S.SFTConfig, ["--device", "bogus"], capsys)
    if not torch.cuda.is_available():
        assert "no such CUDA GPU here" in one_line_error(P.PPOConfig, ["--device", "cuda"], capsys)
    assert "(it is a folder)" in one_line_error(S.SFTConfig, ["--data", str(tmp_path)], capsys)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": 5}], "response": "x"}))
    with pytest.raises(ValueError, match="bad.jsonl:1: not an example .wrong types."):
        S.read_examples(str(tmp_path / "bad.jsonl"))


def rewrite_weights(folder, change):
    from safetensors.torch import load_file, save_file
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v.clone() for k, v in change(state).items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def broken_copy(tmp_path, name, damage):
    folder = tmp_path / name
    shutil.copytree(M.resolve("tiny-text"), folder)
    damage(folder)
    return str(folder)


@pytest.mark.parametrize("name,damage,match", [
    ("config", lambda f: (f / "config.json").write_text("{not json"), "unreadable config.json"),
    ("empty", lambda f: (f / "model.safetensors").write_bytes(b""), "its weights cannot be loaded"),
    ("truncated", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
     "its weights cannot be loaded"),
    ("random", lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)), "its weights cannot be loaded"),
    ("no-weights", lambda f: (f / "model.safetensors").unlink(), "its weights cannot be loaded"),
    ("head", lambda f: (f / "value_head.safetensors").write_bytes(b"\x08" + bytes(20)), "not a value head"),
    ("prefixed", lambda f: rewrite_weights(f, lambda sd: {"foo." + k: v for k, v in sd.items()}),
     "weights do not match its config.json: 21 parameter.s. missing from the weights .lm_head.weight"),
    ("extra", lambda f: rewrite_weights(f, lambda sd: {**sd, "model.extra.weight": sd["model.norm.weight"]}),
     r"1 tensor\(s\) the model has no place for \(model.extra.weight\)"),
    ("dropped", lambda f: rewrite_weights(f, lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"}),
     r"1 parameter\(s\) missing from the weights \(model.norm.weight\)"),
    ("template", lambda f: (f / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }"),
     r"its chat template \(chat_template.jinja\) cannot be rendered \(TemplateSyntaxError"),
])
def test_a_broken_model_folder_is_one_error(tmp_path, name, damage, match):
    folder = broken_copy(tmp_path, name, damage)
    with pytest.raises(ValueError, match=match) as e:
        M.load_policy(folder)
    assert "\n" not in str(e.value)


def test_a_value_head_of_another_width_is_one_error(tmp_path):
    policy = M.load_policy("tiny-text")
    policy.save(str(tmp_path / "ck"))
    from safetensors.torch import load_file, save_file
    head = load_file(str(tmp_path / "ck" / "value_head.safetensors"))
    head["net.2.weight"] = torch.zeros(3, 3)
    save_file(head, str(tmp_path / "ck" / "value_head.safetensors"))
    with pytest.raises(ValueError, match="not a value head of this model"):
        M.load_policy(str(tmp_path / "ck"))


def test_a_checkpoint_of_another_task_is_said_out_loud(tmp_path, capsys):
    S.train(sft(tmp_path / "gp", steps=1))
    S.train(sft(tmp_path / "virl", task="virl-l", steps=1, model=str(tmp_path / "gp" / "step-000001")))
    assert "was trained on gp-l; this run trains on virl-l" in capsys.readouterr().out


def test_under_torchrun_the_launchers_report_shows_the_one_line(tmp_path):
    """The launcher's failure report quotes a rank's one line. Which ranks print it races: the launcher stops the
    others as soon as the first one exits (a loaded machine leaves a rank still importing torch then), so the test
    asks for the report's quote and one rank's own line, not for every rank's."""
    out = torchrun("train_sft.py", ["--lr", "nan", "--out", str(tmp_path / "r")])
    line = "error: lr=nan: expected a finite number"
    before, _, report_part = out.stderr.rpartition("FAILED")
    assert out.returncode != 0 and line in report_part and line in before, out.stderr[-1500:]
    assert "To enable traceback" not in out.stderr    # the report quotes the error instead of pointing at the docs


def test_a_time_limit_saves_and_resume_continues_as_the_uninterrupted_run(tmp_path):
    S.train(sft(tmp_path / "a", steps=4, save_every=4))
    S.train(sft(tmp_path / "b", steps=4, save_every=4, time_limit=1e-6))   # out of time after the first step
    assert R.last_checkpoint(str(tmp_path / "b")).endswith("step-000001")
    S.train(sft(tmp_path / "b", steps=4, save_every=4, resume=True))
    a, b = ([json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("a", "b"))
    assert a == b
    P.train(P.PPOConfig(model="tiny-text", updates=3, turns=4, envs=4, minibatch=4, micro_batch=4, max_new_tokens=8,
                        time_limit=1e-6, out=str(tmp_path / "ppo")))
    assert R.read_trainer_state(R.last_checkpoint(str(tmp_path / "ppo")))["step"] == 1


# ---- 8. nothing reused, deleted or saved wrongly ----

def finite_weights(checkpoint) -> bool:
    from safetensors.torch import load_file
    return all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())


def test_a_diverging_sft_run_saves_no_bad_weights_and_stops_with_one_line(tmp_path):
    """--lr 1e30 passes the range check; the first step's weights are finite (huge), every later gradient is not:
    those steps are skipped (never applied, counted), and the run stops after MAX_SKIPPED_IN_A_ROW of them, naming
    the learning rate and the last good checkpoint. Nothing non-finite is ever saved."""
    with pytest.raises(ValueError, match=r"5 steps in a row had a non-finite loss or gradient \(step 6\): training "
                       r"diverged, most likely from the learning rate \(1e\+30") as stop:
        S.train(sft(tmp_path / "run", steps=12, lr=1e30))
    assert "\n" not in str(stop.value) and str(stop.value).endswith(f"is {tmp_path / 'run' / 'step-000001'}")
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "metrics.jsonl", "step-000001"]
    assert finite_weights(tmp_path / "run" / "step-000001")
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in log] == [0, 1, 2, 3, 4, 5]
    # a run whose last step was skipped ends with the same line and saves nothing of it
    with pytest.raises(ValueError, match=r"the last 3 step\(s\) had a non-finite loss or gradient .* the last good "
                       "checkpoint is none: nothing was saved"):
        S.train(sft(tmp_path / "short", steps=4, save_every=10, lr=1e30))
    assert not R.last_checkpoint(str(tmp_path / "short"))


def test_a_diverging_ppo_run_stops_the_same_way(tmp_path):
    with pytest.raises(ValueError, match=r"5 updates in a row had a non-finite loss or gradient"):
        P.train(P.PPOConfig(model="tiny-text", updates=8, turns=4, envs=2, minibatch=4, micro_batch=2,
                            max_new_tokens=6, lr=1e30, save_every=1, out=str(tmp_path / "ppo")))
    assert all(finite_weights(tmp_path / "ppo" / d) for d in os.listdir(tmp_path / "ppo") if d.startswith("step-"))


def test_an_applied_step_that_makes_a_weight_non_finite_stops_the_run():
    health = R.Divergence("/nonexistent", 1e-3)
    health.step(True, 1, [torch.ones(3)])                        # finite: goes on
    with pytest.raises(ValueError, match=r"the optimizer step made some weights non-finite \(step 2\)"):
        health.step(True, 2, [torch.ones(3), torch.tensor([1.0, float("inf")])])
    health.step(False, 3, [])
    assert (health.in_a_row, health.skipped) == (1, 1)


def test_a_save_that_falls_on_skipped_steps_waits_for_the_next_step_that_trains(monkeypatch):
    saved = []
    monkeypatch.setattr(R, "save_checkpoint", lambda policy, opt, out, step, state: saved.append(step))
    health = R.Divergence("/nonexistent", 1e-3)
    for step, applied in ((1, True), (2, False), (3, False), (4, True), (5, True), (6, True)):
        health.step(applied, step, [torch.ones(1)])
        R.step_done(None, None, "/nonexistent", step, 10, 2, 0, 0.0, {}, print, health)
    assert saved == [4, 6]   # step 2 was due but skipped, step 3 skipped too: the save falls on step 4


def test_resume_says_what_a_checkpoint_lacks(tmp_path, capsys):
    S.train(sft(tmp_path / "run", steps=2))
    state_file = tmp_path / "run" / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "rng"}))   # no RNG state: said, reseeded
    S.train(sft(tmp_path / "run", steps=3, resume=True))
    assert "holds no usable RNG state (missing); resuming with the RNG of --seed" in capsys.readouterr().out
    assert R.read_trainer_state(R.last_checkpoint(str(tmp_path / "run")))["step"] == 3
    last = tmp_path / "run" / "step-000003"
    state = json.loads((last / "trainer_state.json").read_text())
    (last / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "gflops"}))
    with pytest.raises(ValueError, match=r"--resume: .*step-000003 lacks gflops in its trainer_state.json, so the run "
                       "cannot go on where it stopped; start a new run from its weights with --model"):
        S.train(sft(tmp_path / "run", steps=4, resume=True))
    (last / "trainer_state.json").write_text(json.dumps(state))
    (last / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"step-000003 lacks its optimizer.pt"):
        P.train(P.PPOConfig(model="tiny-text", updates=4, out=str(tmp_path / "run"), resume=True))
    (last / "trainer_state.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"trainer_state.json: holds a list; expected a JSON object"):
        S.train(sft(tmp_path / "run", steps=4, resume=True))


def test_an_out_of_range_generation_config_is_replaced_by_the_defaults_and_said(tmp_path, capsys):
    folder = broken_copy(tmp_path, "gen", lambda f: (f / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": -1.0, "top_p": 1.5, "top_k": -3})))
    drawn = M.load_policy(folder).checkpoint_sampling()
    assert drawn == {"greedy": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
    out = capsys.readouterr().out
    assert all(f"generation_config.json: {x} is out of range" in out for x in ("temperature=-1.0", "top_p=1.5",
                                                                                "top_k=-3"))


def test_an_out_the_filesystem_cannot_name_is_one_line(tmp_path, capsys):
    long = str(tmp_path / ("x" * 300))
    for cls in (S.SFTConfig, P.PPOConfig, EV.EvalConfig, RE.ReplicateConfig, B.BenchConfig):
        assert "is 300 bytes; this filesystem takes at most 255" in one_line_error(cls, ["--out", long], capsys)
    assert "is 300 bytes" in one_line_error(S.SFTConfig, ["--export-data", long], capsys)
    deep = str(tmp_path / "/".join(["y" * 200] * 25))                  # every name fits, the whole path does not
    assert "this system takes paths under" in one_line_error(P.PPOConfig, ["--out", deep], capsys)
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    import vision_pretrain as VP
    for cls in (S.SFTConfig, P.PPOConfig, EV.EvalConfig, RE.ReplicateConfig, VP.VisionConfig):
        assert "is a symbolic link to" in one_line_error(cls, ["--out", str(dangling / "run")], capsys)
        if os.path.isdir("/proc/self"):  # root may write anywhere by its permissions, yet not here
            assert "is not writable" in one_line_error(cls, ["--out", "/proc/self/run"], capsys)
    assert "is a symbolic link to" in one_line_error(B.BenchConfig, ["--out", str(dangling)], capsys)


def test_replicate_refuses_a_phase_trained_under_another_recipe_unless_told_to_start_it_over(tmp_path, capsys):
    run = tmp_path / "study" / "init"
    (run / "step-000004").mkdir(parents=True)
    trained = {"task": "gp-l", "model": "tiny-text", "lr": 0.001, "steps": 4, "examples": 8, "protocol": "project"}
    (run / "step-000004" / "trainer_state.json").write_text(json.dumps({"step": 4, "gflops": 1.0, "tokens": 10,
                                                                          "config": trained}))
    args = ["train_sft.py", "--task", "gp-l", "--model", "tiny-text", "--lr", "0.0001", "--steps", "4",
            "--examples", "8", "--out", str(run)]
    cfg = RE.ReplicateConfig(scale="tiny", out=str(tmp_path / "study"), dry_run=True)
    with pytest.raises(ValueError, match=r"phase init: .* was trained with another recipe: lr 0.001 \(asked 0.0001\); "
                       "pass --restart-changed"):
        RE.run_phase("init", args, str(run), 4, cfg)
    same = [a if a != "0.0001" else "1e-3" for a in args]      # the same rate written otherwise: the same recipe
    RE.run_phase("init", same, str(run), 4, cfg)
    assert "[init] done" in capsys.readouterr().out
    cfg.restart_changed = True
    RE.run_phase("init", args, str(run), 4, cfg)
    out = capsys.readouterr().out
    assert "recipe changed (lr 0.001 (asked 0.0001)): starting it over" in out and "--overwrite" in out
    assert RE.recipe(["x.py", "--engine", "--lr", "-1", "--out", "o", "--resume"]) == {"engine": True, "lr": "-1"}


@pytest.mark.parametrize("name,change,match", [
    ("one coordinate", lambda r: r["start_place"].update(relocated_geocode=[40.7]),
     r"start_place.relocated_geocode is \[40.7\]; expected \[lat, lng\]"),
    ("a geocode off the globe", lambda r: r["route_results"]["geocode_list"].__setitem__(1, [95.0, 1.0]),
     r"route_results.geocode_list\[1\] is \[95.0, 1.0\]"),
    ("milestones not strings", lambda r: r.update(milestone_info=[1, {"a": 2}]), "milestone_info holds"),
    ("geocodes not a list", lambda r: r["route_results"].update(geocode_list=5), "geocode_list is a int"),
    ("a heading of 1e400", "1e400", "init_heading is inf; expected a heading in degrees"),
    ("deep nesting", "deep", "nested more than 64 deep"),
])
def test_a_malformed_route_file_is_one_line_naming_the_file_and_the_field(tmp_path, name, change, match):
    import env_virl as V
    route = V.generate_routes("nyc", 1)[0]
    path = tmp_path / "routes.json"
    if change == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif change == "1e400":
        path.write_text(json.dumps([[route], 1]).replace(f'"init_heading": {route["init_heading"]}',
                                                          '"init_heading": 1e400'))
    else:
        change(route)
        path.write_text(json.dumps([[route], 1]))
    with pytest.raises(ValueError, match=match) as e:
        V.NavigationEnv(V.VirlConfig(routes=str(path)))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ---- untrusted files ----

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def test_an_eps_file_named_as_an_image_is_refused_and_never_reaches_ghostscript(tmp_path, monkeypatch):
    """Pillow hands EPS to Ghostscript (`gs -dSAFER ...`) when one is on PATH: an SFT image or a panorama named
    .png / .jpg that holds EPS is refused, one line naming it, and a stand-in gs is never run."""
    import PIL.EpsImagePlugin as eps
    import streetview as SV
    from PIL import Image
    called, bin_dir = tmp_path / "gs_called", tmp_path / "bin"
    bin_dir.mkdir()
    script = f'#!/bin/sh\necho "$@" >> {called}\n[ "$1" = --version ] && echo 10.0 && exit 0\nexit 1\n'
    (bin_dir / "gs").write_text(script)
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(eps, "gs_binary", None)  # Pillow looks for gs again: finds the stand-in
    (tmp_path / "card.png").write_bytes(EPS)
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi",
                                                                   "image": "card.png"}], "response": "x"}) + "\n")
    with pytest.raises(ValueError, match="card.png: it holds EPS data; expected a PNG or JPEG image") as e:
        S.read_examples(str(tmp_path / "data.jsonl"))
    assert "\n" not in str(e.value)
    views = tmp_path / "views"
    views.mkdir()
    (views / "p.jpg").write_bytes(EPS)
    (views / "p.metadata.json").write_text(json.dumps({"rotation": 0.0}))
    with open(tmp_path / "map.pkl", "wb") as f:
        pickle.dump({(0.0, 0.0): "p"}, f)
    with pytest.raises(ValueError, match="p.jpg"):
        SV.StreetViews(str(views), str(tmp_path / "map.pkl"), lambda a, b: 0.0).pano("p")
    assert not called.exists()
    with pytest.raises(Exception):  # what the check prevents: opened as Pillow opens by default, the file runs gs
        Image.open(tmp_path / "card.png").load()
    assert called.exists()


def test_a_run_folder_is_held_by_one_trainer_at_a_time(tmp_path):
    """A second trainer into a folder that a live process holds stops with one line naming it; once the holder is
    gone (killed: no clean-up ran) the folder is free again."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runs; runs.hold_run_folder(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(600)", str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"is in use by process {holder.pid} ") as e:
            S.train(sft(out))
        assert "\n" not in str(e.value) and not os.path.exists(out / "step-000001")
    finally:
        holder.kill()
        holder.wait()
    S.train(sft(out))  # the lock died with its holder
    assert os.path.exists(out / "step-000002")


def test_resume_refuses_another_recipe_unless_told_and_says_so(tmp_path, capsys):
    """Resuming a GP-L run as V-IRL-L, or at another rate or batch size, would leave a folder of two recipes'
    checkpoints: refused in one line naming the fields; --resume-changed goes on and says so."""
    S.train(sft(tmp_path / "run"))
    for change, named in ((dict(task="virl-l"), "task gp-l (asked virl-l)"), (dict(lr=1e-4), "lr 0.001 (asked 0.0001)"),
                          (dict(batch_size=4, micro_batch=4), "batch-size 2 (asked 4); micro-batch 2 (asked 4)")):
        with pytest.raises(ValueError, match="was trained with another recipe") as e:
            S.train(sft(tmp_path / "run", steps=3, resume=True, **change))
        assert named in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "step-000003")
    S.train(sft(tmp_path / "run", steps=3, resume=True, lr=1e-3))      # 1e-3 written another way: the same
    S.train(sft(tmp_path / "run", steps=4, resume=True, lr=1e-4, resume_changed=True))
    assert "goes on with another recipe: lr 0.001 (asked 0.0001)" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "run" / "step-000004")


def damage_state(run, **fields):
    path = run / "step-000002" / "trainer_state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, **fields}))


@pytest.mark.parametrize("field,value,named", [("step", "ten", "step is ten"), ("step", -1, "step is -1"),
                                               ("step", 10 ** 9, "step is 1000000000"), ("step", 2.5, "step is 2.5"),
                                               ("gflops", float("nan"), "gflops is nan"),
                                               ("tokens", [1], "tokens is [1]")])
def test_resume_from_a_damaged_trainer_state_is_one_line_naming_the_field(tmp_path, field, value, named):
    S.train(sft(tmp_path / "run"))
    damage_state(tmp_path / "run", **{field: value})
    with pytest.raises(ValueError, match="trainer_state.json: " + named.replace("[", r"\[").replace("]", r"\]")) as e:
        S.train(sft(tmp_path / "run", steps=3, resume=True))
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run" / "step-000003")


def test_a_damaged_rng_state_is_a_warning_and_the_run_goes_on(tmp_path, capsys):
    S.train(sft(tmp_path / "run"))
    damage_state(tmp_path / "run", rng="abc")
    S.train(sft(tmp_path / "run", steps=3, resume=True))
    assert "holds no usable RNG state (malformed)" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "run" / "step-000003")


def test_a_torn_last_metrics_line_is_dropped_and_a_torn_line_before_it_is_one_line(tmp_path, capsys):
    S.train(sft(tmp_path / "run"))
    log = tmp_path / "run" / "metrics.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 3, "loss": 1.2')  # a kill while the next line was written
    S.train(sft(tmp_path / "run", steps=3, resume=True))
    assert "its last line is torn" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3]
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + '{"step": 2, "lo\n' + "".join(lines[2:]))
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object") as e:
        S.train(sft(tmp_path / "run", steps=4, resume=True))
    assert "\n" not in str(e.value)


def test_an_optimizer_state_of_another_model_is_refused_naming_the_parameter(tmp_path):
    S.train(sft(tmp_path / "run"))
    path = tmp_path / "run" / "step-000002" / "optimizer.pt"
    saved = torch.load(path, weights_only=True)
    first = min(saved["state"])
    for name, value in saved["state"][first].items():  # as many tensors, one of another shape
        if value.dim():
            saved["state"][first][name] = value.flatten()[:-1]
    torch.save(saved, path)
    with pytest.raises(ValueError, match=f"parameter {first}'s exp_avg has shape .* this model's is") as e:
        S.train(sft(tmp_path / "run", steps=3, resume=True))
    assert "\n" not in str(e.value)


def test_temperatures_that_underflow_are_refused_for_training_and_greedy_for_evaluation(tmp_path, capsys):
    """At --temperature 1e-45 logits / T overflow: evaluation sampled one constant token (NaN probabilities) and PPO
    skipped every minibatch, both without a word."""
    assert "temperature=1e-45: expected at least 0.001" in one_line_error(P.PPOConfig, ["--temperature", "1e-45"],
                                                                         capsys)
    policy = M.load_policy("tiny-text")
    drawn = EV.sampling(policy, EV.EvalConfig(model="tiny-text", temperature=1e-45, out=str(tmp_path / "e")))
    assert drawn["greedy"] and "sampling greedily" in capsys.readouterr().out
    assert not EV.sampling(policy, EV.EvalConfig(model="tiny-text", temperature=0.5, out=str(tmp_path / "e")))["greedy"]
    policy.model.generation_config.do_sample, policy.model.generation_config.temperature = True, 1e-45
    assert policy.checkpoint_sampling()["greedy"] and "below 0.001" in capsys.readouterr().out


@pytest.mark.parametrize("argv,said", [(["--steps", "x"], "argument --steps: invalid int value: 'x'"),
                                       (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
                                       (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
                                       (["--steps"], "argument --steps: expected one argument")])
def test_argparse_errors_are_one_line_naming_the_flag_and_the_value(argv, said, capsys):
    """argparse printed a usage block of 20 lines before its message, and named an Optional flag's type
    `<lambda>`."""
    err = one_line_error(S.SFTConfig, argv, capsys)
    assert said in err and "--help lists the flags" in err
