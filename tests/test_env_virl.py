"""V-IRL: geometry, synthetic world, route files, rail, verifier, episodes, the environment contract, rendering and
real street views (streetview.py)."""
import ast
import doctest
import hashlib
import json
import math
import operator
import os
import pickle
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import env_virl as V
import prompt_variants
import streetview as SV
from env_virl import NavigationEnv, VirlConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def play_expert(env, route=None):
    env.reset(route=route)
    done, steps = False, 0
    while not done:
        _, reward, done, info = env.step(env.expert_response())
        assert reward == 1.0 and info["outcome"] == "correct"
        steps += 1
    return info, steps


# ---- geometry ----

def test_haversine_and_bearing_hand_cases():
    assert V.haversine((0, 0), (1, 0)) == pytest.approx(111_195, rel=1e-4)  # one degree of latitude
    assert V.haversine((0, 0), (0, 1)) == pytest.approx(111_195, rel=1e-4)  # one degree of longitude at the equator
    assert V.haversine((60, 0), (60, 1)) == pytest.approx(55_597, rel=2e-3)  # cos 60 = 1/2
    for b, target in [(0, (1, 0)), (90, (0, 1)), (180, (-1, 0)), (270, (0, -1)), (45, (0.001, 0.001))]:
        assert V.bearing((0, 0), target) == pytest.approx(b, abs=1e-3)
    p = V.offset((40.75, -73.98), 29, 150.0)
    assert V.haversine((40.75, -73.98), p) == pytest.approx(150, rel=2e-3)
    assert V.bearing((40.75, -73.98), p) == pytest.approx(29, abs=0.2)


@pytest.mark.parametrize("heading,name", [(0, "north"), (22.4, "north"), (22.5, "northeast"), (67.4, "northeast"),
                                          (90, "east"), (180, "south"), (270, "west"), (337.5, "north"),
                                          (337.4, "northwest"), (359.9, "north"), (-45, "northwest")])
def test_direction_names(heading, name):
    assert V.direction_name(heading) == name


@pytest.mark.parametrize("frm,to,turn", [
    (0, 90, "right"), (0, 46, "right"), (0, 45, "slightly right"), (0, 1, "slightly right"), (0, 0, "slightly right"),
    (0, -1, "slightly left"), (0, 315, "slightly left"), (0, 314, "left"), (0, 270, "left"), (0, 180, "left"),
    (350, 10, "slightly right"),   # wrapped: +20 (the paper's unwrapped -340 said "left")
    (10, 350, "slightly left"), (350, 80, "right"), (80, 350, "left"), (300, 29, "right"), (29, 299, "left"),
])
def test_turn_names_at_the_45_degree_boundaries_and_across_north(frm, to, turn):
    assert V.turn_name(frm, to) == turn


@pytest.mark.parametrize("rel,name", [(0, "front"), (44, "right front"), (90, "right"), (135, "right behind"),
                                      (180, "behind"), (-135, "left behind"), (270, "left"), (-40, "left front"),
                                      (22.4, "front"), (22.5, "right front")])
def test_relation_names(rel, name):
    assert V.relation_name(rel) == name


# ---- synthetic world and route files ----

def test_generated_routes_are_valid_and_reproducible():
    a, b = V.generate_routes("nyc", 60, seed=3), V.generate_routes("nyc", 60, seed=3)
    assert json.dumps(a) == json.dumps(b) and json.dumps(a) != json.dumps(V.generate_routes("nyc", 60, seed=4))
    for raw in a:
        geocodes = raw["route_results"]["geocode_list"]
        assert 3 <= len(geocodes) <= 6 and len(raw["milestone_info"]) == len(geocodes)  # 2-5 intersections + dest
        assert 1 <= raw["init_heading"] < 360
        route = V.parse_route(raw)
        here = route.start
        for point, heading in zip(route.points, route.headings):
            assert abs(V.wrap180(V.bearing(here, point) - heading)) <= 1.0  # file headings match the geocodes
            assert 10 < V.haversine(here, point) < 400
            here = point
        for k in range(1, len(route.headings)):
            assert abs(V.wrap180(route.headings[k] - route.headings[k - 1])) == pytest.approx(90, abs=2)
        assert route.dest_name == raw["dest_place"]["name"] and route.landmarks[-1][0][0] == route.dest_name
        assert "The destination" in raw["milestone_info"][-1]


def test_cities_have_fixed_maps_and_many_names():
    assert len(V.LANDMARK_NAMES) == len(set(V.LANDMARK_NAMES)) >= 300
    assert len(V.OOD_CITIES) == 9 and V.ID_CITY not in V.OOD_CITIES
    m = V.city_map("tokyo")
    assert m is V.city_map("tokyo") and len(m.nodes) == 144
    with pytest.raises(ValueError, match="unknown city 'atlantis'"):
        V.generate_routes("atlantis", 1)


def test_mini_benchmark_is_stable():
    routes = V.mini_benchmark()
    assert len(routes) == 18
    assert sorted({r["city"] for r in routes}) == sorted(V.OOD_CITIES)
    assert all(sum(r["city"] == c for r in routes) == 2 for c in V.OOD_CITIES)
    digest = hashlib.sha256(json.dumps(routes, sort_keys=True).encode()).hexdigest()
    assert digest == MINI_SHA256, digest  # changing the generator changes the benchmark: bump this on purpose
    code = ("import env_virl, hashlib, json; print(hashlib.sha256(json.dumps(env_virl.mini_benchmark(), "
            "sort_keys=True).encode()).hexdigest())")
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert out.stdout.strip() == MINI_SHA256


MINI_SHA256 = "470a246c11af06e85abd49aa4241d599947c94164ba98530a67319716db5527e"


def test_route_file_round_trip_and_real_format(tmp_path):
    path = tmp_path / "routes.json"
    raws = V.generate_routes("london", 5, seed=1)
    V.write_routes(str(path), raws)
    assert json.loads(path.read_text())[1] == 5
    env_file = NavigationEnv(VirlConfig(routes=str(path)), seed=0)
    assert [r.headings for r in env_file.routes] == [V.parse_route(r).headings for r in raws]
    # a real-format route: no city, init_heading 0 (drawn at reset), block text with a trailing comma
    real = {"start_place": {"relocated_geocode": [40.7, -74.0]}, "init_heading": 0,
            "dest_place": {"name": "Joe's Pizza"},
            "route_results": {"geocode_list": [[40.701, -74.0], [40.701, -73.999]]},
            "milestone_info": "{ \"intersection_idx\": \"1\", \"landmarks\": \"Prince St is on your front\", "
                              "\"distance\": \"111 meters\", \"human_heading\": \"0\", "
                              "\"to_next_intersection_heading\": \"0 (north)\", }\n"
                              "{ \"intersection_idx\": \"2\", \"landmarks\": \"The destination Joe's Pizza is on "
                              "your right front\", \"distance\": \"84 meters\", \"human_heading\": \"0\", "
                              "\"to_next_intersection_heading\": \"90 (east)\", }"}
    route = V.parse_route(real)
    assert route.city is None and route.init_heading == 0 and route.headings == [0, 90]
    assert route.landmarks == [[("Prince St", 0)], [("Joe's Pizza", 135)]]
    V.write_routes(str(path), [real])
    env = NavigationEnv(VirlConfig(routes=str(path)), seed=0)
    info, _ = play_expert(env)
    assert info["success"]


