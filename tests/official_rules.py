"""The reward rules of the paper's official code, re-stated from its source for a differential test.

Source: LeslieTrue/SFTvsRL at commit 5a6ea55. Each function below names the lines it re-states:
  rl  = utils_rl.py                              (step_rewards, step_rewards_virl, StepResult, aggregate_fn)
  gen = utils_general.py                         (RE_PATTERN_DICT, re_match, robust_str_to_list)
  gp  = gym/gym_cards/envs/general_points_oneline.py  (solve, step, _generate_cards)
  nav = gym/gym_virl/envs/navigation_environment.py   (step)

Why a re-statement and not the project's code: tests/test_official_rules.py compares the project's
protocol="official" verifiers with this module on thousands of answers; the two were written apart, from the
official source, so that a shared misreading is unlikely. Nothing here is the official code itself: the field
reader scans strings instead of running the official regexes, the formula evaluator is a small parser instead of
eval(), and the solver fills bracket templates instead of inserting brackets into a token list.

Where the official code would raise an uncaught exception, these functions raise OfficialCrash instead.
"""

import json
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from itertools import permutations, product

GP_TARGET = 24
MISSING = "None"  # gen:195-196: what re_match returns when neither JSON nor the regex finds the field

# rl:15-22 and rl:202-207, by the names the feedback below uses
GP_CORRECT, GP_PARTIAL, GP_NO_SOLUTION, GP_WRONG_CARDS, GP_BAD_NUMBER, GP_ILLEGAL = 5, 1, -1, -1.5, -2, -3
VIRL_CORRECT, VIRL_WRONG_ACTION, VIRL_WRONG_OBS = 1, -1, -1.5

# rl:215-221: a plain (not .format-ed) triple-quoted string, so its doubled braces stay doubled
VIRL_FORMAT_TOKEN = ('\n[Output]\n{{\n'
                     '  "current observation": latest observation from the streetview grid,\n'
                     '  "current instruction": analyze the full instruction and identify the sentence to be executed,\n'
                     '  "action": the action to be taken chosen from the action space,\n'
                     '}}')


def _retry(what):
    """rl:227, rl:230, rl:232: the request to try again that follows each failure reason (concatenated, never
    formatted, so the braces of the format token stay doubled)."""
    return f" Please avoid this {what} and try again in the same format:" + VIRL_FORMAT_TOKEN


# Python's tokenizer refuses more than this many open brackets at once ("too many nested parentheses");
# the official eval() inherits the limit (CPython tokenizer MAXLEVEL), so a deeper formula fails to evaluate
PY_MAX_PAREN_DEPTH = 200


class OfficialCrash(Exception):
    """The official code would raise an uncaught exception here and stop the run."""


# ---------------------------------------------------------------- reading the answer's fields


def whole_text_json(text, key):
    """gen:180-182: the whole answer parsed as JSON, then [key]. Returns (True, value) with the value as JSON typed
    it, or (False, None) when the parse fails, the top level is not an object, or the key is absent (every such
    failure lands in the bare except of gen:183). Duplicate keys: Python's json keeps the last one."""
    try:
        parsed = json.loads(text)
    except Exception:  # the bare except of gen:183 takes every failure, also a >4300-digit number's ValueError
        return False, None
    if isinstance(parsed, dict) and key in parsed:
        return True, parsed[key]
    return False, None


def _occurrences(text, opener):
    """Every start of `opener` in text, overlapping ones included, in order (re.search tries each start)."""
    at = text.find(opener)
    while at != -1:
        yield at
        at = text.find(opener, at + 1)


def quoted_value(text, key):
    """gen:172-175 with gen:185-186: the regex '"KEY": "(.*?)"' through re.search. The first place where the
    exact key text is followed by the shortest run without a newline up to a double quote; None if none."""
    opener = f'"{key}": "'
    for at in _occurrences(text, opener):
        begin = at + len(opener)
        end = text.find('"', begin)
        if end != -1 and "\n" not in text[begin:end]:  # '.' skips only "\n", and the run must close on this line
            return text[begin:end]
    return None


def bracketed_value(text, key):
    """gen:168-169 with gen:185-186: the regex '"KEY": \\[([^\\]]+)\\]'. The first place where the exact key text and
    '[' are followed by at least one character before the next ']' (newlines allowed); its inside, or None."""
    opener = f'"{key}": ['
    for at in _occurrences(text, opener):
        begin = at + len(opener)
        end = text.find("]", begin)
        if end > begin:  # an empty "[]" fails here, and re.search moves on
            return text[begin:end]
    return None


