"""The official code's rules, restated: how the paper's code (github LeslieTrue/SFTvsRL at 5a6ea55) reads, scores
and prompts GeneralPoints and V-IRL answers, for the environments' protocol "official" (docs/fidelity.md).

    utils_general.py re_match, robust_str_to_list      -> field, card_list
    general_points_oneline.py solve                      -> solutions
    utils_rl.py step_rewards                             -> gp_verify
    utils_rl.py step_rewards_virl                        -> virl_verify
    prompt_lib/prompts.py Q_GeneralPoint_EQN_*, Q_VIRL_* -> gp_prompt, virl_prompt
    prompt_lib/prompts.py ResponseEqn, ResponseVIRL      -> answer

Each field is read from the whole text as JSON, else from a regex that wants `"key": ` with one space. A
GeneralPoints formula loses everything from its first "="; any character besides digits and + - * / ( ) is
illegal (-3, nothing else checked); otherwise every bad token order costs -3 and every number error -2, added up;
a clean formula is evaluated in floats, +5 at exactly the target; one that does not evaluate but begins one of the
official solver's strings scores +1 ("partial solution"); else -1 at the first token where no solution string
begins that way, or 0 when every prefix begins one (an official solution whose float value misses). A V-IRL
action is right only as the expected action's exact text; otherwise -1.5 when the word "intersection" is in the
answer's observation but not in the position's landmark text (which never holds the intersection cue), or the
other way round, else -1. Where the official code crashes (a non-string formula or a null observation from strict
JSON, an int of over 4300 digits), the nearest outcome is given instead.

No import of the project: the environments import this file only under protocol "official".
"""
from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from fractions import Fraction
from functools import lru_cache

REWARDS = {"correct": 5.0, "partial_solution": 1.0, "float_miss": 0.0, "wrong_value": -1.0, "wrong_cards": -1.5,
           "wrong_numbers": -2.0, "illegal_formula": -3.0, "step_limit": -1.0}
FAILED = "You failed this trial because "  # the official trainer's and evaluator's user turn after a failure
_FIELD_RE = {"formula": re.compile(r'"formula": "(.*?)"'), "cards": re.compile(r'"cards": \[([^\]]+)\]'),
             "action": re.compile(r'"action": "(.*?)"'),
             "current observation": re.compile(r'"current observation": "(.*?)"')}
_TOKEN_RE = re.compile(r"\d+|[+\-*/()]")  # \d as the official one: any Unicode digit


# ---- reading an answer ----

def field(text: str, key: str):
    """The official `re_match`: the key's value when the whole text is a JSON object that has it (typed as JSON
    types it), else the first match of the key's pattern (for "cards": a list of ints when every ', '-separated
    item is one, else the bracketed text), else the string "None"."""
    try:
        return json.loads(text)[key]
    except Exception:  # the official code catches everything here: not JSON, not an object, no such key
        pass
    m = _FIELD_RE[key].search(text)
    if m is None:
        return "None"
    if key != "cards":
        return m.group(1)
    try:
        return [int(item) for item in m.group(1).split(", ")]
    except ValueError:
        return "[" + m.group(1) + "]"


def card_list(value) -> list:
    """The official `robust_str_to_list`: a string with its brackets, single quotes and spaces removed, split at
    commas, when that gives exactly four items; [] otherwise (a JSON list included: it is no string)."""
    if not isinstance(value, str):
        return []
    items = value.replace("[", "").replace("]", "").replace("'", "").replace(" ", "").split(",")
    return items if len(items) == 4 else []


def answer(fields: dict) -> str:
    """An answer in the official template (`ResponseEqn`, `ResponseVIRL`): one `"key": value,` line per field, a
    trailing comma, strings in double quotes and lists as Python prints them, which is not JSON: the official
    parser reads it with its field patterns."""
    lines = [f'  "{k}": ' + (f'"{v}"' if isinstance(v, str) else repr(v)) + "," for k, v in fields.items()]
    return "\n{\n" + "\n".join(lines) + "\n}"


# ---- GeneralPoints ----

def _apply(op: str, a, b):
    if op == "/":
        return None if b is None or b == 0 or a is None else a / b
    if a is None or b is None:
        return None
    return a + b if op == "+" else a - b if op == "-" else a * b