@pytest.mark.parametrize("bad,match", [
    ({"route_results": {"geocode_list": [[1, 2]]}, "milestone_info": []}, "start_place.relocated_geocode"),
    ({"start_place": {"relocated_geocode": [1, 2]}, "milestone_info": []}, "route_results.geocode_list"),
    ({"start_place": {"relocated_geocode": [1, 2]}, "route_results": {"geocode_list": [[1, 2]]}}, "milestone_info"),
    ({"start_place": {"relocated_geocode": [1, 2]}, "route_results": {"geocode_list": [[1, 2]]},
      "milestone_info": []}, "1 geocodes but 0 milestone_info blocks"),
    ({"start_place": {"relocated_geocode": ["x", 2]}, "route_results": {"geocode_list": [[1, 2]]},
      "milestone_info": []}, r"start_place.relocated_geocode is \['x', 2\]; expected \[lat, lng\]"),
])
def test_bad_routes_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        V.parse_route(bad, "f.json: route 7")


def test_missing_or_broken_route_file_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        NavigationEnv(VirlConfig(routes=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        NavigationEnv(VirlConfig(routes=str(tmp_path / "bad.json")))


# ---- rail, prompts, episodes ----

def test_rail_shape_and_instruction_numbering():
    env = NavigationEnv(VirlConfig(n_routes=20, drop_rate=0.0), seed=0)
    for i in range(20):
        env.reset(route=i)
        route, rail = env.route, env.rail
        n = len(route.points)
        assert rail[0].action == "turn" and rail[0].point == route.start and rail[-1].action == "stop"
        assert [p.action for p in rail].count("turn") == n and sum(p.at_intersection for p in rail) == n - 1
        assert len(env.steps) == 2 * n and env.steps[0].startswith("First, turn")
        assert all(rail[k].instruction <= rail[k + 1].instruction for k in range(len(rail) - 1))
        assert all(rail[k].point != rail[k + 1].point for k in range(len(rail) - 1))  # every position moves on


def test_paper_rail_defaults():
    cfg = VirlConfig()
    assert (cfg.straight_line_length, cfg.drop_rate, cfg.verify_iter) == (5, 0.5, 2)  # the paper's configs


def hand_route(city=None):
    """Start, 100 m north to an intersection, 30 m east to another, 100 m north to the destination."""
    start = (40.75, -73.98)
    a = V.offset(start, 0, 100)
    b = V.offset(a, 90, 30)
    dest = V.offset(b, 0, 100)
    return V.Route("hand", city, start, 200, [a, b, dest], [0, 90, 0],
                   [[("Maple Cafe", 270)], [], [("Summit Cafe", 90)]], "Summit Cafe")


def test_rail_cuts_each_street_in_five_and_no_forward_follows_a_turn():
    route = hand_route()
    rail = V.build_rail(route, 5, 0.0, random.Random(0), 200)
    assert [p.action for p in rail] == ["turn"] + ["forward"] * 4 + ["turn"] + ["forward"] * 2 + ["turn"] + \
        ["forward"] * 4 + ["stop"]
    assert [p.instruction for p in rail] == [1, 2, 2, 2, 2, 3, 4, 4, 5, 6, 6, 6, 6, 6]
    # cuts every fifth of a street; on the 30 m street the cuts 6 m from its ends are left out
    along = [V.haversine(route.start, p.point) for p in rail[1:5]]
    assert along == pytest.approx([20, 40, 60, 80], abs=0.1)
    assert [V.haversine(route.points[0], p.point) for p in rail[6:8]] == pytest.approx([12, 18], abs=0.1)
    # turns happen where the street ends, and the next position is already down the new street
    assert rail[5].point == route.points[0] and rail[5].at_intersection and rail[5].turn_to == 90
    assert rail[6].point != rail[5].point and rail[6].heading == 90
    assert rail[0].heading == 200 and rail[0].turn_to == 0 and not rail[0].at_intersection
    assert rail[-1].point == route.points[-1] and rail[-1].destination == "Summit Cafe" and not rail[-1].at_intersection


def test_drop_rate_drops_each_cut_with_its_probability():
    route = hand_route()
    kept = [len(V.build_rail(route, 5, 0.5, random.Random(seed), 200)) - 4 for seed in range(400)]
    assert sum(kept) / (400 * 10) == pytest.approx(0.5, abs=0.03)  # 10 candidate cuts, each kept half the time
    assert min(kept) >= 0 and max(kept) <= 10 and len(set(kept)) >= 8
    again = [len(V.build_rail(route, 5, 0.5, random.Random(seed), 200)) - 4 for seed in range(400)]
    assert kept == again
    none = V.build_rail(route, 5, 0.0, random.Random(0), 200)
    bare = V.build_rail(route, 1, 0.0, random.Random(0), 200)  # one part per street: no cut at all
    assert [p.action for p in bare] == ["turn", "turn", "turn", "stop"] and len(none) == 14


def test_drop_rate_skips_forward_positions_reproducibly():
    full = NavigationEnv(VirlConfig(n_routes=5, drop_rate=0.0), seed=1)
    dropped = NavigationEnv(VirlConfig(n_routes=5, drop_rate=0.5), seed=1)
    again = NavigationEnv(VirlConfig(n_routes=5, drop_rate=0.5), seed=1)
    lens = [(full.reset(route=i) and len(full.rail), dropped.reset(route=i) and len(dropped.rail),
             again.reset(route=i) and len(again.rail)) for i in range(5)]
    assert all(d <= f for f, d, _ in lens) and sum(f - d for f, d, _ in lens) > 0
    assert [d for _, d, _ in lens] == [a for _, _, a in lens]


@pytest.mark.parametrize("absolute", [True, False])
def test_expert_completes_500_text_routes(absolute):
    env = NavigationEnv(VirlConfig(absolute_actions=absolute, n_routes=500), seed=0)
    for i in range(500):
        info, steps = play_expert(env, route=i)
        assert info["success"] and steps == len(env.rail)


@pytest.mark.parametrize("absolute", [True, False])
def test_expert_completes_500_vision_routes(absolute):
    routes = "synthetic:nyc" if absolute else "mini"
    env = NavigationEnv(VirlConfig(routes=routes, absolute_actions=absolute, vision=True, n_routes=500,
                                   view_size=32, straight_line_length=2), seed=0)
    for i in range(500):
        obs = env.reset(route=i % len(env.routes))
        assert obs.image.size == (64, 64) and "You observe an image of 4 views" in obs.text
        done = False
        while not done:
            obs, _, done, info = env.step(env.expert_response())
            assert info["recognized"] is True
            assert done or obs.image is not None
        assert info["success"]


def test_prompt_holds_instructions_history_and_rule():
    env = NavigationEnv(VirlConfig(n_routes=3, absolute_actions=False), seed=0)
    text = env.reset(route=0).text
    assert "1. First, turn" in text and "O_1: No landmarks nearby" in text and "A_1" not in text
    assert "left, right, slightly left, slightly right" in text and "northeast" not in text.split("[Action space]")[1]
    env.step(env.expert_response())
    text = env._observation().text
    assert "A_1: turn_direction(" in text and "O_2:" in text
    abs_env = NavigationEnv(VirlConfig(n_routes=3), seed=0)
    assert "north, northeast, east" in abs_env.reset(route=0).text


def test_vl_prompt_keeps_the_intersection_cue_and_the_text_history():
    env = NavigationEnv(VirlConfig(vision=True, view_size=32), seed=0, routes=[hand_route("nyc")])
    text = env.reset(route=0).text
    assert "O_1: You observe an image of 4 views\n" in text  # not at an intersection: the image alone
    while not env.position.at_intersection:
        obs, _, _, _ = env.step(env.expert_response())
    assert f"O_{env.index + 1}: You observe an image of 4 views; You observe an intersection\n" in obs.text
    assert "Maple Cafe" not in obs.text.split("[Observations and actions so far]")[1]  # it is in the image
    obs, _, _, _ = env.step(env.expert_response())
    history = obs.text.split("[Observations and actions so far]")[1]
    # the paper's history holds the text of past observations, in V-IRL-VL as in V-IRL-L
    assert f"O_{env.index}: Maple Cafe is on your left; You observe an intersection\nA_{env.index}: " \
           "turn_direction(east)" in history
    assert f"O_{env.index + 1}: You observe an image of 4 views\n" in history
    text_env = NavigationEnv(VirlConfig(), seed=0, routes=[hand_route()])
    text_env.reset(route=0)
    for _ in range(env.index):
        text_env.step(text_env.expert_response())
    assert text_env.history == env.history


def test_sequential_revision_and_route_failure():
    env = NavigationEnv(VirlConfig(n_routes=3, verify_iter=2), seed=0)
    env.reset(route=0)
    obs, reward, done, info = env.step('{"action": "stop()"}')  # the first position needs a turn
    assert (reward, done, info["outcome"], info["attempt"]) == (-1.0, False, "wrong_action", 1)
    assert obs.continues and obs.text.startswith("You failed this trial because stop() is not the right action")
    obs, reward, done, info = env.step("gibberish")
    assert (reward, info["outcome"], info["position"]) == (-1.0, "invalid_action", 0)
    # attempts used up: the route ends there, failed (the paper truncates it), without walking on
    assert done and not info["success"] and not obs.continues and env.index == 0
    with pytest.raises(RuntimeError, match="reset"):
        env.step("forward()")


@pytest.mark.parametrize("verify_iter", [1, 3])
def test_a_failed_position_ends_the_route_and_reset_starts_a_new_one(verify_iter):
    env = NavigationEnv(VirlConfig(verify_iter=verify_iter, drop_rate=0.0), seed=0, routes=[hand_route()])
    env.reset(route=0)
    for _ in range(5):  # into the route, to the first intersection: the positions after it must not count
        env.step(env.expert_response())
    failing = env.index
    assert env.position.action == "turn" and len(env.rail) == 14
    for attempt in range(1, verify_iter + 1):
        obs, reward, done, info = env.step(answer(obs=V.observation_text(env.position), action="forward()"))
        assert (info["attempt"], info["position"], done, info["success"]) == (attempt, failing, attempt == verify_iter,
                                                                             False)
    assert env.index == failing and info["outcome"] == "wrong_action" and obs.text.startswith("You failed")
    obs = env.reset(route=0)
    assert (env.index, env.attempt, env.done, env.history) == (0, 0, False, []) and "O_1:" in obs.text
    info, _ = play_expert(env, route=0)
    assert info["success"]


def test_failing_the_stop_ends_the_route_failed():
    env = NavigationEnv(VirlConfig(verify_iter=2), seed=0, routes=[hand_route()])
    env.reset(route=0)
    while env.position.action != "stop":
        env.step(env.expert_response())
    _, _, done, info = env.step(answer(action="forward()"))
    assert not done
    _, _, done, info = env.step(answer(action="forward()"))
    assert done and not info["success"]


def test_correct_on_second_attempt_still_succeeds():
    env = NavigationEnv(VirlConfig(n_routes=3, verify_iter=2), seed=0)
    env.reset(route=1)
    env.step('{"action": "forward()"}')
    done = False
    while not done:
        _, _, done, info = env.step(env.expert_response())
    assert info["success"]


# ---- verifier ----

def position(at_intersection=False, action="forward", heading=0, turn_to=None):
    return V.Position((0.0, 0.0), heading, action, 1, turn_to=turn_to, at_intersection=at_intersection)


def answer(obs="No landmarks nearby", action="forward()"):
    return json.dumps({"current observation": obs, "current instruction": "x", "action": action})


@pytest.mark.parametrize("pos,text,absolute,outcome", [
    (position(), answer(), True, "correct"),
    (position(), answer(action="stop()"), True, "wrong_action"),
    (position(), answer(obs="You observe an intersection"), True, "correct"),       # right action: the claim is moot
    (position(True), answer(), True, "correct"),                                      # missed, but the right action
    (position(), answer(obs="You observe an intersection", action="stop()"), True, "wrong_observation"),  # claimed
    (position(True), answer(action="stop()"), True, "wrong_observation"),             # missed, wrong action
    (position(), answer(obs="You observe an intersection", action="walk"), True, "wrong_observation"),  # no action
    (position(True), answer(obs="Cafe on your left; You observe an intersection"), True, "correct"),
    (position(), answer(obs="There is no intersection here"), True, "correct"),
    (position(action="turn", heading=350, turn_to=10), answer(action="turn_direction(north)"), True, "correct"),
    (position(action="turn", heading=350, turn_to=10), answer(action="turn_direction(slightly right)"), False,
     "correct"),
    (position(action="turn", heading=350, turn_to=10), answer(action="turn_direction(left)"), False, "wrong_action"),
    (position(action="turn", heading=350, turn_to=10), answer(action="turn_direction(north)"), False, "invalid_action"),
    (position(action="turn", heading=0, turn_to=90), answer(action="turn_direction(right)"), True, "invalid_action"),
    (position(action="turn", heading=0, turn_to=90), answer(action="Turn_Direction('East')"), True, "correct"),
    (position(action="turn", heading=0, turn_to=315), answer(action='turn_direction("slightly_left")'), False,
     "correct"),
    (position(action="turn", heading=0, turn_to=45), answer(action="turn_direction(north east)"), True, "correct"),
    (position(action="stop"), answer(action="stop"), True, "correct"),
    (position(), answer(action="walk ahead"), True, "invalid_action"),
    (position(), '{"current observation": "No landmarks nearby"}', True, "invalid_action"),
    (position(), "", True, "invalid_action"),
    (position(), "current observation: No landmarks nearby, action: forward()", True, "correct"),
    (position(), "```json\n" + answer() + "\n```", True, "correct"),
])
def test_verifier_outcomes(pos, text, absolute, outcome):
    v = V.verify(text, pos, absolute)
    assert v.outcome == outcome, v.feedback
    assert v.reward == V.REWARDS[outcome]


def test_right_turn_scores_plus_one_whatever_the_intersection_claim():
    turn = position(True, "turn", 0, 90)
    missed = V.verify(answer(obs="Maple Cafe is on your left", action="turn_direction(east)"), turn, True)
    assert (missed.outcome, missed.reward, missed.observation_ok) == ("correct", 1.0, False)
    wrong = V.verify(answer(obs="Maple Cafe is on your left", action="turn_direction(west)"), turn, True)
    assert (wrong.outcome, wrong.reward) == ("wrong_observation", -1.5)
    assert "did not notice the intersection" in wrong.feedback
    claimed = V.verify(answer(obs="You observe an intersection", action="stop()"), position(), True)
    assert (claimed.outcome, claimed.reward) == ("wrong_observation", -1.5)
    assert "where there is none" in claimed.feedback
    unreadable = V.verify(answer(action="turn_direction(up)"), turn, True)  # misses the intersection too
    assert (unreadable.outcome, unreadable.reward) == ("wrong_observation", -1.5)
    unreadable = V.verify(answer(obs=V.INTERSECTION_CUE, action="turn_direction(up)"), turn, True)
    assert (unreadable.outcome, unreadable.reward) == ("invalid_action", -1.0)
    # in an episode: the correct turn with a missed claim passes the position
    env = NavigationEnv(VirlConfig(), seed=0, routes=[hand_route()])
    env.reset(route=0)
    while env.position.action != "turn" or not env.position.at_intersection:
        env.step(env.expert_response())
    at = env.index
    _, reward, done, info = env.step(answer(obs="No landmarks nearby", action="turn_direction(east)"))
    assert (reward, info["outcome"], env.index, done) == (1.0, "correct", at + 1, False)


@pytest.mark.parametrize("obs,at_intersection,default,literal", [
    ("You observe an intersection", True, "wrong_action", "wrong_observation"),  # a true claim still costs 1.5
    ("No landmarks nearby", True, "wrong_observation", "wrong_action"),          # the missed one is never seen
    ("There is no intersection here", False, "wrong_action", "wrong_observation"),  # a word test: negation counts
    ("You observe an Intersection", False, "wrong_observation", "wrong_action"),  # and is case-sensitive
    ("No landmarks nearby", False, "wrong_action", "wrong_action"),
])
def test_literal_intersection_check_reproduces_the_paper_code(obs, at_intersection, default, literal):
    pos = position(at_intersection, "turn", 0, 90)
    assert V.verify(answer(obs=obs, action="stop()"), pos, True).outcome == default
    assert V.verify(answer(obs=obs, action="stop()"), pos, True, literal_intersection_check=True).outcome == literal
    right = answer(obs=obs, action="turn_direction(east)")
    assert V.verify(right, pos, True, literal_intersection_check=True).outcome == "correct"
    env = NavigationEnv(VirlConfig(literal_intersection_check=True), seed=0, routes=[hand_route()])
    env.reset(route=0)  # the start: not an intersection
    assert env.step(answer(obs="You observe an intersection", action="stop()"))[3]["outcome"] == "wrong_observation"


ADVERSARIAL = ["", "{", "{" * 10_000, '{"action": ' * 2000, '{"action": null}', '{"action": ["forward()"]}',
               '{"action": {"x": 1}}', '{"action": 7}', "turn_direction(" * 5000, "\x00\ufffd" * 100,
               "a" * 1_000_000, '{"current observation": "' + "intersection " * 10_000 + '"}',
               "turn_direction(" + "x" * 100_000 + ")", "forward" * 1000]


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("protocol", ["project", "official"])
def test_bad_strings_never_raise(absolute, protocol):
    for pos in (position(), position(True, "turn", 0, 90)):
        for text in ADVERSARIAL + [t.encode() for t in ADVERSARIAL[:4]]:
            v = V.verify(text, pos, absolute, protocol=protocol)
            assert v.outcome in V.REWARDS and v.feedback


def repeated(units, most=5000):
    """A unit written up to `most` times: the inputs on which a backtracking regex blows up."""
    return st.builds(operator.mul, st.sampled_from(units), st.integers(1, most))


PATHOLOGICAL = st.one_of(
    repeated(["intersection no ", "no ", "not intersection ", "nor, ", "{", "[", '"', "'", "\\", " ", "\n",
              '"action": ', "action: ", '"current observation": "', "turn_direction(", "turn_direction('a' 'b')",
              "forward"]),
    st.builds(lambda obs: answer(obs=obs, action="stop()"),
              repeated(["intersection no ", "no ", "no intersection ", "without, intersection "])),
    st.builds(lambda arg: answer(action="turn_direction(" + arg), repeated([" ", "\t", "' ", "a ", "_", "  '"])),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="forwadstopun_ict()\"'{}:, intersection"),
                 st.builds(answer, st.text(), st.text()), PATHOLOGICAL))
