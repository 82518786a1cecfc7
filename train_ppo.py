"""PPO with GAE and sequential revision: rollouts -> advantages -> clipped policy and value losses.

Each update collects a fixed number of answers ("turns") with `rollout.py`, every rank from its
own environments and seeds; computes returns and advantages with GAE over each episode's turns;
then runs PPO epochs over shuffled minibatches. The defaults are the official code's (gamma 0.9,
lambda 0.95, clip 0.1 for ratios and values, 4 epochs, value coefficient 0.5, max grad norm 0.01, Adam
lr 1e-6 (V-IRL-VL 1e-7) and eps 1e-7 on a cosine toward 1e-9 over 100 updates for GP and 20 for V-IRL, temperature 0.2,
answers up to 512 tokens, no entropy bonus: its config names 0.01 but its loss leaves it out, no KL
penalty); the turn counts are sized for a CPU. docs/fidelity.md compares every point.

    python train_ppo.py --task gp-l --model runs/sft-gp-l/step-000020        # from an SFT checkpoint
    python train_ppo.py --task gp-l --model runs/sft-gp-l/step-000020 --resume
    torchrun --nproc_per_node 8 train_ppo.py --task gp-vl --model runs/sft-gp-vl \\
        --updates 20 --turns 2048 --envs 32 --minibatch 1024 --micro-batch 1   # the official run's sizes

`--algo grpo` replaces GAE and the value head by group-relative advantages (DeepSeekMath's GRPO): each update
plays `--turns` whole episodes in groups of `--group-size` on the same hand or route, every turn of an episode
gets its episode's return minus its group's mean (divided by the group's std unless --no-group-std), and the
value loss is off; the clipped ratio, the action log-probability and everything else stay as they are.

The action log-probability. The paper (following RL4VLM) treats a whole response as one action:
its log-probability is the sum of the response's token log-probs, with the tokens before the final
action field ("formula" for GP, "action" for V-IRL: the reasoning and the other fields) weighted by
`pre_action_coef` (0.5), and PPO takes one ratio per response. `--token-level` switches to the
common LLM choice instead: every token is an action with its own ratio, all sharing the response's
advantage. Both are in `policy_loss`, side by side.

Every update re-seeds the environments and the sampler from (seed, update, rank), so a resumed run
continues exactly as the uninterrupted one would, from the checkpoint's weights and optimizer state.

`--protocol official` runs what the official runs effectively did instead of this project's deliberate choices,
as one set (docs/fidelity.md): the official verifier, feedback, answer template and extra -1 answer in the
environments; the cosine advanced `--official-processes` (8) steps per update, as accelerate advanced it on the
official 8 GPUs, rising again past its period; gradients clipped at 1.0 (DeepSpeed's, the configured 0.01 never
applied); the official action tokens (`official_action_weights`); advantages normalized over each official
process's share of the turns; and a response
whose ratio exceeds 10 trained on the clipped term alone. The learning rate defaults to the task's official one
under either protocol (1e-6; V-IRL-VL 1e-7).
"""
from __future__ import annotations

import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

import model as M
import runs as R
from rollout import OFFICIAL_PPO_LR, action_field, check_protocol, check_task, env_overrides, make_envs, rollout
from runs import check_writable, main, require

# the official runs' cosine period (CosineAnnealingLR T_max, scripts/*_training/*.sh of the paper's code): GP 100,
# V-IRL 20; in scheduler steps, of which the official runs took 8 per update (lr_at)
LR_MAX_STEPS = {"gp": 100, "virl": 20}
RECIPE = "task model algo lr turns envs minibatch micro_batch protocol seed"  # what --resume must find as it was

# ---- config ----


