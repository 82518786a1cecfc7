"""V-IRL: follow written route instructions through a city, one position at a time (Chu et al., 2025).

At each position the model sees the route's numbered instructions, the observations and actions so far and the
current observation (V-IRL-L: text, "Maple Bakery is on your left; You observe an intersection"; V-IRL-VL: a 2x2
grid of street views), and answers
    {"current observation": "...", "current instruction": "...", "action": "forward()"}
with forward(), turn_direction(x) or stop(), x a compass direction (ID rule) or left, right, slightly left or
slightly right (OOD rule). `verify` scores each attempt (REWARDS, in the paper's order); a position allows
`verify_iter` attempts, then the route ends, failed. Synthetic cities stand in for Google Street View, in the V-IRL
route-file format, so `VirlConfig(routes=PATH)` reads the paper's own routes. docs/environments.md tells the rest.

The environment contract, GeneralPoints' too, so that the trainers and the evaluator hold no fact of either:
    env.reset(seed=None, episode=None) -> Observation   a new route; `seed` restarts the RNG (start heading,
        dropped forwards); episode k plays route k % len(env.routes) (the evaluation's reset(seed=s, episode=k));
        `route=i` picks one by index; with neither, the RNG draws one
    env.step(answer) -> (Observation, reward, done, info)   verify one attempt
    env.expert_response(reasoning=False) -> str   the correct answer at the current position; reasoning=True
        opens the same JSON object with a "thought" field (THOUGHT_FIELD), a chain of thought ending in the action
    ACTION_FIELD = "action"   the answer's final field, the action itself (the PPO trainer weights the tokens
        before it, the thought among them, by `pre_action_coef` in the action's log-probability)
    wrong_answer(expert: str, rng: random.Random) -> str   a plausible mistake made from an expert answer:
        another action (sequential-revision SFT data); a thought is kept as it was
    config.prompt_template: int = 0   which of PROMPT_TEMPLATES wordings of the prompt reset() and step() show
        (0: the original); each states the same facts and asks for the same fields
The verifier reads only the answer's own fields: a "thought" or any other extra field is ignored.

This file copies out alone for V-IRL-L: the standard library, nothing else. V-IRL-VL adds streetview.py (and
Pillow), imported only when vision is on; protocol "official" adds official.py.

    python env_virl.py                         # sample prompt, sample ID and OOD view grids, expert play
    python env_virl.py --no-grids              # V-IRL-L alone: no streetview.py needed
    python env_virl.py --export routes.json --routes synthetic:nyc --n-routes 1000
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

DIRECTIONS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
RELATIONS = ("front", "right front", "right", "right behind", "behind", "left behind", "left", "left front")
TURNS = ("left", "right", "slightly left", "slightly right")
REWARDS = {"correct": 1.0, "wrong_observation": -1.5, "wrong_action": -1.0, "invalid_action": -1.0}
ANSWER_FIELDS = ("current observation", "current instruction", "action")
ACTION_FIELD = "action"  # the final field, the action itself: the PPO trainer weights the tokens before it
THOUGHT_FIELD = "thought"  # the reasoning an answer may open with (expert_response(reasoning=True)); never verified
PROTOCOLS = ("project", "official")  # whose rules score and prompt: this project's or the official code's
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
    protocol: str = "project"           # one of PROTOCOLS: whose rules score and prompt

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"VirlConfig.protocol={self.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if self.protocol == "official" and self.prompt_template:
            raise ValueError(f"VirlConfig.prompt_template={self.prompt_template}: protocol 'official' prompts with "
                             "the official prompt only; expected 0")
        for name in ("verify_iter", "straight_line_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"VirlConfig.{name}={getattr(self, name)}: expected an integer >= 1")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"VirlConfig.drop_rate={self.drop_rate}: expected 0 <= drop_rate < 1")
        if not 1 <= self.n_routes <= MAX_ROUTES:
            raise ValueError(f"VirlConfig.n_routes={self.n_routes}: expected an integer from 1 to {MAX_ROUTES}")
        if not 32 <= self.view_size <= MAX_VIEW_SIZE:
            raise ValueError(f"VirlConfig.view_size={self.view_size}: expected 32 to {MAX_VIEW_SIZE} pixels")
        if type(self.prompt_template) is not int or not 0 <= self.prompt_template < PROMPT_TEMPLATES:
            raise ValueError(f"VirlConfig.prompt_template={self.prompt_template!r}: expected an integer from 0 to "
                             f"{PROMPT_TEMPLATES - 1}")
        prompt_template(self.prompt_template)  # 1 to 9: prompt_variants.py is here, or one line says so


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
    """The relative turn word: beyond 45 degrees left/right, within it (45 included) slightly; 0 is 'slightly
    right', 180 'left'. The angle wraps (350 -> 10: 'slightly right'), where the paper's code said 'left'."""
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
# "nyc" is the in-distribution city; the other nine make the visual OOD benchmark. Their looks are streetview.STYLES.

CITIES = {  # name: its centre (lat, lng), the compass angle of its street grid, its block lengths (m)
    "nyc": dict(center=(40.7549, -73.9840), angle=29, blocks=(80, 260)),
    "london": dict(center=(51.5098, -0.1342), angle=12, blocks=(60, 180)),
    "tokyo": dict(center=(35.6595, 139.7005), angle=-8, blocks=(40, 120)),
    "paris": dict(center=(48.8698, 2.3077), angle=-30, blocks=(70, 200)),
    "hong_kong": dict(center=(22.2819, 114.1582), angle=20, blocks=(40, 110)),
    "melbourne": dict(center=(-37.8136, 144.9631), angle=-20, blocks=(90, 220)),
    "lagos": dict(center=(6.4541, 3.3947), angle=40, blocks=(60, 170)),
    "mumbai": dict(center=(18.9322, 72.8264), angle=-15, blocks=(50, 150)),
    "buenos_aires": dict(center=(-34.6037, -58.3816), angle=5, blocks=(100, 130)),
    "san_francisco": dict(center=(37.7879, -122.4075), angle=45, blocks=(90, 200)),
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
    along, across = [0.0], [0.0]
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
    """n routes in a synthetic city, in the V-IRL route format, reproducible from (city, n, seed): each starts
    mid-block, turns at each of 2 to 5 intersections and ends at a landmark mid-block. One map per city."""
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


def _landmarks(text: str, heading: int) -> list:
    """'A is on your left, B is on your front' seen at `heading` -> [(name, compass bearing)]."""
    return [(name.strip(), (heading + RELATION_ANGLE[rel]) % 360) for name, rel in _LANDMARK_RE.findall(text)]


def _geocode(value, where: str, name: str) -> tuple:
    """A [lat, lng] of a route file as (lat, lng); ValueError naming the field otherwise."""
    lat = lng = math.nan  # fails the range test below, as does a NaN in the file
    if isinstance(value, (list, tuple)) and len(value) >= 2:
        try:
            lat, lng = float(value[0]), float(value[1])
        except (TypeError, ValueError, OverflowError):
            pass
    if not (-90 <= lat <= 90 and -180 <= lng <= 180):
        raise ValueError(f"{where}: {name} is {str(value)[:60]}; expected [lat, lng] in degrees")
    return lat, lng


def parse_route(raw: dict, where: str = "route") -> Route:
    """A Route from one entry of a V-IRL route file; ValueError naming the first missing or bad field."""
    def need(obj, *keys):
        for k in keys:
            if not isinstance(obj, dict) or k not in obj:
                raise ValueError(f"{where}: missing field {'.'.join(keys)}")
            obj = obj[k]
        return obj

    start = _geocode(need(raw, "start_place", "relocated_geocode"), where, "start_place.relocated_geocode")
    points, blocks = need(raw, "route_results", "geocode_list"), need(raw, "milestone_info")
    if not isinstance(points, list):
        raise ValueError(f"{where}: route_results.geocode_list is a {type(points).__name__}; expected a list")
    points = [_geocode(p, where, f"route_results.geocode_list[{k}]") for k, p in enumerate(points)]
    heading = raw.get("init_heading", 0) or 0
    try:
        init_heading = int(float(heading)) % 360
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: init_heading is {str(heading)[:40]}; expected a heading in degrees") from None
    if isinstance(blocks, list) and all(isinstance(b, str) for b in blocks):
        blocks = "\n".join(blocks)
    if not isinstance(blocks, str):
        raise ValueError(f"{where}: milestone_info holds {str(blocks)[:60]}; expected a list of strings (or one)")
    blocks = _BLOCK_RE.findall(blocks)
    if not points or len(blocks) != len(points):
        raise ValueError(f"{where}: {len(points)} geocodes but {len(blocks)} milestone_info blocks: expected one each")
    headings, landmarks, here = [], [], start
    for point, block in zip(points, blocks):
        fields = dict(_MILESTONE_FIELD_RE.findall(block))
        m = re.match(r"\s*(-?\d{1,9})\b", fields.get("to_next_intersection_heading", ""))
        heading = int(m.group(1)) % 360 if m else round(bearing(here, point)) % 360
        headings.append(heading)
        landmarks.append(_landmarks(fields.get("landmarks", ""), heading))
        here = point
    dest = raw.get("dest_place", {}).get("name") if isinstance(raw.get("dest_place"), dict) else None
    dest = dest if isinstance(dest, str) and dest else (landmarks[-1][0][0] if landmarks[-1] else "the destination")
    return Route(str(raw.get("route_id", where)), raw.get("city") if raw.get("city") in CITIES else None,
                 start, init_heading, points, headings, landmarks, dest)


MAX_NESTING = 64  # brackets deep in a route file: real ones are 4 deep; deeper is refused before JSON parsing


def _nesting(text: str) -> int:
    """How deep the text's JSON brackets nest, strings skipped: one pass, never recursion."""
    depth = deepest = 0
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|([\[{])|[\]}]', text):
        if m.group(1):
            depth += 1
            deepest = max(deepest, depth)
        elif m.group(0) in "]}":
            depth -= 1
    return deepest