# the official solver's seven bracket layouts of a op b op c op d: (text, exact value)
_LAYOUTS = (("{a}{x}{b}{y}{c}{z}{d}", lambda a, b, c, d, x, y, z: _chain([a, b, c, d], [x, y, z])),
            ("({a}{x}{b}){y}{c}{z}{d}", lambda a, b, c, d, x, y, z: _chain([_apply(x, a, b), c, d], [y, z])),
            ("({a}{x}{b}{y}{c}){z}{d}", lambda a, b, c, d, x, y, z: _apply(z, _chain([a, b, c], [x, y]), d)),
            ("{a}{x}({b}{y}{c}){z}{d}", lambda a, b, c, d, x, y, z: _chain([a, _apply(y, b, c), d], [x, z])),
            ("{a}{x}({b}{y}{c}{z}{d})", lambda a, b, c, d, x, y, z: _apply(x, a, _chain([b, c, d], [y, z]))),
            ("{a}{x}{b}{y}({c}{z}{d})", lambda a, b, c, d, x, y, z: _chain([a, b, _apply(z, c, d)], [x, y])),
            ("({a}{x}{b}){y}({c}{z}{d})", lambda a, b, c, d, x, y, z: _apply(y, _apply(x, a, b), _apply(z, c, d))))


def _chain(values: list, ops: list):
    """An unbracketed run of values and operators, * and / before + and -, left to right; None on a division by
    zero (or a None operand)."""
    values, ops = list(values), list(ops)
    for prec in ("*/", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] in prec:
                values[i:i + 2] = [_apply(ops.pop(i), values[i], values[i + 1])]
            else:
                i += 1
    return values[0]


@lru_cache(maxsize=4096)
def solutions(values: tuple, target: int = 24) -> frozenset:
    """Every string the official solver lists for a hand: the numbers in every order, every three operators, the
    seven bracket layouts, no spaces, kept when the exact value is the target."""
    out = set()
    for a, b, c, d in set(itertools.permutations(values)):
        exact = [Fraction(v) for v in (a, b, c, d)]
        for x, y, z in itertools.product("+-*/", repeat=3):
            for text, value in _LAYOUTS:
                if value(*exact, x, y, z) == target:
                    out.add(text.format(a=a, b=b, c=c, d=d, x=x, y=y, z=z))
    return frozenset(out)


def _syntax(tokens: list) -> list:
    """The official token-order scan: one "-3" message per bad step, the scan going on after each. It never
    flags a "(" left open, an operator at the end or an empty formula."""
    messages, prev, depth = [], None, 0
    for tok in tokens:
        kind = "operator" if tok in "+-*/" else "open" if tok == "(" else "close" if tok == ")" else "number"
        if kind == "number" and prev not in (None, "operator", "open"):
            messages.append("invalid sequence after number")
        elif kind == "operator" and prev not in ("number", "close"):
            messages.append("invalid sequence after operator")
        elif kind == "open":
            if prev in (None, "operator", "open"):
                depth += 1
            else:
                messages.append("invalid sequence before '('")
        elif kind == "close":
            if prev not in ("number", "close"):
                messages.append("invalid sequence after ')'")
            elif depth:
                depth -= 1
            else:
                messages.append("unmatched closing parenthesis")
        prev = kind
    return messages


def _numbers(formula: str, values: list) -> list:
    """The official number check's messages ("-2" each): numbers not on any card, else numbers used too often;
    and, apart, card numbers not used up. Lists in order of first appearance, as Python prints them."""
    used, have = Counter(int(n) for n in re.findall(r"\d+", formula)), Counter(values)
    invalid = [n for n in used if n not in have]
    overused = [n for n in used if used[n] > have[n]]
    unused = [n for n in have if have[n] > used[n]]
    return ([f"you used invalid numbers: {invalid}"] if invalid else
            [f"you used numbers: {overused} too many times"] if overused else []) + \
           ([f"you didn't use numbers: {unused}"] if unused else [])


def _verdict(outcome: str, reward: float, messages: list, cards_ok, formula=None) -> tuple:
    message = ", ".join(messages) + "."
    return outcome, reward, (message if outcome == "correct" else FAILED + message), cards_ok, formula