def read_field(text, key):
    """gen:178-198 (re_match). Strict JSON of the whole text first; else the regex of RE_PATTERN_DICT; for the
    "cards" key the regex result is an int list when every ', '-separated piece is an int, else the inside put
    back in brackets (gen:189-193); "None" (a string) when nothing matched."""
    found, value = whole_text_json(text, key)
    if found:
        return value
    if key in ("cards", "number"):
        inside = bracketed_value(text, key)
        if inside is None:
            return MISSING
        if key == "cards":  # gen:189: only a key containing 'cards' gets the int conversion
            try:
                return [int(piece) for piece in inside.split(", ")]
            except ValueError:  # int() of a str raises nothing else; a >4300-digit piece also lands here
                return "[" + inside + "]"
        return inside
    value = quoted_value(text, key)
    return MISSING if value is None else value


def four_items(value):
    """gen:200-206 (robust_str_to_list): only a string works; drop '[', ']', the single quote and the plain
    space, split on ',', and keep the pieces only if there are exactly four. Anything else gives []."""
    if not isinstance(value, str):  # .replace on a list, int or None raises inside the try: []
        return []
    for dropped in "[]' ":
        value = value.replace(dropped, "")
    pieces = value.split(",")
    return pieces if len(pieces) == 4 else []


def formula_before_equals(value):
    """gp:199-202: a string is cut at its first '='; any other value passes unchanged (the split fails silently)."""
    return value.split("=")[0] if isinstance(value, str) else value


# ---------------------------------------------------------------- the official solver


# gp:122-126: no brackets and the six bracketings the solver inserts, written out as templates over
# number, operator, number, operator, number, operator, number
SOLVER_LAYOUTS = (
    "{}{}{}{}{}{}{}",      # a.b.c.d
    "({}{}{}){}{}{}{}",    # (a.b).c.d
    "({}{}{}{}{}){}{}",    # (a.b.c).d
    "{}{}({}{}{}){}{}",    # a.(b.c).d
    "{}{}({}{}{}{}{})",    # a.(b.c.d)
    "{}{}{}{}({}{}{})",    # a.b.(c.d)
    "({}{}{}){}({}{}{})",  # (a.b).(c.d)
)


def _layout_function(layout, ops):
    """One layout with one operator triple as a Python function of the four numbers, compiled once; Python's
    own precedence is what the official eval() of the template text applies."""
    body = layout.format("a", ops[0], "b", ops[1], "c", ops[2], "d")
    return eval(f"lambda a, b, c, d: {body}")  # noqa: S307 -- built here from fixed characters only


_COMPILED = [(layout, ops, _layout_function(layout, ops))
             for ops in product("+-*/", repeat=3) for layout in SOLVER_LAYOUTS]


@lru_cache(maxsize=None)
def _solutions_of_multiset(values, target):
    found = set()
    for perm in set(permutations(values)):
        exact = [Fraction(v) for v in perm]
        for layout, ops, fn in _COMPILED:
            try:
                near = abs(fn(*map(float, perm)) - target) < 1e-6  # a cheap filter; exactness is decided below
            except ZeroDivisionError:
                near = True  # let the exact pass decide whether the division is really by zero
            if not near:
                continue
            try:
                hit = fn(*exact) == target
            except ZeroDivisionError:  # gp:142-143 skips these
                continue
            if hit:
                found.add(layout.format(perm[0], ops[0], perm[1], ops[1], perm[2], ops[2], perm[3]))
    return frozenset(found)


def official_solutions(values, target=GP_TARGET):
    """gp:105-153 (solve): every distinct ordering of the four numbers, all 64 operator triples and the 7 layouts
    above, evaluated exactly (the official code wraps numbers in Fraction when a '/' is present, ints otherwise:
    exact either way), kept when the value equals the target, written without spaces. The set of strings."""
    return _solutions_of_multiset(tuple(sorted(values)), target)


@lru_cache(maxsize=None)
def _solution_prefixes(values, target):
    return frozenset(sol[:i] for sol in _solutions_of_multiset(values, target) for i in range(len(sol) + 1))


def starts_some_solution(text, values, target=GP_TARGET):
    """rl:143 and rl:156: whether any solution string starts with `text`."""
    return text in _solution_prefixes(tuple(sorted(values)), target)


# ---------------------------------------------------------------- scoring one formula


_SYMBOLS = "+-*/()"


def formula_tokens(formula):
    """rl:74-77: the tokens of r'\\d+|[+\\-*/()]' (runs of Unicode decimal digits, which is what \\d means for a str
    pattern, and single operators or brackets), or None when some character is neither: then the joined tokens
    differ from the formula and the official code reports illegal characters."""
    tokens, run = [], ""
    for ch in formula:
        if ch.isdecimal():
            run += ch
            continue
        if run:
            tokens.append(run)
            run = ""
        if ch not in _SYMBOLS:
            return None
        tokens.append(ch)
    if run:
        tokens.append(run)
    return tokens


