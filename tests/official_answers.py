"""Deterministic answer texts for tests/test_official_rules.py: the good, the sloppy and the hostile.

Every generator takes a seeded random.Random and returns [(kind, text)], the kind naming what the text tries,
so that a disagreement in the test can be traced to its family. Nothing here scores anything; the texts are
chosen to walk the official scorers' branches (tests/official_rules.py names them): the strict-JSON path and
the regex fallback of the field reader, each check of the formula scorer, the card check of GP-VL, and the
action and intersection-claim tests of V-IRL.
"""

import json
from fractions import Fraction
from itertools import permutations, product

from official_rules import official_solutions

# ---------------------------------------------------------------- GeneralPoints: formulas

# All five binary-tree shapes over four numbers, with their needed brackets and some redundant ones: the
# official solver only writes 7 bracketings, so a correct formula outside them still evaluates to 24 but is
# not a solution string (it matters for the partial-solution and prefix messages).
ANY_LAYOUTS = (
    "{}{}{}{}{}{}{}", "({}{}{}){}{}{}{}", "({}{}{}{}{}){}{}", "{}{}({}{}{}){}{}", "{}{}({}{}{}{}{})",
    "{}{}{}{}({}{}{})", "({}{}{}){}({}{}{})", "(({}{}{}){}{}){}{}", "{}{}({}{}({}{}{}))", "({}{}({}{}{})){}{}",
    "{}{}(({}{}{}){}{})", "(({}{}{}){}({}{}{}))",
)


def fill(layout, nums, ops):
    """The layout's text with four numbers (or names) and three operators."""
    return layout.format(nums[0], ops[0], nums[1], ops[1], nums[2], ops[2], nums[3])


def _as_function(layout, ops):
    """A layout with an operator triple as a function of four numbers (Python precedence, as eval() reads it)."""
    return eval("lambda a, b, c, d: " + fill(layout, "abcd", ops))  # noqa: S307 -- fixed characters only


_SHAPES = [(layout, ops, _as_function(layout, ops)) for layout in ANY_LAYOUTS
           for ops in product("+-*/", repeat=3)]


def formula_families(values, target, rng):
    """Candidate formulas over the hand's four numbers, sorted by what they are: correct ones outside the official
    layouts, wrong values, divisions by zero, and exact solutions whose float value misses the target."""
    families = {"other_layout_24": [], "wrong_value": [], "div_zero": [], "float_miss": []}
    sols = official_solutions(values, target)
    for nums in sorted(set(permutations(values))):
        exact = [Fraction(v) for v in nums]
        for layout, ops, fn in _SHAPES:
            try:
                value = fn(*nums)  # ints in, Python's own float division: what eval() of the text gives
            except ZeroDivisionError:
                value = None
            if value is not None and abs(value - target) > 1e-6:
                families["wrong_value"].append(fill(layout, nums, ops))
                continue
            try:
                hit = fn(*exact) == target
            except ZeroDivisionError:
                families["div_zero"].append(fill(layout, nums, ops))
                continue
            text = fill(layout, nums, ops)
            if hit and value != target:
                families["float_miss"].append(text)
            elif hit and text not in sols:
                families["other_layout_24"].append(text)
    for name in families:
        families[name].sort()
        rng.shuffle(families[name])
    return families


NOT_ON_CARDS = (0, 14, 24, 100, 99)
ILLEGAL_INSERTS = (" ", "x", "^", "\u00d7", "\u00f7", ".", "a", "\t", "\u2212", "=", "**", "//", "%", ",", "\u00b2")
UNICODE_DIGITS = {"0": "\u0660", "1": "\u0661", "2": "\u0662", "3": "\u0663", "4": "\u0664", "5": "\u0665",
                  "6": "\u0666", "7": "\u0667", "8": "\u0668", "9": "\u0669"}  # Arabic-Indic: \d, int() accept them
FULLWIDTH = {str(d): chr(0xFF10 + d) for d in range(10)}


def _numbers_in(formula):
    """(start, end) spans of the ASCII digit runs of a formula."""
    spans, i = [], 0
    while i < len(formula):
        if formula[i].isdigit():
            j = i
            while j < len(formula) and formula[j].isdigit():
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return spans


def _replace_number(formula, index, new):
    start, end = _numbers_in(formula)[index]
    return formula[:start] + str(new) + formula[end:]


