"""V-IRL: follow written route instructions through a city, one position at a time (Chu et al., 2025).

At every position of a route the model sees the numbered instructions of the whole route, the
history of observations and actions so far, and the current observation (V-IRL-L: text such as
"Maple Bakery is on your left; You observe an intersection"; V-IRL-VL: a 2x2 grid of street
views [front, right / back, left], its text line only "You observe an image of 4 views", plus
"; You observe an intersection" at one). Past observations stay in the history as text in both,
as in the paper's `get_observation_action_sequence`. It answers
    {"current observation": "...", "current instruction": "...", "action": "forward()"}
with an action from forward(), turn_direction(x), stop().

Rules:  ID (`absolute_actions=True`): x is a compass direction (north, northeast, ...).
        OOD: x is left, right, slightly left or slightly right (beyond 45 degrees: left/right).
Visuals: ID routes are drawn in one synthetic city ("nyc"); the OOD visual benchmark is
`mini_benchmark()`: 18 fixed routes, two in each of nine other synthetic cities.

Reward per attempt, in the order of the paper's `step_rewards_virl` (utils_rl.py):
    correct            +1    the right action, whatever the observation says; stop() at the destination ends the route
    wrong_observation  -1.5  any other answer whose observation claims an intersection where there is none,
                             or misses one (`literal_intersection_check`: the paper code's word test)
    invalid_action     -1    no action from the action space can be read (the paper's wrong action, labelled apart)
    wrong_action       -1    a valid action, but not the right one
Each position allows `verify_iter` attempts (default 2) with the verifier's feedback continuing
the conversation; when they run out, the route ends there, failed (the paper truncates it), and
reset() starts a new one.

The rail follows the paper's `_parse_instruction_and_rail` under its training and evaluation
configs (straight_line_length 5, drop_rate 0.5, relocation on): a turn at the start, forward()
positions at the cut points of each street (each dropped with drop_rate, none within 8 m of a
street's ends), a turn at each intersection and stop() at the destination. A correct turn moves
the agent on to the next position: no forward() follows it at the same spot.

The real V-IRL data (Google Street View) cannot be shipped: synthetic cities stand in for it and
are written in the V-IRL route-file format, so `VirlConfig(routes=PATH)` reads the paper's own
route files the same way (and their panoramas for vision, given `streetview_dir`).

This file owns the navigation: cities' street maps and routes, route files, the rail of expected actions,
the prompt, the verifier, the rewards and the expert. What the model sees in V-IRL-VL (the synthetic
renderer, the 2x2 grid, real panoramas) is streetview.py's; the answer parser, the feedback wording and the
command-line errors are shared with GeneralPoints (env_points.py).

The environment contract, the same as GeneralPoints', so that the trainers and the evaluator hold no fact of
either environment:
    env.reset(seed=None, episode=None) -> Observation   a new route; `seed` restarts the RNG (start heading,
        dropped forwards). The evaluation plays episode k of a setting as reset(seed=s, episode=k): route
        k % len(env.routes). Without `episode` a route is drawn from the RNG (`route=i` picks one by index).
    env.step(answer) -> (Observation, reward, done, info)   verify one attempt
    env.expert_response(reasoning=False) -> str           the correct answer at the current position. reasoning=True:
        the same JSON object opened by a "thought" field (THOUGHT_FIELD), a chain of thought ending in the action:
        what is in sight, whether it is an intersection, which instruction applies and why, the heading or turn
        it names, hence the action
    ACTION_FIELD = "action"   the answer's final field, the action itself (the PPO trainer weights the tokens
        before it, the thought among them, by `pre_action_coef` in the action's log-probability)
    wrong_answer(expert: str, rng: random.Random) -> str   a plausible mistake made from an expert answer:
        another action from a fixed list (sequential-revision SFT data); a thought is kept as it was
    config.prompt_template: int = 0   which of PROMPT_TEMPLATES wordings of the prompt reset() and step() show; 0
        is the original. Each states the same facts and asks for the same fields (prompt diversity for SFT data,
        as in "Debunk the Myth of SFT Generalization", arXiv 2510.00237). The verifier and its feedback are the same.
The verifier reads only the answer's own fields: a "thought" or any other extra field is ignored.

    python env_virl.py                         # sample prompt, sample ID and OOD view grids, expert play
    python env_virl.py --export routes.json --routes synthetic:nyc --n-routes 1000
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import sys
import zlib
from dataclasses import dataclass, field
from typing import Optional

# GeneralPoints' environment-independent pieces: observation, answer parser, feedback wording, self-check, CLI
from env_points import (THOUGHT_FIELD, OneLineArgumentParser, Observation, cannot_write, check_protocol, fail,
                        failure_feedback, parse_answer, play_expert, retry_text)
from streetview import StreetViews, render_grid, synthetic_views

DIRECTIONS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
RELATIONS = ("front", "right front", "right", "right behind", "behind", "left behind", "left", "left front")
TURNS = ("left", "right", "slightly left", "slightly right")
REWARDS = {"correct": 1.0, "wrong_observation": -1.5, "wrong_action": -1.0, "invalid_action": -1.0}
ANSWER_FIELDS = ("current observation", "current instruction", "action")
ACTION_FIELD = "action"  # the final field, the action itself: the PPO trainer weights the tokens before it
EARTH_RADIUS_M = 6_371_000.0
METERS_PER_DEG_LAT = 111_320.0
MAX_ROUTES = 1_000_000  # synthetic routes per config: a thousand times the paper's, short of exhausting memory
MAX_VIEW_SIZE = 2048    # pixels a side of one street view (the grid is twice that)
PROMPT_TEMPLATES = 10   # wordings of the prompt, `VirlConfig.prompt_template` 0 to 9 (0: the original one)


@dataclass
class VirlConfig:
    routes: str = "synthetic:nyc"       # "synthetic:<city>", "mini" (OOD visual benchmark) or a route-file path
    absolute_actions: bool = True       # True: turn_direction(compass) (ID rule); False: left/right/slightly (OOD)
    vision: bool = False                # V-IRL-VL: a 2x2 street-view grid per position
    verify_iter: int = 2                # attempts per position (sequential revision); then the route ends, failed
    n_routes: int = 1000                # routes drawn for "synthetic:<city>" (the paper trained on 1000 NYC routes)
    route_seed: int = 0                 # seed of the synthetic routes (the city map itself is fixed per city)
    straight_line_length: int = 5       # each street is cut in this many equal parts: the cuts are forward() candidates
    drop_rate: float = 0.5              # chance each candidate is skipped, so the forwards can't be counted
    literal_intersection_check: bool = False  # True: the paper code's claim test, a bug kept for replication (verify)
    view_size: int = 224                # side of one street view; the grid is twice that
    streetview_dir: Optional[str] = None  # real routes + vision: folder of {pano_id}.jpg and .metadata.json
    streetview_map: Optional[str] = None  # real routes + vision: pickle {(lat, lng): pano_id}
    prompt_template: int = 0            # wording of the prompt, 0 to PROMPT_TEMPLATES - 1 (0: the original)
    protocol: str = "project"           # "project" or "official" (env_points.PROTOCOLS): whose rules score and prompt

    def __post_init__(self):
        check_protocol(self.protocol, "VirlConfig.protocol")
        if self.protocol == "official" and self.prompt_template:
            raise ValueError(f"VirlConfig.prompt_template={self.prompt_template}: protocol 'official' prompts with "
                             "the official prompt only; expected 0")
        if self.verify_iter < 1:
            raise ValueError(f"VirlConfig.verify_iter={self.verify_iter}: expected an integer >= 1")
        if self.straight_line_length < 1:
            raise ValueError(f"VirlConfig.straight_line_length={self.straight_line_length}: expected an integer >= 1")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"VirlConfig.drop_rate={self.drop_rate}: expected 0 <= drop_rate < 1")
        if not 1 <= self.n_routes <= MAX_ROUTES:
            raise ValueError(f"VirlConfig.n_routes={self.n_routes}: expected an integer from 1 to {MAX_ROUTES}")
        if not 32 <= self.view_size <= MAX_VIEW_SIZE:
            raise ValueError(f"VirlConfig.view_size={self.view_size}: expected 32 to {MAX_VIEW_SIZE} pixels")
        if type(self.prompt_template) is not int or not 0 <= self.prompt_template < PROMPT_TEMPLATES:
            raise ValueError(f"VirlConfig.prompt_template={self.prompt_template!r}: expected an integer from 0 to "
                             f"{PROMPT_TEMPLATES - 1}")


# ---- geometry ----
# Points are (lat, lng) in degrees; headings are compass bearings in degrees (0 = north, clockwise).

def haversine(a, b) -> float:
    """Great-circle distance in meters."""
    lat1, lng1, lat2, lng2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lng2 - lng1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, h)))


def bearing(a, b) -> float:
    """Initial compass bearing from a to b, in [0, 360)."""
    lat1, lng1, lat2, lng2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    y = math.sin(lng2 - lng1) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(lng2 - lng1)
    return math.degrees(math.atan2(y, x)) % 360


def wrap180(deg: float) -> float:
    """An angle in [-180, 180): 350 -> -10."""
    return (deg + 180) % 360 - 180


def direction_name(heading: float) -> str:
    """Nearest of the 8 compass points: 22 -> north, 23 -> northeast."""
    return DIRECTIONS[int((heading % 360 + 22.5) // 45) % 8]


def relation_name(relative: float) -> str:
    """Where something at `relative` degrees clockwise from your heading is: 90 -> 'right'."""
    return RELATIONS[int((relative % 360 + 22.5) // 45) % 8]


RELATION_ANGLE = {name: 45 * i for i, name in enumerate(RELATIONS)}


def turn_name(from_heading: float, to_heading: float) -> str:
    """The relative turn word: beyond 45 degrees left/right, within it (45 included) slightly.

    The turn angle is the wrapped difference, so 350 -> 10 is a 20-degree right turn
    ('slightly right'). The paper's code used the unwrapped difference (-340: 'left'): fixed here.
    A zero turn counts as 'slightly right'; a 180-degree turn as 'left'.
    """
    d = wrap180(to_heading - from_heading)
    if d > 45:
        return "right"
    if d >= 0:
        return "slightly right"
    return "slightly left" if d >= -45 else "left"


def offset(point, heading: float, meters: float):
    """The point `meters` away along `heading` (flat-earth approximation: fine within a city)."""
    north = meters * math.cos(math.radians(heading))
    east = meters * math.sin(math.radians(heading))
    return (point[0] + north / METERS_PER_DEG_LAT,
            point[1] + east / (METERS_PER_DEG_LAT * math.cos(math.radians(point[0]))))


def lerp(a, b, t: float):
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


# ---- synthetic cities ----
# Each city: a centre, the compass angle of its street grid, its block lengths, and its look.
# "nyc" is the in-distribution city; the other nine make the visual OOD benchmark.

def _style(sky, road, sidewalk, lane, facades, window, pattern, sign_bg, sign_fg, sign_shape):
    return dict(sky=sky, road=road, sidewalk=sidewalk, lane=lane, facades=facades, window=window,
                pattern=pattern, sign_bg=sign_bg, sign_fg=sign_fg, sign_shape=sign_shape)


CITIES = {
    "nyc": dict(center=(40.7549, -73.9840), angle=29, blocks=(80, 260), style=_style(
        (170, 200, 230), (70, 70, 75), (165, 160, 150), (240, 200, 60),
        [(150, 80, 60), (120, 110, 100), (180, 170, 150), (90, 90, 100)], (40, 50, 70), "grid",
        (20, 60, 140), (255, 255, 255), "rect")),
    "london": dict(center=(51.5098, -0.1342), angle=12, blocks=(60, 180), style=_style(
        (190, 195, 200), (85, 85, 85), (150, 150, 145), (250, 250, 250),
        [(160, 60, 50), (200, 190, 170), (110, 70, 50), (220, 215, 200)], (30, 30, 40), "brick",
        (0, 70, 40), (240, 220, 150), "banner")),
    "tokyo": dict(center=(35.6595, 139.7005), angle=-8, blocks=(40, 120), style=_style(
        (200, 220, 240), (100, 100, 105), (190, 190, 185), (250, 250, 250),
        [(230, 230, 225), (200, 205, 210), (170, 180, 190), (240, 235, 220)], (90, 130, 170), "bands",
        (230, 40, 40), (255, 255, 255), "banner")),
    "paris": dict(center=(48.8698, 2.3077), angle=-30, blocks=(70, 200), style=_style(
        (180, 205, 235), (95, 90, 85), (200, 190, 170), (245, 245, 245),
        [(225, 210, 180), (215, 200, 170), (235, 225, 200)], (60, 70, 90), "arches",
        (30, 30, 30), (230, 200, 120), "rounded")),
    "hong_kong": dict(center=(22.2819, 114.1582), angle=20, blocks=(40, 110), style=_style(
        (160, 175, 185), (60, 60, 65), (130, 135, 130), (250, 220, 0),
        [(120, 140, 150), (200, 200, 190), (90, 110, 120), (170, 160, 140)], (150, 200, 210), "glass",
        (250, 220, 0), (200, 0, 0), "banner")),
    "melbourne": dict(center=(-37.8136, 144.9631), angle=-20, blocks=(90, 220), style=_style(
        (120, 170, 230), (80, 80, 80), (175, 170, 160), (255, 255, 255),
        [(200, 120, 70), (140, 150, 140), (230, 220, 200), (100, 110, 130)], (30, 40, 60), "grid",
        (250, 250, 250), (20, 90, 60), "rounded")),
    "lagos": dict(center=(6.4541, 3.3947), angle=40, blocks=(60, 170), style=_style(
        (220, 225, 200), (110, 100, 90), (190, 170, 140), (250, 250, 250),
        [(220, 190, 100), (180, 210, 200), (230, 150, 120), (240, 240, 230)], (60, 60, 50), "bands",
        (0, 120, 60), (255, 255, 255), "rect")),
    "mumbai": dict(center=(18.9322, 72.8264), angle=-15, blocks=(50, 150), style=_style(
        (210, 205, 180), (90, 85, 80), (170, 160, 140), (240, 240, 240),
        [(220, 200, 150), (200, 120, 90), (170, 190, 170), (230, 220, 190)], (70, 50, 40), "arches",
        (120, 20, 90), (255, 230, 120), "rect")),
    "buenos_aires": dict(center=(-34.6037, -58.3816), angle=5, blocks=(100, 130), style=_style(
        (150, 190, 240), (75, 75, 80), (160, 150, 140), (255, 255, 255),
        [(210, 200, 190), (160, 140, 120), (190, 170, 160)], (50, 50, 60), "brick",
        (110, 170, 220), (255, 255, 255), "rounded")),
    "san_francisco": dict(center=(37.7879, -122.4075), angle=45, blocks=(90, 200), style=_style(
        (205, 215, 225), (65, 65, 70), (180, 175, 170), (255, 255, 255),
        [(240, 230, 210), (170, 200, 210), (230, 190, 170), (200, 210, 190)], (60, 80, 100), "glass",
        (200, 80, 30), (255, 250, 235), "rect")),
}
ID_CITY = "nyc"
OOD_CITIES = tuple(c for c in CITIES if c != ID_CITY)

_NAME_STEMS = ("Maple", "Harbor", "Blue Door", "Golden Gate", "Riverside", "Union", "Cedar", "Lantern", "Northstar",
               "Old Mill", "Silver Oak", "Copper Kettle", "Green Leaf", "Redwood", "Sunrise", "Twin Pines",
               "Bluebird", "Stonebridge", "Parkview", "Iron Horse", "Lighthouse", "Willow", "Crescent", "Summit",
               "Juniper", "Foxglove", "Meridian", "Orchard", "Beacon", "Chestnut")
_NAME_KINDS = ("Cafe", "Bakery", "Bank", "Hotel", "Museum", "Pharmacy", "Bookstore", "Deli", "Pizza", "Fitness",
               "Florist", "Library", "Theater", "Market", "Diner")
LANDMARK_NAMES = tuple(f"{stem} {kind}" for stem in _NAME_STEMS for kind in _NAME_KINDS)  # 450 names


def _seed(*parts) -> int:
    """A platform-independent integer seed (crc32, never Python's salted hash())."""
    return zlib.crc32(":".join(map(str, parts)).encode())


@dataclass
class CityMap:
    """A street grid: intersection (i, j) lies at i blocks along the grid angle and j across it."""
    name: str
    nodes: dict = field(default_factory=dict)        # (i, j) -> (lat, lng)
    corners: dict = field(default_factory=dict)      # (i, j) -> [(landmark name, (lat, lng))]
    midblock: dict = field(default_factory=dict)     # ((i, j), (i2, j2)) -> (name, (lat, lng), street point)
    size: int = 12


@functools.lru_cache(maxsize=None)
def city_map(name: str) -> CityMap:
    """The fixed map of a synthetic city: irregular block lengths, landmarks at corners and mid-block."""
    if name not in CITIES:
        raise ValueError(f"unknown city {name!r}: expected one of {', '.join(CITIES)}")
    spec, rng = CITIES[name], random.Random(_seed("city", name))
    m = CityMap(name)
    lo, hi = spec["blocks"]
    along = [0.0]
    across = [0.0]
    for _ in range(m.size - 1):
        along.append(along[-1] + rng.uniform(lo, hi))
        across.append(across[-1] + rng.uniform(lo, hi))
    u, v = spec["angle"], spec["angle"] + 90  # compass bearings of the two street directions
    origin = offset(offset(spec["center"], u, -along[-1] / 2), v, -across[-1] / 2)
    for i in range(m.size):
        for j in range(m.size):
            m.nodes[(i, j)] = offset(offset(origin, u, along[i]), v, across[j])
    names = iter(rng.sample(LANDMARK_NAMES, len(LANDMARK_NAMES)))
    for key, node in m.nodes.items():
        quadrants = rng.sample([(1, 1), (1, -1), (-1, 1), (-1, -1)], rng.choice((0, 0, 1, 1, 1, 2)))
        m.corners[key] = [(next(names), offset(offset(node, u, su * rng.uniform(8, 30)), v, sv * rng.uniform(8, 30)))
                          for su, sv in quadrants]
    for (i, j) in sorted(m.nodes):
        for nb in ((i + 1, j), (i, j + 1)):
            if nb in m.nodes and rng.random() < 0.3:
                a, b = m.nodes[(i, j)], m.nodes[nb]
                street = lerp(a, b, rng.uniform(0.35, 0.65))
                side = bearing(a, b) + rng.choice((90, -90))
                m.midblock[((i, j), nb)] = (next(names), offset(street, side, 12), street)
    return m


_STEPS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # grid moves for headings angle, angle+90, angle+180, angle+270


def _point(p) -> list:
    return [round(p[0], 6), round(p[1], 6)]  # ~0.1 m: keeps files identical across platforms' libm


def _landmark_text(items, heading: float) -> str:
    """'A is on your left, B is on your right front' for [(name, point)] seen from a heading."""
    return ", ".join(f"{name} is on your {relation_name(bearing_ - heading)}" for name, bearing_ in items)


def _milestone(idx: int, landmarks: str, distance: float, heading: int) -> str:
    """One milestone_info block in the V-IRL file's own (not-quite-JSON) text shape."""
    return ('{\n    "intersection_idx": "%d",\n    "landmarks": "%s",\n    "distance": "%d meters",\n'
            '    "human_heading": "%d",\n    "to_next_intersection_heading": "%d (%s)",\n}'
            % (idx, landmarks, round(distance), heading, heading, direction_name(heading)))


def _draw_route(m: CityMap, rng: random.Random, route_id: str) -> Optional[dict]:
    """One random route on the map, or None when the draw leads off the grid (the caller redraws)."""
    i, j = rng.randrange(1, m.size - 1), rng.randrange(1, m.size - 1)
    d = rng.randrange(4)
    prev = (i - _STEPS[d][0], j - _STEPS[d][1])
    start = lerp(m.nodes[prev], m.nodes[(i, j)], rng.uniform(0.2, 0.6))
    path, n_turns = [(i, j)], rng.randint(2, 5)
    for k in range(n_turns):
        d = (d + rng.choice((1, 3))) % 4  # a left or right turn at every intersection
        nxt = (path[-1][0] + _STEPS[d][0], path[-1][1] + _STEPS[d][1])
        if nxt not in m.nodes or nxt in path:
            return None
        if k < n_turns - 1:
            path.append(nxt)
    seg = (path[-1], nxt) if (path[-1], nxt) in m.midblock else (nxt, path[-1])
    if seg not in m.midblock:
        return None
    dest_name, dest_point, dest_street = m.midblock[seg]

    points = [m.nodes[p] for p in path] + [dest_street]
    geocodes = [_point(p) for p in points]
    milestones, landmark_list, here = [], [], _point(start)
    for k, p in enumerate(geocodes):
        heading = round(bearing(here, p)) % 360
        if k < len(path):
            seen = [(name, bearing(p, q)) for name, q in m.corners[path[k]]]
            text = _landmark_text(seen, heading) or "No landmark nearby"
            landmark_list += [name for name, _ in seen]
        else:
            text = "The destination " + _landmark_text([(dest_name, bearing(p, dest_point))], heading)
        milestones.append(_milestone(k + 1, text, haversine(here, p), heading))
        here = p
    return {
        "route_id": route_id, "city": m.name,
        "start_place": {"name": f"{m.name} start {route_id}", "relocated_geocode": _point(start)},
        "init_heading": rng.randrange(1, 360),
        "dest_place": {"name": dest_name, "relocated_geocode": _point(dest_point)},
        "route_results": {"geocode_list": geocodes, "landmark_list": landmark_list + [dest_name]},
        "milestone_info": milestones,
    }


def generate_routes(city: str, n: int, seed: int = 0) -> list:
    """n routes in a synthetic city, in the V-IRL route format: reproducible from (city, n, seed).

    Each route starts mid-block, passes 2 to 5 intersections with a turn at each, and ends at a
    destination landmark mid-block. The city map is the same for every seed."""
    m, rng, routes = city_map(city), random.Random(_seed("routes", city, seed)), []
    while len(routes) < n:
        route = _draw_route(m, rng, f"{city}-{seed}-{len(routes)}")
        if route is not None:
            routes.append(route)
    return routes


@functools.lru_cache(maxsize=1)
def _mini_benchmark_json() -> str:
    return json.dumps([r for city in OOD_CITIES for r in generate_routes(city, 2, seed=2025)])


def mini_benchmark() -> list:
    """The OOD-visual benchmark: 18 fixed routes, two in each of the nine non-ID cities."""
    return json.loads(_mini_benchmark_json())


def write_routes(path: str, routes: list) -> None:
    """Write routes as a V-IRL route file: the JSON array [routes, count]."""
    with open(path, "w") as f:
        json.dump([routes, len(routes)], f, indent=1)


# ---- route files (synthetic and real alike) ----

_BLOCK_RE = re.compile(r"\{[^{}]*\}")
_MILESTONE_FIELD_RE = re.compile(r'"(\w+)"\s*:\s*"([^"]*)"')
_LANDMARK_RE = re.compile(r"(?:The destination\s+)?([^,;]+?) is on your (%s)\b" % "|".join(
    sorted(RELATIONS, key=len, reverse=True)))


@dataclass
class Route:
    """What the environment needs from a V-IRL route; legs end at each intersection, then the destination."""
    route_id: str
    city: Optional[str]           # synthetic city (its look for rendering); None for real routes
    start: tuple                  # (lat, lng)
    init_heading: int             # 0: draw a random start heading at reset, as V-IRL does
    points: list                  # leg end points: intersections, destination last
    headings: list                # compass heading of each leg
    landmarks: list               # per leg end: [(name, compass bearing from the point)]
    dest_name: str


def _milestone_fields(block: str) -> dict:
    return dict(_MILESTONE_FIELD_RE.findall(block))


def _landmarks(text: str, heading: int) -> list:
    """'A is on your left, B is on your front' seen at `heading` -> [(name, compass bearing)]."""
    return [(name.strip(), (heading + RELATION_ANGLE[rel]) % 360) for name, rel in _LANDMARK_RE.findall(text)]


def parse_route(raw: dict, where: str = "route") -> Route:
    """A Route from one entry of a V-IRL route file; ValueError naming the missing or bad field."""
    def need(obj, *keys):
        for k in keys:
            if not isinstance(obj, dict) or k not in obj:
                raise ValueError(f"{where}: missing field {'.'.join(keys)}")
            obj = obj[k]
        return obj

    start, points, blocks = (need(raw, "start_place", "relocated_geocode"), need(raw, "route_results", "geocode_list"),
                             need(raw, "milestone_info"))
    try:
        start = tuple(float(x) for x in start)[:2]
        points = [tuple(float(x) for x in p)[:2] for p in points]
        init_heading = int(float(raw.get("init_heading", 0) or 0)) % 360
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed geocode or heading ({e})") from None
    blocks = _BLOCK_RE.findall("\n".join(blocks) if isinstance(blocks, list) else str(blocks))
    if not points or len(blocks) != len(points):
        raise ValueError(f"{where}: {len(points)} geocodes but {len(blocks)} milestone_info blocks: expected one each")
    headings, landmarks, here = [], [], start
    for point, block in zip(points, blocks):
        fields = _milestone_fields(block)
        m = re.match(r"\s*(-?\d+)", fields.get("to_next_intersection_heading", ""))
        heading = int(m.group(1)) % 360 if m else round(bearing(here, point)) % 360
        headings.append(heading)
        landmarks.append(_landmarks(fields.get("landmarks", ""), heading))
        here = point
    dest = raw.get("dest_place", {}).get("name") if isinstance(raw.get("dest_place"), dict) else None
    dest = dest or (landmarks[-1][0][0] if landmarks[-1] else "the destination")
    return Route(str(raw.get("route_id", where)), raw.get("city") if raw.get("city") in CITIES else None,
                 start, init_heading, points, headings, landmarks, dest)


def load_routes(path: str) -> list:
    """Routes (raw dicts) from a V-IRL route file: the JSON array [routes, count] (a bare list works too)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"route file {path!r} not found") from None
    except IsADirectoryError:
        raise ValueError(f"route file {path!r} is a folder: expected a V-IRL route file (JSON)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"route file {path!r} is not readable JSON: {e}") from None
    routes = data[0] if isinstance(data, list) and data and isinstance(data[0], list) else data
    if not isinstance(routes, list) or not routes or not all(isinstance(r, dict) for r in routes):
        raise ValueError(f"route file {path!r}: expected a JSON array [routes, count] of route objects")
    return routes


def raw_routes(config: VirlConfig) -> list:
    """The routes a config names, as entries of a V-IRL route file (dicts)."""
    spec = config.routes
    if spec == "mini":
        return mini_benchmark()
    if spec.startswith("synthetic:"):
        return generate_routes(spec.split(":", 1)[1], config.n_routes, config.route_seed)
    return load_routes(spec)


def routes_for(config: VirlConfig) -> list:
    """The parsed routes a config names."""
    return [parse_route(r, f"{config.routes}: route {i}") for i, r in enumerate(raw_routes(config))]


# ---- the rail: one expected action per position ----

@dataclass
class Position:
    point: tuple                 # (lat, lng)
    heading: float               # where the agent faces
    action: str                  # "forward", "stop" or "turn"
    instruction: int             # 1-based index of the instruction being carried out
    turn_to: Optional[int] = None  # for "turn": the heading to face
    at_intersection: bool = False
    landmarks: list = field(default_factory=list)  # [(name, compass bearing)] in sight
    destination: Optional[str] = None


# The paper's configs relocate every rail point to its nearest panorama and keep a cut point only if it then
# lies more than 8 m from both ends of its street: the cut at the street's end, and any close to it, never stay.
MIN_FORWARD_GAP_M = 8.0


def build_rail(route: Route, straight_line_length: int, drop_rate: float, rng: random.Random,
               init_heading: int) -> list:
    """Positions in order, as the paper's `_parse_instruction_and_rail`: at the start a turn to the first
    street; along street k its cut points at 1/n, ..., (n-1)/n (n = straight_line_length), each dropped
    with `drop_rate` and kept only beyond MIN_FORWARD_GAP_M of both ends, forward(); at its end a turn
    at the intersection, or stop() at the destination. A correct turn takes the agent to the next
    position, so no forward() follows a turn at the same spot.

    Instructions are numbered 1: turn at the start, 2k: walk leg k, 2k+1: turn at its end; stop()
    shares the last leg's number."""
    rail = [Position(route.start, init_heading, "turn", 1, turn_to=route.headings[0])]
    here = route.start
    for k, (point, heading) in enumerate(zip(route.points, route.headings)):
        for s in range(1, straight_line_length):
            cut = lerp(here, point, s / straight_line_length)
            if rng.random() >= drop_rate and min(haversine(here, cut), haversine(cut, point)) > MIN_FORWARD_GAP_M:
                rail.append(Position(cut, heading, "forward", 2 * k + 2))
        if k + 1 < len(route.points):
            rail.append(Position(point, heading, "turn", 2 * k + 3, route.headings[k + 1], True, route.landmarks[k]))
        else:
            rail.append(Position(point, heading, "stop", 2 * k + 2, None, False, route.landmarks[k], route.dest_name))
        here = point
    return rail


def instructions(route: Route, init_heading: int) -> list:
    """The numbered instruction sentences of the whole route, relative turn word and compass heading both."""
    out, facing = [], init_heading
    for k, heading in enumerate(route.headings):
        turn = f"turn {turn_name(facing, heading)} to face {direction_name(heading)}."
        out.append("First, " + turn if k == 0 else turn[0].upper() + turn[1:])
        seen = _landmark_text(route.landmarks[k], heading)
        if k + 1 < len(route.points):
            out.append("Move forward until you reach next intersection" + (f" where {seen}." if seen else "."))
        else:
            out.append(f"Move forward until you reach destination where {seen}.")
        facing = heading
    return out


INTERSECTION_CUE = "You observe an intersection"


def landmark_text(pos: Position) -> str:
    """The landmarks in sight at a position: 'Maple Cafe is on your left', or 'No landmarks nearby' (the official
    rail's "observation" field, which its intersection check reads)."""
    return "; ".join([("The destination " if name == pos.destination else "") + f"{name} is on your "
                      f"{relation_name(b - pos.heading)}" for name, b in pos.landmarks] or ["No landmarks nearby"])


def observation_text(pos: Position, protocol: str = "project") -> str:
    """What is in sight at a position: 'Maple Cafe is on your left; You observe an intersection'. The official
    text always joins the cue with '; ', empty away from intersections: 'Maple Cafe is on your left; '."""
    if protocol == "official":
        return landmark_text(pos) + "; " + (INTERSECTION_CUE if pos.at_intersection else "")
    return "; ".join([landmark_text(pos)] + ([INTERSECTION_CUE] if pos.at_intersection else []))


def expected_action(pos: Position, absolute: bool) -> str:
    if pos.action != "turn":
        return pos.action + "()"
    x = direction_name(pos.turn_to) if absolute else turn_name(pos.heading, pos.turn_to)
    return f"turn_direction({x})"


# ---- verifier ----

# A turn argument is whitespace, at most one quote, whitespace, 1 to 40 letters, underscores and spaces, and the
# same mirrored. The regex only finds the parentheses and `_turn_words` checks the rest: written as one regex, its
# runs of \s* beside the spaces backtrack in time ~n^4 over an unclosed argument of n spaces (200: 6 s).
_ACTION_RE = re.compile(r"\b(forward|stop)\b|\bturn_direction\s*\(([\s\"'a-z_]*)\)", re.IGNORECASE)
_TURN_LETTER_RE = re.compile(r"[a-z_]", re.IGNORECASE)  # as in _ACTION_RE, so also İ ı ſ K (IGNORECASE folds)
_TURN_WORDS_RE = re.compile(r"[a-z_ ]{1,40}", re.IGNORECASE)
# one pass over the observation: a negation word arms the clause, a separator ends it, an "intersection" in an
# armed clause is negated; the regex `negation [^.;,]* intersection` retried every negation to the clause's end
_CLAIM_TOKEN_RE = re.compile(r"([.;,])|\b(?:no|not|without|nor)\b|(\bintersection)", re.IGNORECASE)


def _quotes(text: str) -> int:
    return text.count('"') + text.count("'")


def _turn_words(inner: str) -> Optional[str]:
    """The words of turn_direction(<inner>) ('' when it holds only spaces), or None when <inner> (whitespace,
    quotes, letters and underscores) is not an argument."""
    first = _TURN_LETTER_RE.search(inner)
    if first is None:  # spaces alone still make an argument, when one can sit between the quotes
        if _quotes(inner) > 2:
            return None
        cut = [i for i, c in enumerate(inner) if c in "\"'"]
        return "" if " " in (inner[cut[0]:cut[1]] if len(cut) == 2 else inner) else None
    end = len(inner) - _TURN_LETTER_RE.search(inner[::-1]).start()
    start = first.start()
    if not _TURN_WORDS_RE.fullmatch(inner, start, end) or _quotes(inner[:start]) > 1 or _quotes(inner[end:]) > 1:
        return None
    return " ".join(inner[start:end].lower().replace("_", " ").split())


def parse_action(text, absolute: bool) -> Optional[str]:
    """The first action of the action space in `text`, canonical ('turn_direction(slightly left)'), else None.

    Tolerates case, quotes and underscores ('turn_direction("slightly_left")'), a missing '()' after
    forward/stop, and 'north east' for 'northeast'; a direction outside the active rule's set is invalid."""
    if not isinstance(text, str):
        return None
    text = text[:2000]
    m = _ACTION_RE.search(text)
    while m and m.group(1) is None and (x := _turn_words(m.group(2))) is None:
        m = _ACTION_RE.search(text, m.start() + 1)  # not an argument: read on, as a regex search would
    if not m:
        return None
    if m.group(1):
        return m.group(1).lower() + "()"
    if absolute:
        x = x.replace(" ", "")
    return f"turn_direction({x})" if x in (DIRECTIONS if absolute else TURNS) else None


def claims_intersection(text) -> bool:
    """Whether an observation says the agent is at an intersection: it says "intersection", and no clause
    (clauses end at . ; ,) has a negation word (no, not, without, nor) before an "intersection" in it."""
    if not isinstance(text, str) or "intersection" not in text.lower():
        return False
    negated = False
    for m in _CLAIM_TOKEN_RE.finditer(text):
        if m.group(1):
            negated = False
        elif m.group(2) is None:
            negated = True
        elif negated:
            return False
    return True


@dataclass
class Verdict:
    outcome: str                  # a key of REWARDS
    reward: float
    feedback: str
    observation_ok: bool          # the answer's intersection claim was right


def _failure(outcome: str, reason: str, observation_ok: bool) -> Verdict:
    return Verdict(outcome, REWARDS[outcome], failure_feedback(reason), observation_ok)


def _choices(absolute: bool) -> str:
    return ", ".join(DIRECTIONS if absolute else TURNS)


def verify(text, pos: Position, absolute: bool, literal_intersection_check: bool = False,
           protocol: str = "project") -> Verdict:
    """Score one answer at a position: the single source of reward and success. Never raises.

    The paper's order (`step_rewards_virl`): the right action is correct whatever the observation
    says; any other answer is a wrong_observation if its intersection claim is wrong, else an
    invalid_action (no action of the action space) or a wrong_action.

    The claim is checked against the position by default. `literal_intersection_check` uses the
    paper code's test instead: the word "intersection" anywhere in the answer's observation ("no
    intersection" included) against the position's landmark text, which never holds the intersection
    cue; so a wrong answer naming a real intersection scores -1.5 and a missed one only -1. Protocol
    "official" scores as the official code does (official.py)."""
    if protocol == "official":  # observation_ok: this project's reading of the claim, for the recognition statistics
        outcome, reward, feedback, said = official_rules().virl_verify(
            text, expected_action(pos, absolute), landmark_text(pos), _action_strings(absolute))
        return Verdict(outcome, reward, feedback, claims_intersection(said) == pos.at_intersection)
    answer = parse_answer(text, ANSWER_FIELDS)
    said = answer["current observation"]
    claimed = claims_intersection(said)
    observation_ok = claimed == pos.at_intersection
    action = parse_action(answer["action"], absolute)
    if action == expected_action(pos, absolute):
        return Verdict("correct", REWARDS["correct"], f"Correct: {action}.", observation_ok)
    claim_ok = observation_ok
    if literal_intersection_check:
        claimed = isinstance(said, str) and "intersection" in said
        claim_ok = claimed == any("intersection" in name for name, _ in pos.landmarks)

    if not claim_ok:
        return _failure("wrong_observation", "you observed an intersection where there is none" if claimed
                        else "you did not notice the intersection you are at", observation_ok)
    if action is None:
        return _failure("invalid_action", 'your "action" is not one of forward(), turn_direction(x) with x one of '
                        f"{_choices(absolute)}, or stop()", observation_ok)
    return _failure("wrong_action", f"{action} is not the right action for the current instruction", observation_ok)


def _action_strings(absolute: bool) -> tuple:
    """The action space as exact strings (the official rail's): forward(), stop(), turn_direction(x)."""
    return ("forward()", "stop()") + tuple(f"turn_direction({x})" for x in (DIRECTIONS if absolute else TURNS))


def official_rules():
    """official.py, the official code's rules, imported only under protocol "official": without it this file copies
    out alone."""
    import official
    return official


def official_prompt(steps: list, history: list, current: str, absolute: bool, vision: bool) -> str:
    """The official prompt (official.virl_prompt) over this rule's action space."""
    choices = f"8 directions {list(DIRECTIONS)}" if absolute else str(list(TURNS))
    return official_rules().virl_prompt(steps, history, current, choices, vision)


# ---- environment ----

ACTION_SPACE = {True: "north, northeast, east, southeast, south, southwest, west, northwest",
                False: "left, right, slightly left, slightly right"}


def prompt_text(steps: list, history: list, current: str, absolute: bool, vision: bool, template: int = 0) -> str:
    """The full prompt at one position: task, numbered instructions, action space, O/A history, in the wording
    of `template` (VirlConfig.prompt_template)."""
    return _TEMPLATES[template](steps, history, current, absolute, vision)


def _template_0(steps: list, history: list, current: str, absolute: bool, vision: bool) -> str:
    lines = [f"O_{i + 1}: {o}\nA_{i + 1}: {a}" for i, (o, a) in enumerate(history)]
    lines.append(f"O_{len(history) + 1}: {current}")
    view = ("[Observation format]\nYou observe a 2x2 grid of street views with these headings:\n"
            "[front, right\n back, left]\nCheck whether a landmark named in the instructions is in sight.\n\n"
            if vision else "")
    return (
        "[Task]\nYou are an expert navigator. Follow the route instructions below, one position at a time. "
        "At each position, say what you observe, which instruction you are carrying out, and the action "
        "to take next.\n\n"
        "[Instructions]\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(steps)) + "\n\n" + view +
        "[Action space]\n"
        '"forward()": move forward to the next position;\n'
        f'"turn_direction(x)": turn to face x, one of {ACTION_SPACE[absolute]};\n'
        '"stop()": stop, you have reached the destination.\n\n'
        "[Observations and actions so far]\n" + "\n".join(lines) + "\n\n"
        "[Output]\nAnswer with one JSON object and nothing else:\n"
        '{"current observation": "what you observe now", "current instruction": "the instruction you are '
        'carrying out", "action": "one action from the action space"}'
    )


# Prompt diversity ("Debunk the Myth of SFT Generalization", arXiv 2510.00237): SFT on many wordings of one task
# keeps a model from tying the task to one template. Every template states the same facts (the task, the numbered
# instructions, the views in V-IRL-VL, the action space, the observations and actions so far, the current
# observation, the three answer fields) in its own words and order; template 0 is the prompt above.

def _numbered(steps: list, form: str) -> str:
    return "\n".join(form.format(i=i + 1, s=s) for i, s in enumerate(steps))


def _past(history: list, form: str, none: str) -> str:
    """The observations and actions so far, one line each, or `none` at the first position."""
    return "\n".join(form.format(i=i + 1, o=o, a=a) for i, (o, a) in enumerate(history)) or none


def _template_1(steps, history, current, absolute, vision) -> str:
    view = ("At the current position you see one image of four street views in a 2x2 grid: the front view top "
            "left, the right view top right, the back view bottom left and the left view bottom right. Look in "
            "them for the landmarks the route names.\n\n" if vision else "")
    return (
        "Reply with exactly one JSON object:\n"
        '{"current observation": "...", "current instruction": "...", "action": "..."}\n'
        '"current observation" describes what you observe where you stand now, "current instruction" is the route '
        'instruction you are carrying out there, and "action" is your next move, taken from the allowed actions.\n\n'
        "Allowed actions:\n"
        "- forward(): go ahead to the next position\n"
        f"- turn_direction(x): turn to face x, where x is one of {ACTION_SPACE[absolute]}\n"
        "- stop(): you have arrived at the destination\n\n"
        "You are walking a route through a city, one position at a time. The route:\n"
        + _numbered(steps, "Step {i}: {s}") + "\n\n" + view +
        "Positions so far:\n"
        + "".join(f"Position {i + 1} - observed: {o}\nPosition {i + 1} - action taken: {a}\n"
                  for i, (o, a) in enumerate(history))
        + f"Position {len(history) + 1} (current) - observed: {current}"
    )


def _template_2(steps, history, current, absolute, vision) -> str:
    view = ("What you see is one image of 4 street views, laid out as a 2x2 grid: front and right on the top "
            "row, back and left on the bottom row. Check it for the landmarks the directions mention.\n\n"
            if vision else "")
    return (
        "Navigation task. You walk along a route in a city, position by position, following written directions. "
        "At every position, report what you see, name the direction you are following, and choose the next "
        "action.\n\n"
        "What you have seen and done, oldest first:\n"
        + _past(history, "{i}. saw: {o} | did: {a}", "nothing yet, this is the first position") + "\n"
        f"Now you see: {current}\n\n"
        "Route directions:\n" + _numbered(steps, "({i}) {s}") + "\n\n"
        "Actions you may take: forward() moves you to the next position; turn_direction(x) turns you to face x, "
        f"with x one of {ACTION_SPACE[absolute]}; stop() ends the walk at the destination.\n\n" + view +
        'Output one JSON object only, with the keys "current observation" (what you see now), "current '
        'instruction" (the direction you are following) and "action" (the action you take).'
    )


def _template_3(steps, history, current, absolute, vision) -> str:
    view = ("## Views\nA 2x2 image of street views: [front | right] on top, [back | left] below. Watch for the "
            "landmarks named in the instructions.\n" if vision else "")
    n = len(history) + 1
    return (
        "## Role\nYou guide a pedestrian through a city along a described route, deciding one move per "
        "position.\n"
        "## Route instructions\n" + _numbered(steps, "{i}) {s}") + "\n"
        "## Moves\n"
        "* forward() - walk on to the next position\n"
        f"* turn_direction(x) - face x, where x is one of {ACTION_SPACE[absolute]}\n"
        "* stop() - the destination is reached\n" + view +
        "## Trajectory\n"
        + "".join(f"t{i + 1} observation: {o}\nt{i + 1} action: {a}\n" for i, (o, a) in enumerate(history))
        + f"t{n} observation: {current}   <- now\n"
        '## Answer\nA single JSON object, {"current observation": ..., "current instruction": ..., "action": ...}, '
        f"giving what you observe at t{n}, the instruction you are following there, and your move."
    )


def _template_4(steps, history, current, absolute, vision) -> str:
    view = ("Your observation is an image of four street views in a 2x2 grid (top: front, right; bottom: back, "
            "left); find in it the landmarks the instructions name.\n\n" if vision else "")
    return (
        f"Question: you are following the route below and stand at position {len(history) + 1}. What do you "
        "observe, which instruction are you following, and what is your next action?\n\n"
        "Route:\n" + _numbered(steps, "Instruction {i} - {s}") + "\n\n"
        "Earlier positions:\n"
        + _past(history, 'At position {i} you observed "{o}" and took the action {a}.',
                "None: you are at the first position.") + "\n"
        f"At this position you observe: {current}\n\n" + view +
        "Possible actions are forward() (advance to the next position), turn_direction(x) (turn to face x, x being "
        f"one of {ACTION_SPACE[absolute]}) and stop() (you are at the destination).\n\n"
        'Answer format: one JSON object and nothing else, {"current observation": "<what you observe>", '
        '"current instruction": "<the instruction you follow>", "action": "<your action>"}.'
    )


def _template_5(steps, history, current, absolute, vision) -> str:
    view = ("The current observation is a picture made of four street views, 2 by 2: front (top left), right (top "
            "right), back (bottom left), left (bottom right). Look for the landmarks of the instructions.\n\n"
            if vision else "")
    return (
        f"Current observation: {current}\n\n"
        "Previous observations and actions:\n" + _past(history, "{i}) {o} => {a}", "(none)") + "\n\n"
        "You are a navigator on foot. These are the numbered instructions of your whole route; carry them out "
        "in order:\n" + _numbered(steps, "[{i}] {s}") + "\n\n" + view +
        f"Action space: forward() | turn_direction(x), x in {ACTION_SPACE[absolute]} | stop()\n"
        "forward() takes you to the next position, turn_direction(x) turns you to face x, stop() means you have "
        "arrived.\n\n"
        'Respond with JSON only, one object with three fields, in this order: "current observation", what you '
        'observe now; "current instruction", the instruction you are carrying out; "action", one action from '
        "the action space."
    )


def _template_6(steps, history, current, absolute, vision) -> str:
    view = ("VIEWS\none image, a 2x2 grid of street views: front, right (top row); back, left (bottom row)\n"
            if vision else "")
    return (
        "INPUT\nroute instructions:\n" + _numbered(steps, "  #{i} {s}") + "\n"
        "history:\n" + _past(history, "  #{i} observation={o} action={a}", "  (empty)") + "\n"
        f"current observation: {current}\n" + view +
        "ACTIONS\nforward() = move to the next position; turn_direction(x) = turn to face x (x in "
        f"{ACTION_SPACE[absolute]}); stop() = at the destination\n"
        'OUTPUT\none JSON object: {"current observation": <what you observe>, "current instruction": <the '
        'instruction being carried out>, "action": <an action from ACTIONS>}\n'
        "TASK\nNavigate the route one position at a time: read the current observation against the "
        "instructions and pick the next action."
    )


def _template_7(steps, history, current, absolute, vision) -> str:
    view = ("What you see comes as one image of four street views in a 2x2 grid, front and right above, back and "
            "left below; spot in it the landmarks of your directions.\n" if vision else "")
    return (
        "Imagine you are on foot in a city, finding your way with these directions, which you follow in order:\n"
        + _numbered(steps, "{i}. {s}") + "\n"
        "On the way you noted:\n" + _past(history, "- at position {i} you saw: {o} (you chose {a})", "- nothing so far")
        + f"\nWhere you stand now (position {len(history) + 1}): {current}\n" + view +
        "At each position you take exactly one action: forward() to walk on to the next position, "
        f"turn_direction(x) to turn and face x (x is one of {ACTION_SPACE[absolute]}), or stop() once you reach "
        "the destination.\n"
        "Say what you observe, which of the directions you are following, and what you do next, as one JSON "
        'object and nothing else: {"current observation": "...", "current instruction": "...", "action": "..."}'
    )


def _template_8(steps, history, current, absolute, vision) -> str:
    view = ("Your observations are images of 4 street views in a 2x2 grid ([front, right] over [back, left]); "
            "check them for the landmarks of the route.\n\n" if vision else "")
    n = len(history) + 1
    return (
        "Your answer must be one JSON object with these keys, in this order:\n"
        '- "current observation": what you observe at your position\n'
        '- "current instruction": which route instruction you are carrying out\n'
        '- "action": the next action, one of forward(), turn_direction(x) with x among '
        f"{ACTION_SPACE[absolute]}, or stop()\n"
        "forward() moves you to the next position, turn_direction(x) turns you to face x, and stop() says you have "
        "reached the destination.\n\n"
        "The route you are navigating, step by step:\n" + _numbered(steps, "Step {i}. {s}") + "\n\n" + view +
        "Log of the walk:\n"
        + "".join(f"O_{i + 1} = {o}\nA_{i + 1} = {a}\n" for i, (o, a) in enumerate(history))
        + f"O_{n} = {current} (now)"
    )


def _template_9(steps, history, current, absolute, vision) -> str:
    view = ("Views: each position shows one image, four street views in a 2x2 grid, front top left, right top "
            "right, back bottom left, left bottom right.\n" if vision else "")
    n = len(history) + 1
    return (
        "You are a navigation agent in a city. Rules: go one position at a time; at each position, compare what "
        "you observe with the route instructions, then take the action that carries out the current "
        "instruction.\n"
        "Actions: forward() (to the next position), turn_direction(x) (face x, with x in "
        f"{ACTION_SPACE[absolute]}), stop() (the destination is reached).\n"
        "Route, numbered:\n" + _numbered(steps, "{i} - {s}") + "\n" + view +
        "Log:\n" + "".join(f"[{i + 1}] {o} -> {a}\n" for i, (o, a) in enumerate(history))
        + f"[{n}] {current} -> ?\n"
        'Answer: one JSON object holding "current observation" (what you observe), "current instruction" (the '
        'instruction in progress) and "action" (your action), nothing else.'
    )


_TEMPLATES = (_template_0, _template_1, _template_2, _template_3, _template_4, _template_5, _template_6,
              _template_7, _template_8, _template_9)


# ---- chain-of-thought answers ----
# "Debunk the Myth of SFT Generalization" trains SFT on answers that reason before they act. The expert's thought
# ties the observation to the instruction that applies and the instruction to the action under the active rule,
# so that SFT data carries the rule itself, not only its result.

def expert_thought(pos: Position, steps: list, absolute: bool) -> str:
    """The reasoning of the correct answer at a position: what is in sight, whether it is an intersection, which
    instruction applies and why, which heading or turn it names, hence the action. Written without double
    quotes and without 'field:' patterns, so that it stays one JSON string that neither the answer parser nor
    the trainers' search for the action field can mistake for a field."""
    n, action = pos.instruction, expected_action(pos, absolute)
    seen = [("the destination " if name == pos.destination else "") + f"{name} on my {relation_name(b - pos.heading)}"
            for name, b in pos.landmarks]
    sight = ("I see " + ", ".join(seen) if seen else "I see no landmark") + (
        "; this is an intersection" if pos.at_intersection else "; this is not an intersection")
    quoted = lambda k: f"instruction {k}, '{steps[k - 1]}',"
    if pos.action == "forward":
        return f"{sight}, so I am still on the street of {quoted(n)} short of its end. The action is {action}."
    if pos.action == "stop":
        arrived = ("the destination is in sight" if any(name == pos.destination for name, _ in pos.landmarks)
                   else "I am at the destination")
        return (f"{sight}. This is the end of {quoted(n)} the last instruction: it leads to {pos.destination}, and "
                f"{arrived}. The action is {action}.")
    why = (f"{sight}, so {quoted(n - 1)} is done and {quoted(n)} applies here." if pos.at_intersection
           else f"{sight}. I have not moved yet, so I am at the start of the route and {quoted(n)} applies.")
    to = direction_name(pos.turn_to)
    rule = (f"It names the heading {to}, and my actions take compass headings" if absolute
            else f"It names a {turn_name(pos.heading, pos.turn_to)} turn to face {to}, and my actions take turns "
                 "relative to my heading")
    return f"{why} {rule}, so the action is {action}."


# every kind of action, and a turn of each rule: under either rule, one of the turns is outside its action space
WRONG_ACTIONS = ("forward()", "stop()", "turn_direction(north)", "turn_direction(left)")


def wrong_answer(expert: str, rng: random.Random) -> str:
    """A plausible mistake for sequential-revision SFT data: the expert answer (JSON or the official template)
    with another action, drawn from `rng` among WRONG_ACTIONS. A thought, if any, stays: the mistake is in the
    action."""
    action = parse_answer(expert, ANSWER_FIELDS)[ACTION_FIELD]
    wrong = rng.choice([a for a in WRONG_ACTIONS if a != action])
    # an action is letters, brackets and spaces, which JSON writes as they are: the same text in both formats
    return expert.replace(f'"{ACTION_FIELD}": "{action}"', f'"{ACTION_FIELD}": "{wrong}"', 1)


class NavigationEnv:
    """One walker on V-IRL routes. reset() picks a route and returns the prompt at its first
    position; step(answer) verifies one attempt. A correct answer moves to the next position: a new
    prompt (continues=False); a wrong one asks again (continues=True) until the position's attempts
    run out, which ends the route, failed. After done, call reset().

    >>> env = NavigationEnv(VirlConfig(n_routes=5), seed=0)
    >>> obs = env.reset()
    >>> done = False
    >>> while not done:
    ...     obs, reward, done, info = env.step(env.expert_response())
    >>> info["success"]
    True
    """

    def __init__(self, config: Optional[VirlConfig] = None, seed: int = 0, routes: Optional[list] = None):
        """`routes`: the parsed routes of `config`, when another env already has them (saves re-parsing)."""
        self.config = config or VirlConfig()
        self.routes = routes if routes is not None else routes_for(self.config)
        self.rng = random.Random(seed)
        self.streetviews = None
        if self.config.vision and any(r.city is None for r in self.routes):
            if not (self.config.streetview_dir and self.config.streetview_map):
                raise ValueError("vision on real V-IRL routes needs their street views: set streetview_dir "
                                 "(the {pano_id}.jpg folder) and streetview_map (the (lat, lng) -> pano_id pickle)")
            self.streetviews = StreetViews(self.config.streetview_dir, self.config.streetview_map, haversine)
        self.route, self.rail, self.steps, self.history = None, [], [], []
        self.index = self.attempt = 0
        self.done = True

    @property
    def position(self) -> Position:
        return self.rail[self.index]

    def reset(self, seed: Optional[int] = None, episode: Optional[int] = None,
              route: Optional[int] = None) -> Observation:
        """Start a route; `seed` restarts the RNG (start heading, dropped forwards). Episode k plays route
        k % len(self.routes) (evaluation), `route` picks one by index; with neither, the RNG draws one. Under
        protocol "official" the RNG draws it for an episode too, as the official evaluation draws its routes with
        replacement, but on the mini benchmark, which it plays in order."""
        if seed is not None:
            self.rng = random.Random(seed)
        if episode is not None:
            if route is not None:
                raise ValueError(f"reset(episode={episode}, route={route}): expected one of them, not both")
            in_order = self.config.protocol != "official" or self.config.routes == "mini"
            route = episode % len(self.routes) if in_order else None
        if route is not None and not 0 <= route < len(self.routes):
            raise ValueError(f"route index {route} out of range: {len(self.routes)} routes loaded")
        self.route = self.routes[self.rng.randrange(len(self.routes)) if route is None else route]
        start_heading = self.route.init_heading or self.rng.randrange(360)
        self.steps = instructions(self.route, start_heading)
        self.rail = build_rail(self.route, self.config.straight_line_length, self.config.drop_rate, self.rng,
                               start_heading)
        self.history, self.index, self.attempt, self.done = [], 0, 0, False
        return self._observation()

    def _current_text(self, pos: Position) -> str:
        """The current observation's line. V-IRL-VL must read landmarks off the image, but the paper's
        prompt still tells it when it stands at an intersection."""
        official = self.config.protocol == "official"
        if not self.config.vision:
            return observation_text(pos, self.config.protocol)
        if official:  # the cue's place is always there, empty away from intersections
            return "You observe an image of 4 views; " + (INTERSECTION_CUE if pos.at_intersection else "")
        return "You observe an image of 4 views" + (f"; {INTERSECTION_CUE}" if pos.at_intersection else "")

    def views(self, pos: Position) -> list:
        """The four street views (front, right, back, left) at a position."""
        if self.streetviews is not None:
            return self.streetviews.views(pos.point, pos.heading, self.config.view_size)
        spot = f"{self.route.route_id}:{pos.point[0]:.6f}:{pos.point[1]:.6f}"
        return synthetic_views(CITIES[self.route.city]["style"], pos.landmarks, pos.heading, pos.at_intersection,
                               self.config.view_size, spot)

    def _observation(self) -> Observation:
        pos, cfg = self.position, self.config
        text = (official_prompt(self.steps, self.history, self._current_text(pos), cfg.absolute_actions, cfg.vision)
                if cfg.protocol == "official" else
                prompt_text(self.steps, self.history, self._current_text(pos), cfg.absolute_actions, cfg.vision,
                            cfg.prompt_template))
        image = render_grid(self.views(pos), self.config.view_size) if self.config.vision else None
        return Observation(text, image, continues=False)

    def step(self, response) -> tuple:
        if self.done:
            raise RuntimeError("NavigationEnv.step called on a finished route: call reset() first")
        cfg = self.config
        if self.attempt >= cfg.verify_iter:  # protocol "official": the answer after a position's last attempt
            reward, outcome, feedback = official_rules().step_limit()
            self.attempt, self.done = self.attempt + 1, True
            return Observation(feedback, None), reward, True, {"outcome": outcome, "feedback": feedback,
                                                               "success": False, "attempt": self.attempt,
                                                               "recognized": None}
        pos, absolute, official = self.position, cfg.absolute_actions, cfg.protocol == "official"
        verdict = verify(response, pos, absolute, cfg.literal_intersection_check, cfg.protocol)
        self.attempt += 1
        correct = verdict.outcome == "correct"
        info = {"outcome": verdict.outcome, "feedback": verdict.feedback, "attempt": self.attempt,
                "position": self.index, "positions": len(self.rail), "route_id": self.route.route_id,
                "recognized": verdict.observation_ok if cfg.vision else None}
        if correct:  # past observations stay as text even in V-IRL-VL, as in the paper's prompt
            self.history.append((observation_text(pos, cfg.protocol), expected_action(pos, absolute)))
            self.index, self.attempt = self.index + 1, 0
            self.done = self.index >= len(self.rail)
        else:  # the paper truncates the route when a position's attempts run out (officially after one more answer)
            self.done = self.attempt >= cfg.verify_iter and not official
        if self.done:
            obs = Observation(verdict.feedback, None, False)
        elif correct:
            obs = self._observation()
        else:
            obs = Observation(verdict.feedback if official else retry_text(verdict.feedback), None, continues=True)
        info["success"] = self.done and correct  # the last position is the stop(): every one was passed
        return obs, verdict.reward, self.done, info

    def expert_response(self, reasoning: bool = False) -> str:
        """The correct answer at the current position. `reasoning`: a "thought" field first, the chain of
        thought of `expert_thought`, in the same object."""
        pos, absolute, protocol = self.position, self.config.absolute_actions, self.config.protocol
        answer = {"current observation": self._current_text(pos) if protocol == "official" else observation_text(pos),
                  "current instruction": self.steps[pos.instruction - 1], "action": expected_action(pos, absolute)}
        if reasoning:  # first, so that the action still ends the answer
            answer = {THOUGHT_FIELD: expert_thought(pos, self.steps, absolute), **answer}
        return official_rules().answer(answer) if protocol == "official" else json.dumps(answer)


# ---- demo ----

def main(argv=None) -> int:
    p = OneLineArgumentParser(description="V-IRL: sample prompt, sample street-view grids, expert play.")
    p.add_argument("--routes", default="synthetic:nyc", help='"synthetic:<city>", "mini" or a V-IRL route file')
    p.add_argument("--n-routes", type=int, default=1000, help="routes to draw for synthetic:<city>")
    p.add_argument("--relative", action="store_true", help="OOD rule: left/right/slightly actions")
    p.add_argument("--episodes", type=int, default=500, help="expert routes to play")
    p.add_argument("--seed", type=int, default=0, help="route-drawing seed")
    p.add_argument("--out-dir", default=".", help="where to write the sample grids")
    p.add_argument("--ood-city", default="tokyo", choices=OOD_CITIES, help="the OOD city of the second sample grid")
    p.add_argument("--export", metavar="PATH", help="write the routes to a V-IRL route file and exit")
    args = p.parse_args(argv)
    if args.episodes < 0:
        fail(f"--episodes {args.episodes}: expected 0 or a positive integer")
    try:
        cfg = VirlConfig(routes=args.routes, n_routes=args.n_routes, absolute_actions=not args.relative)
        if args.export:
            raw = raw_routes(cfg)  # the file format keeps more than a parsed Route: write the entries themselves
            try:
                write_routes(args.export, raw)
            except OSError as e:
                cannot_write("--export", args.export, e, "write it", "a writable file in an existing folder")
            print(f"wrote {len(raw)} routes to {args.export}")
            return 0
        try:  # before the work: a folder that cannot be made fails at once
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            cannot_write("--out-dir", args.out_dir, e, "make it a folder",
                         "a folder, existing or to create, that we may write in")
        env = NavigationEnv(cfg, seed=args.seed)
        print("---- V-IRL-L prompt ----")
        print(env.reset().text)
        print("---- expert answer ----")
        print(env.expert_response())
        for city in (ID_CITY, args.ood_city):
            vl = NavigationEnv(VirlConfig(routes=f"synthetic:{city}", n_routes=1, vision=True), seed=args.seed)
            vl.reset()
            while vl.position.action != "turn" or not vl.position.at_intersection or not vl.position.landmarks:
                if vl.step(vl.expert_response())[2]:  # no landmark intersection on this route: show the start
                    vl.reset()
                    break
            path = os.path.join(args.out_dir, f"virl_vl_{city}.png")
            try:
                render_grid(vl.views(vl.position), vl.config.view_size).save(path)
            except OSError as e:
                cannot_write("--out-dir", args.out_dir, e, f"write {path}", "a folder that we may write in")
            print(f"---- V-IRL-VL grid in {city} ({observation_text(vl.position)}) written to {path} ----")
    except ValueError as e:
        fail(str(e))

    wins, steps, secs = play_expert(env, args.episodes)
    print(f"expert: {wins}/{args.episodes} routes completed ({100 * wins / max(1, args.episodes):.1f}%), "
          f"{steps} positions, {secs:.2f} s")
    return 0 if wins == args.episodes else 1


if __name__ == "__main__":
    sys.exit(main())
