"""The training step's parts: response scores computed in chunks with recomputation, padding counted apart from
real tokens, gradient checkpointing where memory needs it, a compiled transformer body."""
import json
import os

import pytest

import model as M
import runs as R
import train_ppo as P
import train_sft as S
from runs import parse_config


def test_chunked_scores_equal_one_pass_in_value_and_gradient(monkeypatch):
    policy = M.load_policy("tiny-text", temperature=0.7)
    enc = S.encode_examples(policy, S.expert_examples("gp-l", 3, seed=0))
    batch = policy.collate([p for p, _ in enc], [r for _, r in enc])

    def run(chunk):
        monkeypatch.setattr(M, "LOGIT_CHUNK", chunk)
        policy.zero_grad()
        out = policy(batch)
        (out["logprobs"].sum() + 0.1 * out["entropy"].sum()).backward()
        return out, [p.grad.clone() for p in policy.model.parameters()]
    one, grads_one = run(10_000)
    chunked, grads_chunked = run(7)   # recomputed in the backward, 7 positions at a time
    for key in ("logprobs", "entropy"):
        assert (one[key] - chunked[key]).abs().max() < 1e-5
    for a, b in zip(grads_one, grads_chunked):  # float sums in another order: equal to rounding
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-7


def test_ppo_logs_the_padding_share_and_explained_variance(tmp_path):
    P.train(P.PPOConfig(model="tiny-text", updates=1, turns=8, envs=4, minibatch=4, micro_batch=4, max_new_tokens=12,
                        out=str(tmp_path / "run")))
    with open(os.path.join(tmp_path / "run", "metrics.jsonl")) as f:
        log = json.loads(f.readline())
    assert 0 < log["padding_share"] < 1              # answers of different lengths share a micro-batch
    # logged as a number: the returns of turns at different places in their episodes differ (its formula is
    # checked against cleanrl's in test_train_ppo.py::test_explained_variance_is_cleanrls)
    assert isinstance(log["explained_variance"], float)


def test_gradient_checkpointing_where_asked_or_needed(capsys):
    policy = M.load_policy("tiny-text")
    assert R.prepare_training(policy, "auto", False, 1, 1024, 128) == "gradient checkpointing off"  # CPU: no need
    assert not policy.model.is_gradient_checkpointing
    assert R.prepare_training(policy, "on", False, 1, 1024, 128) == "gradient checkpointing on"
    assert policy.model.is_gradient_checkpointing
    with pytest.raises(SystemExit):
        parse_config(S.SFTConfig, ["--grad-checkpointing", "sometimes"])
    assert "grad_checkpointing='sometimes': expected auto, on or off" in capsys.readouterr().err


def test_compiled_sft_matches_eager(tmp_path):
    def losses(**kw):
        S.train(S.SFTConfig(model="tiny-text", examples=4, steps=2, batch_size=2, micro_batch=2, lr=1e-3,
                            warmup_steps=0, save_every=2, out=str(tmp_path / str(kw)), **kw))
        with open(os.path.join(tmp_path / str(kw), "metrics.jsonl")) as f:
            return [json.loads(line)["loss"] for line in f]
    eager, compiled = losses(), losses(compile=True)
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4, (eager, compiled)