def load_routes(path: str) -> list:
    """Routes (raw dicts) from a V-IRL route file: the JSON array [routes, count] (a bare list works too)."""
    try:
        with open(path) as f:
            text = f.read()
        if _nesting(text) > MAX_NESTING:
            raise ValueError(f"nested more than {MAX_NESTING} deep")
        data = json.loads(text)
    except FileNotFoundError:
        raise ValueError(f"route file {path!r} not found") from None
    except IsADirectoryError:
        raise ValueError(f"route file {path!r} is a folder: expected a V-IRL route file (JSON)") from None
    except (OSError, ValueError, RecursionError) as e:
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
    """Positions in order, as the paper's `_parse_instruction_and_rail`: a turn to the first street; along street k
    forward() at its cuts 1/n, ..., (n-1)/n (n = straight_line_length), each dropped with `drop_rate`, none within
    MIN_FORWARD_GAP_M of its ends; a turn at its end, or stop() at the destination. No forward() follows a turn at
    the same spot. Instructions: 1 the first turn, 2k leg k, 2k+1 the turn at its end; stop() shares the last."""
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


def observation_text(pos: Position, protocol: str = "project", seen: Optional[str] = None) -> str:
    """What is in sight at a position, `seen` (V-IRL-VL: the image) or its landmarks, then the intersection cue:
    'Maple Cafe is on your left; You observe an intersection'. The official text always joins the cue with '; ',
    empty away from intersections: 'Maple Cafe is on your left; '."""
    seen = landmark_text(pos) if seen is None else seen
    if protocol == "official":
        return seen + "; " + (INTERSECTION_CUE if pos.at_intersection else "")
    return "; ".join([seen] + ([INTERSECTION_CUE] if pos.at_intersection else []))


