"""What a training or evaluation process needs around the policy: the process group (torchrun), run folders
and checkpoints (resume, torn saves, one run per folder), the optimizer's saved state, the learning-rate
schedule and the metrics log. Shared by train_sft.py, train_ppo.py, evaluate.py and replicate.py.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

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


def leave_distributed() -> None:
    """Leave the process group, every rank together (a barrier first). Rank 0 is often still writing a checkpoint
    or results when the others are done, and a rank that tears its gloo connections down meanwhile can abort."""
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


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


def cosine_lr(step: int, peak: float, total: int, warmup: int = 0, floor: float = 0.0, hold: bool = True) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `floor` at step `total`, held there
    (torch's CosineAnnealingLR with T_max = total and eta_min = floor, without its rise after T_max); with
    `hold` False it rises again after `total` as torch's does, periodic in 2 x total."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (min(1.0, progress) if hold else progress)))


def trained_protocol(state: dict):
    """The protocol a checkpoint was trained under, from its trainer state ("project" before there were two);
    None for a base model, which has no state."""
    return state["config"].get("protocol", "project") if state.get("config") else None


def recipe_warnings(state: dict, task: str, protocol: str, where: str) -> list:
    """Warnings that the checkpoint at `where`, whose trainer state is `state`, was trained on another task or under
    another protocol than the run about to start from it (a base model has no state: nothing to warn of)."""
    out = []
    if state.get("task", task) != task:
        out.append(f"{where} was trained on {state['task']}; this run trains on {task}")
    trained = trained_protocol(state) or protocol
    if trained != protocol:
        out.append(f"{where} was trained under protocol {trained}; this run uses {protocol}")
    return out


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


def drop_older_optimizer_states(run: str, newest: str) -> None:
    """Delete optimizer.pt from every checkpoint of `run` but `newest` (the one just saved), which alone --resume
    reads: Adam's state is twice the fp32 weights (1 GB a SmolLM2 checkpoint, 88 GB at 11B). Rank 0 alone deletes."""
    if rank() != 0:
        return
    for d in os.listdir(run):
        path = os.path.join(run, d, "optimizer.pt")
        if d.startswith("step-") and os.path.join(run, d) != newest and os.path.exists(path):
            os.remove(path)


def out_of_time(started: float, limit: float) -> bool:
    """Whether `limit` seconds (0: no limit) have passed since `started` (time.perf_counter()) on any rank: every
    rank stops together, as the collectives of a sharded run need."""
    late = bool(limit) and time.perf_counter() - started > limit
    return all_reduce_max(float(late)) > 0


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


# ---- memory and the training step ----

def training_memory(model, world: int, tokens: int, response_tokens: int, checkpointing: bool = True) -> dict:
    """Estimated GPU memory per rank (GiB) of a training step with fp32 master weights and bf16 compute: one
    process under autocast (world 1) or FSDP2 mixed precision. N parameters, W ranks, a micro-batch of T tokens
    (R of them response tokens) per rank, L layers of width H and MLP width I, vocabulary V, in bytes:
        master weights 4N/W, gradients 4N/W, Adam m and v 8N/W    (fp32; FSDP shards them)
        bf16 copy      2N in one process (autocast's casts, kept for the backward); under FSDP
                       2 (N_root + 2 N_block): the root's gathered weights and two blocks (one prefetched)
        activations    with gradient checkpointing L T H a + T (20 H + 10 I): each block's input (a = 4 bytes:
                       the fp32 residual stream under autocast; 2 under FSDP) and one block recomputed;
                       without, L T (20 H + 10 I)
        logits         16 R V: fp32 logits, log-softmax, its exp (entropy) and their gradient, response only
    20 H + 10 I bytes per token is what a Llama block keeps for its backward in bf16 (SDPA: no T x T scores).
    A VLM's vision tower activations are not counted (under 1 GiB at 4 tiles with checkpointing)."""
    text = model.config.get_text_config()
    n = sum(p.numel() for p in model.parameters())
    blocks = [m for m in model.modules() if type(m).__name__ in set(model._no_split_modules or [])]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    layers, h, i, v = text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size
    block_bytes = tokens * (20 * h + 10 * i)
    fsdp = world > 1
    gib = {"weights": 4 * n / world, "gradients": 4 * n / world, "adam": 8 * n / world,
           "bf16_copy": 2 * ((n - sum(sizes)) + 2 * max(sizes)) if fsdp else 2 * n,
           "activations": (layers * tokens * h * (2 if fsdp else 4) + block_bytes) if checkpointing
           else layers * block_bytes,
           "logits": 16 * response_tokens * v}
    gib = {k: b / 2**30 for k, b in gib.items()}
    return {"params_b": n / 1e9, **gib, "total": sum(gib.values())}


def prepare_training(policy, checkpointing: str, compile: bool, world: int, tokens: int, response_tokens: int) -> str:
    """Gradient checkpointing only where memory needs it ("auto": on a GPU, when `training_memory` without it
    passes 85% of the GPU's memory; "on", "off"), and torch.compile of the transformer body when asked (one
    process: under FSDP the blocks are compiled by FSDP's own wrapping, not here). Returns what was chosen."""
    if checkpointing not in ("auto", "on", "off"):
        raise ValueError(f"grad_checkpointing={checkpointing!r}: expected auto, on or off")
    on = checkpointing == "on"
    if checkpointing == "auto" and policy.device.type == "cuda":
        need = training_memory(policy.model, world, tokens, response_tokens, checkpointing=False)["total"]
        on = need * 2**30 > 0.85 * torch.cuda.get_device_properties(policy.device).total_memory
    if on:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = compile and not is_distributed()
    if compiled:
        policy.model.model.compile(dynamic=True)
    return f"gradient checkpointing {'on' if on else 'off'}{', compiled' if compiled else ''}"
