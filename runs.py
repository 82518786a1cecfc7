"""What every entry script shares around the policy: the command line (flags from a config dataclass, the
one-line errors), the process group and FSDP2 (torchrun), run folders and checkpoints (atomic writes, resume, torn
saves, one run per folder), the optimizer's saved state, the learning-rate schedule, the metrics log and the
training step's memory. Imports nothing of the project, so that a script copies out with it and the few files it
uses (e.g. train_ppo.py with model.py, rollout.py and env_points.py).

Every config field becomes `--field-name VALUE` (booleans: `--flag` / `--no-flag`), with its default and the
docstring under it in --help, as cleanrl writes its Args. Bad values stop with one line: a float that is not
finite (nan, inf) here, ranges and paths in each config's `__post_init__` with `require` and `check_writable`;
`main` runs an entry script and turns its ValueErrors into that line.

    @dataclass
    class Config:
        lr: float = 1e-5
        '''peak learning rate'''
    main(Config, train)           # parses sys.argv[1:], then train(cfg)
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import shutil
import sys
import textwrap
import time
import typing
import uuid

import torch
import torch.nn as nn


# ---- the command line ----

def _kind(tp):
    """(python type, is_optional) of an annotation such as 'Optional[int]' or 'str'."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0], True
    return tp, False


def field_docs(cls) -> dict:
    """{field name: the string literal written under it in the class body}."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def optional_value(tp):
    """A flag's converter for an Optional field: "none" is None, anything else `tp`'s, named as `tp` is, so that
    argparse's error says "invalid float value: 'abc'"."""
    def convert(text: str):
        return None if text.lower() == "none" else tp(text)
    convert.__name__ = tp.__name__
    return convert


def parse_config(cls, argv=None, description: str = None):
    """An instance of dataclass `cls` with defaults overridden by command-line flags."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    summary = (cls.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(description=description or (summary[0] if summary else None))
    # argparse's own errors (a value of the wrong type, an unknown flag) as one line, not a usage block
    parser.error = lambda message: fail(f"{message} ({parser.prog} --help lists the flags and their values)")
    for f in dataclasses.fields(cls):
        tp, optional = _kind(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = docs.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=doc)
        else:
            convert = optional_value(tp) if optional else tp
            parser.add_argument(flag, dest=f.name, type=convert, default=default,
                                help=f"{doc} (default: {default})".strip())
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{name}={value}: expected a finite number")
    try:
        return cls(**vars(args))
    except ValueError as e:  # a config's own check (__post_init__): one line, as argparse does
        fail(str(e))


def require(cfg, names: str, test, expected: str) -> None:
    """ValueError naming the first of the space-separated fields `names` whose value fails `test` (None
    passes: a default resolved later), and what would be accepted."""
    for name in names.split():
        value = getattr(cfg, name)
        if value is not None and not test(value):
            raise ValueError(f"{name}={value!r}: expected {expected}")


def check_writable(path: str, what: str = "out", file: bool = False) -> None:
    """ValueError unless `path` is, or can be made, a folder we may write in (`file`: a file we may write); leaves
    nothing behind (the nearest existing folder is tried with a folder made and removed)."""
    if file and os.path.isdir(path):
        raise ValueError(f"{what}={path!r} is a folder: expected a file")
    if not file and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}={path!r} is a file: expected a folder (existing or to create)")
    full = parent = os.path.abspath(path)
    while not os.path.exists(parent):
        if os.path.islink(parent):  # a link to nothing: makedirs would fail on it after the model has loaded
            raise ValueError(f"{what}={path!r}: {parent!r} is a symbolic link to {os.readlink(parent)!r}, which does "
                             "not exist; expected a folder (existing or to create) or a link to one")
        parent = os.path.dirname(parent)
    if file and parent == full:  # the file exists: its folder is what must take the write
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what}={path!r} lies under the file {parent!r}: expected a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or not can_create_in(parent):
        raise ValueError(f"{what}={path!r}: {parent!r} is not writable")
    longest, path_max = os.pathconf(parent, "PC_NAME_MAX"), os.pathconf(parent, "PC_PATH_MAX")
    too_long = [n for n in os.path.relpath(full, parent).split(os.sep) if len(n.encode()) > longest]
    if too_long:  # a name the filesystem cannot hold fails at the first write
        raise ValueError(f"{what}={path!r}: the name {too_long[0][:40]!r}... is {len(too_long[0].encode())} bytes; "
                         f"this filesystem takes at most {longest}")
    if len(full.encode()) >= path_max:
        raise ValueError(f"{what}={path[:60]!r}...: the path is {len(full.encode())} bytes; this system takes paths "
                         f"under {path_max}")


IMAGE_FORMATS = ("PNG", "JPEG")  # what the project writes and reads; Pillow knows ~40 more (EPS runs Ghostscript)


def open_image(path: str):
    """An RGB image from a PNG or JPEG file, whatever its name says; ValueError naming the file and what it holds
    otherwise. Pillow opens every format it knows by default, EPS by handing the file to an external Ghostscript."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{path}: it holds {image_kind(path)}; expected a PNG or JPEG image") from None