@dataclass
class PPOConfig:
    """PPO with GAE and sequential revision, from an SFT checkpoint or a model name."""
    task: str = "gp-l"
    """gp-l, gp-vl, virl-l or virl-vl (trains on the ID setting)"""
    model: str = "smollm2-135m"
    """checkpoint, run folder (its last checkpoint) or model name to start from (normally SFT)"""
    updates: int = 4
    """PPO updates (rollout + epochs)"""
    turns: int = 32
    """answers collected per update, all ranks together (grpo: episodes, in whole groups)"""
    envs: int = 8
    """environments played at once on one rank (the generation batch); fewer than turns, so revisions happen"""
    algo: str = "ppo"
    """ppo: advantages by GAE from the value head (the paper's); grpo: group-relative, no value loss"""
    group_size: int = 4
    """grpo: episodes played on the same hand or route, whose returns are compared"""
    group_std: bool = True
    """grpo: divide a group's advantages by its standard deviation (off: Dr. GRPO's unbiased variant)"""
    epochs: int = 4
    """PPO epochs over each update's turns"""
    minibatch: int = 16
    """turns per optimizer step, all ranks together"""
    micro_batch: int = 4
    """turns per forward pass on one rank (gradient accumulation)"""
    protocol: str = "project"
    """project (this project's rules) or official (what the official run effectively did: docs/fidelity.md)"""
    official_processes: int = 8
    """official protocol: the official run's process count, which set how far accelerate advanced the cosine per
    update (its 8 GPUs: 8 steps)"""
    lr: Optional[float] = None
    """Adam learning rate at the first update; default: the task's official one (1e-6; V-IRL-VL 1e-7)"""
    lr_max_steps: int = 0
    """updates for the cosine from lr to end_lr; 0: the task's (GP 100, V-IRL 20)"""
    end_lr: float = 1e-9
    """learning rate at the end of the cosine (the official 1e-9)"""
    adam_eps: float = 1e-7
    """Adam epsilon (the official 1e-7)"""
    value_lr: float = 0.0
    """learning rate of the value head; 0: the same as lr (the paper)"""
    gamma: float = 0.9
    """discount between the turns of an episode"""
    lam: float = 0.95
    """GAE lambda"""
    clip: float = 0.1
    """PPO ratio clip"""
    value_clip: float = 0.1
    """value clip around the rollout's value; 0: unclipped"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    ent_coef: float = 0.0
    """entropy bonus coefficient (the paper: off)"""
    kl_coef: float = 0.0
    """KL penalty to the initial policy (the paper: off; on keeps a frozen copy)"""
    grad_clip: Optional[float] = None
    """max gradient norm; default: 0.01 (the official configs' value); official protocol: 1.0 (DeepSpeed's, the
    norm the official run applied: its configured 0.01 never ran)"""
    pre_action_coef: float = 0.5
    """weight of the tokens before the action field in the response's log-prob"""
    token_level: bool = False
    """one ratio per token instead of the paper's one per response"""
    recompute_logprobs: Optional[bool] = None
    """re-score rollouts with the training forward; default: with bf16"""
    temperature: float = 0.2
    """sampling temperature (the paper's 0.2); log-probs are of the scaled distribution"""
    top_p: Optional[float] = None
    """nucleus sampling mass; default: the checkpoint's generation config (Llama-3.2-Vision: 0.9)"""
    top_k: Optional[int] = None
    """top-k sampling, 0: off; default: the checkpoint's generation config (Llama-3.2-Vision: 50)"""
    max_new_tokens: int = 512
    """longest answer (the official 512)"""
    engine: Optional[bool] = None
    """generate with engine.py: a static cache and, on a GPU, a compiled decode step (text models); default: on a
    GPU for a text model"""
    verify_iter: int = 0
    """attempts per episode / position; 0: the task's (GP 5, V-IRL 2)"""
    image_size: int = 0
    """VL tasks: image side in pixels (GP cards, each V-IRL view); 0: the default"""
    save_every: int = 2
    """checkpoint every N updates (and at the end)"""
    out: str = ""
    """run folder; empty: runs/ppo-<task>"""
    time_limit: float = 0.0
    """seconds after which the run saves a checkpoint and stops (0: none); --resume continues it"""
    resume: bool = False
    """continue from the run folder's last complete checkpoint"""
    resume_changed: bool = False
    """with --resume: go on though the recipe (the fields RECIPE names: task, model, rate, batch sizes, protocol,
    seed, ...) differs from the run's, which is refused otherwise; said in the log"""
    overwrite: bool = False
    """delete the checkpoints already in the run folder and start over"""
    seed: int = 0
    """seed of environments, sampling and minibatch order"""
    device: str = ""
    """cuda, cpu, ...; empty: the GPU when there is one"""
    grad_checkpointing: str = "auto"
    """auto (on a GPU when the estimated memory needs it), on or off"""
    compile: bool = False
    """torch.compile the transformer body for the epochs (one process)"""
    precision: str = "auto"
    """auto (GPU: bf16, CPU: fp32), bf16 (over fp32 master weights) or fp32"""
    wandb: str = ""
    """log to this Weights & Biases project too (needs `pip install wandb`)"""

    def __post_init__(self):
        check_task(self.task)
        check_protocol(self.protocol)
        self.lr = self.lr if self.lr is not None else OFFICIAL_PPO_LR[self.task]
        self.grad_clip = self.grad_clip if self.grad_clip is not None else (
            1.0 if self.protocol == "official" else 0.01)
        require(self, "updates turns envs epochs minibatch micro_batch max_new_tokens save_every official_processes",
                lambda v: v >= 1, "a positive integer")
        require(self, "lr_max_steps verify_iter image_size top_k", lambda v: v >= 0,
                "0 (the default) or a positive integer")
        require(self, "lr adam_eps clip grad_clip", lambda v: v > 0, "a positive number")
        require(self, "temperature", lambda v: v >= M.MIN_TEMPERATURE, f"at least {M.MIN_TEMPERATURE} (below it the "
                "tempered log-probabilities PPO compares overflow or are rounding noise)")
        require(self, "value_lr end_lr value_clip vf_coef ent_coef kl_coef pre_action_coef time_limit",
                lambda v: v >= 0, "0 or a positive number")
        require(self, "gamma lam", lambda v: 0 <= v <= 1, "a value between 0 and 1")
        require(self, "top_p", lambda v: 0 < v <= 1, "a share in (0, 1]")
        require(self, "grad_checkpointing", lambda v: v in ("auto", "on", "off"), "auto, on or off")
        if self.turns % self.minibatch:
            raise ValueError(f"turns={self.turns} is not a multiple of minibatch={self.minibatch}")
        require(self, "algo", lambda v: v in ("ppo", "grpo"), "ppo or grpo")
        require(self, "group_size", lambda v: v >= 2, "an integer of at least 2 (a group compares its episodes)")
        if self.algo == "grpo" and self.turns % self.group_size:
            raise ValueError(f"turns={self.turns} is not a multiple of group_size={self.group_size}: with grpo, "
                             "turns counts the episodes of an update, in whole groups")
        M.compute_dtype_of(self.precision, "cpu")  # a bad name fails here, before any work
        M.check_device(self.device)
        self.out = self.out or os.path.join("runs", f"ppo-{self.task}")
        check_writable(self.out)


