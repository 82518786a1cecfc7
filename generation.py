"""The generation machinery under `Policy.generate`: the sampler that draws each token and records its
log-probability, and the prefix cache that lets a batch of conversations skip the prompt tokens the policy
has already read (a revision's earlier prompt and answer, a task's instructions), over Hugging Face's
preallocated StaticCache.
"""
from __future__ import annotations

from typing import Optional

import torch


class Sampler:
    """A logits processor that draws each next token itself and records log softmax(logits / T) of it.

    Hugging Face runs in greedy mode and sees a score of 0 for the drawn token and -inf elsewhere, so
    none of its own warpers (or a model's default top-k) can change what is drawn, and torch.multinomial,
    slow on CPU at a 50k vocabulary, is replaced by one cumulative sum and a binary search per row.
    Top-k and top-p shape which tokens can be drawn, not the recorded log-probabilities."""

    def __init__(self, temperature: float, top_p: float, greedy: bool, top_k: int = 0):
        self.temperature, self.top_p, self.greedy, self.top_k = temperature, top_p, greedy, top_k
        self.logprobs = []                                                                 # per step: (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.draw(scores)                                                          # (B,)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)   # (B, V) one-hot

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """The next token of every row from its scores (B, V), its log-probability recorded. -> (B,)"""
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)                # (B, V)
        if self.greedy:
            token = logp.argmax(-1)                                                        # (B,)
        else:
            probs = logp.exp()                                                             # (B, V)
            if 0 < self.top_k < probs.shape[-1]:  # the k most likely, renormalized (Hugging Face: top-k, then top-p)
                kth = probs.topk(self.top_k, dim=-1).values[:, -1:]                        # (B, 1)
                probs = probs.masked_fill(probs < kth, 0.0)
                probs = probs / probs.sum(-1, keepdim=True)
            if self.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
                sorted_probs, order = probs.sort(dim=-1, descending=True)                  # (B, V)
                drop = sorted_probs.cumsum(-1) - sorted_probs > self.top_p                 # (B, V) mass before >= p
                probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
            cdf = probs.cumsum(-1)                                                         # (B, V)
            u = torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:]                   # (B, 1)
            # the first token whose cumulative mass exceeds u: token i with probability p_i (never a p = 0 token)
            token = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[1] - 1)  # (B,)
        self.logprobs.append(logp.gather(-1, token[:, None]).squeeze(-1))
        return token


class PrefixCache:
    """Key/value states of token sequences the policy has already read, so that `generate` computes only
    what follows the longest of them that a prompt starts with. A conversation's next attempt starts
    with its previous prompt and answer, and every episode of a task with the same instructions, so
    after the first round most prompt tokens are served from here instead of recomputed.

    Valid for one set of weights: make a new one after each optimizer step (rollout makes one per call).
    Holds at most `max_tokens` tokens, dropping the least recently used sequences; a sequence that a
    longer one extends is dropped when that one is added. Used for text models whose cache is plain
    per-layer key/value tensors (`generate` checks); VLMs recompute their prompts."""

    def __init__(self, max_tokens: int = 32768):
        self.max_tokens = max_tokens
        self.entries = []          # least recently used first: (ids (L,), [(keys, values) (H, L, D) per layer])
        self.reused = self.computed = 0   # prompt tokens served from here / computed, over all calls

    def match(self, ids: torch.Tensor) -> tuple:
        """(entry index or None, m): the entry sharing the longest prefix with `ids`, m tokens long, at
        most len(ids) - 1 so that the last prompt token (whose state gives the value and first token) is
        always computed."""
        return self.match_all([ids])[0]

    def match_all(self, queries: list) -> list:
        """`match` of every sequence in `queries`, compared with every entry at once.
        Example, entries [5 6 7 8] and [5 9]; query [5 6 7 2]: first mismatches at 3 and 1 -> (0, 3)."""
        if not self.entries or not queries:
            return [(None, 0)] * len(queries)
        width = max(len(ids) for ids, _ in self.entries)
        held = torch.full((len(self.entries), width), -1, dtype=torch.long)                 # (E, L) -1: no token
        for e, (ids, _) in enumerate(self.entries):
            held[e, :len(ids)] = ids
        out = []
        for q in queries:
            n = min(width, len(q) - 1)
            if n < 1:
                out.append((None, 0))
                continue
            differ = held[:, :n] != q[None, :n]                                              # (E, n)
            # the first differing position, or n when none differs
            m = torch.where(differ.any(1), differ.to(torch.int8).argmax(1), torch.tensor(n))  # (E,)
            best = int(m.argmax())
            out.append((best, int(m[best])) if int(m[best]) > 0 else (None, 0))
        return out

    def update(self, matches: list, new: list) -> None:
        """After a generate call: `matches` [(entry index or None, m)] were its prompts' matches, `new`
        [(ids, kv)] the sequences it read and wrote. Matched entries become the most recently used; one
        that a new sequence contains whole is dropped; then the oldest go until max_tokens fit."""
        used = {e for e, _ in matches if e is not None}
        whole = {e for e, m in matches if e is not None and m == len(self.entries[e][0])}
        self.entries = ([x for i, x in enumerate(self.entries) if i not in used]
                        + [self.entries[i] for i in sorted(used - whole)] + list(new))
        total = sum(len(ids) for ids, _ in self.entries)
        while total > self.max_tokens and self.entries:
            total -= len(self.entries.pop(0)[0])


