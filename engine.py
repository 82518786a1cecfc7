"""A decoding engine for the policy's text models, in plain PyTorch (gpt-fast's recipe over Hugging Face's model):
a static key/value cache per (batch, length) bucket, the prompts prefilled in one pass, then a one-token decode
step that torch.compile can capture once per bucket (`compile=True`; on a GPU mode "reduce-overhead" replays it
as a CUDA graph, so the ~30 kernel launches of a layer stack cost one), fp32 logits and sampling with the
log-probabilities of the tempered distribution, and a stop at the end-of-turn token checked every few steps
(every check waits for the device).

    engine = Engine(policy, compile=True)
    samples = engine.generate(prompts, max_new_tokens=128, temperature=0.2)   # what Policy.generate returns
    attach(policy, compile=True)            # Policy.generate (and so rollout.py) decodes here; None for a VLM

Buckets: the batch is padded up to a power of two (at least 8) with filler rows, the cache length up to a
multiple of 256 tokens, so a rollout's rounds reuse a few compiled steps instead of compiling one per shape.
VLMs keep Policy.generate's own path (their vision inputs and cross-attention caches are not static).
"""
from __future__ import annotations

import time

import torch

from model import Sampler, cached_layout, fp32_logits, match_prefixes, remember

LENGTH_STEP = 256       # cache lengths are multiples of this
MIN_BATCH = 8           # the smallest batch bucket; larger ones are powers of two
STOP_CHECK_EVERY = 8    # decode steps between checks that every row has stopped (each check is a device sync)


class Engine:
    """Batched decoding for one text policy. Holds one static cache per bucket it has served (so compiled steps
    keep their tensor addresses) and, with `compile`, one compiled decode step per bucket."""

    def __init__(self, policy, compile: bool = False):
        if policy.is_vlm:
            raise ValueError("the decoding engine serves text models; a VLM generates with Policy.generate")
        self.policy, self.compile = policy, compile
        self.caches, self.steps, self.warm = {}, {}, set()
        self.warmup_s = 0.0       # seconds of each bucket's first decode step (compilation), apart from the rest

    @staticmethod
    def bucket(batch: int, length: int) -> tuple:
        """(batch bucket, cache-length bucket). Example: 37 rows of up to 300 tokens -> (64, 512)."""
        b = MIN_BATCH
        while b < batch:
            b *= 2
        return b, -(-length // LENGTH_STEP) * LENGTH_STEP

    def cache(self, b: int, length: int):
        """The bucket's static cache, emptied."""
        from transformers import StaticCache
        key = (b, length)
        if key not in self.caches:
            self.caches[key] = StaticCache(config=self.policy.model.config, max_cache_len=length)
        else:
            self.caches[key].reset()
        return self.caches[key]

    def step(self, b: int, length: int):
        """The bucket's decode step: (token (B, 1), position (B, 1), mask (B, L), cache) -> fp32 logits (B, V)."""
        key = (b, length)
        if key not in self.steps:
            model, head = self.policy.model, self.policy.model.get_output_embeddings()

            def decode(token, position, mask, cache):
                hidden = model.model(input_ids=token, attention_mask=mask, position_ids=position, cache=cache,
                                     use_cache=True).last_hidden_state[:, -1]                  # (B, H)
                return fp32_logits(head, hidden)                                               # (B, V)
            gpu = self.policy.device.type == "cuda"
            self.steps[key] = (torch.compile(decode, mode="reduce-overhead" if gpu else None, dynamic=False)
                               if self.compile else decode)
        return self.steps[key]

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens: int = 256, temperature=None, top_p: float = 1.0,
                 top_k: int = 0, greedy: bool = False, cache=None) -> list:
        """One Sample per encoded prompt (batch dim 1 each), as Policy.generate returns them. `cache`: a
        model.PrefixCache whose prefixes are not prefilled again, and which keeps what this call reads and writes."""
        policy, n = self.policy, len(prompts)
        was_training = policy.training
        policy.eval()
        try:
            with policy.autocast():
                matches = match_prefixes(policy, prompts, cache) if cache is not None else [(None, 0)] * n
                sampler = Sampler(temperature or policy.temperature, top_p, greedy, top_k)
                tokens, values, mask, kv, width = self._decode(prompts, matches, cache, max_new_tokens, sampler)
        finally:
            policy.train(was_training)
        new = torch.stack(tokens, 1)[:n].cpu()                                                 # (n, R)
        logprobs = torch.stack(sampler.logprobs, 1)[:n].cpu()                                  # (n, R)
        samples = policy.samples(prompts, new, logprobs, values[:n])
        if cache is not None:
            remember(cache, samples, matches, mask[:, :width], kv)
        return samples

    def _decode(self, prompts: list, matches: list, cache, max_new_tokens: int, sampler: Sampler) -> tuple:
        """Prefill and decode a batch, its cached prefixes served from `cache`: (tokens [(B,)], values (B,), mask
        (B, L), the static cache, prompt width W)."""
        policy, n = self.policy, len(prompts)
        rows, row_mask, past = cached_layout(prompts, matches, policy.pad_id)                 # (n, W) each
        width = rows.shape[1]
        b, length = self.bucket(n, width + max_new_tokens)
        ids = torch.full((b, width), policy.pad_id, dtype=torch.long)                         # (B, W) left-padded
        mask = torch.zeros((b, length), dtype=torch.long)                                     # (B, L) 1: written
        ids[:n], mask[:n, :width] = rows, row_mask
        mask[n:, width - 1] = 1  # a filler row attends to its one pad token: never an empty softmax row
        device = policy.device
        ids, mask = ids.to(device), mask.to(device)
        position = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)                               # (B, W)
        kv = self.cache(b, length)
        if past:  # the cached prefixes, in the first `past` columns: the prefill computes only the rest
            for layer, (keys, values) in zip(kv.layers, cache.gather(matches, past, rows=b)):
                layer.update(keys, values)
        # prefill: the left-padded prompts (past their cached prefixes) in one pass; the last position gives V and
        # the first token
        hidden = policy.model.model(input_ids=ids[:, past:], attention_mask=mask[:, :width],
                                    position_ids=position[:, past:], cache=kv,
                                    use_cache=True).last_hidden_state[:, -1]                   # (B, H)
        values = policy.value_head(hidden).float().cpu()                                       # (B,)
        token = sampler.draw(fp32_logits(policy.model.get_output_embeddings(), hidden))        # (B,)
        tokens = [token]
        stop_ids = torch.tensor(policy.stop_ids, device=device)
        done = torch.isin(token, stop_ids)                                                     # (B,)
        done[n:] = True
        next_pos = position[:, -1:] + 1                                                        # (B, 1)
        step = self.step(b, length)
        for t in range(1, max_new_tokens):
            if t % STOP_CHECK_EVERY == 0 and bool(done.all()):
                break
            mask[:, width + t - 1] = 1
            start = time.perf_counter()
            logits = step(token[:, None], next_pos, mask, kv)                                  # (B, V)
            if (b, length) not in self.warm:
                self.warm.add((b, length))
                self.warmup_s += time.perf_counter() - start
            token = sampler.draw(logits)
            tokens.append(token)
            done |= torch.isin(token, stop_ids)
            next_pos = next_pos + 1
        return tokens, values, mask, kv, width


def attach(policy, compile: bool = False):
    """Make `policy.generate` decode with an Engine; a VLM keeps its own path (returns None then). Compilation is
    for one process: FSDP gathers and releases the weights around every generate, which a captured graph would
    not follow."""
    from runs import is_distributed
    policy.engine = None if policy.is_vlm else Engine(policy, compile=compile and not is_distributed())
    return policy.engine
