"""Build "smolvlm-local": a vision-language policy made offline, with no download. A LLaVA model (transformers'
LlavaForConditionalGeneration, so it saves and loads as a plain Hugging Face folder) of SmolLM2-135M-Instruct (the
embedded default) as its language model, a small CLIP-style vision tower (224-pixel images in 56-pixel patches: a
4 x 4 grid of image tokens) and a two-layer projector, taught to see on images this project renders:

  1. tower and projector learn to see, the language model untouched: linear heads on the tower's patch features
     read each card's rank and suit (GP-VL's renderer, random hands) and, in a street-view grid (V-IRL-VL's
     renderer, random positions of random routes), whether the place is an intersection and which of the four
     views shows a sign; and the projector writes each card's rank as the language model's own word embedding,
     on the token over that card (see Heads);
  2. projector and language model learn to say what the frozen tower sees: captioning, "A, 7, K, 3" for cards,
     "Intersection: yes. Signs: front Maple Cafe; right none; ..." for streets, the loss on the caption's tokens
     only (train_sft.py's loss, through the project's Policy).

Why the language model trains in stage 2 (as in LLaVA's second stage; `--language-lr 0` keeps it frozen): even
given the exact word embeddings of a hand, frozen SmolLM2-135M lists it back right for a third of the cards. Why
the tower is frozen there: trained through the captioning loss at the projector's rate it forgot what stage 1
taught it (cards read at chance after 200 steps; 92% with it frozen, 150 steps).

Like a foundation model's pretraining it sees every suit and every city, those that post-training holds out as
OOD visuals included (`--all-visuals`, the default): the paper's OOD-visual test then asks what post-training does
to a recognition ability the model already had. `--no-all-visuals` pretrains on the ID visuals only (black suits,
the ID city). Recognition on held-out rendered images, ID and OOD visuals, is printed at the end.

    python vision_pretrain.py                       # builds and caches "smolvlm-local" (see docs/policy.md)
    python vision_pretrain.py --out /tmp/vlm --align-steps 50
Loading "smolvlm-local" never builds it: until this command has run, load_policy says to run it (`make demo-vl` and
replicate.py run it for you). A model already built is kept (--overwrite builds it again); a folder that holds
anything else is refused.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
import model_zoo as Z
import runs as R
from runs import check_writable, main, require
from env_points import RANKS, SUIT_SETS, render_cards
from env_virl import CITIES, ID_CITY, NavigationEnv, VirlConfig
from streetview import VIEW_OFFSETS, render_grid, signs_in_view

IMAGE, PATCH = 224, 56  # a 4 x 4 grid of image tokens: GP-VL's four cards fall one per column
GRID = IMAGE // PATCH
ID_SUITS = SUIT_SETS["black"]
ALL_SUITS = SUIT_SETS["mixed"]
IMAGE_TOKEN = "<image>"
CARD_QUESTION = "What are the four cards, from left to right?"
STREET_QUESTION = "Describe this place: is it an intersection, and what sign does each view show?"


@dataclass
class VisionConfig:
    """Build the offline vision-language model smolvlm-local."""
    language_model: str = "smollm2-135m"
    """the language model: smollm2-135m (the embedded default), or tiny-text for tests"""
    out: str = ""
    """folder to write; empty: the model cache's smolvlm-local"""
    overwrite: bool = False
    """build again over a model already in --out (without it the built model is kept and nothing runs)"""
    hidden: int = 192
    """width of the vision tower"""
    layers: int = 6
    """transformer layers of the vision tower"""
    heads: int = 3
    """attention heads of the vision tower"""
    tower_steps: int = 400
    """stage 1: steps of the tower with its rank, suit, intersection and sign heads"""
    tower_batch: int = 32
    """stage 1: images per step (half cards, half streets)"""
    tower_lr: float = 1e-3
    """stage 1: AdamW learning rate of tower, projector and heads"""
    align_steps: int = 200
    """stage 2: captioning steps, the tower frozen"""
    align_batch: int = 8
    """stage 2: images per step"""
    align_lr: float = 2e-4
    """stage 2: AdamW learning rate of the projector"""
    language_lr: float = 5e-5
    """stage 2: AdamW learning rate of the language model; 0: frozen"""
    all_visuals: bool = True
    """pretrain on every suit and city (the OOD visuals too), as a foundation model would have seen them"""
    eval_images: int = 64
    """held-out images per kind and visual setting for the recognition figures"""
    seed: int = 0
    """seed of the weights and the rendered data"""

    def __post_init__(self):
        require(self, "hidden layers heads tower_steps tower_batch align_batch eval_images", lambda v: v >= 1,
                "a positive integer")
        require(self, "align_steps", lambda v: v >= 0, "0 or a positive integer")
        require(self, "tower_lr align_lr", lambda v: v > 0, "a positive number")
        require(self, "language_lr", lambda v: v >= 0, "0 or a positive number")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")
        self.out = self.out or Z.smolvlm_local_path()
        check_writable(os.path.dirname(os.path.abspath(self.out)))
        check_writable(self.out)  # a folder, existing or to make
        if os.path.isdir(self.out) and os.listdir(self.out) and not os.path.exists(
                os.path.join(self.out, "pretraining.json")):
            raise ValueError(f"out={self.out!r} holds files that are not a model this script built: expected an "
                             "empty or new folder (nothing there is deleted)")


