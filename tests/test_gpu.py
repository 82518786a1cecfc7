"""GPU only (skipped without CUDA): bf16 generate/score agreement and the prefix cache on the device.
Run on a GPU machine with `python -m pytest -q tests/test_gpu.py -s` (prints the measured differences)."""
import pytest
import torch

import model as M

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["tiny-text", "smollm2-135m"])
def test_bf16_generate_and_score_agree_and_the_cache_changes_nothing(name):
    policy = M.load_policy(name, device="cuda", temperature=0.7)
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    convs = [[{"role": "user", "content": "Make 24 from the cards 3, 3, 8, 8. " + "Think. " * i}] for i in range(6)]
    torch.manual_seed(0)
    samples = policy.generate(convs, max_new_tokens=32)
    batch = policy.collate([s.prompt for s in samples], [s.response_ids for s in samples])
    with torch.no_grad():
        out = policy(batch)
    diff = max(float((out["logprobs"][i, :len(s.response_ids)].float().cpu() - s.logprobs).abs().max())
               for i, s in enumerate(samples))
    print(f"{name}: bf16 max |generate - score| log-prob difference {diff:.4f}")
    assert diff < 0.25  # bf16 rounds differently in cached decoding and in one full pass; PPO's --recompute-logprobs
    cache = M.PrefixCache()
    first = policy.generate(convs, max_new_tokens=16, greedy=True, cache=cache)
    follow = [c + [{"role": "assistant", "content": s.text}, {"role": "user", "content": "Try again."}]
              for c, s in zip(convs, first)]
    cached = policy.generate(follow, max_new_tokens=16, greedy=True, cache=cache)
    plain = policy.generate(follow, max_new_tokens=16, greedy=True)
    same = sum(a.response_ids.tolist() == b.response_ids.tolist() for a, b in zip(cached, plain))
    print(f"{name}: {same}/{len(plain)} greedy answers identical with and without the prefix cache, "
          f"{cache.reused} prompt tokens reused")
    assert cache.reused > 0 and same >= len(plain) - 1  # bf16 ties may flip one argmax