def gp_formulas(values, target, rng):
    """[(kind, formula)] for one hand: right, wrong, malformed and hostile formula strings."""
    sols = sorted(official_solutions(values, target))
    fam = formula_families(values, target, rng)
    sol = rng.choice(sols)
    bracketed = [s for s in sols if ")" in s] or [sol]
    out = [("solution", s) for s in rng.sample(sols, min(3, len(sols)))]
    out += [("solution_suffix", sol + suffix) for suffix in ("=24", "=25", "==24", "= 24", "=24.0", "=", "=x")]
    out += [("solution_space_before_eq", sol + " =24"), ("solution_outer_space", " " + sol),
            ("solution_trailing_space", sol + " ")]
    out += [("redundant_brackets", "(" * k + sol + ")" * k) for k in (1, 3, 40)]
    out += [("deep_brackets", "(" * 201 + sol + ")" * 201)]  # past Python's 200 open brackets: eval() refuses
    for name in ("other_layout_24", "wrong_value", "div_zero", "float_miss"):
        out += [(name, f) for f in fam[name][:3]]
    # the number check: missing, repeated, invalid, extra
    spans = _numbers_in(sol)
    out.append(("missing_number", sol[:spans[-1][0]].rstrip("+-*/(")))
    out.append(("missing_number", sol[spans[0][1]:].lstrip("+-*/)")))
    out.append(("repeated_number", _replace_number(sol, 0, values[rng.randrange(4)])))
    out.append(("repeated_number", sol + "*" + str(rng.choice(values))))
    out.append(("invalid_number", _replace_number(sol, rng.randrange(4), rng.choice(NOT_ON_CARDS))))
    out.append(("invalid_number", sol + "+0"))
    out.append(("invalid_number", str(target)))
    out.append(("invalid_number", "+".join(str(v) for v in values) + "+" + "9" * 4300))
    out.append(("huge_number", "1" * 4301 + "*" + "*".join(map(str, values))))  # int() refuses: official crash
    out.append(("huge_number", "0" * 4300 + "*".join(map(str, values))))  # leading zeros count toward the limit
    out.append(("leading_zero", _replace_number(sol, rng.randrange(4), "0" + str(values[0]))))
    out.append(("leading_zero", "0" + sol))
    # illegal characters, and Unicode digits that \d and int() accept but eval() does not
    for ch in rng.sample(ILLEGAL_INSERTS, 6):
        at = rng.randrange(len(sol) + 1)
        out.append(("illegal_char", sol[:at] + ch + sol[at:]))
    out.append(("illegal_char", sol.replace("*", "x")))
    out.append(("illegal_char", sol.replace("*", "\u00d7").replace("/", "\u00f7")))
    out.append(("spaces", " ".join(sol)))
    out.append(("unicode_digit", "".join(UNICODE_DIGITS.get(c, c) for c in sol)))
    first = _numbers_in(sol)[0]
    out.append(("unicode_digit", sol[:first[0]] + "".join(UNICODE_DIGITS[c] for c in sol[first[0]:first[1]])
                + sol[first[1]:]))
    out.append(("unicode_digit", "".join(FULLWIDTH.get(c, c) for c in sol)))
    # brackets both ways
    b = rng.choice(bracketed)
    out.append(("unclosed_bracket", b[:b.rindex(")")] + b[b.rindex(")") + 1:]))
    out.append(("unclosed_bracket", b.rstrip(")")))
    out.append(("unclosed_bracket", "(" + sol))
    out.append(("unclosed_bracket", sol[:-1] + "(" + sol[-1]))
    out.append(("unmatched_close", b.replace("(", "", 1)))
    out.append(("unmatched_close", sol + ")"))
    out.append(("unmatched_close", ")" + sol))
    out.append(("unmatched_close", sol + "))"))
    out.append(("empty_brackets", sol + "*()"))
    # operators out of place
    out.append(("trailing_operator", sol + rng.choice("+-*/")))
    out.append(("leading_operator", rng.choice("+-*/") + sol))
    op_at = [i for i, c in enumerate(sol) if c in "+-*/"]
    i = rng.choice(op_at)
    out.append(("double_operator", sol[:i] + sol[i] + sol[i:]))
    out.append(("missing_operator", sol[:i] + sol[i + 1:]))
    out.append(("missing_operator", "({}+{})({}+{})".format(*values)))
    out.append(("empty", ""))
    out.append(("empty", "=24"))
    out.append(("only_operators", "+-*/"))
    out.append(("only_brackets", "()"))
    # every character prefix of one solution: unclosed brackets, cut numbers, trailing operators
    out += [("solution_prefix", b[:k]) for k in range(1, len(b))]
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------- GeneralPoints: cards