# ---- rendered data ----

def card_sample(rng: random.Random, suits: tuple) -> tuple:
    """(image, caption, labels): four random cards on GP-VL's table; labels: ranks and suits as class indices."""
    cards = [(rng.choice(RANKS), rng.choice(suits)) for _ in range(4)]
    caption = ", ".join(rank for rank, _ in cards)
    labels = {"ranks": [RANKS.index(r) for r, _ in cards], "suits": [ALL_SUITS.index(s) for _, s in cards]}
    return render_cards(cards), caption, labels


class Streets:
    """Random positions of random routes in the given cities, as V-IRL-VL shows them (a 2x2 grid of views)."""

    def __init__(self, cities: tuple, seed: int):
        self.rng = random.Random(seed)
        # text-only environments walk the routes; only the chosen position is rendered
        self.envs = [NavigationEnv(VirlConfig(routes=f"synthetic:{city}", n_routes=200), seed=seed) for city in cities]

    def sample(self) -> tuple:
        """(image, caption, labels): labels: intersection (0/1) and, per view, whether it shows a sign."""
        env = self.rng.choice(self.envs)
        env.reset(seed=self.rng.randrange(1 << 30))
        for _ in range(self.rng.randrange(len(env.rail))):  # walk the expert to a random position of the route
            _, _, done, _ = env.step(env.expert_response())
            if done:
                env.reset(seed=self.rng.randrange(1 << 30))
        pos = env.position
        signs = [signs_in_view(pos.landmarks, pos.heading + offset) for offset in VIEW_OFFSETS]
        named = [f"{side} {', '.join(name for name, _ in s) if s else 'none'}"
                 for side, s in zip(("front", "right", "back", "left"), signs)]
        caption = f"Intersection: {'yes' if pos.at_intersection else 'no'}. Signs: {'; '.join(named)}."
        labels = {"intersection": int(pos.at_intersection), "signs": [int(bool(s)) for s in signs]}
        return render_grid(env.views(pos), env.config.view_size), caption, labels


# ---- the model ----

def build(cfg: VisionConfig):
    """A LLaVA of the language model, a fresh vision tower and projector, and its processor."""
    from transformers import (AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaImageProcessorPil, LlavaProcessor)
    folder = Z.resolve(cfg.language_model)
    tok = Z.smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor, tok, patch_size=PATCH, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,
                               chat_template=Z.VLM_CHAT_TEMPLATE.replace("<|image|>", IMAGE_TOKEN))
    language = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = language.config.to_dict()
    text["vocab_size"] = len(tok)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden,
                           num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, image_size=IMAGE,
                           patch_size=PATCH, projection_dim=cfg.hidden),
        text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=GRID ** 2, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    language.resize_token_embeddings(len(tok), mean_resizing=False)  # the image token: its positions hold images
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.load_state_dict(language.lm_head.state_dict())
    model.generation_config = language.generation_config
    for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]:
        p.requires_grad_(False)
    return model, processor


def pixel_values(processor, images: list) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]          # (B, 3, IMAGE, IMAGE)


# ---- stage 1: tower and projector learn to see ----

