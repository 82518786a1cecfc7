"""The policy: a Hugging Face causal LM or vision-language model plus a value head; loading it with its training
precision, batched generation with log-probabilities (the sampler and the prefix cache under it), scoring and
saving. The built-in models are in model_zoo.py (imported only for a built-in name), what a process needs around
the policy (command line, process group and FSDP2, run folders, schedules) in runs.py.

Used by SFT, PPO and evaluation alike:
    policy = load_policy("smollm2-135m")                     # or "tiny-text", "tiny-vlm", a local HF folder
    samples = policy.generate(conversations, max_new_tokens=128, temperature=0.2)
    batch = policy.collate([s.prompt for s in samples], [s.response_ids for s in samples])
    out = policy(batch)                                      # differentiable: logprobs, entropy, values

A conversation is a list of turns {"role": "user" | "assistant" | "system", "content": str,
"image": PIL.Image (optional)}; images are attached where the model takes them.

Log-probabilities are always those of the temperature-scaled distribution, log softmax(logits / T),
in `generate` (of the tokens it sampled) and in `forward` (of given tokens), so PPO's ratio starts
at exactly 1. The value V(prompt) is a small MLP on the last layer's hidden state at the last prompt
token, as in the paper; `generate` reads it from the prefill it already does.

Names: "smollm2-135m" (the embedded default), "tiny-text" and "tiny-vlm" (model_zoo.py), or any local HF
folder: a text model (AutoModelForCausalLM) or a VLM (AutoModelForImageTextToText), chosen from its config.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runs import atomic_folder, full_state_dict, gathered, printer, rank
VALUE_HEAD_FILE = "value_head.safetensors"
# processor outputs with one entry per token (padded with the sequence); everything else is per image
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "cross_attention_mask", "token_type_ids", "mm_token_type_ids")
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}  # Hugging Face's, for a config that names none
# The lowest sampling temperature: log softmax(logits / T) scales a fp32 logit's rounding error (about 1e-6 of it)
# by 1 / T, and far below this the tempered distribution overflows to NaN (T = 1e-45) or its log-probabilities,
# PPO's ratios among them, are rounding noise. Lower ones sample greedily (evaluation) or are refused (training).
MIN_TEMPERATURE = 1e-3
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


# ---- generation: the sampler and the prefix cache ----

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


NO_SLOTS = np.zeros(0, dtype=np.int64)
KNOWN_PIECES = 16384  # lines and feedback turns whose tokens a policy keeps (forgotten all at once when full)
MATCH_CANDIDATES = 32  # entries compared token by token past a prompt's longest run of cached whole blocks


def pieces(flat: np.ndarray, lengths) -> list:
    """`flat` cut into consecutive pieces of the given lengths (np.split, without its cost per piece)."""
    ends = np.cumsum(lengths).tolist()
    return [flat[end - n:end] for n, end in zip(np.asarray(lengths).tolist(), ends)]


def common_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many tokens two sequences share from their start."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def line_pieces(text: str) -> list:
    """A text cut after each newline with no whitespace on either side: where a byte-level BPE tokenizer's
    pre-tokenizer (GPT-2's regex) ends a word and begins the next, so that no token spans the cut and the pieces'
    ids, joined, are the text's (`Policy.splits_at_lines`). "a\\nb\\n\\nc" -> ["a\\n", "b\\n\\nc"]"""
    if "\n" not in text:
        return [text]
    lines = text.split("\n")
    out, piece = [], lines[0]
    for line in lines[1:]:
        if piece and line and not piece[-1].isspace() and not line[0].isspace():
            out.append(piece + "\n")
            piece = line
        else:
            piece += "\n" + line
    out.append(piece)
    return out


class PrefixCache:
    """Key/value states of token sequences the policy has already read, so that `generate` computes only
    what follows the longest of them that a prompt starts with. A conversation's next attempt starts
    with its previous prompt and answer, and every episode of a task with the same instructions, so
    after the first round most prompt tokens are served from here instead of recomputed.

    Valid for one set of weights: make a new one after each optimizer step (rollout makes one per call).
    Holds at most `max_tokens` tokens, dropping the least recently used sequences; a sequence that a
    longer one extends is dropped when that one is added. Used for text models whose cache is plain
    per-layer key/value tensors (`generate` checks); VLMs recompute their prompts.

    The states live in one pool per layer, (slots, H, D), one slot per token, slot 0 all zeros (padding), so
    that serving a batch and remembering it are a fixed number of tensor operations per layer however many rows
    it has (`gather`, `store`), and a prefix that sequences share (the task's instructions, a conversation's
    earlier attempts) is held once: at batch 512 a Python loop over rows would issue ~175,000 small operations, each
    a kernel launch on a GPU. Sequences are found by the hashes of their prefixes `block` tokens at a time
    (vLLM's prefix caching), on the host in numpy; the match length itself is then counted token by token."""

    def __init__(self, max_tokens: int = 32768, block: int = 16):
        self.max_tokens, self.block = max_tokens, block
        self.entries = {}          # key -> (ids (L,) int64, slots (L,) int64, prefix hashes [int]), least recent first
        self.index = {}            # prefix hash -> {key: None} of the entries that start with that prefix
        self.keys = self.values = None   # per layer (1 + capacity, H, D), made at the first store
        self.refs = np.zeros(1, dtype=np.int64)   # per slot, the entries using it (slot 0, padding: none)
        self.free, self.n_free = [], 0   # unused slots, in a few arrays; how many
        self.next_key = 0
        self.reused = self.computed = 0   # prompt tokens served from here / computed, over all calls
        # random odd weights of a polynomial hash per token of a block and per block of a sequence (uint64 wraps)
        rng = np.random.default_rng(0)
        self.token_w = rng.integers(1, 2**63, size=block, dtype=np.uint64) | np.uint64(1)
        self.block_w = rng.integers(1, 2**63, size=1 << 16, dtype=np.uint64) | np.uint64(1)

    def prefix_hashes(self, sequences: list) -> list:
        """For each sequence, the hash of its first k whole blocks for every k >= 1, as Python ints, (len //
        block,): the blocks of all sequences weighed at once, then one running sum, each sequence's start taken
        off (uint64 arithmetic wraps, so the difference is its own sum)."""
        b = self.block
        counts = np.array([min(len(s) // b, len(self.block_w)) for s in sequences], dtype=np.int64)
        if not counts.sum():
            return [[] for _ in sequences]
        blocks = np.concatenate([s[:k * b] for s, k in zip(sequences, counts.tolist())])
        blocks = blocks.astype(np.uint64).reshape(-1, b)                                   # (sum of K, block)
        starts = np.cumsum(counts) - counts
        place = np.arange(len(blocks)) - np.repeat(starts, counts)                            # block k of its own
        running = np.cumsum((blocks * self.token_w).sum(1, dtype=np.uint64) * self.block_w[place], dtype=np.uint64)
        before = np.where(starts > 0, running[np.maximum(starts - 1, 0)], np.uint64(0))
        return [h.tolist() for h in pieces(running - np.repeat(before, counts), counts)]

    def match(self, ids) -> tuple:
        """(entry key or None, m): the entry sharing the longest prefix with `ids`, m tokens long, at most
        len(ids) - 1 so that the last prompt token (whose state gives the value and first token) is always
        computed. Found by the longest run of whole blocks some entries share with `ids`; m is counted exactly."""
        return self.match_all([ids])[0]

    def match_all(self, queries: list) -> list:
        """`match` of each of `queries`."""
        queries = [np.asarray(q, dtype=np.int64) for q in queries]
        hashes = self.prefix_hashes([q[:-1] for q in queries])
        return [self._match(q, h) for q, h in zip(queries, hashes)]

    def _match(self, ids: np.ndarray, hashes: list) -> tuple:
        lo, hi = 0, len(hashes)  # entries hold every prefix of theirs: present hashes are a prefix of `hashes`
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if hashes[mid] in self.index else (lo, mid)
        if lo == 0:
            return None, 0
        n, start = len(ids) - 1, lo * self.block
        # of the entries holding those blocks (the latest few), the one that goes on furthest into the next block
        key = max(itertools.islice(reversed(self.index[hashes[lo - 1]]), MATCH_CANDIDATES),
                  key=lambda k: common_length(self.entries[k][0][start:start + self.block], ids[start:n]))
        held = self.entries[key][0]
        m = common_length(held, ids[:n])  # counted from the start: a hash collision only shortens it
        return (key, m) if m > 0 else (None, 0)

    def gather(self, matches: list, width: int, rows: Optional[int] = None):
        """Keys and values of each row's matched prefix, right-aligned in `width` columns, zero elsewhere:
        [(keys, values) (B, H, width, D) per layer], B = `rows` (filler rows beyond the matches: zeros)."""
        idx = np.zeros((rows or len(matches), width), dtype=np.int64)                          # (B, W) 0: padding
        for i, (key, m) in enumerate(matches):
            if m:
                idx[i, width - m:] = self.entries[key][1][:m]
        idx = torch.from_numpy(idx).to(self.keys[0].device)
        return [(k[idx].transpose(1, 2), v[idx].transpose(1, 2)) for k, v in zip(self.keys, self.values)]

    def store(self, matches: list, sequences: list, layers: list) -> None:
        """After a generate call: `sequences` are the token ids it read and wrote, `matches` [(entry key or None,
        m)] their prompts' matches (missing ones: none), `layers` the states of the tokens it computed, each
        sequence's tokens after its first m, in order [(keys, values) (N, H, D) per layer]. A new entry shares
        its first m slots with the entry it matched. Matched entries become the most recently used; one that a new
        sequence contains whole is dropped; then the oldest go until max_tokens fit (the first new ones too, if
        need be)."""
        matches = list(matches) + [(None, 0)] * (len(sequences) - len(matches))
        shared = [self.entries[key][1][:m] if m else NO_SLOTS for key, m in matches]
        np.add.at(self.refs, np.concatenate(shared + [NO_SLOTS]), 1)  # held before any entry is dropped below
        for key, m in matches:
            if key is None or key not in self.entries:
                continue
            if m == len(self.entries[key][0]):
                self._drop(key)
            else:
                self.entries[key] = self.entries.pop(key)  # the most recently used: last
        new = np.array([len(s) - m for s, (_, m) in zip(sequences, matches)], dtype=np.int64)
        first = 0  # the new sequences that fit, the latest kept (beyond max_tokens, or what dropping frees: not)
        while first < len(sequences) and (new[first:].sum() > self.max_tokens
                                          or not self._make_room(int(new[first:].sum()), layers)):
            self._release(shared[first])
            first += 1
        slots = self._take(int(new[first:].sum()))
        if len(slots):
            src = torch.arange(int(new[:first].sum()), int(new.sum()), device=layers[0][0].device)
            target = torch.from_numpy(slots).to(self.keys[0].device)
            for (k, v), pool_k, pool_v in zip(layers, self.keys, self.values):
                pool_k.index_copy_(0, target, k[src] if first else k)
                pool_v.index_copy_(0, target, v[src] if first else v)
        kept = [np.asarray(ids, dtype=np.int64) for ids in sequences[first:]]
        parts = pieces(slots, new[first:])
        for ids, own, part, hashes in zip(kept, shared[first:], parts, self.prefix_hashes(kept)):
            key = self.next_key
            self.next_key += 1
            self.entries[key] = (ids, np.concatenate([own, part]), hashes)
            for h in hashes:
                self.index.setdefault(h, {})[key] = None

    @property
    def tokens(self) -> int:
        """Slots in use: the tokens held, a prefix that entries share counted once."""
        return len(self.refs) - 1 - self.n_free

    def _drop(self, key) -> None:
        ids, slots, hashes = self.entries.pop(key)
        for h in hashes:
            holders = self.index[h]
            del holders[key]
            if not holders:
                del self.index[h]
        self._release(slots)

    def _release(self, slots: np.ndarray) -> None:
        """One use less of each slot (a slot may come more than once); those no entry uses any more are free."""
        np.subtract.at(self.refs, slots, 1)
        freed = np.unique(slots[self.refs[slots] == 0])
        self.free.append(freed)
        self.n_free += len(freed)

    def _take(self, n: int) -> np.ndarray:
        """n free slots, each then used once."""
        pool = np.concatenate(self.free) if self.free else NO_SLOTS
        self.free, self.n_free = [pool[n:]], len(pool) - n
        self.refs[pool[:n]] = 1
        return pool[:n]

    def _make_room(self, need: int, layers: list) -> bool:
        """Whether `need` free slots could be made: the pools grown (doubling, at most to max_tokens slots), then
        the least recently used entries dropped."""
        capacity = len(self.refs) - 1
        if self.n_free < need and capacity < self.max_tokens:
            grown = min(self.max_tokens, max(2 * capacity, self.tokens + need))
            if self.keys is None:
                self.keys = [k.new_zeros(1 + grown, *k.shape[1:]) for k, _ in layers]
                self.values = [v.new_zeros(1 + grown, *v.shape[1:]) for _, v in layers]
            else:
                self.keys = [torch.cat([k, k.new_zeros(grown - capacity, *k.shape[1:])]) for k in self.keys]
                self.values = [torch.cat([v, v.new_zeros(grown - capacity, *v.shape[1:])]) for v in self.values]
            self.refs = np.concatenate([self.refs, np.zeros(grown - capacity, dtype=np.int64)])
            self.free.append(np.arange(1 + capacity, 1 + grown, dtype=np.int64))
            self.n_free += grown - capacity
        while self.n_free < need and self.entries:
            self._drop(next(iter(self.entries)))
        return self.n_free >= need


def kv_shape(config) -> tuple:
    """(layers, key/value heads, head dimension) of a text model's config: what its cache keeps per token."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def prefix_cache_tokens(policy, rows: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """A rollout's prefix cache size by default: every row's conversation twice over (its prompt and answer, and as
    much again for what later attempts add), on a GPU at most a quarter of its free memory."""
    tokens = 2 * rows * (prompt_tokens + max_new_tokens)
    if getattr(policy, "device", torch.device("cpu")).type == "cuda":
        layers, heads, head_dim = kv_shape(policy._text_config())
        size = (policy.compute_dtype or next(policy.model.parameters()).dtype).itemsize
        per_token = 2 * layers * heads * head_dim * size                           # keys and values, every layer
        tokens = min(tokens, torch.cuda.mem_get_info(policy.device)[0] // 4 // per_token)
    return max(1024, int(tokens))


def caches_prefixes(policy) -> bool:
    """Whether `generate` can use a PrefixCache: text models whose layers all keep plain key/value
    tensors (no sliding windows or linear attention, whose states cannot be cut per token)."""
    if not hasattr(policy, "caches_prefixes_"):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
        layers = StaticCache(config=policy.model.config, max_cache_len=1).layers
        policy.caches_prefixes_ = not policy.is_vlm and all(type(layer) is StaticLayer for layer in layers)
    return policy.caches_prefixes_

def host_ids(rows: list) -> list:
    """Token-id tensors, all (1, L) or all (L,), as numpy arrays (L,), moved in one operation whatever their number:
    the prefix cache's host-side work is numpy."""
    if not rows:
        return []
    flat = torch.cat(rows, -1).numpy().reshape(-1)                                          # (sum of L,)
    return pieces(flat, [r.shape[-1] for r in rows])


def prompt_ids(prompts: list) -> list:
    """Each encoded prompt's token ids as a numpy array (L,)."""
    return host_ids([p["input_ids"] for p in prompts])


def match_prefixes(policy, prompts: list, cache: PrefixCache) -> list:
    """Each prompt's longest cached prefix, (entry key, m). When the batch's prompts share a longer
    common prefix (a task's instructions, on the first round) it is computed once and cached first."""
    ids = prompt_ids(prompts)
    matches = cache.match_all(ids)
    n = min(len(x) for x in ids) - 1
    if len(ids) < 2 or n < 1:
        return matches
    differ = (np.stack([x[:n] for x in ids]) != ids[0][:n]).any(0)                          # (n,)
    common = int(np.argmax(differ)) if differ.any() else n
    if common < 16 or all(m >= common for _, m in matches):
        return matches
    from transformers import DynamicCache
    kv = DynamicCache()
    policy.model.model(input_ids=torch.from_numpy(ids[0][None, :common]).to(policy.device), cache=kv, use_cache=True)
    cache.store([], [ids[0][:common]], [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1))
                                        for layer in kv.layers])                               # (common, H, D)
    cache.computed += common
    return cache.match_all(ids)


def cached_layout(prompts: list, matches: list, pad_id: int) -> tuple:
    """Input ids and attention mask (B, Lc + Lr) of prompts whose first m tokens are served from the cache: each
    row's cached prefix right-aligned in the first Lc columns (Lc the longest m), the rest of its prompt
    right-aligned after them. Example, pad ., cached c, computed x, prompts of 4 and 6 tokens with m = 2 and 3:
        input_ids       . c c | . x x      attention_mask  0 1 1 | 0 1 1
                        c c c | x x x                      1 1 1 | 1 1 1   (row 2: 3 cached + 3 new)
    Hugging Face numbers positions by the mask's running count, so every token keeps its position."""
    ids = prompt_ids(prompts)
    past = max((m for _, m in matches), default=0)
    width = past + max(len(x) - m for x, (_, m) in zip(ids, matches))
    out, mask = np.full((len(ids), width), pad_id, dtype=np.int64), np.zeros((len(ids), width), dtype=np.int64)
    for i, (x, (_, m)) in enumerate(zip(ids, matches)):
        out[i, past - m:past], mask[i, past - m:past] = x[:m], 1
        out[i, width - len(x) + m:], mask[i, width - len(x) + m:] = x[m:], 1
    return torch.from_numpy(out), torch.from_numpy(mask), past


def generation_inputs(policy, prompts: list, cache: Optional[PrefixCache], matches: list,
                      max_new_tokens: int) -> dict:
    """Left-padded inputs for `generate`. With a prefix cache (text models) they also hold a
    preallocated key/value cache (Hugging Face's StaticCache: written in place, where the default
    cache copies itself at every token) whose first columns hold each row's cached prefix, laid out
    as `cached_layout` says."""
    if cache is None:
        return {k: v.to(policy.device) for k, v in policy.collate(prompts, side="left").items()}
    from transformers import StaticCache
    ids, mask, past = cached_layout(prompts, matches, policy.pad_id)
    kv_cache = StaticCache(config=policy.model.config, max_cache_len=ids.shape[1] + max_new_tokens)
    if past:
        for layer, (keys, values) in zip(kv_cache.layers, cache.gather(matches, past)):
            layer.update(keys, values)
    return {"input_ids": ids.to(policy.device), "attention_mask": mask.to(policy.device), "cache": kv_cache}


def remember(cache: PrefixCache, samples: list, matches: list, mask: torch.Tensor, kv_cache) -> None:
    """Put each row's prompt and response into the prefix cache, the keys and values of the tokens this call
    computed from `kv_cache` (B, H, L, D per layer, the first `get_seq_length()` positions written; rows past the
    samples are filler): one gather per layer for the whole batch."""
    layers = kv_cache.layers
    width, length, n = mask.shape[1], int(kv_cache.get_seq_length()), len(samples)
    # the last token drawn was never fed back: it has no state
    ks = np.array([max(0, min(len(s.response_ids), length - width)) for s in samples], dtype=np.int64)
    past = max((m for _, m in matches), default=0)  # the first columns: the cached prefixes, held already
    rows_p, cols_p = np.nonzero(mask[:n, past:].cpu().numpy())  # each row's computed prompt positions, in order
    rows_r = np.repeat(np.arange(n), ks)
    cols_r = width + np.arange(int(ks.sum())) - np.repeat(np.cumsum(ks) - ks, ks)
    rows, cols = np.concatenate([rows_p, rows_r]), np.concatenate([cols_p + past, cols_r])
    order = np.lexsort((cols, rows))                               # row by row, prompt then response
    device = layers[0].keys.device
    rows, cols = torch.from_numpy(rows[order]).to(device), torch.from_numpy(cols[order]).to(device)   # (N,)
    ids = prompt_ids([s.prompt for s in samples])
    responses = host_ids([s.response_ids for s in samples])
    sequences = [np.concatenate([x, r[:k]]) for x, r, k in zip(ids, responses, ks)]
    cache.store(matches, sequences, [(layer.keys[rows, :, cols], layer.values[rows, :, cols])
                                     for layer in layers])                                  # (N, H, D) each
    cache.reused += sum(m for _, m in matches)
    cache.computed += sum(len(x) - m for x, (_, m) in zip(ids, matches))


# ---- the policy ----

class ValueHead(nn.Module):
    """V(prompt): an MLP on the last layer's hidden state at the last prompt token (kept in fp32), H -> width ->
    width / 2 -> 1 with ReLUs. The default width H / 4 is the paper's head (4096 -> 1024 -> 512 -> 1 for its 11B
    model) scaled to the model."""

    def __init__(self, hidden_size: int, width: int = 0):
        super().__init__()
        width = width or max(2, hidden_size // 4)
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, width // 2), nn.ReLU(),
                                 nn.Linear(width // 2, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 even inside the body's bf16 autocast
            return self.net(hidden.float()).squeeze(-1)  # (..., H) -> (...)


def fp32_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer in fp32, whatever the weights' or autocast's dtype: bf16 logits are rounded to 8
    significant bits (a step of 0.125 at a logit of 20, 0.6 nats at the paper's temperature 0.2), more
    than the difference between two nearby policies. (..., H) -> (..., V)"""
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), head.weight.float(), bias)


LOGIT_CHUNK = 1024  # response positions whose (positions, V) fp32 logits exist at once in scoring


def token_scores(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float):
    """log softmax(logits / T) of the target tokens and the entropy of that distribution, from hidden states
    (N, H) and targets (N,) -> (N,), (N,). Under autograd the fp32 logits are recomputed in the backward
    instead of kept: a chunk of N positions holds (N, V) floats three times over while it runs, none after
    (a 128k vocabulary makes that 1.5 GB for 1024 positions)."""
    def scores(h, y):
        logp = torch.log_softmax(fp32_logits(head, h) / temperature, dim=-1)                # (N, V)
        return logp.gather(-1, y[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)       # (N,), (N,)
    if torch.is_grad_enabled() and hidden.requires_grad:
        from torch.utils.checkpoint import checkpoint
        return checkpoint(scores, hidden, targets, use_reentrant=False)
    return scores(hidden, targets)


@dataclass
class Sample:
    """One generated response."""
    prompt: dict                 # encoded prompt, batch dim 1: input_ids (1, P), attention_mask, image tensors
    response_ids: torch.Tensor   # (R,) sampled tokens, through the end-of-turn token when one came
    logprobs: torch.Tensor       # (R,) log softmax(logits / T) of each sampled token
    value: float                 # V(prompt)
    text: str                    # the response decoded, special tokens dropped
    finished: bool               # ended with an end-of-turn token (False: cut at max_new_tokens)


def _zero_pad(t: torch.Tensor, shape: list) -> torch.Tensor:
    """t with each dimension after the first zero-padded at its end to the size in `shape`."""
    pad = [p for have, want in zip(reversed(t.shape[1:]), reversed(shape)) for p in (0, want - have)]
    return F.pad(t, pad) if any(pad) else t


class Policy(nn.Module):
    """A Hugging Face LM or VLM with a value head. `forward` scores given responses (differentiable);
    `generate` samples new ones. With `compute_dtype` (bf16) both run under torch.autocast over the
    weights as they are (fp32 master weights when training); the output layer and the value head always
    compute in fp32."""

    def __init__(self, model, processor, is_vlm: bool, temperature: float = 1.0,
                 compute_dtype: Optional[torch.dtype] = None, value_width: int = 0):
        super().__init__()
        self.model, self.processor, self.is_vlm = model, processor, is_vlm
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.temperature = temperature
        self.compute_dtype = compute_dtype
        self.engine = None  # an engine.Engine that generate delegates to, when set
        hidden = self._text_config().hidden_size
        self.value_head = ValueHead(hidden, value_width).to(device=model.device)
        self.stop_ids = self._stop_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]

    def _text_config(self):
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def _stop_ids(self) -> list:
        """End-of-turn and end-of-sequence ids: the model's, the tokenizer's, and the chat markers it knows."""
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return sorted(i for i in ids if i is not None)

    @property
    def device(self) -> torch.device:
        return self.value_head.net[0].weight.device

    @property
    def max_length(self) -> int:
        return getattr(self._text_config(), "max_position_embeddings", 4096)

    def autocast(self):
        """The compute precision: bf16 autocast when `compute_dtype` is set, else the weights' own dtype.
        Matrix products and attention run in bf16 (each fp32 weight is cast once per `with` region and
        the copy cached); the residual stream and the norms stay fp32."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    # ---- encoding ----

    def encode(self, conversation: list, previous: Optional[dict] = None) -> dict:
        """A conversation -> model inputs for its next assistant turn, batch dim 1: input_ids (1, P),
        attention_mask (1, P), and for VLMs the image tensors the processor makes. `previous`: the encoded
        conversation without its last two turns (an answer and what followed it), so that a text model whose chat
        template allows it (`continues_exactly`) tokenizes only what those turns add: the same ids, a turn's
        work instead of the whole conversation's."""
        return self.encode_all([conversation], [previous])[0]

    def encode_all(self, conversations: list, previous: Optional[list] = None) -> list:
        """`encode` of many conversations (`previous`: each one's, or None): a text model's new text is tokenized
        for all of them together (`_tokenized`)."""
        previous = previous or [None] * len(conversations)
        if any(t.get("image") is not None for c in conversations for t in c) and not self.is_vlm:
            raise ValueError("this conversation has images but the model is text-only: use a vision-language model")
        if self.is_vlm:
            return [self._encode_vlm(c) for c in conversations]
        parts = [self._continuation(p["input_ids"], c[-2:]) if p is not None and len(c) > 2
                 and self.continues_exactly else None for c, p in zip(conversations, previous)]
        return self._tokenized([part or (NO_SLOTS, self._render(c), "") for part, c in zip(parts, conversations)])

    def _tokenized(self, parts: list) -> list:
        """Encoded prompts from (ids (P',) kept as they are, a text whose tokens follow them, a text whose tokens
        follow those: the user turn after an answer, which starts at a special token), the tensors made in numpy
        (a torch operation per row costs microseconds)."""
        ids = self._tokenize([text for _, text, _ in parts])
        afters = self._tokenize([after for _, _, after in parts], repeats=True)
        out = []
        for (kept, _, _), new, after in zip(parts, ids, afters):
            row = np.concatenate([kept, new, after])[None]                                     # (1, P)
            out.append({"input_ids": torch.from_numpy(row), "attention_mask": torch.from_numpy(np.ones_like(row))})
        return out

    def _tokenize(self, texts: list, repeats: bool = False) -> list:
        """The token ids of each text as numpy (L,), special tokens written in it read as such, none added, what
        came before looked up instead of tokenized again (`known_ids_`). Where the tokenizer allows it
        (`splits_at_lines`) texts are cut into lines (`line_pieces`) and every whole line is kept: a task's prompts
        repeat their instruction lines, and a round then tokenizes little more than the model's answers and the new
        deals. `repeats`: the texts themselves come back (the user turns after answers, a few feedback messages)
        and are kept whole. The rest goes in one call of the tokenizer."""
        known = self.__dict__.setdefault("known_ids_", {})
        lines = self.splits_at_lines and not repeats
        cut = [line_pieces(text) if lines else [text] for text in texts]
        unknown = list({piece: None for pieces in cut for piece in pieces if piece not in known})
        new = dict(zip(unknown, (np.asarray(x, dtype=np.int64) for x in self._tokenize_whole(unknown))))
        out = [np.concatenate([new[piece] if piece in new else known[piece] for piece in pieces]) for pieces in cut]
        # an answer's last line is seldom seen again: only lines that end are kept
        kept = {piece: ids for piece, ids in new.items() if repeats or piece.endswith("\n")}
        if len(known) + len(kept) > KNOWN_PIECES:
            known.clear()
        if len(kept) <= KNOWN_PIECES:
            known.update(kept)
        return out

    def _tokenize_whole(self, texts: list) -> list:
        """`_tokenize` without the pieces: the tokenizer's own batch encoding (Rust, without the offsets Hugging
        Face's call also computes) where it has one."""
        if not texts:
            return []
        if self.backend is None or not hasattr(self.backend, "encode_batch_fast"):
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    @property
    def backend(self):
        """The tokenizer's Rust tokenizer (the `tokenizers` library's), None for a tokenizer without one."""
        return getattr(self.tokenizer, "backend_tokenizer", None)

    @functools.cached_property
    def splits_at_lines(self) -> bool:
        """Whether the cut of `line_pieces` keeps every text's ids: a byte-level BPE tokenizer with GPT-2's
        pre-tokenizing regex (SmolLM2's, GPT-2's), nothing that normalizes text, no added token that strips the
        whitespace beside it or holds a newline; then checked on a probe. (Python's isspace holds for every
        character the regex's \\s matches, and more: a cut is never made beside a space the regex would join.)"""
        backend = self.backend
        if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
            return False
        pre, bpe = backend.pre_tokenizer, backend.model
        if (type(pre).__name__ != "ByteLevel" or pre.add_prefix_space or not pre.use_regex
                or backend.normalizer is not None or type(bpe).__name__ != "BPE" or bpe.dropout):
            return False
        if any(t.lstrip or t.rstrip or "\n" in t.content for t in backend.get_added_tokens_decoder().values()):
            return False
        probe = ("Cards: [\"J\", \"10\"].\nAn A counts as 1.\n{\"x\": 1}\n12\n34\n's\n're\nünï 🙂\n.\n,x\n"
                 "a \nb\n c\n\nd\n<|im_end|>\n<|im_start|>user\ne\u00a0\nf\n\u2003g")
        whole = self._tokenize_whole([probe])[0]
        return [i for piece in self._tokenize_whole(line_pieces(probe)) for i in piece] == list(whole)

    def _render(self, conversation: list) -> str:
        """A text model's prompt as the chat template writes it, ending in the generation prompt. A conversation's
        first prompt, one user turn, is the template's text around that turn's content (`first_turn_text`)."""
        if len(conversation) == 1 and conversation[0]["role"] == "user" and self.first_turn_text is not None:
            before, after = self.first_turn_text
            return before + conversation[0]["content"] + after
        return self._template_text(conversation)

    def _template_text(self, turns: list) -> str:
        """The chat template's text of turns ({"role", "content"}), ending in the generation prompt."""
        messages = [{"role": t["role"], "content": t["content"]} for t in turns]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @functools.cached_property
    def first_turn_text(self) -> Optional[tuple]:
        """(before, after): what the chat template writes around the content of a prompt of one user turn, rendered
        once with a marker; None for a template that edits contents in a way a probe shows (trims them, escapes
        quotes or markup, expands tabs). A template that writes the date keeps the date of this first render."""
        def render(content):
            return self._template_text([{"role": "user", "content": content}])
        around = render("\x00").split("\x00")
        probe = "\n Make 24 from the cards 3, 3, 8, 8.\n\tAnswer in \"JSON\" <&> 'x'. \n"
        if len(around) != 2 or render(probe) != around[0] + probe + around[1]:
            return None
        return around[0], around[1]

    def _encode_vlm(self, conversation: list) -> dict:
        images = [turn["image"] for turn in conversation if turn.get("image") is not None]
        messages = [{"role": t["role"], "content": ([{"type": "image"}] if t.get("image") is not None else [])
                     + [{"type": "text", "text": t["content"]}]} for t in conversation]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out = self.processor(text=text, images=images or None, return_tensors="pt", add_special_tokens=False)
        return {k: v for k, v in out.items() if torch.is_tensor(v)}

    # A chat template renders a conversation as text, which is then tokenized whole. The text that an answer and
    # the user's next turn add is the same after any prompt (`_turns_text`), and tokenization restarts at every
    # special token (<|im_start|>, ...), so the ids of a continued conversation are the previous ones up to their
    # last special token, then the rest of them and the new text tokenized together. `continues_exactly` checks
    # both on a probe; the tests check the built-in models' template on the tasks' conversations.

    def _continuation(self, ids: torch.Tensor, turns: list) -> Optional[tuple]:
        """(ids (P',) kept as they are, numpy, the text whose tokens follow them, the text whose tokens follow
        those) of a prompt `ids` (1, P) continued by an answer and the user's next turn; None where the template
        does not allow it."""
        added = self._turns_text(turns)
        if added is None:
            return None
        host = ids.numpy()[0]
        # the last special token: a prompt ends with the generation prompt, so it is among the last few
        cut = next((j + 1 for j in range(len(host) - 1, -1, -1) if int(host[j]) in self.split_set), 0)
        return host[:cut], self._text_of(tuple(host[cut:].tolist())) + added[0], added[1]

    def _text_of(self, ids: tuple) -> str:
        """The text of the tokens after a prompt's last special token: the same few each time ("assistant\\n"),
        decoded once."""
        known = self.__dict__.setdefault("tail_texts_", {})
        if ids not in known:
            text = self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if len(ids) > 8:
                return text
            known[ids] = text
        return known[ids]

    def _turns_text(self, turns: list) -> Optional[tuple]:
        """The text the chat template adds for an answer and the user's next turn after a prompt that ends in the
        generation prompt, as (the answer's, the user turn's) where the template opens the user's with a special
        token (tokenization restarts there), else (all of it, ""): the template rendered once with markers in
        their place, the contents put there. None for other turns."""
        if [t["role"] for t in turns] != ["assistant", "user"]:
            return None
        if not hasattr(self, "turn_pieces_"):
            probe = [{"role": "user", "content": "x"}]
            before = self._template_text(probe)
            text = self._template_text(probe + [{"role": "assistant", "content": "\x00"},
                                                {"role": "user", "content": "\x01"}])
            around = text[len(before):].split("\x00")  # (before the answer, the rest)
            self.turn_pieces_ = ((around[0], *around[1].split("\x01")) if text.startswith(before) and len(around) == 2
                                 and around[1].count("\x01") == 1 else None)
            self.turn_split_ = self.turn_pieces_ is not None and any(
                self.turn_pieces_[1].startswith(token) for token in self.tokenizer.get_added_vocab())
        if self.turn_pieces_ is None:
            return None
        start, middle, end = self.turn_pieces_
        answer, user = start + turns[0]["content"], middle + turns[1]["content"] + end
        return (answer, user) if self.turn_split_ else (answer + user, "")

    @functools.cached_property
    def split_set(self) -> frozenset:
        """The ids of the tokenizer's added tokens (chat markers, end of turn): tokenization restarts after each."""
        return frozenset(self.tokenizer.get_added_vocab().values()) | frozenset(self.tokenizer.all_special_ids)

    @functools.cached_property
    def continues_exactly(self) -> bool:
        """Whether `encode(conversation, previous)` gives the ids of the whole conversation's encoding for this
        chat template, tried on a probe (a template that renders earlier turns differently or edits contents, or a
        tokenizer that does not restart at special tokens, fails it: encode then tokenizes every prompt whole)."""
        # a first part longer than _turns_text's probe, contents with spaces at their ends: a template counting
        # turns or trimming contents fails here
        first = [{"role": "user", "content": "Make 24 from the cards 3, 3, 8, 8.\nAnswer in JSON."},
                 {"role": "assistant", "content": "8 * 3"}, {"role": "user", "content": "Wrong. Try again."}]
        turns = [{"role": "assistant", "content": '\n{"formula": "8 / (3 - 8 / 3)"} '},
                 {"role": "user", "content": " You failed this trial. Try again.\n"}]
        messages = [{"role": t["role"], "content": t["content"]} for t in first + turns]
        whole = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        whole = whole["input_ids"] if hasattr(whole, "keys") else whole
        start = self._tokenized([(NO_SLOTS, self._render(first), "")])[0]["input_ids"][0]
        part = self._continuation(start[None], turns)
        return part is not None and self._tokenized([part])[0]["input_ids"][0].tolist() == list(whole)

    def response_ids(self, text: str) -> torch.Tensor:
        """An assistant answer as the model should produce it: its tokens, then the chat template's
        end-of-turn token (so that training on it teaches the model to stop). (R,)"""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor(ids + [self.end_of_turn_id], dtype=torch.long)

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """The token the chat template closes an assistant turn with (e.g. <|im_end|>, <|eot_id|>)."""
        template = self.processor if self.is_vlm else self.tokenizer
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "REPLY"}]
        if self.is_vlm:
            probe = [{"role": t["role"], "content": [{"type": "text", "text": t["content"]}]} for t in probe]
        text = template.apply_chat_template(probe, tokenize=False)
        after = text[text.rindex("REPLY") + len("REPLY"):]
        vocab = self.tokenizer.get_vocab()
        found = [(after.find(t), vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab and t in after]
        return min(found)[1] if found else self.stop_ids[0]

    def collate(self, prompts: list, responses: Optional[list] = None, side: str = "right") -> dict:
        """Batch encoded prompts (each batch dim 1), each followed by its response ids when given.

        Per-token tensors are padded (right for scoring, left for generation); image tensors are
        zero-padded to one shape and concatenated. With responses the batch also holds `prompt_lens`
        (B,) and `response_ids` (B, R) padded with pad ids, `response_mask` (B, R). Example, pad id 0,
        prompts [5 6 7] and [8], responses [1 2] and [3 4 9]:
            input_ids     [[5 6 7 1 2]    prompt_lens [3 1]   response_ids  [[1 2 0]
                           [8 3 4 9 0]]                                      [3 4 9]]
        """
        responses = responses if responses is not None else [None] * len(prompts)
        rows = []
        for prompt, resp in zip(prompts, responses):
            row = dict(prompt)
            if resp is not None:
                n = len(resp)
                row["input_ids"] = torch.cat([prompt["input_ids"], resp.view(1, -1).to(prompt["input_ids"])], 1)
                for key in PER_TOKEN_KEYS[1:]:
                    if key in row:  # the response attends like the prompt's last token does
                        last = prompt[key][:, -1:]
                        row[key] = torch.cat([prompt[key], last.expand(-1, n, *last.shape[2:])], 1)
            rows.append(row)
        width = max(r["input_ids"].shape[1] for r in rows)
        batch = {}
        for key in rows[0]:
            if key in PER_TOKEN_KEYS:
                fill = self.pad_id if key == "input_ids" else 0
                padded = []
                for r in rows:
                    t = r[key]
                    pad = t.new_full((1, width - t.shape[1], *t.shape[2:]), fill)
                    padded.append(torch.cat([t, pad] if side == "right" else [pad, t], 1))
                batch[key] = torch.cat(padded, 0)
            else:  # per image: zero-padded as processors pad a batch (Idefics3's tile count varies per image)
                shape = [max(sizes) for sizes in zip(*(r[key].shape[1:] for r in rows))]
                batch[key] = torch.cat([_zero_pad(r[key], shape) for r in rows], 0)
        if responses[0] is not None:
            batch["prompt_lens"] = torch.tensor([p["input_ids"].shape[1] for p in prompts])
            lens = [len(r) for r in responses]
            batch["response_ids"] = torch.full((len(rows), max(lens)), self.pad_id, dtype=torch.long)
            for i, r in enumerate(responses):
                batch["response_ids"][i, :len(r)] = r
            batch["response_mask"] = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
        return batch

    # ---- scoring ----

    def forward(self, batch: dict, temperature: Optional[float] = None) -> dict:
        """Differentiable scores of a collated (right-padded) batch with responses:
        logprobs (B, R) of the response tokens under softmax(logits / T), entropy (B, R) of that
        distribution, values (B,) = V(prompt), and the response_mask (B, R)."""
        t = temperature or self.temperature
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        prompt_lens, response_ids, mask = batch["prompt_lens"], batch["response_ids"], batch["response_mask"]
        inputs = {k: v for k, v in batch.items() if k not in ("prompt_lens", "response_ids", "response_mask")}
        with self.autocast():
            hidden = self.model.model(**inputs).last_hidden_state                           # (B, T, H)
        b = torch.arange(hidden.shape[0], device=hidden.device)
        values = self.value_head(hidden[b, prompt_lens - 1])                                 # (B,)
        # the token at position p is predicted by the hidden state at p - 1
        pos = (prompt_lens[:, None] - 1 + torch.arange(response_ids.shape[1], device=hidden.device)[None, :])
        pos = pos.clamp(max=hidden.shape[1] - 1)                                            # (B, R)
        head, chosen = self.model.get_output_embeddings(), hidden[b[:, None], pos]           # (B, R, H)
        flat = [token_scores(head, h, y, t) for h, y in zip(chosen.flatten(0, 1).split(LOGIT_CHUNK),
                                                            response_ids.flatten().split(LOGIT_CHUNK))]
        logprobs = torch.cat([lp for lp, _ in flat]).view(mask.shape)                        # (B, R)
        entropy = torch.cat([e for _, e in flat]).view(mask.shape)                           # (B, R)
        return {"logprobs": logprobs * mask, "entropy": entropy * mask, "values": values, "response_mask": mask}

    @torch.no_grad()
    def values(self, prompts: list) -> torch.Tensor:
        """V(prompt) of encoded prompts, (B,) on the CPU: the bootstrap value of an episode cut off by the
        turn budget. Under FSDP every rank must call it, even with no prompts."""
        with gathered(self):
            if not prompts:
                return torch.zeros(0)
            batch = {k: v.to(self.device) for k, v in self.collate(prompts, side="right").items()}
            with self.autocast():
                hidden = self.model.model(**batch).last_hidden_state                            # (B, P, H)
            last = batch["attention_mask"].sum(1) - 1                                           # (B,) right-padded
            return self.value_head(hidden[torch.arange(len(prompts), device=hidden.device), last]).float().cpu()

    # ---- generation ----

    @torch.no_grad()
    def generate(self, conversations: list, max_new_tokens: int = 256, temperature: Optional[float] = None,
                 top_p: float = 1.0, greedy: bool = False, prompts: Optional[list] = None,
                 cache: Optional[PrefixCache] = None, top_k: int = 0) -> list:
        """Sample one response per conversation, batched: left padding, attention masks, KV cache;
        stops each sequence at an end-of-turn token. `prompts` (already encoded) skips encoding;
        `cache` (text models) serves the prompts' known prefixes and keeps what this call reads and writes."""
        from transformers import GenerationConfig, LogitsProcessorList
        prompts = prompts if prompts is not None else [self.encode(c) for c in conversations]
        cache = cache if caches_prefixes(self) else None
        if self.engine is not None:  # engine.py: a static cache and a compiled decode step instead
            with gathered(self):
                return self.engine.generate(prompts, max_new_tokens, temperature, top_p, top_k, greedy, cache)
        sampler = Sampler(temperature or self.temperature, top_p, greedy, top_k)
        captured = []

        def output_layer(head, args, logits):
            if not captured:  # the prefill: the last prompt token's hidden state gives V(prompt)
                captured.append(args[0][:, -1])
            return None if logits.dtype == torch.float32 else fp32_logits(head, args[0])  # as `forward` computes them
        hook = self.model.get_output_embeddings().register_forward_hook(output_layer)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_ids,
                                  pad_token_id=self.pad_id, bos_token_id=self.tokenizer.bos_token_id,
                                  return_dict_in_generate=cache is not None)
        was_training = self.training
        self.eval()
        try:
            with gathered(self), self.autocast():
                matches = match_prefixes(self, prompts, cache) if cache is not None else []
                batch = generation_inputs(self, prompts, cache, matches, max_new_tokens)
                out = self.model.generate(**batch, generation_config=config,
                                          logits_processor=LogitsProcessorList([sampler]))
                values = self.value_head(captured[0]).float().cpu()                          # (B,)
        finally:
            hook.remove()
            self.train(was_training)
        seqs = out.sequences if cache is not None else out
        new = seqs[:, batch["input_ids"].shape[1]:].cpu()                                     # (B, R)
        samples = self.samples(prompts, new, torch.stack(sampler.logprobs, dim=1).cpu(), values)
        if cache is not None:
            remember(cache, samples, matches, batch["attention_mask"], out.cache)
        return samples

    def samples(self, prompts: list, new: torch.Tensor, logprobs: torch.Tensor, values: torch.Tensor) -> list:
        """One Sample per prompt from the generated tokens (B, R), their log-probs (B, R) and V(prompt) (B,):
        each response cut after its first end-of-turn token."""
        # rows cut in numpy: a torch operation per row would cost microseconds each
        new, logprobs, values = new.numpy(), logprobs.numpy(), values.tolist()
        stop = np.isin(new, self.stop_ids)                                                    # (B, R)
        finished = stop.any(1)                                                                # (B,)
        lengths = np.where(finished, stop.argmax(1) + 1, new.shape[1]).tolist()               # (B,)
        texts = self._decode_all([new[i, :n].tolist() for i, n in enumerate(lengths)])
        return [Sample(prompt, torch.from_numpy(new[i, :n].copy()), torch.from_numpy(logprobs[i, :n].copy()),
                       values[i], text, bool(finished[i]))
                for i, (prompt, n, text) in enumerate(zip(prompts, lengths, texts))]

    def _decode_all(self, rows: list) -> list:
        """The text of each row of token ids, special tokens left out: Hugging Face's batch_decode, in one call of
        the Rust tokenizer where that is all it would do (no clean-up of spaces, no decoding of its own)."""
        from transformers import PreTrainedTokenizerFast
        own = type(self.tokenizer)
        if (self.backend is None or self.tokenizer.clean_up_tokenization_spaces
                or any(getattr(own, name, None) is not getattr(PreTrainedTokenizerFast, name)
                       for name in ("batch_decode", "decode", "_decode"))):
            return self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return self.backend.decode_batch(rows, skip_special_tokens=True)

    def checkpoint_sampling(self) -> dict:
        """How Hugging Face's generate samples with this checkpoint's generation config and no arguments: greedy
        unless the config sets do_sample; then its temperature, top-p and top-k, Hugging Face's defaults (1.0,
        1.0, 50) where it names none. The official code generates this way: evaluation as is, training with
        temperature 0.2 (Llama-3.2-Vision-Instruct's config: do_sample, temperature 0.6, top-p 0.9)."""
        gen = self.model.generation_config
        if not gen.do_sample:
            return {"greedy": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
        drawn = {"greedy": False, "temperature": gen.temperature or SAMPLING_DEFAULTS["temperature"],
                 "top_p": gen.top_p or SAMPLING_DEFAULTS["top_p"],
                 "top_k": SAMPLING_DEFAULTS["top_k"] if gen.top_k is None else gen.top_k}
        print0 = printer(rank())
        where = f"{getattr(self.model, 'name_or_path', 'the checkpoint')}/generation_config.json"
        t = drawn["temperature"]
        if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < MIN_TEMPERATURE:
            print0(f"warning: {where}: temperature={t!r} is below {MIN_TEMPERATURE} (the tempered distribution "
                   "overflows or is rounding noise there): sampling greedily")
            return {"greedy": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
        valid = {"temperature": lambda v: v > 0 and math.isfinite(v), "top_p": lambda v: 0 < v <= 1,
                 "top_k": lambda v: v >= 0 and v == int(v)}
        for name, ok in valid.items():  # a hand-edited or foreign config: Hugging Face's default, said out loud
            value = drawn[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
                drawn[name] = SAMPLING_DEFAULTS[name]
                print0(f"warning: {where}: {name}={value!r} is out of range; sampling with Hugging Face's default "
                       f"{SAMPLING_DEFAULTS[name]} instead")
        return drawn

    # ---- saving ----

    def save(self, path: str, extras: Optional[dict] = None) -> None:
        """Write a checkpoint folder: the HF model (safetensors, config, generation config), the tokenizer
        or processor, value_head.safetensors, and `extras` ({file name: JSON-able object, or
        torch-saveable object for names ending in .pt}). Under FSDP every rank must call this: the full
        weights are gathered to rank 0, which alone writes, into a temporary folder renamed at the end."""
        from safetensors.torch import save_file
        state = full_state_dict(self)
        if rank() != 0:
            return
        model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        value_state = {k[len("value_head."):]: v.contiguous() for k, v in state.items() if k.startswith("value_head.")}
        with atomic_folder(path) as tmp:
            self.model.save_pretrained(tmp, state_dict=model_state)
            self.processor.save_pretrained(tmp)
            save_file(value_state, os.path.join(tmp, VALUE_HEAD_FILE))
            for name, obj in (extras or {}).items():
                if name.endswith(".pt"):
                    torch.save(obj, os.path.join(tmp, name))
                else:
                    with open(os.path.join(tmp, name), "w") as f:
                        json.dump(obj, f, indent=1)


def engine_wanted(policy, choice: Optional[bool]) -> bool:
    """Whether `generate` should decode with engine.py: `choice` (--engine / --no-engine), by default on a GPU for a
    text model, where a compiled step replaces ~2,000 kernel launches; VLMs keep their own path."""
    return (policy.device.type == "cuda" if choice is None else choice) and not policy.is_vlm


def _is_vlm_config(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config")


PRECISIONS = ("auto", "fp32", "bf16")


def resolve(name_or_path: str) -> str:
    """A local folder as given; a built-in name ("smollm2-135m", "tiny-text", "tiny-vlm", "smolvlm-local") through
    model_zoo.py, imported only then, so that this file copies out without it for a model of your own."""
    if os.path.isfile(os.path.join(name_or_path, "config.json")):
        return name_or_path
    import model_zoo  # a built-in name, or the one-line error that names what is accepted
    return model_zoo.resolve(name_or_path)


def compute_dtype_of(precision: str, device) -> Optional[torch.dtype]:
    """The compute dtype of a training precision: bf16 for "bf16", None (the fp32 weights' own) for
    "fp32"; "auto" is bf16 on a GPU and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def load_policy(name_or_path: str, device=None, dtype: Optional[torch.dtype] = None,
                gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                temperature: float = 1.0, precision: Optional[str] = None) -> Policy:
    """Load a policy by name ("smollm2-135m", "tiny-text", "tiny-vlm") or local HF folder.

    For inference (precision None): the GPU when there is one, bf16 weights there, fp32 on CPU, or
    `dtype`. For training, a `precision` (auto, fp32, bf16): fp32 weights, which the optimizer steps
    (an Adam step of 1e-6 is lost in bf16's 8 significant bits), computing in bf16 under autocast for
    "bf16" (see `compute_dtype_of`). The trainers turn on gradient checkpointing where memory needs it
    (`runs.prepare_training`). A checkpoint folder's
    value_head.safetensors is loaded when present, else the head starts fresh."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                              AutoTokenizer)
    folder = resolve(name_or_path)
    device = torch.device(check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute_dtype = compute_dtype_of(precision, device) if precision is not None else None
    if precision is not None:
        dtype = torch.float32
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        # cuDNN's attention builds an execution graph for every new shape (hundreds of ms each, and a
        # rollout's prompt widths all differ) and spends about 1 ms of CPU per call; flash and
        # memory-efficient attention need neither
        torch.backends.cuda.enable_cudnn_sdp(False)
    with _one_line_errors(f"model folder {folder!r}: unreadable config.json"):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    is_vlm = _is_vlm_config(config)
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    with _one_line_errors(f"model folder {folder!r}: its weights cannot be loaded"), _quiet_transformers():
        model, info = auto.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                           output_loading_info=True)
    check_weights_cover(folder, info)
    model = model.to(device)
    with _one_line_errors(f"model folder {folder!r}: its tokenizer or processor cannot be loaded"):
        processor = (AutoProcessor if is_vlm else AutoTokenizer).from_pretrained(folder,
                                                                               trust_remote_code=trust_remote_code)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head, value_state = os.path.join(folder, VALUE_HEAD_FILE), None
    with _one_line_errors(f"{head!r}: not a value head of this model (delete it to start a fresh one)"):
        if os.path.exists(head):
            from safetensors.torch import load_file
            value_state = load_file(head, device=str(device))
        # a saved head keeps the width it was trained with (before the paper-scaled default, 512)
        width = value_state["net.0.weight"].shape[0] if value_state else 0
        policy = Policy(model, processor, is_vlm, temperature, compute_dtype, value_width=width)
        if value_state:
            policy.value_head.load_state_dict(value_state)
    where = next((n for n in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
                  if os.path.exists(os.path.join(folder, n))), "the tokenizer")
    with _one_line_errors(f"model folder {folder!r}: its chat template ({where}) cannot be rendered"):
        policy.end_of_turn_id  # renders a probe conversation: a broken template fails here, not at the first prompt
    return policy


def check_weights_cover(folder: str, info: dict) -> None:
    """Refuse weights that leave some of the model's parameters freshly initialized (tensor names that do not match,
    e.g. all prefixed) or hold tensors the model has no place for: one line naming a few of each. Tied weights
    (lm_head to the embedding) are neither: Hugging Face fills them and does not list them."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing or unexpected:
        few = lambda keys: ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")  # noqa: E731
        parts = ([f"{len(missing)} parameter(s) missing from the weights ({few(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} tensor(s) the model has no place for ({few(unexpected)})"] if unexpected else [])
        raise ValueError(f"model folder {folder!r}: its weights do not match its config.json: {'; '.join(parts)}")


@contextlib.contextmanager
def _quiet_transformers():
    """Hugging Face's load report is many lines; what matters of it, check_weights_cover says in one."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _one_line_errors(what: str):
    """Turn whatever a broken file raises inside the block (JSON, safetensors, shape and missing-file errors,
    all different types) into one ValueError: `what`, then the first line of the original message."""
    try:
        yield
    except Exception as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{what} ({type(e).__name__}: {detail})") from None


def check_device(device) -> Optional[str]:
    """`device` itself when this machine has it (None or "" pass: automatic); ValueError otherwise."""
    if not device:
        return device or None
    expected = f"device={device!r}: expected cpu, cuda or cuda:N (empty: the GPU when there is one)"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(expected) from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={device!r}: no such CUDA GPU here ({torch.cuda.device_count()} visible); "
                         "use --device cpu or leave it empty")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(expected)
    return str(device)
