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
import eval_report as ER
import evaluate as EV
import model as M
import official as O
import train_ppo as P
import train_sft as S
from rollout import Episode, rollout
from rollout import make_envs
from launch import HANG_S

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
    assert P.normalize(x, groups=1).tolist() == pytest.approx(((x - x.mean()) / (x.std() + 1e-5)).tolist())
    halves = P.normalize(x, groups=2).tolist()  # as two official GPUs of two turns each
    assert halves == pytest.approx([-0.7071, 0.7071, -0.7071, 0.7071], abs=1e-4)
    assert P.normalize(x).tolist() == pytest.approx(((x - x.mean()) / (x.std() + 1e-8)).tolist())  # one process


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
    assert ER.headline("virl-l", "official") == "per_step_accuracy_official" and ER.headline("gp-l") == "success"


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
    mini = V.NavigationEnv(V.VirlConfig(protocol="official", routes="mini"), seed=0)  # V-IRL-VL's OOD visual routes
    played = []
    for k in range(len(mini.routes)):   # the mini benchmark is played in order, every route once
        mini.reset(seed=k, episode=k)
        played.append(mini.route.route_id)
    assert played == [r.route_id for r in mini.routes]


# ---- a study under one protocol ----

def test_a_study_refuses_a_phase_of_the_other_protocol(tmp_path):
    S.train(S.SFTConfig(model="tiny-text", examples=4, steps=1, batch_size=2, micro_batch=2, save_every=1,
                        out=str(tmp_path / "study" / "init")))
    run = subprocess.run([sys.executable, "replicate.py", "--task", "gp-l", "--scale", "tiny", "--protocol", "official",
                          "--init-steps", "1", "--out", str(tmp_path / "study")], cwd=ROOT, capture_output=True,
                         text=True, timeout=HANG_S)
    assert run.returncode == 2 and "was trained under protocol project, this study runs official" in run.stderr
    dry = subprocess.run([sys.executable, "replicate.py", "--task", "gp-l", "--scale", "tiny", "--protocol", "official",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert "--protocol official" in dry.stdout and "replicate-gp-l-tiny-official" in dry.stdout


# ---- rows of docs/fidelity.md that say "same" ----

def test_official_solver_accepts_the_projects_hands():
    """The official solver (restated: official_solutions) and the project's accept the same hands: here a
    deterministic sample of rank multisets under both rules (all 3640 were checked once; docs/fidelity.md)."""
    import itertools
    from official_rules import official_solutions as restated  # written apart from env_points: a second reading
    hands = list(itertools.combinations_with_replacement(G.RANKS, 4))[::61]
    for face10 in (True, False):
        for ranks in hands:
            values = tuple(G.card_value(r, face10) for r in ranks)
            assert bool(O.solutions(values)) == G.is_solvable(values), (ranks, face10)
            assert set(O.solutions(values)) == set(restated(list(values), 24)), (ranks, face10)
            # every official string is a formula the project's exact verifier finds right
            assert all(G.evaluate_formula(s) == 24 for s in list(O.solutions(values))[:20])


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


# The official prompts (prompt_lib/prompts.py of the official code at 5a6ea55, as the paper's appendix prints them)
# and its action space (utils_rl.py set_str_action_space), kept here as the fixture the official protocol must
# reproduce character for character.
OFFICIAL_GP_L = """
[Task Description]
You are an expert {target_number} points card game player. You will receive a set of 4 cards.
Note that {face_card_msg}, and each card must be used once.
{goal}

[Input]
Cards: {cards}

[Output]
{{
  "cards": [x, y, z, w], where {face_card_msg},
  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,
  "formula": 'an equation that equals {target_number}',
}}

"""
OFFICIAL_GP_VL = """
[Task Description]
You are an expert {target_number} points card game player. You are observing these four cards in the image.
Note that {face_card_msg}, and each card must be used once.
{goal}

[Output]
Your response should be a valid json file in the following format:
{{
  "cards": [x, y, z, w], where {face_card_msg},
  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,
  "formula": 'an equation that equals {target_number}',
}}

"""
OFFICIAL_VIRL = """
[Task Description]
{navigator}
{history_line}
Then, you need to provide the action to be taken based on the current observation and instruction.

[Instruction]
{instruction}

{view}[Action space]
{action_space}

[Observations and actions sequence]
{obs_act_seq}

[Output]
{{
  "current observation": latest observation from {latest},
  "current instruction": analyze the full instruction and identify the sentence to be executed,
  "action": the action to be taken chosen from the action space,
}}
"""
OFFICIAL_VIEW = """[Observation format]
You observe a 2x2 grid of streetview images with the following headings:
[front, right
 back, left]
You need to identify if any of the landmarks in the instruction are visible in the street view grid.

"""
# the templates' lines over 120 characters, filled in before the rest
LONG_LINES = {"goal": "Your goal is to output a formula that evaluates to {target_number} using numbers from the cards "
                      "and operators such as '+', '-', '*', '/', '(', ')', and '='.",
              "navigator": "You are an expert in navigation. You will receive a sequence of instructions to "
                           "follow{where}. You",
              "history_line": "are also provided with your observation and action history in text. Your goal is to "
                              "first analyze the instruction and identify the next sentence to be executed. "}


def official(template: str, **fields) -> str:
    """An official template with its long lines put back, then filled in."""
    for name, line in LONG_LINES.items():
        template = template.replace("{" + name + "}", line)
    return template.format(**fields)


OFFICIAL_ACTIONS = """"forward()": indicates moving forward one step
"turn_direction(x)": indicates adjust the ego agent direction towards x direction. x could be any following {}
"stop()": indicates the navigation is finished."""


@pytest.mark.parametrize("vision,face10", [(False, True), (False, False), (True, True)])
def test_official_gp_prompt_is_the_official_template(vision, face10):
    cfg = G.PointsConfig(protocol="official", vision=vision, face_cards_as_10=face10)
    faces = ("'J', 'Q', and 'K' count as '10'." if face10
             else "'J', 'Q', and 'K' count as '11', '12', and '13' respectively.")
    expected = official(OFFICIAL_GP_VL if vision else OFFICIAL_GP_L, target_number=24, face_card_msg=faces,
                        cards=["A", "2", "10", "K"])
    assert G.prompt_text(["A", "2", "10", "K"], cfg) == expected


@pytest.mark.parametrize("vision,absolute", [(False, True), (False, False), (True, True)])
def test_official_virl_prompt_is_the_official_template(vision, absolute):
    steps = ["First, turn right to face east.", "Move forward until you reach destination where Cafe is on your left."]
    history = [("No landmarks nearby; ", "turn_direction(east)")]
    current = "You observe an image of 4 views; " if vision else "Cafe is on your left; "
    choices = ("8 directions ['north', 'northeast', 'east', 'southeast', 'south', 'southwest', 'west', 'northwest']"
               if absolute else "['left', 'right', 'slightly left', 'slightly right']")
    expected = official(
        OFFICIAL_VIRL, where=" while observing your surrounding stree tviews" if vision else "",
        instruction="1. First, turn right to face east.\n2. Move forward until you reach destination where Cafe is on "
                    "your left.\n",
        view=OFFICIAL_VIEW if vision else "", action_space=OFFICIAL_ACTIONS.format(choices),
        obs_act_seq=f"O_1: No landmarks nearby; \nA_1: turn_direction(east)\nO_2: {current}\nA_2: \n",
        latest="the street view grid" if vision else "the observation sequence")
    assert V.official_prompt(steps, history, current, absolute, vision) == expected