def test_any_string_yields_one_outcome(text):
    for absolute in (True, False):
        for protocol in ("project", "official"):
            v = V.verify(text, position(True, "turn", 10, 350), absolute, protocol=protocol)
            assert v.outcome in V.REWARDS and v.reward == V.REWARDS[v.outcome]


# The regexes the linear parsers replaced, kept as the reference of what they must answer: on inputs this short
# their backtracking is still quick.
NEGATED_REFERENCE = re.compile(r"\b(no|not|without|nor)\b[^.;,]*\bintersection", re.IGNORECASE)
ACTION_REFERENCE = re.compile(r"\b(forward|stop)\b\s*(?:\(\s*\))?"
                              r"|\bturn_direction\s*\(\s*[\"']?\s*([a-z_ ]{1,40}?)\s*[\"']?\s*\)", re.IGNORECASE)


def reference_action(text, absolute):
    m = ACTION_REFERENCE.search(text)
    if not m:
        return None
    if m.group(1):
        return m.group(1).lower() + "()"
    x = " ".join(m.group(2).lower().replace("_", " ").split())
    x = x.replace(" ", "") if absolute else x
    return f"turn_direction({x})" if x in (V.DIRECTIONS if absolute else V.TURNS) else None


def pieces(*words, most=14):
    return st.lists(st.sampled_from(words), max_size=most).map("".join)


