"""Measured speed: rollouts, PPO training steps and environments, each against a reference in the same run;
and the GPU acceptance check, which runs the GPU tests first and sets every figure beside its target.

    python bench.py                       # CPU: embedded default, rollout batch 32; or the GPU at 128 and 512
    python bench.py --sections env        # only the environments
    python bench.py --quick               # tiny model, small sizes: the test suite's smoke run (< 1 minute)
    python bench.py --gpu-check           # tests/test_gpu.py, then rollout, decode and train at the targets'
                                          # sizes, within 9 minutes, into runs/gpu_check.jsonl (make gpu-check)

Prints a table and one JSON line per figure ({"figure", "value", "unit", ...}); `--out FILE` appends
the JSON lines to a file too. Figures:

- rollout: the process's first rollout and the same again (the first pays for the device's set-up), then
  the project's batched multi-turn rollout (`rollout.rollout`, sequential revision, one
  batched generate per round) against the paper's approach, one conversation at a time with a
  plain Hugging Face `generate` on one prompt: generated tokens/s and episodes/s of each and their
  ratio, on the same GeneralPoints episodes (same seeds), model, temperature and token limit.
  Ratios are measured inside one run, so a noisy machine cannot fake them.
- decode: ms per decode step of Hugging Face `generate` and of the engine (eager, compiled), the engine's
  tokens/s and its ratio to `generate`, and a multi-turn rollout through the engine against raw decode.
- train: a PPO epoch (`train_ppo.ppo_update`) over GeneralPoints turns: tokens/s; on a GPU also
  model FLOPs utilization, 6 x parameters x tokens / time / the GPU's dense bf16 peak, and peak memory;
  for the model and, on a GPU, a random-weight model of Llama-3.2-1B's shape (built locally).
- env: GeneralPoints reset + verify, V-IRL steps, and images rendered (GP-VL cards, V-IRL-VL 2x2 street-view
  grids), per CPU-second of one thread (time.process_time: a busy machine does not change it).
- host: what a rollout round costs the host besides the model: the prefix cache's tensor operations per round at
  SmolLM2-135M's key/value shape (on the meta device: shapes, no memory), batch 512 (quick: 64) against 16, and a
  GP-L rollout's host milliseconds per round at batch 512 (quick: 16) with tiny-text, in CPU time of one thread,
  outside the model (Hugging Face's generate and the forward passes) and bulk tensor work (`host_ms_per_round`):
  what stays on the CPU when a GPU runs the rest.
- memory: estimated GPU memory per rank of training with fp32 master weights and bf16 compute
  (`runs.training_memory`, its formula in the docstring): the model on one GPU, and the paper's 11B model
  on 8 GPUs under FSDP2 and, for contrast, on one.

Rollouts and training run with the training precision (`--precision auto`: bf16 compute over fp32
weights on a GPU), as train_ppo.py does.

`--gpu-check` writes one report: an `environment` row (date, device, torch, transformers, commit), a row per
test of `--check-tests` (value passed, failed or skipped; the tests append what they measured), the sections'
figures, a `target_<figure>` row per target of TARGETS (value, target, met: true, false, or null when not
measured or when a speed target ran on CPU) and a `skipped` row per part it did not run, with the reason: a
GPU-only part on CPU, or the deadline. Figures are written as they are measured, so a deadline or a crash
keeps them. It exits 1 when a test failed; targets are reported, not asserted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

import model as M
import model_zoo as Z
import runs as R
import train_ppo as P
from env_points import GeneralPointsEnv, PointsConfig
from env_virl import NavigationEnv, VirlConfig
from rollout import action_field, make_envs, rollout
from runs import check_writable, main, require

# dense bf16 tensor-core peaks (FLOP/s) of the GPUs we may run on, from the vendors' datasheets
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
LLAMA_1B_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                      tie_word_embeddings=True)
# the paper's backbone, Llama-3.2-11B-Vision-Instruct, as published (MllamaConfig): for memory estimates, built
# on the meta device only (10.67B parameters)
LLAMA_11B_VISION_SHAPE = dict(
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                       attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4, vision_output_dim=7680,
                       intermediate_layers_indices=[3, 7, 15, 23, 30],
                       supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]),
    text_config=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                     cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], max_position_embeddings=131072,
                     tie_word_embeddings=False),
    image_token_index=128256)
# (label, model, ranks, micro-batch tokens T and response tokens R per rank) of the memory section: the README's
# one-GPU PPO command (16 turns of up to 512 tokens with 128-token answers), and the paper's 11B model on
# 8 GPUs with its official micro-batches: PPO 1 turn (up to 2048 tokens, 512-token answers), SFT 16 examples
SECTIONS = "rollout, decode, train, env, host, memory"
CHECK_SECTIONS = "rollout,decode,train"
# default sizes by (mode, on a GPU): rollout batches, one-at-a-time episodes, decode batch, PPO epoch turns and
# micro-batch. The check's GPU sizes are the targets' (batch 512, 256 turns); on CPU it runs small ones.
SIZES = {("quick", False): dict(batch="4", baseline_episodes=2, decode_batch=64, train_turns=4, micro_batch=2),
         ("plain", False): dict(batch="32", baseline_episodes=8, decode_batch=64, train_turns=16, micro_batch=4),
         ("plain", True): dict(batch="128,512", baseline_episodes=32, decode_batch=64, train_turns=256,
                               micro_batch=32),
         ("check", False): dict(batch="8", baseline_episodes=2, decode_batch=16, train_turns=8, micro_batch=4),
         ("check", True): dict(batch="512", baseline_episodes=8, decode_batch=512, train_turns=256, micro_batch=32)}
SIZES["quick", True] = SIZES["quick", False]
# the GPU acceptance targets on one H100 / H200 (issue 26): (figure, ">=" or "<=", target, a speed target). The
# first two are measured by tests/test_gpu.py and hold on any device; speed targets are judged on a GPU only.
# "{model}" is the check's model (its folder's name).
TARGETS = (("ppo_1_update_changed_share", ">=", 0.90, False),            # one PPO update at lr 1e-6, bf16 compute
           ("generate_score_gap_max_smollm2-135m", "<=", 0.25, False),   # nats per token, training numerics
           ("decode_engine_compiled_tokens_per_s", ">=", 100_000, True),  # SmolLM2-135M's shape, batch 512
           ("decode_engine_compiled_vs_plain", ">=", 15.0, True),        # against Hugging Face generate, same batch
           ("rollout_engine_vs_raw_decode", ">=", 0.5, True),            # multi-turn GP-L rollout, batch 512
           ("train_llama-1b-shape_mfu", ">=", 0.40, True),               # PPO epoch, bf16
           ("train_{model}_mfu", ">=", 0.15, True),
           ("rollout_first_s", "<=", 30.0, True))                        # the process's first rollout
ROOT = os.path.dirname(os.path.abspath(__file__))
MEMORY_CASES = (("ppo, 1 GPU", "", 1, 16 * 512, 16 * 128),
                ("ppo, 8 GPUs", "llama-3.2-11b-vision", 8, 2048, 512),
                ("sft, 8 GPUs", "llama-3.2-11b-vision", 8, 16 * 512, 16 * 64),
                ("ppo, 1 GPU", "llama-3.2-11b-vision", 1, 2048, 512))


@dataclass
class BenchConfig:
    """Throughput benchmarks: rollouts, PPO training steps, environments; and the GPU acceptance check."""
    sections: str = ""
    """comma-separated subset of rollout, decode, train, env, memory; empty: all (--gpu-check: rollout, decode,
    train)"""
    model: str = "smollm2-135m"
    """model name or folder for rollout and train"""
    batch: str = ""
    """rollout batch sizes, comma-separated; empty: 32 on CPU, 128,512 on a GPU (--gpu-check: 512, CPU 8)"""
    baseline_episodes: int = 0
    """episodes of the one-at-a-time loop; 0: 8 on CPU, 32 on a GPU (--gpu-check: 8, CPU 2)"""
    decode_batch: int = 0
    """batch of the decode section; 0: 64 (--gpu-check: 512, CPU 16)"""
    compile: bool = True
    """decode section: also time the compiled engine (torch.compile; CUDA graphs on a GPU)"""
    max_new_tokens: int = 64
    """longest answer, the same in both rollouts"""
    cache_tokens: Optional[int] = None
    """prefix cache of the batched rollout, in tokens; 0: off; default: sized from the batch"""
    temperature: float = 0.2
    """sampling temperature (the paper's)"""
    train_turns: int = 0
    """turns in the timed PPO epoch; 0: 16 on CPU, 256 on a GPU (--gpu-check: 256, CPU 8)"""
    micro_batch: int = 0
    """turns per forward in training; 0: 4 on CPU, 32 on a GPU"""
    llama_1b: bool = True
    """on a GPU, also time training on a random Llama-3.2-1B-shaped model"""
    env_seconds: float = 3.0
    """seconds per environment figure"""
    quick: bool = False
    """tiny model and small sizes: every figure in under a minute on CPU"""
    gpu_check: bool = False
    """the GPU acceptance run: --check-tests first, then rollout, decode and train at the targets' sizes, each
    target's row, within --deadline-minutes, into one report (--out); on CPU what runs there, the rest skipped"""
    check_tests: str = "tests/test_gpu.py"
    """--gpu-check: pytest arguments of the tests it runs first, paths from the repository's root, e.g.
    "tests/test_gpu.py -k tiny"; empty: none"""
    deadline_minutes: Optional[float] = None
    """stop after this many minutes, keeping every figure measured so far (None: 9 under --gpu-check, else none;
    0: none)"""
    profile: str = ""
    """a folder: also write torch.profiler tables (top operators by self time) of one decode call of the plain
    path and of the last engine, and of one PPO epoch"""
    out: str = ""
    """also append the JSON lines to this file (--gpu-check: runs/gpu_check.jsonl when empty)"""
    device: str = ""
    """cuda, cpu; empty: the GPU when there is one"""

    def __post_init__(self):
        wanted = [s.strip() for s in self.sections.split(",") if s.strip()]
        bad = [s for s in wanted if s not in SECTIONS.split(", ")]
        if bad or (self.sections.strip() and not wanted):
            raise ValueError(f"sections={self.sections!r}: expected a comma-separated subset of {SECTIONS}")
        self.sections = ",".join(wanted) or (CHECK_SECTIONS if self.gpu_check else SECTIONS.replace(" ", ""))
        try:
            sizes = [int(b) for b in self.batch.split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"batch={self.batch!r}: expected comma-separated positive integers") from None
        if any(b < 1 for b in sizes):
            raise ValueError(f"batch={self.batch!r}: expected comma-separated positive integers")
        require(self, "max_new_tokens", lambda v: v >= 1, "a positive integer")
        require(self, "baseline_episodes cache_tokens train_turns micro_batch decode_batch", lambda v: v >= 0,
                "0 (the default) or a positive integer")
        require(self, "temperature env_seconds", lambda v: v > 0, "a positive number")
        require(self, "deadline_minutes", lambda v: v >= 0, "0 (none) or a positive number of minutes")
        if self.deadline_minutes is None:
            self.deadline_minutes = 9.0 if self.gpu_check else 0.0
        try:
            shlex.split(self.check_tests)
        except ValueError as e:
            raise ValueError(f"check_tests={self.check_tests!r}: {e}") from None
        M.check_device(self.device)
        if self.gpu_check and "RANK" in os.environ:
            raise ValueError("gpu_check under torchrun: run `python bench.py --gpu-check` as one process (its tests "
                             "start torchrun themselves)")
        if self.gpu_check and not self.out:
            self.out = os.path.join("runs", "gpu_check.jsonl")
        if self.out:
            check_writable(self.out, file=True)  # a file to append the JSON lines to
        if self.profile:
            check_writable(self.profile, "profile")

    def sized(self, gpu: bool) -> "BenchConfig":
        """This config with every size left at 0 / empty set to its mode's default (SIZES)."""
        mode = "quick" if self.quick else "check" if self.gpu_check else "plain"
        return dataclasses.replace(self, **{k: v for k, v in SIZES[mode, gpu].items() if not getattr(self, k)})


def emit(rows: list, out: str, figure: str, value: float, unit: str, **extra) -> None:
    """Print one figure as a JSON line and keep it for the table."""
    row = {"figure": figure, "value": round(value, 4) if isinstance(value, float) else value, "unit": unit, **extra}
    rows.append(row)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def profiled(fn, folder: str, label: str, device) -> None:
    """Run fn once under torch.profiler and write its top operators by self time (device time on a GPU) to
    folder/profile_<label>.txt."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        synchronize(device)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"profile_{label}.txt")
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=30, max_name_column_width=60))
    print(f"profile of {label}: {path}", flush=True)


# ---- rollouts ----

def batched_rollout(policy, n_episodes: int, batch: int, cfg: BenchConfig, seed: int):
    """(generated tokens, episodes, seconds, share of prompt tokens served by the prefix cache) of the
    project's rollout on episodes seed, seed + 1, ..."""
    envs = make_envs("gp-l", "id", batch, seed=0)
    synchronize(policy.device)
    start = time.perf_counter()
    ro = rollout(policy, envs, n_episodes=n_episodes, reset=lambda env, k: env.reset(seed=seed + k),
                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, cache_tokens=cfg.cache_tokens)
    synchronize(policy.device)
    secs = time.perf_counter() - start
    prompt_tokens = sum(t.prompt["input_ids"].shape[1] for t in ro.turns)
    return sum(len(t.response_ids) for t in ro.turns), len(ro.episodes), secs, ro.cached_tokens / max(prompt_tokens, 1)


def one_at_a_time_rollout(policy, n_episodes: int, cfg: BenchConfig, seed: int):
    """The paper's approach: each conversation alone, a plain Hugging Face generate on one prompt per
    attempt, the same sequential revision. -> (generated tokens, episodes, seconds)"""
    env = GeneralPointsEnv(PointsConfig(), seed=0)
    tok, generated = policy.tokenizer, 0
    synchronize(policy.device)
    start = time.perf_counter()
    for k in range(n_episodes):
        conversation, done = [{"role": "user", "content": env.reset(seed=seed + k).text}], False
        while not done:
            ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"].to(policy.device)
            with policy.autocast():  # the same compute precision as the batched rollout
                out = policy.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                            temperature=cfg.temperature, top_p=1.0, top_k=None,
                                            max_new_tokens=cfg.max_new_tokens, eos_token_id=policy.stop_ids,
                                            pad_token_id=policy.pad_id)
            new = out[0, ids.shape[1]:]
            generated += len(new)
            text = tok.decode(new, skip_special_tokens=True)
            obs, _, done, _ = env.step(text)
            conversation += [{"role": "assistant", "content": text}, {"role": "user", "content": obs.text}]
    synchronize(policy.device)
    return generated, n_episodes, time.perf_counter() - start


