"""The codebase as a house (files as rooms, imports as arrows): no circle, nothing below the trainers importing a
trainer or a builder script, and the trainers copying out with the few files they use (docs/README's file map)."""
import ast
import os
import shutil
import subprocess
import sys

import model as M
from launch import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
ABOVE = {"train_sft", "train_ppo", "vision_pretrain", "evaluate", "replicate", "bench"}  # entry scripts


def imports(module: str) -> set:
    """The project modules a file imports anywhere in it (at the top or inside a function)."""
    found = set()
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {module}


def test_no_import_circle_and_nothing_below_the_scripts_imports_one():
    graph = {m: imports(m) for m in MODULES}
    for start in MODULES:   # a depth-first walk from every room: it must never come back
        seen, stack = set(), list(graph[start])
        while stack:
            m = stack.pop()
            assert m != start, f"{start} imports itself through {sorted(seen)}"
            if m not in seen:
                seen.add(m)
                stack.extend(graph[m])
    for m in set(MODULES) - ABOVE:
        assert not graph[m] & ABOVE, f"{m} imports the script(s) {graph[m] & ABOVE}"


def loaded_by(module: str) -> list:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m in {set(MODULES)!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-2000:]
    return sorted(run.stdout.split())


def test_importing_a_trainer_loads_only_what_a_gp_run_uses():
    for trainer in ("train_ppo", "train_sft"):
        loaded = loaded_by(trainer)
        assert len(loaded) <= 6, loaded
        assert not {"env_virl", "streetview", "engine", "vision_pretrain", "official"} & set(loaded), loaded


def copied_out(tmp_path, *files) -> str:
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in files:
        shutil.copy(os.path.join(ROOT, f), folder / f)
    return str(folder)


def test_the_trainers_copy_out_with_model_rollout_env_points_and_runs(tmp_path):
    """train_ppo.py and train_sft.py run a tiny GP-L job from a folder holding only the five files (and a model
    folder of one's own), with nothing else of the project on the path."""
    folder = copied_out(tmp_path, "train_ppo.py", "train_sft.py", "model.py", "rollout.py", "env_points.py",
                        "runs.py")
    model = M.resolve("tiny-text")   # a local model folder, as a user brings theirs
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = [sys.executable, "-E", "-s"]   # the script's folder on the path, nothing of the environment's
    sft = subprocess.run([*python, "train_sft.py", "--model", model, "--examples", "4", "--steps", "1",
                          "--batch-size", "2", "--micro-batch", "2", "--out", "sft"], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=HANG_S)
    assert sft.returncode == 0, sft.stderr[-3000:]
    ppo = subprocess.run([*python, "train_ppo.py", "--model", "sft", "--updates", "1", "--turns", "4",
                          "--envs", "2", "--minibatch", "4", "--micro-batch", "2", "--max-new-tokens", "6",
                          "--out", "ppo"], cwd=folder, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    assert os.path.exists(os.path.join(folder, "ppo", "step-000001", "trainer_state.json"))