@settings(max_examples=1000, deadline=None)
@given(pieces("turn_direction", "(", ")", " ", "  ", "\t", "\n", '"', "'", "_", "north", "east", "slightly", "left",
              "right", "x", "forward", "stop", "\u017f", "\u212a", "a" * 38, "b" * 41, ".", "\u00a0", "()"),
       pieces("no", "not", "nor", "without", "intersection", "Intersection", "intersections", " ", ".", ",", ";",
              "x", "know", "nointersection", "NO", "\u017f", "\n", "-"))
def test_linear_parsers_answer_as_the_regexes_they_replaced(action, observation):
    for absolute in (True, False):
        assert V.parse_action(action, absolute) == reference_action(action, absolute), action
    said = "intersection" in observation.lower() and not NEGATED_REFERENCE.search(observation)
    assert V.claims_intersection(observation) == said, observation


def test_answers_that_were_quadratic_get_their_verdicts():
    # once seconds to hours each: a negation retried to the clause's end; spaces an unclosed argument backtracked over
    at, off = position(True, "turn", 0, 90), position()
    claims = answer(obs="intersection " + "no " * 16_000, action="stop()")  # the negations follow it: a claim
    assert V.verify(claims, at, True).outcome == "wrong_action"
    assert V.verify(claims, off, True).outcome == "wrong_observation"
    negated = answer(obs="no " * 16_000 + "intersection", action="stop()")
    assert V.verify(negated, at, True).outcome == "wrong_observation"
    assert V.verify(negated, off, True).outcome == "wrong_action"
    assert V.claims_intersection("no " * 16_000 + "; intersection")  # a clause of its own
    unclosed = answer(obs=V.INTERSECTION_CUE, action="turn_direction(" + " " * 49_000)
    assert V.verify(unclosed, at, True).outcome == "invalid_action"
    spaced = "turn_direction(" + " " * 1000 + "'east'" + "\t" * 900 + ")"
    assert V.verify(answer(obs=V.INTERSECTION_CUE, action=spaced), at, True).outcome == "correct"
    assert V.parse_action("turn_direction('a' 'b') " * 80 + "forward", True) == "forward()"
    assert V.parse_action("turn_direction(" * 3000 + "stop", True) is None  # past the 2000 characters read


# ---- the environment contract: what the trainers and the evaluator ask of it ----

def test_action_field_is_the_answers_last_field():
    assert V.ACTION_FIELD == "action" == V.ANSWER_FIELDS[-1]
    env = NavigationEnv(VirlConfig(n_routes=3), seed=0)
    env.reset()
    assert list(json.loads(env.expert_response()))[-1] == V.ACTION_FIELD


