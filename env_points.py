"""GeneralPoints: the arithmetic card game of Chu et al. (2025), for text (GP-L) and images (GP-VL).

Four cards are dealt; the player answers with one JSON object
    {"cards": ["A", "7", "K", "3"], "number": [1, 7, 10, 3], "formula": "1+10*3-7"}
whose formula uses every card's number exactly once and evaluates to the target (24).

Rules (ID vs OOD rule):  J, Q, K count as 10 (ID, `face_cards_as_10=True`) or as 11, 12, 13
(OOD, `face_cards_as_10=False`).
Dealing, as the official code deals: every rank and suit drawn independently, so a hand may hold
the same card twice, and the hand redrawn until it is solvable under the rule. ID: four ranks
uniform over A..K. OOD (`face_card_required`, on by default exactly under the OOD rule): three
ranks uniform over A..K and one over J, Q, K, shuffled, so that every hand holds a face card.
Visuals (ID vs OOD visual): black suits (spades, clubs) or red suits (hearts, diamonds).

Reward per attempt, one outcome each, checked in this order:
    wrong_cards      -1.5  (GP-VL only) the "cards" field is not the dealt ranks as a multiset
    illegal_formula  -3    formula missing, unparseable, illegal token, division by zero
    wrong_numbers    -2    the formula's numbers are not exactly the cards' numbers
    wrong_value      -1    legal formula with the right numbers but another value
    correct          +5
After a failed attempt the verifier's message continues the conversation (sequential
revision); the episode ends when solved or after `verify_iter` attempts.

Departures from the official code: formulas are evaluated exactly (the official float `eval`
misses answers such as 8/(3-8/3)), each attempt has exactly one outcome (the official penalties
add up, e.g. -4 for an invented and a missing number, and it has a +1 "partial solution"), and
answers are parsed tolerantly. The GP-VL image (`image_size` pixels a side, 448 by default; the
official one is 1200) is drawn with Pillow shapes and its built-in font rather than pasted from
photographed card art, on the official #35654d table green, every card inside the frame.

The environment contract, which env_virl.py follows too, so that the trainers and the evaluator hold no
fact of either environment:
    env.reset(seed=None, episode=None) -> Observation   a new hand; `seed` restarts the dealing RNG. The
        evaluation plays episode k of a setting as reset(seed=s, episode=k); a hand comes from the seed
        alone, so GeneralPoints ignores `episode`.
    env.step(answer) -> (Observation, reward, done, info)   verify one attempt
    env.expert_response(reasoning=False) -> str           a correct answer (the SFT target). reasoning=True: the same
        JSON object opened by a "thought" field (THOUGHT_FIELD), a chain of thought ending in the action: here
        each card's number under the active rule, then each operation of the formula with its value
    ACTION_FIELD = "formula"   the answer's final field, the action itself (the PPO trainer weights the tokens
        before it, the thought among them, by `pre_action_coef` in the action's log-probability)
    wrong_answer(expert: str, rng: random.Random) -> str   a plausible mistake made from an expert answer:
        one operator of the formula changed (sequential-revision SFT data); a thought is kept as it was
    config.prompt_template: int = 0   which of PROMPT_TEMPLATES wordings of the task prompt reset() shows; 0 is the
        original. Each states the same facts and asks for the same fields (prompt diversity for SFT data, as
        in "Debunk the Myth of SFT Generalization", arXiv 2510.00237). The verifier and its feedback are the same.
The verifier reads only the answer's own fields: a "thought" or any other extra field is ignored.

This file copies out alone: it needs the standard library and Pillow, nothing else of the project. The V-IRL
files reuse its environment-independent pieces: the answer parser (`parse_answer`), `Observation`, the
feedback wording (`failure_feedback`, `retry_text`), Pillow's font (`default_font`), the expert self-check
(`play_expert`) and the one-line command-line errors (`fail`, `OneLineArgumentParser`, `cannot_write`).

    python env_points.py                       # sample GP-L prompt, sample GP-VL image, expert play
    python env_points.py --ood-rule --suits red --episodes 5000
"""
from __future__ import annotations

import argparse
import functools
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
REWARDS = {"correct": 5.0, "wrong_value": -1.0, "wrong_cards": -1.5,
           "wrong_numbers": -2.0, "illegal_formula": -3.0}
MAX_FORMULA_CHARS = 512  # longer "formulas" are illegal: no honest answer over four cards needs more, and it
                         # keeps exact values within a few hundred digits, quick to compute and to print
MAX_NESTING = 64         # parenthesis depth; keeps the recursive parser far from Python's stack limit
MAX_IMAGE_SIZE = 4096    # pixels a side: far above the official 1200, far below a size that exhausts memory
PROMPT_TEMPLATES = 10    # wordings of the task prompt, `PointsConfig.prompt_template` 0 to 9 (0: the original one)
THOUGHT_FIELD = "thought"  # the reasoning an answer may open with (expert_response(reasoning=True)); never verified
# "project": this project's rules (above); "official": what the paper's official code effectively did, point by
# point (docs/fidelity.md): its answer parsing, stacked rewards and float evaluation, its feedback, its answer
# template, and one more answer scored -1 unread after the last failed attempt
PROTOCOLS = ("project", "official")


@dataclass
class PointsConfig:
    target: int = 24                        # the value every formula must reach
    face_cards_as_10: bool = True           # True: J, Q, K = 10 (ID rule); False: 11, 12, 13 (OOD rule)
    suits: str = "black"                    # "black" (ID visuals), "red" (OOD visuals) or "mixed"
    vision: bool = False                    # GP-VL: cards in an image, "cards" field verified
    verify_iter: int = 5                    # attempts per episode (sequential revision)
    face_card_required: Optional[bool] = None  # OOD deal (see deal()); None: exactly under the OOD rule
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
        if self.face_card_required is None:
            self.face_card_required = not self.face_cards_as_10
        if self.protocol == "official" and self.prompt_template:
            raise ValueError(f"PointsConfig.prompt_template={self.prompt_template}: protocol 'official' prompts with "
                             "the official prompt only; expected 0")


