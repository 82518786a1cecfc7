"""Supervised fine-tuning on expert answers: response-only cross-entropy, single process or FSDP2.

The data are expert conversations of a task's in-distribution setting (rule and visuals): the
prompt an environment shows and the answer its expert gives (`expert_response()`), optionally with
sequential-revision examples (a wrong answer, the verifier's feedback, then the right answer), as
in the paper's appendix ablation. They are generated from a seed, or read from a JSONL file in
the same format (see README), so you can bring your own.

    python train_sft.py --task gp-l                                  # the embedded default, CPU or one GPU
    python train_sft.py --task gp-l --resume                         # continue an interrupted run
    torchrun --nproc_per_node 8 train_sft.py --task gp-vl --model /data/Llama-3.2-11B-Vision-Instruct \\
        --lr 5e-7 --batch-size 128 --micro-batch 16 --steps 800      # paper scale (the official GP-VL rate)

Simplifications relative to the paper: its SFT data came from a fixed expert dataset; here the
environments' experts generate them on the fly from a seed (the same expert answers, any amount).
`--protocol official` writes them as the official data did: the official prompts, and answers in the official
template (not JSON: its verifier rejects strict JSON card lists), so that the official rules score a model trained
here as they would score one trained on the official data; its learning rate defaults to the task's official one.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm import tqdm

import model as M
import runs as R
from rollout import (OFFICIAL_SFT_LR, check_protocol, check_task, env_module, env_overrides, make_envs,
                     wrong_answer)
from runs import check_writable, main, require

# ---- config ----

RECIPE = "task model lr batch_size micro_batch protocol seed"  # what --resume must find as the run had it


@dataclass
class SFTConfig:
    """Supervised fine-tuning on expert answers."""
    task: str = "gp-l"
    """gp-l, gp-vl, virl-l or virl-vl (ID rule and visuals only)"""
    model: str = "smollm2-135m"
    """model name or checkpoint folder to start from"""
    data: str = ""
    """JSONL of expert conversations; empty: generate them"""
    export_data: str = ""
    """write the generated examples to this JSONL (images beside it) and exit"""
    examples: int = 2000
    """generated examples (with --data empty)"""
    data_seed: int = 0
    """seed of the generated examples"""
    revision_frac: float = 0.0
    """share of examples with a wrong answer and feedback first"""
    image_size: int = 0
    """VL tasks: image side in pixels (GP cards, each V-IRL view); 0: the default"""
    prompt_diversity: bool = False
    """word each example's prompt with one of the environment's templates at random (arXiv 2510.00237)"""
    reasoning: bool = False
    """expert answers that reason step by step in a "thought" field before the action (arXiv 2510.00237)"""
    steps: int = 20
    """optimizer steps"""
    batch_size: int = 8
    """examples per optimizer step, all ranks together"""
    micro_batch: int = 8
    """examples per forward pass on one rank (gradient accumulation)"""
    protocol: str = "project"
    """project (this project's prompts and JSON answers) or official (the official prompts and answer template)"""
    lr: Optional[float] = None
    """peak learning rate (the paper's grid: 1e-4 ... 1e-7); default: 1e-4, sized for a CPU; under the official
    protocol the task's official rate (GP-L and V-IRL-L 1e-6, GP-VL and V-IRL-VL 5e-7)"""
    warmup_steps: int = 2
    """linear warmup, then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """max gradient norm"""
    save_every: int = 10
    """checkpoint every N steps (and at the end)"""
    out: str = ""
    """run folder; empty: runs/sft-<task>"""
    time_limit: float = 0.0
    """seconds after which the run saves a checkpoint and stops (0: none); --resume continues it"""
    resume: bool = False
    """continue from the run folder's last complete checkpoint"""
    resume_changed: bool = False
    """with --resume: go on though the recipe (the fields RECIPE names: task, model, rate, batch sizes, protocol,
    seed, ...) differs from the run's, which is refused otherwise; said in the log"""
    overwrite: bool = False
    """delete the checkpoints already in the run folder and start over"""
    seed: int = 0
    """data order and init seed"""
    device: str = ""
    """cuda, cpu, ...; empty: the GPU when there is one"""
    grad_checkpointing: str = "auto"
    """auto (on a GPU when the estimated memory needs it), on or off"""
    compile: bool = False
    """torch.compile the transformer body (one process)"""
    precision: str = "auto"
    """auto (GPU: bf16, CPU: fp32), bf16 (over fp32 master weights) or fp32"""

    def __post_init__(self):
        check_task(self.task)
        check_protocol(self.protocol)
        if self.lr is None:
            self.lr = OFFICIAL_SFT_LR[self.task] if self.protocol == "official" else 1e-4
        if self.prompt_diversity and self.protocol == "official":
            raise ValueError("prompt_diversity: the official protocol prompts with the official prompt only; "
                             "expected --protocol project")
        M.compute_dtype_of(self.precision, "cpu")  # a bad name fails here, before any work
        require(self, "examples steps batch_size micro_batch save_every", lambda v: v >= 1, "a positive integer")
        require(self, "lr grad_clip", lambda v: v > 0, "a positive number")
        require(self, "warmup_steps image_size", lambda v: v >= 0, "0 or a positive integer")
        require(self, "weight_decay time_limit", lambda v: v >= 0, "0 or a positive number")
        require(self, "revision_frac", lambda v: 0 <= v <= 1, "a share between 0 and 1")
        require(self, "grad_checkpointing", lambda v: v in ("auto", "on", "off"), "auto, on or off")
        env_overrides(self.task, image_size=self.image_size, protocol=self.protocol)  # e.g. a bad image size
        M.check_device(self.device)
        if self.data and not os.path.isfile(self.data):
            folder = " (it is a folder)" if os.path.isdir(self.data) else ""
            raise ValueError(f"data file {self.data!r} not found{folder}")
        self.out = self.out or os.path.join("runs", f"sft-{self.task}")
        if self.export_data:
            check_writable(self.export_data, "export_data", file=True)
        else:
            check_writable(self.out)


# ---- data ----

def expert_examples(task: str, n: int, seed: int, revision_frac: float = 0.0, image_size: int = 0,
                    prompt_diversity: bool = False, reasoning: bool = False, protocol: str = "project") -> list:
    """n examples {"messages": [turns], "response": expert answer} from the task's ID setting.
    GP: one per hand; V-IRL: one per position of a route. With revision_frac, that share first shows
    a wrong answer and the verifier's feedback (only when the answer really is wrong). With prompt_diversity
    each episode is worded by one of the environment's prompt templates, drawn at random; with reasoning the
    expert answers think first; under protocol "official", official prompts and answers in the official template."""
    templates = env_module(task).PROMPT_TEMPLATES if prompt_diversity else 1
    envs = make_envs(task, "id", templates, seed, templates=templates,
                     **env_overrides(task, image_size=image_size, protocol=protocol))
    rng, out = random.Random(seed), []
    while len(out) < n:
        env = envs[rng.randrange(templates)] if templates > 1 else envs[0]
        obs, done = env.reset(), False
        while not done and len(out) < n:
            messages = [{"role": "user", "content": obs.text, "image": obs.image}]
            expert = env.expert_response(reasoning=reasoning)
            if rng.random() < revision_frac:
                wrong = wrong_answer(task, expert, rng)
                feedback, _, _, info = env.step(wrong)
                if info["outcome"] != "correct" and feedback.continues:
                    messages += [{"role": "assistant", "content": wrong}, {"role": "user", "content": feedback.text}]
                else:  # the "mistake" happened to be right, or used the position's last attempt: start again
                    break
            out.append({"messages": messages, "response": expert})
            obs, _, done, _ = env.step(expert)
    return out


def generated_examples(cfg: SFTConfig) -> list:
    return expert_examples(cfg.task, cfg.examples, cfg.data_seed, cfg.revision_frac, cfg.image_size,
                           cfg.prompt_diversity, cfg.reasoning, cfg.protocol)


def write_examples(path: str, examples: list) -> None:
    """JSONL, one example a line; images go to <name>_images/ beside the file, referenced by relative path."""
    folder = os.path.splitext(path)[0] + "_images"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i, ex in enumerate(examples):
            turns = []
            for j, t in enumerate(ex["messages"]):
                turn = {"role": t["role"], "content": t["content"]}
                if t.get("image") is not None:
                    os.makedirs(folder, exist_ok=True)
                    name = os.path.join(os.path.basename(folder), f"{i:06d}_{j}.png")
                    t["image"].save(os.path.join(os.path.dirname(os.path.abspath(path)), name))
                    turn["image"] = name
                turns.append(turn)
            f.write(json.dumps({"messages": turns, "response": ex["response"]}) + "\n")


def read_examples(path: str) -> list:
    """Examples from a JSONL file as written by write_examples; ValueError naming the bad line."""
    base, out = os.path.dirname(os.path.abspath(path)), []
    expected = '{"messages": [{"role": "user" | "assistant" | "system", "content": str, "image": optional path}], ' \
               '"response": str}'
    with open(path, errors="replace") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                messages, response = ex["messages"], ex["response"]
                if not (isinstance(messages, list) and messages and isinstance(response, str)) or not all(
                        isinstance(t, dict) and t.get("role") in ("user", "assistant", "system")
                        and isinstance(t.get("content"), str) for t in messages):
                    raise TypeError("wrong types")
                turns = [{"role": t["role"], "content": t["content"],
                          "image": R.open_image(os.path.join(base, t["image"]))
                          if t.get("image") else None}
                         for t in messages]
                out.append({"messages": turns, "response": response})
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise ValueError(f"{path}:{k}: not an example ({e}); expected {expected}") from None
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def encode_examples(policy, examples: list) -> list:
    """[(encoded prompt, response ids ending in the end-of-turn token)]."""
    return [(policy.encode(ex["messages"]), policy.response_ids(ex["response"])) for ex in examples]


def data_order(n: int, seed: int, start: int, count: int) -> list:
    """Example indices start .. start + count of the endless sequence of seeded epoch shuffles, so a
    resumed run reads exactly what the uninterrupted one would have."""
    out, epoch, pos = [], start // n, start % n
    while len(out) < count:
        perm = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(perm)
        out += perm[pos:pos + count - len(out)]
        epoch, pos = epoch + 1, 0
    return out


# ---- loss ----

def sft_loss(policy, batch: dict, total_tokens: int):
    """Response-only cross-entropy summed over this micro-batch's response tokens and divided by
    `total_tokens`, the response tokens of the whole optimizer step on all ranks, so that the
    accumulated gradient is the gradient of the step's per-token mean. Returns (loss, nll sum)."""
    out = policy(batch, temperature=1.0)
    nll = -(out["logprobs"] * out["response_mask"]).sum()      # prompt, feedback and padding are masked
    return nll / total_tokens, nll.detach()


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 0 at cfg.steps."""
    return R.cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup_steps)


# ---- main ----

@R.releases_run_folder
def train(cfg: SFTConfig) -> dict:
    if cfg.export_data:
        write_examples(cfg.export_data, generated_examples(cfg))
        print(f"wrote {cfg.examples} examples to {cfg.export_data}")
        return {}
    rank, world, device = R.init_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    print0 = R.printer(rank)

    # ---- start: fresh, or the last complete checkpoint ----
    init, resume_from, state = R.start(cfg.model, cfg.out, cfg.resume, cfg.overwrite, cfg.task, cfg.protocol, print0,
                                       {name: getattr(cfg, name) for name in RECIPE.split()}, cfg.resume_changed)
    torch.manual_seed(cfg.seed)
    policy = M.load_policy(resume_from or init, device=device, precision=cfg.precision)
    n_params = policy.model.num_parameters()
    step = state.get("step", 0) if resume_from else 0
    gflops = state.get("gflops", 0.0)          # an RL or SFT init's compute carries over: one axis
    tokens = state.get("tokens", 0) if resume_from else 0

    # ---- data ----
    examples = read_examples(cfg.data) if cfg.data else generated_examples(cfg)
    encoded = encode_examples(policy, examples)
    setup = R.prepare_training(policy, cfg.grad_checkpointing, cfg.compile, world,
                               tokens=cfg.micro_batch * max(len(p["input_ids"][0]) + len(r) for p, r in encoded),
                               response_tokens=cfg.micro_batch * max(len(r) for _, r in encoded))
    print0(f"sft {cfg.task}: {len(encoded)} examples, {n_params / 1e6:.1f}M parameters, {world} rank(s), "
           f"{'bf16' if policy.compute_dtype else 'fp32'} compute over fp32 weights, {setup}, start at step {step}")

    if R.is_distributed():
        R.shard(policy)
    fused = policy.device.type == "cuda" and not R.is_distributed()  # one kernel per step (not for FSDP's shards)
    opt = torch.optim.AdamW([p for n, p in policy.named_parameters() if not n.startswith("value_head.")],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if resume_from:
        R.restore(policy, opt, resume_from, state, print0)
    health = R.Divergence(cfg.out, cfg.lr)

    # ---- loop ----
    policy.train()
    # the bar closes on an error too, so that its one line starts a line of its own
    with (R.MetricsLog(cfg.out, step, rank) as log,
          tqdm(total=cfg.steps, initial=step, desc=f"sft {cfg.task}", disable=rank != 0) as bar):
        started = time.perf_counter()
        while step < cfg.steps:
            t0 = time.perf_counter()
            order = data_order(len(encoded), cfg.seed, step * cfg.batch_size, cfg.batch_size)
            mine = [encoded[i] for i in order[rank * per_rank:(rank + 1) * per_rank]]
            step_tokens = R.all_reduce_sum(sum(len(r) for _, r in mine))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            nll_sum, seen = 0.0, 0
            for i in range(0, len(mine), cfg.micro_batch):
                chunk = mine[i:i + cfg.micro_batch]
                batch = policy.collate([p for p, _ in chunk], [r for _, r in chunk])
                loss, nll = sft_loss(policy, batch, step_tokens / world)  # FSDP averages over ranks: x world
                loss.backward()
                nll_sum += float(nll)
                seen += int(batch["attention_mask"].sum())  # real tokens read and trained on, padding excluded
            params = [p for g in opt.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            loss_mean = R.all_reduce_sum(nll_sum) / step_tokens
            applied = math.isfinite(loss_mean) and math.isfinite(float(grad_norm))  # else skipped: never applied
            if applied:
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            step_seen = R.all_reduce_sum(seen)
            tokens += int(step_seen)
            gflops += 6 * n_params * step_seen / 1e9
            secs = time.perf_counter() - t0
            metrics = {"step": step, "loss": loss_mean, "learning_rate": lr_at(step - 1, cfg),
                       "grad_norm": float(grad_norm), "skipped_steps": health.skipped + (not applied),
                       "tokens": tokens, "gflops": gflops, "tokens_per_s": step_seen / secs}
            log.write(metrics)
            health.step(applied, step, params)
            bar.set_postfix(loss=f"{loss_mean:.4f}", tok_s=f"{step_seen / secs:.0f}")
            bar.update(1)
            trainer_state = {"step": step, "tokens": tokens, "gflops": gflops, "kind": "sft", "task": cfg.task,
                             "init": init, "config": asdict(cfg)}
            if R.step_done(policy, opt, cfg.out, step, cfg.steps, cfg.save_every, cfg.time_limit, started,
                           trainer_state, print0, health):
                break
    R.leave_distributed()
    return {"step": step, "gflops": gflops, "tokens": tokens}


if __name__ == "__main__":
    main(SFTConfig, train)