# ---- pure helpers: advantages and losses ----

def gae(rewards: list, values: list, dones: list, episodes: list, bootstrap: dict, gamma: float, lam: float):
    """Returns and advantages of turns listed in collection order (episodes interleaved).

    Within an episode, turn t's TD error is r_t + gamma V_{t+1} - V_t, where V_{t+1} is the value of
    the episode's next turn, or `bootstrap[episode]` (V of its next prompt) for the last collected turn
    of an unfinished episode, or 0 after the turn that ended it: nothing flows across episode ends.
    A_t = delta_t + gamma lam A_{t+1}; return_t = A_t + V_t. -> (advantages (T,), returns (T,))"""
    adv = [0.0] * len(rewards)
    by_episode = {}
    for i, ep in enumerate(episodes):
        by_episode.setdefault(ep, []).append(i)
    for ep, idx in by_episode.items():
        next_value, next_adv = bootstrap.get(ep, 0.0), 0.0  # a finished episode has no bootstrap entry
        for i in reversed(idx):
            if dones[i]:  # the turn that ended the episode: nothing after it
                next_value = next_adv = 0.0
            delta = rewards[i] + gamma * next_value - values[i]
            next_adv = delta + gamma * lam * next_adv
            adv[i], next_value = next_adv, values[i]
    adv = torch.tensor(adv, dtype=torch.float32)
    return adv, adv + torch.tensor(values, dtype=torch.float32)


def group_advantages(rewards: list, episodes: list, group_size: int, use_std: bool) -> torch.Tensor:
    """GRPO's advantages of turns listed in collection order: every turn of an episode gets its episode's return
    (the sum of its rewards) minus the mean return of its group (episodes k with the same k // group_size),
    divided by the group's standard deviation with `use_std`. A group's episodes' advantages sum to 0. -> (T,)"""
    returns = {}
    for r, ep in zip(rewards, episodes):
        returns[ep] = returns.get(ep, 0.0) + r
    adv = {}
    for group in {ep // group_size for ep in returns}:
        members = [ep for ep in returns if ep // group_size == group]
        values = torch.tensor([returns[ep] for ep in members])                                  # (G,)
        centred = values - values.mean()
        if use_std:
            centred = centred / (values.std(unbiased=False) + 1e-6)
        adv.update(zip(members, centred.tolist()))
    return torch.tensor([adv[ep] for ep in episodes], dtype=torch.float32)


def normalize(x: torch.Tensor, groups: int = 0) -> torch.Tensor:
    """(x - mean) / std over all ranks' elements together; with `groups`, over each of that many consecutive groups
    of this rank's elements apart, with the official code's unbiased std + 1e-5 (each official GPU normalized its own
    turns and never all-reduced). Example, groups 2: [1, 2, 3, 5] -> [-0.71, 0.71, -0.71, 0.71]."""
    if groups:
        return torch.cat([(g - g.mean()) / (g.std() + 1e-5) if g.numel() > 1 else g - g.mean()
                          for g in x.tensor_split(groups) if g.numel()])
    n = R.all_reduce_sum(float(x.numel()))
    mean = R.all_reduce_sum(float(x.sum())) / n
    var = R.all_reduce_sum(float(((x - mean) ** 2).sum())) / max(n - 1, 1)
    return (x - mean) / (math.sqrt(var) + 1e-8)


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> Optional[float]:
    """1 - Var(returns - values) / Var(returns) over all ranks' turns (cleanrl's): 1 is a perfect value
    function, 0 no better than a constant; None when the returns do not vary."""
    n = R.all_reduce_sum(float(returns.numel()))
    error = returns - values
    moments = [R.all_reduce_sum(float(t.sum())) for t in (returns, returns ** 2, error, error ** 2)]
    var_y = moments[1] / n - (moments[0] / n) ** 2
    var_e = moments[3] / n - (moments[2] / n) ** 2
    return None if var_y <= 1e-12 else 1 - var_e / var_y


def official_action_weights(tokenizer, response_ids: torch.Tensor, coef: float) -> torch.Tensor:
    """(R,) weights of the official action log-prob (model_tz_llama.py `evaluate`), for every task: it searches the
    answer for the tokens of ' "formula":' (its V-IRL search raises and falls back to this one, so V-IRL never finds
    its key), and scores tokens 1..R-1 only (entry j of its sums is token j + 1; token 0 is never counted). Found at
    token k: tokens 2..k-1 weigh `coef`, k..R-1 weigh 1. Not found: the last five tokens weigh 1, tokens 2..R-6
    `coef`. Under five tokens: no token (its log-prob is a constant, so the answer trains the value head alone).
    The key is found here in the decoded text, the token holding the space before its quote being token k (the
    official code matched Llama-3's token ids).
    Example, R = 8, no key: [0, 0, c, 1, 1, 1, 1, 1]."""
    ids = response_ids.tolist()
    weights, entries = torch.zeros(len(ids)), list(range(len(ids) - 1))  # entry j scores token j + 1
    if len(entries) < 4:
        return weights
    start = tokenizer.decode(ids, skip_special_tokens=True).rfind(' "formula":')
    if start >= 0:
        k = token_at(tokenizer, ids, start)
    else:
        k = entries[-4]  # the official `nonzero()[-4]`: an entry index, which its slices then use as a token index
    # the official slices, Python's negative indices included: sum(entries[1:k-1]) and sum(entries[k-1:])
    for j in entries[1:k - 1]:
        weights[j + 1] = coef
    for j in entries[k - 1:]:
        weights[j + 1] = 1.0
    return weights


def token_at(tokenizer, ids: list, char: int) -> int:
    """The index of the token whose text holds character `char` of the decoded answer: the first token whose
    prefix decodes past it (a binary search over prefixes)."""
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid + 1], skip_special_tokens=True)) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo


def action_weights(tokenizer, response_ids: torch.Tensor, field_name: str, coef: float) -> torch.Tensor:
    """(R,) weights of the paper's action log-prob: `coef` for the tokens before the answer's last
    '"<field_name>"' key (found in the decoded text), 1 from the token that starts it on; all 1 when
    the key is absent (a malformed answer is all action)."""
    ids = response_ids.tolist()
    weights = torch.ones(len(ids))
    start = tokenizer.decode(ids, skip_special_tokens=True).rfind(f'"{field_name}"')
    if start < 0:
        return weights
    weights[:token_at(tokenizer, ids, start)] = coef
    return weights


def clipped_surrogate(logratio: torch.Tensor, advantages: torch.Tensor, clip: float,
                      guard: bool = False) -> torch.Tensor:
    """PPO's objective to minimize, per element: -min(r A, clip(r, 1 - c, 1 + c) A), r = exp(logratio).
    `guard` (the official code's, after TRL): an element whose ratio exceeds 10 takes the clipped term alone,
    which has no gradient there; it differs from PPO's only where A < 0."""
    ratio = logratio.exp()
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    terms = -torch.min(ratio * advantages, clipped)
    return torch.where(ratio > 10, -clipped, terms) if guard else terms


def policy_loss(new_logprobs, old_logprobs, weights, mask, advantages, clip: float, token_level: bool,
                guard: bool = False):
    """Summed clipped-surrogate terms of a micro-batch and its ratios.

    new/old_logprobs, weights, mask: (B, R) per response token; advantages: (B,).
    Paper (token_level False): one ratio per response, of its weighted log-prob sum_t w_t log p_t.
    Token level: one ratio per token, each with its response's advantage. `guard`: see clipped_surrogate."""
    if token_level:
        logratio = (new_logprobs - old_logprobs) * mask                                     # (B, R)
        terms = clipped_surrogate(logratio, advantages[:, None], clip, guard) * mask        # (B, R)
        return terms.sum(), logratio.exp()[mask.bool()]
    logratio = ((new_logprobs - old_logprobs) * weights * mask).sum(1)                      # (B,)
    return clipped_surrogate(logratio, advantages, clip, guard).sum(), logratio.exp()


def clipped_value_loss(values, old_values, returns, clip: float) -> torch.Tensor:
    """Per turn: 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clamp(V - V_old, -c, c);
    plain 0.5 (V - R)^2 when clip is 0."""
    loss = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * loss


