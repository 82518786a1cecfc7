"""Fuzz the verifiers: N answers per environment through `step`, every call timed.

    python tests/fuzz_verifiers.py                  # 100,000 answers per environment
    python tests/fuzz_verifiers.py --n 2000 --seed 3 --envs gp-l,virl-l-rel

Environments: GP-L, GP-VL (vision: the "cards" field is verified first), V-IRL-L with absolute and with
relative actions. Answers mix four kinds: random printable strings, JSON-like answers with random fields,
mutated expert answers (a fifth of them left intact, so that correct answers move the episodes on), and
pathological families up to --max-chars characters (runs of one character, nested brackets, many quotes,
many keys, "intersection no no ...", long digit strings, deep parentheses, huge numbers multiplied, unclosed
turn_direction( arguments ...). Only `step` is timed: resets, and building the answers, are not.

Prints one JSON line per environment: calls, exceptions (must be 0), the slowest call with its family and
length, the 99.9th percentile, the calls over --budget-ms, and each family's slowest call. Exits 1 on any
exception. A standalone script, not a test: it asserts no timing, which depends on the machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import sys
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import env_points as G  # noqa: E402  (after the path: run as a script from anywhere)
import env_virl as V  # noqa: E402

KEYS = G.ANSWER_FIELDS + V.ANSWER_FIELDS
PRINTABLE = string.printable


def _length(rng: random.Random, max_chars: int) -> int:
    """Log-uniform from 16 to max_chars, a quarter of the time exactly max_chars: the parsers' cap."""
    if rng.random() < 0.25:
        return max_chars
    return int(math.exp(rng.uniform(math.log(16), math.log(max_chars))))


