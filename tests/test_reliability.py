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
from launch import torchrun

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
                          "--batch-size", "2", "--micro-batch", "2", "--save-every", "1", "--resume",
                          "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
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
    assert sorted(os.listdir(tmp_path / "run")) == ["metrics.jsonl", "step-000001", "step-000002", "step-000003"]


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
    assert sorted(os.listdir(tmp_path / "run")) == ["metrics.jsonl", "step-000001", "step-000002"]
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
    out = torchrun("train_sft.py", ["--lr", "nan", "--out", str(tmp_path / "r")], timeout=300)
    assert out.returncode != 0 and out.stderr.count("error: lr=nan: expected a finite number") >= 3, out.stderr[-1500:]
    assert "To enable traceback" not in out.stderr   # the report quotes the error instead of pointing at the docs


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
