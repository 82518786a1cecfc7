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
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional

import torch

import engine as E
import model as M
import runs as R
from cli import check_writable, main, require
from rollout import CONTEXT_OUTCOME, rollout
from tasks import SETTINGS, check_protocol, check_task, env_config, evaluation_episodes, image_overrides, make_envs

# outcomes of answers that are not well-formed (no readable formula / action): what SFT teaches first
MALFORMED = ("illegal_formula", "invalid_action", CONTEXT_OUTCOME)
STEP_LIMIT = "step_limit"  # the official extra answer after a failed episode's last attempt: scored, never read
SETTING_NAMES = {"id": "ID", "ood_rule": "OOD rule", "ood_visual": "OOD visual", "id_heldout": "ID held-out routes"}


def headline(task: str, protocol: str = "project") -> str:
    """The metric the paper reports: GP success; V-IRL per-step accuracy (route success is near 0 for every
    method in the paper), counted as the protocol counts it."""
    if not task.startswith("virl"):
        return "success"
    return "per_step_accuracy_official" if protocol == "official" else "per_step_accuracy"


def metric_name(metric: str) -> str:
    """How tables and figures name a metric."""
    return {"success": "success", "per_step_accuracy": "per-step accuracy",
            "per_step_accuracy_official": "per-step accuracy (official count)"}.get(metric, metric)


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
    engine: bool = False
    """generate with engine.py: a static cache and, on a GPU, a compiled decode step (text models)"""
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
        env_config(self.task, "id", **image_overrides(self.task, self.image_size))  # a bad image size fails here
        self.settings = ",".join(wanted)
        require(self, "episodes virl_routes batch_size max_new_tokens", lambda v: v >= 1, "a positive integer")
        require(self, "verify_iter image_size", lambda v: v >= 0, "0 (the default) or a positive integer")
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
        if item in M.BUILTIN_NAMES:
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


# ---- playing one setting ----

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
        return {"temperature": cfg.temperature or 1.0, "top_p": cfg.top_p, "top_k": 0, "greedy": cfg.temperature == 0}
    return policy.checkpoint_sampling()


def play_setting(policy, cfg: EvalConfig, setting: str, rank: int, world: int) -> list:
    """This rank's share of a setting's episodes, as (global index, Episode) pairs."""
    total = evaluation_episodes(cfg.task, setting, cfg.episodes, cfg.virl_routes)
    mine = list(range(rank, total, world))
    if not mine:
        return []
    overrides = {"verify_iter": cfg.verify_iter} if cfg.verify_iter else {}
    overrides.update(image_overrides(cfg.task, cfg.image_size), protocol=cfg.protocol)
    if setting == "id_heldout":  # draw only the routes evaluated (id and ood_rule use the training routes)
        overrides["n_routes"] = cfg.virl_routes
    envs = make_envs(cfg.task, setting, min(cfg.batch_size, len(mine)), seed=cfg.seed, **overrides)
    torch.manual_seed(cfg.seed)  # the same sampling noise for every checkpoint
    result = rollout(policy, envs, n_episodes=len(mine), reset=episode_reset(cfg.seed, setting, mine),
                     max_new_tokens=cfg.max_new_tokens, **sampling(policy, cfg), progress=rank == 0,
                     desc=f"{cfg.task} {setting}")
    return [(mine[e.id], e) for e in result.episodes]


def checkpoint_key(path: str) -> str:
    return path if path in M.BUILTIN_NAMES else os.path.abspath(path).rstrip("/")


def with_initializations(results: list) -> list:
    """The runs for plotting, each curve starting at its initialization when that was evaluated too (an
    RL run at the SFT checkpoint it started from, an SFT run at its base model), as the paper's curves
    do; Figure 6's change is then measured from the initialization. Nothing is evaluated twice."""
    evaluated = {checkpoint_key(ck["path"]): ck for run in results for ck in run["checkpoints"]}
    out = []
    for run in results:
        first = run["checkpoints"][0]["path"]
        state = R.read_trainer_state(first)
        init = state.get("init") or state.get("config", {}).get("model")  # the checkpoint it started from
        if init and checkpoint_key(init) in evaluated and checkpoint_key(init) != checkpoint_key(first):
            run = {**run, "checkpoints": [{**evaluated[checkpoint_key(init)], "init": True}] + run["checkpoints"]}
        out.append(run)
    return out


# ---- outputs ----

