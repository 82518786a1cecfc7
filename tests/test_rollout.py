"""rollout.py with a scripted fake policy (exact turns, rewards, done flags), and with the tiny model."""
import gc
import json
import re

import pytest
import torch

import env_points as G
import model as M
from rollout import CONTEXT_OUTCOME, rollout
from rollout import env_config, make_envs

WRONG = '{"formula": "1+1"}'


def expert_for(conversation):
    """The expert answer for a GP-L prompt, read off the prompt text (rule and cards)."""
    prompt = conversation[0]["content"]
    ranks = json.loads(re.search(r"Your cards: (\[.*?\])", prompt).group(1))
    values = [G.card_value(r, "each count as 10" in prompt) for r in ranks]
    return json.dumps({"cards": ranks, "number": values, "formula": G.solve(values)[0]})


class ScriptedPolicy:
    """Stands in for model.Policy: answers with script(conversation) and records what it was asked."""
    def __init__(self, script, max_length=100_000):
        self.script, self.max_length, self.seen = script, max_length, []

    def encode(self, conversation, previous=None):
        chars = sum(len(t["content"]) for t in conversation)
        return {"input_ids": torch.zeros(1, chars // 4 + 1, dtype=torch.long), "conversation": list(conversation)}

    def encode_all(self, conversations, previous):
        return [self.encode(c) for c in conversations]

    def generate(self, conversations, prompts, **kwargs):
        out = []
        for p in prompts:
            self.seen.append(p["conversation"])
            text = self.script(p["conversation"])
            out.append(M.Sample(p, torch.tensor([1, 2, 3]), torch.tensor([-0.1, -0.2, -0.3]), 0.5, text, True))
        return out


def gp_envs(n, **overrides):
    return make_envs("gp-l", "id", n, seed=0, **overrides)


def test_expert_policy_solves_every_episode():
    policy = ScriptedPolicy(expert_for)
    r = rollout(policy, gp_envs(3), n_episodes=10)
    assert len(r.turns) == 10 and len(r.episodes) == 10 and not r.bootstrap
    assert [e.id for e in r.episodes] == list(range(10))
    assert all(t.reward == 5.0 and t.done for t in r.turns)
    assert all(e.success and e.finished and e.attempts == 1 and e.outcomes == ["correct"] for e in r.episodes)
    assert sorted({t.episode for t in r.turns}) == list(range(10))


def test_wrong_then_right_revises_in_the_same_conversation():
    policy = ScriptedPolicy(lambda conv: WRONG if len(conv) == 1 else expert_for(conv))
    r = rollout(policy, gp_envs(2), n_episodes=4)
    assert len(r.turns) == 8
    for ep in range(4):
        turns = [t for t in r.turns if t.episode == ep]
        assert [t.reward for t in turns] == [-2.0, 5.0] and [t.done for t in turns] == [False, True]
    assert all(e.success and e.outcomes == ["wrong_numbers", "correct"] for e in r.episodes)
    second = [c for c in policy.seen if len(c) == 3][0]
    assert second[0]["role"] == "user" and second[1] == {"role": "assistant", "content": WRONG}
    assert second[2]["role"] == "user" and second[2]["content"].startswith("You failed this trial because")


@pytest.mark.parametrize("verify_iter", [1, 3, 5])
def test_always_failing_policy_uses_exactly_verify_iter_attempts(verify_iter):
    r = rollout(ScriptedPolicy(lambda conv: "no idea"), gp_envs(2, verify_iter=verify_iter), n_episodes=3)
    assert len(r.turns) == 3 * verify_iter
    for e in r.episodes:
        assert e.attempts == verify_iter and not e.success and e.finished
        assert e.outcomes == ["illegal_formula"] * verify_iter and e.total_reward == -3.0 * verify_iter
    assert [t.done for t in r.turns if t.episode == 0] == [False] * (verify_iter - 1) + [True]


def test_virl_failing_policy_ends_the_route_at_its_first_position():
    envs = make_envs("virl-l", "id", 2, seed=0, n_routes=4)
    r = rollout(ScriptedPolicy(lambda conv: '{"action": "stop()"}'), envs, n_episodes=2)
    for e in r.episodes:  # the first position is a turn: both attempts fail and the route ends there
        assert not e.success and e.finished and e.outcomes == ["wrong_action", "wrong_action"]
    assert len(r.turns) == sum(e.attempts for e in r.episodes) == 4
    assert [t.done for t in r.turns if t.episode == 0] == [False, True]


def test_turn_budget_stops_exactly_and_keeps_bootstrap_prompts():
    policy = ScriptedPolicy(lambda conv: WRONG)
    r = rollout(policy, gp_envs(4), n_turns=7)
    assert len(r.turns) == 7
    unfinished = [e for e in r.episodes if not e.finished]
    assert unfinished and set(r.bootstrap) == {e.id for e in unfinished}
    assert all(isinstance(p["input_ids"], torch.Tensor) for p in r.bootstrap.values())


def test_a_rollout_freezes_older_objects_for_its_duration_only():
    frozen_while_playing = []

    def wrong(conversation):
        frozen_while_playing.append(gc.get_freeze_count())
        return WRONG
    assert gc.get_freeze_count() == 0
    rollout(ScriptedPolicy(wrong), gp_envs(2), n_turns=4)
    assert len(frozen_while_playing) == 4 and min(frozen_while_playing) > 0  # full collections skip them
    assert gc.get_freeze_count() == 0  # counted again after, their cyclic garbage collected as before
    gc.freeze()  # a process that froze objects itself keeps them frozen
    try:
        rollout(ScriptedPolicy(wrong), gp_envs(2), n_turns=2)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_context_overflow_ends_the_episode_not_the_run():
    policy = ScriptedPolicy(lambda conv: WRONG, max_length=None)
    first = len(policy.encode([{"role": "user", "content": gp_envs(1)[0].reset().text}])["input_ids"][0])
    policy.max_length = first + 10 + 40  # room for the first prompt, not for a revision
    r = rollout(policy, gp_envs(2), n_episodes=3, max_new_tokens=10)
    assert all(e.outcomes == ["wrong_numbers", CONTEXT_OUTCOME] and not e.success for e in r.episodes)
    assert len(r.turns) == 3
    policy.max_length = 5
    with pytest.raises(ValueError, match="exceeds the context"):
        rollout(policy, gp_envs(1), n_episodes=1, max_new_tokens=10)


def test_task_table():
    _, cfg = env_config("gp-vl", "ood_visual")
    assert cfg.vision and cfg.suits == "red" and cfg.face_cards_as_10
    _, cfg = env_config("gp-l", "ood_rule")
    assert not cfg.face_cards_as_10 and cfg.face_card_required and cfg.suits == "black"
    _, cfg = env_config("virl-vl", "ood_visual")
    assert cfg.routes == "mini" and cfg.vision and cfg.absolute_actions
    _, cfg = env_config("virl-l", "ood_rule", n_routes=7)
    assert not cfg.absolute_actions and cfg.n_routes == 7
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        env_config("chess")
    with pytest.raises(ValueError, match="no setting 'ood_visual'"):
        env_config("gp-l", "ood_visual")
    envs = make_envs("virl-l", "id", 3, seed=5, n_routes=10)
    assert envs[0].routes is envs[2].routes and envs[0].rng.random() != envs[1].rng.random()


def test_rollout_with_the_tiny_model_records_what_ppo_needs():
    policy = M.load_policy("tiny-text")
    torch.manual_seed(0)
    r = rollout(policy, gp_envs(3), n_turns=6, max_new_tokens=8, temperature=1.0)
    assert len(r.turns) == 6 and r.tokens > 0
    batch = policy.collate([t.prompt for t in r.turns], [t.response_ids for t in r.turns])
    with torch.no_grad():
        out = policy(batch)
    for i, t in enumerate(r.turns):
        assert (out["logprobs"][i, :len(t.response_ids)] - t.logprobs).abs().max() < 1e-4
        assert abs(out["values"][i].item() - t.value) < 1e-4
        assert t.reward in G.REWARDS.values()
    # the prefix cache was sized from the batch: every row's first prompt and answer, twice over
    first = max(t.prompt["input_ids"].shape[1] for t in r.turns[:3])
    assert r.cache_size == max(1024, 2 * 3 * (first + 8)) and r.cached_tokens > 0
    assert rollout(policy, gp_envs(3), n_turns=3, max_new_tokens=8, cache_tokens=0).cache_size == 0


@pytest.mark.parametrize("task", ["gp-l", "virl-l"])
def test_every_prompt_of_a_tiny_model_rollout_is_its_conversations_whole_encoding(task):
    """Rounds of random answers (newlines, spaces and unicode where the tokenizer's pieces are cut) encoded a turn
    at a time, lines looked up from earlier rounds: each turn's prompt holds the ids the chat template and the
    tokenizer give the whole conversation, rebuilt from the episode's answers (a failed attempt continues it)."""
    policy = M.load_policy("tiny-text")
    torch.manual_seed(0)
    r = rollout(policy, make_envs(task, "id", 6, seed=3), n_turns=6 * 8, max_new_tokens=24, temperature=1.0)
    by_episode = {}
    for turn in r.turns:
        by_episode.setdefault(turn.episode, []).append(turn)
    checked = 0
    for ep in r.episodes:
        conversation = []
        for k, (turn, answer) in enumerate(zip(by_episode.get(ep.id, []), ep.answers)):
            if k and ep.answers[k - 1]["outcome"] != "correct":
                conversation += [{"role": "assistant", "content": ep.answers[k - 1]["response"]}]
            else:
                conversation = []
            conversation += [{"role": "user", "content": answer["observation"]}]
            whole = policy.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
            assert turn.prompt["input_ids"][0].tolist() == list(whole["input_ids"]), (ep.id, k)
            checked += len(conversation) > 1
    assert checked >= 6
    assert any("\n" in a["response"] for ep in r.episodes for a in ep.answers)  # the cuts were tried
