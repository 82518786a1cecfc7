"""The tasks and their episodes, shared by SFT, PPO and evaluation: which environment and config each task (gp-l,
gp-vl, virl-l, virl-vl) plays in each setting (id, ood_rule, ood_visual, id_heldout), read by the trainers and the
evaluator alike so that they cannot disagree; and batched multi-turn episodes with sequential revision.

Every live environment contributes its current conversation; one batched `policy.generate` per
round answers all of them; each environment steps on its answer. A feedback observation
(`continues=True`) is appended to the conversation after the assistant's answer; a fresh one
(`continues=False`) starts a new conversation. Finished episodes are replaced by new ones until the
requested number of turns or episodes is reached.

The environments come from `make_envs`, each task's module imported when a task asks for it (a GeneralPoints run
never loads V-IRL and its street-view renderer); the policy is anything with `encode_all` and `generate`.
"""
from __future__ import annotations

import contextlib
import gc
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from tqdm import tqdm

from env_points import PROTOCOLS, check_protocol  # noqa: F401 (the protocols, for the scripts)
from model import PrefixCache, prefix_cache_tokens

# ---- the tasks ----

TASKS = ("gp-l", "gp-vl", "virl-l", "virl-vl")
SETTINGS = {"gp-l": ("id", "ood_rule"), "gp-vl": ("id", "ood_rule", "ood_visual"),
            "virl-l": ("id", "ood_rule", "id_heldout"), "virl-vl": ("id", "ood_rule", "ood_visual", "id_heldout")}
VIRL_TRAIN_SEED, VIRL_HELDOUT_SEED = 0, 1  # the training routes and other routes of the ID city
# The official runs' learning rates. PPO: scripts/*_training/*.sh (V-IRL-VL 1e-7, the others 1e-6). SFT: the rates
# the official sft/sft_scripts/gp_l.sh lists (1e-6 for GP-L, 5e-7 and 1e-6 commented out beside it) as the paper's
# appendix assigns them: the language tasks 1e-6, the vision-language ones 5e-7.
OFFICIAL_PPO_LR = {"gp-l": 1e-6, "gp-vl": 1e-6, "virl-l": 1e-6, "virl-vl": 1e-7}
OFFICIAL_SFT_LR = {"gp-l": 1e-6, "gp-vl": 5e-7, "virl-l": 1e-6, "virl-vl": 5e-7}


def check_task(task: str, setting: str = "id") -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    if setting not in SETTINGS[task]:
        raise ValueError(f"task {task} has no setting {setting!r}: expected one of {', '.join(SETTINGS[task])}")


def env_config(task: str, setting: str = "id", **overrides):
    """The environment class and config of a task in a setting.

    GP:    id = J/Q/K are 10, black suits; ood_rule = J/Q/K are 11/12/13 (a face card in every
           hand); ood_visual = red suits.
    V-IRL: id = compass actions on the training routes in "nyc" (as the paper evaluates: memorizing
           them shows); ood_rule = relative actions on the same routes; ood_visual = the 18-route mini
           benchmark in nine other cities; id_heldout = compass actions on routes of "nyc" never trained on.
    `overrides` set config fields (verify_iter, n_routes, route_seed, protocol, ...)."""
    check_task(task, setting)
    vision, env = task.endswith("-vl"), env_module(task)
    if task.startswith("gp"):
        cfg = env.PointsConfig(vision=vision, face_cards_as_10=setting != "ood_rule",
                           suits="red" if setting == "ood_visual" else "black")
        return env.GeneralPointsEnv, replace(cfg, face_card_required=None, **overrides)
    cfg = env.VirlConfig(vision=vision, absolute_actions=setting != "ood_rule",
                     routes="mini" if setting == "ood_visual" else "synthetic:nyc",
                     route_seed=VIRL_HELDOUT_SEED if setting == "id_heldout" else VIRL_TRAIN_SEED)
    return env.NavigationEnv, replace(cfg, **overrides)


def image_overrides(task: str, size: int) -> dict:
    """The config override that sets a VL task's image side in pixels (GP: the card image; V-IRL: each street
    view of the 2x2 grid); none for a text task or size 0 (the environment's default)."""
    if not size or not task.endswith("-vl"):
        return {}
    return {"image_size": size} if task.startswith("gp") else {"view_size": size}


def env_overrides(task: str, verify_iter: int = 0, image_size: int = 0, protocol: str = "project") -> dict:
    """The environment config a script's flags set: attempts per episode / position (0: the task's), a VL task's
    image side (0: the default) and the protocol. Checked here: a bad value fails before any work."""
    overrides = {"protocol": protocol, **({"verify_iter": verify_iter} if verify_iter else {}),
                 **image_overrides(task, image_size)}
    env_config(task, "id", **overrides)
    return overrides


