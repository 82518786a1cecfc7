"""The result store of evaluate.py: what a run folder keeps of its evaluations, and how a new one merges in.

Two files per run folder and task, rewritten together after every evaluated checkpoint:

    <run>/eval_<task>.json           {"run", "task", "config", "checkpoints": [entry, ...]}
        entry: {"path", "step", "gflops", "key": {the RESULT_KEY_FIELDS}, "settings": {setting: metrics}, "sampling"}
    <run>/eval_<task>_answers.jsonl  one answer a line: {"checkpoint", "result", "setting", "episode", "attempt", ...}
    <run>/eval_<task>_history.jsonl  appended, never rewritten: a result that other weights replaced, with its answers

A stored result is one checkpoint under one evaluation key; result_id names it (the checkpoint's absolute path, a
hash of the key), and an answer's "checkpoint" and "result" name the result it belongs to (answer_id). Results
accumulate: an evaluation replaces only the results of its own checkpoints under its own key and keeps every other
(merged). A result is reused only for the same weights: the digest of the checkpoint's weight files (weights_digest)
and its step and GFLOPs unchanged (reusable). A checkpoint whose weights changed (a rerun with --overwrite, another
run's folder copied over it) is played again, and the result it replaces goes to the history (keep_replaced).
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import model_zoo as Z

# what an evaluation's numbers depend on besides the checkpoint: a stored result is reused only if these match
RESULT_KEY_FIELDS = ("task", "episodes", "virl_routes", "max_new_tokens", "temperature", "top_p", "verify_iter", "seed",
                     "image_size", "protocol")


def checkpoint_key(path: str) -> str:
    """One name per checkpoint however its path is written: a model name as it is, a folder as its absolute path."""
    return path if path in Z.BUILTIN_NAMES else os.path.abspath(path).rstrip("/")


def result_id(path: str, key: dict) -> tuple:
    """What one stored result is of: a checkpoint under one evaluation key (the settings of RESULT_KEY_FIELDS).
    ("runs/sft/step-000010/", {"task": "gp-l", ...}) -> ("/abs/runs/sft/step-000010", "<12 hex digits>")"""
    return checkpoint_key(path), hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pth")  # what a model folder's weights are written in


def weights_digest(path: str) -> str:
    """sha256 over the names and bytes of a checkpoint's weight files (a built-in name: its local folder's), read in
    1 MiB blocks: the same digest means the same weights, whatever the folder's path, times or trainer state."""
    folder = Z.resolve(path)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(WEIGHT_FILES) and os.path.isfile(os.path.join(folder, name)):
            digest.update(name.encode() + b"\0")
            with open(os.path.join(folder, name), "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def answer_id(answer: dict) -> tuple:
    """The result_id of the result a stored answer belongs to."""
    return checkpoint_key(answer["checkpoint"]), answer["result"]


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


def reusable(stored: tuple, path: str, state: dict, key: dict, weights: str) -> tuple:
    """(the entry to evaluate a checkpoint into, the stored answers it carries, the stored entry it replaces). The
    entry starts from the stored result of the checkpoint under `key` when the weights are the same (their digest,
    and the step and GFLOPs of its trainer `state`, unchanged), else empty, and the stored one is replaced:

        {"path": "runs/sft/step-000010", "step": 10, "gflops": 2.5, "weights": "9f2c...", "key": key, "settings": {}}
        stored with the same weights -> settings {"id": {...}}, the stored "sampling", the answers of "id"; None
        stored with other weights, or at step 8 (trained further) -> the empty entry, no answers; the stored entry
    """
    entries, answers = stored
    entry = {"path": path, "step": state.get("step", 0), "gflops": float(state.get("gflops", 0.0)),
             "weights": weights, "key": key, "settings": {}}
    rid = result_id(path, key)
    before = {result_id(e["path"], e["key"]): e for e in entries}.get(rid)
    if before is None:
        return entry, [], None
    if not all(before.get(k) == entry[k] for k in ("step", "gflops", "weights")):  # other weights: nothing holds
        return entry, [], before
    entry.update(settings=dict(before.get("settings", {})), sampling=before.get("sampling"))
    return entry, [a for a in answers if answer_id(a) == rid and a["setting"] in entry["settings"]], None


def keep_replaced(run_dir: str, task: str, entry: dict, answers: list) -> None:
    """Append a stored result that other weights replace, and its answers, to <run>/eval_<task>_history.jsonl."""
    rid = result_id(entry["path"], entry["key"])
    line = {"replaced_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "entry": entry,
            "answers": [a for a in answers if answer_id(a) == rid]}
    with open(os.path.join(run_dir, f"eval_{task}_history.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


def merged(stored: tuple, run: dict, answers: list) -> tuple:
    """(run, answers) to write: the stored results and answers that this call's checkpoints do not replace (same
    result_id), then this call's. `answers` are all of this call's checkpoints': carried and new.

        stored [A under k1, B under k1, A under k2], this call [A under k1] -> [B under k1, A under k2, A under k1]
    """
    entries, stored_answers = stored
    done = {result_id(e["path"], e["key"]) for e in run["checkpoints"]}
    kept = [e for e in entries if result_id(e["path"], e["key"]) not in done]
    kept_answers = [a for a in stored_answers if answer_id(a) not in done]
    return {**run, "checkpoints": kept + run["checkpoints"]}, kept_answers + answers


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
