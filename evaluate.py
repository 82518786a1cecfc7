"""The paper's evaluation: checkpoints x {ID, OOD rule, OOD visual} -> metrics, GFLOPs, JSON, table, plots.

For each checkpoint and setting of a task, a fixed, seeded set of episodes is played with sequential
revision (GP: 234 hands per setting, as in the paper; V-IRL: 48 of the training routes for ID and the
OOD rule, as the paper does, the 18-route mini benchmark for OOD visuals, and 48 routes never trained
on as an extra setting). The same seed gives the same episodes to every checkpoint, so curves compare
like with like. Answers are sampled as the official evaluation does: up to 256 tokens with the
checkpoint's own generation config (--temperature sets a temperature instead). The headline metric is
the paper's: success for GP, per-step accuracy for V-IRL (route success beside it). V-IRL's per-step accuracy is
reported both ways: this project's, correct answers over graded answers, and the official evaluator's, which
also counts, for every route that failed, the answer after its last attempt as one more wrong sample (under
--protocol official that answer is really asked for and scored -1); the tables show both, Figures 5 and 6 the
protocol's own. `--protocol official` plays the episodes under the official rules (tasks' environments) and
draws V-IRL's routes with replacement, as the official evaluation does.

    python evaluate.py --model smollm2-135m --task gp-l                  # a model name
    python evaluate.py --model runs/sft-gp-l,runs/ppo-gp-l --task gp-l   # every checkpoint of two runs
    torchrun --nproc_per_node 8 evaluate.py --model runs/ppo-gp-vl --task gp-vl   # episodes split over ranks

Writes, per run, <run>/eval_<task>.json (every metric of every checkpoint and setting) and
<run>/eval_<task>_answers.jsonl (every answer with its verifier outcome), after each checkpoint. Results
accumulate: a later call adds or replaces only the (checkpoint, setting) results of its own evaluation
settings, and reuses what is stored under them (--no-reuse: play them again); nothing else is dropped. Into
--out: the markdown table, and the paper's figures: fig5_<task>.png (success vs training GFLOPs, ID
and OOD, one line per run, one colour per arm; each curve starts at its initialization when that was
evaluated too) and fig6_<task>.png / .md / .json (OOD change from the initialization to the last
checkpoint, per arm: the seeds of one recipe, named <arm>-s<seed>, pooled into a mean and a 95%
interval).

This file plays the episodes and measures them; the result store (what is stored, reused, merged and written per
run) is eval_store.py, the table and figures eval_report.py.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional

import torch

import model as M
import model_zoo as Z
import runs as R
from eval_report import write_report
from eval_store import (RESULT_KEY_FIELDS, keep_replaced, merged, result_id, reusable, stored_results, weights_digest,
                        write_run)
from rollout import (CONTEXT_OUTCOME, SETTINGS, check_protocol, check_task, env_overrides, evaluation_episodes,
                     make_envs, rollout)
from runs import check_writable, main, require

# outcomes of answers that are not well-formed (no readable formula / action): what SFT teaches first
MALFORMED = ("illegal_formula", "invalid_action", CONTEXT_OUTCOME)
STEP_LIMIT = "step_limit"  # the official extra answer after a failed episode's last attempt: scored, never read


@dataclass
class EvalConfig:
    """Evaluate checkpoints on a task's ID and OOD settings."""
    model: str = "smollm2-135m"
    """model name, checkpoint folder or run folder; several separated by commas"""
    task: str = "gp-l"
    """gp-l, gp-vl, virl-l or virl-vl"""
    settings: str = "all"
    """comma-separated subset of the task's settings (id, ood_rule, ood_visual, id_heldout), or all"""
    episodes: int = 234
    """GeneralPoints hands per setting (the paper: 234)"""
    virl_routes: int = 48
    """V-IRL routes per setting (the paper: 48; ood_visual: the 18-route mini benchmark)"""
    batch_size: int = 64
    """episodes played at once (per rank)"""
    max_new_tokens: int = 256
    """longest answer (the official evaluation: 256)"""
    temperature: Optional[float] = None
    """sampling temperature, 0: greedy; default: the checkpoint's generation config"""
    top_p: float = 1.0
    """nucleus sampling mass, with --temperature"""
    verify_iter: int = 0
    """attempts per episode / position; 0: the task's (GP 5, V-IRL 2)"""
    engine: Optional[bool] = None
    """generate with engine.py: a static cache and, on a GPU, a compiled decode step (text models); default: on a
    GPU for a text model"""
    image_size: int = 0
    """VL tasks: image side in pixels (GP cards, each V-IRL view); 0: the default"""
    seed: int = 0
    """episode seed: the same for every checkpoint"""
    out: str = "runs/eval"
    """folder for the table and plots"""
    plots: bool = True
    """draw the PNG plots (needs matplotlib)"""
    reuse: bool = True
    """reuse a run's stored results for checkpoints already evaluated with the same settings"""
    time_limit: float = 0.0
    """seconds after which no further checkpoint is started (0: none); a rerun reuses what is stored"""
    device: str = ""
    """cuda, cpu, ...; empty: the GPU when there is one"""
    protocol: str = "project"
    """project (this project's rules) or official (the official code's: its verifier, prompts, the -1 answer after
    a failed episode, V-IRL routes drawn with replacement, its per-step accuracy as the headline)"""

    def __post_init__(self):
        check_task(self.task)
        check_protocol(self.protocol)
        wanted = SETTINGS[self.task] if self.settings == "all" else tuple(s.strip() for s in self.settings.split(","))
        for s in wanted:
            check_task(self.task, s)
        self.settings = ",".join(wanted)
        require(self, "episodes virl_routes batch_size max_new_tokens", lambda v: v >= 1, "a positive integer")
        require(self, "verify_iter image_size", lambda v: v >= 0, "0 (the default) or a positive integer")
        env_overrides(self.task, self.verify_iter, self.image_size, self.protocol)  # e.g. an image size out of range
        require(self, "temperature", lambda v: v >= 0, "0 (greedy) or a positive number")
        require(self, "top_p", lambda v: 0 < v <= 1, "a share in (0, 1]")
        require(self, "time_limit", lambda v: v >= 0, "0 or a positive number")
        M.check_device(self.device)
        check_writable(self.out)