def test_wrong_answer_is_another_action_drawn_as_before():
    # pinned draws: the sequential-revision SFT data is made of them
    expert = json.dumps({"current observation": "x", "current instruction": "y", "action": "stop()"})
    draws = [json.loads(V.wrong_answer(expert, random.Random(seed)))["action"] for seed in range(4)]
    assert draws == ["turn_direction(north)", "forward()", "forward()", "forward()"]
    rng = random.Random(0)
    for absolute in (True, False):
        env = NavigationEnv(VirlConfig(n_routes=5, absolute_actions=absolute), seed=0)
        for route in range(5):
            env.reset(route=route)
            done = False
            while not done:
                expert = env.expert_response()
                wrong = json.loads(V.wrong_answer(expert, rng))
                right = json.loads(expert)
                assert wrong["action"] in V.WRONG_ACTIONS and wrong["action"] != right["action"]
                assert {**wrong, "action": right["action"]} == right  # only the action changed
                assert V.verify(json.dumps(wrong), env.position, absolute).outcome != "correct"
                done = env.step(expert)[2]


def test_reset_episode_plays_route_episode_modulo_routes():
    by_episode, by_route = NavigationEnv(VirlConfig(n_routes=4), seed=0), NavigationEnv(VirlConfig(n_routes=4), seed=9)
    for k in range(10):
        a, b = by_episode.reset(seed=100 + k, episode=k), by_route.reset(seed=100 + k, route=k % 4)
        assert by_episode.route.route_id == by_route.route.route_id and a.text == b.text
        assert by_episode.rail == by_route.rail
    with pytest.raises(ValueError, match="not both"):
        by_episode.reset(episode=1, route=1)


# ---- rendering ----

def imported_modules(path, top_level_only=False):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    return ({alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
            | {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom)})


def test_streetview_never_imports_the_navigation():
    """streetview.py takes plain values: it must not depend on env_virl.py, which depends on it, nor on any other
    file of the project (GeneralPoints' env_points.py included)."""
    modules = imported_modules("streetview.py")
    assert "env_virl" not in modules and modules <= set(sys.stdlib_module_names) | {"PIL", "numpy"}


def test_env_virl_imports_the_project_only_where_vision_the_official_rules_or_the_prompt_study_need_it():
    """At the top the standard library alone, so that V-IRL-L copies out with env_virl.py alone."""
    assert imported_modules("env_virl.py", top_level_only=True) <= set(sys.stdlib_module_names)
    assert imported_modules("env_virl.py") - set(sys.stdlib_module_names) == {"official", "streetview",
                                                                              "prompt_variants"}
    assert imported_modules("prompt_variants.py") <= set(sys.stdlib_module_names)


def test_signs_fall_in_exactly_one_view():
    for b in range(0, 360, 5):
        hits = [SV.signs_in_view([("A", b)], 0 + o) for o in SV.VIEW_OFFSETS]
        assert sum(len(h) for h in hits) == 1
    assert SV.signs_in_view([("A", 90)], 90) == [("A", 0.0)]
    (name, x), = SV.signs_in_view([("A", 30)], 0)
    assert x == pytest.approx(math.tan(math.radians(30)))


def test_rendering_is_deterministic_and_cities_differ():
    def grid(city, n=3):
        env = NavigationEnv(VirlConfig(routes=f"synthetic:{city}", n_routes=n, vision=True, view_size=96), seed=0)
        return env.reset(route=1).image
    a, b, c = grid("nyc"), grid("nyc"), grid("tokyo")
    assert a.size == (192, 192) and a.tobytes() == b.tobytes()
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(c, dtype=int)).mean() > 10
    assert set(SV.STYLES) == set(V.CITIES)  # every city has its look
    style = SV.STYLES["paris"]
    plain = SV.render_view(style, [], False, 96, 1)
    cross = SV.render_view(style, [], True, 96, 1)
    signed = SV.render_view(style, [("Maple Cafe", 0.5)], False, 96, 1)
    assert plain.tobytes() != cross.tobytes() and plain.tobytes() != signed.tobytes()
    # the sign lands on the right half of the view
    diff = np.abs(np.asarray(signed, dtype=int) - np.asarray(plain, dtype=int)).sum(axis=(0, 2))
    assert diff[48:].sum() > 5 * diff[:48].sum()


@pytest.fixture
def view_cache(monkeypatch):
    """A fresh view cache for one test (64 MiB), so that no test sees another's views."""
    cache = SV.ViewCache(64 << 20)
    monkeypatch.setattr(SV, "VIEW_CACHE", cache)
    return cache


def test_a_building_drawn_through_pillows_core_is_the_one_imagedraw_draws():
    """_building hands its marks to Pillow's drawing core with the projection and colour mixing written out: the
    very pixels of ImageDraw drawing each mark, the projection and `_mix` called, for every facade pattern."""
    from PIL import Image, ImageDraw

    def plain(draw, camera, side, segment, style, rng):
        z0, z1, height, colour = segment
        project, fog = SV._projection(camera), min(0.6, z0 / SV.FAR)
        colour, window = SV._mix(colour, style["sky"], fog), SV._mix(style["window"], style["sky"], fog)
        facade_x, far_x = side * SV.WALK_W, side * (SV.WALK_W + SV.BLOCK_D)
        draw.polygon([project(facade_x, 0, z0), project(far_x, 0, z0), project(far_x, height, z0),
                      project(facade_x, height, z0)], fill=SV._mix(colour, SV.BLACK, 0.25))
        draw.polygon([project(facade_x, y, z) for y, z in SV._rect(0, height, z0, z1)], fill=colour)
        dark, blurred = SV._mix(colour, SV.BLACK, 0.35), SV._mix(window, colour, 0.5)
        for points, kind in SV._marks(style["pattern"], z0, z1, height):
            xy = [project(facade_x, y, z) for y, z in points]
            if kind == "line":
                draw.line(xy, fill=dark)
            else:
                draw.polygon(xy, fill=blurred if kind == "far" else SV._mix(window, SV.WHITE, 0.3 * rng.random()))
        draw.line([project(facade_x, 0, z0), project(facade_x, height, z0)], fill=dark)

    patterns = {style["pattern"]: style for style in SV.STYLES.values()}
    assert set(patterns) == {"grid", "brick", "bands", "arches", "glass"}
    for (pattern, style), size, side in zip(sorted(patterns.items()) * 2, (224, 96) * 5, (-1, 1) * 5):
        images = []
        for draw_building in (SV._building, plain):
            image, rng = Image.new("RGB", (size, size), style["sky"]), random.Random(5)
            draw = ImageDraw.Draw(image)
            for segment in SV._blocks(random.Random(size), style, size == 96):  # near and far, by a crossing
                draw_building(draw, SV._camera(size), side, segment, style, rng)
            images.append(image.tobytes())
        assert images[0] == images[1], (pattern, size, side)


def test_a_cached_view_is_the_view_drawn_afresh(view_cache):
    style, signs = SV.STYLES["london"], [("Maple Cafe", -0.4)]
    first = SV.render_view(style, signs, True, 96, 7)
    again = SV.render_view(style, signs, True, 96, 7)
    assert len(view_cache.views) == 1  # the second call drew nothing
    assert first.tobytes() == again.tobytes() == SV.draw_view(style, signs, True, 96, 7).tobytes()
    assert SV.render_view(style, signs, True, 96, 8).tobytes() != first.tobytes()  # the seed is in the key
    same_style = json.loads(json.dumps(style))  # equal, but a new dict with lists for tuples: keyed by value
    assert SV.render_view(same_style, signs, True, 96, 7).tobytes() == first.tobytes()
    assert len(view_cache.views) == 2