def expected_action(pos: Position, absolute: bool) -> str:
    if pos.action != "turn":
        return pos.action + "()"
    x = direction_name(pos.turn_to) if absolute else turn_name(pos.heading, pos.turn_to)
    return f"turn_direction({x})"


# ---- parse: the answer's fields, its action, its intersection claim ----
# JSON first, anywhere in the text (a ```json fence, chatter around it); the fields it lacks (or holds as null) then
# as `"name": value` in JSON-like text, outside the thought's string: reasoning that mentions a field ("... so
# action: stop()") never answers for it. A value that is not a string (a number, a list) is no answer.

MAX_ANSWER_CHARS = 50_000  # answers are a few hundred characters; never scan megabytes of noise
_LOOSE_FIELD_RE = {name: re.compile(  # a "string", a 'string', a [list] (group 3: no answer) or a bare value
    r"""["']?%s["']?\s*:\s*(?:"((?:[^"\\\n]|\\.)*)"|'([^'\n]*)'|(\[)[^\]\n]*\]|([^,}\n]+))""" % name, re.IGNORECASE)
    for name in ANSWER_FIELDS}
_THOUGHT_VALUE_RE = re.compile(r"""(["']%s["']\s*:\s*")((?:[^"\\]|\\[\s\S])*)(")""" % THOUGHT_FIELD, re.IGNORECASE)