def check_protocol(protocol, what: str = "protocol") -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"{what}={protocol!r}: expected one of {', '.join(PROTOCOLS)}")


def official_rules():
    """official.py, the official code's rules, imported only under protocol "official": without it this file copies
    out alone."""
    import official
    return official


def card_value(rank: str, face_cards_as_10: bool = True) -> int:
    """Number a rank counts for: A=1, 2..10 as printed, J/Q/K = 10 or 11/12/13 by rule."""
    if rank in FACE_RANKS:
        return 10 if face_cards_as_10 else 11 + "JQK".index(rank)
    return 1 if rank == "A" else int(rank)


# ---- solver ----
# Expressions are built bottom-up over sub-multisets in a canonical form, so that formulas
# differing only by commutativity or associativity are generated once:
#   sums     ("+", positive terms, negative terms)      a-(b-c) -> a+c-b
#   products ("*", numerator factors, denominator factors)  a/(b/c) -> a*c/b
#   numbers  ("n", digits)
# Children are sorted tuples of their rendered strings, so a node is identified by its string.
# Why not a brute force over every ordering, parenthesization and operator? It finds the same formulas
# (tests/test_env_points.py checks it against one) but solves all 1820 hands in 13.5 s instead of 1.2 s,
# a cost every new process pays as it deals (and the tests pay several times over).

def _sum_parts(node):
    return (node[1], node[2]) if node[0] == "+" else ((node,), ())


def _prod_parts(node):
    return (node[1], node[2]) if node[0] == "*" else ((node,), ())


def _render(node) -> str:
    kind, a, b = node
    if kind == "n":
        return a
    if kind == "+":  # sum terms are numbers or products: no parentheses needed
        return "+".join(map(_render, a)) + "".join("-" + _render(t) for t in b)
    wrap = lambda f: "(" + _render(f) + ")" if f[0] == "+" else _render(f)
    return "*".join(map(wrap, a)) + "".join("/" + wrap(f) for f in b)


def _node(kind, pos, neg):
    key = lambda n: _render(n)
    return (kind, tuple(sorted(pos, key=key)), tuple(sorted(neg, key=key)))


def _combine(x, y):
    """The six binary combinations of two canonical nodes: (op name, node)."""
    (xp, xn), (yp, yn) = _sum_parts(x), _sum_parts(y)
    (xu, xd), (yu, yd) = _prod_parts(x), _prod_parts(y)
    yield "+", _node("+", xp + yp, xn + yn)
    yield "x-y", _node("+", xp + yn, xn + yp)
    yield "y-x", _node("+", yp + xn, yn + xp)
    yield "*", _node("*", xu + yu, xd + yd)
    yield "x/y", _node("*", xu + yd, xd + yu)
    yield "y/x", _node("*", yu + xd, yd + xu)


def _apply(op: str, a: Fraction, b: Fraction) -> Optional[Fraction]:
    if op == "+":
        return a + b
    if op == "x-y":
        return a - b
    if op == "y-x":
        return b - a
    if op == "*":
        return a * b
    if op == "x/y":
        return a / b if b else None
    return b / a if a else None


def _splits(values: tuple):
    """Unordered splits of a sorted multiset into two non-empty sorted sub-multisets."""
    n, seen = len(values), set()
    for mask in range(1, 2 ** (n - 1)):  # the last element always lands in `right`: each split once
        left = tuple(v for i, v in enumerate(values) if mask >> i & 1)
        right = tuple(v for i, v in enumerate(values) if not mask >> i & 1)
        if (left, right) not in seen:
            seen.add((left, right))
            yield left, right


@functools.lru_cache(maxsize=None)
def _expressions(values: tuple) -> dict:
    """value -> {rendered formula: node} of every canonical expression over the sorted multiset."""
    if len(values) == 1:
        node = ("n", str(values[0]), ())
        return {Fraction(values[0]): {_render(node): node}}
    out: dict = {}
    for left, right in _splits(values):
        for xv, xs in _expressions(left).items():
            for yv, ys in _expressions(right).items():
                for x in xs.values():
                    for y in ys.values():
                        for op, node in _combine(x, y):
                            v = _apply(op, xv, yv)
                            if v is not None:
                                out.setdefault(v, {})[_render(node)] = node
    return out


@functools.lru_cache(maxsize=None)
def _solutions(values: tuple, target: int) -> tuple:
    """Sorted formulas over the sorted multiset `values` that equal `target`.

    Only the last combination is restricted to the target: for each split, each left value x
    asks the right sub-multiset for the six values y with x op y == target."""
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
                for x in xs.values():
                    for y in rexp[yv].values():
                        node = dict(_combine(x, y))[op]
                        found[_render(node)] = True
    return tuple(sorted(found, key=lambda s: (len(s), s)))


def solve(values, target: int = 24) -> list[str]:
    """Every distinct formula that uses each of `values` once and equals `target`, exactly.

    Distinct means distinct up to commutativity and associativity (a+b and b+a are one formula,
    a-(b-c) is written a+c-b). Shortest first. Empty when the hand is unsolvable.
    >>> solve([3, 3, 8, 8])
    ['8/(3-8/3)']
    """
    return list(_solutions(tuple(sorted(int(v) for v in values)), int(target)))


def is_solvable(values, target: int = 24) -> bool:
    return bool(_solutions(tuple(sorted(int(v) for v in values)), int(target)))


# ---- formula parser ----

_TOKEN_RE = re.compile(r"[0-9]+|\S")  # ASCII digits: \d would admit "٣", which int() reads
_OPERATORS = frozenset("+-*/()")