# ---- checkpoints ----

def find_runs(spec: str, out: str) -> list:
    """[(run name, run folder, [checkpoint paths by training compute])] from the --model list; a model
    name's results go to <out>/<name>."""
    runs = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in Z.BUILTIN_NAMES:
            runs.append((item, os.path.join(out, item), [item]))
        elif os.path.exists(os.path.join(item, "config.json")):
            run_dir = os.path.dirname(os.path.abspath(item))
            runs.append((os.path.basename(run_dir), run_dir, [item]))
        elif os.path.isdir(item):  # its checkpoints; hidden folders are saves a kill left unfinished
            ckpts = [os.path.join(item, d) for d in os.listdir(item)
                     if not d.startswith(".") and os.path.exists(os.path.join(item, d, "config.json"))]
            if not ckpts:
                raise ValueError(f"run folder {item!r} holds no checkpoints (subfolders with a config.json)")
            state = {c: R.read_trainer_state(c) for c in ckpts}
            ckpts.sort(key=lambda c: (state[c].get("gflops", 0.0), state[c].get("step", 0), c))
            runs.append((os.path.basename(os.path.abspath(item)), item, ckpts))
        else:
            M.resolve(item)  # raises the one-line error that lists what is accepted
    return runs


# ---- metrics ----

def wilson(successes: int, n: int, z: float = 1.96) -> tuple:
    """95% Wilson score interval of a binomial proportion (sensible at 0% and 100%, unlike p +- 1.96 se)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(episodes: list, task: str) -> dict:
    """Metrics of one checkpoint in one setting. Success: the episode was solved (GP) or the route
    completed (V-IRL) within its attempts; per-step accuracy (V-IRL, the paper's headline): correct
    attempts over graded attempts (per_step_accuracy), and the official evaluator's count, which adds one wrong
    sample per failed route, the answer after its last attempt (per_step_accuracy_official); recognition (VL):
    attempts whose cards / intersection were right. The official extra answers (STEP_LIMIT) are no attempts."""
    n = len(episodes)
    wins = sum(e.success for e in episodes)
    p = wins / n if n else 0.0
    outcomes = Counter(o for e in episodes for o in e.outcomes if o != STEP_LIMIT)
    attempts = sum(outcomes.values())
    recognized = [r for e in episodes for r in e.recognized if r is not None]
    out = {"episodes": n, "success": p, "success_se": math.sqrt(p * (1 - p) / n) if n else 0.0,
           "success_ci95": list(wilson(wins, n)), "mean_attempts": attempts / n if n else 0.0,
           "mean_reward": sum(e.total_reward for e in episodes) / n if n else 0.0,
           "format_valid": sum(v for k, v in outcomes.items() if k not in MALFORMED) / attempts if attempts else 0.0,
           "outcomes": dict(sorted(outcomes.items()))}
    if task.startswith("virl"):
        correct = outcomes.get("correct", 0)
        # the official count: a failed route's answer after its last attempt is one more sample, asked for or not
        # (an episode cut by the context has its context_exceeded outcome in that place already)
        samples = attempts + sum(1 for e in episodes if e.finished and not e.success and e.outcomes
                                 and e.outcomes[-1] != CONTEXT_OUTCOME)
        for name, k in (("per_step_accuracy", attempts), ("per_step_accuracy_official", samples)):
            q = correct / k if k else 0.0
            out.update({name: q, f"{name}_se": math.sqrt(q * (1 - q) / k) if k else 0.0,
                        f"{name}_ci95": list(wilson(correct, k)), f"{name}_samples": k})
    if task.endswith("-vl"):
        q = sum(recognized) / len(recognized) if recognized else 0.0
        out["recognition_accuracy"] = q
        out["recognition_accuracy_se"] = math.sqrt(q * (1 - q) / len(recognized)) if recognized else 0.0
    return out


# ---- playing: episodes of a setting, settings of a checkpoint ----

def episode_reset(seed: int, setting: str, ranks_episodes: list):
    """reset(env, j) for rollout: local episode j is global episode ranks_episodes[j], whose hand or
    route and RNG depend only on (seed, setting, global index)."""
    salt = {"id": 0, "ood_rule": 1, "ood_visual": 2, "id_heldout": 3}[setting]

    def reset(env, j):
        k = ranks_episodes[j]
        return env.reset(seed=seed * 1_000_003 + salt * 100_003 + k, episode=k)
    return reset


def sampling(policy, cfg: EvalConfig) -> dict:
    """How answers are drawn: at --temperature (0: greedy) when given; else as the official evaluation, which
    calls generate with max_new_tokens alone, so the checkpoint's generation config decides (greedy for
    SmolLM2's; temperature 0.6, top-p 0.9, top-k 50 for Llama-3.2-Vision-Instruct's)."""
    if cfg.temperature is not None:
        greedy = cfg.temperature < M.MIN_TEMPERATURE
        if 0 < cfg.temperature < M.MIN_TEMPERATURE and R.rank() == 0:
            print(f"note: --temperature {cfg.temperature:g} is below {M.MIN_TEMPERATURE} (the tempered distribution "
                  "overflows or is rounding noise there): sampling greedily, as --temperature 0 does")
        return {"temperature": 1.0 if greedy else cfg.temperature, "top_p": cfg.top_p, "top_k": 0, "greedy": greedy}
    return policy.checkpoint_sampling()


def play_share(policy, cfg: EvalConfig, setting: str, rank: int, world: int) -> list:
    """This rank's share of a setting's episodes (global indices rank, rank + world, ...), as (index, Episode)."""
    total = evaluation_episodes(cfg.task, setting, cfg.episodes, cfg.virl_routes)
    mine = list(range(rank, total, world))
    if not mine:
        return []
    overrides = env_overrides(cfg.task, cfg.verify_iter, cfg.image_size, cfg.protocol)
    if setting == "id_heldout":  # draw only the routes evaluated (id and ood_rule use the training routes)
        overrides["n_routes"] = cfg.virl_routes
    envs = make_envs(cfg.task, setting, min(cfg.batch_size, len(mine)), seed=cfg.seed, **overrides)
    torch.manual_seed(cfg.seed)  # the same sampling noise for every checkpoint
    result = rollout(policy, envs, n_episodes=len(mine), reset=episode_reset(cfg.seed, setting, mine),
                     max_new_tokens=cfg.max_new_tokens, **sampling(policy, cfg), progress=rank == 0,
                     desc=f"{cfg.task} {setting}")
    return [(mine[e.id], e) for e in result.episodes]


def play_setting(policy, cfg: EvalConfig, setting: str, rank: int, world: int) -> list:
    """Every episode of a setting, as (global index, Episode) pairs in index order, on every rank: each rank plays
    its share and the shares are gathered (ranks without a share still join the gather)."""
    played = play_share(policy, cfg, setting, rank, world)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, played)
        played = [x for part in gathered for x in part]
    return sorted(played, key=lambda kv: kv[0])


def play_checkpoint(entry: dict, state: dict, todo: list, cfg: EvalConfig, rank: int, world: int,
                    device: str) -> tuple:
    """Load the entry's checkpoint and play the settings `todo`: (its sampling, {setting: metrics}, new answers),
    each answer tagged with the stored result it belongs to (eval_store.py)."""
    ckpt, result = entry["path"], result_id(entry["path"], entry["key"])[1]
    if rank == 0:
        for line in R.recipe_warnings(state, cfg.task, cfg.protocol, ckpt):
            print(f"warning: {line}")
    policy = M.load_policy(ckpt, device=device)
    if M.engine_wanted(policy, cfg.engine):
        import engine  # only then: it loads the compiler's machinery
        engine.attach(policy, compile=policy.device.type == "cuda")
    drawn, metrics, answers = sampling(policy, cfg), {}, []
    for s in todo:
        start = time.perf_counter()
        played = play_setting(policy, cfg, s, rank, world)
        metrics[s] = {**summarize([e for _, e in played], cfg.task), "seconds": round(time.perf_counter() - start, 2)}
        answers += [{"checkpoint": ckpt, "result": result, "setting": s, "episode": k, "attempt": a + 1, **ans}
                    for k, e in played for a, ans in enumerate(e.answers)]
    return drawn, metrics, answers


# ---- the loop ----

def evaluate(cfg: EvalConfig) -> list:
    """Per run: play what is not stored yet, merge it into the run's store, write it (after every checkpoint);
    then the table and figures of every run."""
    rank, world, dist_device = R.init_distributed(cfg.device)
    settings = cfg.settings.split(",")
    runs = find_runs(cfg.model, cfg.out)
    for _, run_dir, _ in runs:  # before any model loads: results are written after every checkpoint
        check_writable(run_dir, "run folder")
    key = {k: getattr(cfg, k) for k in RESULT_KEY_FIELDS}
    results, started, stopped = [], time.perf_counter(), False
    for run_name, run_dir, ckpts in runs:
        stored = stored_results(run_dir, cfg.task)
        run = {"run": run_name, "task": cfg.task, "config": asdict(cfg), "checkpoints": []}
        answers = []  # of this call's checkpoints: the stored ones carried, and the new ones
        for ckpt in ckpts:
            state = R.read_trainer_state(ckpt)
            entry, carried, replaced = reusable(stored, ckpt, state, key, weights_digest(ckpt))
            todo = [s for s in settings if s not in entry["settings"] or not cfg.reuse]
            if todo and R.out_of_time(started, cfg.time_limit):
                stopped = True
                break
            if replaced is not None and rank == 0:  # other weights than those stored: their result to the history
                print(f"{ckpt}: its weights changed since it was evaluated; evaluating it again (the old result is "
                      f"kept in {os.path.join(run_dir, f'eval_{cfg.task}_history.jsonl')})")
                keep_replaced(run_dir, cfg.task, replaced, stored[1])
            answers += [a for a in carried if a["setting"] not in todo]
            if todo:
                entry["sampling"], metrics, new = play_checkpoint(entry, state, todo, cfg, rank, world,
                                                                  cfg.device or dist_device)
                entry["settings"].update(metrics)
                answers += new
            run["checkpoints"].append(entry)
            if rank == 0:  # after every checkpoint: an interrupted evaluation loses at most the one in progress
                write_run(run_dir, cfg.task, *merged(stored, run, answers))
        results.append(run)
        if stopped:
            break
    if rank == 0 and stopped:
        print(f"time limit of {cfg.time_limit:g} s reached: rerun to evaluate the rest (stored results are reused)")
    elif rank == 0:
        write_report(results, settings, cfg.task, cfg.protocol, cfg.out, cfg.plots)
    R.leave_distributed()
    return results


if __name__ == "__main__":
    main(EvalConfig, evaluate)