def image_kind(path: str) -> str:
    """What a file that is no PNG or JPEG holds, from its header alone (no decoding, no external program)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return f"{img.format} data"
    except Exception:
        return "no image format Pillow knows"


def can_create_in(folder: str) -> bool:
    """Whether a folder can be made in `folder`, tried and undone: permissions alone pass root anywhere, /proc too."""
    probe = os.path.join(folder, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def main(cls, run, argv=None):
    """An entry script's main: its config from the command line, then `run(cfg)`; a ValueError from either
    (a bad value, a missing file, a refused run folder) stops with one line."""
    cfg = parse_config(cls, argv)
    try:
        return run(cfg)
    except ValueError as e:
        fail(str(e))


def fail(message: str, code: int = 2):
    """Stop with one line on stderr: what was wrong and what would be accepted. Under torchrun the line also
    goes to the launcher's error file, so that its failure report shows it instead of a pointer to the docs."""
    print(f"error: {message}", file=sys.stderr)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, f)
    sys.exit(code)


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


# ---- FSDP2 ----

def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def shard(policy: nn.Module) -> nn.Module:
    """FSDP2: fully_shard every transformer block (the model's _no_split_modules), the value head, then the
    whole policy. A bf16 `compute_dtype` becomes FSDP's mixed precision: the fp32 shards are the master
    weights the optimizer steps, gathered as bf16 for compute, gradients reduced in fp32; the value
    head stays fp32. Needs torch.distributed initialized."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(policy.device.type, (torch.distributed.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if policy.compute_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=policy.compute_dtype, reduce_dtype=torch.float32)
    blocks = set(getattr(policy.model, "_no_split_modules", None) or [])
    for module in policy.model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(policy.value_head, mesh=mesh)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    # FSDP initializes itself on the first forward through the root; generation enters through the inner
    # model, so run one tiny scoring pass now
    with torch.no_grad():
        probe = policy.encode([{"role": "user", "content": "hi"}])
        policy(policy.collate([probe], [torch.tensor([policy.end_of_turn_id])]))
    release(policy)
    return policy


def release(policy: nn.Module) -> None:
    """Reshard every FSDP module. Needed after a forward without a backward outside `gathered`: FSDP's
    root keeps its weights gathered from a forward until its backward, so an optimizer step would update
    the shards while the next forward read the stale gathered copy."""
    for module in fsdp_modules(policy):
        module.reshard()


def fsdp_modules(policy: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in policy.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(policy: nn.Module):
    """Within the block every FSDP-sharded parameter is gathered once and kept, so that generation
    runs forward per token without an all-gather per token (and ranks may generate different lengths,
    or make different numbers of calls); resharded on exit. Nests (only the outermost block gathers);
    every rank must enter it. A no-op without FSDP."""
    modules = fsdp_modules(policy)
    depth = getattr(policy, "_gather_depth", 0)
    policy._gather_depth = depth + 1
    if depth == 0:
        for m in modules:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        policy._gather_depth = depth
        if depth == 0:
            for m in modules:
                m.set_reshard_after_forward(True, recurse=False)
                m.reshard()


def full_state_dict(policy: nn.Module) -> dict:
    """The whole policy's weights as plain CPU tensors: gathered to rank 0 under FSDP (other ranks get {})."""
    if not fsdp_modules(policy):
        return {k: v.detach().cpu() for k, v in policy.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- run folders and checkpoints ----

def _publish(tmp: str, final: str) -> None:
    """Move a finished folder under its final name in one rename, replacing any older one (set aside under a
    hidden name first, which every reader ignores, so a kill in between leaves no second checkpoint)."""
    old = None
    if os.path.exists(final):
        parent, name = os.path.split(os.path.abspath(final))
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str):
    """Yield a temporary folder beside `final`; on success it becomes `final` in one rename, on any
    error it is removed, so a reader never finds a half-written folder under the final name."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_trainer_state(folder: str) -> dict:
    """A checkpoint's trainer_state.json (step, tokens, gflops, config, ...); {} for a base model."""
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isdir(folder) or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e}); expected the trainer state a trainer wrote") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}; expected a JSON object (the trainer state)")
    return state


