"""The paper's comparison at small scale, and its further analyses: one SFT initialization, then continued
SFT or PPO from it at matched training compute, several seeds each, every checkpoint evaluated on ID and OOD.

    python replicate.py --task gp-l --scale gpu       # one GPU, the embedded default (docs/replication.md)
    python replicate.py --task virl-l --scale cpu     # the same pipeline at toy scale on a CPU
    python replicate.py --task gp-l --scale gpu       # again: finished phases are skipped, a cut one resumes
    python replicate.py --task gp-l --scale cpu --experiment verify-iter     # docs/experiments.md

Phases, each a plain command of this project, printed before it runs so that any one can be rerun by hand:
  1. init       train_sft.py on ID expert answers, from the base model             -> <out>/init
  2. rl-s<k>    train_ppo.py from init's last checkpoint, seed k                    -> <out>/rl-s<k>
  3. sft-s<k>   train_sft.py from the same checkpoint, seed k, on fresh expert answers, for as many
                steps as match the RL arm's mean compute, checkpoints at the same compute fractions
                                                                                    -> <out>/sft-s<k>
  4. evaluate   evaluate.py on init and every checkpoint of every arm               -> <out>/fig5_*, fig6_*
An --experiment adds its own arms (named <arm>-s<k>) and evaluates into <out>/<experiment>/; every experiment
shares the study folder, its initialization and the arms it has in common with the others.

Compute is the paper's axis (train_sft.py and train_ppo.py count it into every checkpoint): SFT
6 N x tokens trained; RL 2 N x rollout tokens + 6 N x tokens trained, all four PPO epochs included.
The scale presets hold the sizes; every one of them can be overridden by its flag.

`--protocol official` runs every phase under the official code's effective rules (train_ppo.py, train_sft.py,
evaluate.py: docs/fidelity.md), in its own study folder (runs/replicate-<task>-<scale>-official unless --out is
given), with the task's official learning rates for RL and continued SFT unless --rl-lr / --sft-lr are given; a
phase found done under another protocol is refused, never mixed in. The tables and figures say which protocol
produced them. A phase whose checkpoints recorded another recipe (its command's flags) is refused the same way,
unless --restart-changed starts it over.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import runs as R
from rollout import OFFICIAL_PPO_LR, OFFICIAL_SFT_LR, check_protocol, check_task
from runs import check_writable, main, require

# Sizes per scale. "cpu" runs the whole protocol on 2 CPU cores in one to two hours per task (a check of
# the pipeline, far too small to move a policy much); "gpu" is the one-GPU replication; "gpu-small" fits about
# 12 minutes of one H100 (below); "tiny" is the test suite's smoke run on a random-weight model.
SCALES = {
    "tiny": dict(model="tiny-text", init_examples=8, init_steps=2, init_batch=4, init_lr=1e-3, sft_lr=1e-3,
                 rl_updates=2, rl_turns=4, rl_envs=4, rl_minibatch=4, rl_micro_batch=4, rl_lr=1e-4,
                 checkpoints=2, eval_episodes=2, eval_virl_routes=2, max_new_tokens=8, eval_batch=4,
                 engine=False, deadline_minutes=0.0),
    "cpu": dict(model="smollm2-135m", init_examples=160, init_steps=20, init_batch=8, init_lr=1e-4, sft_lr=1e-4,
                rl_updates=2, rl_turns=16, rl_envs=8, rl_minibatch=16, rl_micro_batch=4, rl_lr=1e-5,
                checkpoints=2, eval_episodes=32, eval_virl_routes=8, max_new_tokens=96, eval_batch=32,
                engine=False, deadline_minutes=0.0),
    "gpu": dict(model="smollm2-135m", init_examples=20000, init_steps=400, init_batch=64, init_lr=1e-5, sft_lr=1e-5,
                rl_updates=40, rl_turns=256, rl_envs=128, rl_minibatch=64, rl_micro_batch=16, rl_lr=1e-6,
                checkpoints=8, eval_episodes=234, eval_virl_routes=48, max_new_tokens=128, eval_batch=128,
                engine=True, deadline_minutes=0.0),
    # Sized from the only GPU figures at hand (one H100, before the engine: SFT 25,000 tokens/s, a PPO epoch
    # 35,100 tokens/s, batched generate 6,100 tokens/s, the multi-turn rollout far slower) for SmolLM2 on
    # GP-L / V-IRL-L answers of about 60 tokens after prompts of about 300: the initialization 150 steps of 32
    # (about 1 min), each RL run 4 updates of 128 answers at a raised rate (about 1.5 min), continued SFT
    # matched, evaluation of 234 hands / 48 routes per setting at the first and last checkpoint of each arm;
    # an 11-minute deadline keeps what finished, and the same command resumes the rest.
    "gpu-small": dict(model="smollm2-135m", init_examples=4800, init_steps=150, init_batch=32, init_lr=3e-5,
                      sft_lr=1e-5, rl_updates=4, rl_turns=128, rl_envs=128, rl_minibatch=64, rl_micro_batch=32,
                      rl_lr=1e-5, checkpoints=2, eval_episodes=234, eval_virl_routes=48, max_new_tokens=96,
                      eval_batch=128, engine=True, deadline_minutes=11.0),
}

# the cot-sft experiment's answer budget: the official evaluation's (max_new_tokens 256), which a reasoning answer
# fits in
COT_MAX_NEW_TOKENS = 256

# the -vl tasks' base model at each scale: built offline, no download (a VLM of your own: --model)
VL_MODELS = {"tiny": "tiny-vlm", "cpu": "smolvlm-local", "gpu": "smolvlm-local", "gpu-small": "smolvlm-local"}


class OutOfTime(Exception):
    """The study's deadline passed: what finished is kept, and the same command resumes the rest."""


