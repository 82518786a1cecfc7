"""Kill -9 a training run, at a random moment or (every other trial) the moment a save's temporary folder
appears, then check that every reader copes: no hidden half-save is taken for a checkpoint, every checkpoint
listed loads, and --resume finishes the run with one log line per step and no torn save left. Not a test
(pytest collects test_*.py only): a measurement for docs/reliability.md.

    python tests/kill_trials.py --trials 20           # prints one JSON line per trial, then a summary
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("SFTRL_CACHE", os.path.join(ROOT, ".cache", "models"))
import evaluate as EV  # noqa: E402
import model as M  # noqa: E402
import runs as R

STEPS = 6
ARGS = ["train_sft.py", "--model", "tiny-text", "--examples", "8", "--steps", str(STEPS), "--batch-size", "2",
        "--micro-batch", "2", "--save-every", "1"]


def trial(k: int, out: str, rng: random.Random) -> dict:
    proc = subprocess.Popen([sys.executable, *ARGS, "--out", out], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    start, delay = time.perf_counter(), rng.uniform(4.0, 12.0)  # import and load take about 4 s, then steps
    target = f".step-{rng.randint(1, STEPS):06d}.tmp-"  # the save to interrupt
    while time.perf_counter() - start < (60 if k % 2 else delay) and proc.poll() is None:
        if k % 2 and os.path.isdir(out) and any(d.startswith(target) for d in os.listdir(out)):
            time.sleep(rng.uniform(0, 0.02))  # somewhere inside the save's writes
            break
        time.sleep(0.001)
    delay = time.perf_counter() - start
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    hidden = sorted(d for d in os.listdir(out) if d.startswith(".")) if os.path.isdir(out) else []
    listed = EV.find_runs(out, os.path.join(out, "eval"))[0][2] if R.last_checkpoint(out) else []
    loads = all(M.load_policy(c) is not None for c in listed)
    again = "--resume" if R.last_checkpoint(out) else "--overwrite"
    resumed = subprocess.run([sys.executable, *ARGS, "--out", out, again], cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    return {"trial": k, "aim": "save" if k % 2 else "random", "killed_after_s": round(delay, 2),
            "hidden_left": hidden, "checkpoints": len(listed),
            "all_load": loads, "resume_rc": resumed.returncode, "log_steps": steps,
            "ok": loads and resumed.returncode == 0 and steps == list(range(1, STEPS + 1))
            and not any(d.startswith(".") for d in os.listdir(out))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, rows = random.Random(args.seed), []
    for k in range(args.trials):
        out = tempfile.mkdtemp(prefix="kill-trial-")
        rows.append(trial(k, out, rng))
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"trials": len(rows), "ok": sum(r["ok"] for r in rows),
                      "torn_saves_found": sum(bool(r["hidden_left"]) for r in rows)}))


if __name__ == "__main__":
    main()