def bench_first_rollout(policy, cfg: BenchConfig, rows: list) -> None:
    """The process's first rollout after loading the model, and the same again: the first pays for the kernels'
    and attention's set-up of every new shape."""
    for call in ("first", "second"):
        _, episodes, secs, _ = batched_rollout(policy, 8, 8, cfg, seed=30_000)
        emit(rows, cfg.out, f"rollout_{call}_s", secs, "s", batch=8, episodes=episodes)


def bench_rollout(policy, cfg: BenchConfig, rows: list, gpu: bool) -> None:
    sizes = [int(b) for b in cfg.batch.split(",") if b.strip()]
    tokens, episodes, secs = one_at_a_time_rollout(policy, cfg.baseline_episodes, cfg, seed=10_000)
    single_tps, single_eps = tokens / secs, episodes / secs
    emit(rows, cfg.out, "rollout_one_at_a_time_tokens_per_s", single_tps, "tokens/s", episodes=episodes)
    emit(rows, cfg.out, "rollout_one_at_a_time_episodes_per_s", single_eps, "episodes/s", episodes=episodes)
    for b in sizes:
        tokens, episodes, secs, cached = batched_rollout(policy, b, b, cfg, seed=10_000)
        emit(rows, cfg.out, f"rollout_batched_{b}_tokens_per_s", tokens / secs, "tokens/s", batch=b, episodes=episodes)
        emit(rows, cfg.out, f"rollout_batched_{b}_episodes_per_s", episodes / secs, "episodes/s", batch=b)
        emit(rows, cfg.out, f"rollout_batched_{b}_speedup_tokens", tokens / secs / single_tps, "x", batch=b)
        emit(rows, cfg.out, f"rollout_batched_{b}_speedup_episodes", episodes / secs / single_eps, "x", batch=b)
        emit(rows, cfg.out, f"rollout_batched_{b}_prompt_tokens_cached", cached, "fraction", batch=b,
             cache_tokens=cfg.cache_tokens)