def _tokenize(text: str) -> list:
    """'(8-3)*4' -> ['(', 8, '-', 3, ')', '*', 4]: ints for numbers, str for operators."""
    tokens = _TOKEN_RE.findall(text)  # every non-space character is matched: nothing is skipped
    for i, tok in enumerate(tokens):
        if tok in _OPERATORS:
            continue
        if "0" <= tok[0] <= "9":
            tokens[i] = int(tok)
        else:
            position = [m.start() for m in _TOKEN_RE.finditer(text)][i]
            raise ValueError(f"illegal token {tok!r} at position {position}; only integers, "
                             "+ - * / and parentheses are allowed")
    return tokens


def _divide(a, b):
    """a / b exactly: an int when it divides, else a Fraction (int arithmetic is several times faster)."""
    if type(a) is int and type(b) is int:
        return a // b if a % b == 0 else Fraction(a, b)
    return a / b


class _Parser:
    """Recursive descent over   expr := term (('+'|'-') term)*
                                term := factor (('*'|'/') factor)*
                                factor := INT | '(' expr ')'
    No unary minus: card numbers are positive and a formula must combine them with operators.
    Values are exact: ints, and Fractions once a division does not come out even."""

    def __init__(self, tokens):
        self.tokens, self.i, self.depth, self.numbers = tokens + [None], 0, 0, []

    def expr(self):
        value = self.term()
        tokens = self.tokens
        while tokens[self.i] == "+" or tokens[self.i] == "-":
            op = tokens[self.i]
            self.i += 1
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self):
        value = self.factor()
        tokens = self.tokens
        while tokens[self.i] == "*" or tokens[self.i] == "/":
            op = tokens[self.i]
            self.i += 1
            rhs = self.factor()
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ValueError("division by zero")
            else:
                value = _divide(value, rhs)
        return value

    def factor(self):
        tok = self.tokens[self.i]
        self.i += 1
        if type(tok) is int:
            self.numbers.append(tok)
            return tok
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise ValueError(f"parentheses nested deeper than {MAX_NESTING}")
            value = self.expr()
            if self.tokens[self.i] != ")":
                raise ValueError("unbalanced parentheses: a '(' is never closed")
            self.i += 1
            self.depth -= 1
            return value
        if tok is None:
            raise ValueError("the formula ends where a number or '(' was expected")
        raise ValueError(f"{tok!r} where a number or '(' was expected")


def parse_formula(text: str) -> tuple:
    """(exact value, an int or a Fraction; the integers it uses in order). ValueError on anything
    but a formula."""
    tokens = _tokenize(text)
    if not tokens:
        raise ValueError("the formula is empty")
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.i != len(tokens):
        raise ValueError(f"unexpected {tokens[parser.i]!r} after a complete formula")
    return value, parser.numbers


def evaluate_formula(text: str) -> Fraction:
    """Exact value of a formula of integers, + - * / and parentheses; ValueError otherwise.
    >>> evaluate_formula("8/(3-8/3)")
    Fraction(24, 1)
    """
    return Fraction(parse_formula(text)[0])


# ---- answer extraction and verifier ----

ANSWER_FIELDS = ("cards", "number", "formula")
ACTION_FIELD = "formula"  # the final field, the action itself: the PPO trainer weights the tokens before it


@functools.lru_cache(maxsize=None)
def _field_re(name: str):
    """`"name": <value>` in JSON-like text: a double- or single-quoted string, a [list] or a bare value."""
    return re.compile(r"""["']?%s["']?\s*:\s*(?:"((?:[^"\\\n]|\\.)*)"|'([^'\n]*)'|\[([^\]\n]*)\]|([^,}\n]+))"""
                      % re.escape(name), re.IGNORECASE)


_RANK_RE = re.compile(r"\b(10|[1-9]|ace|jack|queen|king|ten|[ajqkt])\b", re.IGNORECASE)
_RANK_ALIASES = {"1": "A", "ACE": "A", "JACK": "J", "QUEEN": "Q", "KING": "K", "TEN": "10", "T": "10"}
_MAX_SCAN_CHARS = 50_000  # answers are a few hundred characters; never scan megabytes of noise