class Heads(torch.nn.Module):
    """What stage 1 asks of the vision side. Linear readouts of the tower's patch features (flattened, so each
    keeps where it looked): each card's rank and suit; a street view's intersection and the views with a sign.
    And the projector's output for cards, read as words: the token over each card's upper half (grid row 1, one
    column per card) should be the language model's input embedding of the card's rank, every other token that
    of a space, so that the language model (frozen in stage 1) finds the hand where it can read it, as it would
    read "10 Q K 8" in its prompt (it copies such a list; captioning alone did not find this in hundreds of steps)."""

    def __init__(self, hidden: int, embeddings: torch.Tensor, tokenizer):
        super().__init__()
        self.cards = torch.nn.Linear(hidden * GRID ** 2, 4 * (len(RANKS) + len(ALL_SUITS)))
        self.streets = torch.nn.Linear(hidden * GRID ** 2, 1 + 4)
        self.embeddings = embeddings.detach()                                                   # (V, D), frozen
        first_token = [tokenizer.encode(r, add_special_tokens=False)[0] for r in RANKS]        # "10": its "1"
        self.register_buffer("rank_tokens", torch.tensor(first_token), persistent=False)       # (13,)
        self.space = tokenizer.encode(" ", add_special_tokens=False)[0]

    def card_loss(self, features, projected, labels):
        logits = self.cards(features.flatten(1)).view(-1, 4, len(RANKS) + len(ALL_SUITS))     # (B, 4, 17)
        ranks, suits = logits[..., :len(RANKS)], logits[..., len(RANKS):]
        target = self.embeddings[torch.full(projected.shape[:2], self.space)].clone()           # (B, 16, D)
        target[:, GRID:2 * GRID] = self.embeddings[self.rank_tokens[labels["ranks"]]]           # row 1: the ranks
        words = (projected - target).pow(2).sum(-1).mean() / self.embeddings.pow(2).sum(-1).mean()
        return (F.cross_entropy(ranks.flatten(0, 1), labels["ranks"].flatten())
                + F.cross_entropy(suits.flatten(0, 1), labels["suits"].flatten()) + words)

    def street_loss(self, features, projected, labels):
        logits = self.streets(features.flatten(1))                                              # (B, 5)
        target = torch.cat([labels["intersection"][:, None], labels["signs"]], 1).float()       # (B, 5)
        return F.binary_cross_entropy_with_logits(logits, target)