def k3_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed per-token k3 estimate of KL(policy || reference): low variance, never negative. (B, R) -> ()"""
    log_r = ref_logprobs - logprobs                                                         # (B, R)
    return ((log_r.exp() - log_r - 1) * mask).sum()


# ---- rollouts ----

def update_seed(seed: int, update: int, rank: int, purpose: int = 0) -> int:
    """A seed for one update on one rank (purpose 0: environments and sampler; 1: minibatch order)."""
    return int(np.random.SeedSequence([seed, update, rank, purpose]).generate_state(1)[0])


def default_envs(cfg: PPOConfig) -> Callable:
    """envs(update, rank) -> the ID-setting environments one rank plays in one update."""
    overrides = env_overrides(cfg.task, cfg.verify_iter, cfg.image_size, cfg.protocol)

    def envs(update: int, rank: int) -> list:
        return make_envs(cfg.task, "id", cfg.envs, seed=update_seed(cfg.seed, update, rank), **overrides)
    return envs


def collect(policy, envs: list, cfg: PPOConfig, per_rank: int, rank: int, seed: int):
    """One update's rollout on this rank and the bootstrap values of the episodes it left unfinished. PPO plays
    `per_rank` answers; GRPO `per_rank` whole episodes, episode k on the hand or route of group k // group_size.
    The weights stay gathered for the whole rollout, so ranks may run different numbers of rounds."""
    # the official code samples at temperature 0.2 with the rest of the checkpoint's generation config
    own = policy.checkpoint_sampling()
    top_p = cfg.top_p if cfg.top_p is not None else own["top_p"]
    top_k = cfg.top_k if cfg.top_k is not None else own["top_k"]
    budget = ({"n_episodes": per_rank, "reset": lambda env, k: env.reset(seed=seed + k // cfg.group_size,
                                                                        episode=seed + k // cfg.group_size)}
              if cfg.algo == "grpo" else {"n_turns": per_rank})
    with R.gathered(policy):
        ro = rollout(policy, envs, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=top_p,
                     top_k=top_k, progress=rank == 0, desc="rollout", **budget)
        boot = policy.values(list(ro.bootstrap.values()))
    return ro, dict(zip(ro.bootstrap.keys(), boot.tolist()))


def rollout_stats(ro, task: str) -> dict:
    """Sums and counts of one rank's rollout, to be added over ranks."""
    finished = [e for e in ro.episodes if e.finished]
    recognized = [r for e in ro.episodes for r in e.recognized if r is not None]
    out = Counter({"reward": sum(t.reward for t in ro.turns), "answers": len(ro.turns),
                   "episodes": len(finished), "successes": sum(e.success for e in finished),
                   "recognized": sum(recognized), "recognition_checks": len(recognized),
                   "rollout_tokens": ro.tokens})
    out.update(Counter(f"outcome/{o}" for e in ro.episodes for o in e.outcomes))
    return out


# ---- one update ----

@dataclass
class Batch:
    """An update's turns on this rank, ready to train on."""
    prompts: list                 # encoded prompts
    responses: list               # (R,) token ids each
    old_logprobs: list            # (R,) each, at sampling time (or re-scored)
    weights: list                 # (R,) each, action_weights
    old_values: torch.Tensor      # (T,)
    advantages: torch.Tensor      # (T,) normalized
    returns: torch.Tensor         # (T,)
    ref_logprobs: Optional[list] = None  # (R,) each, under the initial policy (KL penalty only)


def pad(rows: list, width: int, device) -> torch.Tensor:
    """(B, width) of 1-D tensors, right-padded with zeros. Example: [1 2], [3] -> [[1 2] [3 0]]"""
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out.to(device)


@torch.no_grad()
def score_turns(policy, prompts: list, responses: list, micro_batch: int):
    """Per-token log-probs of given responses and V(prompt), no gradient, with the training forward's
    numerics (old log-probs and values, or the reference's log-probs). Under FSDP the weights are
    gathered once for all micro-batches and released after. -> ([(R,) each], values (T,))"""
    logprobs, values = [], []
    with R.gathered(policy):
        for i in range(0, len(prompts), micro_batch):
            scored = policy(policy.collate(prompts[i:i + micro_batch], responses[i:i + micro_batch]))
            logprobs += [lp[:len(r)].float().cpu() for lp, r in zip(scored["logprobs"], responses[i:i + micro_batch])]
            values.append(scored["values"].float().cpu())
    return logprobs, torch.cat(values) if values else torch.zeros(0)


def logprob_gap(generated: list, scored: list) -> dict:
    """How far the log-probs recorded at generation are from the training forward's, per response token,
    over all ranks: bf16 rounds differently in cached decoding and in one full pass."""
    diff = torch.cat([(g - s).abs() for g, s in zip(generated, scored)] + [torch.zeros(0)])  # (tokens,)
    n = R.all_reduce_sum(float(diff.numel()))
    return {"logprob_gap_mean": R.all_reduce_sum(float(diff.sum())) / max(n, 1),
            "logprob_gap_max": R.all_reduce_max(float(diff.max()) if diff.numel() else 0.0)}


def minibatches(batch: Batch, cfg: PPOConfig, update: int, world: int):
    """This rank's minibatches of one epoch after another, each a list of turn indices, longest first (so that
    micro-batches of similar lengths waste less padding). The order is the same on every rank."""
    rng = random.Random(update_seed(cfg.seed, update, rank=0, purpose=1))
    per_rank, n = cfg.minibatch // world, len(batch.prompts)
    for _ in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, per_rank):
            yield sorted(order[start:start + per_rank],
                         key=lambda i: -(batch.prompts[i]["input_ids"].shape[1] + len(batch.responses[i])))