def gp_verify(text, ranks: list, values: list, vision: bool, target: int = 24) -> tuple:
    """One GeneralPoints answer scored as the official code scores it: (outcome, reward, feedback, cards_ok,
    formula), an env_points.Verdict's fields. `values` are the cards' numbers under the rule. The feedback is the
    official message after FAILED (a +1 or 0 answer fails too)."""
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
    cards_ok = None
    if vision:
        if sorted(card_list(field(text, "cards"))) != sorted(ranks):
            # the official vision failure is a bare tuple: its message has no final period
            return "wrong_cards", REWARDS["wrong_cards"], FAILED + "you recognized wrong cards", False, None
        cards_ok = True
    formula = field(text, "formula")
    if not isinstance(formula, str):  # officially re.findall raises on it: the run stops
        return _verdict("illegal_formula", -3.0, ["illegal characters"], cards_ok)
    formula = formula.split("=")[0]
    tokens = _TOKEN_RE.findall(formula)
    if "".join(tokens) != formula:
        return _verdict("illegal_formula", -3.0, ["illegal characters"], cards_ok, formula)
    syntax = _syntax(tokens)
    try:
        numbers = _numbers(formula, values)
    except ValueError:  # int() of a number over 4300 digits: the official code crashes
        return _verdict("illegal_formula", -3.0, ["illegal characters"], cards_ok, formula)
    if syntax or numbers:
        return _verdict("illegal_formula" if syntax else "wrong_numbers", -3.0 * len(syntax) - 2.0 * len(numbers),
                        syntax + numbers, cards_ok, formula)
    found = solutions(tuple(values), target)
    try:  # only digits and + - * / ( ) are left: Python's own float arithmetic, as the official code's eval
        if eval(formula, {"__builtins__": {}}, {}) == target:
            return _verdict("correct", 5.0, ["Correct solution"], cards_ok, formula)
    except Exception:  # unbalanced, a division by zero, a leading zero: a beginning of a solution scores +1
        if any(s.startswith(formula) for s in found):
            return _verdict("partial_solution", 1.0, ["partial solution"], cards_ok, formula)
    register = ""
    for tok in tokens:
        prefix, register = register, register + tok
        if not any(s.startswith(register) for s in found):
            reason = (f"{prefix} is partially correct but the full formula does not match any solution" if prefix
                      else "your formula does not match any solution")
            return _verdict("wrong_value", -1.0, [reason], cards_ok, formula)
    return _verdict("float_miss", 0.0, [], cards_ok, formula)


def gp_formula(candidates: list, target: int = 24) -> str:
    """Of correct formulas, the first that float arithmetic also finds correct (the official scorer's test), or
    the first of all for the one hand that has none (3, 3, 8, 8)."""
    return next((f for f in candidates if eval(f, {"__builtins__": {}}, {}) == target), candidates[0])


def gp_prompt(ranks: list, faces: tuple, vision: bool, target: int = 24) -> str:
    """The official prompt (`Q_GeneralPoint_EQN_L` / `_VL`, as the paper's appendix prints it), its quirks kept:
    the rule's sentence ends in a period inside the sentence, the formula's placeholder is single-quoted (an answer
    that copies it scores -3), and A = 1 is never said. `faces`: what J, Q, K count for."""
    rule = ("'J', 'Q', and 'K' count as '10'." if faces == (10, 10, 10)
            else "'J', 'Q', and 'K' count as '{}', '{}', and '{}' respectively.".format(*faces))
    seen = "You are observing these four cards in the image." if vision else "You will receive a set of 4 cards."
    task = (f"\n[Task Description]\nYou are an expert {target} points card game player. {seen}\n"
            f"Note that {rule}, and each card must be used once.\n"
            f"Your goal is to output a formula that evaluates to {target} using numbers from the cards and "
            "operators such as '+', '-', '*', '/', '(', ')', and '='.\n\n")
    shown = "" if vision else f"[Input]\nCards: {list(ranks)}\n\n"
    intro = "Your response should be a valid json file in the following format:\n" if vision else ""
    return (task + shown + "[Output]\n" + intro + f'{{\n  "cards": [x, y, z, w], where {rule},\n'
            '  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,\n'
            f"  \"formula\": 'an equation that equals {target}',\n}}\n\n")


# ---- V-IRL ----