def caches_prefixes(policy) -> bool:
    """Whether `generate` can use a PrefixCache: text models whose layers all keep plain key/value
    tensors (no sliding windows or linear attention, whose states cannot be cut per token)."""
    if not hasattr(policy, "_caches_prefixes"):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
        layers = StaticCache(config=policy.model.config, max_cache_len=1).layers
        policy.caches_prefixes_ = not policy.is_vlm and all(type(layer) is StaticLayer for layer in layers)
    return policy.caches_prefixes_

def match_prefixes(policy, prompts: list, cache: PrefixCache) -> list:
    """Each prompt's longest cached prefix, (entry index, m). When the batch's prompts share a longer
    common prefix (a task's instructions, on the first round) it is computed once and cached first."""
    ids = [p["input_ids"][0] for p in prompts]
    matches = cache.match_all(ids)
    n = min(len(x) for x in ids) - 1
    if len(ids) < 2 or n < 1:
        return matches
    stacked = torch.stack([x[:n] for x in ids])                                          # (B, n)
    common = int((stacked == stacked[0]).all(0).long().cumprod(0).sum())
    if common < 16 or all(m >= common for _, m in matches):
        return matches
    from transformers import DynamicCache
    kv = DynamicCache()
    policy.model.model(input_ids=ids[0][None, :common].to(policy.device), cache=kv, use_cache=True)
    cache.entries.append((ids[0][:common], [(layer.keys[0], layer.values[0]) for layer in kv.layers]))
    cache.computed += common
    return cache.match_all(ids)

def generation_inputs(policy, prompts: list, cache: Optional[PrefixCache], matches: list,
                      max_new_tokens: int) -> dict:
    """Left-padded inputs for `generate`. With a prefix cache (text models) they also hold a
    preallocated key/value cache (Hugging Face's StaticCache: written in place, where the default
    cache copies itself at every token), whose first columns hold each row's cached prefix (m
    tokens, right-aligned) while the input ids go on with the rest of its prompt (right-aligned).
    Example, pad ., cached c, computed x, prompts of 4 and 5 tokens with m = 2 and 3:
        input_ids       . c c | . x x      attention_mask  0 1 1 | 0 1 1
                        c c c | x x . .                    1 1 1 | 1 1    (row 2: 3 cached + 2 new)
    Hugging Face numbers positions by the mask's running count, so every token keeps its position."""
    if cache is None:
        return {k: v.to(policy.device) for k, v in policy.collate(prompts, side="left").items()}
    from transformers import StaticCache
    past = max((m for _, m in matches), default=0)
    rest = policy.collate([{k: p[k][:, m:] for k in ("input_ids", "attention_mask")}
                         for p, (_, m) in zip(prompts, matches)], side="left")
    width = past + rest["input_ids"].shape[1]
    kv_cache = StaticCache(config=policy.model.config, max_cache_len=width + max_new_tokens)
    b = len(prompts)
    past_ids = torch.full((b, past), policy.pad_id, dtype=torch.long)                      # (B, Lc)
    past_mask = torch.zeros((b, past), dtype=torch.long)                                 # (B, Lc)
    layers = None
    for i, (e, m) in enumerate(matches):
        if not m:
            continue
        ids, kv = cache.entries[e]
        past_ids[i, past - m:], past_mask[i, past - m:] = ids[:m], 1
        if layers is None:  # (B, H, Lc, D) keys and values per layer, zero where masked
            layers = [(k.new_zeros(b, k.shape[0], past, k.shape[2]), v.new_zeros(b, v.shape[0], past, v.shape[2]))
                      for k, v in kv]
        for (keys, values), (k, v) in zip(layers, kv):
            keys[i, :, past - m:], values[i, :, past - m:] = k[:, :m], v[:, :m]
    for layer, (keys, values) in zip(kv_cache.layers, layers or []):
        layer.update(keys, values)
    return {"input_ids": torch.cat([past_ids, rest["input_ids"]], 1).to(policy.device),
            "attention_mask": torch.cat([past_mask, rest["attention_mask"]], 1).to(policy.device),
            "cache": kv_cache}

def remember(cache: PrefixCache, samples: list, matches: list, mask: torch.Tensor, kv_cache) -> None:
    """Put each row's prompt and response, with their keys and values from `kv_cache` (B, H, L, D per
    layer, the first `get_seq_length()` positions written), into the prefix cache."""
    layers = kv_cache.layers
    width, length = mask.shape[1], int(kv_cache.get_seq_length())
    new = []
    for i, s in enumerate(samples):
        k = min(len(s.response_ids), length - width)  # the last token drawn was never fed back: no state
        pos = torch.cat([mask[i].nonzero().squeeze(1).cpu(), torch.arange(width, width + k)])   # (P + k,)
        pos = pos.to(layers[0].keys.device)
        new.append((torch.cat([s.prompt["input_ids"][0], s.response_ids[:k]]),
                    [(layer.keys[i][:, pos], layer.values[i][:, pos]) for layer in layers]))
        cache.reused += matches[i][1]
        cache.computed += s.prompt["input_ids"].shape[1] - matches[i][1]
    cache.update(matches, new)