def tally(sums: Counter, pg, vf, entropy, kl, ratio, clip: float, turns: int, tokens: float, trained: int,
          computed: int) -> None:
    """Add one micro-batch's summed loss terms and ratio statistics to the update's log sums; `trained` tokens are
    the real ones, `computed` the padded batch the forward ran over."""
    sums.update(pg=float(pg), vf=float(vf), entropy=float(entropy), kl=float(kl), turns=turns, tokens=tokens,
                trained_tokens=trained, computed_tokens=computed, ratios=ratio.numel(),
                clipped=float(((ratio - 1).abs() > clip).sum()), old_approx_kl=float((-ratio.log()).sum()),
                approx_kl=float(((ratio - 1) - ratio.log()).sum()))


def ppo_update(policy, opt, batch: Batch, cfg: PPOConfig, update: int, world: int) -> Counter:
    """cfg.epochs passes over the batch in shuffled minibatches, one optimizer step each; returns the sums the
    log needs. A minibatch whose loss or gradient is not finite on any rank is skipped (counted), never applied."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sums = Counter()
    for mb in minibatches(batch, cfg, update, world):
        # the loss is a mean over all ranks' turns (tokens for per-token terms) of the minibatch
        n_turns = R.all_reduce_sum(len(mb)) / world
        n_tokens = R.all_reduce_sum(sum(len(batch.responses[i]) for i in mb)) / world
        finite = True
        for k in range(0, len(mb), cfg.micro_batch):
            idx = mb[k:k + cfg.micro_batch]
            collated = policy.collate([batch.prompts[i] for i in idx], [batch.responses[i] for i in idx])
            out = policy(collated)
            mask = out["response_mask"].float()                                              # (B, R)
            width, dev = mask.shape[1], mask.device
            old_logprobs = pad([batch.old_logprobs[i] for i in idx], width, dev)             # (B, R)
            weights = pad([batch.weights[i] for i in idx], width, dev)                       # (B, R)
            advantages = batch.advantages[idx].to(dev)                                       # (B,)
            pg_sum, ratio = policy_loss(out["logprobs"], old_logprobs, weights, mask, advantages, cfg.clip,
                                        cfg.token_level, guard=cfg.protocol == "official")
            v_sum = clipped_value_loss(out["values"], batch.old_values[idx].to(dev), batch.returns[idx].to(dev),
                                       cfg.value_clip).sum()
            entropy_sum = (out["entropy"] * mask).sum()
            kl_sum = (k3_kl(pad([batch.ref_logprobs[i] for i in idx], width, dev), out["logprobs"], mask)
                      if batch.ref_logprobs is not None else torch.zeros((), device=dev))
            vf_coef = cfg.vf_coef if cfg.algo == "ppo" else 0.0  # GRPO has no value function to fit
            loss = (pg_sum / (n_tokens if cfg.token_level else n_turns) + vf_coef * v_sum / n_turns
                    - cfg.ent_coef * entropy_sum / n_tokens + cfg.kl_coef * kl_sum / n_tokens)
            finite = finite and R.all_reduce_sum(float(not torch.isfinite(loss))) == 0
            if not finite:  # every rank skips together: FSDP's backward is a collective
                break
            loss.backward()
            tally(sums, pg_sum.detach(), v_sum.detach(), entropy_sum.detach(), kl_sum.detach(), ratio.detach(),
                  cfg.clip, turns=len(idx), tokens=float(mask.sum()), trained=int(collated["attention_mask"].sum()),
                  computed=collated["input_ids"].numel())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if finite else torch.tensor(float("nan"))
        if finite and torch.isfinite(grad_norm):
            opt.step()
            sums.update(steps=1, grad_norm=float(grad_norm))
        else:
            sums.update(skipped=1)
        opt.zero_grad(set_to_none=True)
    return sums


# ---- main ----

def build_optimizer(policy, cfg: PPOConfig):
    head = [p for n, p in policy.named_parameters() if n.startswith("value_head.")]
    body = [p for n, p in policy.named_parameters() if not n.startswith("value_head.")]
    # one fused kernel per step on a GPU (under FSDP the sharded parameters take the default multi-tensor path)
    fused = policy.device.type == "cuda" and not R.is_distributed()
    return torch.optim.Adam([{"params": body, "lr": cfg.lr, "peak": cfg.lr},
                             {"params": head, "lr": cfg.value_lr or cfg.lr, "peak": cfg.value_lr or cfg.lr}],
                            eps=cfg.adam_eps, fused=fused or None)


def lr_at(update: int, peak: float, cfg: PPOConfig) -> float:
    """The learning rate of an update: torch's CosineAnnealingLR from `peak` toward end_lr at lr_max_steps (the
    task's when 0). Project: stepped once per update, as the official trainer calls it, and held at end_lr past
    lr_max_steps. Official: stepped `official_processes` times per update, as accelerate's scheduler wrapper
    stepped it (once per process), and rising again past lr_max_steps as torch's does."""
    total = cfg.lr_max_steps or LR_MAX_STEPS[cfg.task.split("-")[0]]
    if cfg.protocol == "official":
        return R.cosine_lr(update * cfg.official_processes, peak, total, floor=cfg.end_lr, hold=False)
    return R.cosine_lr(update, peak, total, floor=cfg.end_lr)


