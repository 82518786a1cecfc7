"""GeneralPoints: solver, parser, verifier, dealing, episodes, the environment contract, rendering, CLI."""
import doctest
import hashlib
import itertools
import json
import math
import operator
import os
import random
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import env_points as G
import official
import prompt_variants
from env_points import GeneralPointsEnv, PointsConfig, evaluate_formula, solve, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ID, OOD = PointsConfig(), PointsConfig(face_cards_as_10=False)
VL = PointsConfig(vision=True)
OFFICIAL, OFFICIAL_VL = PointsConfig(protocol="official"), PointsConfig(protocol="official", vision=True)


def well_formed(v, cfg) -> bool:
    """One outcome of the protocol's, with its reward (the official one adds its penalties up: a multiple of its
    unit then), and feedback to show."""
    if cfg.protocol == "official":
        ok = v.outcome in official.REWARDS and math.isfinite(v.reward) and v.reward <= 5
    else:
        ok = v.outcome in G.REWARDS and v.reward == G.REWARDS[v.outcome]
    return ok and isinstance(v.feedback, str) and bool(v.feedback)


# ---- solver ----

def naive_solvable(values, target=24):
    """Reference: repeatedly combine any ordered pair with + - * / until one number is left."""
    def rec(xs):
        if len(xs) == 1:
            return xs[0] == target
        for i, j in itertools.permutations(range(len(xs)), 2):
            rest = [x for k, x in enumerate(xs) if k not in (i, j)]
            a, b = xs[i], xs[j]
            for v in [a + b, a - b, a * b] + ([a / b] if b else []):
                if rec(rest + [v]):
                    return True
        return False
    return rec([Fraction(v) for v in values])


def brute_force_solve(values, target=24):
    """Reference for the solver's search: every ordering of the numbers, every parenthesization and every
    operator, exactly; the solver's canonical form only names the formulas found, shortest first."""
    def trees(numbers):  # [(value, (op, left, right) or number)]
        if len(numbers) == 1:
            return [(Fraction(numbers[0]), numbers[0])]
        out = []
        for cut in range(1, len(numbers)):
            for x, left in trees(numbers[:cut]):
                for y, right in trees(numbers[cut:]):
                    out += [(v, (op, left, right)) for op, v in (("+", x + y), ("x-y", x - y), ("*", x * y),
                                                                 ("x/y", x / y if y else None)) if v is not None]
        return out

    def canonical(tree):
        if not isinstance(tree, tuple):
            return ("n", str(tree), ())
        op, left, right = tree
        return dict(G._combine(canonical(left), canonical(right)))[op]

    found = {G._render(canonical(tree)) for order in set(itertools.permutations(values))
             for value, tree in trees(order) if value == target}
    return sorted(found, key=lambda s: (len(s), s))


def test_solver_finds_exactly_the_formulas_of_a_brute_force_search():
    rng = random.Random(3)
    cases = [([3, 3, 8, 8], 24), ([1, 5, 5, 5], 24), ([1, 2, 3, 4], 24), ([6, 6, 6, 6], 0), ([13], 13), ([2, 2], 4)]
    cases += [([rng.randint(1, 13) for _ in range(rng.choice((2, 3, 4, 4, 4)))], rng.choice((24, 24, 0, 1, 10, -3)))
              for _ in range(40)]
    for hand, target in cases:
        assert solve(hand, target) == brute_force_solve(hand, target), (hand, target)


def test_solvable_counts_match_known_figures():
    hands13 = list(itertools.combinations_with_replacement(range(1, 14), 4))
    hands10 = list(itertools.combinations_with_replacement(range(1, 11), 4))
    assert len(hands13) == 1820 and len(hands10) == 715
    assert sum(bool(solve(h)) for h in hands13) == 1362
    assert sum(bool(solve(h)) for h in hands10) == 566


def test_solver_agrees_with_naive_search_on_random_hands_and_targets():
    rng = random.Random(1)
    for _ in range(150):
        hand = [rng.randint(1, 13) for _ in range(4)]
        target = rng.choice([24, 24, 1, 10, 36, 0])
        assert bool(solve(hand, target)) == naive_solvable(hand, target), (hand, target)


def test_every_solution_is_exact_and_uses_each_number_once():
    rng = random.Random(2)
    for _ in range(60):
        hand = [rng.randint(1, 13) for _ in range(4)]
        formulas = solve(hand)
        assert len(formulas) == len(set(formulas))
        for f in formulas:
            value, used = G.parse_formula(f)
            assert value == 24 and sorted(used) == sorted(hand), f


def test_solver_needs_fractions_and_reports_unsolvable():
    assert "8/(3-8/3)" in solve([3, 3, 8, 8])
    assert "5*(5-1/5)" in solve([1, 5, 5, 5])
    assert solve([1, 1, 1, 1]) == [] and not G.is_solvable([1, 1, 1, 1])
    # commutative and associative variants are one formula
    assert solve([1, 2, 3, 4]).count("1*2*3*4") == 1 and "4*3*2*1" not in solve([1, 2, 3, 4])


# ---- formula parser ----

@pytest.mark.parametrize("text,value", [
    ("24", 24), ("1+2+3", 6), ("2*3+4", 10), ("2*(3+4)", 14), ("8/(3-8/3)", 24),
    ("10-4-3", 3), ("100/10/5", 2), (" ( 7 - 3 ) * ( 10 - 4 ) ", 24), ("1/3", Fraction(1, 3)),
])
def test_evaluate_formula_exact(text, value):
    assert evaluate_formula(text) == value


