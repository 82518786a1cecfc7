"""train_ppo.py: GAE, the clipped losses, the paper's action log-prob, learning a toy task, FSDP2 on
2-process gloo, resume, non-finite minibatches, bad configs."""
import json
import math
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import env_points as G
import model as M
import runs as R
import train_ppo as P
import train_sft as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from launch import HANG_S, report, torchrun  # noqa: E402
from ppo_check import make_batch  # noqa: E402


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- GAE ----

def brute_force_gae(rewards, values, dones, episodes, bootstrap, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the rest of t's episode, written out term by term."""
    adv = []
    for i in range(len(rewards)):
        later = [j for j in range(i, len(rewards)) if episodes[j] == episodes[i]]
        total = 0.0
        for l, j in enumerate(later):
            nxt = later[l + 1] if l + 1 < len(later) else None
            if dones[j]:
                v_next = 0.0
            elif nxt is not None:
                v_next = values[nxt]
            else:
                v_next = bootstrap.get(episodes[j], 0.0)
            total += (gamma * lam) ** l * (rewards[j] + gamma * v_next - values[j])
            if dones[j]:
                break
        adv.append(total)
    return adv


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_brute_force_on_random_interleaved_episodes(seed):
    rng = random.Random(seed)
    order, bootstrap, dones = [], {}, {}
    for ep in range(6):  # episodes of 1..5 turns; some end (done on their last turn), some are cut off
        n = rng.randint(1, 5)
        ended = rng.random() < 0.6
        order += [ep] * n
        dones[ep] = ended
        if not ended:
            bootstrap[ep] = rng.uniform(-2, 2)
    rng.shuffle(order)  # collection order interleaves episodes, each one's turns stay in order
    seen = {}
    done_flags = []
    for i, ep in enumerate(order):
        seen[ep] = seen.get(ep, 0) + 1
        done_flags.append(dones[ep] and seen[ep] == order.count(ep))
    rewards = [rng.choice([-3, -2, -1, 5]) + rng.random() for _ in order]
    values = [rng.uniform(-2, 2) for _ in order]
    adv, ret = P.gae(rewards, values, done_flags, order, bootstrap, gamma=0.9, lam=0.95)
    expected = brute_force_gae(rewards, values, done_flags, order, bootstrap, 0.9, 0.95)
    assert max(abs(a - e) for a, e in zip(adv.tolist(), expected)) < 1e-5
    assert max(abs(r - (e + v)) for r, e, v in zip(ret.tolist(), expected, values)) < 1e-5


def test_gae_single_turn_episode_and_bootstrap_by_hand():
    # one finished turn: A = r - V; one cut-off turn: A = r + gamma V_boot - V
    adv, ret = P.gae([5.0, -1.0], [1.0, 0.5], [True, False], [0, 1], {1: 2.0}, gamma=0.9, lam=0.95)
    assert adv.tolist() == pytest.approx([4.0, -1.0 + 0.9 * 2.0 - 0.5])
    assert ret.tolist() == pytest.approx([5.0, -1.0 + 0.9 * 2.0])


# ---- losses ----

def test_clipped_surrogate_on_hand_computed_numbers():
    logratio = torch.log(torch.tensor([1.3, 1.3, 0.8, 0.8, 1.05]))
    adv = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0])
    got = P.clipped_surrogate(logratio, adv, clip=0.1)
    # r A vs clip(r) A, the smaller objective wins: 1.3*2=2.6 vs 1.1*2=2.2; -2.6 vs -2.2; 1.6 vs 1.8; -1.6 vs -1.8; 1.05
    assert got.tolist() == pytest.approx([-2.2, 2.6, -1.6, 1.8, -1.05], abs=1e-6)


def test_clipped_value_loss_on_hand_computed_numbers():
    v, old, ret = torch.tensor([1.5, 0.5, 1.05]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 0.0, 2.0])
    got = P.clipped_value_loss(v, old, ret, clip=0.1)
    # (1) unclipped 0.25, clipped to 1.1: 0.81 -> max 0.81; (2) 0.25 vs 0.9^2; (3) inside the clip: 0.95^2
    assert got.tolist() == pytest.approx([0.405, 0.405, 0.45125], abs=1e-6)
    assert P.clipped_value_loss(v, old, ret, clip=0.0).tolist() == pytest.approx([0.125, 0.125, 0.45125], abs=1e-6)