# ---- the decoding engine ----

def step_ms(generate, steps: int = 32) -> float:
    """Milliseconds per decode step of generate(max_new_tokens): the difference between 1 + steps new tokens and
    1, so that the prefill cancels out (answers must not stop early: see bench_decode)."""
    generate(1), generate(1 + steps)  # warm-up: allocations, kernels, compilation
    start = time.perf_counter()
    generate(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    generate(1 + steps)
    return (time.perf_counter() - start - one) / steps * 1000


def bench_decode(policy, cfg: BenchConfig, rows: list, gpu: bool) -> None:
    """One batch of GP-L prompts: ms per decode step of the plain path (Hugging Face generate) and of the engine,
    eager and compiled; the engine's raw decode tokens/s; and a multi-turn rollout through the engine at the same
    batch against that raw rate."""
    import engine as E
    b = cfg.decode_batch
    env = GeneralPointsEnv(PointsConfig(), seed=0)
    prompts = [policy.encode([{"role": "user", "content": env.reset().text}]) for _ in range(b)]
    stops, policy.stop_ids = policy.stop_ids, [policy.model.config.vocab_size + 1]  # no answer stops early
    extra = {"batch": b, "model": os.path.basename(policy.model.name_or_path.rstrip("/"))}
    try:
        def plain_generate(n):
            return policy.generate(None, prompts=prompts, max_new_tokens=n, temperature=cfg.temperature)
        plain = step_ms(plain_generate)
        emit(rows, cfg.out, "decode_plain_step_ms", plain, "ms", **extra)
        emit(rows, cfg.out, "decode_plain_tokens_per_s", b * 1000 / plain, "tokens/s", **extra)
        variants = [("engine", False)] + ([("engine_compiled", True)] if cfg.compile and not cfg.quick else [])
        for label, compile in variants:
            engine = E.Engine(policy, compile=compile)
            ms = step_ms(lambda n: engine.generate(prompts, max_new_tokens=n, temperature=cfg.temperature))
            emit(rows, cfg.out, f"decode_{label}_step_ms", ms, "ms", **extra)
            emit(rows, cfg.out, f"decode_{label}_tokens_per_s", b * 1000 / ms, "tokens/s", **extra)
            emit(rows, cfg.out, f"decode_{label}_vs_plain", plain / ms, "x", **extra)
            emit(rows, cfg.out, f"decode_{label}_warmup_s", engine.warmup_s, "s", **extra)
        if cfg.profile:
            profiled(lambda: plain_generate(33), cfg.profile, "decode_plain", policy.device)
            profiled(lambda: engine.generate(prompts, max_new_tokens=33, temperature=cfg.temperature), cfg.profile,
                     f"decode_{label}", policy.device)
    finally:
        policy.stop_ids = stops
    policy.engine = engine  # the last (compiled when asked) engine, for a rollout at raw decode's batch
    try:
        tokens, episodes, secs, _ = batched_rollout(policy, b, b, cfg, seed=20_000)
    finally:
        policy.engine = None
    emit(rows, cfg.out, "rollout_engine_tokens_per_s", tokens / secs, "tokens/s", **extra)
    emit(rows, cfg.out, "rollout_engine_vs_raw_decode", tokens / secs / (b * 1000 / ms), "fraction", **extra)


# ---- training ----

def gp_turns(policy, n: int) -> P.Batch:
    """n GeneralPoints turns as PPO sees them: real prompts, expert-length answers, seeded advantages."""
    env = GeneralPointsEnv(PointsConfig(), seed=0)
    prompts, responses = [], []
    for _ in range(n):
        obs = env.reset()
        prompts.append(policy.encode([{"role": "user", "content": obs.text}]))
        responses.append(policy.response_ids(env.expert_response()))
    old, _ = P.score_turns(policy, prompts, responses, micro_batch=8)
    weights = [P.action_weights(policy.tokenizer, r, action_field("gp-l"), 0.5) for r in responses]
    g = torch.Generator().manual_seed(0)
    advantages, returns = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return P.Batch(prompts, responses, old, weights, torch.zeros(n), advantages, returns)


def bench_train(name: str, label: str, cfg: BenchConfig, rows: list, device, gpu: bool) -> None:
    torch.manual_seed(0)
    policy = M.load_policy(name, device=device, temperature=cfg.temperature, precision="auto")
    n_params = policy.model.num_parameters()
    turns, micro = cfg.train_turns, cfg.micro_batch
    ppo = P.PPOConfig(model=name, turns=turns, minibatch=turns, micro_batch=micro, epochs=1, out="unused")
    batch = gp_turns(policy, turns)
    opt = P.build_optimizer(policy, ppo)
    policy.train()
    P.ppo_update(policy, opt, P.Batch(*[x[:micro] for x in (batch.prompts, batch.responses, batch.old_logprobs,
                                                             batch.weights, batch.old_values, batch.advantages,
                                                             batch.returns)]),
                 P.PPOConfig(model=name, turns=micro, minibatch=micro, micro_batch=micro, epochs=1, out="unused"),
                 update=0, world=1)  # warm-up: allocator, kernels, optimizer state
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    sums = P.ppo_update(policy, opt, batch, ppo, update=1, world=1)
    synchronize(device)
    secs = time.perf_counter() - start
    tokens = sums["trained_tokens"]
    extra = {"model": label, "params_m": round(n_params / 1e6, 1), "turns": turns, "micro_batch": micro}
    emit(rows, cfg.out, f"train_{label}_tokens_per_s", tokens / secs, "tokens/s", **extra)  # real tokens only
    emit(rows, cfg.out, f"train_{label}_padding_share", 1 - tokens / sums["computed_tokens"], "fraction", **extra)
    if gpu:
        name_gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK.items() if k in name_gpu), None)
        if peak:
            emit(rows, cfg.out, f"train_{label}_mfu", 6 * n_params * tokens / secs / peak, "fraction of bf16 peak",
                 gpu=name_gpu, **extra)
        emit(rows, cfg.out, f"train_{label}_peak_memory", torch.cuda.max_memory_allocated() / 2**30, "GiB", **extra)
    else:
        emit(rows, cfg.out, f"train_{label}_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
             "GiB", **extra)
    if cfg.profile:
        profiled(functools.partial(P.ppo_update, policy, opt, batch, ppo, update=2, world=1), cfg.profile,
                 f"train_{label}", device)
    del policy, opt