@pytest.mark.parametrize("text", [
    "", "   ", "()", "(1+2", "1+2)", "1 2", "1+", "*2", "-1+25", "+3", "2**3", "1.5", "2^3",
    "1/0", "4/(2-2)", "abs(24)", "__import__('os')", "eval('24')", "٣*8", "3x8", "24=24",
    "(" * 200 + "1" + ")" * 200,
])
def test_evaluate_formula_rejects_everything_else(text):
    with pytest.raises(ValueError):
        evaluate_formula(text)


def test_parse_formula_reports_numbers_in_order():
    assert G.parse_formula("(10-4)*(3+1)") == (24, [10, 4, 3, 1])


# ---- verifier ----

def answer(formula, cards=None, number=None):
    return json.dumps({"cards": cards or [], "number": number or [], "formula": formula})


@pytest.mark.parametrize("ranks,text,outcome", [
    (["3", "3", "8", "8"], answer("8/(3-8/3)"), "correct"),
    (["3", "3", "8", "8"], answer("8/(3-8/3) = 24"), "correct"),
    (["3", "3", "8", "8"], answer("8/(3-8/3)=25"), "illegal_formula"),
    (["A", "2", "3", "4"], answer("1*2*3*4"), "correct"),
    (["A", "2", "3", "4"], answer("1+2+3+4"), "wrong_value"),
    (["A", "2", "3", "4"], answer("2*3*4"), "wrong_numbers"),            # missing the 1
    (["A", "2", "3", "4"], answer("1*2*3*4*1"), "wrong_numbers"),        # extra 1
    (["A", "2", "3", "4"], answer("6*4*1*1"), "wrong_numbers"),          # invented 6
    (["A", "2", "3", "4"], answer("4*4+4+4"), "wrong_numbers"),          # overused 4
    (["A", "2", "3", "4"], answer("1x2x3x4"), "illegal_formula"),
    (["A", "2", "3", "4"], answer("(1+2)*(3+4"), "illegal_formula"),
    (["A", "2", "3", "4"], answer("4/(3-3)*2*1"), "illegal_formula"),    # division by zero
    (["A", "2", "3", "4"], '{"cards": ["A", "2", "3", "4"]}', "illegal_formula"),
    (["A", "2", "3", "4"], "", "illegal_formula"),
    (["A", "2", "3", "4"], answer(["1*2*3*4"]), "illegal_formula"),      # formula not a string
])
def test_verifier_outcomes(ranks, text, outcome):
    v = verify(text, ranks, ID)
    assert v.outcome == outcome, v.feedback
    assert v.reward == G.REWARDS[outcome]
    assert v.cards_ok is None  # GP-L does not verify recognition


def test_face_card_rule_flips_a_king_from_10_to_13():
    ranks = ["K", "2", "2", "A"]
    assert verify(answer("(10+2)*2*1"), ranks, ID).outcome == "correct"
    assert verify(answer("(10+2)*2*1"), ranks, OOD).outcome == "wrong_numbers"
    assert verify(answer("13*2-2*1"), ranks, OOD).outcome == "correct"
    assert verify(answer("13*2-2*1"), ranks, ID).outcome == "wrong_numbers"


def test_feedback_names_what_went_wrong():
    ranks = ["A", "2", "3", "4"]
    wrong = verify(answer("6*4*1*1"), ranks, ID).feedback
    assert "uses [1, 6] which are not card numbers or are used too often" in wrong  # invented 6, second 1
    assert "does not use the card numbers [2, 3]" in wrong
    assert "10, not 24" in verify(answer("1+2+3+4"), ranks, ID).feedback
    assert "'x'" in verify(answer("1x2x3x4"), ranks, ID).feedback
    assert "division by zero" in verify(answer("4/(3-3)*2*1"), ranks, ID).feedback
    assert "1/2" in verify(answer("1/2+3-4"), ranks, ID).feedback           # exact fraction shown


def test_vision_checks_the_cards_first():
    ranks = ["K", "2", "2", "A"]
    good = answer("(10+2)*2*1", cards=["K", "2", "2", "A"])
    assert verify(good, ranks, VL).outcome == "correct" and verify(good, ranks, VL).cards_ok
    # right formula, wrong recognition: wrong_cards wins
    v = verify(answer("(10+2)*2*1", cards=["Q", "2", "2", "A"]), ranks, VL)
    assert (v.outcome, v.reward, v.cards_ok) == ("wrong_cards", -1.5, False)
    assert verify(answer("(10+2)*2*1"), ranks, VL).outcome == "wrong_cards"  # no cards given
    # a multiset: order free, aliases and suits tolerated, counts must match
    alias = answer("(10+2)*2*1", cards=["ace", "2 of hearts", "King", "2"])
    assert verify(alias, ranks, VL).outcome == "correct"
    assert verify(answer("(10+2)*2*1", cards=["K", "2", "A"]), ranks, VL).outcome == "wrong_cards"
    # recognition right, formula wrong: the formula's outcome, with cards_ok recorded
    v = verify(answer("10+2+2+1", cards=ranks), ranks, VL)
    assert (v.outcome, v.cards_ok) == ("wrong_value", True)