def gather_counters(c: Counter, world: int) -> Counter:
    """The sums of all ranks' counters. Counter.update adds; `+` would drop the negative sums (rewards, losses)."""
    if world == 1:
        return c
    parts = [None] * world
    torch.distributed.all_gather_object(parts, dict(c))
    total = Counter()
    for p in parts:
        total.update(p)
    return total


def rollout_metrics(roll: Counter) -> dict:
    """The rollout's keys of a metrics.jsonl line, from its sums over all ranks."""
    outcomes = {k.split("/", 1)[1]: v for k, v in roll.items() if k.startswith("outcome/")}
    total = max(sum(outcomes.values()), 1)
    out = {"reward_mean": roll["reward"] / max(roll["answers"], 1),
           "success_rate": roll["successes"] / roll["episodes"] if roll["episodes"] else None,
           "episodes": roll["episodes"], "answers": roll["answers"],
           "outcomes": {k: v / total for k, v in sorted(outcomes.items())}}
    if roll["recognition_checks"]:
        out["recognition_accuracy"] = roll["recognized"] / roll["recognition_checks"]
    return out


def training_metrics(train: Counter, token_level: bool, world: int) -> dict:
    """The epochs' keys of a metrics.jsonl line, from their sums over all ranks (every rank counts the same
    optimizer steps and global gradient norms, hence the division by world)."""
    per = lambda key, count: train[key] / max(train[count], 1)  # noqa: E731
    return {"policy_loss": per("pg", "tokens" if token_level else "turns"), "value_loss": per("vf", "turns"),
            "entropy": per("entropy", "tokens"), "kl_to_init": per("kl", "tokens"),
            "clipfrac": per("clipped", "ratios"), "old_approx_kl": per("old_approx_kl", "ratios"),
            "approx_kl": per("approx_kl", "ratios"),
            "grad_norm": per("grad_norm", "steps"), "optimizer_steps": int(train["steps"]) // world,
            "skipped_minibatches": int(train["skipped"]) // world,
            "skipped_share": train["skipped"] / max(train["steps"] + train["skipped"], 1),
            "padding_share": 1 - train["trained_tokens"] / max(train["computed_tokens"], 1)}


def start_wandb(cfg: PPOConfig):
    try:
        import wandb
    except ImportError:
        raise ValueError(f"--wandb {cfg.wandb}: wandb is not installed (pip install wandb), "
                         "or leave --wandb empty") from None
    return wandb.init(project=cfg.wandb, config=asdict(cfg), name=os.path.basename(cfg.out))