def _kind(token):
    if token[0].isdecimal():
        return "number"
    return {"(": "open", ")": "close"}.get(token, "operator")


def sequence_complaints(tokens):
    """rl:81-115: one left-to-right pass over the tokens; each misplaced token adds one complaint (and -3), and
    the pass goes on. A number or '(' must start the formula or follow an operator or '('; an operator and ')'
    must follow a number or ')'; a ')' with no open '(' left is unmatched. A misplaced '(' is not counted open.
    Unclosed brackets at the end, a trailing operator and an empty formula are not complaints."""
    complaints, previous, depth = [], None, 0
    for token in tokens:
        kind = _kind(token)
        after_operand = previous in ("number", "close")
        if kind == "number" and after_operand:
            complaints.append("invalid sequence after number")
        elif kind == "operator" and not after_operand:
            complaints.append("invalid sequence after operator")
        elif kind == "open":
            if after_operand:
                complaints.append("invalid sequence before '('")
            else:
                depth += 1
        elif kind == "close":
            if not after_operand:
                complaints.append("invalid sequence after ')'")
            elif depth:
                depth -= 1
            else:
                complaints.append("unmatched closing parenthesis")
        previous = kind
    return complaints


def _distinct_in_order(items):
    return list(dict.fromkeys(items))


def number_complaints(tokens, values):
    """rl:117-134: the int value of every number in the formula against the hand's numbers. One complaint for
    numbers not in the hand, or else for numbers used more often than held; and, independently, one for hand
    numbers used less often than held. Lists are Python reprs of the distinct offenders: in order of first use in
    the formula, and in hand order for the unused ones. int() of a number over Python's 4300-digit limit raises
    ValueError uncaught (rl:119): OfficialCrash."""
    try:
        used = [int(token) for token in tokens if _kind(token) == "number"]
    except ValueError as exc:
        raise OfficialCrash(f"rl:119 int() of a formula number: {exc}") from None
    held, count = Counter(values), Counter(used)
    complaints = []
    invalid = [v for v in _distinct_in_order(used) if v not in held]
    overused = [v for v in _distinct_in_order(used) if count[v] > held[v]]
    if invalid:
        complaints.append(f"you used invalid numbers: {invalid}")
    elif overused:
        complaints.append(f"you used numbers: {overused} too many times")
    unused = [v for v in _distinct_in_order(values) if count[v] < held[v]]
    if unused:
        complaints.append(f"you didn't use numbers: {unused}")
    return complaints


class _NoValue(Exception):
    """The formula text is not a Python expression that evaluates (SyntaxError or ZeroDivisionError in eval)."""


_BINDING = {"+": 1, "-": 1, "*": 2, "/": 2}


def _apply(op, left, right):
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0:  # eval() raises ZeroDivisionError
        raise _NoValue("division by zero")
    return left / right


def _literal(token):
    """A Python int literal: ASCII digits only, and no leading zero unless it is all zeros ("00" reads as 0)."""
    if not (token.isascii() and token.isdigit()) or (token[0] == "0" and token.strip("0")):
        raise _NoValue(f"eval() does not read {token!r}")
    return int(token)


def python_value(tokens):
    """rl:139: the value Python's eval() gives the formula text, computed by operator precedence over the tokens
    (a stack-based pass, no recursion) with Python's own int and float operations, so the same operands combine in
    the same groups: left-associative, '*' and '/' before '+' and '-', '/' the true division to float.
    _NoValue where eval raises: more than 200 open brackets at once, a number eval does not read (a leading zero
    such as 01, a non-ASCII digit), a missing operand (empty formula, trailing operator), an unclosed '(', or a
    division by zero. Which of these fires first does not matter: every exception takes the same branch."""
    depth = 0
    for token in tokens:
        depth += (token == "(") - (token == ")")
        if depth > PY_MAX_PAREN_DEPTH:
            raise _NoValue("too many nested parentheses")
    operands, pending = [], []

    def combine():
        op, right = pending.pop(), operands.pop()
        operands.append(_apply(op, operands.pop(), right))

    want_operand = True
    for token in tokens:
        kind = _kind(token)
        if want_operand and kind == "number":
            operands.append(_literal(token))
            want_operand = False
        elif want_operand and kind == "open":
            pending.append(token)
        elif not want_operand and kind == "operator":
            while pending and pending[-1] != "(" and _BINDING[pending[-1]] >= _BINDING[token]:
                combine()
            pending.append(token)
            want_operand = True
        elif not want_operand and kind == "close":
            while pending and pending[-1] != "(":
                combine()
            if not pending:
                raise _NoValue("unmatched ')'")
            pending.pop()
        else:
            raise _NoValue(f"{token!r} out of place")
    if want_operand:
        raise _NoValue("an operand is missing at the end")
    while pending:
        if pending[-1] == "(":
            raise _NoValue("unclosed '('")
        combine()
    return operands[0]


