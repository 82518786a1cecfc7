"""Batched multi-turn episodes with sequential revision, shared by PPO and evaluation.

Every live environment contributes its current conversation; one batched `policy.generate` per
round answers all of them; each environment steps on its answer. A feedback observation
(`continues=True`) is appended to the conversation after the assistant's answer; a fresh one
(`continues=False`) starts a new conversation. Finished episodes are replaced by new ones until the
requested number of turns or episodes is reached.

The environments come in (`tasks.make_envs`); the policy is anything with `encode` and `generate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm import tqdm

from generation import PrefixCache

# ---- records ----

CONTEXT_OUTCOME = "context_exceeded"  # the conversation no longer fits the model: the episode fails


@dataclass
class Turn:
    """One answer: what PPO trains on."""
    prompt: dict                # encoded prompt, batch dim 1
    response_ids: torch.Tensor  # (R,)
    logprobs: torch.Tensor      # (R,) at sampling time
    value: float                # V(prompt) at sampling time
    reward: float
    done: bool                  # the episode ended with this answer
    episode: int                # episode id, unique within one rollout call


@dataclass
class Episode:
    id: int
    success: bool = False
    total_reward: float = 0.0
    outcomes: list = field(default_factory=list)    # verifier outcome of every attempt
    recognized: list = field(default_factory=list)  # VL: per attempt, were the cards / intersection right
    answers: list = field(default_factory=list)     # per attempt: {"observation", "response", "outcome", "reward"}
    finished: bool = False                          # False: cut off by the turn budget

    @property
    def attempts(self) -> int:
        return len(self.outcomes)


@dataclass
class Rollout:
    turns: list
    episodes: list                                  # in episode-id order
    bootstrap: dict = field(default_factory=dict)   # episode id -> encoded next prompt of an unfinished episode
    tokens: int = 0                                 # prompt + generated tokens read or written by the policy
    cached_tokens: int = 0                          # of the prompt tokens, those served by the prefix cache


# ---- the loop ----

def rollout(policy, envs: list, *, n_turns: Optional[int] = None, n_episodes: Optional[int] = None,
            reset: Optional[Callable] = None, max_new_tokens: int = 256, temperature: Optional[float] = None,
            top_p: float = 1.0, top_k: int = 0, greedy: bool = False, max_context: Optional[int] = None,
            cache_tokens: int = 32768, progress: bool = False, desc: str = "rollout") -> Rollout:
    """Play episodes on `envs` in lockstep, one batched generate per round.

    Stops after `n_turns` answers (unfinished episodes keep their next prompt in `bootstrap`) or
    after `n_episodes` episodes have finished. `reset(env, k)` starts episode k on an env (default
    `env.reset()`): evaluation passes one that fixes episode k's deal or route. A conversation whose
    prompt plus `max_new_tokens` exceeds `max_context` (default: the model's limit) ends its episode
    as a failure with outcome "context_exceeded" and no turn. Prompt prefixes already read (the previous
    attempt, the task's instructions) are served from a `model.PrefixCache` of up to `cache_tokens`
    tokens (0: off), valid for this call's weights only."""
    if (n_turns is None) == (n_episodes is None):
        raise ValueError("rollout needs exactly one of n_turns or n_episodes")
    reset = reset or (lambda env, k: env.reset())
    cache = PrefixCache(cache_tokens) if cache_tokens > 0 else None
    max_context = max_context or policy.max_length
    out = Rollout([], [])
    episodes = {}
    live = {}  # env index -> (episode id, conversation)
    started = 0

    def start(i):
        nonlocal started
        if n_episodes is not None and started >= n_episodes:
            return
        obs = reset(envs[i], started)
        live[i] = (started, [{"role": "user", "content": obs.text, "image": obs.image}])
        episodes[started] = Episode(started)
        started += 1

    for i in range(len(envs)):
        start(i)
    total = n_turns if n_turns is not None else n_episodes
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    while live and (n_turns is None or len(out.turns) < n_turns):
        order = sorted(live)
        if n_turns is not None:
            order = order[:n_turns - len(out.turns)]
        prompts = [policy.encode(live[i][1]) for i in order]
        fits = [p["input_ids"].shape[1] + max_new_tokens <= max_context for p in prompts]
        for i, ok in zip(order, fits):
            if not ok:
                ep = episodes[live.pop(i)[0]]
                if not ep.outcomes:
                    raise ValueError(f"a first prompt of {prompts[order.index(i)]['input_ids'].shape[1]} tokens plus "
                                     f"max_new_tokens={max_new_tokens} exceeds the context of {max_context} tokens: "
                                     "lower max_new_tokens or use a model with a longer context")
                ep.outcomes.append(CONTEXT_OUTCOME)
                ep.finished = True
                bar.update(n_episodes is not None)
                start(i)
        order = [i for i, ok in zip(order, fits) if ok]
        prompts = [p for p, ok in zip(prompts, fits) if ok]
        if not order:
            continue
        samples = policy.generate(None, prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k, greedy=greedy, cache=cache)
        for i, sample in zip(order, samples):
            ep_id, conversation = live[i]
            ep = episodes[ep_id]
            obs, reward, done, info = envs[i].step(sample.text)
            out.tokens += sample.prompt["input_ids"].shape[1] + len(sample.response_ids)
            out.turns.append(Turn(sample.prompt, sample.response_ids, sample.logprobs, sample.value, reward, done,
                                  ep_id))
            ep.total_reward += reward
            ep.outcomes.append(info["outcome"])
            ep.recognized.append(info.get("recognized"))
            ep.answers.append({"observation": conversation[-1]["content"], "response": sample.text,
                               "outcome": info["outcome"], "reward": reward})
            bar.update(n_turns is not None)
            if done:
                ep.success, ep.finished = bool(info["success"]), True
                del live[i]
                bar.update(n_episodes is not None)
                start(i)
            elif obs.continues:
                conversation += [{"role": "assistant", "content": sample.text},
                                 {"role": "user", "content": obs.text, "image": obs.image}]
            else:
                live[i] = (ep_id, [{"role": "user", "content": obs.text, "image": obs.image}])
    bar.close()
    out.bootstrap = {ep_id: policy.encode(conv) for ep_id, conv in live.values()}
    out.cached_tokens = cache.reused if cache is not None else 0
    out.episodes = [episodes[k] for k in sorted(episodes)]
    return out