@R.releases_run_folder
def train(cfg: PPOConfig, env_factory: Optional[Callable] = None) -> dict:
    """Run PPO. `env_factory(update, rank) -> envs` replaces the task's environments (tests use a toy one)."""
    rank, world, device = R.init_distributed(cfg.device)
    if cfg.turns % world or cfg.minibatch % world:
        raise ValueError(f"turns={cfg.turns} and minibatch={cfg.minibatch} must both be divisible by the {world} ranks")
    per_rank = cfg.turns // world
    envs_for = env_factory or default_envs(cfg)
    print0 = R.printer(rank)
    wandb_run = start_wandb(cfg) if cfg.wandb and rank == 0 else None

    # ---- start: fresh, or the last complete checkpoint ----
    init, resume_from, state = R.start(cfg.model, cfg.out, cfg.resume, cfg.overwrite, cfg.task, cfg.protocol, print0,
                                       {name: getattr(cfg, name) for name in RECIPE.split()}, cfg.resume_changed)
    torch.manual_seed(cfg.seed)  # a fresh value head's initialization
    policy = M.load_policy(resume_from or init, device=device, temperature=cfg.temperature, precision=cfg.precision)
    reference = (M.load_policy(init, device=device, temperature=cfg.temperature, precision=cfg.precision).eval()
                 if cfg.kl_coef else None)
    # bf16 numerics differ between generation and the training forward: re-score unless told not to
    rescore = cfg.recompute_logprobs if cfg.recompute_logprobs is not None else policy.compute_dtype is not None
    n_params = policy.model.num_parameters()
    update = state.get("step", 0) if resume_from else 0
    gflops = state.get("gflops", 0.0)  # the SFT initialization's compute carries over: one axis
    tokens = state.get("tokens", 0) if resume_from else 0
    field_name = action_field(cfg.task)
    # the micro-batch the epochs train on: up to 1024 prompt tokens (a revision's conversation) and the answer
    setup = R.prepare_training(policy, cfg.grad_checkpointing, cfg.compile, world,
                               tokens=cfg.micro_batch * (1024 + cfg.max_new_tokens),
                               response_tokens=cfg.micro_batch * cfg.max_new_tokens)
    print0(f"ppo {cfg.task}: {n_params / 1e6:.1f}M parameters from {resume_from or init}, {world} rank(s), "
           f"{'bf16' if policy.compute_dtype else 'fp32'} compute over fp32 weights, {setup}, "
           f"{cfg.turns} turns per update, start at update {update}")
    if R.is_distributed():
        R.shard(policy)
        if reference is not None:
            R.shard(reference)
    if M.engine_wanted(policy, cfg.engine):
        import engine  # only then: it loads the compiler's machinery
        engine.attach(policy, compile=policy.device.type == "cuda")
    opt = build_optimizer(policy, cfg)
    if resume_from:
        R.restore(policy, opt, resume_from, state, print0)
    health = R.Divergence(cfg.out, opt.param_groups[0]["peak"], "update")

    # the bar closes on an error too, so that its one line starts a line of its own
    with (R.MetricsLog(cfg.out, update, rank) as log,
          tqdm(total=cfg.updates, initial=update, desc=f"ppo {cfg.task}", disable=rank != 0) as bar):
        started = time.perf_counter()
        while update < cfg.updates:
            seed = update_seed(cfg.seed, update, rank)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            ro, boot = collect(policy, envs_for(update, rank), cfg, per_rank, rank, seed)
            t1 = time.perf_counter()

            # ---- old log-probs and values: as sampled, or re-scored with the training forward ----
            turns = ro.turns
            prompts, responses = [t.prompt for t in turns], [t.response_ids for t in turns]
            old_logprobs, old_values = [t.logprobs for t in turns], torch.tensor([t.value for t in turns])
            gap = {"logprob_gap_mean": None, "logprob_gap_max": None}
            if rescore:
                scored, old_values = score_turns(policy, prompts, responses, cfg.micro_batch)
                gap = logprob_gap(old_logprobs, scored)
                old_logprobs = scored

            # ---- advantages: GAE normalized over all ranks' turns, or group-relative ----
            rewards, episodes = [t.reward for t in turns], [t.episode for t in turns]
            if cfg.algo == "grpo":
                advantages = group_advantages(rewards, episodes, cfg.group_size, cfg.group_std)
                returns = torch.zeros(len(turns))  # no value loss: nothing to regress on
            else:
                advantages, returns = gae(rewards, old_values.tolist(), [t.done for t in turns], episodes, boot,
                                          cfg.gamma, cfg.lam)
                # officially each GPU normalized its own share of the turns: as many groups over this run's ranks
                official = cfg.protocol == "official"
                advantages = normalize(advantages, groups=max(1, cfg.official_processes // world) if official else 0)
            weights = ([official_action_weights(policy.tokenizer, r, cfg.pre_action_coef) for r in responses]
                       if cfg.protocol == "official" else
                       [action_weights(policy.tokenizer, r, field_name, cfg.pre_action_coef) for r in responses])
            batch = Batch(prompts, responses, old_logprobs, weights, old_values, advantages, returns)
            if reference is not None:
                batch.ref_logprobs, _ = score_turns(reference, prompts, responses, cfg.micro_batch)

            # ---- PPO epochs ----
            for g in opt.param_groups:
                g["lr"] = lr_at(update, g["peak"], cfg)
            policy.train()
            trained = gather_counters(ppo_update(policy, opt, batch, cfg, update, world), world)
            t2 = time.perf_counter()

            # ---- log and checkpoint ----
            roll = gather_counters(rollout_stats(ro, cfg.task), world)
            update += 1
            gflops += (2 * n_params * roll["rollout_tokens"] + 6 * n_params * trained["trained_tokens"]) / 1e9
            tokens += int(trained["trained_tokens"])
            metrics = {"step": update, **rollout_metrics(roll), **training_metrics(trained, cfg.token_level, world),
                       "explained_variance": explained_variance(old_values, returns) if cfg.algo == "ppo" else None,
                       **gap,
                       "learning_rate": opt.param_groups[0]["lr"], "gflops": gflops, "tokens": tokens,
                       "rollout_s": t1 - t0, "train_s": t2 - t1,
                       "tokens_per_s": (roll["rollout_tokens"] + trained["trained_tokens"]) / max(t2 - t0, 1e-9)}
            log.write(metrics)
            health.step(trained["steps"] > 0, update, policy.parameters())  # an update of skipped minibatches only
            if wandb_run:
                wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=update)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", success=metrics["success_rate"],
                            clip=f"{metrics['clipfrac']:.2f}")
            bar.update(1)
            trainer_state = {"step": update, "tokens": tokens, "gflops": gflops, "kind": "ppo", "task": cfg.task,
                             "init": init, "config": asdict(cfg)}
            if R.step_done(policy, opt, cfg.out, update, cfg.updates, cfg.save_every, cfg.time_limit, started,
                           trainer_state, print0, health):
                break
    if wandb_run:
        wandb_run.finish()
    R.leave_distributed()
    return {"step": update, "gflops": gflops, "tokens": tokens}


if __name__ == "__main__":
    main(PPOConfig, train)