@pytest.mark.parametrize("text", [
    '```json\n{"cards": ["A","2","3","4"], "number": [1,2,3,4], "formula": "1*2*3*4"}\n```',
    'Sure! Here is my answer: {"cards": ["A","2","3","4"], "number": [1,2,3,4], "formula": "1*2*3*4"} Hope it helps.',
    "{'cards': ['A', '2', '3', '4'], 'number': [1, 2, 3, 4], 'formula': '1*2*3*4'}",
    '{"cards": [A, 2, 3, 4], "number": [1, 2, 3, 4], "formula": 1*2*3*4}',
    '{"thoughts": "easy", "formula": "1*2*3*4",}',
    'formula: 1*2*3*4',
])
def test_tolerant_answer_parsing(text):
    assert verify(text, ["A", "2", "3", "4"], ID).outcome == "correct"


def test_tolerant_parsing_reads_cards_from_json_like_text():
    text = "{'cards': ['A', '2', '3', '4'], 'formula': '1*2*3*4'}"
    assert verify(text, ["4", "3", "2", "A"], VL).outcome == "correct"


ADVERSARIAL = [
    "", " ", "{", "}", "{" * 10_000, "[" * 10_000 + "]" * 10_000, '{"formula": ' * 3000,
    '{"formula": "' + "(" * 100_000 + '"}', '{"formula": "' + "9" * 10_000 + '"}',
    '{"formula": "' + "1+" * 5000 + '1"}', '{"formula": null}', '{"formula": 24}', '{"formula": true}',
    '{"formula": {"a": 1}}', '{"cards": "A23", "formula": "1*2*3*4"}', '{"cards": [[1]], "formula": "1"}',
    '{"cards": [null, true, 1.5, {}], "formula": "1*2*3*4"}', "\x00\xff\ufffd\ud800"[:3], "NaN",
    '{"formula": NaN}', '{"formula": Infinity}', "1e999999", '"formula": "' + "\\" * 999 + '"',
    "formula:", "formula: =", "formula: 1*2*3*4=", "formula: 24=24=24", "💣" * 1000, "\n" * 10_000,
    '{"formula": "1/(1-1)"}', '{"formula": "(((((((((1)))))))))"}', "a" * 1_000_000,
]


@pytest.mark.parametrize("cfg", [ID, OOD, VL, OFFICIAL, OFFICIAL_VL])
def test_adversarial_answers_never_raise(cfg):
    for text in ADVERSARIAL + [t.encode("utf-8", "surrogatepass") for t in ADVERSARIAL[:5]]:
        assert well_formed(verify(text, ["A", "2", "3", "4"], cfg), cfg), text[:80]


def repeated(units, most=5000):
    """A unit written up to `most` times: the inputs on which a backtracking regex or big-int arithmetic blows up."""
    return st.builds(operator.mul, st.sampled_from(units), st.integers(1, most))


PATHOLOGICAL = st.one_of(
    repeated(["9", "(", ")", '"', "'", "\\", "{", "[", "\n", " ", '{"formula": ', "formula: ", "formula:\n",
              '"cards": [', "'formula': '", '{"x": [', "1,", "intersection no "]),
    st.builds(lambda f: json.dumps({"formula": f}), repeated(["9", "(", ")", "(1+", "1/", "*99", "1+", "/7"], 400)),
    st.builds(lambda digits: '{"formula": ' + digits + "}", repeated(["9", "12345"], 2000)),
    st.builds(lambda item: '{"cards": [' + item + '], "formula": "1*2*3*4"}', repeated(['"A",', "1,", "[],"])),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(),
    st.text(alphabet="0123456789+-*/() =.{}[]\"':,formulacards"),
    st.builds(lambda f, c: json.dumps({"cards": c, "formula": f}),
              st.text(alphabet="0123456789+-*/() ="), st.lists(st.sampled_from(G.RANKS + ("x", "", "11")))),
    PATHOLOGICAL,
))
def test_any_string_yields_one_outcome(text):
    for cfg in (ID, VL, OFFICIAL, OFFICIAL_VL):
        assert well_formed(verify(text, ["K", "2", "2", "A"], cfg), cfg)


@pytest.mark.parametrize("formula,outcome", [
    ("9" * 10_000, "illegal_formula"),                        # longer than MAX_FORMULA_CHARS: never evaluated
    ("9" * 509 + "+1", "wrong_numbers"),                      # the longest legal numbers: exact, and quick
    ("*".join(["99"] * 170), "wrong_numbers"),                # a 340-digit product
    ("/".join(["7"] * 256), "wrong_numbers"),                 # a 7^255 denominator
    ("(" * 64 + "1" + ")" * 64 + "*2*3*4", "correct"),        # as deep as the parser goes
    ("(" * 65 + "1" + ")" * 65 + "*2*3*4", "illegal_formula"),
    ("(" * 250, "illegal_formula"),
])
def test_huge_and_deep_formulas_get_their_verdicts(formula, outcome):
    assert verify(json.dumps({"formula": formula}), ["A", "2", "3", "4"], ID).outcome == outcome