@dataclass
class ReplicateConfig:
    """SFT vs RL from one SFT initialization, at matched compute, over seeds."""
    task: str = "gp-l"
    """gp-l, gp-vl, virl-l or virl-vl"""
    scale: str = "cpu"
    """size preset: tiny, cpu, gpu-small or gpu (each value below overrides it)"""
    experiment: str = "main"
    """main (the paper's comparison), recognition, rl-from-base, verify-iter, prompt-diversity, cot-sft or
    sft-window (docs/experiments.md); all share the study folder, its initialization and arms"""
    seeds: str = "0,1,2"
    """seeds of each arm, comma-separated"""
    protocol: str = "project"
    """project (this project's rules) or official (the official run's effective ones) for every phase"""
    out: str = ""
    """folder of the whole study; empty: runs/replicate-<task>-<scale>"""
    model: Optional[str] = None
    """base model; empty: the scale's (smollm2-135m; for the -vl tasks smolvlm-local, tiny-vlm at tiny)"""
    init_examples: Optional[int] = None
    """expert examples of the SFT initialization"""
    init_steps: Optional[int] = None
    """optimizer steps of the SFT initialization"""
    init_batch: Optional[int] = None
    """examples per SFT step (initialization and continued SFT)"""
    init_lr: Optional[float] = None
    """learning rate of the SFT initialization"""
    sft_lr: Optional[float] = None
    """learning rate of continued SFT (the paper's grid: 1e-4 ... 1e-7; official protocol: the task's official one)"""
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
    """PPO learning rate (the paper: 1e-6; official protocol: the task's official one, V-IRL-VL 1e-7)"""
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
    engine: Optional[bool] = None
    """PPO and evaluation generate with engine.py (on by the gpu presets)"""
    deadline_minutes: Optional[float] = None
    """start no phase after this many minutes, give each the time left; 0: none (gpu-small: 11)"""
    dry_run: bool = False
    """print the commands of the phases still to run, run nothing"""
    restart_changed: bool = False
    """start over each phase whose recorded recipe differs from the one asked for (deleting its checkpoints);
    without it such a phase stops the study with one line naming the differing fields"""

    def __post_init__(self):
        check_task(self.task)
        check_protocol(self.protocol)
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"experiment={self.experiment!r}: expected one of {', '.join(EXPERIMENTS)}")
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}: expected one of {', '.join(SCALES)}")
        if self.protocol == "official":  # the official runs' rates (the initialization stays the preset's own)
            self.rl_lr = self.rl_lr if self.rl_lr is not None else OFFICIAL_PPO_LR.get(self.task)
            self.sft_lr = self.sft_lr if self.sft_lr is not None else OFFICIAL_SFT_LR.get(self.task)
        if self.task.endswith("-vl"):  # the scale's text model cannot see, and the engine serves text models only
            self.model = self.model or VL_MODELS[self.scale]
            self.engine = bool(self.engine)
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
        require(self, "deadline_minutes", lambda v: v >= 0, "0 (none) or a positive number of minutes")
        self.started = time.time()  # the deadline counts from here
        if self.rl_updates % self.checkpoints:
            raise ValueError(f"rl_updates={self.rl_updates} is not a multiple of checkpoints={self.checkpoints}")
        if self.protocol == "official" and self.experiment == "prompt-diversity":
            raise ValueError("experiment prompt-diversity: the official protocol has one prompt; expected --protocol "
                             "project")
        suffix = "-official" if self.protocol == "official" else ""
        self.out = self.out or os.path.join("runs", f"replicate-{self.task}-{self.scale}{suffix}")
        check_writable(self.out)