def gp_card_styles(ranks, values, rng):
    """[(kind, text after '"cards": ')] for the template answer: the styles the official card check accepts or
    rejects (it needs a string that, stripped of [ ] ' and spaces, splits on ',' into the four ranks)."""
    ranks = list(ranks)
    shuffled = ranks[:]
    rng.shuffle(shuffled)
    wrong = ranks[:]
    wrong[rng.randrange(4)] = rng.choice([r for r in ("A", "2", "5", "7", "9", "10", "J", "Q", "K") if r not in ranks])
    styles = [
        ("cards_python_list", str(ranks)),
        ("cards_other_order", str(shuffled)),
        ("cards_double_quoted", json.dumps(ranks)),
        ("cards_unquoted", "[" + ", ".join(ranks) + "]"),
        ("cards_unquoted_tight", "[" + ",".join(ranks) + "]"),
        ("cards_numbers", str(list(values))),
        ("cards_numbers_tight", "[" + ",".join(map(str, values)) + "]"),
        ("cards_ten_as_T", str([r.replace("10", "T") for r in ranks])),
        ("cards_lower_case", str([r.lower() for r in ranks])),
        ("cards_words", str([{"A": "Ace", "J": "Jack", "Q": "Queen", "K": "King"}.get(r, r) for r in ranks])),
        ("cards_trailing_comma", str(ranks)[:-1] + ",]"),
        ("cards_wrong", str(wrong)),
        ("cards_three", str(ranks[:3])),
        ("cards_five", str(ranks + [ranks[0]])),
        ("cards_multiline", "[\n    " + ",\n    ".join(repr(r) for r in ranks) + "\n  ]"),
        ("cards_with_suits", str([r + "S" for r in ranks])),
        ("cards_empty", "[]"),
        ("cards_curly_quotes", "[" + ", ".join("\u2018" + r + "\u2019" for r in ranks) + "]"),
        ("cards_inner_spaces", "[" + ", ".join("' " + r + " '" for r in ranks) + "]"),
        ("cards_tabs", "[" + ",\t".join(ranks) + "]"),
        ("cards_string", json.dumps(str(ranks))),
    ]
    return styles


# ---------------------------------------------------------------- GeneralPoints: whole answers


def template(cards, numbers, formula_line, lead="\n"):
    """The answer shape of the official SFT template (prompt_lib/prompts.py ResponseEqn): Python-style lists,
    a double-quoted formula, a comma after every field, so never strict JSON."""
    return lead + "{\n  \"cards\": " + cards + ",\n  \"number\": " + numbers + ",\n  " + formula_line + ",\n}"


def formula_line(formula):
    return "\"formula\": \"" + formula + "\""