def test_long_pathological_answers_get_their_verdicts():
    ranks = ["A", "2", "3", "4"]
    assert verify('{"formula": ' + "9" * 5000 + "}", ranks, ID).outcome == "illegal_formula"  # past int()'s 4300
    assert verify('{"x": [' * 16 + "1," * 24_000, ranks, ID).outcome == "illegal_formula"  # 16 decodes to the end
    many = '{"cards": [' + '"A",' * 12_000 + '"2"], "formula": "1*2*3*4"}'
    assert verify(many, ranks, VL).outcome == "wrong_cards"
    assert verify("formula:" + "\n" * 49_000 + "1*2*3*4", ranks, ID).outcome == "correct"  # \s* crosses lines
    assert verify('"formula": "' * 5000, ranks, ID).outcome == "illegal_formula"


# ---- dealing and episodes ----

CONFIGS = [PointsConfig(face_cards_as_10=rule, suits=suits, vision=vision, image_size=64)
           for rule in (True, False) for suits in ("black", "red", "mixed") for vision in (False, True)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"id{c.face_cards_as_10}-{c.suits}-vl{c.vision}")
def test_expert_always_scores_five(cfg):
    env = GeneralPointsEnv(cfg, seed=7)
    for _ in range(300 if cfg.vision else 3000):
        obs = env.reset()
        assert (obs.image is not None) == cfg.vision and not obs.continues
        assert all(s in G.SUIT_SETS[cfg.suits] for _, s in env.cards)
        if cfg.face_card_required:
            assert G.FACE_RANKS.intersection(env.ranks)
        _, reward, done, info = env.step(env.expert_response())
        assert (reward, done, info["success"], info["outcome"]) == (5.0, True, True, "correct")


def test_dealt_hands_are_solvable_and_rules_differ():
    id_env, ood_env = GeneralPointsEnv(ID, seed=3), GeneralPointsEnv(OOD, seed=3)
    saw_face_in_id = False
    for _ in range(2000):
        id_env.reset(), ood_env.reset()
        assert solve(id_env.values) and solve(ood_env.values)
        assert max(ood_env.values) >= 11  # OOD: a face card in every hand, worth 11-13
        assert max(id_env.values) <= 10
        saw_face_in_id |= bool(G.FACE_RANKS.intersection(id_env.ranks))
    assert saw_face_in_id
    no_face = GeneralPointsEnv(PointsConfig(face_cards_as_10=False, face_card_required=False), seed=3)
    assert any(not G.FACE_RANKS.intersection(no_face.reset() and no_face.ranks) for _ in range(200))


def _face_count_shares(hands) -> dict:
    counts = [sum(r in G.FACE_RANKS for r in hand) for hand in hands]
    return {k: counts.count(k) / len(counts) for k in range(5)}


def _official_shares(ood: bool) -> dict:
    """Exact shares of hands holding k face cards under the official `_generate_cards`, worked out by
    enumerating its draws: ood, three ranks uniform over 1..13 plus one over 11..13; else four
    uniform ranks. Both kept only when solvable under the rule that goes with them."""
    weights = dict.fromkeys(range(5), 0)
    draws = (itertools.product(range(1, 14), range(1, 14), range(1, 14), range(11, 14)) if ood
             else itertools.product(range(1, 14), repeat=4))
    for hand in draws:
        if G.is_solvable(hand if ood else [min(v, 10) for v in hand]):
            weights[sum(v >= 11 for v in hand)] += 1
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def test_deals_follow_the_official_distribution_over_many_seeds():
    """The OOD deal is the official one: about 50% of hands hold exactly one face card, where
    rejecting face-less uniform hands would give 68%. 6000 hands put one standard error near 0.6
    points: a 3-point tolerance passes the official sampler and fails any other seen so far."""
    expected = {ood: _official_shares(ood) for ood in (True, False)}
    assert abs(expected[True][1] - 0.4957) < 1e-3 and abs(expected[False][0] - 0.4099) < 1e-3
    for ood, cfg in ((True, OOD), (False, ID)):
        hands = []
        for seed in range(150):
            env = GeneralPointsEnv(cfg, seed=seed)
            hands += [(env.reset(), env.ranks)[1] for _ in range(40)]
        got = _face_count_shares(hands)
        for k in range(5):
            assert abs(got[k] - expected[ood][k]) < 0.03, (ood, k, got, expected[ood])
        if ood:
            # the face card is shuffled in, not always the last card shown
            singles = [h for h in hands if sum(r in G.FACE_RANKS for r in h) == 1]
            at = [next(i for i, r in enumerate(h) if r in G.FACE_RANKS) for h in singles]
            assert all(abs(at.count(i) / len(at) - 0.25) < 0.04 for i in range(4)), at[:20]
    # the rejection sampler the project used before: 68% single face cards, well outside the tolerance
    rejected = [(a, b, c, d) for a, b, c, d in itertools.product(range(1, 14), repeat=4)
                if max(a, b, c, d) >= 11 and G.is_solvable((a, b, c, d))]
    single = sum(sum(v >= 11 for v in h) == 1 for h in rejected) / len(rejected)
    assert abs(single - 0.6792) < 1e-3 and single - expected[True][1] > 0.15


def test_ood_deal_is_on_exactly_under_the_ood_rule_unless_set():
    assert OOD.face_card_required and not ID.face_card_required
    assert PointsConfig(face_cards_as_10=True, face_card_required=True).face_card_required
    env = GeneralPointsEnv(PointsConfig(face_card_required=True), seed=1)  # ID rule, OOD deal
    for _ in range(300):
        env.reset()
        assert G.FACE_RANKS.intersection(env.ranks) and max(env.values) == 10 and solve(env.values)


