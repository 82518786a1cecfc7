"""model.py: loading, generate/score agreement, padding invariance, gradients, save/load, FSDP2 on gloo."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
from rollout import make_envs
from launch import report, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def text_policy():
    return M.load_policy("tiny-text")


@pytest.fixture(scope="module")
def vlm_policy():
    return M.load_policy("tiny-vlm")


def convs(n, image=False):
    """n conversations of different lengths, some multi-turn, with an image in the first turn if asked."""
    out = []
    for i in range(n):
        first = {"role": "user", "content": "solve this " + "please " * (4 * i)}
        if image:
            first["image"] = Image.new("RGB", (40 + 10 * i, 50), (30 * i % 255, 90, 160))
        conv = [first]
        if i % 2:
            conv += [{"role": "assistant", "content": "an earlier answer"}, {"role": "user", "content": "try again"}]
        out.append(conv)
    return out


@pytest.mark.parametrize("which", ["text", "vlm"])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_generate_and_score_agree(which, top_p, text_policy, vlm_policy):
    policy = text_policy if which == "text" else vlm_policy
    torch.manual_seed(1)
    samples = policy.generate(convs(4, image=which == "vlm"), max_new_tokens=12, temperature=0.7, top_p=top_p)
    assert len(samples) == 4 and all(0 < len(s.response_ids) <= 12 for s in samples)
    batch = policy.collate([s.prompt for s in samples], [s.response_ids for s in samples])
    with torch.no_grad():
        out = policy(batch, temperature=0.7)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        assert (out["logprobs"][i, :n] - s.logprobs).abs().max() < 1e-4
        assert abs(out["values"][i].item() - s.value) < 1e-4
        assert out["response_mask"][i].sum() == n and (out["logprobs"][i, n:] == 0).all()
        assert (s.logprobs <= 0).all() and (out["entropy"][i, :n] > 0).all()


def test_generation_stops_at_end_of_turn_and_decodes(text_policy):
    eot = text_policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make the tiny model always say "hi<|im_end|>": bias its output layer
        bias = torch.full((text_policy.model.config.vocab_size,), -50.0)
        bias[eot] = 50.0
        head = text_policy.model.get_output_embeddings()
        head.bias = torch.nn.Parameter(bias)
    try:
        s = text_policy.generate(convs(2), max_new_tokens=10, greedy=True)
    finally:
        head.bias = None
    assert all(x.finished and x.response_ids.tolist() == [eot] and x.text == "" for x in s)
    s = text_policy.generate(convs(1), max_new_tokens=3)
    assert len(s[0].response_ids) == 3 or s[0].finished


@pytest.mark.parametrize("which", ["text", "vlm"])
def test_batch_padding_invariance(which, text_policy, vlm_policy):
    policy = text_policy if which == "text" else vlm_policy
    cs = convs(4, image=which == "vlm")
    responses = [torch.tensor([11, 12, 13, 14]), torch.tensor([21, 22]), torch.tensor([31, 32, 33]), torch.tensor([41])]
    prompts = [policy.encode(c) for c in cs]
    with torch.no_grad():
        together = policy(policy.collate(prompts, responses))
        alone = policy(policy.collate(prompts[:1], responses[:1]))
    assert (together["logprobs"][0, :4] - alone["logprobs"][0]).abs().max() < 1e-4
    assert abs(together["values"][0] - alone["values"][0]) < 1e-4
    # generation: the shortest prompt alone and left-padded in a batch gives the same greedy tokens
    g_alone = policy.generate(cs[:1], max_new_tokens=6, greedy=True)[0]
    g_batch = policy.generate(cs, max_new_tokens=6, greedy=True)[0]
    assert g_alone.response_ids.tolist() == g_batch.response_ids.tolist()
    assert (g_alone.logprobs - g_batch.logprobs).abs().max() < 1e-4 and abs(g_alone.value - g_batch.value) < 1e-4


def test_collate_worked_example(text_policy):
    p = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)},
         {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}]
    b = text_policy.collate(p, [torch.tensor([1, 2]), torch.tensor([3, 4, 9])])
    pad = text_policy.pad_id
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, pad]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["prompt_lens"].tolist() == [3, 1] and b["response_ids"].tolist() == [[1, 2, pad], [3, 4, 9]]
    assert b["response_mask"].tolist() == [[True, True, False], [True, True, True]]
    left = text_policy.collate(p, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [pad, pad, 8]] and left["attention_mask"][1].tolist() == [0, 0, 1]


def test_gradients_reach_model_and_value_head():
    policy = M.load_policy("tiny-text")
    prompts = [policy.encode(c) for c in convs(2)]
    out = policy(policy.collate(prompts, [torch.tensor([3, 4]), torch.tensor([5])]))
    (-(out["logprobs"].sum()) + out["values"].pow(2).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.value_head.parameters())
    layer = policy.model.model.layers[0].self_attn.q_proj.weight
    assert layer.grad is not None and layer.grad.abs().sum() > 0
    assert policy.model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_save_then_load_gives_identical_scores(tmp_path, vlm_policy):
    with torch.no_grad():
        for p in vlm_policy.value_head.parameters():
            p.add_(0.01)  # a trained value head, not the fresh init
    path = tmp_path / "ckpt"
    vlm_policy.save(str(path), extras={"trainer_state.json": {"step": 3, "gflops": 1.5}, "optimizer.pt": {"x": 1}})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", M.VALUE_HEAD_FILE, "trainer_state.json", "optimizer.pt",
            "generation_config.json"} <= names and any("processor" in n or "tokenizer" in n for n in names)
    loaded = M.load_policy(str(path))
    batch = vlm_policy.collate([vlm_policy.encode(c) for c in convs(2, image=True)],
                               [torch.tensor([3, 4]), torch.tensor([5])])
    with torch.no_grad():
        a, b = vlm_policy(batch), loaded(batch)
    assert torch.equal(a["logprobs"], b["logprobs"]) and torch.equal(a["values"], b["values"])
    from transformers import AutoModelForImageTextToText
    assert AutoModelForImageTextToText.from_pretrained(str(path)) is not None  # a plain HF folder
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 3


def test_interrupted_save_leaves_no_checkpoint(tmp_path, text_policy, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(text_policy.processor, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        text_policy.save(str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    text_policy.save(str(tmp_path / "ckpt"))  # an older checkpoint is replaced whole
    monkeypatch.setattr(text_policy.processor, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        text_policy.save(str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path) == ["ckpt"] and M.load_policy(str(tmp_path / "ckpt")) is not None


@pytest.mark.parametrize("bad,match", [("gpt-17", "neither a known name nor an existing folder"),
                                       ("/nonexistent/folder", "neither a known name"),
                                       ("EMPTY", "has no config.json")])
def test_bad_model_names_are_one_clear_error(bad, match, tmp_path):
    bad = str(tmp_path) if bad == "EMPTY" else bad
    with pytest.raises(ValueError, match=match) as e:
        M.load_policy(bad)
    assert "accepted: smollm2-135m, tiny-text, tiny-vlm" in str(e.value) and "\n" not in str(e.value)


def test_text_model_refuses_images(text_policy):
    with pytest.raises(ValueError, match="text-only"):
        text_policy.encode(convs(1, image=True)[0])


def test_embedded_default_answers_a_chat():
    policy = M.load_policy("smollm2-135m")
    assert policy.model.num_parameters() > 100e6 and not policy.is_vlm
    question = [{"role": "user", "content": "What is 2+2? Answer briefly."}]
    s = policy.generate([question], max_new_tokens=20, greedy=True)[0]
    assert s.finished and "4" in s.text


@pytest.mark.parametrize("name", ["tiny-text", "tiny-vlm"])
def test_fsdp2_two_processes_match_one(name, text_policy, vlm_policy):
    out = torchrun(os.path.join(ROOT, "tests", "fsdp_check.py"), [name])
    assert out.returncode == 0, report(out)
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert result["world"] == 2 and result["extras"]
    for key in ("score", "step", "generate", "save"):
        assert result[key] < 1e-4, (key, result)


# ---- sampling and the prefix cache ----

def test_sampler_draws_from_the_tempered_distribution_and_records_its_log_probs():
    torch.manual_seed(0)
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40000, 4)
    sampler = M.Sampler(temperature=0.5, top_p=1.0, greedy=False)
    onehot = sampler(None, scores)
    drawn = onehot.argmax(-1)
    assert torch.isinf(onehot).sum(-1).eq(3).all()           # Hugging Face sees only the drawn token
    expect = torch.softmax(scores[0] / 0.5, -1)
    freq = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert (freq - expect).abs().max() < 0.01, (freq, expect)
    assert torch.allclose(sampler.logprobs[0], expect.log()[drawn], atol=1e-6)
    # top-p 0.9 keeps the two most likely tokens (0.865 + 0.117 >= 0.9); log-probs stay the full distribution's
    sampler = M.Sampler(temperature=0.5, top_p=0.9, greedy=False)
    drawn = sampler(None, scores).argmax(-1)
    assert set(drawn.tolist()) == {0, 1} and torch.allclose(sampler.logprobs[0], expect.log()[drawn], atol=1e-6)
    greedy = M.Sampler(temperature=0.5, top_p=1.0, greedy=True)
    assert greedy(None, scores[:3]).argmax(-1).tolist() == [0, 0, 0]
    # top-k 2 (Hugging Face's order: top-k, then top-p on what is left): only the two most likely, in proportion
    top2 = M.Sampler(temperature=1.0, top_p=1.0, greedy=False, top_k=2)
    drawn = top2(None, scores).argmax(-1)
    share = float((drawn == 0).float().mean())
    assert set(drawn.tolist()) == {0, 1} and abs(share - 1 / (1 + math.exp(-1))) < 0.01
    assert M.Sampler(1.0, 1.0, False, top_k=1)(None, scores[:50]).argmax(-1).eq(0).all()


def test_value_head_is_the_papers_scaled_to_the_model_and_old_widths_still_load(tmp_path):
    policy = M.load_policy("tiny-text")
    widths = [m.out_features for m in policy.value_head.net if isinstance(m, torch.nn.Linear)]
    assert widths == [64 // 4, 64 // 8, 1]          # the paper's 4096 -> 1024 -> 512 -> 1 at hidden 64
    old = M.Policy(policy.model, policy.processor, False, value_width=512)   # the width before it was scaled
    old.save(str(tmp_path / "old"))
    assert M.load_policy(str(tmp_path / "old")).value_head.net[0].out_features == 512


@pytest.mark.parametrize("name", ["tiny-text", "smollm2-135m"])
def test_a_continued_conversation_encodes_to_the_ids_of_its_whole_encoding(name):
    """Every built-in text model (SmolLM2's chat template) tokenizes only the turns a round adds, and gets the ids a
    full re-encoding gets: after real prompts of both tasks and answers that try the seams (leading newlines, a
    literal end-of-turn marker, unicode, an empty answer)."""
    policy = M.load_policy(name)
    assert policy.continues_exactly
    answers = ['{"cards": ["K", "3"], "formula": "K * 3"}', "\n\n  {\"action\": \"forward()\"}", "", "trailing \n",
               "ünïcödé 🙂 <|im_end|> literal <|im_start|>user", " 8/(3-8/3)"]
    for task in ("gp-l", "virl-l"):
        env = make_envs(task, "id", 1, seed=0)[0]
        conversation = [{"role": "user", "content": env.reset().text}]
        prompt = policy.encode(conversation)
        done = False
        for answer in answers:
            feedback = "You failed. Try again." if done else env.step(answer)[0].text
            done = done or env.done
            conversation += [{"role": "assistant", "content": answer}, {"role": "user", "content": feedback}]
            continued = policy.encode(conversation, previous=prompt)
            whole = policy.tokenizer.apply_chat_template([{"role": t["role"], "content": t["content"]}
                                                          for t in conversation], add_generation_prompt=True)
            assert continued["input_ids"][0].tolist() == list(whole["input_ids"]), answer
            prompt = continued


def test_a_template_that_renders_turns_by_their_place_is_encoded_whole():
    policy = M.load_policy("tiny-text")  # its own tokenizer: the template is changed
    policy.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ loop.index }} {{ m['role'] }}\n"
                                      "{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    assert not policy.continues_exactly
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    continued = policy.encode(conversation, previous=policy.encode(conversation[:1]))
    assert torch.equal(continued["input_ids"], policy.encode(conversation)["input_ids"])


def seam_texts(seed: int, n: int) -> list:
    """Texts that try line_pieces' cuts: lines of letters, digits, punctuation, unicode and special-token text,
    joined by newlines with and without whitespace (spaces, tabs, no-break and em spaces, carriage returns) around."""
    import random
    rng = random.Random(seed)
    words = ["Cards", "[\"J\",", "10", "'s", "'re", "ünï", "🙂", ".", ",x", "{\"a\": 1}", "<|im_end|>",
             "<|im_start|>", "user", "", "24", "Ġ", "\u0085", "x\u200b", "日本"]
    spaces = ["", " ", "  ", "\t", "\u00a0", "\u2003", "\r", "\n"]
    return ["".join(rng.choice(spaces) + rng.choice(words) + rng.choice(spaces) + rng.choice(["\n", "\n\n", " "])
                    for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.parametrize("name", ["tiny-text", "smollm2-135m"])
def test_texts_tokenized_in_cached_pieces_get_the_ids_of_whole_tokenization(name):
    """SmolLM2's tokenizer splits at lines (`splits_at_lines`): its prompts' instruction lines are tokenized once
    and kept, and every text, pieces joined, has the ids it has tokenized whole: the tasks' first prompts and
    continued turns, and 400 texts that try the cuts (whitespace beside newlines, unicode spaces, special tokens)."""
    policy = M.load_policy(name)
    assert policy.splits_at_lines
    texts = seam_texts(0, 400)
    for task in ("gp-l", "virl-l"):
        env = make_envs(task, "id", 1, seed=0)[0]
        texts += [policy._render([{"role": "user", "content": env.reset().text}]) for _ in range(5)]
    policy.__dict__.pop("known_ids_", None)
    first = policy._tokenize(texts)
    again = policy._tokenize(texts[::-1])[::-1]  # the lines that end known now
    assert len(policy.known_ids_) > 100
    whole = policy._tokenize_whole(texts)
    for text, a, b, w in zip(texts, first, again, whole):
        assert a.tolist() == b.tolist() == list(w), repr(text)
    assert len(M.line_pieces(texts[-1])) > 10  # V-IRL's prompt: many lines, each kept apart
    assert M.line_pieces("a\nb\n\nc d\n e \nf") == ["a\n", "b\n\nc d\n e \nf"]


def test_a_tokenizer_that_may_join_lines_tokenizes_texts_whole():
    """A tokenizer whose pre-tokenizer adds a space in front of every text would give a cut-off piece a token the
    whole text lacks: it is not cut, and its ids stay those of whole tokenization."""
    from tokenizers import pre_tokenizers
    policy = M.load_policy("tiny-text")  # its own tokenizer: the pre-tokenizer is changed
    policy.tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not policy.splits_at_lines
    texts = seam_texts(1, 50)
    whole = policy._tokenize_whole(texts)
    assert [x.tolist() for x in policy._tokenize(texts)] == [list(w) for w in whole]
    text = "An A counts as 1.\nYour cards: [\"J\"]."
    cut = [i for piece in M.line_pieces(text) for i in policy._tokenize_whole([piece])[0]]
    assert cut != list(policy._tokenize_whole([text])[0])  # cut, the ids would differ: the check keeps them right


def test_a_first_prompt_is_the_template_around_its_content_and_decoding_is_hugging_faces(text_policy):
    """A conversation's first prompt is the chat template's text around the user's content, rendered once: the
    same text as the template renders, for both tasks and contents with whitespace at their ends; a template that
    trims contents is rendered each time. Answers decode as Hugging Face's batch_decode does."""
    assert text_policy.first_turn_text is not None
    contents = [make_envs(task, "id", 1, seed=0)[0].reset().text for task in ("gp-l", "virl-l")]
    for content in contents + ["\n  padded both ends \n", "", "<|im_end|> literal"]:
        turn = [{"role": "user", "content": content}]
        assert text_policy._render(turn) == text_policy.tokenizer.apply_chat_template(
            turn, add_generation_prompt=True, tokenize=False)
    policy = M.load_policy("tiny-text")
    policy.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
                                      "<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    assert policy.first_turn_text is None
    tabs = M.load_policy("tiny-text")
    tabs.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                    "{{ m['content'] | replace('\\t', '    ') }}<|im_end|>\n{% endfor %}")
    assert tabs.first_turn_text is None
    assert policy._render([{"role": "user", "content": " a "}]).startswith("<|im_start|>user\na<|im_end|>")
    rows = [[int(i) for i in torch.randint(0, len(text_policy.tokenizer), (n,))] for n in (0, 1, 16, 40)]
    rows.append([text_policy.end_of_turn_id] + text_policy.tokenizer.encode(" x\n y", add_special_tokens=False))
    assert text_policy._decode_all(rows) == text_policy.tokenizer.batch_decode(rows, skip_special_tokens=True)


