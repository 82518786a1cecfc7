"""What a training or evaluation process needs around the policy: the process group (torchrun), run folders
and checkpoints (resume, torn saves, one run per folder), the optimizer's saved state, the learning-rate
schedule and the metrics log. Shared by train_sft.py, train_ppo.py, evaluate.py and replicate.py.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import torch

from model import fsdp_modules, is_distributed, rank


# ---- the process group ----

def init_distributed(device: str = ""):
    """(rank, world size, device). Under torchrun (it sets RANK) join the process group, even with one
    process, so that FSDP2 runs: NCCL on GPUs, gloo on CPU; a plain `python script.py` is one process
    on `device` (empty: automatic)."""
    if "RANK" not in os.environ:
        return 0, 1, device or None
    backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    torch.distributed.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank, world, f"cuda:{local}" if backend == "nccl" else "cpu"


def all_reduce_sum(x: float) -> float:
    """The sum of x over all ranks (x itself in one process)."""
    return _all_reduce(x, "sum")


def all_reduce_max(x: float) -> float:
    """The largest x of all ranks (x itself in one process)."""
    return _all_reduce(x, "max")


def _all_reduce(x: float, op: str) -> float:
    if not is_distributed():
        return x
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if nccl else "cpu")
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
    torch.distributed.all_reduce(t, op=ops[op])
    return float(t.item())


# ---- run folders and checkpoints ----

def read_trainer_state(folder: str) -> dict:
    """A checkpoint's trainer_state.json (step, tokens, gflops, config, ...); {} for a base model."""
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isdir(folder) or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def cosine_lr(step: int, peak: float, total: int, warmup: int = 0, floor: float = 0.0) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `floor` at step `total`, held there
    (torch's CosineAnnealingLR with T_max = total and eta_min = floor, without its rise after T_max)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def remove_torn_saves(run: str) -> None:
    """Delete what killed saves left in a run folder: the hidden `.<name>.tmp-*` folders of saves that never
    finished and `.<name>.old-*` ones that a finished save had set aside."""
    if os.path.isdir(run):
        for name in os.listdir(run):
            if name.startswith(".") and (".tmp-" in name or ".old-" in name):
                shutil.rmtree(os.path.join(run, name), ignore_errors=True)


def prepare_run_folder(run: str, resume: bool, overwrite: bool) -> None:
    """Make `run` ready for a training run: torn saves removed; without `resume`, a folder that holds another
    run's checkpoints is refused (mixing two runs' steps and logs), unless `overwrite` deletes them first.
    Every rank may call it: only rank 0 deletes."""
    steps = sorted(d for d in os.listdir(run) if d.startswith("step-")) if os.path.isdir(run) else []
    if steps and not resume and not overwrite:
        raise ValueError(f"run folder {run!r} already holds checkpoints ({steps[0]} ... {steps[-1]}): pass --resume to "
                         "continue that run, --overwrite to delete them and start over, or another --out")
    if rank() != 0:
        return
    remove_torn_saves(run)
    if steps and overwrite and not resume:
        for d in steps:
            shutil.rmtree(os.path.join(run, d))
        if os.path.exists(os.path.join(run, "metrics.jsonl")):
            os.remove(os.path.join(run, "metrics.jsonl"))


def last_checkpoint(run: str):
    """The newest complete checkpoint folder of a run (complete: it has its trainer_state.json)."""
    if not os.path.isdir(run):
        return None
    done = [os.path.join(run, d) for d in os.listdir(run)
            if d.startswith("step-") and read_trainer_state(os.path.join(run, d))]
    return max(done, key=lambda d: read_trainer_state(d)["step"], default=None)


def rewind_log(path: str, step: int) -> None:
    """Drop the lines of a metrics.jsonl written after `step` (by a run killed between two checkpoints),
    so that a resumed run's log holds every step once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def optimizer_state(policy, opt) -> dict:
    """The optimizer's full state (gathered to rank 0 under FSDP)."""
    if not fsdp_modules(policy):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(policy, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def read_optimizer_file(path: str) -> dict:
    """A saved optimizer state, read with torch.load(weights_only=True): tensors, numbers, strings and
    containers only. A pickle that would build anything else (and could run code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path!r} is missing: the checkpoint is incomplete") from None
    except Exception as e:  # an UnpicklingError for a pickle of code, anything else for a torn or foreign file
        raise ValueError(f"{path!r} is not a plain optimizer state and was not loaded "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_optimizer_state(policy, opt, checkpoint: str) -> None:
    """Restore the optimizer state saved in a checkpoint's optimizer.pt (read on rank 0 and broadcast under FSDP)."""
    path = os.path.join(checkpoint, "optimizer.pt")
    if not fsdp_modules(policy):
        opt.load_state_dict(read_optimizer_file(path))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = read_optimizer_file(path) if rank() == 0 else {}
    set_optimizer_state_dict(policy, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