def test_same_seed_same_hands_and_reset_seed_restarts():
    a, b, c = GeneralPointsEnv(ID, seed=11), GeneralPointsEnv(ID, seed=11), GeneralPointsEnv(ID, seed=12)
    hands_a = [(a.reset(), a.cards)[1] for _ in range(50)]
    assert hands_a == [(b.reset(), b.cards)[1] for _ in range(50)]
    assert hands_a != [(c.reset(), c.cards)[1] for _ in range(50)]
    c.reset(seed=11)
    assert c.cards == hands_a[0]


def test_hands_do_not_depend_on_hash_seed():
    code = ("import env_points as G; e = G.GeneralPointsEnv(G.PointsConfig(face_cards_as_10=False), seed=5); "
            "print([(e.reset(), e.cards, e.expert_response())[1:] for _ in range(30)])")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert len(outs) == 1 and "[(" in outs.pop()


def test_sequential_revision_until_verify_iter():
    env = GeneralPointsEnv(PointsConfig(verify_iter=3), seed=0)
    first = env.reset()
    for attempt in (1, 2):
        obs, reward, done, info = env.step('{"formula": "1+"}')
        assert (reward, done, info["outcome"], info["attempt"]) == (-3.0, False, "illegal_formula", attempt)
        assert obs.continues and obs.image is None and obs.text.startswith("You failed this trial because")
    obs, reward, done, info = env.step("no idea")
    assert done and not info["success"] and not obs.continues
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.expert_response())
    assert env.reset().text != first.text and env.attempt == 0 and not env.done


def test_success_after_a_failed_attempt_ends_the_episode():
    env = GeneralPointsEnv(ID, seed=4)
    env.reset()
    _, r1, d1, _ = env.step(answer("1+1"))
    _, r2, d2, info = env.step(env.expert_response())
    assert (r1, d1, r2, d2, info["attempt"], info["success"]) == (-2.0, False, 5.0, True, 2, True)


# ---- the environment contract: what the trainers and the evaluator ask of it ----

def test_action_field_is_the_answers_last_field():
    assert G.ACTION_FIELD == "formula" == G.ANSWER_FIELDS[-1]
    env = GeneralPointsEnv(ID, seed=0)
    env.reset()
    assert list(json.loads(env.expert_response()))[-1] == G.ACTION_FIELD


def test_wrong_answer_changes_one_operator_drawn_as_before():
    # pinned draws: the sequential-revision SFT data is made of them
    expert = json.dumps({"cards": ["A", "7", "K", "3"], "number": [1, 7, 10, 3], "formula": "10*3-7+1"})
    draws = [json.loads(G.wrong_answer(expert, random.Random(seed)))["formula"] for seed in range(4)]
    assert draws == ["10*3*7+1", "10/3-7+1", "10+3-7+1", "10/3-7+1"]
    env, rng = GeneralPointsEnv(OOD, seed=1), random.Random(0)
    for _ in range(300):
        env.reset()
        right = json.loads(env.expert_response())
        wrong = json.loads(G.wrong_answer(env.expert_response(), rng))
        assert {**wrong, "formula": right["formula"]} == right  # only the formula changed
        changed = [(a, b) for a, b in zip(right["formula"], wrong["formula"]) if a != b]
        assert len(wrong["formula"]) == len(right["formula"]) and len(changed) == 1
        assert all(c in "+-*/" for c in changed[0])


def test_reset_ignores_episode_the_hand_comes_from_the_seed():
    env = GeneralPointsEnv(ID, seed=0)
    hands = {tuple(env.reset(seed=5, episode=k) and env.cards) for k in (None, 0, 1, 17)}
    assert len(hands) == 1 and env.reset(seed=6, episode=0) and tuple(env.cards) not in hands


def test_env_points_copies_out_alone(tmp_path):
    """The file runs from a folder holding nothing else of the project, its one-line errors included."""
    (tmp_path / "env_points.py").write_text(open(os.path.join(ROOT, "env_points.py")).read())
    run = lambda *args: subprocess.run([sys.executable, "-I", "env_points.py", *args], cwd=tmp_path,
                                       capture_output=True, text=True)
    out = run("--episodes", "20", "--image", "hand.png")
    assert out.returncode == 0 and "20/20 episodes solved" in out.stdout, out.stderr
    bad = run("--episodes", "-1")
    assert (bad.returncode, bad.stderr) == (2, "error: --episodes -1: expected 0 or a positive integer\n")
    # the prompt-diversity study's wordings live in prompt_variants.py: without it one clear error, with it they run
    code = ("import sys; sys.path.insert(0, '.'); import env_points as G\n"
            "try:\n    G.PointsConfig(prompt_template=3)\nexcept ValueError as e:\n    sys.exit(str(e))\n"
            "print(G.GeneralPointsEnv(G.PointsConfig(prompt_template=3), seed=0).reset().text)")
    variant = lambda: subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    missing = variant()
    assert missing.returncode == 1 and "prompt_template=3 needs prompt_variants.py" in missing.stderr, missing.stderr
    (tmp_path / "prompt_variants.py").write_text(open(os.path.join(ROOT, "prompt_variants.py")).read())
    found = variant()
    assert found.returncode == 0 and "Solve a round of the 24 points card game" in found.stdout, found.stderr


# ---- prompts and rendering ----