def _objects(text: str):
    """The JSON objects that open at the text's first 16 '{' (adversarial text with thousands costs no more)."""
    decoder, start = json.JSONDecoder(), -1
    for _ in range(16):
        start = text.find("{", start + 1)
        if start < 0:
            return
        try:
            obj = decoder.raw_decode(text, start)[0]
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            yield obj


def parse_answer(text) -> dict:
    """{field: its string or None} for ANSWER_FIELDS: from the first JSON object that has an "action" (else the
    first object), then, for what it lacks, the loose `name: value` patterns. Never raises."""
    text = (text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text))[:MAX_ANSWER_CHARS]
    objects = _objects(text)
    first = next(objects, {})
    found = first if ACTION_FIELD in first else next((o for o in objects if ACTION_FIELD in o), first)
    answer = {name: found.get(name) for name in ANSWER_FIELDS}
    if None in answer.values() and THOUGHT_FIELD in text.lower():  # the thought's string blanked, its length kept
        text = _THOUGHT_VALUE_RE.sub(lambda m: m.group(1) + " " * len(m.group(2)) + m.group(3), text)
    for name, value in answer.items():
        if value is None and (m := _LOOSE_FIELD_RE[name].search(text)):
            answer[name] = None if m.lastindex == 3 else m.group(m.lastindex).strip()
    return {name: value if isinstance(value, str) else None for name, value in answer.items()}


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


# ---- verify: reward and feedback ----

@dataclass
class Verdict:
    outcome: str                  # a key of REWARDS
    reward: float
    feedback: str                 # the verifier's message, the next user turn after a failed attempt
    observation_ok: bool          # the answer's intersection claim was right


RETRY = " Try again, answering with one JSON object in the same format."  # follows a failure's feedback


def _failure(outcome: str, reason: str, observation_ok: bool) -> Verdict:
    return Verdict(outcome, REWARDS[outcome], f"You failed this trial because {reason}.", observation_ok)


def _choices(absolute: bool) -> str:
    return ", ".join(DIRECTIONS if absolute else TURNS)


def verify(text, pos: Position, absolute: bool, literal_intersection_check: bool = False,
           protocol: str = "project") -> Verdict:
    """Score one answer at a position: the single source of reward and success. Never raises. The paper's order
    (`step_rewards_virl`): the right action is correct whatever the observation says; else a wrong intersection
    claim is a wrong_observation; else an invalid_action (no action of the action space) or a wrong_action.
    `literal_intersection_check`: the paper code's claim test, the word "intersection" anywhere in the answer's
    observation ("no intersection" included) against the landmark text, which never holds the cue (a real
    intersection named scores -1.5, one missed -1). Protocol "official" scores as official.py does."""
    if protocol == "official":  # observation_ok: this project's reading of the claim, for the recognition statistics
        outcome, reward, feedback, said = official_rules().virl_verify(
            text, expected_action(pos, absolute), landmark_text(pos), _action_strings(absolute))
        return Verdict(outcome, reward, feedback, claims_intersection(said) == pos.at_intersection)
    answer = parse_answer(text)
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
    """official.py, the official code's rules, imported only under protocol "official"."""
    import official
    return official


def official_prompt(steps: list, history: list, current: str, absolute: bool, vision: bool) -> str:
    """The official prompt (official.virl_prompt) over this rule's action space."""
    choices = f"8 directions {list(DIRECTIONS)}" if absolute else str(list(TURNS))
    return official_rules().virl_prompt(steps, history, current, choices, vision)