def test_the_view_cache_is_bounded_and_drops_the_least_recently_used(monkeypatch):
    from PIL import Image
    assert SV.VIEW_CACHE.max_bytes <= 512 << 20  # the renderer's cache stays modest
    view_bytes = 4 * 32 * 32  # Pillow's bytes for a 32 px RGB view
    cache = SV.ViewCache(3 * view_bytes)
    for key in "abc":
        cache.put(key, Image.new("RGB", (32, 32)))
    assert cache.get("a") is not None  # used: b is now the least recently used
    cache.put("d", Image.new("RGB", (32, 32)))
    assert list(cache.views) == ["c", "a", "d"] and cache.bytes == 3 * view_bytes
    for key in "efgh":
        cache.put(key, Image.new("RGB", (32, 32)))
        assert len(cache.views) == 3 and cache.bytes <= cache.max_bytes
    monkeypatch.setattr(SV, "VIEW_CACHE", SV.ViewCache(2 * 4 * 48 * 48))  # the renderer's: room for two
    for seed in range(5):
        SV.render_view(SV.STYLES["nyc"], [], False, 48, seed)
    assert len(SV.VIEW_CACHE.views) == 2 and SV.VIEW_CACHE.bytes <= SV.VIEW_CACHE.max_bytes


def test_drawing_on_a_returned_view_leaves_the_cache_alone(view_cache):
    from PIL import ImageDraw
    style = SV.STYLES["nyc"]
    view = SV.render_view(style, [], False, 64, 3)
    clean = view.tobytes()
    ImageDraw.Draw(view).rectangle([0, 0, 63, 63], fill=(255, 0, 0))
    assert SV.render_view(style, [], False, 64, 3).tobytes() == clean
    views = SV.synthetic_views(style, [("Old Bank", 10.0)], 0.0, False, 64, "spot")
    clean = [v.tobytes() for v in views]
    for v in views:
        v.paste((0, 255, 0), (0, 0, 64, 64))
    assert [v.tobytes() for v in SV.synthetic_views(style, [("Old Bank", 10.0)], 0.0, False, 64, "spot")] == clean