def gp_wrappers(formula, ranks, values, rng):
    """[(kind, text)]: one formula in the many shapes an answer can take."""
    ranks, values = list(ranks), list(values)
    cards, numbers = str(ranks), str(values)
    obj = {"cards": ranks, "number": values, "formula": formula}
    obj_s = {"cards": cards, "number": values, "formula": formula}  # cards as a JSON string
    strict = json.dumps(obj)
    t = template(cards, numbers, formula_line(formula))
    out = [
        ("template", t),
        ("template_no_lead", template(cards, numbers, formula_line(formula), lead="")),
        ("template_crlf", t.replace("\n", "\r\n")),
        ("strict_json", strict),
        ("strict_json_cards_string", json.dumps(obj_s)),
        ("compact_json", json.dumps(obj_s, separators=(",", ":"))),
        ("indent_json", json.dumps(obj_s, indent=2)),
        ("fenced_template", "```json" + t + "\n```"),
        ("fenced_strict", "```json\n" + json.dumps(obj_s) + "\n```"),
        ("fenced_compact", "```json\n" + json.dumps(obj_s, separators=(",", ":")) + "\n```"),
        ("prose_then_json", "Let me work this out. The numbers are " + ", ".join(map(str, values))
         + ".\nFinal answer:\n" + json.dumps(obj_s)),
        ("json_then_prose", json.dumps(obj_s) + "\nI hope this helps."),
        ("thought_json", json.dumps({"thought": "Try products first.", **obj_s})),
        ("nested_json", json.dumps({"answer": obj_s})),
        ("single_quoted_formula", template(cards, numbers, "\"formula\": '" + formula + "'")),
        ("single_quoted_keys", template(cards, numbers, "'formula': '" + formula + "'")),
        ("unquoted_formula", template(cards, numbers, "\"formula\": " + formula)),
        ("key_capitalised", template(cards, numbers, "\"Formula\": \"" + formula + "\"")),
        ("key_upper", json.dumps({"CARDS": cards, "NUMBER": values, "FORMULA": formula})),
        ("key_no_space", template(cards, numbers, "\"formula\":\"" + formula + "\"")),
        ("key_space_before_colon", template(cards, numbers, "\"formula\" : \"" + formula + "\"")),
        ("key_two_spaces", template(cards, numbers, "\"formula\":  \"" + formula + "\"")),
        ("key_tab", template(cards, numbers, "\"formula\":\t\"" + formula + "\"")),
        ("formula_on_next_line", template(cards, numbers, "\"formula\": \"\n" + formula + "\"")),
        ("formula_missing", "\n{\n  \"cards\": " + cards + ",\n  \"number\": " + numbers + ",\n}"),
        ("prose_only", "The answer is " + formula + "."),
    ]
    decoy = rng.choice(["1+2+3+4", "(" + formula, formula + "+1", "24"])
    out.append(("duplicate_key_strict", "{\"cards\": " + json.dumps(cards) + ", \"formula\": " + json.dumps(decoy)
                + ", \"formula\": " + json.dumps(formula) + "}"))
    out.append(("duplicate_key_template", template(cards, numbers, formula_line(decoy) + ",\n  "
                                                   + formula_line(formula))))
    out.append(("decoy_in_prose", "I first tried \"formula\": \"" + decoy + "\" but it failed." + t))
    out.append(("escaped_quote_json", json.dumps({**obj_s, "formula": formula + "\""})))
    out.append(("unicode_escape_json", json.dumps({**obj_s, "formula": "".join(UNICODE_DIGITS.get(c, c)
                                                                                for c in formula)})))
    return out


def gp_nonstring_formulas(ranks, values):
    """Strict-JSON answers whose "formula" is not a string: the official scorer hands it to re.findall and
    crashes (unless GP-VL's card check fails first). Cards as a JSON string, so GP-VL's check can pass."""
    cards = str(list(ranks))
    out = []
    for kind, value in (("formula_int", 24), ("formula_null", None), ("formula_list", ["1+2"]), ("formula_bool", True),
                        ("formula_float", 24.0), ("formula_object", {"expr": "1"}), ("formula_nan", float("nan"))):
        out.append((kind, json.dumps({"cards": cards, "number": list(values), "formula": value})))
    out.append(("formula_int_cards_list", json.dumps({"cards": list(ranks), "formula": 24})))
    # a >4300-digit JSON number: json.loads refuses it, so the regex fallback reads the text instead
    out.append(("formula_huge_json_int", "{\"cards\": " + json.dumps(cards) + ", \"formula\": " + "7" * 4400 + "}"))
    return out


def gp_answers(ranks, values, rng, target=24, vision=False):
    """[(kind, text)] for one hand. Every formula in the template (with the right cards), the correct formula
    in every wrapper, a sample of formulas in random wrappers; under vision, every card style as well."""
    ranks, values = list(ranks), list(values)
    formulas = gp_formulas(values, target, rng)
    sols = sorted(official_solutions(values, target))
    sol = rng.choice(sols)
    t_cards, t_numbers = str(ranks), str(values)
    out = [("F:" + kind, template(t_cards, t_numbers, formula_line(f))) for kind, f in formulas]
    out += [("W:" + kind, text) for kind, text in gp_wrappers(sol + rng.choice(["", "=24"]), ranks, values, rng)]
    for kind, f in rng.sample(formulas, 12):
        wrapped = rng.choice(gp_wrappers(f, ranks, values, rng))
        out.append(("FW:" + kind + "/" + wrapped[0], wrapped[1]))
    out += [("J:" + kind, text) for kind, text in gp_nonstring_formulas(ranks, values)]
    styles = gp_card_styles(ranks, values, rng)
    picked = styles if vision else rng.sample(styles, 5)  # GP-L ignores the cards: a few suffice
    for kind, cards in picked:
        out.append(("C:" + kind, template(cards, t_numbers, formula_line(sol))))
        out.append(("C:" + kind + "/no_space", template(cards, t_numbers, formula_line(sol)).replace(
            "\"cards\": ", "\"cards\":")))
    if vision:
        for kind, cards in rng.sample(styles, 6):
            out.append(("CF:" + kind, template(cards, t_numbers, formula_line(rng.choice(formulas)[1]))))
        out.append(("C:strict_json_list", json.dumps({"cards": ranks, "number": values, "formula": sol})))
        out.append(("C:number_field_only", "\n{\n  \"number\": " + t_numbers + ",\n  " + formula_line(sol) + ",\n}"))
    return out