def _json_object(text: str, key: str) -> Optional[dict]:
    """The first JSON object in the text that has `key` (or, failing that, the first object)."""
    decoder, first = json.JSONDecoder(), None
    start = text.find("{")
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
    """{field: value or None} from a model's answer; the last field is the one that matters most.

    Strict JSON first (anywhere in the text, e.g. inside a ```json fence), then the field
    patterns of JSON-like text ('formula': (1+2)*8, "cards": [A, 3, K, 6] ...), outside any
    "thought" string. Other fields, the thought among them, are ignored. Never raises.
    Shared with env_virl, whose answers have the fields of V-IRL."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = str(text)[:_MAX_SCAN_CHARS]
    obj = _json_object(text, fields[-1]) or {}
    out = {key: obj.get(key) for key in fields}
    missing = [key for key in fields if out[key] is None]
    if missing:
        text = _blank_thought(text)
    for key in missing:
        m = _field_re(key).search(text)
        if m:
            dq, sq, lst, bare = m.groups()
            if lst is not None:
                out[key] = [item.strip().strip("\"'") for item in lst.split(",") if item.strip()]
            else:
                out[key] = next(g for g in (dq, sq, bare) if g is not None).strip()
    return out


_THOUGHT_RE = re.compile(r"""(["']%s["']\s*:\s*")((?:[^"\\]|\\[\s\S])*)(")""" % THOUGHT_FIELD, re.IGNORECASE)


def _blank_thought(text: str) -> str:
    """The text with the string value of its "thought" field blanked out, so that the field patterns read the
    answer's own fields, never one the reasoning merely mentions ('... so the formula: 3*8 ...'). Strict JSON
    needs no such care: its fields are read by key."""
    if THOUGHT_FIELD not in text.lower():
        return text
    return _THOUGHT_RE.sub(lambda m: m.group(1) + " " * len(m.group(2)) + m.group(3), text)


def normalize_rank(item) -> Optional[str]:
    """'K', 'king', 'K of spades', 'Ten' -> canonical rank ('K', '10'); None if no rank is named."""
    if isinstance(item, bool) or not isinstance(item, (str, int)):
        return None
    m = _RANK_RE.search(str(item))
    if not m:
        return None
    rank = m.group(1).upper()
    return _RANK_ALIASES.get(rank, rank)


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


def _failure(outcome: str, reason: str, cards_ok, formula=None) -> Verdict:
    return Verdict(outcome, REWARDS[outcome], failure_feedback(reason), cards_ok, formula)


def _formula_text(raw) -> tuple[Optional[str], Optional[str]]:
    """(formula ready to parse, or None; the reason it is not)."""
    if raw is None:
        return None, 'your answer has no "formula" field'
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        return None, 'the "formula" field is not a string'
    formula = str(raw).strip()
    if len(formula) > MAX_FORMULA_CHARS:
        return None, f"the formula is longer than {MAX_FORMULA_CHARS} characters"
    return formula, None


def verify(text, ranks, config: PointsConfig) -> Verdict:
    """Score one answer for the dealt `ranks` under `config`: the single source of reward and
    success for training and evaluation alike. Never raises, whatever `text` holds.

    Outcomes, first that applies: wrong_cards (vision only), illegal_formula, wrong_numbers,
    wrong_value, correct. A trailing '=<target>' after the formula is accepted. Under protocol "official" the
    official code's rules decide instead (official.py)."""
    if config.protocol == "official":
        return Verdict(*official_rules().gp_verify(text, ranks, [card_value(r, config.face_cards_as_10) for r in ranks],
                                           config.vision, config.target))
    answer = parse_answer(text)
    cards_ok = None
    if config.vision:
        said = answer["cards"] if isinstance(answer["cards"], list) else []
        said = [normalize_rank(c) for c in said] if len(said) == len(ranks) else []  # another length: unread
        cards_ok = len(said) == len(ranks) and None not in said and sorted(said) == sorted(ranks)
        if not cards_ok:
            return _failure("wrong_cards", "the cards you recognized are not the cards in the image", False)
    formula, reason = _formula_text(answer["formula"])
    if formula is None:
        return _failure("illegal_formula", reason, cards_ok)
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
        return _failure("wrong_value", f"your formula evaluates to {value}, not {config.target}",
                        cards_ok, formula)
    return Verdict("correct", REWARDS["correct"], f"Correct: {lhs.strip()} = {config.target}.",
                   cards_ok, formula)


# ---- prompts ----

def rule_text(config: PointsConfig) -> str:
    faces = ("J, Q and K each count as 10" if config.face_cards_as_10
             else "J counts as 11, Q as 12 and K as 13")
    return f"An A counts as 1, {faces}, and every other card counts as the number printed on it."


def prompt_text(ranks, config: PointsConfig) -> str:
    """The task statement for a new hand, in the wording of `config.prompt_template`, or the official prompt under
    protocol "official": GP-L lists the cards, GP-VL refers to the image."""
    if config.protocol == "official":
        return official_rules().gp_prompt(ranks, tuple(card_value(r, config.face_cards_as_10) for r in FACE_CARDS),
                                  config.vision, config.target)
    return _TEMPLATES[config.prompt_template](ranks, config)


def _template_0(ranks, config: PointsConfig) -> str:
    shown = ("The four cards are shown in the image." if config.vision
             else "Your cards: " + json.dumps(list(ranks)) + ".")
    return (
        f"You are an expert player of the {config.target} points card game. You are dealt four cards. "
        f"Write one arithmetic formula that uses the number of every card exactly once, combined "
        f"with +, -, *, / and parentheses, and that evaluates to {config.target}.\n"
        f"{rule_text(config)}\n"
        f"{shown}\n"
        "Answer with one JSON object and nothing else:\n"
        '{"cards": [x, y, z, w], "number": [a, b, c, d], "formula": "..."}\n'
        'where "cards" are the ranks of the four cards (A, 2-10, J, Q, K), "number" the numbers '
        'they count for under the rule above, in the same order, and "formula" your formula, '
        'for example "(2+4)*(9-5)".'
    )


# Prompt diversity ("Debunk the Myth of SFT Generalization", arXiv 2510.00237): SFT on many wordings of one task
# keeps a model from tying the task to one template. Every template states the same facts (target, rule, cards,
# the three answer fields and their format) in its own words and order; template 0 is the prompt above.

def _faces(config: PointsConfig, same: str, apart: str) -> str:
    """The face-card part of the rule: `same` under the ID rule (one value {v}), `apart` under the OOD rule
    ({j}, {q}, {k})."""
    j, q, k = (card_value(rank, config.face_cards_as_10) for rank in FACE_CARDS)
    return same.format(v=j) if config.face_cards_as_10 else apart.format(j=j, q=q, k=k)


def _and_list(items) -> str:
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _template_1(ranks, config: PointsConfig) -> str:
    hand = "Your hand is the four cards in the image." if config.vision else "Your hand: " + ", ".join(ranks) + "."
    return (
        "Answer with a single JSON object, with no text around it, of the form\n"
        '{"cards": [...], "number": [...], "formula": "..."}\n'
        'Put in "cards" the ranks of your four cards (written A, 2-10, J, Q, K), in "number" the value each card '
        'counts for, in the same order, and in "formula" an arithmetic expression such as "(3+5)*(7-4)".\n'
        f"{hand}\n"
        "Card values: A = 1, " + _faces(config, "J = Q = K = {v}", "J = {j}, Q = {q}, K = {k}")
        + ", and the cards 2 to 10 are worth the number they show.\n"
        "The expression must use each card's value once and only once, may combine the values with + - * / and "
        f"brackets, and must come to exactly {config.target}."
    )


def _template_2(ranks, config: PointsConfig) -> str:
    table = ("Four cards lie on the table, as the image shows." if config.vision
             else "Four cards lie on the table: " + json.dumps(list(ranks)) + ".")
    return (
        f"{table}\n"
        f"Your job is to reach {config.target} with them. Each card stands for one number, and you must use "
        "every one of these numbers exactly once, joined by addition, subtraction, multiplication, division "
        "and parentheses.\n"
        "What a card stands for: an ace (A) is 1, "
        + _faces(config, "a jack, queen or king (J, Q, K) is {v}",
                 "a jack (J) is {j}, a queen (Q) {q} and a king (K) {k}")
        + ", and any other card is its printed number.\n"
        'Reply with JSON only, one object holding three keys in this order: "cards" (the four ranks, as A, 2-10, '
        'J, Q or K), "number" (the number of each card, in the same order) and "formula" (your expression, '
        'e.g. "4*(5+1)").'
    )


def _template_3(ranks, config: PointsConfig) -> str:
    dealt = "see the image (four cards)" if config.vision else " ".join(ranks)
    return (
        f"Solve a round of the {config.target} points card game.\n"
        f"Cards dealt: {dealt}\n"
        "Rules:\n"
        "1. Every card has a value: A is 1, " + _faces(config, "J, Q and K are {v}", "J is {j}, Q is {q}, K is {k}")
        + "; the cards 2 to 10 have their printed value.\n"
        "2. Write a formula that uses each of the four values exactly once.\n"
        "3. Only +, -, *, / and parentheses may join the values.\n"
        f"4. The formula must evaluate to {config.target}.\n"
        "Output format (one JSON object, nothing else):\n"
        '{"cards": ["<rank>", "<rank>", "<rank>", "<rank>"], "number": [<value>, <value>, <value>, <value>], '
        '"formula": "<formula>"}\n'
        '"cards" holds the ranks as dealt (A, 2-10, J, Q, K), "number" their values in the same order and '
        '"formula" the formula, for instance "(8-2)*(1+3)".'
    )


def _template_4(ranks, config: PointsConfig) -> str:
    given = "the four cards in the image" if config.vision else "the cards " + _and_list(ranks)
    return (
        f"Question: given {given}, how can you make {config.target}?\n"
        "Counting: the ranks 2 through 10 count as printed, A counts as 1, and "
        + _faces(config, "J, Q, K count as {v} each", "J counts as {j}, Q as {q}, K as {k}") + ".\n"
        "Constraints: use the number of each card exactly once; combine the numbers with +, -, *, / and "
        "parentheses only.\n"
        'Answer as one JSON object with the fields "cards" (the four ranks: A, 2-10, J, Q, K), "number" (what '
        f'each card counts as, same order) and "formula" (an expression equal to {config.target}, like '
        '"(6-2)*(3+3)"). Write nothing but the JSON object.'
    )


def _template_5(ranks, config: PointsConfig) -> str:
    cards = "in the image" if config.vision else "[" + ", ".join(ranks) + "]"
    return (
        "Card values in this game: A=1, 2-10 = the printed number, "
        + _faces(config, "J=Q=K={v}", "J={j}, Q={q}, K={k}") + ".\n"
        f"Target: {config.target}.\n"
        f"Cards: {cards}\n"
        "Task: combine the four card values, each used exactly once, with + - * / and ( ), into a formula equal "
        "to the target.\n"
        'Output: exactly one JSON object {"cards": [...], "number": [...], "formula": "..."}, where "cards" = '
        'the ranks (A, 2-10, J, Q, K), "number" = their values in the same order, "formula" = the formula, '
        'e.g. "2*(3+9)".'
    )


def _template_6(ranks, config: PointsConfig) -> str:
    deal = ("I deal you four cards; you can see them in the image." if config.vision
            else "I deal you four cards: " + ", ".join(ranks) + ".")
    return (
        f"Let's play {config.target}. {deal}\n"
        f"Build an arithmetic expression that equals {config.target}, using the value of each of your cards one "
        "time, no more and no less. You may add, subtract, multiply and divide, and group with parentheses.\n"
        "Remember how cards are valued: A is 1; " + _faces(config, "J, Q and K are each {v}",
                                                             "J is {j}, Q is {q} and K is {k}")
        + "; every other card is worth the number on it.\n"
        'When you answer, give only a JSON object whose "cards" field lists the four ranks (A, 2-10, J, Q, K), '
        'whose "number" field lists the value of each card in that same order, and whose "formula" field is '
        'your expression, for example "(5-1)*(4+2)".'
    )


def _template_7(ranks, config: PointsConfig) -> str:
    hold = ("The cards you hold are pictured in the image." if config.vision
            else "The cards you hold: " + json.dumps(list(ranks)))
    return (
        "Respond in JSON, as one object with exactly these keys, in this order:\n"
        '- "cards": a list of the four ranks (A, 2-10, J, Q, K)\n'
        '- "number": a list of the four numbers those cards count for, in the same order\n'
        '- "formula": a string holding your formula, e.g. "(7-3)*(2+4)"\n'
        "The formula must combine all four numbers, each exactly once, using +, -, *, / and parentheses, and "
        f"equal {config.target}.\n"
        "Numbers of the cards: A counts 1, " + _faces(config, "J, Q and K count {v}", "J counts {j}, Q {q}, K {k}")
        + ", and a number card counts its printed number.\n"
        f"{hold}"
    )


def _template_8(ranks, config: PointsConfig) -> str:
    cards = "Shown in the image." if config.vision else " | ".join(ranks)
    return (
        f"## Game\n{config.target} points: turn four playing cards into the number {config.target}.\n"
        "## Card values\nA -> 1, 2..10 -> as printed, "
        + _faces(config, "J, Q, K -> {v}", "J -> {j}, Q -> {q}, K -> {k}") + "\n"
        f"## Your cards\n{cards}\n"
        "## What to do\nUse each card's value exactly once with +, -, *, / and parentheses so that the result is "
        f"{config.target}.\n"
        "## Answer format\nA single JSON object and nothing else: "
        '{"cards": [ranks A, 2-10, J, Q, K], "number": [values, same order], '
        '"formula": "your formula, e.g. (9-3)*(1+3)"}'
    )


def _template_9(ranks, config: PointsConfig) -> str:
    hold = "the four cards shown in the image" if config.vision else "the cards " + _and_list(ranks)
    return (
        f"Exercise ({config.target} points). You hold {hold}; A counts as 1, "
        + _faces(config, "J, Q and K as {v}", "J as {j}, Q as {q} and K as {k}") + ", any other card as its number.\n"
        "Write down a formula over these four numbers that uses each exactly once, uses only +, -, *, / and "
        f"parentheses, and equals {config.target}.\n"
        'Give your solution as one JSON object, nothing else: "cards" for the ranks (A, 2-10, J, Q, K), "number" '
        'for the numbers they count as, in the same order, and "formula" for the formula (e.g. "(2+2)*(3+3)"), '
        'as in {"cards": [...], "number": [...], "formula": "..."}.'
    )


_TEMPLATES = (_template_0, _template_1, _template_2, _template_3, _template_4, _template_5, _template_6,
              _template_7, _template_8, _template_9)


def retry_text(feedback: str) -> str:
    """A failed attempt's feedback as the next user turn (V-IRL's too): it asks for another answer."""
    return feedback + " Try again, answering with one JSON object in the same format."


def wrong_answer(expert: str, rng: random.Random) -> str:
    """A plausible mistake for sequential-revision SFT data: the expert answer (JSON or the official template)
    with one operator of its formula, drawn from `rng`, replaced by another one. A thought, if any, stays: the
    mistake is in the action."""
    formula = parse_answer(expert)[ACTION_FIELD]
    at = rng.choice([k for k, c in enumerate(formula) if c in "+-*/"])
    wrong = formula[:at] + rng.choice([o for o in "+-*/" if o != formula[at]]) + formula[at + 1:]
    # a formula is digits and operators, which JSON writes as they are: the same text in both formats
    return expert.replace(f'"{ACTION_FIELD}": "{formula}"', f'"{ACTION_FIELD}": "{wrong}"', 1)


# ---- chain-of-thought answers ----
# "Debunk the Myth of SFT Generalization" trains SFT on answers that reason before they act. The expert's thought
# shows what a card counts for under the active rule and the arithmetic of its formula, so that SFT data carries
# the rule itself, not only its result.

def _formula_tree(text: str):
    """A well-formed formula as nested (operator, left, right) tuples over ints, grouped as _Parser groups it:
    left to right, * and / before + and -."""
    tokens, i = _tokenize(text) + [None], 0

    def chain(operand, operators):
        nonlocal i
        node = operand()
        while tokens[i] in operators:
            op = tokens[i]
            i += 1
            node = (op, node, operand())
        return node

    def factor():
        nonlocal i
        tok = tokens[i]
        i += 1
        if tok != "(":
            return tok
        node = chain(term, ("+", "-"))
        i += 1  # past its ")", which parse_formula has made sure of
        return node

    def term():
        return chain(factor, ("*", "/"))

    return chain(term, ("+", "-"))


def _number_text(value: Fraction, operand: bool = False) -> str:
    """An exact value as the steps write it: 7, -4, 8/3; an operand that is not a natural number is bracketed,
    so that 3-(8/3) cannot be read as 3-8/3 computed anew."""
    text = str(value.numerator if value.denominator == 1 else value)
    return f"({text})" if operand and (value < 0 or value.denominator != 1) else text


def formula_steps(formula: str) -> list:
    """Each binary operation of a formula with its exact value, innermost first, left to right.
    ValueError when it is not a legal formula.
    >>> formula_steps("8/(3-8/3)")
    ['8/3=8/3', '3-(8/3)=1/3', '8/(1/3)=24']
    """
    parse_formula(formula)  # the verifier's judgement of the text: the tree below assumes a legal formula
    steps = []

    def walk(node) -> Fraction:
        if type(node) is int:
            return Fraction(node)
        op, left, right = node
        a, b = walk(left), walk(right)
        value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
        steps.append(f"{_number_text(a, True)}{op}{_number_text(b, True)}={_number_text(value)}")
        return value

    walk(_formula_tree(formula))
    return steps


def expert_thought(ranks, formula: str, config: PointsConfig) -> str:
    """The reasoning of a correct answer: each card's number under the active rule, then the formula's
    operations in order of evaluation, ending at the target. Written without double quotes and without
    'field:' patterns, so that it stays one JSON string that neither the answer parser nor the trainers'
    search for the action field can mistake for a field."""
    values = [card_value(rank, config.face_cards_as_10) for rank in ranks]
    counts = _and_list(f"{rank} counts as {value}" for rank, value in zip(ranks, values))
    return (f"The cards are {_and_list(ranks)}. Under the rule, {counts}, so the numbers are "
            f"{_and_list(map(str, values))}. To reach {config.target}, combine them as {formula}, working out the "
            f"innermost operation first: " + ", ".join(formula_steps(formula)) + f", the target {config.target}.")


# ---- rendering (GP-VL) ----
# Cards are drawn with Pillow shapes and its built-in font, so no image assets ship with the code.
# The layout follows the official table: a row of 5:7 cards, centred vertically on casino green;
# unlike it, the row is centred horizontally with a bare margin all round, so that no card is
# cut or touches the border at any size, and the ranks are sized to stay legible at 224 px.

TABLE_GREEN = (0x35, 0x65, 0x4D)  # the official table colour '#35654d'
CARD_WHITE = (250, 250, 246)
CARD_EDGE = (60, 60, 60)
SUIT_COLORS = {"spades": (20, 20, 20), "clubs": (20, 20, 20), "hearts": (200, 20, 30), "diamonds": (200, 20, 30)}
CARD_ASPECT = 1.4    # height / width, the 5:7 of the official card images
TABLE_MARGIN = 0.05  # bare table on each side, as a share of the image side
CARD_GAP = 0.03      # between neighbouring cards, as a share of the image side


def _draw_suit(draw, suit: str, cx: float, cy: float, r: float, color) -> None:
    """A suit symbol of half-height r centred on (cx, cy), drawn from circles and polygons."""
    def disc(x, y, rad):
        draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=color)

    if suit == "diamonds":
        draw.polygon([(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)], fill=color)
    elif suit == "hearts":
        disc(cx - 0.48 * r, cy - 0.35 * r, 0.52 * r)
        disc(cx + 0.48 * r, cy - 0.35 * r, 0.52 * r)
        draw.polygon([(cx - r, cy - 0.2 * r), (cx + r, cy - 0.2 * r), (cx, cy + r)], fill=color)
    elif suit == "spades":
        disc(cx - 0.48 * r, cy + 0.2 * r, 0.5 * r)
        disc(cx + 0.48 * r, cy + 0.2 * r, 0.5 * r)
        draw.polygon([(cx - 0.97 * r, cy + 0.1 * r), (cx + 0.97 * r, cy + 0.1 * r), (cx, cy - r)], fill=color)
        draw.polygon([(cx, cy + 0.2 * r), (cx - 0.35 * r, cy + r), (cx + 0.35 * r, cy + r)], fill=color)
    else:  # clubs
        disc(cx, cy - 0.45 * r, 0.42 * r)
        disc(cx - 0.48 * r, cy + 0.12 * r, 0.42 * r)
        disc(cx + 0.48 * r, cy + 0.12 * r, 0.42 * r)
        disc(cx, cy, 0.25 * r)  # fills the hole the three leaves leave between them
        draw.polygon([(cx, cy), (cx - 0.35 * r, cy + r), (cx + 0.35 * r, cy + r)], fill=color)


@functools.lru_cache(maxsize=None)  # one font per pixel size in use: a few dozen at most
def default_font(px: int):
    """Pillow's built-in font at `px` pixels (also V-IRL-VL's street signs and labels, in streetview.py)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _text(draw, xy, text: str, px: int, color, anchor: str) -> None:
    # the built-in font is thin: a stroke of the ink's own colour keeps ranks bold after the
    # supersampled image is reduced
    draw.text(xy, text, font=default_font(px), fill=color, anchor=anchor,
              stroke_width=max(0, round(px / 24)), stroke_fill=color)


def _draw_card(img, box, rank: str, suit: str) -> None:
    from PIL import Image, ImageDraw
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    color = SUIT_COLORS[suit]
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle(box, radius=w * 0.08, fill=CARD_WHITE, outline=CARD_EDGE, width=max(1, w // 60))
    # corner index, rank above a small suit, top-left upright and bottom-right upside down, drawn
    # on an opaque patch of card colour so that its anti-aliasing blends with the card; the patch
    # is wide enough for "10", the widest rank (about 1.15 times the font size, plus the stroke)
    corner = Image.new("RGB", (max(4, int(w * 0.38)), max(4, int(h * 0.32))), CARD_WHITE)
    cd = ImageDraw.Draw(corner)
    _text(cd, (corner.width / 2, 0), rank, max(6, int(w * 0.28)), color, "mt")
    _draw_suit(cd, suit, corner.width / 2, corner.height * 0.8, corner.width * 0.16, color)
    pad = max(1, int(w * 0.06))
    img.paste(corner, (x0 + pad // 2, y0 + pad))
    img.paste(corner.rotate(180), (x1 + 1 - pad // 2 - corner.width, y1 + 1 - pad - corner.height))
    cx = (x0 + x1) / 2
    if rank in FACE_RANKS:  # court cards: a framed panel with a large letter
        fx, fy = w * 0.34, h * 0.26
        draw.rectangle((x0 + fx, y0 + fy, x1 - fx, y1 - fy), outline=color, width=max(1, w // 40))
        _text(draw, (cx, y0 + h * 0.41), rank, max(6, int(w * 0.26)), color, "mm")
        _draw_suit(draw, suit, cx, y0 + h * 0.61, w * 0.09, color)
    else:
        _draw_suit(draw, suit, cx, (y0 + y1) / 2, w * 0.2, color)


SUPERSAMPLE_PX = 896  # small images are drawn at least this large, then box-reduced by a whole factor


def render_cards(cards, size: int = 448):
    """A size x size RGB image of the (rank, suit) cards side by side on a green table, each card
    inside the frame with a bare margin of TABLE_MARGIN * size all round.
    A pure function of its arguments: the same hand always gives the same pixels."""
    from PIL import Image
    # Pillow draws shapes without anti-aliasing and hints small text into blobs: drawing large and
    # reducing keeps the ranks legible at 224 px; the integer box filter leaves bare table exact
    scale = min(4, -(-SUPERSAMPLE_PX // size))
    big = size * scale
    img = Image.new("RGB", (big, big), TABLE_GREEN)
    n = len(cards)
    margin, gap = big * TABLE_MARGIN, big * CARD_GAP
    w = (big - 2 * margin - (n - 1) * gap) / n
    h = min(w * CARD_ASPECT, big - 2 * margin)
    top = int((big - h) / 2)
    for i, (rank, suit) in enumerate(cards):
        left = int(margin + i * (w + gap))
        # boxes are inclusive: the last column and row are left + w - 1 and top + h - 1
        _draw_card(img, (left, top, left + int(w) - 1, top + int(h) - 1), rank, suit)
    return img.reduce(scale) if scale > 1 else img


# ---- environment ----

@dataclass
class Observation:
    text: str                  # the user turn to show the model
    image: object = None       # PIL.Image for a new GP-VL hand, else None
    continues: bool = False    # True: append to the conversation; False: start a new one


@functools.lru_cache(maxsize=None)
def _dealable(ranks: tuple, face_cards_as_10: bool, target: int) -> bool:
    """Whether a hand (its sorted ranks) may be dealt: solvable under the rule."""
    return is_solvable([card_value(r, face_cards_as_10) for r in ranks], target)


class GeneralPointsEnv:
    """One GeneralPoints table. reset() deals a solvable hand and returns the task prompt;
    step(answer) verifies one attempt. After done, call reset() for the next hand.

    >>> env = GeneralPointsEnv(PointsConfig(), seed=0)
    >>> obs = env.reset()
    >>> obs, reward, done, info = env.step(env.expert_response())
    >>> reward, done, info["success"]
    (5.0, True, True)
    """

    def __init__(self, config: Optional[PointsConfig] = None, seed: int = 0):
        self.config = config or PointsConfig()
        self.rng = random.Random(seed)
        self.cards: list = []      # [(rank, suit)] as dealt
        self.attempt = 0
        self.done = True

    @property
    def ranks(self) -> list:
        return [rank for rank, _ in self.cards]

    @property
    def values(self) -> list:
        return [card_value(rank, self.config.face_cards_as_10) for rank, _ in self.cards]

    def deal(self) -> list:
        """Four (rank, suit) cards, each rank and suit drawn independently (as the official code
        does: the same card may come twice), the whole hand redrawn until it is solvable under the
        active rule.

        ID deal: four ranks uniform over A..K. OOD deal (`face_card_required`): three ranks uniform
        over A..K and one uniform over J, Q, K, shuffled; the official `ood=True` sampler. Holding
        "at least one face card" is not enough: rejecting face-less uniform hands instead would
        give hands with exactly one face card 68% of the time, where the official deal gives 50%."""
        cfg, suits = self.config, SUIT_SETS[self.config.suits]
        for _ in range(100_000):
            if cfg.face_card_required:
                ranks = self.rng.choices(RANKS, k=3) + [self.rng.choice(FACE_CARDS)]
                self.rng.shuffle(ranks)  # else the face card would always be the last one shown
            else:
                ranks = self.rng.choices(RANKS, k=4)
            if _dealable(tuple(sorted(ranks)), cfg.face_cards_as_10, cfg.target):
                return list(zip(ranks, self.rng.choices(suits, k=4)))
        top = max(card_value(r, cfg.face_cards_as_10) for r in RANKS) ** 4
        raise ValueError(f"target={cfg.target}: no solvable hand in 100000 deals; expected a target that four "
                         f"cards reach under this rule, such as 24 (all lie between -{top} and {top})")

    def reset(self, seed: Optional[int] = None, episode: Optional[int] = None) -> Observation:
        """Deal a new hand; `seed` restarts the dealing RNG. `episode` is ignored: the hand comes from the seed
        alone (it is there for the contract shared with V-IRL, whose evaluation picks a route by episode)."""
        if seed is not None:
            self.rng = random.Random(seed)
        self.cards, self.attempt, self.done = self.deal(), 0, False
        image = render_cards(self.cards, self.config.image_size) if self.config.vision else None
        return Observation(prompt_text(self.ranks, self.config), image, continues=False)

    def step(self, response) -> tuple:
        if self.done:
            raise RuntimeError("GeneralPointsEnv.step called on a finished episode: call reset() first")
        if self.attempt >= self.config.verify_iter:  # protocol "official": the answer after the last attempt
            reward, outcome, feedback = official_rules().step_limit()
            self.attempt, self.done = self.attempt + 1, True
            info = {"outcome": outcome, "feedback": feedback, "success": False, "attempt": self.attempt,
                    "recognized": None, "cards": self.ranks}
            return Observation(feedback, None), reward, True, info
        verdict = verify(response, self.ranks, self.config)
        self.attempt += 1
        success = verdict.outcome == "correct"
        # the official code asks for one more answer after the last failed attempt (the branch above)
        self.done = success or (self.attempt >= self.config.verify_iter and self.config.protocol != "official")
        info = {"outcome": verdict.outcome, "feedback": verdict.feedback, "success": success,
                "attempt": self.attempt, "recognized": verdict.cards_ok, "cards": self.ranks}
        alone = self.done or self.config.protocol == "official"  # the official feedback is the message alone
        obs = Observation(verdict.feedback if alone else retry_text(verdict.feedback), None,
                          continues=not self.done)
        return obs, verdict.reward, self.done, info

    def expert_response(self, reasoning: bool = False) -> str:
        """A correct answer for the current hand: the dealt ranks, their numbers, the shortest formula, as JSON;
        under protocol "official" in the official template, with a formula that float arithmetic finds correct
        and "=<target>" after it, as the official prompt's example writes it.
        `reasoning`: a "thought" field first, the chain of thought of `expert_thought`, in the same answer."""
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
        prompt = env.reset().text
    except ValueError as e:
        fail(str(e))

    print("---- GP-L prompt ----")
    print(prompt)
    print("---- expert answer ----")
    print(env.expert_response())
    vl = GeneralPointsEnv(PointsConfig(**{**cfg.__dict__, "vision": True}), seed=args.seed)
    obs = vl.reset()
    try:
        obs.image.save(args.image)
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