def _fit(unit: str, n: int) -> str:
    return unit * max(1, n // max(1, len(unit)))


def _json_field(key: str, value: str) -> str:
    return json.dumps({key: value})


# ---- the four kinds of answers: each a function (rng, env, max_chars) -> answer ----

def printable(rng, env, max_chars):
    n = int(math.exp(rng.uniform(0, math.log(400))))
    if rng.random() < 0.1:  # any code point, lone surrogates included
        return "".join(chr(rng.randrange(0x110000)) for _ in range(n))
    return "".join(rng.choices(PRINTABLE, k=n))


def _random_value(rng, depth=0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice((True, False))
    if kind == 2:
        return rng.choice((0, 1, -1, 24, 10 ** rng.randrange(1, 400), rng.randrange(-10 ** 6, 10 ** 6)))
    if kind == 3:
        return rng.choice((0.5, -0.0, 1e308, float("inf"), float("nan"), rng.random()))
    if kind in (4, 5):
        return rng.choice(("", "forward()", "stop()", "turn_direction(north)", "turn_direction(slightly left)",
                           "You observe an intersection", "no intersection", "(1+2)*8", "8/(3-8/3)", "K", "10",
                           printable(rng, None, 0)))
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {rng.choice(KEYS): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def json_random(rng, env, max_chars):
    obj = {rng.choice(KEYS + ("thoughts", "x", "")): _random_value(rng) for _ in range(rng.randrange(1, 6))}
    style = rng.randrange(4)
    if style == 0:
        text = json.dumps(obj)
    elif style == 1:  # Python's repr: single quotes, True, None
        text = repr(obj)
    elif style == 2:  # keys unquoted, values bare
        text = "{" + ", ".join(f"{k}: {v}" for k, v in obj.items()) + "}"
    else:  # a fenced block with chatter around it
        text = "Sure! ```json\n" + json.dumps(obj, indent=rng.choice((None, 2))) + "\n``` Hope it helps."
    if rng.random() < 0.2:
        text = text[:rng.randrange(len(text) + 1)]
    return text


def expert_mutated(rng, env, max_chars):
    text = env.expert_response()
    if rng.random() < 0.2:
        return text
    for _ in range(rng.randrange(1, 6)):
        i = rng.randrange(len(text) + 1)
        op = rng.randrange(6)
        if op == 0:
            text = text[:i] + text[i + 1:]
        elif op == 1:
            text = text[:i] + rng.choice(PRINTABLE) + text[i:]
        elif op == 2:
            text = text[:i] + rng.choice("{}[]()\"',:=+-*/ 0123456789") + text[i + 1:]
        elif op == 3:
            j = rng.randrange(len(text) + 1)
            text = text[:i] + text[min(i, j):max(i, j)] + text[i:]
        elif op == 4:
            text = text.swapcase() if rng.random() < 0.3 else text.replace('"', rng.choice(("'", "")))
        else:
            text = text[:i]
    return text


def _pathological(rng, n):
    """(family, answer of about n characters)."""
    family = rng.choice(PATHOLOGICAL)
    digits = "".join(rng.choices("0123456789", k=min(n, 10_000))) if family in ("digits", "big_numbers") else ""
    if family == "run":
        return family, rng.choice("{}[]()\"'\\ \n\t,:;.=9a-+*/_") * n
    if family == "nested_brackets":
        unit = rng.choice(('{"formula": ', '{"action": ', "[", "{", '{"x": [', "(("))
        return family, _fit(unit, n // 2) + rng.choice(("", "1", "]" * (n // 4), "}" * (n // 4)))
    if family == "unterminated_arrays":  # every `{` decoded to the end: the 16 tries of _json_object
        return family, '{"x": [' * 16 + _fit(rng.choice(("1,", '"a",', "{},", "null,")), n)
    if family == "quotes":
        return family, _fit(rng.choice(('"', "'", '\\"', "\"'", '"formula": "', "'action': '")), n)
    if family == "many_keys":
        key = rng.choice(KEYS)
        return family, _fit(rng.choice((f'"{key}": "1", ', f"{key}: ", f"{key}:\n", f"'{key}': [", f'"{key}": ,')), n)
    if family == "field_then_newlines":
        return family, rng.choice(KEYS) + ":" + "\n" * n + rng.choice(("", "1", ","))
    if family == "intersection_no":
        neg = rng.choice(("no ", "not ", "nor ", "without ", "No ", "no, ", "no intersection ", "intersection no "))
        obs = rng.choice(("intersection ", "", "You observe an ")) + _fit(neg, n)
        if rng.random() < 0.3:
            return family, obs
        return family, json.dumps({"current observation": obs, "current instruction": "x",
                                   "action": rng.choice(("forward()", "stop()", "turn_direction(north)", "walk"))})
    if family == "digits":
        return family, rng.choice((_json_field("formula", digits), "formula: " + digits, '{"formula": ' + digits + "}",
                                   '{"cards": [' + digits + '], "formula": "1"}', _json_field("action", digits)))
    if family == "deep_parens":
        k = n // 2
        inner = rng.choice(("(" * k + "1" + ")" * k, "(" * k, ")" * k, "(1+" * (k // 3) + "1" + ")" * (k // 3),
                            "(" * 64 + "1" + ")" * 64, "(" * 65 + "1" + ")" * 65))
        return family, _json_field("formula", inner) if rng.random() < 0.7 else "formula: " + inner
    if family == "big_numbers":  # an exact evaluator meets numbers of thousands of digits, or their like
        m = rng.randrange(2, 12)
        formula = rng.choice(("*".join([digits[:4000]] * m), "9**9**9", "*".join(["9" * 50] * 10),
                              "+".join(f"1/{p}" for p in range(2, 120)), "9" * 511 + "*9",
                              "*".join(["99"] * 170), "/".join(["7"] * 256)))
        return family, _json_field("formula", formula)
    if family == "turn_direction":
        arg = rng.choice((" " * n, "'" + " " * n, '"' + " " * n + '"', "\t" * n, "a " * (n // 2), " " * n + ")"))
        return family, rng.choice((_json_field("action", "turn_direction(" + arg), "action: turn_direction(" + arg,
                                   _json_field("action", _fit(rng.choice(("turn_direction(", "turn_direction('a' 'b')",
                                                                          "forward", "stop ")), n))))
    if family == "escapes":
        return family, '{"formula": "' + _fit(rng.choice(("\\\\", "\\u0041", "\\ud800", "\\n", "\\")), n) + '"}'
    if family == "cards_list":
        item = rng.choice(('"A",', "1,", '"king of spades",', "[],", '"' + "x" * 100 + '",'))
        return family, '{"cards": [' + _fit(item, n) + '], "formula": "1+2+3*4"}'
    raise AssertionError(family)


PATHOLOGICAL = ("run", "nested_brackets", "unterminated_arrays", "quotes", "many_keys", "field_then_newlines",
                "intersection_no", "digits", "deep_parens", "big_numbers", "turn_direction", "escapes", "cards_list")


def pathological(rng, env, max_chars):
    family, text = _pathological(rng, _length(rng, max_chars))
    return family, text[:max_chars] if rng.random() < 0.5 else text


def not_a_string(rng, env, max_chars):
    return rng.choice((None, 24, 1.5, b'{"formula": "1+2"}', b"\xff\xfe", ["forward()"], {"formula": "1"}))


KINDS = ((printable, 0.25), (json_random, 0.22), (expert_mutated, 0.2), (pathological, 0.3), (not_a_string, 0.03))


# ---- environments ----

def environments(seed: int) -> dict:
    return {
        "gp-l": G.GeneralPointsEnv(G.PointsConfig(), seed=seed),
        "gp-vl": G.GeneralPointsEnv(G.PointsConfig(vision=True, image_size=64), seed=seed),  # the image is not verified
        "virl-l-abs": V.NavigationEnv(V.VirlConfig(n_routes=100), seed=seed),
        "virl-l-rel": V.NavigationEnv(V.VirlConfig(n_routes=100, absolute_actions=False), seed=seed),
    }


def percentile(sorted_values, q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def fuzz(name: str, env, n: int, rng: random.Random, max_chars: int, budget_ms: float) -> dict:
    kinds, weights = zip(*KINDS)
    times, families = array("d"), []
    exceptions, first_exception, longest = 0, None, 0
    slowest = {}  # family -> (ms, characters)
    start = time.perf_counter()
    env.reset()
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        answer = kind(rng, env, max_chars)
        family = kind.__name__
        if isinstance(answer, tuple):
            family, answer = answer
        t0 = time.perf_counter()
        try:
            done = env.step(answer)[2]
        except Exception as e:  # noqa: BLE001  (any exception is what the fuzzer is after)
            done = True
            exceptions += 1
            first_exception = first_exception or f"{family}: {e!r}"[:300]
        ms = (time.perf_counter() - t0) * 1000
        times.append(ms)
        size = len(answer) if isinstance(answer, (str, bytes)) else 0
        longest = max(longest, size)
        if ms > slowest.get(family, (-1.0, 0))[0]:
            slowest[family] = (ms, size)
        families.append(family)
        if done:
            env.reset()
    ordered = sorted(times)
    worst = max(range(len(times)), key=times.__getitem__)
    return {"env": name, "calls": n, "exceptions": exceptions, "first_exception": first_exception,
            "slowest_ms": round(times[worst], 3), "slowest_family": families[worst],
            "slowest_chars": slowest[families[worst]][1], "p999_ms": round(percentile(ordered, 0.999), 3),
            "p99_ms": round(percentile(ordered, 0.99), 3), "median_ms": round(percentile(ordered, 0.5), 4),
            f"over_{budget_ms:g}ms": sum(t > budget_ms for t in times), "longest_answer_chars": longest,
            "seconds": round(time.perf_counter() - start, 1),
            "slowest_by_family_ms": {f: round(ms, 3) for f, (ms, _) in sorted(slowest.items())}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="answers per environment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=50_000, help="longest pathological answer (the parsers' cap)")
    p.add_argument("--budget-ms", type=float, default=50.0, help="count the calls slower than this")
    p.add_argument("--envs", default="gp-l,gp-vl,virl-l-abs,virl-l-rel", help="comma-separated environments")
    args = p.parse_args(argv)
    envs = environments(args.seed)
    names = args.envs.split(",")
    unknown = [x for x in names if x not in envs]
    if args.n < 1 or args.max_chars < 16 or unknown:
        p.error(f"expected --n >= 1, --max-chars >= 16 and --envs among {', '.join(envs)}")
    failed = False
    for i, name in enumerate(names):
        report = fuzz(name, envs[name], args.n, random.Random(args.seed * 1000 + i), args.max_chars, args.budget_ms)
        print(json.dumps(report), flush=True)
        failed |= report["exceptions"] > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
