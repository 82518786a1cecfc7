"""--protocol official: what the official runs effectively did, beside this project's protocol. The learning rate as
accelerate stepped it on 8 processes, the effective clip, the per-task rates, the official action tokens, the
ratio guard, per-rank advantages, the extra -1 answer after a failed episode, both V-IRL per-step accuracies, and
a study that refuses to mix protocols. The reward rules themselves: tests/test_official_rules.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

import env_points as G
import env_virl as V
import evaluate as EV
import model as M
import train_ppo as P
import train_sft as S
from rollout import Episode, rollout
from tasks import make_envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the learning-rate schedule ----

def accelerate_schedule(peak: float, t_max: int, updates: int, processes: int = 8) -> list:
    """The learning rate of each update of the official run: torch's own CosineAnnealingLR, which accelerate's
    AcceleratedScheduler stepped once per process (`split_batches=False`) at each update's end."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=1e-9)
    out = []
    for _ in range(updates):
        out.append(opt.param_groups[0]["lr"])
        for _ in range(processes):
            opt.step()
            sched.step()
    return out


@pytest.mark.parametrize("task,updates,t_max,peak", [("gp-l", 20, 100, 1e-6), ("gp-vl", 20, 100, 1e-6),
                                                     ("virl-l", 15, 20, 1e-6), ("virl-vl", 15, 20, 1e-7)])
def test_official_schedule_is_accelerates_on_eight_processes(task, updates, t_max, peak):
    cfg = P.PPOConfig(task=task, protocol="official", out="x")
    assert cfg.lr == peak                               # the task's official rate: V-IRL-VL 1e-7
    ours = [P.lr_at(u, cfg.lr, cfg) for u in range(updates)]
    assert max(abs(a - b) for a, b in zip(ours, accelerate_schedule(peak, t_max, updates))) < 1e-12
    if task == "gp-l":   # down to 5e-9 at updates 12-13, back up to 0.53e-6 by the last
        assert ours[12] == pytest.approx(4.9387e-9, rel=1e-4) and ours[19] == pytest.approx(5.3186e-7, rel=1e-4)
        assert sum(ours) / updates == pytest.approx(0.4151e-6, rel=1e-3)
    project = P.PPOConfig(task=task, out="x")       # once per update, held at the floor: unchanged
    assert [P.lr_at(u, project.lr, project) for u in range(updates)] == pytest.approx(
        accelerate_schedule(peak, t_max, updates, processes=1), abs=1e-15)


def test_defaults_each_protocol_sets_and_what_stays_settable():
    official, project = P.PPOConfig(protocol="official", out="x"), P.PPOConfig(out="x")
    assert (official.grad_clip, project.grad_clip) == (1.0, 0.01)
    assert P.PPOConfig(task="virl-vl", out="x").lr == 1e-7                        # under either protocol
    assert P.PPOConfig(protocol="official", grad_clip=0.5, lr=3e-6, out="x").grad_clip == 0.5
    assert S.SFTConfig(task="gp-vl", protocol="official", out="x").lr == 5e-7
    assert S.SFTConfig(task="gp-vl", out="x").lr == 1e-4
    with pytest.raises(ValueError, match="protocol='offical': expected one of project, official"):
        P.PPOConfig(protocol="offical", out="x")
    with pytest.raises(ValueError, match="prompt_diversity"):
        S.SFTConfig(protocol="official", prompt_diversity=True, out="x")


# ---- the action log-probability ----