# ---- memory ----

def meta_model(name: str):
    """A model of `name`'s shape on the meta device (no memory, no weights): a model name or folder, or
    "llama-3.2-11b-vision" for the paper's backbone."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, MllamaConfig
    if name == "llama-3.2-11b-vision":
        config = MllamaConfig(**LLAMA_11B_VISION_SHAPE)
    else:
        config = AutoConfig.from_pretrained(M.resolve(name))
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def bench_memory(cfg: BenchConfig, rows: list) -> None:
    for label, name, world, tokens, response_tokens in MEMORY_CASES:
        name = name or ("tiny-text" if cfg.quick else cfg.model)
        est = R.training_memory(meta_model(name), world, tokens, response_tokens)
        emit(rows, cfg.out, f"memory_{os.path.basename(name.rstrip('/'))}_{world}gpu_{label.split(',')[0]}",
             est["total"], "GiB per GPU (estimate)", ranks=world, tokens=tokens, response_tokens=response_tokens,
             **{k: round(x, 2) for k, x in est.items() if k != "total"})


# ---- the host's work per round ----

class OpCounter:
    """Counts the aten operations dispatched inside its `with` block: on a GPU each is a kernel launch (or more)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            def __torch_dispatch__(mode, func, types, args=(), kwargs=None):
                self.ops += 1
                return func(*args, **(kwargs or {}))
        self.ops, self.mode = 0, Count()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def prefix_cache_round_ops(batch: int, shared: int = 256, own: int = 64, answer: int = 64, feedback: int = 32) -> int:
    """Tensor operations of the prefix cache in one round at SmolLM2-135M's key/value shape (30 layers, 3 key/value
    heads of 64), on the meta device: every row's previous prompt (`shared` instruction tokens, `own` of its own)
    and answer are cached; serving the next prompts (previous + answer + feedback) and remembering the round."""
    from types import SimpleNamespace
    model = meta_model("smollm2-135m")
    policy = SimpleNamespace(model=model, pad_id=0, device=torch.device("meta"))
    layers, heads, dim = M.kv_shape(model.config)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(10, 40_000, (shared,), generator=g)
    first = [torch.cat([prefix, torch.randint(10, 40_000, (own + answer,), generator=g)]) for _ in range(batch)]
    cache = M.PrefixCache(max_tokens=4 * batch * (shared + own + answer + feedback))
    states = [(torch.empty(sum(map(len, first)), heads, dim, device="meta"),) * 2 for _ in range(layers)]
    cache.store([], [x.numpy() for x in first], states)
    prompts = [{"input_ids": torch.cat([x, torch.randint(10, 40_000, (feedback,), generator=g)])[None]}
               for x in first]
    matches = cache.match_all(M.prompt_ids(prompts))
    with OpCounter() as count:
        inputs = M.generation_inputs(policy, prompts, cache, matches, answer)
    width = inputs["input_ids"].shape[1]
    samples = [SimpleNamespace(prompt=p, response_ids=torch.randint(10, 40_000, (answer,), generator=g))
               for p in prompts]
    kv = SimpleNamespace(layers=[SimpleNamespace(keys=torch.empty(batch, heads, width + answer, dim, device="meta"),
                                                 values=torch.empty(batch, heads, width + answer, dim, device="meta"))
                                 for _ in range(layers)], get_seq_length=lambda: width + answer)
    mask = M.cached_layout(prompts, matches, 0)[1]  # the attention mask as data (on the meta device it has none)
    with OpCounter() as count2:
        M.remember(cache, samples, matches, mask, kv)
    return count.ops + count2.ops


