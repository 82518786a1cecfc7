"""engine.py: the static-cache decoding engine gives Policy.generate's answers, log-probs and values, stops at the
end of turn, shares buckets, compiles, and leaves VLMs on their own path."""
import torch

import engine as E
import model as M
from rollout import rollout
from rollout import make_envs


def prompts_of(policy, n):
    return [policy.encode([{"role": "user", "content": "solve this " + "please " * (3 * i)}]) for i in range(n)]


def assert_same(got, want):
    for a, b in zip(got, want):
        assert a.response_ids.tolist() == b.response_ids.tolist() and a.finished == b.finished and a.text == b.text
        assert (a.logprobs - b.logprobs).abs().max() < 1e-4 and abs(a.value - b.value) < 1e-4


def test_engine_answers_as_the_plain_path_and_shares_buckets():
    policy = M.load_policy("tiny-text", temperature=0.7)
    prompts = prompts_of(policy, 5)
    plain = policy.generate(None, prompts=prompts, max_new_tokens=20, greedy=True)
    engine = E.Engine(policy)
    assert_same(engine.generate(prompts, max_new_tokens=20, greedy=True), plain)
    assert_same(engine.generate(prompts[:3], max_new_tokens=20, greedy=True), plain[:3])   # the same 8-row bucket
    assert list(engine.caches) == [(8, 256)] and E.Engine.bucket(37, 300) == (64, 512)
    torch.manual_seed(0)
    sampled = engine.generate(prompts, max_new_tokens=16, temperature=0.7)
    with torch.no_grad():
        out = policy(policy.collate([s.prompt for s in sampled], [s.response_ids for s in sampled]))
    for i, s in enumerate(sampled):   # the recorded log-probs are the tempered distribution's, as forward's
        assert (out["logprobs"][i, :len(s.response_ids)] - s.logprobs).abs().max() < 1e-4


def test_engine_serves_cached_prefixes_and_answers_as_without_them():
    policy = M.load_policy("tiny-text", temperature=0.7)
    convs = [[{"role": "user", "content": "solve this " + "please " * (3 * i)}] for i in range(5)]
    engine, cache = E.Engine(policy), M.PrefixCache()
    first = engine.generate([policy.encode(c) for c in convs], max_new_tokens=10, greedy=True, cache=cache)
    assert cache.reused > 0 and len(cache.entries) == 5          # the shared opening, computed once
    follow = [policy.encode(c + [{"role": "assistant", "content": s.text}, {"role": "user", "content": "Try again."}])
              for c, s in zip(convs, first)]
    before = cache.reused
    cached = engine.generate(follow, max_new_tokens=10, greedy=True, cache=cache)
    # no earlier prompt read again (its last token may be: the answer's first token can merge with it on re-encoding)
    assert cache.reused - before >= sum(s.prompt["input_ids"].shape[1] - 1 for s in first)
    assert_same(cached, policy.generate(None, prompts=follow, max_new_tokens=10, greedy=True))


def test_engine_stops_at_the_end_of_turn():
    policy = M.load_policy("tiny-text")
    prompts, engine = prompts_of(policy, 4), E.Engine(policy)
    torch.manual_seed(0)
    tokens = engine.generate(prompts, max_new_tokens=30, temperature=1.0)[0].response_ids.tolist()
    # make a token the first answer draws mid-decode, and not before, a stop token: the answer ends there
    k = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k])
    policy.stop_ids = sorted(set(policy.stop_ids) | {tokens[k]})
    torch.manual_seed(0)
    got = engine.generate(prompts, max_new_tokens=30, temperature=1.0)[0]
    assert got.finished and got.response_ids.tolist() == tokens[:k + 1]


def test_compiled_engine_answers_as_the_plain_path():
    policy = M.load_policy("tiny-text")
    prompts = prompts_of(policy, 3)
    engine = E.Engine(policy, compile=True)
    assert_same(engine.generate(prompts, max_new_tokens=12, greedy=True),
                policy.generate(None, prompts=prompts, max_new_tokens=12, greedy=True))
    assert engine.warmup_s > 0


def test_rollouts_through_the_engine_and_a_vlm_keeps_its_path():
    policy = M.load_policy("tiny-text", temperature=0.2)
    plain = rollout(policy, make_envs("gp-l", "id", 4, seed=0), n_turns=8, max_new_tokens=12, greedy=True)
    assert E.attach(policy) is policy.engine is not None
    fast = rollout(policy, make_envs("gp-l", "id", 4, seed=0), n_turns=8, max_new_tokens=12, greedy=True)
    assert [t.response_ids.tolist() for t in fast.turns] == [t.response_ids.tolist() for t in plain.turns]
    vlm = M.load_policy("tiny-vlm")
    assert E.attach(vlm) is None and vlm.engine is None
    assert len(vlm.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=4)) == 1


def test_the_engine_is_the_default_on_a_gpu_for_text_models_only():
    from types import SimpleNamespace
    text, vlm = M.load_policy("tiny-text"), M.load_policy("tiny-vlm")
    assert not M.engine_wanted(text, None)                   # on the CPU the plain path, unless asked
    assert M.engine_wanted(text, True) and not M.engine_wanted(text, False) and not M.engine_wanted(vlm, True)
    gpu = lambda is_vlm: SimpleNamespace(device=torch.device("cuda"), is_vlm=is_vlm)  # noqa: E731
    assert M.engine_wanted(gpu(False), None) and not M.engine_wanted(gpu(True), None)
    assert not M.engine_wanted(gpu(False), False)


def test_ppo_and_evaluation_take_the_engine(tmp_path):
    import evaluate as EV
    import train_ppo as P
    P.train(P.PPOConfig(model="tiny-text", updates=1, turns=8, envs=4, minibatch=4, micro_batch=2, max_new_tokens=8,
                        engine=True, out=str(tmp_path / "ppo")))
    result = EV.evaluate(EV.EvalConfig(model=str(tmp_path / "ppo"), task="gp-l", episodes=2, batch_size=2,
                                       max_new_tokens=8, engine=True, out=str(tmp_path / "eval"), plots=False))
    assert result[0]["checkpoints"][0]["settings"]["id"]["episodes"] == 2