def weights_of(tokenizer, text: str, coef: float = 0.5) -> list:
    ids = torch.tensor(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    return P.official_action_weights(tokenizer, ids, coef).tolist(), [tokenizer.decode([i]) for i in ids.tolist()]


def test_official_action_tokens_on_answers_with_and_without_the_key():
    tok = M.load_policy("tiny-text").tokenizer
    # GP in the official template: tokens 0 and 1 never count, the rest before ' "formula":' weigh 0.5
    weights, tokens = weights_of(tok, '\n{\n  "cards": [\'A\'],\n  "number": [1],\n  "formula": "1*2*3*4=24",\n}')
    k = next(i for i in range(len(tokens) - 1) if tokens[i] == ' "' and tokens[i + 1] == "formula")
    assert weights[:2] == [0, 0] and set(weights[2:k]) == {0.5} and set(weights[k:]) == {1.0}
    # V-IRL: its "action" key is never found (the official search always looks for "formula"): the last 5 weigh 1
    weights, tokens = weights_of(tok, '\n{\n  "current observation": "No landmarks nearby; ",\n  '
                                      '"action": "forward()",\n}')
    assert weights[:2] == [0, 0] and set(weights[2:-5]) == {0.5} and weights[-5:] == [1.0] * 5
    # compact JSON has no space before the key's quote: not found either
    weights, _ = weights_of(tok, '{"cards":["A"],"number":[1],"formula":"1*2*3*4"}')
    assert weights[-5:] == [1.0] * 5 and weights[-6] == 0.5
    # under five tokens: a constant log-prob officially, so nothing here
    assert set(weights_of(tok, "ok")[0]) == {0.0}
    # six tokens: no thought, the last five
    ids = torch.arange(10, 16)
    assert P.official_action_weights(tok, ids, 0.5).tolist() == [0, 1, 1, 1, 1, 1]
    # the project's own: the key the task names, every token counted
    ids = torch.tensor(tok('{"current observation": "x", "action": "stop()"}')["input_ids"])
    assert P.action_weights(tok, ids, "action", 0.5)[0] == 0.5 and P.action_weights(tok, ids, "action", 0.5)[-1] == 1


def test_ratio_guard_and_per_rank_advantages():
    logratio, adv = torch.log(torch.tensor([0.5, 1.05, 20.0, 20.0])), torch.tensor([1.0, 1.0, 1.0, -1.0])
    plain, guarded = P.clipped_surrogate(logratio, adv, 0.1), P.clipped_surrogate(logratio, adv, 0.1, guard=True)
    assert guarded[:3].tolist() == plain[:3].tolist()      # a positive advantage: the clip decides either way
    assert plain[3] == pytest.approx(20.0) and guarded[3] == pytest.approx(1.1)   # A < 0, ratio > 10: clipped only
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert P.normalize(x, per_rank=True).tolist() == pytest.approx(((x - x.mean()) / (x.std() + 1e-5)).tolist())


# ---- environments: the answer after the last failed attempt ----

def test_official_episodes_ask_one_more_answer_and_score_it_minus_one():
    env = G.GeneralPointsEnv(G.PointsConfig(protocol="official"), seed=0)
    env.reset()
    rewards = [env.step("no formula")[1] for _ in range(5)]
    assert rewards == [-3.0] * 5 and not env.done          # officially, five failures do not end the episode
    obs, reward, done, info = env.step(env.expert_response())     # the sixth answer is never read
    assert (reward, done, info["outcome"], info["success"]) == (-1.0, True, "step_limit", False)
    project = G.GeneralPointsEnv(G.PointsConfig(), seed=0)
    project.reset()
    assert [project.step("no formula")[2] for _ in range(5)] == [False] * 4 + [True]

    route = V.NavigationEnv(V.VirlConfig(protocol="official", n_routes=5), seed=0)
    route.reset()
    first = route.step('{"action": "forward()"}')
    assert first[0].text.startswith("You failed this trial because ") and "[Output]\n{{" in first[0].text
    route.step("x")
    assert route.step(route.expert_response())[1:3] == (-1.0, True)


def test_official_expert_answers_are_the_official_template():
    env = G.GeneralPointsEnv(G.PointsConfig(protocol="official", vision=True), seed=3)
    env.reset()
    answer = env.expert_response()
    assert answer.startswith('\n{\n  "cards": [\'') and answer.endswith('=24",\n}')
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer)          # the trailing comma: the official parser reads it with its field patterns
    assert G.verify(answer, env.ranks, env.config).reward == 5.0
    project = G.GeneralPointsEnv(G.PointsConfig(vision=True), seed=3)
    project.reset()
    assert project.ranks == env.ranks   # the same deal under either protocol
    assert G.verify(project.expert_response(), env.ranks, env.config).reward == -1.5  # strict JSON cards: rejected
    examples = S.expert_examples("gp-l", 3, seed=0, revision_frac=1.0, protocol="official")
    assert all(ex["messages"][0]["content"].startswith("\n[Task Description]") for ex in examples)
    assert all(ex["messages"][-1]["content"].startswith("You failed this trial because") for ex in examples)


# ---- evaluation: both per-step accuracies ----

def test_both_virl_per_step_accuracies():
    # one route: two positions right, then two wrong at the third (the paper's count adds the answer after them)
    failed = Episode(0, success=False, outcomes=["correct", "correct", "wrong_action", "wrong_action"], finished=True)
    won = Episode(1, success=True, outcomes=["wrong_action", "correct"], finished=True)
    m = EV.summarize([failed, won], "virl-l")
    assert m["per_step_accuracy"] == pytest.approx(3 / 6) and m["per_step_accuracy_official"] == pytest.approx(3 / 7)
    # under the official protocol the extra answer is really there: the same counts
    failed.outcomes.append("step_limit")
    assert EV.summarize([failed, won], "virl-l")["per_step_accuracy_official"] == pytest.approx(3 / 7)
    assert EV.summarize([failed, won], "virl-l")["per_step_accuracy"] == pytest.approx(3 / 6)
    assert EV.headline("virl-l", "official") == "per_step_accuracy_official" and EV.headline("gp-l") == "success"