def markdown_table(results: list, settings: list, task: str, protocol: str = "project") -> str:
    """One row per checkpoint, one cell per setting: the headline metric with its 95% interval; for V-IRL the other
    per-step count beside it ("other count") and route success; the share of well-formed answers."""
    metric = headline(task, protocol)
    other = {"per_step_accuracy": "per_step_accuracy_official",
             "per_step_accuracy_official": "per_step_accuracy"}.get(metric)
    what = f"{metric_name(metric)} [95% CI]" + (f", {metric_name(other)}, route success" if other else "")
    head = "| run | checkpoint | GFLOPs | " + " | ".join(f"{SETTING_NAMES[s]}: {what}, well-formed answers"
                                                       for s in settings) + " |"
    rows = [f"Protocol: {protocol}.", "", head, "|" + "---|" * (3 + len(settings))]
    for run in results:
        for ck in run["checkpoints"]:
            cells = []
            for s in settings:
                m = ck["settings"][s]
                lo, hi = m[f"{metric}_ci95"]
                beside = f", {100 * m[other]:.1f}%, route {100 * m['success']:.1f}%" if other else ""
                cells.append(f"{100 * m[metric]:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]{beside}, "
                             f"valid {100 * m['format_valid']:.0f}%")
            rows.append(f"| {run['run']} | {os.path.basename(ck['path'].rstrip('/'))} | {ck['gflops']:.3g} | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows)


def arm_of(run_name: str) -> str:
    """The training recipe a run belongs to: its name without a trailing seed tag, so that the seeds of
    one recipe pool ("ppo-s2" and "ppo-seed2" -> "ppo"; "sft-gp-l" stays itself)."""
    return re.sub(r"-s(?:eed)?\d+$", "", run_name)


# two-sided 95% quantiles of Student's t by degrees of freedom (for intervals over a few seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci95(values: list) -> tuple:
    """(mean, [low, high]) with a Student-t 95% interval over the values; no interval for one value."""
    n, mean = len(values), sum(values) / len(values)
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T95[max(k for k in T95 if k <= n - 1)]
    return mean, [mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)]


def ood_changes(results: list, settings: list, task: str, protocol: str = "project") -> list:
    """The paper's Figure 6: for each arm (the seeds of a recipe) and OOD setting, the change in points of
    the headline metric (GP success, V-IRL per-step accuracy as the protocol counts it) from each run's first
    checkpoint (its initialization, when that was evaluated) to its last, per seed, with their mean and 95%
    interval. Runs of one checkpoint have no change and are left out."""
    metric, arms, rows = headline(task, protocol), {}, []
    for run in results:
        if len(run["checkpoints"]) > 1:  # a lone checkpoint (a base model, an initialization) has no change
            arms.setdefault(arm_of(run["run"]), []).append(run)
    for arm, runs in arms.items():
        for s in [s for s in settings if s.startswith("ood")] or settings:
            deltas = [100 * (r["checkpoints"][-1]["settings"][s][metric] - r["checkpoints"][0]["settings"][s][metric])
                      for r in runs]
            mean, ci = mean_ci95(deltas)
            rows.append({"arm": arm, "setting": s, "metric": metric, "protocol": protocol, "seeds": len(deltas),
                         "mean": mean, "ci95": ci, "deltas": deltas, "runs": [r["run"] for r in runs]})
    return rows


def changes_table(changes: list) -> str:
    if not changes:  # e.g. a lone base model: nothing has changed yet, say so rather than print an empty table
        return "No OOD change to show: no run has more than one checkpoint (an initialization and later ones)."
    what = metric_name(changes[0]["metric"])
    rows = [f"Protocol: {changes[0]['protocol']}.", "",
            f"| arm | setting | seeds | OOD change in {what} (points) | 95% interval | per seed |",
            "|---|---|---|---|---|---|"]
    for c in changes:
        ci = f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]" if c["ci95"] else "n/a"
        rows.append(f"| {c['arm']} | {SETTING_NAMES[c['setting']]} | {c['seeds']} | {c['mean']:+.1f} | {ci} | "
                    + ", ".join(f"{d:+.1f}" for d in c["deltas"]) + " |")
    return "\n".join(rows)