def test_grid_labels_are_the_text_drawn_in_place():
    """render_grid pastes labels drawn once per size: the very pixels of drawing each label on the grid."""
    from PIL import Image, ImageDraw
    for size in (32, 96, 224):
        views = [Image.new("RGB", (size, size), colour)
                 for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90))]
        expected = Image.new("RGB", (2 * size, 2 * size), SV.WHITE)
        for i, view in enumerate(views):
            expected.paste(view, ((i % 2) * size, (i // 2) * size))
        draw, line_w, font = ImageDraw.Draw(expected), max(1, size // 112), SV.load_font(max(9, size // 20))
        draw.rectangle([size - line_w, 0, size + line_w - 1, 2 * size], fill=SV.WHITE)
        draw.rectangle([0, size - line_w, 2 * size, size + line_w - 1], fill=SV.WHITE)
        for i, label in enumerate(("front", "right", "back", "left")):
            x, y = (i % 2) * size + line_w + 2, (i // 2 + 1) * size - line_w - 2
            box = draw.textbbox((x, y), label, font=font, anchor="ld")
            draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=SV.BLACK)
            draw.text((x, y), label, font=font, fill=SV.WHITE, anchor="ld")
        assert SV.render_grid(views, size).tobytes() == expected.tobytes()


# ---- real street views ----

def compass_panorama(width=720, height=360):
    """A panorama whose column c shows compass heading (c / width * 360 - rotation) as its red channel."""
    pano = np.zeros((height, width, 3), dtype=np.uint8)
    pano[..., 0] = (np.arange(width) * 256 // width)[None, :]
    pano[..., 1] = (np.arange(height) * 256 // height)[:, None]
    return pano


@pytest.mark.parametrize("heading,rotation", [(0, 0), (90, 0), (200, 30), (350, 45)])
def test_perspective_view_faces_the_asked_heading(heading, rotation):
    pano = compass_panorama()
    view = SV.perspective_view(pano, rotation, heading, 65)
    centre = view[32, 32]
    expected_col = int(((heading + rotation) % 360) / 360 * 720)
    assert abs(int(centre[0]) - int(expected_col * 256 // 720)) <= 1
    assert abs(int(centre[1]) - 128) <= 2  # horizon row in the middle
    assert view[0, 32, 1] < centre[1] < view[64, 32, 1]  # up is up
    left, right = int(view[32, 0, 0]), int(view[32, 64, 0])
    assert (right - left) % 256 == pytest.approx(64, abs=3)  # 90 degrees of 360 across the view


def make_streetview_folder(tmp_path, route):
    from PIL import Image
    folder = tmp_path / "views"
    folder.mkdir()
    mapping = {}
    env = NavigationEnv(VirlConfig(routes=str(route)), seed=0)
    env.reset(route=0)
    for k, pos in enumerate(env.rail):
        pano_id = f"pano{k}"
        key = (round(pos.point[0], 6) + 0.00005, round(pos.point[1], 6))  # ~5.6 m away
        mapping[key] = pano_id
        Image.fromarray(compass_panorama()).save(folder / f"{pano_id}.jpg")
        (folder / f"{pano_id}.metadata.json").write_text(json.dumps({"rotation": 10.0}))
    with open(tmp_path / "map.pkl", "wb") as f:
        pickle.dump(mapping, f)
    return folder


def test_real_routes_with_street_views(tmp_path):
    route = tmp_path / "routes.json"
    raw = V.generate_routes("nyc", 1, seed=0)
    for r in raw:
        r.pop("city")  # a real route: nothing to render, panoramas needed
    V.write_routes(str(route), raw)
    with pytest.raises(ValueError, match="streetview_dir"):
        NavigationEnv(VirlConfig(routes=str(route), vision=True))
    folder = make_streetview_folder(tmp_path, route)
    env = NavigationEnv(VirlConfig(routes=str(route), vision=True, view_size=48, streetview_dir=str(folder),
                                   streetview_map=str(tmp_path / "map.pkl")), seed=0)
    obs = env.reset(route=0)
    assert obs.image.size == (96, 96)
    front = np.asarray(obs.image)[24, 24]  # the front view's centre pixel
    expected = int(((env.position.heading + 10) % 360) / 360 * 256)
    assert abs(int(front[0]) - expected) <= 4  # jpeg-tolerant
    env.streetviews.max_meters = 1.0
    with pytest.raises(ValueError, match="no street view within 1 m"):
        env.streetviews.pano_at(env.position.point)


def test_pano_map_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({(1.0, 2.0): Evil()}))
    with pytest.raises(ValueError, match="not allowed"):
        SV.load_pano_map(str(path))
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a dict"):
        SV.load_pano_map(str(path))
    path.write_bytes(pickle.dumps({(40.0, -73.0): "abc"}))
    assert SV.load_pano_map(str(path)) == {(40.0, -73.0): "abc"}


# ---- prompt diversity and chain-of-thought answers ----

ORIGINAL_PROMPT = (  # template 0 as the code wrote it before there were templates: it must not move a byte
    "[Task]\nYou are an expert navigator. Follow the route instructions below, one position at a time. At each "
    "position, say what you observe, which instruction you are carrying out, and the action to take next.\n\n"
    "[Instructions]\n1. First, turn right to face north.\n2. Move forward until you reach next intersection where "
    "Maple Cafe is on your left.\n3. Turn right to face east.\n4. Move forward until you reach next intersection.\n"
    "5. Turn left to face north.\n6. Move forward until you reach destination where Summit Cafe is on your right."
    '\n\n[Action space]\n"forward()": move forward to the next position;\n"turn_direction(x)": turn to face x, one '
    'of left, right, slightly left, slightly right;\n"stop()": stop, you have reached the destination.\n\n'
    "[Observations and actions so far]\nO_1: No landmarks nearby\nA_1: turn_direction(right)\nO_2: No landmarks "
    "nearby\nA_2: forward()\nO_3: No landmarks nearby\nA_3: forward()\nO_4: Maple Cafe is on your left; You "
    "observe an intersection\n\n[Output]\nAnswer with one JSON object and nothing else:\n"
    '{"current observation": "what you observe now", "current instruction": "the instruction you are carrying '
    'out", "action": "one action from the action space"}'
)


def walk(env, route=0, reasoning=False):
    """Each position of a route in turn, the expert answering; the env stands at the position yielded."""
    env.reset(route=route)
    done = False
    while not done:
        yield env.position
        done = env.step(env.expert_response(reasoning))[2]


def test_template_zero_is_the_original_prompt():
    env = NavigationEnv(VirlConfig(absolute_actions=False), seed=0, routes=[hand_route()])
    positions = walk(env)
    for _ in range(4):
        next(positions)
    assert env._observation().text == ORIGINAL_PROMPT and VirlConfig().prompt_template == 0
    # every template-0 prompt along 9 routes, hashed as the code before templates wrote them
    texts = []
    for cfg in (VirlConfig(n_routes=4), VirlConfig(n_routes=4, absolute_actions=False),
                VirlConfig(n_routes=1, vision=True, view_size=32)):
        env = NavigationEnv(cfg, seed=0)
        for route in range(len(env.routes)):
            texts += [env._observation().text for _ in walk(env, route)]
    assert hashlib.sha256("\n\0".join(texts).encode()).hexdigest() == \
        "009bf9e6bbe94200275158aee1bed18a5a48091932ed7d087c9f20608c5e0b50"


@pytest.mark.parametrize("absolute,vision", [(True, False), (False, False), (True, True), (False, True)])
def test_every_template_states_the_task_and_the_verifier_scores_the_expert(absolute, vision):
    assert V.PROMPT_TEMPLATES == 1 + len(prompt_variants.VIRL) >= 8
    choices = V.DIRECTIONS if absolute else V.TURNS
    envs = [NavigationEnv(VirlConfig(n_routes=3, absolute_actions=absolute, vision=vision, view_size=32,
                                     prompt_template=k), seed=0) for k in range(V.PROMPT_TEMPLATES)]
    orders = set()
    for k, env in enumerate(envs):
        for index, pos in enumerate(walk(env, route=1, reasoning=k % 2 == 1)):
            if vision and index % 4:
                continue  # the grids cost: every fourth position is enough
            text = env._observation().text
            current = env._current_text(pos)
            assert text == V.prompt_text(env.steps, env.history, current, absolute, vision, k)
            assert all(step in text for step in env.steps) and current in text, (k, text)
            assert all(o in text and a in text for o, a in env.history), (k, text)
            assert all(c in text for c in choices) and all(a in text for a in ("forward()", "stop()", "turn_direction"))
            assert all(f'"{name}"' in text for name in V.ANSWER_FIELDS), (k, text)
            if vision:
                assert "2x2" in text or "2 by 2" in text
                assert all(word in text for word in ("front", "right", "back", "left"))
            if index == 0:  # where the instructions, the current observation, the actions and the fields come
                parts = (text.index(env.steps[0]), text.index(current), text.index("stop()"),
                         text.index('"current instruction"'))
                orders.add(tuple(sorted(range(4), key=parts.__getitem__)))
                assert len({V.prompt_text(env.steps, env.history, current, absolute, vision, t)
                            for t in range(V.PROMPT_TEMPLATES)}) == V.PROMPT_TEMPLATES  # pairwise different
        assert env.done and env.index == len(env.rail)  # walk() played the whole route, every answer correct
    assert len(orders) >= 4  # the parts come in several orders, not one order reworded


def reasoning_positions(absolute, count=200):
    """`count` positions over synthetic routes, each with the env standing there."""
    env = NavigationEnv(VirlConfig(n_routes=30, absolute_actions=absolute), seed=1)
    seen = 0
    for route in range(len(env.routes)):
        for pos in walk(env, route, reasoning=True):
            yield env, pos
            seen += 1
            if seen == count:
                return


@pytest.mark.parametrize("absolute", [True, False])
def test_reasoning_expert_thinks_first_and_passes_the_verifier_at_200_positions(absolute):
    kinds = set()
    for env, pos in reasoning_positions(absolute):
        text = env.expert_response(reasoning=True)
        answer_ = json.loads(text)
        assert list(answer_) == [V.THOUGHT_FIELD, *V.ANSWER_FIELDS]  # one object, the action still last
        thought = answer_.pop(V.THOUGHT_FIELD)
        assert json.dumps(answer_) == env.expert_response()  # the same answer, a thought before it
        assert V.verify(text, pos, absolute).outcome == "correct"
        action = V.expected_action(pos, absolute)
        assert thought.endswith(f"action is {action}.") and f"instruction {pos.instruction}, " in thought
        assert ("this is an intersection" if pos.at_intersection else "this is not an intersection") in thought
        if pos.action == "turn":
            assert V.direction_name(pos.turn_to) in thought
            if pos.at_intersection:  # the street walked so far is over: the previous instruction is done
                assert f"instruction {pos.instruction - 1}, " in thought and "is done" in thought
        for name, _ in pos.landmarks:
            assert name in thought
        # train_ppo finds the action as the last '"action"' of the text: it must lie past the thought
        assert text.rfind(f'"{V.ACTION_FIELD}"') > text.index(json.dumps(thought)) + len(json.dumps(thought))
        assert '"' not in thought and not re.search(r"(current observation|current instruction|action)\W*:", thought)
        kinds.add((pos.action, pos.at_intersection))
    assert kinds == {("turn", False), ("turn", True), ("forward", False), ("stop", False)}


def test_a_thought_never_changes_the_verdict():
    thoughts = ["You observe an intersection; action: stop()", "no intersection here, so action: forward()",
                "current observation: You observe an intersection, action: turn_direction(west)",
                'the "action": "stop()" is right', "", "turn_direction(left) 42 intersection"]
    for pos in (position(), position(True, "turn", 0, 90), position(action="stop")):
        for absolute in (True, False):
            for obs in ("No landmarks nearby", V.INTERSECTION_CUE, "no intersection", "x"):
                for action in ("forward()", "stop()", "turn_direction(east)", "turn_direction(right)", "jump"):
                    body = {"current observation": obs, "current instruction": "x", "action": action}
                    loose = "{" + ", ".join(f"'{key}': {json.dumps(value)}" for key, value in body.items()) + "}"
                    for literal in (False, True):
                        plain, loose_plain = (V.verify(t, pos, absolute, literal) for t in (json.dumps(body), loose))
                        for thought in thoughts:
                            strict = json.dumps({V.THOUGHT_FIELD: thought, **body})
                            assert V.verify(strict, pos, absolute, literal) == plain, strict
                            text = '{"thought": ' + json.dumps(thought) + ", " + loose[1:]
                            assert V.verify(text, pos, absolute, literal) == loose_plain, text
    # a field missing from the answer is not read out of the thought either
    missing = json.dumps({V.THOUGHT_FIELD: "action: stop()", "current observation": "x"})
    assert V.verify(missing, position(action="stop"), True).outcome == "invalid_action"


def test_wrong_answer_keeps_the_thought_and_changes_the_action():
    for absolute in (True, False):
        env = NavigationEnv(VirlConfig(n_routes=5, absolute_actions=absolute), seed=0)
        for seed, pos in enumerate(pos for route in range(5) for pos in walk(env, route, reasoning=True)):
            expert, plain = env.expert_response(reasoning=True), env.expert_response()
            wrong = json.loads(V.wrong_answer(expert, random.Random(seed)))
            right = json.loads(expert)
            assert list(wrong) == list(right) and {**wrong, "action": right["action"]} == right
            # the same draw as without a thought: the revision data only gains the reasoning
            assert wrong["action"] == json.loads(V.wrong_answer(plain, random.Random(seed)))["action"]
            assert V.verify(json.dumps(wrong), pos, absolute).outcome != "correct"


# ---- config, CLI, doctests ----

@pytest.mark.parametrize("kwargs,match", [({"verify_iter": 0}, "verify_iter=0"), ({"drop_rate": 1.0}, "drop_rate=1.0"),
                                          ({"straight_line_length": 0}, "straight_line_length=0"),
                                          ({"view_size": 8}, "view_size=8"),
                                          ({"view_size": 4096}, "view_size=4096: expected 32 to 2048"),
                                          ({"n_routes": 2_000_000}, "n_routes=2000000"),
                                          ({"prompt_template": V.PROMPT_TEMPLATES}, "prompt_template=10"),
                                          ({"prompt_template": -1}, "prompt_template=-1")])
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VirlConfig(**kwargs)


def test_reset_route_index_checked():
    env = NavigationEnv(VirlConfig(n_routes=3))
    with pytest.raises(ValueError, match="route index 3 out of range: 3 routes"):
        env.reset(route=3)


def test_cli_prints_prompt_writes_grids_and_plays_expert(tmp_path):
    out = subprocess.run([sys.executable, "env_virl.py", "--episodes", "50", "--out-dir", str(tmp_path), "--relative"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "[Instructions]" in out.stdout and "50/50 routes completed (100.0%)" in out.stdout
    from PIL import Image
    assert Image.open(tmp_path / "virl_vl_nyc.png").size == (448, 448)
    assert (tmp_path / "virl_vl_tokyo.png").exists()
    export = tmp_path / "mini.json"
    out = subprocess.run([sys.executable, "env_virl.py", "--routes", "mini", "--export", str(export)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(export.read_text())[1] == 18
    bad = subprocess.run([sys.executable, "env_virl.py", "--routes", "synthetic:atlantis"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "atlantis" in bad.stderr


@pytest.mark.parametrize("args,says", [
    (["--episodes", "-1"], "--episodes -1: expected 0 or a positive integer"),
    (["--n-routes", "0"], "n_routes=0: expected an integer from 1 to 1000000"),
    (["--n-routes", "10000000"], "n_routes=10000000: expected an integer from 1 to 1000000"),
    (["--n-routes", "some"], "--n-routes: invalid int value: 'some'"),
    (["--routes", "{tmp}/none.json"], "none.json' not found"),
    (["--routes", "{tmp}"], "is a folder: expected a V-IRL route file"),
    (["--routes", "{tmp}/bad.json"], "bad.json: route 0: missing field start_place.relocated_geocode"),
    (["--routes", "synthetic:atlantis"], "unknown city 'atlantis': expected one of nyc, london"),
    (["--routes", "mini", "--export", "{tmp}/no/such/x.json"], "cannot write it (No such file or directory); expected"),
    (["--routes", "mini", "--export", "{tmp}"], "cannot write it (Is a directory)"),
    (["--out-dir", "{tmp}/a_file"], "cannot make it a folder (File exists); expected a folder"),
    (["--out-dir", "{tmp}/a_file/sub"], "cannot make it a folder (Not a directory)"),
    (["--ood-city", "nyc"], "--ood-city: invalid choice: 'nyc' (choose from 'london'"),
    (["--seed", "x"], "--seed: invalid int value: 'x'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_cli_bad_value_is_one_line(tmp_path, args, says):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "bad.json").write_text('[[{"route_id": 1}], 1]')
    args = [a.format(tmp=tmp_path) for a in args]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "env_virl.py"), "--n-routes", "5", "--episodes", "1",
                          *args], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.strip().count("\n") == 0, out.stderr
    assert says in out.stderr
    assert not any(tmp_path.rglob("*.png"))


def copy_out(tmp_path, *names):
    for name in names:
        (tmp_path / name).write_text(open(os.path.join(ROOT, name)).read())


def test_env_virl_copies_out_alone_for_virl_l(tmp_path):
    """V-IRL-L runs from a folder holding env_virl.py and nothing else of the project, its one-line errors included."""
    copy_out(tmp_path, "env_virl.py")
    run = lambda *args: subprocess.run([sys.executable, "-I", "env_virl.py", "--n-routes", "20", *args], cwd=tmp_path,
                                       capture_output=True, text=True)
    out = run("--no-grids", "--episodes", "20", "--relative")
    assert out.returncode == 0 and "20/20 routes completed (100.0%)" in out.stdout, out.stderr
    assert "[Instructions]" in out.stdout and '"action": "turn_direction(' in out.stdout
    grids = run("--episodes", "1")  # the grids want streetview.py: one line says so, before any work
    assert grids.returncode == 2 and grids.stderr.count("\n") == 1 and "streetview.py" in grids.stderr, grids.stderr
    bad = run("--episodes", "-1", "--no-grids")
    assert (bad.returncode, bad.stderr) == (2, "error: --episodes -1: expected 0 or a positive integer\n")
    assert not any(tmp_path.rglob("*.png"))
    # the prompt-diversity study's wordings live in prompt_variants.py: without it one clear error, with it they run
    code = ("import sys; sys.path.insert(0, '.'); import env_virl as V\n"
            "try:\n    V.VirlConfig(prompt_template=5)\nexcept ValueError as e:\n    sys.exit(str(e))\n"
            "print(V.NavigationEnv(V.VirlConfig(n_routes=2, prompt_template=5), seed=0).reset().text)")
    variant = lambda: subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    missing = variant()
    assert missing.returncode == 1 and "prompt_template=5 needs prompt_variants.py" in missing.stderr, missing.stderr
    copy_out(tmp_path, "prompt_variants.py")
    found = variant()
    assert found.returncode == 0 and "Current observation: " in found.stdout, found.stderr


def test_env_virl_and_streetview_copy_out_for_virl_vl(tmp_path):
    """V-IRL-VL runs from a folder holding env_virl.py and streetview.py alone: the expert on the OOD visual routes,
    then the demo's grids."""
    copy_out(tmp_path, "env_virl.py", "streetview.py")
    # `python -I` leaves the script's folder off sys.path, and -c has none: the code puts back the copies' folder alone
    code = ("import sys; sys.path.insert(0, '.'); import env_virl as V\n"
            "env = V.NavigationEnv(V.VirlConfig(routes='mini', vision=True, view_size=32), seed=0)\n"
            "for k in range(3):\n"
            "    obs, done = env.reset(episode=k), False\n"
            "    assert obs.image.size == (64, 64)\n"
            "    while not done:\n"
            "        obs, reward, done, info = env.step(env.expert_response())\n"
            "    assert info['success'] and info['recognized']\n"
            "assert {'env_points', 'official'}.isdisjoint(sys.modules), sorted(sys.modules)\n"
            "sys.exit(V.main(['--n-routes', '5', '--episodes', '5', '--out-dir', 'grids']))")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "5/5 routes completed" in out.stdout, out.stderr
    from PIL import Image
    assert Image.open(tmp_path / "grids" / "virl_vl_tokyo.png").size == (448, 448)


def test_doctests():
    assert doctest.testmod(V).failed == 0