def test_official_rollout_scores_the_extra_answer_and_draws_routes_with_replacement():
    policy = M.load_policy("tiny-text")
    ro = rollout(policy, make_envs("gp-l", "id", 2, seed=0, protocol="official"), n_episodes=2, max_new_tokens=6,
                 greedy=True)
    failed = [e for e in ro.episodes if not e.success]
    assert failed and all(e.outcomes[-1] == "step_limit" and len(e.outcomes) == 6 for e in failed)
    env = make_envs("virl-l", "id", 1, seed=0, protocol="official", n_routes=3)[0]
    drawn = []
    for k in range(30):   # episode k plays a route the seeded RNG draws, not route k % 3
        env.reset(seed=k, episode=k)
        drawn.append(env.route.route_id)
    assert len(set(drawn)) > 1 and drawn != [env.routes[k % 3].route_id for k in range(30)]


# ---- a study under one protocol ----

def test_a_study_refuses_a_phase_of_the_other_protocol(tmp_path):
    S.train(S.SFTConfig(model="tiny-text", examples=4, steps=1, batch_size=2, micro_batch=2, save_every=1,
                        out=str(tmp_path / "study" / "init")))
    run = subprocess.run([sys.executable, "replicate.py", "--task", "gp-l", "--scale", "tiny", "--protocol", "official",
                          "--init-steps", "1", "--out", str(tmp_path / "study")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and "was trained under protocol project, this study runs official" in run.stderr
    dry = subprocess.run([sys.executable, "replicate.py", "--task", "gp-l", "--scale", "tiny", "--protocol", "official",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "--protocol official" in dry.stdout and "replicate-gp-l-tiny-official" in dry.stdout


# ---- rows of docs/fidelity.md that say "same" ----

def test_official_solver_accepts_the_projects_hands():
    """The official solver (restated: official_solutions) and the project's accept the same hands: here a
    deterministic sample of rank multisets under both rules (all 3640 were checked once; docs/fidelity.md)."""
    import itertools
    hands = list(itertools.combinations_with_replacement(G.RANKS, 4))[::61]
    for face10 in (True, False):
        for ranks in hands:
            values = tuple(G.card_value(r, face10) for r in ranks)
            assert bool(G.official_solutions(values)) == G.is_solvable(values), (ranks, face10)
            # every official string is a formula the project's exact verifier finds right
            assert all(G.evaluate_formula(s) == 24 for s in list(G.official_solutions(values))[:20])


@pytest.mark.parametrize("protocol", ["project", "official"])
def test_the_number_field_is_never_scored(protocol):
    cfg = G.PointsConfig(protocol=protocol)
    right = G.verify('{"cards": ["A", "2", "3", "4"], "number": [1, 2, 3, 4], "formula": "1*2*3*4"}',
                     ["A", "2", "3", "4"], cfg)
    nonsense = G.verify('{"cards": ["A", "2", "3", "4"], "number": [9, "x"], "formula": "1*2*3*4"}',
                        ["A", "2", "3", "4"], cfg)
    assert right.reward == nonsense.reward == 5.0


def test_paper_scale_commands_and_defaults_are_the_official_runs():
    """The rows of docs/fidelity.md that are the same by default or by the README's paper-scale commands: the
    official configs' values (rl/configs/*.yaml, scripts/*_training/*.sh, evaluation/configs/*.yaml)."""
    import re
    ppo, ev = P.PPOConfig(out="x"), EV.EvalConfig(out="x")
    assert (ppo.gamma, ppo.lam, ppo.clip, ppo.value_clip, ppo.vf_coef, ppo.epochs) == (0.9, 0.95, 0.1, 0.1, 0.5, 4)
    assert (ppo.ent_coef, ppo.kl_coef, ppo.adam_eps, ppo.end_lr, ppo.pre_action_coef) == (0, 0, 1e-7, 1e-9, 0.5)
    assert (ppo.temperature, ppo.max_new_tokens, P.LR_MAX_STEPS) == (0.2, 512, {"gp": 100, "virl": 20})
    assert (ev.episodes, ev.virl_routes, ev.max_new_tokens) == (234, 48, 256)
    assert (G.PointsConfig().verify_iter, V.VirlConfig().verify_iter) == (5, 2)
    for page in ("README.md", os.path.join("docs", "ppo.md")):
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        specs = re.search(r"for spec in (.*?); do", text).group(1).split()
        # task : SFT rate : PPO rate : updates, each the official run's
        assert specs == ["gp-l:1e-6:1e-6:20", "gp-vl:5e-7:1e-6:20", "virl-l:1e-6:1e-6:15", "virl-vl:5e-7:1e-7:15"]
        assert "--turns 2048 --envs 32 --minibatch 1024 --micro-batch 1 --lr $rl_lr" in text, page
