"""The paper's comparison at small scale: one SFT initialization, then continued SFT or PPO from it at
matched training compute, several seeds each, every checkpoint evaluated on ID and OOD settings.

    python replicate.py --task gp-l --scale gpu       # one GPU, the embedded default (docs/replication.md)
    python replicate.py --task virl-l --scale cpu     # the same pipeline at toy scale on a CPU
    python replicate.py --task gp-l --scale gpu       # again: finished phases are skipped, a cut one resumes

Phases, each a plain command of this project, printed before it runs so that any one can be rerun by hand:
  1. init       train_sft.py on ID expert answers, from the base model             -> <out>/init
  2. rl-s<k>    train_ppo.py from init's last checkpoint, seed k                    -> <out>/rl-s<k>
  3. sft-s<k>   train_sft.py from the same checkpoint, seed k, on fresh expert answers, for as many
                steps as match the RL arm's mean compute, checkpoints at the same compute fractions
                                                                                    -> <out>/sft-s<k>
  4. evaluate   evaluate.py on init and every checkpoint of every arm               -> <out>/fig5_*, fig6_*

Compute is the paper's axis (train_sft.py and train_ppo.py count it into every checkpoint): SFT
6 N x tokens trained; RL 2 N x rollout tokens + 6 N x tokens trained, all four PPO epochs included.
The scale presets hold the sizes; every one of them can be overridden by its flag.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import model as M
import runs as R
from cli import check_writable, main, require
from tasks import check_task

# Sizes per scale. "cpu" runs the whole protocol on 2 CPU cores in one to two hours per task (a check of
# the pipeline, far too small to move a policy much); "gpu" is the one-GPU replication; "tiny" is the
# test suite's smoke run on a random-weight model.
SCALES = {
    "tiny": dict(model="tiny-text", init_examples=8, init_steps=2, init_batch=4, init_lr=1e-3, sft_lr=1e-3,
                 rl_updates=2, rl_turns=4, rl_envs=4, rl_minibatch=4, rl_micro_batch=4, rl_lr=1e-4,
                 checkpoints=2, eval_episodes=2, eval_virl_routes=2, max_new_tokens=8, eval_batch=4),
    "cpu": dict(model="smollm2-135m", init_examples=160, init_steps=20, init_batch=8, init_lr=1e-4, sft_lr=1e-4,
                rl_updates=2, rl_turns=16, rl_envs=8, rl_minibatch=16, rl_micro_batch=4, rl_lr=1e-5,
                checkpoints=2, eval_episodes=32, eval_virl_routes=8, max_new_tokens=96, eval_batch=32),
    "gpu": dict(model="smollm2-135m", init_examples=20000, init_steps=400, init_batch=64, init_lr=1e-5, sft_lr=1e-5,
                rl_updates=40, rl_turns=256, rl_envs=128, rl_minibatch=64, rl_micro_batch=16, rl_lr=1e-6,
                checkpoints=8, eval_episodes=234, eval_virl_routes=48, max_new_tokens=128, eval_batch=128),
}


@dataclass
class ReplicateConfig:
    """SFT vs RL from one SFT initialization, at matched compute, over seeds."""
    task: str = "gp-l"
    """gp-l, gp-vl, virl-l or virl-vl"""
    scale: str = "cpu"
    """size preset: tiny, cpu or gpu (each value below overrides it)"""
    seeds: str = "0,1,2"
    """seeds of each arm, comma-separated"""
    out: str = ""
    """folder of the whole study; empty: runs/replicate-<task>-<scale>"""
    model: Optional[str] = None
    """base model (a VLM for the -vl tasks)"""
    init_examples: Optional[int] = None
    """expert examples of the SFT initialization"""
    init_steps: Optional[int] = None
    """optimizer steps of the SFT initialization"""
    init_batch: Optional[int] = None
    """examples per SFT step (initialization and continued SFT)"""
    init_lr: Optional[float] = None
    """learning rate of the SFT initialization"""
    sft_lr: Optional[float] = None
    """learning rate of continued SFT (the paper's grid: 1e-4 ... 1e-7)"""
    rl_updates: Optional[int] = None
    """PPO updates of each RL run"""
    rl_turns: Optional[int] = None
    """answers per PPO update"""
    rl_envs: Optional[int] = None
    """environments played at once in PPO"""
    rl_minibatch: Optional[int] = None
    """turns per PPO optimizer step"""
    rl_micro_batch: Optional[int] = None
    """turns per forward pass in PPO"""
    rl_lr: Optional[float] = None
    """PPO learning rate (the paper: 1e-6)"""
    checkpoints: Optional[int] = None
    """checkpoints per arm run, at equal compute fractions"""
    eval_episodes: Optional[int] = None
    """GeneralPoints hands per evaluation setting"""
    eval_virl_routes: Optional[int] = None
    """V-IRL held-out routes per evaluation setting"""
    max_new_tokens: Optional[int] = None
    """longest answer, in PPO and evaluation"""
    eval_batch: Optional[int] = None
    """episodes played at once in evaluation"""
    dry_run: bool = False
    """print the commands of the phases still to run, run nothing"""

    def __post_init__(self):
        check_task(self.task)
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}: expected one of {', '.join(SCALES)}")
        for name, value in SCALES[self.scale].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        try:
            self.seed_list = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"seeds={self.seeds!r}: expected comma-separated integers") from None
        if not self.seed_list or len(set(self.seed_list)) != len(self.seed_list):
            raise ValueError(f"seeds={self.seeds!r}: expected distinct comma-separated integers")
        require(self, "init_examples init_steps init_batch rl_updates rl_turns rl_envs rl_minibatch rl_micro_batch "
                "checkpoints eval_episodes eval_virl_routes max_new_tokens eval_batch", lambda v: v >= 1,
                "a positive integer")
        require(self, "init_lr sft_lr rl_lr", lambda v: v > 0, "a positive number")
        if self.rl_updates % self.checkpoints:
            raise ValueError(f"rl_updates={self.rl_updates} is not a multiple of checkpoints={self.checkpoints}")
        self.out = self.out or os.path.join("runs", f"replicate-{self.task}-{self.scale}")
        check_writable(self.out)