# ---- the prompt ----
# The task prompt (template 0), and 9 more wordings of it for the prompt-diversity study in prompt_variants.py (read
# only when asked for). A template: (prompt, one instruction, one past position, the past when empty, the views'
# paragraph), the prompt's fields {steps}, {past}, {n} (the current position), {current}, {choices} (the turn
# directions) and {view} (V-IRL-VL's paragraph, else nothing).
_PROMPT = (  # template 0, the original wording
    "[Task]\nYou are an expert navigator. Follow the route instructions below, one position at a time. At each "
    "position, say what you observe, which instruction you are carrying out, and the action to take next.\n\n"
    '[Instructions]\n{steps}\n\n{view}[Action space]\n"forward()": move forward to the next position;\n'
    '"turn_direction(x)": turn to face x, one of {choices};\n"stop()": stop, you have reached the destination.'
    "\n\n[Observations and actions so far]\n{past}O_{n}: {current}\n\n[Output]\nAnswer with one JSON object and "
    'nothing else:\n{{"current observation": "what you observe now", "current instruction": "the instruction '
    'you are carrying out", "action": "one action from the action space"}}',
    "{i}. {s}", "O_{i}: {o}\nA_{i}: {a}\n", "",
    "[Observation format]\nYou observe a 2x2 grid of street views with these headings:\n[front, right\n back, left]\n"
    "Check whether a landmark named in the instructions is in sight.\n\n")


def prompt_template(k: int) -> tuple:
    """Template k: 1 to 9 come from prompt_variants.py, the prompt-diversity study's file, imported only then."""
    if k == 0:
        return _PROMPT
    try:
        import prompt_variants
    except ImportError as e:
        raise ValueError(f"prompt_template={k} needs prompt_variants.py beside env_virl.py ({e}); expected it, or "
                         "prompt_template=0") from None
    return prompt_variants.VIRL[k - 1]


def prompt_text(steps: list, history: list, current: str, absolute: bool, vision: bool, template: int = 0) -> str:
    """The full prompt at one position in the wording of `template` (VirlConfig.prompt_template)."""
    prompt, step, past, empty, view = prompt_template(template)
    return prompt.format(steps="\n".join(step.format(i=i + 1, s=s) for i, s in enumerate(steps)),
                         past="".join(past.format(i=i + 1, o=o, a=a) for i, (o, a) in enumerate(history)) or empty,
                         n=len(history) + 1, current=current, choices=_choices(absolute), view=view if vision else "")


# ---- the expert ----
# "Debunk the Myth of SFT Generalization" trains SFT on answers that reason before they act: the expert's thought
# ties the observation to the instruction that applies and the instruction to the action under the active rule,
# so that SFT data carries the rule itself, not only its result.

def expert_thought(pos: Position, steps: list, absolute: bool) -> str:
    """The reasoning of the correct answer at a position, written without double quotes or 'field:' patterns, so
    that neither the answer parser nor the trainers' search for the action field mistakes it for a field."""
    n, action = pos.instruction, expected_action(pos, absolute)
    seen = ", ".join(("the destination " if name == pos.destination else "") + f"{name} on my "
                     f"{relation_name(b - pos.heading)}" for name, b in pos.landmarks)
    sight = f"I see {seen or 'no landmark'}; this is {'an' if pos.at_intersection else 'not an'} intersection"
    quoted = lambda k: f"instruction {k}, '{steps[k - 1]}',"
    if pos.action == "forward":
        return f"{sight}, so I am still on the street of {quoted(n)} short of its end. The action is {action}."
    if pos.action == "stop":
        arrived = "the destination is in sight" if pos.destination in dict(pos.landmarks) else "I am at the destination"
        return (f"{sight}. This is the end of {quoted(n)} the last instruction: it leads to {pos.destination}, and "
                f"{arrived}. The action is {action}.")
    why = (f"{sight}, so {quoted(n - 1)} is done and {quoted(n)} applies here." if pos.at_intersection
           else f"{sight}. I have not moved yet, so I am at the start of the route and {quoted(n)} applies.")
    to = direction_name(pos.turn_to)
    rule = (f"It names the heading {to}, and my actions take compass headings" if absolute else
            f"It names a {turn_name(pos.heading, pos.turn_to)} turn to face {to}, and my actions take turns relative "
            "to my heading")
    return f"{why} {rule}, so the action is {action}."


# every kind of action, and a turn of each rule: under either rule, one of the turns is outside its action space
WRONG_ACTIONS = ("forward()", "stop()", "turn_direction(north)", "turn_direction(left)")


def wrong_answer(expert: str, rng: random.Random) -> str:
    """A plausible mistake for sequential-revision SFT data: the expert answer (JSON or the official template) with
    another action, drawn from `rng` among WRONG_ACTIONS; a thought stays as it was."""
    action = parse_answer(expert)[ACTION_FIELD]
    wrong = rng.choice([a for a in WRONG_ACTIONS if a != action])
    # an action is letters, brackets and spaces, which JSON writes as they are: the same text in both formats
    return expert.replace(f'"{ACTION_FIELD}": "{action}"', f'"{ACTION_FIELD}": "{wrong}"', 1)


