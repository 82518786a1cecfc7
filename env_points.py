"""GeneralPoints: the arithmetic card game of Chu et al. (2025), for text (GP-L) and images (GP-VL).

Four cards are dealt; the player answers with one JSON object
    {"cards": ["A", "7", "K", "3"], "number": [1, 7, 10, 3], "formula": "1+10*3-7"}
whose formula uses every card's number exactly once and evaluates to the target (24). J, Q, K count as 10 (ID
rule) or 11, 12, 13 (OOD rule, where every hand holds a face card); GP-VL shows the cards in an image, in black
suits (ID visuals) or red ones (OOD visuals), and also checks the "cards" field. Reward per attempt, the first
outcome that applies:
    wrong_cards      -1.5  (GP-VL only) the "cards" field is not the dealt ranks as a multiset
    illegal_formula  -3    formula missing, unparseable, illegal token, division by zero
    wrong_numbers    -2    the formula's numbers are not exactly the cards' numbers
    wrong_value      -1    legal formula with the right numbers but another value
    correct          +5
After a failed attempt the verifier's message continues the conversation (sequential revision) until the answer is
correct or `verify_iter` attempts are spent. Arithmetic is exact; protocol "official" plays by the official rules.

The environment contract, which env_virl.py follows too, so that trainers and evaluator hold no fact of either:
    reset(seed=None, episode=None) -> Observation   a new hand, from the seed alone (`episode` is ignored)
    step(answer) -> (Observation, reward, done, info)
    expert_response(reasoning=False) -> str        a correct answer (reasoning: opened by a THOUGHT_FIELD field)
    ACTION_FIELD = "formula"                       the answer's last field, the action
    wrong_answer(expert, rng) -> str               a plausible mistake, for sequential-revision SFT data
    PROMPT_TEMPLATES                               wordings of the prompt (`PointsConfig.prompt_template`)
The file copies out alone (the standard library and Pillow; official.py only under protocol "official").
More: docs/environments.md, docs/fidelity.md.

    python env_points.py                       # sample GP-L prompt, sample GP-VL image, expert play
    python env_points.py --ood-rule --suits red --episodes 5000
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
FACE_CARDS = ("J", "Q", "K")          # ordered: the OOD deal draws from it with a seeded rng
FACE_RANKS = frozenset(FACE_CARDS)
SUIT_SETS = {"black": ("spades", "clubs"), "red": ("hearts", "diamonds"),
             "mixed": ("spades", "hearts", "clubs", "diamonds")}
REWARDS = {"correct": 5.0, "wrong_value": -1.0, "wrong_cards": -1.5, "wrong_numbers": -2.0, "illegal_formula": -3.0}
MAX_FORMULA_CHARS = 512  # no honest answer needs more; keeps exact values a few hundred digits long, quick to print
MAX_NESTING = 64         # parenthesis depth; keeps the recursive parser far from Python's stack limit
MAX_IMAGE_SIZE = 4096    # pixels a side: far above the official 1200, far below a size that exhausts memory
PROMPT_TEMPLATES = 10    # wordings of the task prompt, `PointsConfig.prompt_template` 0 to 9 (0: the original one)
THOUGHT_FIELD = "thought"  # the reasoning an answer may open with (expert_response(reasoning=True)); never verified
PROTOCOLS = ("project", "official")  # the rules above, or what the official code did, accidents included


@dataclass
class PointsConfig:
    target: int = 24                        # the value every formula must reach
    face_cards_as_10: bool = True           # True: J, Q, K = 10 (ID rule); False: 11, 12, 13 (OOD rule)
    suits: str = "black"                    # "black" (ID visuals), "red" (OOD visuals) or "mixed"
    vision: bool = False                    # GP-VL: cards in an image, "cards" field verified
    verify_iter: int = 5                    # attempts per episode (sequential revision)
    face_card_required: Optional[bool] = None  # OOD deal (see deal_hand()); None: exactly under the OOD rule
    image_size: int = 448                   # GP-VL image side in pixels (the official code: 1200)
    prompt_template: int = 0                # wording of the task prompt, 0 to PROMPT_TEMPLATES - 1 (0: the original)
    protocol: str = "project"               # "project" or "official" (PROTOCOLS): whose rules score and prompt

    def __post_init__(self):
        check_protocol(self.protocol, "PointsConfig.protocol")
        if self.suits not in SUIT_SETS:
            raise ValueError(f"PointsConfig.suits={self.suits!r}: expected one of {sorted(SUIT_SETS)}")
        if self.verify_iter < 1:
            raise ValueError(f"PointsConfig.verify_iter={self.verify_iter}: expected an integer >= 1")
        if not 64 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"PointsConfig.image_size={self.image_size}: expected 64 to {MAX_IMAGE_SIZE} pixels")
        if type(self.prompt_template) is not int or not 0 <= self.prompt_template < PROMPT_TEMPLATES:
            raise ValueError(f"PointsConfig.prompt_template={self.prompt_template!r}: expected an integer from 0 to "
                             f"{PROMPT_TEMPLATES - 1}")
        prompt_template(self.prompt_template)  # 1 to 9: prompt_variants.py is here, or one line says so
        if self.face_card_required is None:
            self.face_card_required = not self.face_cards_as_10
        if self.protocol == "official" and self.prompt_template:
            raise ValueError(f"PointsConfig.prompt_template={self.prompt_template}: protocol 'official' prompts with "
                             "the official prompt only; expected 0")


def check_protocol(protocol, what: str = "protocol") -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"{what}={protocol!r}: expected one of {', '.join(PROTOCOLS)}")


def official_rules():
    """official.py, imported only under protocol "official": without it this file copies out alone."""
    import official
    return official


def card_value(rank: str, face_cards_as_10: bool = True) -> int:
    """Number a rank counts for: A=1, 2..10 as printed, J/Q/K = 10 or 11/12/13 by rule."""
    if rank in FACE_RANKS:
        return 10 if face_cards_as_10 else 11 + "JQK".index(rank)
    return 1 if rank == "A" else int(rank)


# ---- deal ----

def deal_hand(rng: random.Random, config: PointsConfig) -> list:
    """Four (rank, suit) cards as the official code deals them: rank and suit drawn independently (a card may come
    twice), the hand redrawn until solvable. ID: four ranks uniform over A..K. OOD (`face_card_required`): three
    such and one over J, Q, K, shuffled (rejecting face-less uniform hands would give 68% one-face hands, not 50%)."""
    for _ in range(100_000):
        if config.face_card_required:
            ranks = rng.choices(RANKS, k=3) + [rng.choice(FACE_CARDS)]
            rng.shuffle(ranks)  # else the face card would always be the last one shown
        else:
            ranks = rng.choices(RANKS, k=4)
        if _dealable(tuple(sorted(ranks)), config.face_cards_as_10, config.target):
            return list(zip(ranks, rng.choices(SUIT_SETS[config.suits], k=4)))
    top = max(card_value(r, config.face_cards_as_10) for r in RANKS) ** 4
    raise ValueError(f"target={config.target}: no solvable hand in 100000 deals; expected a target that four "
                     f"cards reach under this rule, such as 24 (all lie between -{top} and {top})")


@functools.lru_cache(maxsize=None)  # per sorted hand: card values and the solver's cache lookup cost more
def _dealable(ranks: tuple, face_cards_as_10: bool, target: int) -> bool:
    return is_solvable([card_value(r, face_cards_as_10) for r in ranks], target)


# ---- solve ----
# Expressions are built bottom-up over sub-multisets in a canonical form, children sorted by their rendered strings,
# so that formulas differing only by commutativity or associativity come once: sums ("+", positive terms, negative
# terms) write a-(b-c) as a+c-b, products ("*", numerators, denominators) a/(b/c) as a*c/b, numbers are ("n", digits).
# A brute force finds the same formulas (the tests check it) but solves all 1820 hands in 13.5 s instead of 1.2 s.
_parts = lambda node, kind: (node[1], node[2]) if node[0] == kind else ((node,), ())  # a node as (pos, neg) `kind`
_node = lambda kind, pos, neg: (kind, tuple(sorted(pos, key=_render)), tuple(sorted(neg, key=_render)))
_APPLY = {"+": lambda a, b: a + b, "x-y": lambda a, b: a - b, "y-x": lambda a, b: b - a,
          "*": lambda a, b: a * b, "x/y": lambda a, b: a / b if b else None, "y/x": lambda a, b: b / a if a else None}


def _render(node) -> str:
    kind, a, b = node
    if kind == "n":
        return a
    if kind == "+":  # sum terms are numbers or products: no parentheses needed
        return "+".join(map(_render, a)) + "".join("-" + _render(t) for t in b)
    wrap = lambda f: "(" + _render(f) + ")" if f[0] == "+" else _render(f)
    return "*".join(map(wrap, a)) + "".join("/" + wrap(f) for f in b)


def _combine(x, y):
    """The six binary combinations of two canonical nodes: (op name, node)."""
    (xp, xn), (yp, yn) = _parts(x, "+"), _parts(y, "+")
    (xu, xd), (yu, yd) = _parts(x, "*"), _parts(y, "*")
    yield "+", _node("+", xp + yp, xn + yn)
    yield "x-y", _node("+", xp + yn, xn + yp)
    yield "y-x", _node("+", yp + xn, yn + xp)
    yield "*", _node("*", xu + yu, xd + yd)
    yield "x/y", _node("*", xu + yd, xd + yu)
    yield "y/x", _node("*", yu + xd, yd + xu)


def _splits(values: tuple) -> list:
    """Unordered splits of a sorted multiset into two non-empty sorted sub-multisets, each once: the last element
    always lands on the right, and repeats (of equal values) are dropped."""
    side = lambda mask, bit: tuple(v for i, v in enumerate(values) if (mask >> i & 1) == bit)
    return list(dict.fromkeys((side(mask, 1), side(mask, 0)) for mask in range(1, 2 ** (len(values) - 1))))


@functools.lru_cache(maxsize=None)
def _expressions(values: tuple) -> dict:
    """value -> {rendered formula: node} of every canonical expression over the sorted multiset."""
    if len(values) == 1:
        node = ("n", str(values[0]), ())
        return {Fraction(values[0]): {_render(node): node}}
    out: dict = {}
    for left, right in _splits(values):
        for (xv, xs), (yv, ys) in itertools.product(_expressions(left).items(), _expressions(right).items()):
            for x, y in itertools.product(xs.values(), ys.values()):
                for op, node in _combine(x, y):
                    v = _APPLY[op](xv, yv)
                    if v is not None:
                        out.setdefault(v, {})[_render(node)] = node
    return out


@functools.lru_cache(maxsize=None)
def _solutions(values: tuple, target: int) -> tuple:
    """Sorted formulas over the sorted multiset `values` that equal `target`. Only the last combination aims at
    the target: for each split, each left value x asks the right sub-multiset for the six y with x op y == target."""
    t = Fraction(target)
    if len(values) == 1 or t == 0:  # x/y == 0 holds for any y: ask the full enumeration instead
        return tuple(sorted(_expressions(values).get(t, {}), key=lambda s: (len(s), s)))
    found = {}
    for left, right in _splits(values):
        rexp = _expressions(right)
        for xv, xs in _expressions(left).items():
            wanted = {"+": t - xv, "x-y": xv - t, "y-x": t + xv, "*": t / xv if xv else None,
                      "x/y": xv / t, "y/x": t * xv if xv else None}
            for op, yv in wanted.items():
                if yv is None or yv not in rexp or (op == "x/y" and yv == 0):
                    continue
                for x, y in itertools.product(xs.values(), rexp[yv].values()):
                    found[_render(dict(_combine(x, y))[op])] = True
    return tuple(sorted(found, key=lambda s: (len(s), s)))


def solve(values, target: int = 24) -> list[str]:
    """Every formula that uses each of `values` once and equals `target` exactly, shortest first, one per class of
    commutative and associative variants (a+b and b+a are one; a-(b-c) is written a+c-b); empty when unsolvable.
    >>> solve([3, 3, 8, 8])
    ['8/(3-8/3)']
    """
    return list(_solutions(tuple(sorted(int(v) for v in values)), int(target)))


def is_solvable(values, target: int = 24) -> bool:
    return bool(_solutions(tuple(sorted(int(v) for v in values)), int(target)))


# ---- parse: formulas and answers ----

_TOKEN_RE = re.compile(r"[0-9]+|\S")  # ASCII digits: \d would admit "٣", which int() reads
_OPERATORS = frozenset("+-*/()")


def parse_formula(text: str, steps: Optional[list] = None) -> tuple:
    """(exact value: an int, or a Fraction once a division does not come out even; the integers it uses in order),
    ValueError on anything but a formula. `steps`: a list that receives each operation with its value. Recursive
    descent over expr := term (('+'|'-') term)*, term := factor (('*'|'/') factor)*, factor := INT | '(' expr ')'."""
    tokens = _TOKEN_RE.findall(text)  # '(8-3)*4' -> ['(', 8, '-', 3, ')', '*', 4]; every non-space is matched
    for i, tok in enumerate(tokens):
        if tok in _OPERATORS:
            continue
        if not "0" <= tok[0] <= "9":
            position = [m.start() for m in _TOKEN_RE.finditer(text)][i]
            raise ValueError(f"illegal token {tok!r} at position {position}; only integers, "
                             "+ - * / and parentheses are allowed")
        tokens[i] = int(tok)
    if not tokens:
        raise ValueError("the formula is empty")
    tokens, numbers, at, depth = tokens + [None], [], 0, 0
    show = lambda v: f"({v})" if v < 0 or v.denominator != 1 else str(v)  # 3-(8/3), not 3-8/3 computed anew

    def chain(level):  # level 0: an expr, terms joined by + and -; level 1: a term, factors joined by * and /
        nonlocal at
        ops = ("+", "-") if level == 0 else ("*", "/")
        a = chain(1) if level == 0 else factor()
        while tokens[at] in ops:
            op, at = tokens[at], at + 1
            b = chain(1) if level == 0 else factor()
            if op != "/":
                value = a + b if op == "+" else a - b if op == "-" else a * b
            elif b == 0:
                raise ValueError("division by zero")
            else:
                value = (a // b if a % b == 0 else Fraction(a, b)) if type(a) is int and type(b) is int else a / b
            if steps is not None:
                steps.append(f"{show(a)}{op}{show(b)}={value}")
            a = value
        return a

    def factor():
        nonlocal at, depth
        tok, at = tokens[at], at + 1
        if type(tok) is int:
            numbers.append(tok)
            return tok
        if tok == "(":
            depth += 1
            if depth > MAX_NESTING:
                raise ValueError(f"parentheses nested deeper than {MAX_NESTING}")
            value = chain(0)
            if tokens[at] != ")":
                raise ValueError("unbalanced parentheses: a '(' is never closed")
            at, depth = at + 1, depth - 1
            return value
        if tok is None:
            raise ValueError("the formula ends where a number or '(' was expected")
        raise ValueError(f"{tok!r} where a number or '(' was expected")

    value = chain(0)
    if tokens[at] is not None:
        raise ValueError(f"unexpected {tokens[at]!r} after a complete formula")
    return value, numbers


def evaluate_formula(text: str) -> Fraction:
    """Exact value of a formula of integers, + - * / and parentheses; ValueError otherwise.
    >>> evaluate_formula("8/(3-8/3)")
    Fraction(24, 1)
    """
    return Fraction(parse_formula(text)[0])


ANSWER_FIELDS = ("cards", "number", "formula")
ACTION_FIELD = "formula"  # the final field, the action itself: the PPO trainer weights the tokens before it


@functools.lru_cache(maxsize=None)
def _field_re(name: str):
    """`"name": <value>` in JSON-like text: a double- or single-quoted string, a [list] or a bare value."""
    return re.compile(r"""["']?%s["']?\s*:\s*(?:"((?:[^"\\\n]|\\.)*)"|'([^'\n]*)'|\[([^\]\n]*)\]|([^,}\n]+))"""
                      % re.escape(name), re.IGNORECASE)


_RANK_RE = re.compile(r"\b(10|[1-9]|ace|jack|queen|king|ten|[ajqkt])\b", re.IGNORECASE)
_RANK_ALIASES = {"1": "A", "ACE": "A", "JACK": "J", "QUEEN": "Q", "KING": "K", "TEN": "10", "T": "10"}
_THOUGHT_RE = re.compile(r"""(["']%s["']\s*:\s*")((?:[^"\\]|\\[\s\S])*)(")""" % THOUGHT_FIELD, re.IGNORECASE)
_MAX_SCAN_CHARS = 50_000  # answers are a few hundred characters; never scan megabytes of noise


def _json_object(text: str, key: str) -> Optional[dict]:
    """The first JSON object in the text that has `key` (or, failing that, the first object)."""
    decoder, first, start = json.JSONDecoder(), None, text.find("{")
    for _ in range(16):  # bounded: adversarial text with thousands of '{' costs no more
        if start < 0:
            break
        try:
            obj, _end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            if key in obj:
                return obj
            first = first if first is not None else obj
        start = text.find("{", start + 1)
    return first


def parse_answer(text, fields=ANSWER_FIELDS) -> dict:
    """{field: value or None} from a model's answer (env_virl's fields too); the last field matters most. Strict JSON
    first (anywhere, e.g. in a ```json fence), then the field patterns of JSON-like text ('formula': (1+2)*8, "cards":
    [A, 3, K, 6]) outside a "thought" string, which may mention a field. Other fields are ignored. Never raises."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = str(text)[:_MAX_SCAN_CHARS]
    obj = _json_object(text, fields[-1]) or {}
    out = {key: obj.get(key) for key in fields}
    missing = [key for key in fields if out[key] is None]
    if missing and THOUGHT_FIELD in text.lower():  # blank the thought's string out
        text = _THOUGHT_RE.sub(lambda m: m.group(1) + " " * len(m.group(2)) + m.group(3), text)
    for key in missing:
        m = _field_re(key).search(text)
        if m:
            dq, sq, lst, bare = m.groups()
            out[key] = ([item.strip().strip("\"'") for item in lst.split(",") if item.strip()] if lst is not None
                        else next(g for g in (dq, sq, bare) if g is not None).strip())
    return out


def normalize_rank(item) -> Optional[str]:
    """'K', 'king', 'K of spades', 'Ten' -> canonical rank ('K', '10'); None if no rank is named."""
    if isinstance(item, bool) or not isinstance(item, (str, int)):
        return None
    m = _RANK_RE.search(str(item))
    rank = m.group(1).upper() if m else None
    return _RANK_ALIASES.get(rank, rank)


# ---- verify, reward, feedback ----

@dataclass
class Verdict:
    outcome: str                  # a key of REWARDS
    reward: float
    feedback: str                 # the verifier's message for the next attempt
    cards_ok: Optional[bool]      # GP-VL: the "cards" field matched the dealt ranks; GP-L: None
    formula: Optional[str] = None


def failure_feedback(reason: str) -> str:
    """The verifier's message for a failed attempt, the paper's wording (V-IRL's verifier says it too)."""
    return f"You failed this trial because {reason}."


def retry_text(feedback: str) -> str:
    """A failed attempt's feedback as the next user turn (V-IRL's too): it asks for another answer."""
    return feedback + " Try again, answering with one JSON object in the same format."


def _failure(outcome: str, reason: str, cards_ok, formula=None) -> Verdict:
    return Verdict(outcome, REWARDS[outcome], failure_feedback(reason), cards_ok, formula)


def verify(text, ranks, config: PointsConfig) -> Verdict:
    """Score one answer for the dealt `ranks`: the one source of reward and success for training and evaluation.
    Never raises, whatever `text` holds. Outcomes as in REWARDS, the first that applies; a trailing '=<target>' is
    accepted. Under protocol "official" the official code's rules decide instead (official.py)."""
    if config.protocol == "official":
        return Verdict(*official_rules().gp_verify(text, ranks, [card_value(r, config.face_cards_as_10) for r in ranks],
                                                   config.vision, config.target))
    answer, cards_ok = parse_answer(text), None
    if config.vision:
        said = answer["cards"] if isinstance(answer["cards"], list) else []
        said = [normalize_rank(c) for c in said] if len(said) == len(ranks) else []  # another length: unread
        cards_ok = len(said) == len(ranks) and None not in said and sorted(said) == sorted(ranks)
        if not cards_ok:
            return _failure("wrong_cards", "the cards you recognized are not the cards in the image", False)
    raw = answer["formula"]
    if raw is None:
        return _failure("illegal_formula", 'your answer has no "formula" field', cards_ok)
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        return _failure("illegal_formula", 'the "formula" field is not a string', cards_ok)
    formula = str(raw).strip()
    if len(formula) > MAX_FORMULA_CHARS:
        return _failure("illegal_formula", f"the formula is longer than {MAX_FORMULA_CHARS} characters", cards_ok)
    lhs, eq, rhs = formula.partition("=")
    if eq and rhs.strip() != str(config.target):
        return _failure("illegal_formula", f"only '={config.target}' may follow the formula, "
                        f"not '={rhs.strip()[:40]}'", cards_ok, formula)
    try:
        value, used = parse_formula(lhs)
    except (ValueError, RecursionError) as e:
        return _failure("illegal_formula", f"your formula is not legal: {e}", cards_ok, formula)
    values = [card_value(r, config.face_cards_as_10) for r in ranks]
    if sorted(used) != sorted(values):
        extra = sorted((Counter(used) - Counter(values)).elements())
        missing = sorted((Counter(values) - Counter(used)).elements())
        parts = ([f"it uses {extra} which are not card numbers or are used too often"] if extra else []) + \
                ([f"it does not use the card numbers {missing}"] if missing else [])
        return _failure("wrong_numbers", "your formula must use each card's number exactly once, but "
                        + " and ".join(parts), cards_ok, formula)
    if value != config.target:
        return _failure("wrong_value", f"your formula evaluates to {value}, not {config.target}", cards_ok, formula)
    return Verdict("correct", REWARDS["correct"], f"Correct: {lhs.strip()} = {config.target}.", cards_ok, formula)


# ---- prompts ----
# The task prompt (template 0), and 9 more wordings of it for the prompt-diversity study in prompt_variants.py (read
# only when asked for). A template: (cards in the image, cards listed: {} the ranks as `join` joins them, join,
# faces by ID rule, by OOD rule, the text with $cards, $faces and $target).

def _and_list(items) -> str:
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


_json_list = lambda ranks: json.dumps(list(ranks))
_PROMPT = (  # template 0, the original wording
    "The four cards are shown in the image.", "Your cards: {}.", _json_list,
    "J, Q and K each count as 10", "J counts as 11, Q as 12 and K as 13",
    "You are an expert player of the $target points card game. You are dealt four cards. Write one arithmetic "
    "formula that uses the number of every card exactly once, combined with +, -, *, / and parentheses, and that "
    "evaluates to $target.\nAn A counts as 1, $faces, and every other card counts as the number printed on it.\n"
    '$cards\nAnswer with one JSON object and nothing else:\n{"cards": [x, y, z, w], "number": [a, b, c, d], '
    '"formula": "..."}\nwhere "cards" are the ranks of the four cards (A, 2-10, J, Q, K), "number" the numbers they '
    'count for under the rule above, in the same order, and "formula" your formula, for example "(2+4)*(9-5)".')


@functools.lru_cache(maxsize=None)
def prompt_template(k: int) -> tuple:
    """Template k, its text as a %-format (filled in one call: reset() is a hot path). 1 to 9 come from
    prompt_variants.py, the prompt-diversity study's file, imported only then."""
    if k:
        try:
            import prompt_variants
        except ImportError as e:
            raise ValueError(f"prompt_template={k} needs prompt_variants.py beside env_points.py ({e}); "
                             "expected it, or prompt_template=0") from None
    *parts, text = _PROMPT if k == 0 else prompt_variants.POINTS[k - 1]
    return (*parts, re.sub(r"\$(cards|faces|target)", r"%(\1)s", text.replace("%", "%%")))


def prompt_text(ranks, config: PointsConfig) -> str:
    """The task statement for a new hand, in the wording of `config.prompt_template`, or the official prompt under
    protocol "official": GP-L lists the cards, GP-VL refers to the image."""
    if config.protocol == "official":
        return official_rules().gp_prompt(ranks, tuple(card_value(r, config.face_cards_as_10) for r in FACE_CARDS),
                                          config.vision, config.target)
    in_image, listed, join, faces_id, faces_ood, text = prompt_template(config.prompt_template)
    cards = in_image if config.vision else listed.format(join(ranks))
    faces = faces_id if config.face_cards_as_10 else faces_ood  # the values card_value gives J, Q, K
    return text % {"cards": cards, "faces": faces, "target": config.target}


# ---- expert ----

def formula_steps(formula: str) -> list:
    """Each binary operation of a formula with its exact value, in the parser's order of evaluation (innermost
    first, left to right). ValueError when it is not a legal formula.
    >>> formula_steps("8/(3-8/3)")
    ['8/3=8/3', '3-(8/3)=1/3', '8/(1/3)=24']
    """
    steps = []
    parse_formula(formula, steps)
    return steps


def expert_thought(ranks, formula: str, config: PointsConfig) -> str:
    """The reasoning of a correct answer (SFT on answers that reason before they act, as in "Debunk the Myth of SFT
    Generalization"): each card's number under the rule, so that SFT data carries the rule itself, then the formula's
    operations. No double quotes and no 'field:' patterns, so that no parser mistakes a part of it for a field."""
    values = [card_value(rank, config.face_cards_as_10) for rank in ranks]
    counts = _and_list(f"{rank} counts as {value}" for rank, value in zip(ranks, values))
    return (f"The cards are {_and_list(ranks)}. Under the rule, {counts}, so the numbers are "
            f"{_and_list(map(str, values))}. To reach {config.target}, combine them as {formula}, working out the "
            f"innermost operation first: " + ", ".join(formula_steps(formula)) + f", the target {config.target}.")


def wrong_answer(expert: str, rng: random.Random) -> str:
    """A plausible mistake for sequential-revision SFT data: the expert answer (JSON or the official template) with
    one operator of its formula, drawn from `rng`, replaced by another. A thought stays: the mistake is the action's."""
    formula = parse_answer(expert)[ACTION_FIELD]
    at = rng.choice([k for k, c in enumerate(formula) if c in "+-*/"])
    wrong = formula[:at] + rng.choice([o for o in "+-*/" if o != formula[at]]) + formula[at + 1:]
    # a formula is digits and operators, which JSON writes as they are: the same text in both formats
    return expert.replace(f'"{ACTION_FIELD}": "{formula}"', f'"{ACTION_FIELD}": "{wrong}"', 1)


# ---- render (GP-VL) ----
# Pillow shapes and font, no image assets: 5:7 cards on the official casino green, inside a bare margin (no card cut).

TABLE_GREEN = (0x35, 0x65, 0x4D)  # the official table colour '#35654d'
CARD_WHITE = (250, 250, 246)
CARD_EDGE = (60, 60, 60)
SUIT_COLORS = {"spades": (20, 20, 20), "clubs": (20, 20, 20), "hearts": (200, 20, 30), "diamonds": (200, 20, 30)}
CARD_ASPECT = 1.4    # height / width, the 5:7 of the official card images
TABLE_MARGIN = 0.05  # bare table on each side, as a share of the image side
CARD_GAP = 0.03      # between neighbouring cards, as a share of the image side
SUPERSAMPLE_PX = 896  # small images are drawn at least this large, then box-reduced by a whole factor
# suit symbols in units of the half-height r around their centre: discs (x, y, radius), polygons [(x, y), ...]; the
# small fourth disc of clubs fills the hole between the leaves
_SUIT_SHAPES = {
    "diamonds": [[(0, -1), (0.72, 0), (0, 1), (-0.72, 0)]],
    "hearts": [(-0.48, -0.35, 0.52), (0.48, -0.35, 0.52), [(-1, -0.2), (1, -0.2), (0, 1)]],
    "spades": [(-0.48, 0.2, 0.5), (0.48, 0.2, 0.5), [(-0.97, 0.1), (0.97, 0.1), (0, -1)],
               [(0, 0.2), (-0.35, 1), (0.35, 1)]],
    "clubs": [(0, -0.45, 0.42), (-0.48, 0.12, 0.42), (0.48, 0.12, 0.42), (0, 0, 0.25), [(0, 0), (-0.35, 1), (0.35, 1)]],
}


def _draw_suit(draw, suit: str, cx: float, cy: float, r: float, color) -> None:
    for shape in _SUIT_SHAPES[suit]:
        if isinstance(shape, list):
            draw.polygon([(cx + x * r, cy + y * r) for x, y in shape], fill=color)
        else:
            x, y, rad = cx + shape[0] * r, cy + shape[1] * r, shape[2] * r
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=color)


@functools.lru_cache(maxsize=None)  # one font per pixel size in use: a few dozen at most
def default_font(px: int):
    """Pillow's built-in font at `px` pixels (also V-IRL-VL's street signs and labels, in streetview.py)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _draw_card(img, box, rank: str, suit: str) -> None:
    from PIL import Image, ImageDraw
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    color = SUIT_COLORS[suit]
    draw = ImageDraw.Draw(img)
    # the built-in font is thin: a stroke of the ink's own colour keeps the rank bold once the image is reduced
    text = lambda d, xy, px, anchor: d.text(xy, rank, font=default_font(px), fill=color, anchor=anchor,
                                            stroke_width=max(0, round(px / 24)), stroke_fill=color)
    draw.rounded_rectangle(box, radius=w * 0.08, fill=CARD_WHITE, outline=CARD_EDGE, width=max(1, w // 60))
    # corner index, rank above a small suit, top-left upright and bottom-right upside down, on an opaque patch of
    # card colour so that its anti-aliasing blends with the card; the patch is wide enough for "10"
    corner = Image.new("RGB", (max(4, int(w * 0.38)), max(4, int(h * 0.32))), CARD_WHITE)
    cd = ImageDraw.Draw(corner)
    text(cd, (corner.width / 2, 0), max(6, int(w * 0.28)), "mt")
    _draw_suit(cd, suit, corner.width / 2, corner.height * 0.8, corner.width * 0.16, color)
    pad = max(1, int(w * 0.06))
    img.paste(corner, (x0 + pad // 2, y0 + pad))
    img.paste(corner.rotate(180), (x1 + 1 - pad // 2 - corner.width, y1 + 1 - pad - corner.height))
    cx = (x0 + x1) / 2
    if rank in FACE_RANKS:  # court cards: a framed panel with a large letter
        fx, fy = w * 0.34, h * 0.26
        draw.rectangle((x0 + fx, y0 + fy, x1 - fx, y1 - fy), outline=color, width=max(1, w // 40))
        text(draw, (cx, y0 + h * 0.41), max(6, int(w * 0.26)), "mm")
        _draw_suit(draw, suit, cx, y0 + h * 0.61, w * 0.09, color)
    else:
        _draw_suit(draw, suit, cx, (y0 + y1) / 2, w * 0.2, color)


def _layout(n: int, size: int) -> tuple:
    """(supersampling factor, [card boxes in the large image]) of n cards on a size x size table."""
    scale = min(4, -(-SUPERSAMPLE_PX // size))
    big = size * scale
    margin, gap = big * TABLE_MARGIN, big * CARD_GAP
    w = (big - 2 * margin - (n - 1) * gap) / n
    h = min(w * CARD_ASPECT, big - 2 * margin)
    top = int((big - h) / 2)
    lefts = [int(margin + i * (w + gap)) for i in range(n)]  # boxes are inclusive: the last column is left + w - 1
    return scale, [(left, top, left + int(w) - 1, top + int(h) - 1) for left in lefts]


@functools.lru_cache(maxsize=4096)  # 52 cards x 4 places per image size
def _card_tile(n: int, i: int, rank: str, suit: str, size: int) -> tuple:
    """(tile, (x, y)): card i of n as the final image shows it, the output pixels its box touches. The card is drawn
    where the whole hand's drawing puts it, then only the blocks of `scale` x `scale` large pixels it touches are
    reduced: neighbours are more than a block apart, so those pixels are exactly the whole hand's."""
    from PIL import Image
    scale, boxes = _layout(n, size)
    x0, y0, x1, y1 = boxes[i]
    big = Image.new("RGB", (size * scale, size * scale), TABLE_GREEN)
    _draw_card(big, boxes[i], rank, suit)
    c0, r0, c1, r1 = x0 // scale, y0 // scale, x1 // scale + 1, y1 // scale + 1  # output pixels, end exclusive
    tile = big.crop((c0 * scale, r0 * scale, c1 * scale, r1 * scale))
    return (tile.reduce(scale) if scale > 1 else tile), (c0, r0)


def render_cards(cards, size: int = 448):
    """A size x size RGB image of the (rank, suit) cards side by side on a green table, inside a bare margin of
    TABLE_MARGIN * size. A pure function of its arguments: the same hand always gives the same pixels. Each card is
    drawn once per (place, rank, suit, size) and reused (_card_tile): a hand is four pastes."""
    from PIL import Image
    # Pillow draws shapes without anti-aliasing and hints small text into blobs: drawing large and reducing keeps
    # the ranks legible at 224 px; the integer box filter leaves bare table exact
    img = Image.new("RGB", (size, size), TABLE_GREEN)
    for i, (rank, suit) in enumerate(cards):
        tile, at = _card_tile(len(cards), i, rank, suit, size)
        img.paste(tile, at)
    return img


# ---- the environment ----

@dataclass
class Observation:
    text: str                  # the user turn to show the model
    image: object = None       # PIL.Image for a new GP-VL hand, else None
    continues: bool = False    # True: append to the conversation; False: start a new one


class GeneralPointsEnv:
    """One GeneralPoints table: reset() deals a solvable hand and returns the task prompt, step(answer) verifies one
    attempt; after done, reset() again.
    >>> env = GeneralPointsEnv(seed=0); _ = env.reset(); env.step(env.expert_response())[1:3]
    (5.0, True)
    """

    def __init__(self, config: Optional[PointsConfig] = None, seed: int = 0):
        self.config, self.rng = config or PointsConfig(), random.Random(seed)
        self.cards, self.attempt, self.done = [], 0, True  # cards: [(rank, suit)] as dealt

    @property
    def ranks(self) -> list:
        return [rank for rank, _ in self.cards]

    @property
    def values(self) -> list:
        return [card_value(rank, self.config.face_cards_as_10) for rank, _ in self.cards]

    def reset(self, seed: Optional[int] = None, episode: Optional[int] = None) -> Observation:
        """Deal a new hand; `seed` restarts the dealing RNG. `episode` is ignored: a hand comes from the seed alone."""
        if seed is not None:
            self.rng = random.Random(seed)
        self.cards, self.attempt, self.done = deal_hand(self.rng, self.config), 0, False
        image = render_cards(self.cards, self.config.image_size) if self.config.vision else None
        return Observation(prompt_text(self.ranks, self.config), image, continues=False)

    def step(self, response) -> tuple:
        if self.done:
            raise RuntimeError("GeneralPointsEnv.step called on a finished episode: call reset() first")
        official = self.config.protocol == "official"
        if self.attempt < self.config.verify_iter:
            verdict = verify(response, self.ranks, self.config)
        else:  # protocol "official" asks for one more answer after the last failed attempt, and scores it unread
            reward, outcome, feedback = official_rules().step_limit()
            verdict = Verdict(outcome, reward, feedback, None)
        self.attempt += 1
        success = verdict.outcome == "correct"
        self.done = success or self.attempt >= self.config.verify_iter + official
        info = {"outcome": verdict.outcome, "feedback": verdict.feedback, "success": success,
                "attempt": self.attempt, "recognized": verdict.cards_ok, "cards": self.ranks}
        alone = self.done or official  # the official feedback is the message alone
        obs = Observation(verdict.feedback if alone else retry_text(verdict.feedback), None, continues=not self.done)
        return obs, verdict.reward, self.done, info

    def expert_response(self, reasoning: bool = False) -> str:
        """The dealt ranks, their numbers and the shortest formula, as JSON (`reasoning`: opened by expert_thought);
        protocol "official": the official template, a formula float arithmetic finds correct, "=<target>" after it."""
        official = official_rules() if self.config.protocol == "official" else None
        found = solve(self.values, self.config.target)
        formula = official.gp_formula(found, self.config.target) if official else found[0]
        answer = {"cards": self.ranks, "number": self.values,
                  "formula": formula + (f"={self.config.target}" if official else "")}
        if reasoning:  # first, so that the formula, the action, still ends the answer
            answer = {THOUGHT_FIELD: expert_thought(self.ranks, formula, self.config), **answer}
        return official.answer(answer) if official else json.dumps(answer)


# ---- demo ----

def play_expert(env, episodes: int) -> tuple:
    """(episodes solved, answers given, seconds) with the expert playing: a self-check of any env."""
    start, wins, answers = time.perf_counter(), 0, 0
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, _, done, info = env.step(env.expert_response())
            answers += 1
        wins += info["success"]
    return wins, answers, time.perf_counter() - start


def fail(message: str):
    """Stop with one line on stderr, what was wrong and what would be accepted, and exit status 2 (argparse's)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad values stop with one line on stderr (`fail`), not a usage block."""

    def error(self, message):
        fail(message)


def cannot_write(flag: str, path: str, e: Exception, what: str, expected: str):
    """Stop with one line: the flag's path could not be written, why, and what would be accepted."""
    fail(f"{flag} {path!r}: cannot {what} ({getattr(e, 'strerror', None) or e}); expected {expected}")


def main(argv=None) -> int:
    from PIL import Image
    p = OneLineArgumentParser(description="GeneralPoints: sample prompt and image, then expert play.")
    p.add_argument("--episodes", type=int, default=1000, help="expert episodes to play")
    p.add_argument("--seed", type=int, default=0, help="dealing seed")
    p.add_argument("--ood-rule", action="store_true", help="J, Q, K = 11, 12, 13 (and a face card in every hand)")
    p.add_argument("--suits", default="black", choices=sorted(SUIT_SETS), help="card colours")
    p.add_argument("--target", type=int, default=24, help="value every formula must reach")
    p.add_argument("--image", default="gp_vl_sample.png", help="where to write the sample GP-VL image")
    p.add_argument("--image-size", type=int, default=448, help="GP-VL image side in pixels")
    args = p.parse_args(argv)
    if args.episodes < 0:
        fail(f"--episodes {args.episodes}: expected 0 or a positive integer")
    ext = os.path.splitext(args.image)[1].lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:  # else Pillow fails only after the work
        fail(f"--image {args.image!r}: " + (f"Pillow writes no {ext} images" if ext else "no file extension")
             + "; expected a file name ending in .png, .jpg or another format Pillow writes")
    try:
        cfg = PointsConfig(target=args.target, face_cards_as_10=not args.ood_rule, suits=args.suits,
                           image_size=args.image_size)
        env = GeneralPointsEnv(cfg, seed=args.seed)
        print(f"---- GP-L prompt ----\n{env.reset().text}\n---- expert answer ----\n{env.expert_response()}")
    except ValueError as e:
        fail(str(e))
    vl = GeneralPointsEnv(PointsConfig(**{**cfg.__dict__, "vision": True}), seed=args.seed)
    image = vl.reset().image
    try:
        image.save(args.image)
    except (OSError, ValueError) as e:
        cannot_write("--image", args.image, e, "write it", "a writable file in an existing folder, in a format "
                     "that takes colour images such as .png")
    print(f"---- GP-VL image of {vl.cards} written to {args.image} ----")
    wins, answers, secs = play_expert(env, args.episodes)
    print(f"expert: {wins}/{args.episodes} episodes solved ({100 * wins / max(1, args.episodes):.1f}%), "
          f"{answers} answers, {secs:.2f} s")
    return 0 if wins == args.episodes else 1


if __name__ == "__main__":
    sys.exit(main())