def cosine_lr(step: int, peak: float, total: int, warmup: int = 0, floor: float = 0.0, hold: bool = True) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `floor` at step `total`, held there
    (torch's CosineAnnealingLR with T_max = total and eta_min = floor, without its rise after T_max); with
    `hold` False it rises again after `total` as torch's does, periodic in 2 x total."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (min(1.0, progress) if hold else progress)))


MAX_STEP = 10 ** 8  # steps or updates a run may have taken: beyond it a trainer state is damaged, not long


def check_trainer_state(state: dict, path: str) -> None:
    """ValueError naming the file and the field unless the counters a resume continues are what a trainer writes:
    step and tokens whole numbers from 0 (step at most MAX_STEP), gflops a finite number from 0."""
    for name, whole, limit in (("step", True, MAX_STEP), ("tokens", True, math.inf), ("gflops", False, math.inf)):
        value = state[name]
        kind = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not 0 <= value <= limit:
            expected = f"a whole number from 0 to {limit:g}" if whole else "a finite number from 0"
            raise ValueError(f"{path}: {name} is {str(value)[:40]}; expected {expected} (the file is damaged: start "
                             "a new run from the checkpoint's weights with --model and another --out)")


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


def recipe_changes(asked: dict, trained: dict) -> list:
    """The fields where a run's recorded config (its trainer state's "config") differs from the recipe asked:
    ["lr 0.001 (asked 0.0001)"]. Numbers compare as numbers, so 1e-4 and 0.0001 are one rate."""
    changes = []
    for name, value in asked.items():
        have = trained.get(name)
        if isinstance(have, bool) or value is True:
            same = have == (value is True)
        elif isinstance(have, (int, float)):
            try:
                same = float(value) == float(have)
            except ValueError:
                same = False
        else:
            same = str(have) == str(value)
        if not same:
            changes.append(f"{name.replace('_', '-')} {have} (asked {value})")
    return changes


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


HELD = {}  # run folders this process holds: absolute path -> the open lock file (held until the process ends)


def hold_run_folder(run: str) -> None:
    """Hold `run` for this process, so that no second trainer writes into it at the same time: an advisory lock on
    <run>/.lock, which the system releases however the process ends (a killed holder leaves no stale lock), naming
    its holder inside. ValueError naming the holder when another process holds it. Rank 0 alone."""
    import fcntl
    path = os.path.abspath(run)
    if rank() != 0 or path in HELD:
        return
    os.makedirs(path, exist_ok=True)
    lock = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read(300).strip() or "another process"
        lock.close()
        raise ValueError(f"run folder {run!r} is in use by {holder}: wait for it to end or stop it, or use another "
                         "--out") from None
    except OSError as e:  # a filesystem without locks (some network mounts): go on unguarded, and say so
        print(f"warning: run folder {run!r} cannot be locked ({e.strerror or e}): make sure no other trainer writes "
              "into it")
    lock.truncate(0)
    lock.write(f"process {os.getpid()} ({' '.join(sys.argv)[:200]})")
    lock.flush()
    HELD[path] = lock


def release_run_folder(run: str) -> None:
    """Let go of a run folder this process holds (nothing when it holds none)."""
    lock = HELD.pop(os.path.abspath(run), None)
    if lock is not None:
        lock.close()  # closing the file releases its lock


def releases_run_folder(train):
    """Decorates a trainer's train(cfg): the run folder that `start` held for it is let go when it returns or fails,
    so that a later run in this process, or in another, may take it."""
    @functools.wraps(train)
    def run(cfg, *args, **kwargs):
        try:
            return train(cfg, *args, **kwargs)
        finally:
            release_run_folder(cfg.out)
    return run


def last_checkpoint(run: str):
    """The newest complete checkpoint folder of a run (complete: it has its trainer_state.json), by its name's step
    (step-000012): a damaged trainer state is for the resume to name, not to reorder the checkpoints."""
    if not os.path.isdir(run):
        return None
    done = [d for d in os.listdir(run) if d.startswith("step-") and d[5:].isdigit()
            and read_trainer_state(os.path.join(run, d))]
    return os.path.join(run, max(done, key=lambda d: int(d[5:]))) if done else None


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
    with open(path, errors="replace") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for k, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError(f"a {type(entry).__name__}")
        except ValueError as e:
            if k < len(lines):
                raise ValueError(f"{path}:{k}: not a JSON object ({str(e)[:80]}); expected one line of metrics per "
                                 "step (a line torn by a kill can only be the last: delete this one)") from None
            print(f"warning: {path}:{k}: its last line is torn (a run killed while writing it): dropped")
            continue
        step_of = entry.get("step", 0)
        if not isinstance(step_of, (int, float)) or step_of <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(kept)


# ---- a trainer's start, checkpoints and log (train_sft.py and train_ppo.py alike) ----

def printer(rank: int):
    """print on rank 0, nothing elsewhere: logging that never branches on the rank."""
    return print if rank == 0 else (lambda *a, **k: None)


def start(model: str, out: str, resume: bool, overwrite: bool, task: str, protocol: str, print0,
          recipe: typing.Optional[dict] = None, resume_changed: bool = False) -> tuple:
    """Where a training run starts: (init, resume_from, trainer state of what it loads). `model` is a checkpoint,
    a run folder (its last complete checkpoint) or a model name; `resume` takes the run folder's own last complete
    checkpoint instead. The run folder is held for this process (hold_run_folder) and made ready
    (prepare_run_folder); a checkpoint trained on another task or under another protocol is warned of. A resume
    whose `recipe` ({config field: value}) differs from the run's is refused, naming the fields, unless
    `resume_changed` (--resume-changed): then it goes on, and says so."""
    init = model
    if os.path.isdir(init) and not os.path.exists(os.path.join(init, "config.json")):
        init = last_checkpoint(init) or init
    hold_run_folder(out)
    prepare_run_folder(out, resume, overwrite)
    resume_from = last_checkpoint(out) if resume else None
    if resume and resume_from is None:
        raise ValueError(f"--resume: no complete checkpoint in {out!r}")
    state = read_trainer_state(resume_from or init)
    missing = [k for k in ("step", "gflops", "tokens") if k not in state]
    if resume_from and not missing:
        check_trainer_state(state, os.path.join(resume_from, "trainer_state.json"))
    if resume_from and (missing or not os.path.exists(os.path.join(resume_from, "optimizer.pt"))):
        what = f"{', '.join(missing)} in its trainer_state.json" if missing else "its optimizer.pt"
        raise ValueError(f"--resume: {resume_from} lacks {what}, so the run cannot go on where it stopped; start a new "
                         f"run from its weights with --model {resume_from} and another --out (a fresh optimizer)")
    changes = recipe_changes(recipe or {}, state.get("config") or {}) if resume_from and state.get("config") else []
    if changes and not resume_changed:
        raise ValueError(f"--resume: {resume_from} was trained with another recipe: {'; '.join(changes)}; resume it "
                         "with the recipe it was trained with, or pass --resume-changed to go on with this one")
    if changes:
        print0(f"warning: --resume-changed: {resume_from} goes on with another recipe: {'; '.join(changes)}")
    for line in recipe_warnings(state, task, protocol, resume_from or init):
        print0(f"warning: {line}")
    return init, resume_from, state


def save_checkpoint(policy, opt, out: str, step: int, trainer_state: dict) -> str:
    """step-<n> in the run folder: the weights, optimizer.pt and trainer_state.json with the torch RNG state; the
    older checkpoints give up their optimizer state (only --resume reads it). -> the checkpoint's path"""
    checkpoint = os.path.join(out, f"step-{step:06d}")
    state = {**trainer_state, "rng": torch.get_rng_state().tolist()}
    policy.save(checkpoint, extras={"trainer_state.json": state, "optimizer.pt": optimizer_state(policy, opt)})
    drop_older_optimizer_states(out, checkpoint)
    return checkpoint


def step_done(policy, opt, out: str, step: int, total: int, save_every: int, time_limit: float, started: float,
              trainer_state: dict, print0, health: "Divergence") -> bool:
    """After a trainer's step (an SFT step, a PPO update): a checkpoint when one is due (every `save_every`, the last
    step, or the time limit reached on any rank). True when the time limit stops the run there (--resume goes on).
    Never after a skipped step (health.in_a_row): a due save waits for a step that trains, and a run whose last step
    was skipped stops with one line, its last good checkpoint kept."""
    late = out_of_time(started, time_limit)
    due = step % save_every == 0 or step == total or late or health.save_due
    if due and health.in_a_row:
        if step == total or late:
            raise health.stop(f"the last {health.in_a_row} {health.unit}(s) had a non-finite loss or gradient", step)
        if not health.save_due:
            print0(f"warning: {health.unit} {step} skipped (non-finite loss or gradient): not saved; the next "
                   f"{health.unit} that trains is")
        health.save_due = True
    elif due:
        save_checkpoint(policy, opt, out, step, trainer_state)
        health.save_due = False
    if late and step < total:
        print0(f"time limit of {time_limit:g} s reached at step {step}: --resume continues")
    return late and step < total


def restore(policy, opt, checkpoint: str, state: dict, print0=print) -> None:
    """A resumed run's optimizer state and torch RNG state, as `save_checkpoint` wrote them. Without the RNG state
    (a checkpoint saved before it was kept, or edited) the run goes on from --seed's RNG, and says so."""
    load_optimizer_state(policy, opt, checkpoint)
    rng = state.get("rng")
    try:
        torch.set_rng_state(torch.tensor(rng, dtype=torch.uint8))
    except (TypeError, ValueError, RuntimeError):
        why = "missing" if rng is None else "malformed"
        print0(f"warning: {checkpoint}: trainer_state.json holds no usable RNG state ({why}); resuming with the RNG "
               "of --seed, so the rest of the run will not repeat an uninterrupted one exactly")


# ---- divergence: a non-finite loss, gradient or weight ----

MAX_SKIPPED_IN_A_ROW = 5  # steps in a row with a non-finite loss or gradient: the run has diverged and stops


def all_finite(tensors) -> bool:
    """Whether every tensor (a sharded parameter: this rank's shard) is finite, on every rank."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    bad = bool(local) and not bool(torch.stack([torch.isfinite(t).all() for t in local]).all())
    return all_reduce_max(float(bad)) == 0


class Divergence:
    """A trainer's health: steps skipped for a non-finite loss or gradient (never applied), counted; the run stops
    with one line, naming the likely cause and the last good checkpoint, after MAX_SKIPPED_IN_A_ROW of them in a row
    or when an applied step leaves a weight non-finite. Nothing non-finite is ever saved (step_done)."""

    def __init__(self, out: str, lr: float, unit: str = "step"):
        self.out, self.lr, self.unit = out, lr, unit  # unit: what the trainer calls a step ("update" in PPO)
        self.in_a_row = self.skipped = 0
        self.save_due = False  # a save that fell on a skipped step, made at the next step that trains

    def step(self, applied: bool, step: int, params) -> None:
        """After a step: `applied` False when it was skipped; `params` checked when it was applied."""
        if applied:
            self.in_a_row = 0
            if not all_finite(params):
                raise self.stop("the optimizer step made some weights non-finite", step)
            return
        self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise self.stop(f"{self.in_a_row} {self.unit}s in a row had a non-finite loss or gradient", step)

    def stop(self, what: str, step: int) -> ValueError:
        last = last_checkpoint(self.out)
        return ValueError(f"{what} ({self.unit} {step}): training diverged, most likely from the learning rate "
                          f"({self.lr:g}: try a smaller --lr) or the data; these weights were not saved; the last good "
                          f"checkpoint is {last or 'none: nothing was saved'}")


class MetricsLog:
    """The run's metrics.jsonl on rank 0 (a no-op elsewhere): the lines after `step` dropped first (a run killed
    between two checkpoints logged them; its resume logs them again), then one JSON line per write, flushed.
    A context manager: closed on leaving it."""

    def __init__(self, out: str, step: int, rank: int):
        self.file = None
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, "metrics.jsonl")
            rewind_log(path, step)
            self.file = open(path, "a")

    def write(self, metrics: dict) -> None:
        if self.file:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()


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
        raise ValueError(f"{path!r} is missing: the checkpoint is incomplete; start a new run from its weights with "
                         "--model instead (a fresh optimizer)") from None
    except Exception as e:  # an UnpicklingError for a pickle of code, anything else for a torn or foreign file
        raise ValueError(f"{path!r} is not a plain optimizer state and was not loaded "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def check_optimizer_state(saved: dict, opt, path: str) -> None:
    """ValueError naming the file and the first parameter whose saved state does not fit this model (another
    model's optimizer.pt with as many tensors loads, and fails at the first step)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = saved.get("state") if isinstance(saved, dict) else None
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not isinstance(groups, list):
        raise ValueError(f"{path!r}: not an optimizer state (no state and param_groups); expected what a trainer saves")
    ids = [i for group in groups if isinstance(group, dict) for i in group.get("params", [])]
    if len(ids) != len(params):
        raise ValueError(f"{path!r}: the optimizer state of {len(ids)} parameters; this model has {len(params)} (a "
                         "checkpoint of another model?)")
    for k, (i, p) in enumerate(zip(ids, params)):
        for name, value in (state.get(i) or {}).items():
            if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                raise ValueError(f"{path!r}: parameter {k}'s {name} has shape {tuple(value.shape)}; this model's is "
                                 f"{tuple(p.shape)} (a checkpoint of another model?)")


def load_optimizer_state(policy, opt, checkpoint: str) -> None:
    """Restore the optimizer state saved in a checkpoint's optimizer.pt (read on rank 0 and broadcast under FSDP)."""
    path, sharded = os.path.join(checkpoint, "optimizer.pt"), bool(fsdp_modules(policy))
    state = {}
    if rank() == 0 or not sharded:  # a sharded parameter's shape is the whole one's: the same check
        state = read_optimizer_file(path)
        check_optimizer_state(state, opt, path)
    if not sharded:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
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