def make_envs(task: str, setting: str, n: int, seed: int, templates: int = 1, **overrides) -> list:
    """n environments of a task, seeded seed, seed + 1, ...; V-IRL ones share one parsed route list. With
    `templates` > 1 environment i words its prompts with template i % templates (prompt diversity)."""
    env_cls, cfg = env_config(task, setting, **overrides)
    first = env_cls(cfg, seed=seed)
    share = {"routes": first.routes} if task.startswith("virl") else {}
    return [first] + [env_cls(replace(cfg, prompt_template=i % templates), seed=seed + i, **share)
                      for i in range(1, n)]




def env_module(task: str):
    """The environment module a task plays: env_points (GP) or env_virl (V-IRL), imported on first use."""
    check_task(task)
    if task.startswith("gp"):
        import env_points
        return env_points
    import env_virl
    return env_virl


def action_field(task: str) -> str:
    """The answer field that is the action itself ("formula", "action"); PPO weights the tokens before it."""
    return env_module(task).ACTION_FIELD


def wrong_answer(task: str, expert: str, rng: random.Random) -> str:
    """A plausible mistake made from an expert answer: revision examples for SFT."""
    return env_module(task).wrong_answer(expert, rng)


def evaluation_episodes(task: str, setting: str, episodes: int, routes: int) -> int:
    """Episodes a setting is evaluated on: GP `episodes` hands; V-IRL `routes` routes, or the whole mini
    benchmark for OOD visuals."""
    if task.startswith("gp"):
        return episodes
    return len(env_module(task).mini_benchmark()) if setting == "ood_visual" else routes


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
    cache_size: int = 0                             # tokens the prefix cache could hold (0: none)


# ---- the loop ----

@contextlib.contextmanager
def older_objects_frozen():
    """Python's full garbage collections skip the objects that existed before (`gc.freeze`), and count them again
    after (`gc.unfreeze`: cyclic garbage among them is then collected as before). A process that holds torch,
    transformers and a model tracks about 370,000 objects: walking them all took 165-212 ms, every 15 rounds or so
    of a batch-512 rollout, the GPU idle meanwhile. A process that froze objects itself is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@older_objects_frozen()
def rollout(policy, envs: list, *, n_turns: Optional[int] = None, n_episodes: Optional[int] = None,
            reset: Optional[Callable] = None, max_new_tokens: int = 256, temperature: Optional[float] = None,
            top_p: float = 1.0, top_k: int = 0, greedy: bool = False, max_context: Optional[int] = None,
            cache_tokens: Optional[int] = None, progress: bool = False, desc: str = "rollout") -> Rollout:
    """Play episodes on `envs` in lockstep, one batched generate per round.

    Stops after `n_turns` answers (unfinished episodes keep their next prompt in `bootstrap`) or
    after `n_episodes` episodes have finished. `reset(env, k)` starts episode k on an env (default
    `env.reset()`): evaluation passes one that fixes episode k's deal or route. A conversation whose
    prompt plus `max_new_tokens` exceeds `max_context` (default: the model's limit) ends its episode
    as a failure with outcome "context_exceeded" and no turn. Prompt prefixes already read (the previous
    attempt, the task's instructions) are served from a `model.PrefixCache` of up to `cache_tokens`
    tokens (None: sized from the first round's batch, `model.prefix_cache_tokens`; 0: off), valid for this call's
    weights only."""
    if (n_turns is None) == (n_episodes is None):
        raise ValueError("rollout needs exactly one of n_turns or n_episodes")
    reset = reset or (lambda env, k: env.reset())
    cache = None  # made at the first round, when its batch is known
    max_context = max_context or policy.max_length
    out = Rollout([], [])
    episodes = {}
    live = {}  # env index -> (episode id, conversation, its encoding without the last two turns or None)
    started = 0

    def start(i):
        nonlocal started
        if n_episodes is not None and started >= n_episodes:
            return
        obs = reset(envs[i], started)
        live[i] = (started, [{"role": "user", "content": obs.text, "image": obs.image}], None)
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
        prompts = policy.encode_all([live[i][1] for i in order], [live[i][2] for i in order])  # a turn's tokens
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
        if cache is None and cache_tokens != 0:
            cache = PrefixCache(cache_tokens or prefix_cache_tokens(
                policy, len(envs), max(p["input_ids"].shape[1] for p in prompts), max_new_tokens))
        samples = policy.generate(None, prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k, greedy=greedy, cache=cache)
        for i, sample in zip(order, samples):
            ep_id, conversation, _ = live[i]
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
                live[i] = (ep_id, conversation, sample.prompt)
            else:
                live[i] = (ep_id, [{"role": "user", "content": obs.text, "image": obs.image}], None)
    bar.close()
    unfinished = list(live.values())
    out.bootstrap = dict(zip([ep_id for ep_id, _, _ in unfinished],
                             policy.encode_all([c for _, c, _ in unfinished], [p for _, _, p in unfinished])))
    out.cached_tokens, out.cache_size = (cache.reused, cache.max_tokens) if cache is not None else (0, 0)
    out.episodes = [episodes[k] for k in sorted(episodes)]
    return out
