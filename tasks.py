"""The task table: which environment and config each task (gp-l, gp-vl, virl-l, virl-vl) plays in each
setting (id, ood_rule, ood_visual, id_heldout), read by the trainers and the evaluator alike so that they
cannot disagree, and the facts of a task's environment they need (its answer's action field, a plausible
wrong answer, how many episodes a setting has).
"""
from __future__ import annotations

import random
from dataclasses import replace

import env_points
import env_virl
from env_points import PROTOCOLS, GeneralPointsEnv, PointsConfig, check_protocol  # noqa: F401 (re-exported)
from env_virl import NavigationEnv, VirlConfig

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
    vision = task.endswith("-vl")
    if task.startswith("gp"):
        cfg = PointsConfig(vision=vision, face_cards_as_10=setting != "ood_rule",
                           suits="red" if setting == "ood_visual" else "black")
        return GeneralPointsEnv, replace(cfg, face_card_required=None, **overrides)
    cfg = VirlConfig(vision=vision, absolute_actions=setting != "ood_rule",
                     routes="mini" if setting == "ood_visual" else "synthetic:nyc",
                     route_seed=VIRL_HELDOUT_SEED if setting == "id_heldout" else VIRL_TRAIN_SEED)
    return NavigationEnv, replace(cfg, **overrides)


def image_overrides(task: str, size: int) -> dict:
    """The config override that sets a VL task's image side in pixels (GP: the card image; V-IRL: each street
    view of the 2x2 grid); none for a text task or size 0 (the environment's default)."""
    if not size or not task.endswith("-vl"):
        return {}
    return {"image_size": size} if task.startswith("gp") else {"view_size": size}


def make_envs(task: str, setting: str, n: int, seed: int, templates: int = 1, **overrides) -> list:
    """n environments of a task, seeded seed, seed + 1, ...; V-IRL ones share one parsed route list. With
    `templates` > 1 environment i words its prompts with template i % templates (prompt diversity)."""
    env_cls, cfg = env_config(task, setting, **overrides)
    first = env_cls(cfg, seed=seed)
    share = {"routes": first.routes} if env_cls is NavigationEnv else {}
    return [first] + [env_cls(replace(cfg, prompt_template=i % templates), seed=seed + i, **share)
                      for i in range(1, n)]




def env_module(task: str):
    """The environment module a task plays: env_points (GP) or env_virl (V-IRL)."""
    check_task(task)
    return env_points if task.startswith("gp") else env_virl


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
    return len(env_virl.mini_benchmark()) if setting == "ood_visual" else routes