# ---- the environment ----

@dataclass
class Observation:
    text: str                  # the user turn to show the model
    image: object = None       # V-IRL-VL: the 2x2 grid (a PIL image) at a new position; else None
    continues: bool = False    # True: append to the conversation; False: start a new one


def _streetview():
    """streetview.py, V-IRL-VL's street views, imported only when vision needs them: V-IRL-L runs without it."""
    import streetview
    return streetview


class NavigationEnv:
    """One walker on V-IRL routes. reset() picks a route and returns the prompt at its first position; step(answer)
    verifies one attempt. A correct answer moves on to the next position, a new prompt (continues=False); a wrong
    one asks again (continues=True) until the position's attempts run out, which ends the route, failed.

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
        cfg = self.config = config or VirlConfig()
        self.routes = routes if routes is not None else [parse_route(r, f"{cfg.routes}: route {i}")
                                                         for i, r in enumerate(raw_routes(cfg))]
        self.rng = random.Random(seed)
        self.streetviews = None  # real routes' panoramas
        if cfg.vision and any(r.city is None for r in self.routes):
            if not (cfg.streetview_dir and cfg.streetview_map):
                raise ValueError("vision on real V-IRL routes needs their street views: set streetview_dir "
                                 "(the {pano_id}.jpg folder) and streetview_map (the (lat, lng) -> pano_id pickle)")
            self.streetviews = _streetview().StreetViews(cfg.streetview_dir, cfg.streetview_map, haversine)
        elif cfg.vision:
            _streetview()  # here rather than at the first reset: V-IRL-VL needs streetview.py
        self.route, self.rail, self.steps, self.history = None, [], [], []
        self.index = self.attempt = 0
        self.done = True

    @property
    def position(self) -> Position:
        return self.rail[self.index]

    def reset(self, seed: Optional[int] = None, episode: Optional[int] = None,
              route: Optional[int] = None) -> Observation:
        """Start a route; `seed` restarts the RNG. Episode k plays route k % len(self.routes), `route` picks one by
        index; with neither, the RNG draws one. Under protocol "official" the RNG draws it for an episode too, as
        the official evaluation draws its routes with replacement, but on the mini benchmark, played in order."""
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
        """The current observation's line: in V-IRL-VL the image shows the landmarks, but the paper's prompt still
        says when the agent stands at an intersection."""
        return observation_text(pos, self.config.protocol, "You observe an image of 4 views" if self.config.vision
                                else None)

    def views(self, pos: Position) -> list:
        """The four street views (front, right, back, left) at a position."""
        if self.streetviews is not None:
            return self.streetviews.views(pos.point, pos.heading, self.config.view_size)
        spot = f"{self.route.route_id}:{pos.point[0]:.6f}:{pos.point[1]:.6f}"
        sv = _streetview()
        return sv.synthetic_views(sv.STYLES[self.route.city], pos.landmarks, pos.heading,
                                  pos.at_intersection, self.config.view_size, spot)

    def _observation(self) -> Observation:
        pos, cfg = self.position, self.config
        text = (official_prompt(self.steps, self.history, self._current_text(pos), cfg.absolute_actions, cfg.vision)
                if cfg.protocol == "official" else
                prompt_text(self.steps, self.history, self._current_text(pos), cfg.absolute_actions, cfg.vision,
                            cfg.prompt_template))
        image = _streetview().render_grid(self.views(pos), cfg.view_size) if cfg.vision else None
        return Observation(text, image, continues=False)

    def step(self, response) -> tuple:
        if self.done:
            raise RuntimeError("NavigationEnv.step called on a finished route: call reset() first")
        cfg = self.config
        if self.attempt >= cfg.verify_iter:  # protocol "official": the answer after a position's last attempt
            reward, outcome, feedback = official_rules().step_limit()
            self.attempt, self.done = self.attempt + 1, True
            info = {"outcome": outcome, "feedback": feedback, "success": False, "attempt": self.attempt,
                    "recognized": None}
            return Observation(feedback, None), reward, True, info
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
            obs = Observation(verdict.feedback if official else verdict.feedback + RETRY, None, continues=True)
        info["success"] = self.done and correct  # the last position is the stop(): every one was passed
        return obs, verdict.reward, self.done, info

    def expert_response(self, reasoning: bool = False) -> str:
        """The correct answer at the current position; `reasoning`: opened by a "thought" field, `expert_thought`."""
        pos, absolute, protocol = self.position, self.config.absolute_actions, self.config.protocol
        answer = {"current observation": self._current_text(pos) if protocol == "official" else observation_text(pos),
                  "current instruction": self.steps[pos.instruction - 1], "action": expected_action(pos, absolute)}
        if reasoning:  # first, so that the action still ends the answer
            answer = {THOUGHT_FIELD: expert_thought(pos, self.steps, absolute), **answer}
        return official_rules().answer(answer) if protocol == "official" else json.dumps(answer)


# ---- demo ----

def fail(message: str):
    """Stop with one line on stderr, what was wrong and what would be accepted, and exit status 2 (argparse's)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def cannot_write(flag: str, path: str, e: OSError, what: str, expected: str):
    """Stop with one line: the flag's path could not be written, why, and what would be accepted."""
    fail(f"{flag} {path!r}: cannot {what} ({e.strerror or e}); expected {expected}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="V-IRL: sample prompt, sample street-view grids, expert play.")
    p.error = fail  # a bad value stops with one line, not a usage block
    p.add_argument("--routes", default="synthetic:nyc", help='"synthetic:<city>", "mini" or a V-IRL route file')
    p.add_argument("--n-routes", type=int, default=1000, help="routes to draw for synthetic:<city>")
    p.add_argument("--relative", action="store_true", help="OOD rule: left/right/slightly actions")
    p.add_argument("--episodes", type=int, default=500, help="expert routes to play")
    p.add_argument("--seed", type=int, default=0, help="route-drawing seed")
    p.add_argument("--out-dir", default=".", help="where to write the sample grids")
    p.add_argument("--ood-city", default="tokyo", choices=OOD_CITIES, help="the OOD city of the second sample grid")
    p.add_argument("--no-grids", action="store_true", help="V-IRL-L alone: no grids, no streetview.py needed")
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
        if not args.no_grids:
            try:  # before the work: a missing streetview.py, or a folder that cannot be made, fails at once
                _streetview()
                os.makedirs(args.out_dir, exist_ok=True)
            except ImportError as e:
                fail(f"the grids need streetview.py beside env_virl.py, and Pillow ({e}); expected them, or --no-grids")
            except OSError as e:
                cannot_write("--out-dir", args.out_dir, e, "make it a folder",
                       "a folder, existing or to create, that we may write in")
        env = NavigationEnv(cfg, seed=args.seed)
        print("---- V-IRL-L prompt ----", env.reset().text, "---- expert answer ----", env.expert_response(), sep="\n")
        for city in () if args.no_grids else (ID_CITY, args.ood_city):
            vl = NavigationEnv(VirlConfig(routes=f"synthetic:{city}", n_routes=1, vision=True), seed=args.seed)
            vl.reset()
            while vl.position.action != "turn" or not vl.position.at_intersection or not vl.position.landmarks:
                if vl.step(vl.expert_response())[2]:  # no landmark intersection on this route: show the start
                    vl.reset()
                    break
            path = os.path.join(args.out_dir, f"virl_vl_{city}.png")
            try:
                _streetview().render_grid(vl.views(vl.position), vl.config.view_size).save(path)
            except OSError as e:
                cannot_write("--out-dir", args.out_dir, e, f"write {path}", "a folder that we may write in")
            print(f"---- V-IRL-VL grid in {city} ({observation_text(vl.position)}) written to {path} ----")
    except ValueError as e:
        fail(str(e))

    start, wins, positions = time.perf_counter(), 0, 0  # the expert's self-check: every route completed
    for _ in range(args.episodes):
        env.reset()
        while not env.done:
            info = env.step(env.expert_response())[3]
            positions += 1
        wins += info["success"]
    print(f"expert: {wins}/{args.episodes} routes completed ({100 * wins / max(1, args.episodes):.1f}%), "
          f"{positions} positions, {time.perf_counter() - start:.2f} s")
    return 0 if wins == args.episodes else 1


if __name__ == "__main__":
    sys.exit(main())
