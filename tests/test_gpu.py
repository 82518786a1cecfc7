"""GPU acceptance (skipped without CUDA): training at the paper's learning rates moves the fp32 master weights, in one
process and under `torchrun --nproc_per_node 1` (FSDP2); generate and score agree under the training numerics (bf16
compute over fp32 weights); the prefix cache changes nothing; the compiled engine answers as the plain path.
`python bench.py --gpu-check` runs these first (then the benchmarks against their targets) on its device
(SFTRL_CHECK_DEVICE); without CUDA, on the CPU under bf16 autocast: the same checks, slower, no CUDA graphs.
By hand on a GPU: `python -m pytest -q tests/test_gpu.py -s` (prints what it measured)."""
import os
import sys

import pytest
import torch

import bench as B
import model as M
import train_ppo as P
import train_sft as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_precision import changed_share, metrics, ppo, sft  # noqa: E402
from launch import report, torchrun  # noqa: E402

DEVICE = os.environ.get("SFTRL_CHECK_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not os.environ.get("SFTRL_CHECK_DEVICE"),
                                reason="needs a CUDA GPU (bench.py --gpu-check runs these on the CPU)")


def record(figure: str, value, unit: str, **extra) -> None:
    """Print a measured figure; under `bench.py --gpu-check` also append it to the check's report."""
    B.emit([], os.environ.get("SFTRL_CHECK_REPORT", ""), figure, value, unit, device=DEVICE, **extra)


def divergence(policy, a, b):
    """Where two greedy answers to one prompt part: None when they are the same, else (position k, margin), the
    margin being how far apart one full forward pass puts the log-probs of the two tokens drawn at k after the
    same k tokens. In bf16 two decoding paths may part only at a near-tie, where the margin is within the
    numerics' error (the |generate - score| gaps of the test above)."""
    x, y = a.response_ids.tolist(), b.response_ids.tolist()
    if x == y:
        return None
    k = next((j for j in range(min(len(x), len(y))) if x[j] != y[j]), min(len(x), len(y)))
    if k == min(len(x), len(y)):   # one is the other's beginning: they parted by stopping, not at a near-tie
        return k, float("inf")
    with torch.no_grad():
        out = policy(policy.collate([a.prompt, b.prompt], [a.response_ids, b.response_ids]))
    return k, abs(float(out["logprobs"][0, k]) - float(out["logprobs"][1, k]))


def where(parted) -> list:
    """[[position, margin], ...] of divergence() results, for the report (a margin that is no number: null)."""
    return [[k, round(m, 4) if m != float("inf") else None] for k, m in parted]


def test_one_process_training_moves_the_master_weights_at_the_papers_learning_rates(tmp_path):
    base = M.resolve("tiny-text")
    S.train(sft(tmp_path / "sft", device=DEVICE))                   # bf16 compute over fp32 master weights
    S.train(sft(tmp_path / "sft20", steps=20, lr=1e-5, warmup_steps=2, save_every=20, device=DEVICE))
    P.train(ppo(tmp_path / "ppo", device=DEVICE))
    shares = {"sft_1_step_changed_share": changed_share(base, str(tmp_path / "sft" / "step-000001")),
              "sft_20_steps_1e-5_changed_share": changed_share(base, str(tmp_path / "sft20" / "step-000020")),
              "ppo_1_update_changed_share": changed_share(base, str(tmp_path / "ppo" / "step-000001"))}
    for figure, share in shares.items():
        record(figure, share, "fraction of weights", model="tiny-text", precision="bf16", process="one")
    gap = metrics(tmp_path / "ppo")[0]
    record("ppo_rescoring_gap_max_tiny-text", gap["logprob_gap_max"], "nats", mean=gap["logprob_gap_mean"])
    assert shares["sft_1_step_changed_share"] >= 0.9 and shares["ppo_1_update_changed_share"] >= 0.9
    assert shares["sft_20_steps_1e-5_changed_share"] > 0.5


def torchrun_one_device(script, args):
    out = torchrun(script, [*args, "--precision", "bf16", "--device", DEVICE], nproc=1)
    assert out.returncode == 0, report(out)


def test_torchrun_fsdp2_training_moves_the_master_weights_at_the_papers_learning_rates(tmp_path):
    base = M.resolve("tiny-text")
    torchrun_one_device("train_sft.py", ["--model", "tiny-text", "--examples", "8", "--steps", "1", "--batch-size",
                                         "4", "--micro-batch", "2", "--lr", "1e-6", "--warmup-steps", "0",
                                         "--save-every", "1", "--out", str(tmp_path / "sft")])
    torchrun_one_device("train_ppo.py", ["--model", "tiny-text", "--updates", "1", "--turns", "8", "--envs", "4",
                                         "--minibatch", "4", "--micro-batch", "2", "--max-new-tokens", "12",
                                         "--lr", "1e-6", "--out", str(tmp_path / "ppo")])
    sft_share = changed_share(base, str(tmp_path / "sft" / "step-000001"))
    ppo_share = changed_share(base, str(tmp_path / "ppo" / "step-000001"))
    record("torchrun_sft_1_step_changed_share", sft_share, "fraction of weights", model="tiny-text", process="fsdp2")
    record("torchrun_ppo_1_update_changed_share", ppo_share, "fraction of weights", model="tiny-text",
           process="fsdp2")
    assert sft_share >= 0.9 and ppo_share >= 0.9


