"""evaluate.py's outputs: the table and the paper's Figures 5, 6 and 8, from the results of an evaluation.

Pure functions of the results (a list of runs, each {"run", "checkpoints": [entry, ...]} as eval_store.py keeps
them), but for reading each run's trainer_state.json to find its initialization. write_report writes them all:

    <out>/table_<task>.md                  one row per checkpoint (markdown_table), also printed
    <out>/fig6_<task>.md, .json, .png      each arm's OOD change from initialization to last checkpoint (ood_changes)
    <out>/fig5_<task>.png                  the headline metric vs training GFLOPs (draw_curves)
    <out>/fig8_<task>.png                  VL tasks: recognition accuracy vs training GFLOPs
"""
from __future__ import annotations

import json
import math
import os
import re

import runs as R
from eval_store import checkpoint_key


# ---- names: the settings and the headline metric ----

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


# ---- curves from their initialization ----

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


# ---- the table ----

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


# ---- Figure 6: the OOD change per arm ----

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
    """Figure 6's changes as a markdown table: one row per arm and OOD setting (fig6_<task>.md, also printed)."""
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


# ---- plots ----

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


# ---- writing ----

def write_report(results: list, settings: list, task: str, protocol: str, out: str, plots: bool) -> None:
    """Print the table and Figure 6's changes, and write them and (plots) the figures into `out`."""
    table = markdown_table(results, settings, task, protocol)
    linked = with_initializations(results)  # Figure 6's change and the curves start at the initialization
    changes = ood_changes(linked, settings, task, protocol)
    print(table + "\n\n" + changes_table(changes))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"table_{task}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, f"fig6_{task}.md"), "w") as f:
        f.write(changes_table(changes) + "\n")
    with open(os.path.join(out, f"fig6_{task}.json"), "w") as f:
        json.dump(changes, f, indent=1)
    if plots:
        for path in draw_plots(linked, changes, settings, task, out, protocol):
            print(f"wrote {path}")