def test_prefix_cache_matches_evicts_and_drops_what_a_longer_sequence_contains():
    def states(*seqs):  # each token's key and value: its own id, so that a slot's content says whose it is
        ids = torch.cat([torch.as_tensor(s, dtype=torch.float32) for s in seqs])
        return [(ids[:, None, None].expand(-1, 2, 4), -ids[:, None, None].expand(-1, 2, 4))]   # (N, H, D)

    def held(cache):
        return [ids.tolist() for ids, _, _ in cache.entries.values()]
    cache = M.PrefixCache(max_tokens=12, block=2)
    runs = [np.arange(n) for n in (0, 5, 17, 40)]              # hashed together as each alone; a prefix alike
    together = cache.prefix_hashes(runs)
    assert together == [cache.prefix_hashes([r])[0] for r in runs] and [len(h) for h in together] == [0, 2, 8, 20]
    assert together[1] == together[2][:2] and together[2][2] != cache.prefix_hashes([np.arange(1, 7)])[0][2]
    a = [1, 2, 3, 4, 5]
    cache.store([], [a], states(a))
    key = next(iter(cache.entries))
    assert cache.match([1, 2, 3, 9]) == (key, 3)             # two whole blocks found, the third token counted
    assert cache.match(a) == (key, 4)                        # the last prompt token is always computed
    assert cache.match([7, 1, 2]) == (None, 0)
    longer = [1, 2, 3, 4, 5, 6, 7]                           # a's conversation goes on: a is dropped, its
    cache.store([(key, 5)], [longer], states([6, 7]))        # slots now longer's, only 6 and 7 stored
    assert held(cache) == [longer] and cache.tokens == 7
    other = [1, 2, 8, 8]                                     # shares 2 tokens with `longer`: both kept, the
    cache.store([cache.match(other + [0])], [other], states([8, 8]))   # two held once
    assert held(cache) == [longer, other] and cache.tokens == 9
    cache.store([], [[5, 5, 5]], states([5, 5, 5]))          # 12 tokens: all fit
    assert held(cache) == [longer, other, [5, 5, 5]] and cache.tokens == 12
    cache.store([], [[6, 6]], states([6, 6]))                # 14 would not: the oldest goes, its 5 own slots
    assert held(cache) == [other, [5, 5, 5], [6, 6]] and cache.tokens == 9   # freed, the 2 it shares kept
    assert cache.match(longer) == (next(iter(cache.entries)), 2)
    # what `gather` serves is what was stored: row 0 the first 3 of `other`, right-aligned; row 1 nothing
    (keys, values), = cache.gather([(cache.match([1, 2, 8, 8, 0])[0], 3), (None, 0)], 4, rows=3)
    assert keys.shape == (3, 2, 4, 4) and keys[0, 0, :, 0].tolist() == [0, 1, 2, 8]
    assert keys[1:].abs().sum() == 0 and torch.equal(values, -keys)
    cache.store([], [list(range(20))], states(range(20)))    # longer than the cache: not kept, nothing else lost
    assert held(cache) == [other, [5, 5, 5], [6, 6]] and cache.tokens == 9