def test_paper_and_token_level_log_probs_on_a_known_response():
    tok = M.load_policy("tiny-text").tokenizer
    text = '{"cards": ["K", "2", "3", "4"], "number": [10, 2, 3, 4], "formula": "10+2*3+4*2"}'
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    w = P.action_weights(tok, ids, "formula", 0.5)
    k = int((w == 0.5).sum())
    start = text.rfind('"formula"')
    assert w[:k].eq(0.5).all() and w[k:].eq(1.0).all() and 0 < k < len(ids)
    assert len(tok.decode(ids[:k])) <= start < len(tok.decode(ids[:k + 1]))  # token k starts the action field
    assert P.action_weights(tok, ids, "action", 0.5).eq(1.0).all()           # no such field: all action

    # two responses: lengths 3 and 2, padded to 3
    new = torch.tensor([[-0.1, -0.2, -0.3], [-0.5, -0.4, 0.0]])
    old = torch.tensor([[-0.2, -0.2, -0.1], [-0.6, -0.5, 0.0]])
    weights = torch.tensor([[0.5, 1.0, 1.0], [0.5, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    total, ratios = P.policy_loss(new, old, weights, mask, adv, clip=0.1, token_level=False)
    lr0 = 0.5 * 0.1 + 1.0 * 0.0 + 1.0 * -0.2      # weighted sums of log-prob differences
    lr1 = 0.5 * 0.1 + 1.0 * 0.1
    r0, r1 = math.exp(lr0), math.exp(lr1)
    expect = -min(r0 * 1, min(max(r0, 0.9), 1.1) * 1) - min(r1 * -1, min(max(r1, 0.9), 1.1) * -1)
    assert float(total) == pytest.approx(expect, abs=1e-6) and len(ratios) == 2
    assert ratios.tolist() == pytest.approx([r0, r1], abs=1e-6)
    total, ratios = P.policy_loss(new, old, weights, mask, adv, clip=0.1, token_level=True)
    per_token = [(0.1, 1), (0.0, 1), (-0.2, 1), (0.1, -1), (0.1, -1)]
    expect = sum(-min(math.exp(d) * a, min(max(math.exp(d), 0.9), 1.1) * a) for d, a in per_token)
    assert float(total) == pytest.approx(expect, abs=1e-6) and len(ratios) == 5


# ---- learning a toy task ----

class SayYes:
    """A one-attempt toy task: reward 1 for an answer starting with "yes", 0 for "no", -1 otherwise."""

    def reset(self):
        return SimpleNamespace(text="Answer yes or no.", image=None, continues=False)

    def step(self, response):
        word = response.strip().lower()
        outcome = "yes" if word.startswith("yes") else "no" if word.startswith("no") else "other"
        reward = {"yes": 1.0, "no": 0.0, "other": -1.0}[outcome]
        return self.reset(), reward, True, {"outcome": outcome, "success": outcome == "yes", "feedback": ""}

    def expert_response(self):
        return "yes"


def test_ppo_raises_the_reward_of_a_toy_task(tmp_path):
    # SFT first, as in the paper: the tiny model learns to answer "yes" or "no", half and half
    data = tmp_path / "yes_no.jsonl"
    question = [{"role": "user", "content": "Answer yes or no."}]
    data.write_text("".join(json.dumps({"messages": question, "response": r}) + "\n"
                            for r in ("yes", "no")))
    S.train(S.SFTConfig(model="tiny-text", data=str(data), steps=30, batch_size=2, micro_batch=2, lr=1e-2,
                        warmup_steps=1, save_every=30, out=str(tmp_path / "sft")))
    cfg = P.PPOConfig(model=str(tmp_path / "sft" / "step-000030"), updates=8, turns=32, envs=32, minibatch=16,
                      micro_batch=16, lr=3e-3, grad_clip=1.0, temperature=1.0, max_new_tokens=4, save_every=8,
                      out=str(tmp_path / "ppo"))
    P.train(cfg, env_factory=lambda update, rank: [SayYes() for _ in range(32)])
    curve = [m["reward_mean"] for m in metrics(tmp_path / "ppo")]
    assert len(curve) == 8
    assert 0.2 < curve[0] < 0.8, curve          # starts near half "yes"
    assert curve[-1] > 0.9 and curve[-1] > curve[0] + 0.2, curve


# ---- distributed, resume, robustness ----

@pytest.mark.parametrize("mode", ["paper", "token"])
def test_two_process_gloo_updates_match_one_process(mode):
    out = torchrun("tests/ppo_check.py", [mode])
    assert out.returncode == 0, report(out)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["world"] == 2 and got["steps"] == [2, 2] and got["clipped"] > 0
    assert got["moved"] > 1e-3                      # the updates did change the weights...
    assert got["weights"] < 1e-4 and got["pg"] < 1e-4, got   # ...identically sharded and unsharded


ARGS = ["--model", "tiny-text", "--turns", "8", "--envs", "4", "--minibatch", "4", "--micro-batch", "2",
        "--max-new-tokens", "12", "--lr", "1e-4", "--grad-clip", "1.0"]


def test_train_ppo_under_torchrun_runs_two_updates_and_saves(tmp_path):
    out = torchrun("train_ppo.py", [*ARGS, "--updates", "2", "--save-every", "2", "--out", str(tmp_path / "run")])
    assert out.returncode == 0, report(out)
    log = metrics(tmp_path / "run")
    assert [m["step"] for m in log] == [1, 2] and all(m["answers"] == 8 for m in log)
    for m in log:  # the ranks' sums add up, negative ones included: the mean reward is that of the outcomes
        assert m["reward_mean"] < 0 and m["reward_mean"] == pytest.approx(
            sum(share * G.REWARDS[o] for o, share in m["outcomes"].items()))
    assert log[1]["gflops"] > log[0]["gflops"] > 0 and log[0]["optimizer_steps"] == 4 * 8 // 4
    loaded = M.load_policy(str(tmp_path / "run" / "step-000002"))  # a sharded save loads unsharded
    assert R.read_trainer_state(str(tmp_path / "run" / "step-000002"))["kind"] == "ppo" and loaded.value_head


def test_resume_continues_with_the_same_next_update(tmp_path, killed_after_save):
    def cfg(out, **kw):
        return P.PPOConfig(model="tiny-text", updates=3, turns=8, envs=4, minibatch=4, micro_batch=2, max_new_tokens=12,
                           lr=1e-4, grad_clip=1.0, save_every=2, out=str(out), **kw)
    P.train(cfg(tmp_path / "a"))
    with killed_after_save("step-000002"):
        P.train(cfg(tmp_path / "b"))
    P.train(cfg(tmp_path / "b", resume=True))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("reward_mean", "policy_loss", "value_loss", "clipfrac", "old_approx_kl", "approx_kl", "learning_rate",
                "gflops"):
        assert abs(a[2][key] - b[2][key]) < 1e-5 * max(1.0, abs(a[2][key])), (key, a[2][key], b[2][key])
    wa = M.load_policy(str(tmp_path / "a" / "step-000003")).model.get_input_embeddings().weight
    wb = M.load_policy(str(tmp_path / "b" / "step-000003")).model.get_input_embeddings().weight
    assert (wa - wb).abs().max() < 1e-6
    kept = [os.path.exists(tmp_path / "b" / s / "optimizer.pt") for s in ("step-000002", "step-000003")]
    assert kept == [False, True]                     # only the newest checkpoint keeps the optimizer state


def test_non_finite_minibatch_is_skipped_and_counted(monkeypatch):
    policy = M.load_policy("tiny-text")
    batch = make_batch(policy, 8)
    cfg = P.PPOConfig(model="tiny-text", turns=8, minibatch=4, micro_batch=2, epochs=1, lr=1e-3, grad_clip=1.0, out="x")
    opt = P.build_optimizer(policy, cfg)
    batch.advantages[0] = float("nan")    # poisons the loss of the one minibatch that holds turn 0
    sums = P.ppo_update(policy, opt, batch, cfg, update=0, world=1)
    assert sums["skipped"] == 1 and sums["steps"] == 1
    assert all(torch.isfinite(p).all() for p in policy.parameters())


WANDB = __import__("importlib").util.find_spec("wandb") is not None  # then --wandb proj cannot fail on its absence


@pytest.mark.parametrize("args,match", [(["--task", "chess"], "unknown task 'chess'"),
                                        (["--turns", "10", "--minibatch", "4"],
                                         "turns=10 is not a multiple of minibatch=4"),
                                        (["--gamma", "1.5"], "gamma=1.5"), (["--updates", "0"], "updates=0"),
                                        (["--model", "gpt-17"], "neither a known name"),
                                        pytest.param(["--wandb", "proj"], "wandb is not installed",
                                                     marks=pytest.mark.skipif(WANDB, reason="wandb is installed"))])
def test_bad_config_is_one_line(args, match, tmp_path):
    out = subprocess.run([sys.executable, "train_ppo.py", "--out", str(tmp_path / "r"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 2 and match in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr[-500:]


def test_rewind_log_drops_the_steps_after_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4)))
    R.rewind_log(str(log), 2)  # a run killed after logging steps 3 and 4 resumes from its step-2 checkpoint
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


def test_the_official_learning_rate_schedule_and_adam_epsilon():
    """The project protocol's schedule: CosineAnnealingLR(T_max=lr_max_steps, eta_min=1e-9) stepped once per update,
    as the official trainer calls it (the official runs stepped it 8 times: tests/test_protocol.py): GP
    (T_max 100) is still at 0.91e-6 at its 20th update, V-IRL (T_max 20) at 0.21e-6 at its 15th."""
    gp, virl = P.PPOConfig(task="gp-l", out="x"), P.PPOConfig(task="virl-l", out="x")
    assert P.lr_at(0, gp.lr, gp) == pytest.approx(1e-6)
    expect = lambda t, T: 1e-9 + (1e-6 - 1e-9) * 0.5 * (1 + math.cos(math.pi * t / T))  # noqa: E731
    assert P.lr_at(19, gp.lr, gp) == pytest.approx(expect(19, 100)) == pytest.approx(0.9128e-6, rel=1e-3)
    assert P.lr_at(14, virl.lr, virl) == pytest.approx(expect(14, 20)) == pytest.approx(0.2069e-6, rel=1e-3)
    assert P.lr_at(20, virl.lr, virl) == pytest.approx(1e-9) == P.lr_at(30, virl.lr, virl)   # held at the floor
    assert P.lr_at(5, 1e-6, P.PPOConfig(lr_max_steps=10, end_lr=0.0, out="x")) == pytest.approx(0.5e-6)
    policy = M.load_policy("tiny-text")
    assert all(g["eps"] == 1e-7 for g in P.build_optimizer(policy, gp).param_groups)
    assert gp.max_new_tokens == 512 and gp.ent_coef == 0.0


def test_explained_variance_is_cleanrls():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert P.explained_variance(returns, returns) == pytest.approx(1.0)
    assert P.explained_variance(torch.full((4,), 2.5), returns) == pytest.approx(0.0)
    assert P.explained_variance(returns - 1, returns) == pytest.approx(1.0)       # a constant offset is explained
    assert P.explained_variance(returns, torch.ones(4)) is None                  # returns that do not vary


# ---- GRPO ----

def test_group_advantages_are_relative_to_the_group():
    rewards = [1.0, -1.0, 2.0, 0.0, 5.0, 3.0, 3.0]   # turns of episodes 0..3 (group 0) and 4..5 (group 1)
    episodes = [0, 0, 1, 2, 3, 4, 5]                 # episode 0 has two turns: return 0
    adv = P.group_advantages(rewards, episodes, group_size=4, use_std=False)
    # group 0 returns 0, 2, 0, 5 (mean 1.75); group 1 returns 3, 3 (mean 3)
    assert adv.tolist() == pytest.approx([-1.75, -1.75, 0.25, -1.75, 3.25, 0.0, 0.0])
    per_episode = {ep: a for ep, a in zip(episodes, adv.tolist())}
    assert sum(per_episode[e] for e in range(4)) == pytest.approx(0.0)     # a group's advantages sum to 0
    scaled = P.group_advantages(rewards, episodes, group_size=4, use_std=True)
    assert scaled[2] / scaled[4] == pytest.approx(0.25 / 3.25) and scaled[5] == 0.0   # a tied group learns nothing


class SayYesAgain(SayYes):
    def reset(self, seed=None, episode=None):
        return super().reset()


def test_grpo_raises_the_reward_of_a_toy_task(tmp_path):
    data = tmp_path / "yes_no.jsonl"
    question = [{"role": "user", "content": "Answer yes or no."}]
    data.write_text("".join(json.dumps({"messages": question, "response": r}) + "\n" for r in ("yes", "no")))
    S.train(S.SFTConfig(model="tiny-text", data=str(data), steps=30, batch_size=2, micro_batch=2, lr=1e-2,
                        warmup_steps=1, save_every=30, out=str(tmp_path / "sft")))
    cfg = P.PPOConfig(model=str(tmp_path / "sft" / "step-000030"), algo="grpo", group_size=8, updates=8, turns=32,
                      envs=32, minibatch=16, micro_batch=16, lr=3e-3, grad_clip=1.0, temperature=1.0,
                      max_new_tokens=4, save_every=8, out=str(tmp_path / "grpo"))
    P.train(cfg, env_factory=lambda update, rank: [SayYesAgain() for _ in range(32)])
    curve = [m["reward_mean"] for m in metrics(tmp_path / "grpo")]
    assert 0.2 < curve[0] < 0.8 and curve[-1] > 0.9, curve
    assert all(m["explained_variance"] is None and m["episodes"] == 32 for m in metrics(tmp_path / "grpo"))
