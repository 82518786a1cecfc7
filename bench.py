"""Measured speed: rollouts, PPO training steps and environments, each against a reference in the same run.

    python bench.py                       # CPU: embedded default, rollout batch 32; or the GPU at 128 and 512
    python bench.py --sections env        # only the environments
    python bench.py --quick               # tiny model, small sizes: the test suite's smoke run (< 1 minute)

Prints a table and one JSON line per figure ({"figure", "value", "unit", ...}); `--out FILE` appends
the JSON lines to a file too. Figures:

- rollout: the project's batched multi-turn rollout (`rollout.rollout`, sequential revision, one
  batched generate per round) against the paper's approach, one conversation at a time with a
  plain Hugging Face `generate` on one prompt: generated tokens/s and episodes/s of each and their
  ratio, on the same GeneralPoints episodes (same seeds), model, temperature and token limit.
  Ratios are measured inside one run, so a noisy machine cannot fake them.
- train: a PPO epoch (`train_ppo.ppo_update`) over GeneralPoints turns: tokens/s; on a GPU also
  model FLOPs utilization, 6 x parameters x tokens / time / the GPU's dense bf16 peak, and peak memory;
  for the model and, on a GPU, a random-weight model of Llama-3.2-1B's shape (built locally).
- env: GeneralPoints reset + verify per second, V-IRL steps per second, and images rendered per
  second (GP-VL cards, V-IRL-VL 2x2 street-view grids), on one core.
- memory: estimated GPU memory per rank of training with fp32 master weights and bf16 compute
  (`runs.training_memory`, its formula in the docstring): the model on one GPU, and the paper's 11B model
  on 8 GPUs under FSDP2 and, for contrast, on one.

Rollouts and training run with the training precision (`--precision auto`: bf16 compute over fp32
weights on a GPU), as train_ppo.py does; `generate_first_call_s` / `generate_second_call_s` time the
process's first generate call, which pays for the device's set-up, and the next.
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass

import torch

import model as M
import runs as R
import model_zoo as Z
import train_ppo as P
from cli import check_writable, main, require
from env_points import GeneralPointsEnv, PointsConfig
from env_virl import NavigationEnv, VirlConfig
from rollout import rollout
from tasks import action_field, make_envs

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
SECTIONS = "rollout, decode, train, env, memory"
MEMORY_CASES = (("ppo, 1 GPU", "", 1, 16 * 512, 16 * 128),
                ("ppo, 8 GPUs", "llama-3.2-11b-vision", 8, 2048, 512),
                ("sft, 8 GPUs", "llama-3.2-11b-vision", 8, 16 * 512, 16 * 64),
                ("ppo, 1 GPU", "llama-3.2-11b-vision", 1, 2048, 512))


@dataclass
class BenchConfig:
    """Throughput benchmarks: rollouts, PPO training steps, environments."""
    sections: str = "rollout,decode,train,env,memory"
    """comma-separated subset of rollout, decode, train, env, memory"""
    model: str = "smollm2-135m"
    """model name or folder for rollout and train"""
    batch: str = ""
    """rollout batch sizes, comma-separated; empty: 32 on CPU, 128,512 on a GPU"""
    baseline_episodes: int = 0
    """episodes of the one-at-a-time loop; 0: 8 on CPU, 32 on a GPU"""
    decode_batch: int = 0
    """batch of the decode section; 0: 64 (the engine's raw decode against the plain path, and a rollout)"""
    compile: bool = True
    """decode section: also time the compiled engine (torch.compile; CUDA graphs on a GPU)"""
    max_new_tokens: int = 64
    """longest answer, the same in both rollouts"""
    cache_tokens: int = 32768
    """prefix cache of the batched rollout, in tokens; 0: off"""
    temperature: float = 0.2
    """sampling temperature (the paper's)"""
    train_turns: int = 0
    """turns in the timed PPO epoch; 0: 16 on CPU, 256 on a GPU"""
    micro_batch: int = 0
    """turns per forward in training; 0: 4 on CPU, 32 on a GPU"""
    llama_1b: bool = True
    """on a GPU, also time training on a random Llama-3.2-1B-shaped model"""
    env_seconds: float = 3.0
    """seconds per environment figure"""
    quick: bool = False
    """tiny model and small sizes: every figure in under a minute on CPU"""
    out: str = ""
    """also append the JSON lines to this file"""
    device: str = ""
    """cuda, cpu; empty: the GPU when there is one"""

    def __post_init__(self):
        wanted = [s.strip() for s in self.sections.split(",") if s.strip()]
        bad = [s for s in wanted if s not in SECTIONS.split(", ")]
        if bad or not wanted:
            raise ValueError(f"sections={self.sections!r}: expected a comma-separated subset of {SECTIONS}")
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
        M.check_device(self.device)
        if self.out:
            if os.path.isdir(self.out):
                raise ValueError(f"out={self.out!r} is a folder: expected a file to append the JSON lines to")
            check_writable(os.path.dirname(os.path.abspath(self.out)))


def emit(rows: list, out: str, figure: str, value: float, unit: str, **extra) -> None:
    """Print one figure as a JSON line and keep it for the table."""
    row = {"figure": figure, "value": round(value, 4) if isinstance(value, float) else value, "unit": unit, **extra}
    rows.append(row)
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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


def bench_rollout(policy, cfg: BenchConfig, rows: list, gpu: bool) -> None:
    sizes = [int(b) for b in cfg.batch.split(",") if b.strip()] or ([4] if cfg.quick else [128, 512] if gpu else [32])
    n_single = cfg.baseline_episodes or (2 if cfg.quick else 32 if gpu else 8)
    for call in ("first", "second"):  # the first call of a process pays for CUDA's and the kernels' set-up
        synchronize(policy.device)
        start = time.perf_counter()
        policy.generate([[{"role": "user", "content": "warm up"}]] * 4, max_new_tokens=16)
        synchronize(policy.device)
        emit(rows, cfg.out, f"generate_{call}_call_s", time.perf_counter() - start, "s", batch=4, max_new_tokens=16)
    tokens, episodes, secs = one_at_a_time_rollout(policy, n_single, cfg, seed=10_000)
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
    b = cfg.decode_batch or 64
    env = GeneralPointsEnv(PointsConfig(), seed=0)
    prompts = [policy.encode([{"role": "user", "content": env.reset().text}]) for _ in range(b)]
    stops, policy.stop_ids = policy.stop_ids, [policy.model.config.vocab_size + 1]  # no answer stops early
    extra = {"batch": b, "model": os.path.basename(policy.model.name_or_path.rstrip("/"))}
    try:
        plain = step_ms(lambda n: policy.generate(None, prompts=prompts, max_new_tokens=n, temperature=cfg.temperature))
        emit(rows, cfg.out, "decode_plain_step_ms", plain, "ms", **extra)
        variants = [("engine", False)] + ([("engine_compiled", True)] if cfg.compile and not cfg.quick else [])
        for label, compile in variants:
            engine = E.Engine(policy, compile=compile)
            ms = step_ms(lambda n: engine.generate(prompts, max_new_tokens=n, temperature=cfg.temperature))
            emit(rows, cfg.out, f"decode_{label}_step_ms", ms, "ms", **extra)
            emit(rows, cfg.out, f"decode_{label}_tokens_per_s", b * 1000 / ms, "tokens/s", **extra)
            emit(rows, cfg.out, f"decode_{label}_warmup_s", engine.warmup_s, "s", **extra)
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
    turns = cfg.train_turns or (4 if cfg.quick else 256 if gpu else 16)
    micro = cfg.micro_batch or (2 if cfg.quick else 32 if gpu else 4)
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


# ---- environments ----

def rate(fn, seconds: float) -> float:
    """Calls of fn per second over about `seconds`."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            fn()
        n += 50
    return n / (time.perf_counter() - start)


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
    emit(rows, cfg.out, "env_gp_reset_verify_per_s", rate(gp_reset_verify, seconds), "resets+verifies/s per core")

    virl = NavigationEnv(VirlConfig(), seed=0)
    state = {"done": True}

    def virl_step():
        if state["done"]:
            virl.reset()
        _, _, state["done"], _ = virl.step(virl.expert_response())
    emit(rows, cfg.out, "env_virl_steps_per_s", rate(virl_step, seconds), "steps/s per core")

    gp_vl = GeneralPointsEnv(PointsConfig(vision=True), seed=0)
    emit(rows, cfg.out, "env_gp_vl_images_per_s", rate(gp_vl.reset, seconds), "images/s per core")
    virl_vl = NavigationEnv(VirlConfig(vision=True), seed=0)
    emit(rows, cfg.out, "env_virl_vl_grids_per_s", rate(virl_vl.reset, seconds), "2x2 view grids/s per core")


# ---- main ----

def print_table(rows: list) -> None:
    print("\n| figure | value | unit |\n|---|---|---|")
    for r in rows:
        value = f"{r['value']:.3g}" if isinstance(r["value"], float) else r["value"]
        print(f"| {r['figure']} | {value} | {r['unit']} |")


def run(cfg: BenchConfig) -> list:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    name = "tiny-text" if cfg.quick else cfg.model
    sections = cfg.sections.split(",")
    rows = []
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    where = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"bench on {where} ({torch.get_num_threads()} threads), model {name}")
    if "rollout" in sections:
        bench_rollout(M.load_policy(name, device=device, temperature=cfg.temperature, precision="auto"), cfg, rows, gpu)
    if "decode" in sections:
        bench_decode(M.load_policy("tiny-text" if cfg.quick or not gpu else name, device=device,
                                   temperature=cfg.temperature, precision="auto"), cfg, rows, gpu)
    if "train" in sections:
        bench_train(name, os.path.basename(name.rstrip("/")), cfg, rows, device, gpu)
        if gpu and cfg.llama_1b and not cfg.quick:
            llama_1b = Z.random_llama_folder("llama-1b-shape", **LLAMA_1B_SHAPE)
            bench_train(llama_1b, "llama-1b-shape", cfg, rows, device, gpu)
    if "env" in sections:
        bench_env(cfg, rows)
    if "memory" in sections:
        bench_memory(cfg, rows)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main(BenchConfig, run)