BULK = 1 << 16  # elements of a result from which an operation outside the model counts as bulk tensor work


def host_ms_per_round(policy, batch: int, rounds: int, max_new_tokens: int) -> dict:
    """What one round of a GP-L rollout at `batch` costs the host, in CPU time of one thread (time.process_time):
    `model_ms`, Hugging Face's `generate` (forward passes, sampling and its per-step glue) and the forward passes
    outside it (a shared prefix): device work on a GPU; `bulk_ms`, the other tensor operations with a result of
    BULK elements or more (the prefix cache's copies, the key/value cache's allocation: on a GPU kernels, each
    launched in microseconds), `bulk_ops` of them; `host_ms`, the rest: encoding, the prefix cache's bookkeeping,
    the environments, the rollout's own, with `small_ops` tensor operations on small (CPU) tensors. After one
    warm-up round on other deals, the same seeded rollout runs twice: plain, timed, and with every tensor operation
    counted (which costs time itself)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    spent = {"model": 0.0, "inside": False, "bulk": 0.0, "bulk_ops": 0, "small_ops": 0}

    def timed(fn):
        def run(*args, **kwargs):
            if spent["inside"]:
                return fn(*args, **kwargs)
            spent["inside"], start = True, time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["model"] += time.process_time() - start
                spent["inside"] = False
        return run

    class Bulk(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if spent["inside"]:
                return func(*args, **(kwargs or {}))
            start = time.process_time()
            out = func(*args, **(kwargs or {}))
            if max((t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)), default=0) >= BULK:
                spent["bulk"] += time.process_time() - start
                spent["bulk_ops"] += 1
            else:
                spent["small_ops"] += 1
            return out

    def play(mode) -> float:
        torch.manual_seed(0)
        envs = make_envs("gp-l", "id", batch, seed=0)
        start = time.process_time()
        with mode:
            rollout(policy, envs, n_turns=batch * rounds, max_new_tokens=max_new_tokens, temperature=1.0)
        return time.process_time() - start
    # one round first, on other deals, as a long run has played them: its tokenizer has seen the task's lines
    rollout(policy, make_envs("gp-l", "id", batch, seed=10**6), n_turns=batch, max_new_tokens=max_new_tokens,
            temperature=1.0)
    body, generate = policy.model.model, policy.model.generate
    body.forward, policy.model.generate = timed(body.forward), timed(generate)
    try:
        total = play(contextlib.nullcontext())
        model, spent["model"] = spent["model"], 0.0
        play(Bulk())
    finally:
        del body.forward, policy.model.generate  # the class's own again
    return {"host_ms": 1000 * (total - model - spent["bulk"]) / rounds, "bulk_ms": 1000 * spent["bulk"] / rounds,
            "model_ms": 1000 * model / rounds, "bulk_ops": spent["bulk_ops"] / rounds,
            "small_ops": spent["small_ops"] / rounds}


def bench_host(cfg: BenchConfig, rows: list) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: what the host would spend beside a GPU
    try:
        large = 64 if cfg.quick else 512
        small_ops, large_ops = prefix_cache_round_ops(16), prefix_cache_round_ops(large)
        emit(rows, cfg.out, "host_prefix_cache_ops_16", small_ops, "aten ops/round")
        emit(rows, cfg.out, f"host_prefix_cache_ops_{large}", large_ops, "aten ops/round")
        emit(rows, cfg.out, f"host_prefix_cache_ops_{large}_vs_16", large_ops / small_ops, "x")
        batch = 16 if cfg.quick else 512
        if not cfg.quick:  # hands dealt as a long run has dealt them: the solver's cache is the steady state
            gp = GeneralPointsEnv(PointsConfig(), seed=0)
            for _ in range(20_000):
                gp.reset()
        # 5 rounds: with a random model every GP-L episode takes its 5 attempts, so a new prompt comes every 5th round
        cost = host_ms_per_round(M.load_policy("tiny-text"), batch, 2 if cfg.quick else 5, 8 if cfg.quick else 16)
        emit(rows, cfg.out, f"host_rollout_ms_per_round_{batch}", cost.pop("host_ms"), "CPU-ms/round",
             model="tiny-text", **{k: round(v, 1) for k, v in cost.items()})
    finally:
        torch.set_num_threads(threads)


# ---- environments ----

def rate(fn, seconds: float) -> float:
    """Calls of fn per CPU-second of this process over about `seconds` of it: what a busy machine does not change."""
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for _ in range(50):
            fn()
        n += 50
    return n / (time.process_time() - start)


def bench_env(cfg: BenchConfig, rows: list) -> None:
    torch.set_num_threads(1)  # one core; the environments are pure Python and Pillow anyway
    seconds = 0.3 if cfg.quick else cfg.env_seconds
    gp = GeneralPointsEnv(PointsConfig(), seed=0)
    answers = {}

    def gp_reset_verify():
        gp.reset()
        gp.step(answers.setdefault(tuple(gp.ranks), gp.expert_response()))  # verify a (cached) correct answer
    gp.reset()
    for _ in range(20_000):  # solve every hand once, as a long run has: then the rate is the steady state
        gp_reset_verify()
    emit(rows, cfg.out, "env_gp_reset_verify_per_s", rate(gp_reset_verify, seconds), "resets+verifies/CPU-s")

    virl = NavigationEnv(VirlConfig(), seed=0)
    state = {"done": True}

    def virl_step():
        if state["done"]:
            virl.reset()
        _, _, state["done"], _ = virl.step(virl.expert_response())
    emit(rows, cfg.out, "env_virl_steps_per_s", rate(virl_step, seconds), "steps/CPU-s")

    gp_vl = GeneralPointsEnv(PointsConfig(vision=True), seed=0)
    for _ in range(500):  # every card drawn once at every place (208 tiles), as a long run has: the steady state
        gp_vl.reset()
    emit(rows, cfg.out, "env_gp_vl_images_per_s", rate(gp_vl.reset, seconds), "images/CPU-s")
    virl_vl = NavigationEnv(VirlConfig(vision=True), seed=0)
    emit(rows, cfg.out, "env_virl_vl_grids_per_s", rate(virl_vl.reset, seconds), "2x2 view grids/CPU-s")


# ---- the GPU acceptance check ----

class DeadlineReached(BaseException):
    """The run's deadline passed (SIGALRM, wherever the run was): a BaseException, so that no `except Exception`
    on the way swallows it."""


@contextlib.contextmanager
def deadline(minutes: float):
    """Raise DeadlineReached in the main thread after `minutes` (0: never)."""
    if not minutes:
        yield
        return

    def expire(signum, frame):
        raise DeadlineReached(f"deadline of {minutes:g} minutes reached")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, minutes * 60)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def model_label(cfg: BenchConfig) -> str:
    """The name figures carry for the run's model: its folder's name (tiny-text under --quick)."""
    return "tiny-text" if cfg.quick else os.path.basename(cfg.model.rstrip("/"))


def environment(cfg: BenchConfig, rows: list, device) -> None:
    """The report's first row: the date, the device and the versions the figures were measured with."""
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.device(device).type == "cuda"
    emit(rows, cfg.out, "environment", time.strftime("%Y-%m-%d %H:%M"), "date",
         device=torch.cuda.get_device_name(device) if gpu else f"CPU, {os.cpu_count()} cores",
         torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
         python=platform.python_version(), commit=commit, model=model_label(cfg))