def test_prefix_cache_work_per_round_does_not_grow_with_the_batch(text_policy):
    """Serving and remembering a round is a fixed number of tensor operations per layer: batch 24 issues no more
    than batch 3 (a loop over rows would issue eight times as many)."""
    from bench import OpCounter

    def ops_of_a_round(batch):
        cache = M.PrefixCache()
        first = convs(batch)
        answers = text_policy.generate(first, max_new_tokens=6, greedy=True, cache=cache)
        prompts = [text_policy.encode(c + [{"role": "assistant", "content": s.text},
                                           {"role": "user", "content": "You failed this trial."}])
                   for c, s in zip(first, answers)]
        with torch.no_grad():
            matches = M.match_prefixes(text_policy, prompts, cache)
            assert all(m > 0 for _, m in matches)                # every prompt continues a cached one
            with OpCounter() as gather:
                batch = M.generation_inputs(text_policy, prompts, cache, matches, 6)
            samples = text_policy.generate(None, prompts=prompts, max_new_tokens=6, greedy=True)
            for layer in batch["cache"].layers:  # as if decoded: the prompt and 6 tokens written
                layer.cumulative_length.fill_(batch["input_ids"].shape[1] + 6)
            with OpCounter() as remember:
                M.remember(cache, samples, matches, batch["attention_mask"], batch["cache"])
        return {"gather": gather.ops, "remember": remember.ops}
    small, large = ops_of_a_round(3), ops_of_a_round(24)
    assert large["gather"] <= small["gather"] + 4 and large["remember"] <= small["remember"] + 4, (small, large)