# ---- phases ----

def finished(run: str, steps: int) -> Optional[str]:
    """The run's checkpoint at `steps` if it has reached it, else None."""
    last = R.last_checkpoint(run)
    return last if last and R.read_trainer_state(last)["step"] >= steps else None


def run_phase(name: str, args: list, run: str, steps: int, cfg: ReplicateConfig) -> None:
    """Run one training phase to `steps`, resuming it when a checkpoint of it exists; skip it when done."""
    if finished(run, steps):
        print(f"[{name}] done: {run}")
        return
    resume = ["--resume"] if R.last_checkpoint(run) else []
    command(name, args + resume, cfg)


def command(name: str, args: list, cfg: ReplicateConfig) -> None:
    print(f"[{name}] python {' '.join(args)}", flush=True)
    if cfg.dry_run:
        return
    if subprocess.run([sys.executable, *args]).returncode != 0:
        raise ValueError(f"phase {name} failed: rerun `python {' '.join(args)}` to see why")


def matched_sft_steps(init: str, rl_runs: list, cfg: ReplicateConfig) -> int:
    """Continued-SFT steps whose compute matches the RL arm's mean: at the initialization's compute per
    step (continued SFT uses its batch), rounded to a multiple of the checkpoint count."""
    start = R.read_trainer_state(init)["gflops"]
    per_step = (start - R.read_trainer_state(cfg.model).get("gflops", 0.0)) / cfg.init_steps
    rl = sum(R.read_trainer_state(R.last_checkpoint(r))["gflops"] - start for r in rl_runs) / len(rl_runs)
    n = cfg.checkpoints
    return max(n, round(rl / per_step / n) * n)


def replicate(cfg: ReplicateConfig) -> dict:
    out, task = cfg.out, cfg.task
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "replicate_config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    shared = ["--task", task]

    # ---- 1. the SFT initialization ----
    init_run = os.path.join(out, "init")
    run_phase("init", ["train_sft.py", *shared, "--model", cfg.model, "--examples", str(cfg.init_examples),
                       "--steps", str(cfg.init_steps), "--batch-size", str(cfg.init_batch),
                       "--micro-batch", str(cfg.init_batch), "--lr", str(cfg.init_lr),
                       "--save-every", str(cfg.init_steps), "--out", init_run], init_run, cfg.init_steps, cfg)
    init = finished(init_run, cfg.init_steps)
    if init is None:  # a dry run
        return {}

    # ---- 2. RL from it ----
    rl_runs = []
    for seed in cfg.seed_list:
        run = os.path.join(out, f"rl-s{seed}")
        run_phase(f"rl-s{seed}", ["train_ppo.py", *shared, "--model", init, "--seed", str(seed),
                                  "--updates", str(cfg.rl_updates), "--turns", str(cfg.rl_turns),
                                  "--envs", str(cfg.rl_envs), "--minibatch", str(cfg.rl_minibatch),
                                  "--micro-batch", str(cfg.rl_micro_batch), "--lr", str(cfg.rl_lr),
                                  "--max-new-tokens", str(cfg.max_new_tokens),
                                  "--save-every", str(cfg.rl_updates // cfg.checkpoints), "--out", run],
                  run, cfg.rl_updates, cfg)
        rl_runs.append(run)
    if cfg.dry_run and not all(finished(r, cfg.rl_updates) for r in rl_runs):
        print("[sft-s*] the continued-SFT steps are set once the RL runs have finished")
        return {}

    # ---- 3. continued SFT from it, at the RL arm's compute ----
    steps = matched_sft_steps(init, rl_runs, cfg)
    sft_runs = []
    for seed in cfg.seed_list:
        run = os.path.join(out, f"sft-s{seed}")
        run_phase(f"sft-s{seed}", ["train_sft.py", *shared, "--model", init, "--seed", str(seed),
                                   "--data-seed", str(1000 + seed), "--examples", str(steps * cfg.init_batch),
                                   "--steps", str(steps), "--batch-size", str(cfg.init_batch),
                                   "--micro-batch", str(cfg.init_batch), "--lr", str(cfg.sft_lr),
                                   "--save-every", str(steps // cfg.checkpoints), "--out", run], run, steps, cfg)
        sft_runs.append(run)

    # ---- 4. evaluation of every checkpoint, and the figures ----
    command("evaluate", ["evaluate.py", *shared, "--model", ",".join([init, *rl_runs, *sft_runs]),
                         "--episodes", str(cfg.eval_episodes), "--virl-routes", str(cfg.eval_virl_routes),
                         "--max-new-tokens", str(cfg.max_new_tokens), "--batch-size", str(cfg.eval_batch),
                         "--out", out], cfg)
    return {"init": init, "rl": rl_runs, "sft": sft_runs, "sft_steps": steps}


if __name__ == "__main__":
    main(ReplicateConfig, replicate)