# the official feedback repeats the answer template, its braces doubled (never .format-ed)
VIRL_FORMAT = ('\n[Output]\n{{\n  "current observation": latest observation from the streetview grid,\n'
               '  "current instruction": analyze the full instruction and identify the sentence to be executed,\n'
               '  "action": the action to be taken chosen from the action space,\n}}')
_VIRL_MESSAGES = {
    "not_there": "you are not at any intersection. Please avoid this observation and try again in the same format:",
    "missed": "you are at an intersection. Please avoid this observation and try again in the same format:",
    "wrong": "you make incorrect action. Please avoid this action and try again in the same format:"}
VIRL_ACTION_SPACE = ('"forward()": indicates moving forward one step\n'
                     '"turn_direction(x)": indicates adjust the ego agent direction towards x direction. x could be '
                     'any following {}\n"stop()": indicates the navigation is finished.')


def _mentions(value, word: str) -> bool:
    """Python's `word in value`, as the official check runs it: a substring of a string, an item of a list, a
    key of an object; for a number, null or true/false the official code crashes, here: no mention."""
    try:
        return word in value
    except TypeError:
        return False


def virl_verify(text, truth: str, landmarks: str, actions: tuple) -> tuple:
    """One V-IRL answer scored as the official code scores it: (outcome, reward, feedback, the answer's
    observation as read). `truth`: the expected action's text; `landmarks`: the position's landmark text; `actions`:
    the action space as exact strings (an answer outside it is an invalid_action, -1 as a wrong one)."""
    text = str(text)
    action, said = field(text, "action"), field(text, "current observation")
    if action == truth:
        return "correct", 1.0, "Correct action.", said
    claimed, real = _mentions(said, "intersection"), "intersection" in landmarks
    kind = "not_there" if claimed and not real else "missed" if real and not claimed else "wrong"
    outcome = "wrong_observation" if kind != "wrong" else "wrong_action" if action in actions else "invalid_action"
    return outcome, (-1.5 if kind != "wrong" else -1.0), f"{FAILED}{_VIRL_MESSAGES[kind]}{VIRL_FORMAT}.", said


def virl_prompt(steps: list, history: list, current: str, choices: str, vision: bool) -> str:
    """The official prompt (`Q_VIRL_L` / `Q_VIRL_VL`, as the paper's appendix prints it): the numbered
    instructions, the action space (`choices`: its list of directions), the observations and actions so far ending
    in an empty A_n, and the answer template, its typos kept."""
    seq = "".join(f"O_{i + 1}: {o}\nA_{i + 1}: {a}\n" for i, (o, a) in enumerate(history))
    seq += f"O_{len(history) + 1}: {current}\nA_{len(history) + 1}: \n"
    view = ("[Observation format]\nYou observe a 2x2 grid of streetview images with the following headings:\n"
            "[front, right\n back, left]\nYou need to identify if any of the landmarks in the instruction are visible "
            "in the street view grid.\n\n" if vision else "")
    latest = "the street view grid" if vision else "the observation sequence"
    return ("\n[Task Description]\nYou are an expert in navigation. You will receive a sequence of instructions to "
            f"follow{' while observing your surrounding stree tviews' if vision else ''}. You\nare also provided "
            "with your observation and action history in text. Your goal is to first analyze the instruction and "
            "identify the next sentence to be executed. \nThen, you need to provide the action to be taken based on "
            "the current observation and instruction.\n\n"
            "[Instruction]\n" + "".join(f"{i + 1}. {s}\n" for i, s in enumerate(steps)) + "\n\n" + view +
            "[Action space]\n" + VIRL_ACTION_SPACE.format(choices) + "\n\n"
            "[Observations and actions sequence]\n" + seq + "\n\n"
            f'[Output]\n{{\n  "current observation": latest observation from {latest},\n'
            '  "current instruction": analyze the full instruction and identify the sentence to be executed,\n'
            '  "action": the action to be taken chosen from the action space,\n}\n')


# ---- both ----

def step_limit() -> tuple:
    """The official environments' step after the last failed attempt: the answer is not read, it scores -1 and
    the episode ends (truncated, in the official code's terms). -> (reward, outcome, feedback)"""
    return REWARDS["step_limit"], "step_limit", "step_limit_reached"