def test_generate_with_prefix_cache_matches_generate_without(text_policy):
    first = convs(3)
    cache = M.PrefixCache()
    a1 = text_policy.generate(first, max_new_tokens=10, greedy=True, cache=cache)
    assert len(cache.entries) == 3 and cache.reused > 0      # the first round shares the common prefix
    second = [c + [{"role": "assistant", "content": s.text}, {"role": "user", "content": "You failed this trial."}]
              for c, s in zip(first, a1)] + [[{"role": "user", "content": "solve this please"}]]
    before = cache.reused
    with_cache = text_policy.generate(second, max_new_tokens=10, greedy=True, cache=cache)
    without = text_policy.generate(second, max_new_tokens=10, greedy=True)
    first_lens = sum(s.prompt["input_ids"].shape[1] for s in a1)
    assert cache.reused - before >= first_lens                # every continued prompt starts from its cached past
    for x, y in zip(with_cache, without):
        assert x.response_ids.tolist() == y.response_ids.tolist()
        assert (x.logprobs - y.logprobs).abs().max() < 1e-4 and abs(x.value - y.value) < 1e-4
    torch.manual_seed(3)
    sampled = text_policy.generate(second, max_new_tokens=10, temperature=0.7, cache=cache)
    batch = text_policy.collate([s.prompt for s in sampled], [s.response_ids for s in sampled])
    with torch.no_grad():
        out = text_policy(batch, temperature=0.7)
    for i, s in enumerate(sampled):
        assert (out["logprobs"][i, :len(s.response_ids)] - s.logprobs).abs().max() < 1e-4
        assert abs(out["values"][i].item() - s.value) < 1e-4
