"""load_policy on other chat-VLM families the Auto classes know: LLaVA, Qwen2-VL and Idefics3 (SmolVLM's).

Each family gets a tiny seeded random-weight model and a working processor (a PIL image processor, SmolLM2's
tokenizer plus the family's image tokens, a chat template with the family's image placeholder), saved as a
plain HF folder and loaded back through load_policy; the checks are test_model.py's: generate/score
agreement and batch-padding invariance of scores."""
import pytest
import torch
from PIL import Image
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                          Idefics3Processor, LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil,
                          LlavaProcessor, ProcessorMixin, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessorPil, Qwen2VLProcessor)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

import model as M
import model_zoo as Z

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096)


def tokenizer(*special_tokens):
    tok = Z.smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tok


def text_config(tok, **extra):
    return dict(**TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **extra)


def chat_template(placeholder):
    return Z.VLM_CHAT_TEMPLATE.replace("<|image|>", placeholder)


def llava():
    tok = tokenizer("<image>")
    # a 56-pixel CLIP tower with 14-pixel patches: 16 image tokens (its CLS feature is dropped: "default")
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor, tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=chat_template("<image>"))
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", **text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16, vision_feature_layer=-1)
    return LlavaForConditionalGeneration, config, processor


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor, which transformers builds only with torchvision (not
    installed): the constructor checks every sub-processor and AutoProcessor loads every one. The processor
    call, its image tokens and outputs (image_grid_thw, mm_token_type_ids) are Qwen2VLProcessor's own."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def qwen2_vl():
    tok = tokenizer("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    # 14-pixel patches, merged 2x2 into one token: images are resized to multiples of 28 pixels, 28*28 to 56*84
    # pixels in all, so each image gives 1 to 6 tokens and its own number of flattened patches
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 84})
    processor = Qwen2VLImageOnlyProcessor(image_processor, tok,
                                          chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    token = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        # M-RoPE splits a head's 8 rotary frequencies (head dim 16) over time, height and width
        text_config=text_config(tok, rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3])),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"))
    return Qwen2VLForConditionalGeneration, config, processor


def idefics3():
    tok = tokenizer("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
    # images are resized to 64 pixels on their long side and split into 32-pixel tiles plus a global view
    # (3 or 5 tiles here); 8-pixel patches, merged 2x2 (scale_factor), give 4 image tokens per tile
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor, tok, image_seq_len=4, chat_template=chat_template("<image>"))
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", **text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    return Idefics3ForConditionalGeneration, config, processor


FAMILIES = {"llava": llava, "qwen2_vl": qwen2_vl, "idefics3": idefics3}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(the family's ForConditionalGeneration class, the policy load_policy makes of its saved tiny folder)."""
    cls, config, processor = FAMILIES[request.param]()
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    cls(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    with pytest.MonkeyPatch.context() as mp:
        if type(processor) is Qwen2VLImageOnlyProcessor:  # AutoProcessor finds a class outside transformers by
            mp.setitem(PROCESSOR_MAPPING._extra_content, type(config), type(processor))  # name once registered
        return cls, M.load_policy(str(folder))


def conversations():
    """Three conversations with one image each, the second multi-turn. The first is the shortest, and its wide
    image gives Idefics3 fewer tiles than the others (so it is zero-padded in a batch) and Qwen2-VL more patches."""
    sizes = [(90, 40), (40, 40), (40, 70)]
    out = [[{"role": "user", "content": "describe this " + "please " * (5 * i),
             "image": Image.new("RGB", size, (70 * i, 90, 160))}] for i, size in enumerate(sizes)]
    out[1] += [{"role": "assistant", "content": "an earlier answer"}, {"role": "user", "content": "try again"}]
    return out


def test_loads_as_its_family(family):
    cls, policy = family
    assert policy.is_vlm and type(policy.model) is cls


def test_generate_and_score_agree(family):
    _, policy = family
    torch.manual_seed(1)
    samples = policy.generate(conversations(), max_new_tokens=8, temperature=0.7)
    batch = policy.collate([s.prompt for s in samples], [s.response_ids for s in samples])
    with torch.no_grad():
        out = policy(batch, temperature=0.7)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        assert 0 < n <= 8 and out["response_mask"][i].sum() == n
        assert (out["logprobs"][i, :n] - s.logprobs).abs().max() < 1e-4
        assert abs(out["values"][i].item() - s.value) < 1e-4


def test_batch_padding_invariance(family):
    _, policy = family
    prompts = [policy.encode(c) for c in conversations()]
    assert prompts[0]["input_ids"].shape[1] < min(p["input_ids"].shape[1] for p in prompts[1:])
    responses = [torch.tensor([11, 12, 13, 14]), torch.tensor([21, 22]), torch.tensor([31, 32, 33])]
    with torch.no_grad():
        together = policy(policy.collate(prompts, responses))
        alone = policy(policy.collate(prompts[:1], responses[:1]))
    assert (together["logprobs"][0, :4] - alone["logprobs"][0]).abs().max() < 1e-4
    assert abs(together["values"][0] - alone["values"][0]) < 1e-4