def rows_after(path: str, start: int) -> list:
    """The JSON rows appended to the file at `path` after byte `start`; a line cut short by a killed writer is
    left out."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, errors="replace") as f:
        f.seek(start)
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def stop(child: subprocess.Popen) -> None:
    """Stop a child and its process group: SIGTERM first, which torchrun passes on to its workers (they run in
    sessions of their own, out of the group's reach), then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        try:
            child.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def child_device_env(device) -> dict:
    """Environment variables that put the check's tests on `device`: SFTRL_CHECK_DEVICE (tests/test_gpu.py runs
    there even without CUDA) and, for cuda:N, only that GPU visible (torchrun's rank 0 takes the first)."""
    d = torch.device(device)
    if d.type != "cuda" or d.index is None:
        return {"SFTRL_CHECK_DEVICE": d.type}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return {"SFTRL_CHECK_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ids[d.index]}


def check_tests(cfg: BenchConfig, rows: list, device) -> None:
    """cfg.check_tests under pytest in a child process: a `test` row per test (passed, failed or skipped, with
    the reason), after the figures the tests measured, which they append to the report themselves
    (SFTRL_CHECK_REPORT). The tests run on the check's device: without CUDA, on the CPU under bf16 autocast."""
    import importlib.util
    import tempfile
    import xml.etree.ElementTree as ET
    if importlib.util.find_spec("pytest") is None:
        raise RuntimeError("pytest is not installed (pip install pytest): the check's tests cannot run")
    report = os.path.abspath(cfg.out)
    start = os.path.getsize(report) if os.path.exists(report) else 0
    env = {**os.environ, "SFTRL_CHECK_REPORT": report, **child_device_env(device)}
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *shlex.split(cfg.check_tests)]
        print("$ python " + shlex.join(cmd[1:]), flush=True)
        child = None
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated check stops its child
        try:
            child = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)  # its own process group
            code = child.wait()
        except BaseException:
            if child is not None:
                stop(child)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            rows.extend(rows_after(report, start))   # what the tests measured, by the deadline too
        cases = ET.parse(junit).getroot().iter("testcase") if os.path.exists(junit) else []
        for case in cases:
            outcome = next(((tag, el.get("message") or "") for tag in ("failure", "error", "skipped")
                            for el in case.findall(tag)), ("passed", ""))
            value = {"failure": "failed", "error": "failed"}.get(outcome[0], outcome[0])
            where = case.get("classname", "").removeprefix("tests.")
            emit(rows, cfg.out, f"test {where}::{case.get('name')}", value, "test",
                 **({"reason": outcome[1].splitlines()[0][:300]} if outcome[1] else {}))
    if code not in (0, 1):  # 1: some test failed (rows above); others: pytest itself could not run them
        emit(rows, cfg.out, "tests", "failed", "test", reason=f"pytest exited with code {code} ({cfg.check_tests})")


