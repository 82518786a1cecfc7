"""GPU only (skipped without CUDA): training at the paper's learning rates moves the fp32 master weights, in one
process and under `torchrun --nproc_per_node 1` (FSDP2, NCCL); generate and score agree under the training
numerics (bf16 compute over fp32 weights); the prefix cache changes nothing on the device.
Run on a GPU machine with `python -m pytest -q tests/test_gpu.py -s` (prints what it measured)."""
import os
import sys

import pytest
import torch

import generation as G
import model as M
import train_ppo as P
import train_sft as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_precision import changed_share, metrics, ppo, sft  # noqa: E402
from launch import report, torchrun  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_one_process_training_moves_the_master_weights_at_the_papers_learning_rates(tmp_path):
    base = M.resolve("tiny-text")
    S.train(sft(tmp_path / "sft", precision="auto"))                     # auto: bf16 compute on the GPU
    S.train(sft(tmp_path / "sft20", precision="auto", steps=20, lr=1e-5, warmup_steps=2, save_every=20))
    P.train(ppo(tmp_path / "ppo", precision="auto"))
    shares = {"sft 1 step lr 1e-6": changed_share(base, str(tmp_path / "sft" / "step-000001")),
              "sft 20 steps lr 1e-5": changed_share(base, str(tmp_path / "sft20" / "step-000020")),
              "ppo 1 update lr 1e-6": changed_share(base, str(tmp_path / "ppo" / "step-000001"))}
    gap = metrics(tmp_path / "ppo")[0]
    print(f"one process, share of weights changed: {shares}; PPO re-scoring gap mean "
          f"{gap['logprob_gap_mean']:.4f} max {gap['logprob_gap_max']:.4f}")
    assert shares["sft 1 step lr 1e-6"] >= 0.9 and shares["ppo 1 update lr 1e-6"] >= 0.9
    assert shares["sft 20 steps lr 1e-5"] > 0.5


def torchrun_one_gpu(script, args):
    out = torchrun(script, args, nproc=1)
    assert out.returncode == 0, report(out)


def test_torchrun_fsdp2_training_moves_the_master_weights_at_the_papers_learning_rates(tmp_path):
    base = M.resolve("tiny-text")
    torchrun_one_gpu("train_sft.py", ["--model", "tiny-text", "--examples", "8", "--steps", "1", "--batch-size", "4",
                                      "--micro-batch", "2", "--lr", "1e-6", "--warmup-steps", "0", "--save-every", "1",
                                      "--out", str(tmp_path / "sft")])
    torchrun_one_gpu("train_ppo.py", ["--model", "tiny-text", "--updates", "1", "--turns", "8", "--envs", "4",
                                      "--minibatch", "4", "--micro-batch", "2", "--max-new-tokens", "12",
                                      "--lr", "1e-6", "--out", str(tmp_path / "ppo")])
    sft_share = changed_share(base, str(tmp_path / "sft" / "step-000001"))
    ppo_share = changed_share(base, str(tmp_path / "ppo" / "step-000001"))
    print(f"torchrun FSDP2, share of weights changed: sft 1 step lr 1e-6 {sft_share:.4f}, "
          f"ppo 1 update lr 1e-6 {ppo_share:.4f}")
    assert sft_share >= 0.9 and ppo_share >= 0.9


@pytest.mark.parametrize("name", ["tiny-text", "smollm2-135m"])
def test_bf16_generate_and_score_agree_and_the_cache_changes_nothing(name):
    policy = M.load_policy(name, device="cuda", temperature=0.7, precision="bf16")  # PPO's numerics
    assert next(policy.model.parameters()).dtype == torch.float32 and policy.compute_dtype == torch.bfloat16
    convs = [[{"role": "user", "content": "Make 24 from the cards 3, 3, 8, 8. " + "Think. " * i}] for i in range(6)]
    torch.manual_seed(0)
    samples = policy.generate(convs, max_new_tokens=32)
    batch = policy.collate([s.prompt for s in samples], [s.response_ids for s in samples])
    with torch.no_grad():
        out = policy(batch)
    diffs = torch.cat([(out["logprobs"][i, :len(s.response_ids)].float().cpu() - s.logprobs).abs()
                       for i, s in enumerate(samples)])
    print(f"{name}: bf16 |generate - score| log-prob difference per token: max {diffs.max():.4f}, "
          f"mean {diffs.mean():.4f}")
    assert diffs.max() < 0.25  # cached decoding and one full pass round differently; PPO re-scores anyway
    cache = G.PrefixCache()
    first = policy.generate(convs, max_new_tokens=16, greedy=True, cache=cache)
    follow = [c + [{"role": "assistant", "content": s.text}, {"role": "user", "content": "Try again."}]
              for c, s in zip(convs, first)]
    cached = policy.generate(follow, max_new_tokens=16, greedy=True, cache=cache)
    plain = policy.generate(follow, max_new_tokens=16, greedy=True)
    same = sum(a.response_ids.tolist() == b.response_ids.tolist() for a, b in zip(cached, plain))
    print(f"{name}: {same}/{len(plain)} greedy answers identical with and without the prefix cache, "
          f"{cache.reused} prompt tokens reused")
    assert cache.reused > 0 and same >= len(plain) - 1  # bf16 ties may flip one argmax


@pytest.mark.parametrize("name", ["tiny-text", "smollm2-135m"])
def test_compiled_engine_on_the_gpu_answers_as_the_plain_path(name):
    import engine as E
    policy = M.load_policy(name, device="cuda", temperature=0.7, precision="bf16")
    convs = [[{"role": "user", "content": "Make 24 from the cards 3, 3, 8, 8. " + "Think. " * i}] for i in range(6)]
    prompts = [policy.encode(c) for c in convs]
    plain = policy.generate(None, prompts=prompts, max_new_tokens=32, greedy=True)
    engine = E.Engine(policy, compile=True)
    fast = engine.generate(prompts, max_new_tokens=32, greedy=True)
    same = sum(a.response_ids.tolist() == b.response_ids.tolist() for a, b in zip(fast, plain))
    torch.manual_seed(0)
    sampled = engine.generate(prompts, max_new_tokens=32)
    with torch.no_grad():
        out = policy(policy.collate([s.prompt for s in sampled], [s.response_ids for s in sampled]))
    gap = max(float((out["logprobs"][i, :len(s.response_ids)].float().cpu() - s.logprobs).abs().max())
              for i, s in enumerate(sampled))
    print(f"{name}: engine {same}/{len(plain)} greedy answers as the plain path; max |generate - score| {gap:.4f}; "
          f"warm-up {engine.warmup_s:.1f} s")
    assert same >= len(plain) - 1 and gap < 0.25   # bf16 ties may flip one argmax