@pytest.mark.parametrize("name", ["tiny-text", "smollm2-135m"])
def test_bf16_generate_and_score_agree_and_the_cache_changes_nothing(name):
    policy = M.load_policy(name, device=DEVICE, temperature=0.7, precision="bf16")  # PPO's numerics
    assert next(policy.model.parameters()).dtype == torch.float32 and policy.compute_dtype == torch.bfloat16
    convs = [[{"role": "user", "content": "Make 24 from the cards 3, 3, 8, 8. " + "Think. " * i}] for i in range(6)]
    torch.manual_seed(0)
    samples = policy.generate(convs, max_new_tokens=32)
    batch = policy.collate([s.prompt for s in samples], [s.response_ids for s in samples])
    with torch.no_grad():
        out = policy(batch)
    diffs = torch.cat([(out["logprobs"][i, :len(s.response_ids)].float().cpu() - s.logprobs).abs()
                       for i, s in enumerate(samples)])
    record(f"generate_score_gap_max_{name}", float(diffs.max()), "nats", mean=float(diffs.mean()), temperature=0.7,
           tokens=len(diffs))
    assert diffs.max() < 0.25  # cached decoding and one full pass round differently; PPO re-scores anyway
    cache = M.PrefixCache()
    first = policy.generate(convs, max_new_tokens=16, greedy=True, cache=cache)
    follow = [c + [{"role": "assistant", "content": s.text}, {"role": "user", "content": "Try again."}]
              for c, s in zip(convs, first)]
    cached = policy.generate(follow, max_new_tokens=16, greedy=True, cache=cache)
    plain = policy.generate(follow, max_new_tokens=16, greedy=True)
    parted = [d for d in (divergence(policy, a, b) for a, b in zip(cached, plain)) if d]
    record(f"prefix_cache_same_answers_{name}", 1 - len(parted) / len(plain), "fraction", answers=len(plain),
           reused_tokens=cache.reused, parted_at=where(parted))
    assert cache.reused > 0 and all(margin < 0.25 for _, margin in parted)  # only bf16 near-ties may part them


@pytest.mark.parametrize("name", ["tiny-text", "smollm2-135m"])
def test_compiled_engine_answers_as_the_plain_path(name):
    import engine as E
    policy = M.load_policy(name, device=DEVICE, temperature=0.7, precision="bf16")
    convs = [[{"role": "user", "content": "Make 24 from the cards 3, 3, 8, 8. " + "Think. " * i}] for i in range(6)]
    prompts = [policy.encode(c) for c in convs]
    plain = policy.generate(None, prompts=prompts, max_new_tokens=32, greedy=True)
    engine = E.Engine(policy, compile=True)
    fast = engine.generate(prompts, max_new_tokens=32, greedy=True)
    parts = [divergence(policy, a, b) for a, b in zip(fast, plain)]
    logprob_gap = 0.0   # over the tokens both paths drew alike, up to where they part
    for a, b, d in zip(fast, plain, parts):
        k = d[0] if d else len(a.logprobs)
        if k:
            logprob_gap = max(logprob_gap, float((a.logprobs[:k] - b.logprobs[:k]).abs().max()))
    torch.manual_seed(0)
    sampled = engine.generate(prompts, max_new_tokens=32)
    with torch.no_grad():
        out = policy(policy.collate([s.prompt for s in sampled], [s.response_ids for s in sampled]))
    gap = max(float((out["logprobs"][i, :len(s.response_ids)].float().cpu() - s.logprobs).abs().max())
              for i, s in enumerate(sampled))
    parted = [d for d in parts if d]
    record(f"engine_same_greedy_answers_{name}", 1 - len(parted) / len(plain), "fraction", answers=len(plain),
           parted_at=where(parted))
    record(f"engine_greedy_logprob_gap_max_{name}", logprob_gap, "nats")
    record(f"engine_generate_score_gap_max_{name}", gap, "nats", temperature=0.7)
    record(f"engine_warmup_s_{name}", engine.warmup_s, "s")
    assert all(margin < 0.25 for _, margin in parted)   # the engine leaves the plain path only at bf16 near-ties
    assert logprob_gap < 0.25 and gap < 0.25