def report_targets(cfg: BenchConfig, rows: list, device) -> None:
    """A `target_<figure>` row per target: the measured value (the last one), the target and whether it was met;
    met is null when the figure was not measured, or for a speed target measured elsewhere than an H100 / H200."""
    gpu = torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else "a CPU"
    target_gpu = any(g in name for g in ("H100", "H200"))
    measured = {r["figure"]: r for r in rows}
    for figure, op, target, speed in TARGETS:
        figure = figure.format(model=model_label(cfg))
        row = measured.get(figure)
        value = row["value"] if row else None
        met = None
        if value is not None and (target_gpu or not speed):
            met = value >= target if op == ">=" else value <= target
        why = ("not measured" if row is None else f"a speed target for one H100 / H200: this ran on {name}"
               if met is None else "")
        emit(rows, cfg.out, f"target_{figure}", value, row["unit"] if row else "", target=f"{op} {target:g}",
             met=met, **({"why": why} if why else {}), **{k: row[k] for k in ("model", "batch") if row and k in row})


# ---- main ----

def print_table(rows: list) -> None:
    print("\n| figure | value | unit |\n|---|---|---|")
    for r in rows:
        value = f"{r['value']:.3g}" if isinstance(r["value"], float) else r["value"]
        if r["unit"] in ("part", "test") and r.get("reason"):
            value = f"{value}: {r['reason']}"
        if "target" in r:  # a target row: the value against the target, and the verdict or why there is none
            value = f"{'-' if value is None else value} (target {r['target']}: " + (
                {True: "met", False: "NOT met"}.get(r["met"]) or r.get("why", "")) + ")"
        print(f"| {r['figure']} | {value} | {r['unit']} |")