# ---------------------------------------------------------------- V-IRL

ABSOLUTE_TURNS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
RELATIVE_TURNS = ("left", "right", "slightly left", "slightly right")
INTERSECTION_CUE = "You observe an intersection"


def action_space(absolute):
    turns = ABSOLUTE_TURNS if absolute else RELATIVE_TURNS
    return ["forward()", "stop()"] + [f"turn_direction({t})" for t in turns]


def action_slips(action):
    """Near misses of a right action that the official exact comparison rejects (and a few it accepts)."""
    inner = action[action.index("(") + 1:-1] if action.startswith("turn_direction(") else None
    slips = [("slip_capitalised", action[0].upper() + action[1:]), ("slip_upper", action.upper()),
             ("slip_lead_space", " " + action), ("slip_trail_space", action + " "),
             ("slip_trailing_dot", action + ".")]
    if inner is None:
        slips += [("slip_no_parens", action[:-2]), ("slip_space_parens", action[:-2] + " ()"),
                  ("slip_words", {"forward()": "move forward", "stop()": "stop here"}[action])]
    else:
        slips += [("slip_inner_spaces", f"turn_direction( {inner} )"),
                  ("slip_inner_case", f"turn_direction({inner.title()})"),
                  ("slip_underscore", f"turn_direction({inner.replace(' ', '_')})"),
                  ("slip_single_quotes", f"turn_direction('{inner}')"),
                  ("slip_no_underscore", f"turn direction({inner})"),
                  ("slip_bare_word", inner), ("slip_no_parens", f"turn_direction {inner}")]
        if inner.endswith(("east", "west")) and len(inner) > 5:
            slips.append(("slip_split_compass", f"turn_direction({inner[:5]} {inner[5:]})"))
    return slips


def virl_template(observation, action, instruction="Move forward until you reach next intersection.", lead="\n"):
    """The official answer shape (prompt_lib/prompts.py ResponseVIRL): one "key": "value", per line and a comma
    after the last, so never strict JSON."""
    return (lead + "{\n  \"current observation\": \"" + observation + "\",\n  \"current instruction\": \""
            + instruction + "\",\n  \"action\": \"" + action + "\",\n}")


def virl_obj(observation, action):
    return {"current observation": observation, "current instruction": "Turn to the next street.", "action": action}


def virl_claims(gt_obs, at_intersection):
    """[(kind, observation text)]: what an answer may say it sees, intersection claims of every sort."""
    shown = gt_obs + ("; " + INTERSECTION_CUE if at_intersection else "")
    return [("obs_as_shown", shown), ("obs_landmarks_only", gt_obs),
            ("obs_with_cue", gt_obs + "; " + INTERSECTION_CUE), ("obs_cue_only", INTERSECTION_CUE),
            ("obs_no_intersection", "There is no intersection here"),
            ("obs_not_at_intersection", "I am not at an intersection"),
            ("obs_capital_intersection", "Intersection ahead"),
            ("obs_upper_intersection", "INTERSECTION"), ("obs_plural", "intersections around"),
            ("obs_empty", ""), ("obs_none_text", "None"), ("obs_word_inside", "an underintersectional road")]