# ---- phases ----

def finished(run: str, steps: int) -> Optional[str]:
    """The run's checkpoint at `steps` if it has reached it, else None."""
    last = R.last_checkpoint(run)
    return last if last and R.read_trainer_state(last)["step"] >= steps else None


RUN_CONTROL = {"out", "resume", "overwrite", "time_limit"}  # flags that say where and how long, not what is trained


def recipe(args: list) -> dict:
    """A phase's recipe: its command's flags as {config field: value text}, the run-control flags left out.
    ["train_sft.py", "--lr", "0.0001", "--engine", "--out", "r"] -> {"lr": "0.0001", "engine": True}"""
    out, i = {}, 1
    while i < len(args):
        name = args[i][2:].replace("-", "_")
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        out[name], i = (args[i + 1], i + 2) if has_value else (True, i + 1)
    return {k: v for k, v in out.items() if k not in RUN_CONTROL}


def run_phase(name: str, args: list, run: str, steps: int, cfg: ReplicateConfig) -> None:
    """Run one training phase to `steps` under the study's protocol, resuming it when a checkpoint of it exists;
    skip it when done. A phase begun under another protocol stops the study: its results would mix the two; one
    begun with another recipe (its trainer state's config) too, unless --restart-changed starts it over."""
    last = R.last_checkpoint(run)
    state = R.read_trainer_state(last) if last else {}
    found = R.trained_protocol(state) or cfg.protocol
    if found != cfg.protocol:
        raise ValueError(f"phase {name}: {run} was trained under protocol {found}, this study runs {cfg.protocol}; "
                         "expected another --out (each protocol has its own study folder)")
    args = [*args, "--protocol", cfg.protocol]
    changes = R.recipe_changes(recipe(args), state.get("config", {})) if last else []
    if changes and not cfg.restart_changed:
        raise ValueError(f"phase {name}: {run} was trained with another recipe: {'; '.join(changes)}; pass "
                         "--restart-changed to start such phases over, or another --out to keep both")
    if changes:
        print(f"[{name}] recipe changed ({'; '.join(changes)}): starting it over")
        command(name, args + ["--overwrite"], cfg)
        return
    if last and state["step"] >= steps:
        print(f"[{name}] done: {run}")
        return
    resume = ["--resume"] if last else []
    command(name, args + resume, cfg)


def command(name: str, args: list, cfg: ReplicateConfig) -> None:
    """Run one phase's script; under a deadline it gets the time left (--time-limit) and none starts after it."""
    if cfg.deadline_minutes:
        left = cfg.deadline_minutes * 60 - (time.time() - cfg.started)
        if left <= 0:
            raise OutOfTime(name)
        args = [*args, "--time-limit", f"{max(left, 0.01):.2f}"]  # never "0", which would mean no limit
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


# ---- arms ----