def parts(cfg: BenchConfig, device, gpu: bool) -> list:
    """The run's parts in order: (name, a function of rows, or the reason it is skipped here). The check puts
    the targets' parts first and the one-at-a-time comparison last, so that a deadline cuts what matters least."""
    name, label = ("tiny-text" if cfg.quick else cfg.model), model_label(cfg)
    sections = cfg.sections.split(",")
    def load(model):
        return M.load_policy(model, device=device, temperature=cfg.temperature, precision="auto")
    first, later = [], []
    if cfg.gpu_check and cfg.check_tests.strip():
        first.append(("tests", lambda rows: check_tests(cfg, rows, device)))
    if "rollout" in sections:
        first.append(("first rollout", lambda rows: bench_first_rollout(load(name), cfg, rows)))
        (later if cfg.gpu_check else first).append(("rollout", lambda rows: bench_rollout(load(name), cfg, rows,
                                                                                          gpu)))
    if "decode" in sections:
        decode_model = "tiny-text" if cfg.quick or not gpu else name
        first.append(("decode", lambda rows: bench_decode(load(decode_model), cfg, rows, gpu)))
        if cfg.gpu_check and decode_model != name:
            first.append((f"decode on {label}", "needs a CUDA GPU (the CPU times tiny-text)"))
    if "train" in sections:
        first.append((f"train {label}", lambda rows: bench_train(name, label, cfg, rows, device, gpu)))
        gpu_name = torch.cuda.get_device_name(device) if gpu else ""
        if gpu and not any(k in gpu_name for k in BF16_PEAK):
            first.append((f"train {label} MFU", f"the bf16 peak of {gpu_name} is not in BF16_PEAK"))
        if cfg.llama_1b and not cfg.quick:
            if gpu:
                first.append(("train llama-1b-shape", lambda rows: bench_train(
                    Z.random_llama_folder("llama-1b-shape", **LLAMA_1B_SHAPE), "llama-1b-shape", cfg, rows, device,
                    gpu)))
            elif cfg.gpu_check:
                first.append(("train llama-1b-shape", "needs a CUDA GPU"))
        if cfg.gpu_check and not gpu:
            first.append((f"train {label} MFU and peak memory", "needs a CUDA GPU"))
    if "env" in sections:
        first.append(("env", lambda rows: bench_env(cfg, rows)))
    if "host" in sections:
        first.append(("host", lambda rows: bench_host(cfg, rows)))
    if "memory" in sections:
        first.append(("memory", lambda rows: bench_memory(cfg, rows)))
    return first + later


def free_memory(device) -> None:
    """After a part that failed: drop what it left allocated, so that the next part has the device's memory."""
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run(cfg: BenchConfig) -> list:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    cfg = cfg.sized(gpu)
    rows = []
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    where = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"bench on {where} ({torch.get_num_threads()} threads), model {'tiny-text' if cfg.quick else cfg.model}"
          + (f", deadline {cfg.deadline_minutes:g} minutes" if cfg.deadline_minutes else ""), flush=True)
    if cfg.gpu_check:
        environment(cfg, rows, device)
    todo = parts(cfg, device, gpu)
    try:
        with deadline(cfg.deadline_minutes):
            while todo:
                part, work = todo[0]
                if not callable(work):
                    emit(rows, cfg.out, "skipped", part, "part", reason=work)
                elif not cfg.gpu_check:
                    work(rows)
                else:  # the check goes on after a part that fails (out of memory, a compiler error) and says so
                    try:
                        work(rows)
                    except Exception as e:
                        emit(rows, cfg.out, "failed", part, "part", reason=f"{type(e).__name__}: {e}"[:500])
                        free_memory(device)
                todo.pop(0)
    except DeadlineReached as e:
        print(f"{e}: every figure measured so far is kept; {len(todo)} part(s) not run", flush=True)
        for k, (part, _) in enumerate(todo):   # the first was cut: what it measured before is kept
            emit(rows, cfg.out, "skipped", part, "part", reason=("cut by" if k == 0 else "not started before")
                 + f" the deadline of {cfg.deadline_minutes:g} minutes")
    if cfg.gpu_check:
        report_targets(cfg, rows, device)
    print_table(rows)
    if cfg.out:
        print(f"report: {cfg.out}")
    return rows


def check_failed(rows: list) -> bool:
    """Whether the check's tests failed or did not all run (cut, or pytest missing), or a part failed."""
    return any((r["unit"] == "test" and r["value"] == "failed") or (r["unit"] == "part" and r["value"] == "tests")
               or r["figure"] == "failed" for r in rows)


if __name__ == "__main__":
    sys.exit(1 if check_failed(main(BenchConfig, run)) else 0)