def draw_curves(plt, results: list, settings: list, task: str, metric: str, label: str, path: str,
                protocol: str = "project") -> str:
    """One panel per setting: `metric` (with its `_se` error bars) vs training GFLOPs, one line per run, one
    colour per arm."""
    arms = list(dict.fromkeys(arm_of(run["run"]) for run in results))
    colour = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings):
        labelled = set()
        for run in results:
            arm = arm_of(run["run"])
            xs = [ck["gflops"] for ck in run["checkpoints"]]
            ys = [100 * ck["settings"][s][metric] for ck in run["checkpoints"]]
            es = [100 * ck["settings"][s].get(f"{metric}_se", 0.0) for ck in run["checkpoints"]]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colour[arm], alpha=0.8,
                        label=None if arm in labelled else arm)
            labelled.add(arm)
        ax.set_title(f"{task} {SETTING_NAMES[s]}" + (f" ({protocol} protocol)" if protocol != "project" else ""))
        ax.set_xlabel("training GFLOPs")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_plots(results: list, changes: list, settings: list, task: str, out: str, protocol: str = "project") -> list:
    """fig5: the headline metric (GP success, V-IRL per-step accuracy) vs GFLOPs per setting; fig6: each arm's
    mean OOD change with its 95% interval, seeds as dots; for VL tasks fig8: recognition accuracy vs GFLOPs
    (the paper's Figure 8, from a one-attempt evaluation: --verify-iter 1)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: pip install matplotlib to draw them")
        return []
    os.makedirs(out, exist_ok=True)
    metric = headline(task, protocol)
    label = f"{metric_name(metric)} (%)"
    paths = [draw_curves(plt, results, settings, task, metric, label, os.path.join(out, f"fig5_{task}.png"), protocol)]
    if task.endswith("-vl"):
        paths.append(draw_curves(plt, results, settings, task, "recognition_accuracy", "recognition accuracy (%)",
                                 os.path.join(out, f"fig8_{task}.png")))

    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(changes), 3.6))
    for i, c in enumerate(changes):
        lo, hi = c["ci95"] or (c["mean"], c["mean"])
        ax.bar(i, c["mean"], color="tab:green" if c["mean"] >= 0 else "tab:red", alpha=0.7,
               yerr=[[c["mean"] - lo], [hi - c["mean"]]], capsize=4)
        ax.plot([i] * len(c["deltas"]), c["deltas"], "k.", markersize=5)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(changes)), [f"{c['arm']}\n{SETTING_NAMES[c['setting']]}" for c in changes], fontsize=8)
    ax.set_ylabel(f"OOD change in {label[:-4]} (points)", fontsize=8)
    ax.set_title(f"{task} ({protocol} protocol): last checkpoint vs initialization", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out, f"fig6_{task}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# what an evaluation's numbers depend on besides the checkpoint: a stored result is reused only if these match
RESULT_KEY_FIELDS = ("task", "episodes", "virl_routes", "max_new_tokens", "temperature", "top_p", "verify_iter", "seed",
                     "image_size", "protocol")


def result_id(path: str, key: dict) -> tuple:
    """What one stored result is of: a checkpoint under one evaluation key (the settings of RESULT_KEY_FIELDS)."""
    return checkpoint_key(path), hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def stored_results(run_dir: str, task: str) -> tuple:
    """(checkpoint entries, answers) of the run's earlier evaluations, every answer tagged with its entry's id.
    A file that cannot be read is set aside as <name>.unreadable-<time>, not overwritten."""
    entries, answers = [], []
    path, answers_path = (os.path.join(run_dir, f"eval_{task}{x}") for x in (".json", "_answers.jsonl"))
    try:
        if os.path.exists(path):
            with open(path) as f:
                entries = [e for e in json.load(f).get("checkpoints", []) if "key" in e]
        ids = {checkpoint_key(e["path"]): result_id(e["path"], e["key"])[1] for e in entries}  # files before ids
        if os.path.exists(answers_path):
            with open(answers_path) as f:
                answers = [json.loads(line) for line in f if line.strip()]
            for a in answers:
                a.setdefault("result", ids.get(checkpoint_key(a["checkpoint"]), ""))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        for p in (path, answers_path):
            if os.path.exists(p):
                os.replace(p, f"{p}.unreadable-{int(time.time())}")
        print(f"warning: {run_dir}: stored evaluation results unreadable ({e}), set aside; evaluating afresh")
        return [], []
    return entries, answers


def evaluate(cfg: EvalConfig) -> list:
    rank, world, dist_device = R.init_distributed(cfg.device)
    settings = cfg.settings.split(",")
    runs = find_runs(cfg.model, cfg.out)
    for _, run_dir, _ in runs:  # before any model loads: results are written after every checkpoint
        check_writable(run_dir, "run folder")
    key = {k: getattr(cfg, k) for k in RESULT_KEY_FIELDS}
    results, started, stopped = [], time.perf_counter(), False
    for run_name, run_dir, ckpts in runs:
        if stopped:
            break
        run = {"run": run_name, "task": cfg.task, "config": asdict(cfg), "checkpoints": []}
        stored, stored_answers = stored_results(run_dir, cfg.task)
        old = {result_id(e["path"], e["key"]): e for e in stored}
        answers = []  # of this call's entries: the stored ones kept, and the new ones
        for ckpt in ckpts:
            state = R.read_trainer_state(ckpt)
            rid = result_id(ckpt, key)
            entry = {"path": ckpt, "step": state.get("step", 0), "gflops": float(state.get("gflops", 0.0)),
                     "key": key, "settings": {}}
            before = old.get(rid, {})
            if all(before.get(k) == entry[k] for k in ("step", "gflops")):  # the same weights: keep what is stored
                entry["settings"], entry["sampling"] = dict(before.get("settings", {})), before.get("sampling")
            todo = [s for s in settings if s not in entry["settings"] or not cfg.reuse]
            if todo and R.out_of_time(started, cfg.time_limit):
                stopped = True
                break
            answers += [a for a in stored_answers if (checkpoint_key(a["checkpoint"]), a["result"]) == rid
                        and a["setting"] in entry["settings"] and a["setting"] not in todo]
            if todo and rank == 0:
                for line in R.recipe_warnings(state, cfg.task, cfg.protocol, ckpt):
                    print(f"warning: {line}")
            if todo:
                policy = M.load_policy(ckpt, device=cfg.device or dist_device)
                if cfg.engine:
                    E.attach(policy, compile=policy.device.type == "cuda")
                entry["sampling"] = sampling(policy, cfg)
            for s in todo:
                start = time.perf_counter()
                played = play_setting(policy, cfg, s, rank, world)
                if world > 1:
                    gathered = [None] * world
                    torch.distributed.all_gather_object(gathered, played)
                    played = [x for part in gathered for x in part]
                played.sort(key=lambda kv: kv[0])
                episodes = [e for _, e in played]
                entry["settings"][s] = summarize(episodes, cfg.task)
                entry["settings"][s]["seconds"] = round(time.perf_counter() - start, 2)
                for k, e in played:
                    for a, ans in enumerate(e.answers):
                        answers.append({"checkpoint": ckpt, "result": rid[1], "setting": s, "episode": k,
                                        "attempt": a + 1, **ans})
            if todo:
                del policy
            run["checkpoints"].append(entry)
            if rank == 0:  # after every checkpoint: an interrupted evaluation loses at most the one in progress
                done = {result_id(e["path"], e["key"]) for e in run["checkpoints"]}
                write_run(run_dir, cfg.task, {**run, "checkpoints": [
                    e for e in stored if result_id(e["path"], e["key"]) not in done] + run["checkpoints"]},
                    [a for a in stored_answers if (checkpoint_key(a["checkpoint"]), a["result"]) not in done] + answers)
        results.append(run)
    if stopped:
        if rank == 0:
            print(f"time limit of {cfg.time_limit:g} s reached: rerun to evaluate the rest (stored results are reused)")
    elif rank == 0:
        table = markdown_table(results, settings, cfg.task, cfg.protocol)
        changes = ood_changes(with_initializations(results), settings, cfg.task, cfg.protocol)
        print(table + "\n\n" + changes_table(changes))
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, f"table_{cfg.task}.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(cfg.out, f"fig6_{cfg.task}.md"), "w") as f:
            f.write(changes_table(changes) + "\n")
        with open(os.path.join(cfg.out, f"fig6_{cfg.task}.json"), "w") as f:
            json.dump(changes, f, indent=1)
        if cfg.plots:
            for path in draw_plots(with_initializations(results), changes, settings, cfg.task, cfg.out, cfg.protocol):
                print(f"wrote {path}")
    R.leave_distributed()
    return results


def write_run(run_dir: str, task: str, run: dict, answers: list) -> None:
    """A run's results JSON and answers JSONL, each written beside and renamed over the old one: a kill never
    leaves half a file."""
    os.makedirs(run_dir, exist_ok=True)
    for name, lines in ((f"eval_{task}.json", [json.dumps(run, indent=1)]),
                        (f"eval_{task}_answers.jsonl", [json.dumps(a) for a in answers])):
        path = os.path.join(run_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main(EvalConfig, evaluate)