def test_prompts_state_rule_and_cards():
    env = GeneralPointsEnv(OOD, seed=0)
    text = env.reset().text
    assert json.dumps(env.ranks) in text and "Q as 12 and K as 13" in text and '"formula"' in text
    vl = GeneralPointsEnv(PointsConfig(vision=True, image_size=64), seed=0)
    vtext = vl.reset().text
    assert "image" in vtext and json.dumps(vl.ranks) not in vtext and "each count as 10" in vtext


def test_rendering_is_deterministic_and_colours_follow_suits():
    black = [("K", "spades"), ("10", "clubs"), ("A", "spades"), ("7", "clubs")]
    red = [("K", "hearts"), ("10", "diamonds"), ("A", "hearts"), ("7", "diamonds")]
    img_b, img_b2, img_r = G.render_cards(black), G.render_cards(black), G.render_cards(red)
    assert img_b.size == (448, 448) and img_b.tobytes() == img_b2.tobytes()
    red_pixels = lambda img: int(((lambda a: (a[..., 0] > 150) & (a[..., 1] < 80) & (a[..., 2] < 80))(
        np.asarray(img, dtype=np.int32))).sum())
    assert red_pixels(img_b) == 0 and red_pixels(img_r) > 1000
    assert G.render_cards(black, 200).size == (200, 200)
    assert G.render_cards([("K", "spades")] * 4).tobytes() != G.render_cards([("Q", "spades")] * 4).tobytes()