def base_model(cfg: ReplicateConfig) -> None:
    """Phase 0 for the -vl tasks at CPU and GPU scale: smolvlm-local is built by its own command
    (vision_pretrain.py, about 8 minutes on 2 CPU cores), run here once on the user's behalf, saying so."""
    if cfg.model != "smolvlm-local":
        return
    import model_zoo as Z
    if os.path.exists(os.path.join(Z.smolvlm_local_path(), "config.json")):
        return
    args = ["vision_pretrain.py"]
    print(f"[smolvlm-local] not built yet, building it once: python {' '.join(args)}", flush=True)
    if cfg.dry_run:
        return
    if subprocess.run([sys.executable, *args]).returncode != 0:
        raise ValueError(f"building smolvlm-local failed: rerun `python {' '.join(args)}` to see why")


def initialization(cfg: ReplicateConfig) -> Optional[str]:
    """Phase 1, the SFT initialization, with checkpoints along the way (sft-window reads them); its last one."""
    run = os.path.join(cfg.out, "init")
    run_phase("init", ["train_sft.py", "--task", cfg.task, "--model", cfg.model, "--examples", str(cfg.init_examples),
                       "--steps", str(cfg.init_steps), "--batch-size", str(cfg.init_batch),
                       "--micro-batch", str(cfg.init_batch), "--lr", str(cfg.init_lr),
                       "--save-every", str(max(1, cfg.init_steps // cfg.checkpoints)), "--out", run],
              run, cfg.init_steps, cfg)
    return finished(run, cfg.init_steps)


def rl_arm(cfg: ReplicateConfig, arm: str, start: str, *extra: str) -> list:
    """PPO runs <arm>-s<k> from checkpoint `start`, one per seed, with extra train_ppo.py flags."""
    runs = []
    for seed in cfg.seed_list:
        run = os.path.join(cfg.out, f"{arm}-s{seed}")
        run_phase(f"{arm}-s{seed}", ["train_ppo.py", "--task", cfg.task, "--model", start, "--seed", str(seed),
                                     "--updates", str(cfg.rl_updates), "--turns", str(cfg.rl_turns),
                                     "--envs", str(cfg.rl_envs), "--minibatch", str(cfg.rl_minibatch),
                                     "--micro-batch", str(cfg.rl_micro_batch), "--lr", str(cfg.rl_lr),
                                     "--max-new-tokens", str(cfg.max_new_tokens),
                                     "--save-every", str(cfg.rl_updates // cfg.checkpoints), "--out", run,
                                     *(["--engine"] if cfg.engine else []), *extra],
                  run, cfg.rl_updates, cfg)
        runs.append(run)
    return runs


def sft_arm(cfg: ReplicateConfig, arm: str, init: str, rl_runs: list, *extra: str) -> list:
    """Continued-SFT runs <arm>-s<k> from `init`, one per seed, on fresh expert answers, for as many steps as match
    the RL arm's mean compute, with extra train_sft.py flags. [] in a dry run before the RL arm has run."""
    if not all(finished(r, cfg.rl_updates) for r in rl_runs):
        if cfg.dry_run:
            print(f"[{arm}-s*] the continued-SFT steps are set once the RL runs have finished")
            return []
        raise OutOfTime(arm)  # an RL run was cut by the deadline: its compute is not known yet
    steps, runs = matched_sft_steps(init, rl_runs, cfg), []
    for seed in cfg.seed_list:
        run = os.path.join(cfg.out, f"{arm}-s{seed}")
        run_phase(f"{arm}-s{seed}", ["train_sft.py", "--task", cfg.task, "--model", init, "--seed", str(seed),
                                     "--data-seed", str(1000 + seed), "--examples", str(steps * cfg.init_batch),
                                     "--steps", str(steps), "--batch-size", str(cfg.init_batch),
                                     "--micro-batch", str(cfg.init_batch), "--lr", str(cfg.sft_lr),
                                     "--save-every", str(steps // cfg.checkpoints), "--out", run, *extra],
                  run, steps, cfg)
        runs.append(run)
    return runs


def evaluate(cfg: ReplicateConfig, models: list, out: str, *extra: str, max_new_tokens: int = 0) -> None:
    """evaluate.py on every checkpoint of `models`, figures into `out` (results accumulate in each run folder);
    answers up to max_new_tokens tokens (0: the study's)."""
    command("evaluate", ["evaluate.py", "--task", cfg.task, "--model", ",".join(models), "--protocol", cfg.protocol,
                         "--episodes", str(cfg.eval_episodes), "--virl-routes", str(cfg.eval_virl_routes),
                         "--max-new-tokens", str(max_new_tokens or cfg.max_new_tokens),
                         "--batch-size", str(cfg.eval_batch),
                         "--out", out, *(["--engine"] if cfg.engine else []), *extra], cfg)


# ---- experiments ----

def main_study(cfg: ReplicateConfig, init: str) -> dict:
    """The paper's comparison: RL and continued SFT from one initialization, at matched compute."""
    rl = rl_arm(cfg, "rl", init)
    sft = sft_arm(cfg, "sft", init, rl)
    evaluate(cfg, [init, *rl, *sft], cfg.out)
    return {"init": init, "rl": rl, "sft": sft}


def recognition(cfg: ReplicateConfig, init: str) -> dict:
    """Section 5.3, Figure 8: the main study's checkpoints evaluated with one attempt (the official recognition
    evaluation: no revision), recognition accuracy against success (fig8_<task>.png, drawn by evaluate.py)."""
    if not cfg.task.endswith("-vl"):
        raise ValueError(f"experiment recognition: task {cfg.task} shows no image; expected gp-vl or virl-vl")
    study = main_study(cfg, init)
    evaluate(cfg, [init, *study["rl"], *study["sft"]], os.path.join(cfg.out, "recognition"), "--verify-iter", "1")
    return study


def rl_from_base(cfg: ReplicateConfig, init: str) -> dict:
    """Section 5.4, Figure 9: PPO straight from the base model, beside PPO from the SFT initialization."""
    rl, base = rl_arm(cfg, "rl", init), rl_arm(cfg, "rl-base", cfg.model)
    evaluate(cfg, [cfg.model, init, *rl, *base], os.path.join(cfg.out, "rl-from-base"))
    return {"init": init, "rl": rl, "rl-base": base}


VERIFY_ITERS = (1, 3, 5, 10)


def verify_iter(cfg: ReplicateConfig, init: str) -> dict:
    """Section 5.5, Figure 10: RL with 1, 3, 5 or 10 attempts per episode during training, the same updates and
    answers per update; the OOD change of each against the attempts (fig10_<task>.png)."""
    arms = {k: rl_arm(cfg, f"rl-v{k}", init, "--verify-iter", str(k)) for k in VERIFY_ITERS}
    out = os.path.join(cfg.out, "verify-iter")
    evaluate(cfg, [init, *(r for runs in arms.values() for r in runs)], out)
    if not cfg.dry_run:
        draw_verify_iter(out, cfg.task)
    return {"init": init, **{f"rl-v{k}": runs for k, runs in arms.items()}}


def prompt_diversity(cfg: ReplicateConfig, init: str) -> dict:
    """arXiv 2510.00237: continued SFT on answers to prompts in many wordings (the environments' templates,
    drawn at random per example) beside plain SFT and RL; evaluation keeps the original prompt."""
    study = main_study(cfg, init)
    diverse = sft_arm(cfg, "sft-diverse", init, study["rl"], "--prompt-diversity")
    evaluate(cfg, [init, *study["rl"], *study["sft"], *diverse], os.path.join(cfg.out, "prompt-diversity"))
    return {**study, "sft-diverse": diverse}


def cot_sft(cfg: ReplicateConfig, init: str) -> dict:
    """arXiv 2510.00237: continued SFT on expert answers that reason step by step before the action, beside
    plain SFT and RL."""
    study = main_study(cfg, init)
    cot = sft_arm(cfg, "sft-cot", init, study["rl"], "--reasoning")
    # every arm at a budget a reasoning answer fits in (plain answers end long before it), or the CoT arm's
    # answers are cut before their action: the expert's reach 188 tokens on GP-L, 159 on V-IRL-L
    evaluate(cfg, [init, *study["rl"], *study["sft"], *cot], os.path.join(cfg.out, "cot-sft"),
             max_new_tokens=max(cfg.max_new_tokens, COT_MAX_NEW_TOKENS))
    return {**study, "sft-cot": cot}


def sft_window(cfg: ReplicateConfig, init: str) -> dict:
    """arXiv 2509.12235: OOD performance along the SFT initialization (every checkpoint of it), and RL from its
    first, best-OOD and last checkpoints: one arm per distinct checkpoint, named after the first pick of it (the
    peak is often the first or the last, and the same RL run twice would spend its compute for nothing)."""
    init_run, out = os.path.dirname(init), os.path.join(cfg.out, "sft-window")
    evaluate(cfg, [init_run], out)
    if cfg.dry_run:
        return {"init": init}
    picks = window_checkpoints(init_run, cfg.task, cfg.protocol)
    arm_of = {}                                                    # checkpoint -> its RL runs
    for name, ckpt in picks.items():
        if ckpt not in arm_of:
            arm_of[ckpt] = rl_arm(cfg, f"rl-{name}", ckpt)
    evaluate(cfg, [init_run, *(r for runs in arm_of.values() for r in runs)], out)
    return {"init": init, **picks, **{f"rl-{name}": arm_of[ckpt] for name, ckpt in picks.items()}}


EXPERIMENTS = {"main": main_study, "recognition": recognition, "rl-from-base": rl_from_base,
               "verify-iter": verify_iter, "prompt-diversity": prompt_diversity, "cot-sft": cot_sft,
               "sft-window": sft_window}


def window_checkpoints(init_run: str, task: str, protocol: str = "project") -> dict:
    """{"early", "peak", "late"}: the initialization's first checkpoint, the one with the best OOD headline metric
    (GP success, V-IRL per-step accuracy, summed over the OOD settings) and its last."""
    import eval_report as ER
    metric = ER.headline(task, protocol)
    with open(os.path.join(init_run, f"eval_{task}.json")) as f:  # this protocol's full-attempt evaluations only
        entries = sorted((e for e in json.load(f)["checkpoints"] if e.get("key", {}).get("protocol") == protocol
                          and not e["key"].get("verify_iter") and all(metric in m for m in e["settings"].values())),
                         key=lambda e: e["step"])
    ood = lambda e: sum(m[metric] for s, m in e["settings"].items() if s.startswith("ood"))  # noqa: E731
    return {"early": entries[0]["path"], "peak": max(entries, key=ood)["path"], "late": entries[-1]["path"]}


def draw_verify_iter(out: str, task: str) -> None:
    """Figure 10: each rl-v<k> arm's mean OOD change (points of the headline metric) with its 95% interval."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(os.path.join(out, f"fig6_{task}.json")) as f:
        changes = [c for c in json.load(f) if c["arm"].startswith("rl-v")]
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    for setting in sorted({c["setting"] for c in changes}):
        rows = sorted((int(c["arm"][4:]), c) for c in changes if c["setting"] == setting)
        xs, ys = [k for k, _ in rows], [c["mean"] for _, c in rows]
        errs = [[c["mean"] - (c["ci95"] or [c["mean"]] * 2)[0] for _, c in rows],
                [(c["ci95"] or [c["mean"]] * 2)[1] - c["mean"] for _, c in rows]]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=setting)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("verify_iter during RL")
    ax.set_ylabel("OOD change (points)")
    ax.set_title(f"{task}: attempts per episode in training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"fig10_{task}.png"), dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.join(out, f'fig10_{task}.png')}")


def replicate(cfg: ReplicateConfig) -> dict:
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, f"replicate_config_{cfg.experiment}.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    try:
        base_model(cfg)
        init = initialization(cfg)
        if init is None:  # a dry run before the initialization exists, or a deadline that cut it
            if not cfg.dry_run:
                raise OutOfTime("init")
            return {}
        return EXPERIMENTS[cfg.experiment](cfg, init)
    except OutOfTime as e:
        print(f"deadline of {cfg.deadline_minutes:g} minutes reached before phase {e} finished: what finished is "
              "kept; run the same command again to continue")
        return {"stopped": str(e)}


if __name__ == "__main__":
    main(ReplicateConfig, replicate)