def train_tower(model, processor, cfg: VisionConfig, cards: callable, streets: Streets) -> list:
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    heads = Heads(cfg.hidden, model.get_input_embeddings().weight, processor.tokenizer)
    opt = torch.optim.AdamW([*tower.parameters(), *projector.parameters(), *heads.parameters()], lr=cfg.tower_lr)
    losses = []
    bar = tqdm(range(cfg.tower_steps), desc="vision tower")
    for step in bar:
        half = max(1, cfg.tower_batch // 2)
        loss = 0.0
        for sampler, head_loss in ((cards, heads.card_loss), (streets.sample, heads.street_loss)):
            images, _, labels = zip(*[sampler() for _ in range(half)])
            features = tower(pixel_values(processor, list(images))).last_hidden_state[:, 1:]  # (B, 16, H)
            batch = {k: torch.tensor([lab[k] for lab in labels]) for k in labels[0]}
            loss = loss + head_loss(features, projector(features), batch)                     # projected (B, 16, D)
        optimizer_step(opt, loss, [cfg.tower_lr], step, cfg.tower_steps, losses, bar)
    return losses


def optimizer_step(opt, loss, peaks: list, step: int, total: int, losses: list, bar) -> None:
    """Each group's rate on the schedule (a tenth of the steps, at most 20, of warmup, then a cosine to 0), one
    step on `loss`, its value logged and shown on the progress bar."""
    for g, peak in zip(opt.param_groups, peaks):
        g["lr"] = R.cosine_lr(step, peak, total, warmup=min(20, max(1, total // 10)))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")


# ---- stage 2: projector and language model learn to say what the tower sees ----

def conversation(question: str, image) -> list:
    return [{"role": "user", "content": question, "image": image}]


def align(policy, cfg: VisionConfig, cards: callable, streets: Streets) -> list:
    from train_sft import sft_loss
    model = policy.model
    language = {id(p): p for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    for p in language.values():  # lm_head and the input embeddings are one tensor in SmolLM2: listed once
        p.requires_grad_(cfg.language_lr > 0)
    groups = [(list(model.model.multi_modal_projector.parameters()), cfg.align_lr)]
    groups += [(list(language.values()), cfg.language_lr)] if cfg.language_lr > 0 else []
    opt = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr in groups])
    losses = []
    policy.train()
    bar = tqdm(range(cfg.align_steps), desc="alignment")
    for step in bar:
        examples = [(CARD_QUESTION, *cards()[:2]) if k % 2 == 0 else (STREET_QUESTION, *streets.sample()[:2])
                    for k in range(cfg.align_batch)]
        prompts = [policy.encode(conversation(q, image)) for q, image, _ in examples]
        responses = [policy.response_ids(caption) for _, _, caption in examples]
        batch = policy.collate(prompts, responses)
        loss, _ = sft_loss(policy, batch, sum(len(r) for r in responses))
        optimizer_step(opt, loss, [peak for _, peak in groups], step, cfg.align_steps, losses, bar)
    return losses


# ---- recognition on held-out images ----

def recognition(policy, cfg: VisionConfig, seed: int) -> dict:
    """Greedy captions of held-out rendered images: the share of cards whose rank is read right in its place
    (chance 1/13), of hands whose four ranks are read right in any order (GP-VL's recognition check; chance:
    hand_chance), and of places whose intersection is read right (V-IRL-VL's observation check; the share of
    intersections among them is given too: answering the majority scores the larger of it and its complement), for
    ID and OOD visuals."""
    rng, out = random.Random(seed), {}
    cities = {"id": (ID_CITY,), "ood_visual": tuple(c for c in CITIES if c != ID_CITY)}
    for setting, suits in (("id", ID_SUITS), ("ood_visual", SUIT_SETS["red"])):
        samples = [card_sample(rng, suits) for _ in range(cfg.eval_images)]
        answers = caption_all(policy, CARD_QUESTION, [image for image, _, _ in samples])
        right = sum(r == t for (_, truth, _), a in zip(samples, answers)
                    for r, t in zip(read_ranks(a), truth.split(", ")))
        out[f"cards_{setting}"] = right / (4 * len(samples))
        out[f"hands_{setting}"] = sum(sorted(read_ranks(a)) == sorted(truth.split(", "))
                                      for (_, truth, _), a in zip(samples, answers)) / len(samples)
        streets = Streets(cities[setting], seed=seed + 1)
        samples = [streets.sample() for _ in range(cfg.eval_images)]
        answers = caption_all(policy, STREET_QUESTION, [image for image, _, _ in samples])
        said = [re.search(r"Intersection:\s*(yes|no)", a) for a in answers]
        out[f"intersection_{setting}"] = sum(bool(m) and (m.group(1) == "yes") == bool(lab["intersection"])
                                             for m, (_, _, lab) in zip(said, samples)) / len(samples)
        out[f"intersection_share_{setting}"] = sum(lab["intersection"] for _, _, lab in samples) / len(samples)
    out["chance_cards"], out["chance_hands"] = 1 / len(RANKS), hand_chance()
    return out


def hand_chance() -> float:
    """The chance that four uniformly random ranks are a random hand's ranks in some order (0.06%)."""
    counts = collections.Counter(tuple(sorted(h)) for h in itertools.product(range(len(RANKS)), repeat=4))
    return sum(c * c for c in counts.values()) / len(RANKS) ** 8


def read_ranks(answer: str) -> list:
    """The ranks an answer names, in order ("A, 7 and K" -> ["A", "7", "K"]): whole words only."""
    return re.findall(r"\b(10|[2-9]|[AJQK])\b", answer.upper())


def caption_all(policy, question: str, images: list, batch: int = 16) -> list:
    texts = []
    for i in range(0, len(images), batch):
        texts += [s.text for s in policy.generate([conversation(question, im) for im in images[i:i + batch]],
                                                  max_new_tokens=48, greedy=True)]
    return texts


# ---- main ----

def pretrain(cfg: VisionConfig) -> dict:
    report_path = os.path.join(cfg.out, "pretraining.json")
    if os.path.exists(report_path) and not cfg.overwrite:  # built already: keep it
        print(f"{cfg.out} is built already (--overwrite builds it again)")
        with open(report_path) as f:
            return json.load(f)
    start = time.perf_counter()
    rng = random.Random(cfg.seed)
    suits = ALL_SUITS if cfg.all_visuals else ID_SUITS
    cards = lambda: card_sample(rng, suits)  # noqa: E731
    streets = Streets(tuple(CITIES) if cfg.all_visuals else (ID_CITY,), seed=cfg.seed)
    model, processor = build(cfg)
    tower_losses = train_tower(model, processor, cfg, cards, streets)
    # bf16 compute over the fp32 weights: twice as fast on a CPU with AVX512-BF16, and what the GPU does
    policy = M.Policy(model, processor, is_vlm=True, compute_dtype=torch.bfloat16)
    align_losses = align(policy, cfg, cards, streets)
    policy.eval()
    scores = recognition(policy, cfg, seed=cfg.seed + 10_000)
    minutes = (time.perf_counter() - start) / 60
    report = {"config": asdict(cfg), "minutes": round(minutes, 1), "tower_loss": [tower_losses[0], tower_losses[-1]],
              "align_loss": [align_losses[0], align_losses[-1]] if align_losses else None, "recognition": scores}
    with R.atomic_folder(cfg.out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "pretraining.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report["recognition"]))
    print(f"wrote {cfg.out} in {minutes:.1f} min")
    return report


if __name__ == "__main__":
    main(VisionConfig, pretrain)