def virl_answers(gt_action, gt_obs, at_intersection, absolute, rng):
    """[(kind, text)] for one rail position."""
    space = action_space(absolute)
    wrong = [a for a in space if a != gt_action]
    claims = virl_claims(gt_obs, at_intersection)
    shown = claims[0][1]
    out = []
    # the right action in every wrapper
    right = virl_obj(shown, gt_action)
    t = virl_template(shown, gt_action)
    out += [("right/template", t), ("right/template_no_lead", virl_template(shown, gt_action, lead="")),
            ("right/template_crlf", t.replace("\n", "\r\n")),
            ("right/strict_json", json.dumps(right)), ("right/compact_json", json.dumps(right, separators=(",", ":"))),
            ("right/indent_json", json.dumps(right, indent=2)), ("right/fenced_template", "```json" + t + "\n```"),
            ("right/fenced_strict", "```json\n" + json.dumps(right) + "\n```"),
            ("right/fenced_compact", "```json\n" + json.dumps(right, separators=(",", ":")) + "\n```"),
            ("right/prose_then_json", "I look around first.\n" + json.dumps(right)),
            ("right/thought_json", json.dumps({"thought": "Follow the instruction.", **right})),
            ("right/single_quoted", t.replace("\"", "'")),
            ("right/key_capitalised", t.replace("\"action\"", "\"Action\"")),
            ("right/key_no_space", t.replace("\"action\": ", "\"action\":")),
            ("right/key_space_before_colon", t.replace("\"action\": ", "\"action\" : ")),
            ("right/key_no_space_strict", json.dumps(right, separators=(", ", ":"))),
            ("right/action_next_line", t.replace("\"action\": \"", "\"action\": \"\n")),
            ("right/missing_action", json.dumps({"current observation": shown})),
            ("right/prose_only", "I will do " + gt_action + " now."),
            ("right/action_null", json.dumps({**right, "action": None})),
            ("right/action_list", json.dumps({**right, "action": [gt_action]})),
            ("right/obs_null", json.dumps({**right, "current observation": None})),
            ("right/nested", json.dumps({"answer": right})),
            ("right/unquoted_action", t.replace("\"action\": \"" + gt_action + "\"", "\"action\": " + gt_action)),
            ("right/escaped_quote_json", json.dumps({**right, "action": "\"" + gt_action + "\""})),
            ("right/action_then_obs", "{\n  \"action\": \"" + gt_action + "\",\n  \"current observation\": \""
             + shown + "\",\n}")]
    decoy = rng.choice(wrong)
    out.append(("right/duplicate_strict_last", "{\"action\": \"" + decoy + "\", \"action\": \"" + gt_action + "\"}"))
    out.append(("wrong/duplicate_strict_first", "{\"action\": \"" + gt_action + "\", \"action\": \"" + decoy + "\"}"))
    out.append(("right/duplicate_template_first", t.replace(",\n}", ",\n  \"action\": \"" + decoy + "\",\n}")))
    out.append(("wrong/decoy_in_prose", "Not \"action\": \"" + decoy + "\" but:" + t))
    # slips of the right action, with the shown observation and with a claim
    for kind, slip in action_slips(gt_action):
        out.append(("slip/" + kind, virl_template(shown, slip)))
        out.append(("slip/" + kind + "/json", json.dumps(virl_obj(shown, slip))))
    # wrong actions against every intersection claim, in the template and in strict JSON
    for kind, claim in claims:
        act = rng.choice(wrong)
        out.append(("wrong/" + kind, virl_template(claim, act)))
        out.append(("wrong/" + kind + "/json", json.dumps(virl_obj(claim, act))))
        out.append(("right/" + kind, virl_template(claim, gt_action)))
    out.append(("wrong/obs_on_next_line", virl_template("\n" + INTERSECTION_CUE, decoy)))
    out.append(("wrong/obs_missing", "{\n  \"action\": \"" + decoy + "\",\n}"))
    out.append(("wrong/obs_single_quoted", "{\n  'current observation': '" + INTERSECTION_CUE + "',\n  \"action\": \""
                + decoy + "\",\n}"))
    out.append(("wrong/prose_only", "I think I should go " + decoy + " because there is an intersection."))
    # JSON observations that are not strings: the official `in` test crashes on null, numbers and booleans
    for kind, value in (("obs_null", None), ("obs_int", 3), ("obs_float", 1.5), ("obs_bool", True),
                        ("obs_list_cue", ["intersection"]), ("obs_list", [INTERSECTION_CUE]),
                        ("obs_dict", {"intersection": 1}), ("obs_dict_other", {"road": 1})):
        out.append(("wrong/" + kind, json.dumps(virl_obj(value, rng.choice(wrong)))))
    out.append(("wrong/action_null_obs_null", json.dumps(virl_obj(None, None))))
    out.append(("wrong/action_int", json.dumps(virl_obj(shown, 1))))
    rng.shuffle(out)
    return out