@pytest.mark.parametrize("size", [224, 448, 64])
def test_cards_sit_inside_the_frame_on_the_official_table(size):
    assert G.TABLE_GREEN == (0x35, 0x65, 0x4D)  # the official '#35654d'
    band = max(2, int(size * 0.04))  # the bare margin is 5% of the side: 4% must be table and nothing else
    hands = [[("10", "hearts"), ("10", "diamonds"), ("10", "hearts"), ("10", "diamonds")],
             [("K", "spades"), ("Q", "clubs"), ("J", "spades"), ("A", "clubs")]]
    for hand in hands:
        a = np.asarray(G.render_cards(hand, size), dtype=np.int32)
        table = (a == np.array(G.TABLE_GREEN)).all(-1)
        assert a.shape == (size, size, 3)
        for edge in (table[:band], table[-band:], table[:, :band], table[:, -band:]):
            assert edge.all(), f"a card reaches into the {band}-pixel border at {size} px"
        ink = ~table
        for i in range(4):  # every card is there, in its own quarter of the row
            quarter = ink[:, i * size // 4:(i + 1) * size // 4]
            assert quarter.sum() > 0.08 * size * size / 4


@pytest.mark.parametrize("size", [64, 97, 224, 333, 448, 1200])
def test_a_hand_of_cached_cards_is_the_whole_hand_drawn_anew_pixel_for_pixel(size):
    """render_cards pastes each card's tile, drawn once per (place, rank, suit, size): the image must equal the
    whole hand drawn large and reduced at once, every card anew, as render_cards did before the tiles."""
    from PIL import Image

    def whole(cards):
        scale, boxes = G._layout(len(cards), size)
        img = Image.new("RGB", (size * scale, size * scale), G.TABLE_GREEN)
        for box, (rank, suit) in zip(boxes, cards):
            G._draw_card(img, box, rank, suit)
        return img.reduce(scale) if scale > 1 else img
    rng = random.Random(size)
    for n in (4, 4, 4, 2, 5):
        cards = [(rng.choice(G.RANKS), rng.choice(list(G.SUIT_COLORS))) for _ in range(n)]
        assert G.render_cards(cards, size).tobytes() == whole(cards).tobytes(), (size, cards)
    assert G.render_cards(cards, size).tobytes() == whole(cards).tobytes()   # from the tiles cache this time


def test_every_rank_draws_differently_at_the_smallest_trained_size():
    images = {rank: G.render_cards([(rank, "spades")] * 4, 224).tobytes() for rank in G.RANKS}
    assert len(set(images.values())) == len(G.RANKS)


def test_vision_env_images_follow_the_seed():
    cfg = PointsConfig(vision=True, suits="red", image_size=96)
    a, b = GeneralPointsEnv(cfg, seed=9), GeneralPointsEnv(cfg, seed=9)
    assert a.reset().image.tobytes() == b.reset().image.tobytes()


# ---- prompt diversity and chain-of-thought answers ----

ORIGINAL_PROMPT = (  # template 0 as the code wrote it before there were templates: it must not move a byte
    "You are an expert player of the 24 points card game. You are dealt four cards. Write one arithmetic formula "
    "that uses the number of every card exactly once, combined with +, -, *, / and parentheses, and that evaluates "
    "to 24.\nAn A counts as 1, J, Q and K each count as 10, and every other card counts as the number printed on "
    'it.\nYour cards: ["A", "7", "K", "3"].\nAnswer with one JSON object and nothing else:\n'
    '{"cards": [x, y, z, w], "number": [a, b, c, d], "formula": "..."}\n'
    'where "cards" are the ranks of the four cards (A, 2-10, J, Q, K), "number" the numbers they count for under '
    'the rule above, in the same order, and "formula" your formula, for example "(2+4)*(9-5)".'
)


def test_template_zero_is_the_original_prompt():
    assert G.prompt_text(["A", "7", "K", "3"], ID) == ORIGINAL_PROMPT
    assert PointsConfig().prompt_template == 0
    # the template-0 prompts of 50 hands in each setting, hashed as the code before templates wrote them
    env_texts = [GeneralPointsEnv(cfg, seed=0).reset(seed=s).text for cfg in (ID, OOD, PointsConfig(vision=True,
                 image_size=64)) for s in range(50)]
    assert hashlib.sha256("\n\0".join(env_texts).encode()).hexdigest() == \
        "f6307770cbb12a7a5a1dbf8026e3f11e7c5894f6a0d6d46bef2430e2e19a7b87"


def test_every_template_keeps_its_wording():
    """Every template's prompts under both rules, text and image, over 20 hands, hashed as the code wrote them when
    each template was a function of its own: they are data now, and not a character may move."""
    rng = random.Random(0)
    hands = [rng.choices(G.RANKS, k=4) for _ in range(20)]
    texts = [G.prompt_text(hand, PointsConfig(face_cards_as_10=rule, vision=vision, prompt_template=k))
             for k in range(G.PROMPT_TEMPLATES) for rule in (True, False) for vision in (False, True) for hand in hands]
    assert hashlib.sha256("\n\0".join(texts).encode()).hexdigest() == \
        "9f6baab01a178c88686a6be9b8b209789dd9894e0c08d05ef73867efd889cd1f"


@pytest.mark.parametrize("rule,vision", [(True, False), (False, False), (True, True), (False, True)])
def test_every_template_states_the_task_and_the_verifier_scores_the_expert(rule, vision):
    assert G.PROMPT_TEMPLATES == 1 + len(prompt_variants.POINTS) >= 8
    orders = set()
    for seed in range(6):
        texts = []
        for k in range(G.PROMPT_TEMPLATES):
            env = GeneralPointsEnv(PointsConfig(face_cards_as_10=rule, vision=vision, image_size=64,
                                                prompt_template=k), seed=0)
            text = env.reset(seed=seed).text
            texts.append(text)
            assert all(f'"{name}"' in text for name in G.ANSWER_FIELDS), (k, text)
            assert "24" in text and all(face in text for face in "JQK")
            faces = [v in text for v in ("11", "12", "13")]
            assert faces == [not rule] * 3, (k, text)  # the rule's face values, and no other rule's
            if vision:
                assert "image" in text and json.dumps(env.ranks) not in text, (k, text)
            else:  # the dealt ranks, in order, whatever the list's punctuation
                cards = re.search(r"\W+(?:and\W+)?".join(map(re.escape, env.ranks)) + r"(?![\w-])", text)
                assert cards, (k, env.ranks, text)
                if not rule:  # where the cards, the rule and the fields come in this wording
                    parts = (cards.start(), text.index("13"), text.index('"formula"'))
                    orders.add(tuple(sorted(range(3), key=parts.__getitem__)))
            assert env.step(env.expert_response())[1] == 5.0
            env.reset(seed=seed)
            assert env.step(env.expert_response(reasoning=True))[1] == 5.0
        assert len(set(texts)) == G.PROMPT_TEMPLATES  # pairwise different
    assert vision or rule or len(orders) >= 4  # the parts come in several orders, not one order reworded


def test_formula_steps_walk_the_formula_innermost_first_exactly():
    assert G.formula_steps("10*3-7+1") == ["10*3=30", "30-7=23", "23+1=24"]
    assert G.formula_steps("(2+4)*(9-5)") == ["2+4=6", "9-5=4", "6*4=24"]
    assert G.formula_steps("8/(3-8/3)") == ["8/3=8/3", "3-(8/3)=1/3", "8/(1/3)=24"]
    assert G.formula_steps("(1-5)*(1-7)") == ["1-5=-4", "1-7=-6", "(-4)*(-6)=24"]
    assert G.formula_steps("((13))") == []
    for bad in ("8/(3-3)", "1+", "2^3"):
        with pytest.raises(ValueError):
            G.formula_steps(bad)
    # every step of the solver's formulas is exact arithmetic, one per operator, the last one landing on the value
    as_formula = lambda side: side.replace("(-", "(0-")  # the formula grammar has no unary minus
    for hand in itertools.islice(itertools.combinations_with_replacement(range(1, 14), 4), 0, None, 7):
        for formula in solve(hand)[:3]:
            steps = G.formula_steps(formula)
            assert len(steps) == 3 and steps[-1].endswith("=24"), (formula, steps)
            for step in steps:
                lhs, rhs = step.split("=")
                assert evaluate_formula(as_formula(lhs)) == evaluate_formula(as_formula("(" + rhs + ")")), step


@pytest.mark.parametrize("cfg", [ID, OOD, PointsConfig(vision=True, image_size=64)], ids=["id", "ood", "vl"])
def test_reasoning_expert_thinks_first_and_passes_the_verifier_in_200_deals(cfg):
    env = GeneralPointsEnv(cfg, seed=4)
    for _ in range(200):
        env.reset()
        text = env.expert_response(reasoning=True)
        answer_ = json.loads(text)
        assert list(answer_) == [G.THOUGHT_FIELD, *G.ANSWER_FIELDS]  # one object, the action still last
        thought = answer_.pop(G.THOUGHT_FIELD)
        assert json.dumps(answer_) == env.expert_response()  # the same answer, a thought before it
        assert verify(text, env.ranks, cfg).outcome == "correct"
        for rank, value in zip(env.ranks, env.values):
            assert f"{rank} counts as {value}" in thought
        assert ", ".join(G.formula_steps(answer_["formula"])) in thought and thought.endswith("=24, the target 24.")
        # train_ppo finds the action as the last '"formula"' of the text: it must lie past the thought
        assert text.rfind(f'"{G.ACTION_FIELD}"') > text.index(json.dumps(thought)) + len(json.dumps(thought))
        assert '"' not in thought and not re.search(r"(cards|number|formula)\W*:", thought)


def test_a_thought_never_changes_the_verdict():
    hand = ["A", "7", "K", "3"]
    thoughts = ["so the formula: 1+1+1+1, cards: [2, 2, 2, 2], number: [2, 2, 2, 2]", 'the "formula": "3*8" works',
                "formula = 24, formula: (10-7)*(3-1)*1 24 = 24", "", "cards: [A, 7, K, 3] formula: 10*3-7+1"]
    bodies = [{"cards": hand, "number": [1, 7, 10, 3], "formula": f} for f in ("10*3-7+1", "10*3+7+1", "10*3-7",
                                                                                 "1+7+10+3", "10*3-7-x")]
    bodies += [{"cards": hand}, {"cards": ["A", "7", "Q", "3"], "formula": "10*3-7+1"}]
    for cfg in (ID, VL):
        for body in bodies:
            plain = verify(json.dumps(body), hand, cfg)
            # the JSON-like form (single quotes) goes through the field patterns rather than the JSON decoder
            loose = "{" + ", ".join(f"'{key}': {json.dumps(value)}" for key, value in body.items()) + "}"
            loose_plain = verify(loose, hand, cfg)
            for thought in thoughts:
                strict = json.dumps({G.THOUGHT_FIELD: thought, **body})
                assert verify(strict, hand, cfg) == plain, (strict, cfg)
                text = '{"thought": ' + json.dumps(thought) + ", " + loose[1:]
                assert verify(text, hand, cfg) == loose_plain, (text, cfg)


def test_wrong_answer_keeps_the_thought_and_changes_the_formula():
    env, rng = GeneralPointsEnv(OOD, seed=2), random.Random(0)
    for seed in range(100):
        env.reset()
        expert, plain = env.expert_response(reasoning=True), env.expert_response()
        wrong = json.loads(G.wrong_answer(expert, random.Random(seed)))
        right = json.loads(expert)
        assert list(wrong) == list(right) and {**wrong, "formula": right["formula"]} == right
        # the same draw as without a thought: the revision data only gains the reasoning
        assert wrong["formula"] == json.loads(G.wrong_answer(plain, random.Random(seed)))["formula"]
        assert wrong["formula"] != right["formula"]
    with_thought = json.loads(G.wrong_answer(json.dumps({"thought": "10*3=30", "cards": ["A"], "number": [1],
                                                         "formula": "10*3-7+1"}), rng))
    assert with_thought["thought"] == "10*3=30" and with_thought["formula"] != "10*3-7+1"


# ---- config, CLI, doctests ----

@pytest.mark.parametrize("kwargs,match", [
    ({"suits": "blue"}, "suits='blue'"), ({"verify_iter": 0}, "verify_iter=0"), ({"image_size": 10}, "image_size=10"),
    ({"image_size": 4097}, "image_size=4097"), ({"prompt_template": G.PROMPT_TEMPLATES}, "prompt_template=10"),
    ({"prompt_template": -1}, "prompt_template=-1"), ({"prompt_template": True}, "prompt_template=True"),
])
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PointsConfig(**kwargs)


def test_cli_prints_prompt_writes_image_and_plays_expert(tmp_path):
    img = tmp_path / "hand.png"
    out = subprocess.run([sys.executable, "env_points.py", "--episodes", "300", "--image", str(img), "--ood-rule"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Your cards:" in out.stdout and "300/300 episodes solved (100.0%)" in out.stdout
    from PIL import Image
    assert Image.open(img).size == (448, 448)


@pytest.mark.parametrize("args,says", [
    (["--image-size", "8"], "image_size=8: expected 64 to 4096"),
    (["--image-size", "100000"], "image_size=100000: expected 64 to 4096"),  # once: killed for memory
    (["--image", "x.xyz"], "Pillow writes no .xyz images; expected a file name ending in .png"),
    (["--image", "x"], "no file extension"),
    (["--image", "{tmp}/no/such/folder/x.png"], "cannot write it (No such file or directory); expected a writable"),
    (["--image", "{tmp}/a_file/x.png"], "cannot write it (Not a directory)"),
    (["--target", "100000"], "target=100000: no solvable hand in 100000 deals; expected a target"),
    (["--episodes", "-1"], "--episodes -1: expected 0 or a positive integer"),
    (["--episodes", "many"], "--episodes: invalid int value: 'many'"),
    (["--suits", "blue"], "invalid choice: 'blue' (choose from"),
    (["--seed"], "--seed: expected one argument"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_cli_bad_value_is_one_line(tmp_path, args, says):
    (tmp_path / "a_file").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "env_points.py"), "--episodes", "1", *args],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.strip().count("\n") == 0, out.stderr
    assert says in out.stderr
    assert not any(tmp_path.glob("*.png"))


def test_doctests():
    assert doctest.testmod(G).failed == 0