def closest_prefix_complaint(tokens, values, target):
    """rl:150-163: grow the formula one token at a time; at the first growth that no solution string starts
    with, one -1 complaint naming what came before it (or "your formula does not match any solution" when the
    first token already fails); none when every growth starts a solution."""
    grown = ""
    for token in tokens:
        before, grown = grown, grown + token
        if not starts_some_solution(grown, values, target):
            if not before:
                return "your formula does not match any solution"
            return f"{before} is partially correct but the full formula does not match any solution"
    return None


def joined(messages):
    """rl:24-27 (aggregate_fn, through StepResult.__iter__ at rl:34-35): ', '-joined with a final period."""
    return ", ".join(messages) + "."


def score_formula(formula, values, target=GP_TARGET):
    """rl:60-165 for one formula string (the card check, rl:52-58, is in gp_official). Returns (reward, message)."""
    tokens = formula_tokens(formula)
    if tokens is None:  # rl:77-80: returns at once, nothing else counted
        return GP_ILLEGAL, joined(["illegal characters"])
    complaints = sequence_complaints(tokens)
    reward = GP_ILLEGAL * len(complaints)
    numbers = number_complaints(tokens, values)
    reward += GP_BAD_NUMBER * len(numbers)
    complaints += numbers
    if reward != 0:  # rl:146-147: syntax and number penalties add up and end the scoring
        return reward, joined(complaints)
    try:
        value = python_value(tokens)
    except _NoValue:  # rl:142-145: a formula that does not evaluate but starts a solution
        if starts_some_solution(formula, values, target):
            return GP_PARTIAL, joined(["partial solution"])
    else:
        if value == target:  # rl:139-141: exact equality, so a float that misses 24 by rounding fails
            return GP_CORRECT, joined(["Correct solution"])
    complaint = closest_prefix_complaint(tokens, values, target)
    if complaint is None:  # rl:165: every prefix matches, nothing added: 0 with the bare "."
        return 0, joined([])
    return GP_NO_SOLUTION, joined([complaint])


def gp_official(text, values, ranks, vision, target=GP_TARGET):
    """gp:188-217 (step, from the answer text on) with rl:41-165 (step_rewards): the official reward and the
    "Verify Info" message for one GeneralPoints answer. `values` are the card numbers under the active rule
    (gp:240-241), `ranks` the plain rank strings with '10' for ten (gp:238-239). GP-VL (vision) first compares the
    "cards" field with the ranks (rl:52-58); its failure message has no period, being a bare tuple. The "number"
    field never matters: it is read and sorted but never compared (rl:55). A formula that is not a string after
    the '=' cut (strict JSON: a number, null, a list ...) reaches re.findall (rl:74) and crashes: OfficialCrash."""
    formula = formula_before_equals(read_field(text, "formula"))
    if vision and sorted(four_items(read_field(text, "cards"))) != sorted(ranks):
        return GP_WRONG_CARDS, "you recognized wrong cards"
    if not isinstance(formula, str):
        raise OfficialCrash(f"rl:74 re.findall on a {type(formula).__name__} formula")
    return score_formula(formula, list(values), target)


# ---------------------------------------------------------------- V-IRL


def claims_intersection(observation):
    """rl:226 and rl:229: `'intersection' in output_obs`, Python's `in`: a substring test for a string (case
    sensitive, negation ignored), an element test for a list, a key test for a dict; for None, a number or a
    bool it raises TypeError uncaught: OfficialCrash."""
    if isinstance(observation, (str, list, dict)):
        return "intersection" in observation
    raise OfficialCrash(f"rl:226 'intersection' in a {type(observation).__name__} observation")


def virl_official(text, gt_action, gt_obs):
    """rl:209-234 (step_rewards_virl), as nav:267-270 calls it: the official reward and "Verify Info" message for
    one V-IRL answer. `gt_obs` is the rail's landmark text, never the intersection cue shown to the model.
    The action must equal the ground truth string exactly (+1). Otherwise the observation field decides between
    the two -1.5 messages (a claimed intersection where the landmark text has none, or the reverse) and -1."""
    action = read_field(text, "action")
    observation = read_field(text, "current observation")
    if action == gt_action:  # rl:222: plain equality, no trimming or case folding
        return VIRL_CORRECT, joined(["Correct action"])
    claimed, real = claims_intersection(observation), "intersection" in gt_obs
    if claimed and not real:
        return VIRL_WRONG_OBS, joined(["you are not at any intersection." + _retry("observation")])
    if real and not claimed:
        return VIRL_WRONG_OBS, joined(["you are at an intersection." + _retry("observation")])
    return VIRL_WRONG_ACTION, joined(["you make incorrect action." + _retry("action")])
