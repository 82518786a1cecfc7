"""Street views for V-IRL-VL: the synthetic cities' renderer and the reader of real V-IRL panoramas.

This file owns what the model sees at a position, and nothing of navigation:
    render_view       one street view of a synthetic city, drawn in perspective with Pillow, once per process
    synthetic_views   the four views (front, right, back, left) at one spot of a synthetic city
    VIEW_CACHE        the synthetic views drawn so far, the least recently used dropped first (256 MiB at most)
    signs_in_view     which landmarks a view shows, and where across it
    render_grid       the four views as the 2x2 grid [front, right / back, left] the model is shown
    load_pano_map, perspective_view, StreetViews   real Google Street View panoramas, cut at the same headings
    STYLES            the look of each synthetic city: a style dict, what the renderer takes
It takes plain values (a style dict, landmarks as (name, compass bearing), headings in degrees), so it never imports
env_virl.py: the cities' maps, routes, the rail, the prompt, the verifier and the rewards live there. It needs Pillow
(numpy for real panoramas) and nothing else of the project: with env_virl.py it copies out for V-IRL-VL.
"""
from __future__ import annotations

import collections
import functools
import io
import json
import math
import os
import pickle
import random
import zlib

from PIL import Image, ImageDraw, ImageFont

# ---- street-view rendering (synthetic cities) ----
# The street is modelled in 3D (x right, y up, z forward, camera at x=0 looking along +z) and projected
# by a pinhole camera, so road, sidewalks and facades converge to one vanishing point. What the task
# needs (signs and their side, the cross street) comes from the arguments; `seed` only drives
# cosmetics (facade colours, heights, window shading), deterministically.

CAM_Y, ROAD_W, WALK_W = 0.45, 0.8, 1.2  # eye height; half-width of the road; |x| of the facade line
HORIZON = 0.62                         # vanishing point height as a fraction of the view: facades dominate
NEAR, FAR, BLOCK_D = 0.5, 80.0, 40.0   # street drawn from NEAR to FAR; buildings are BLOCK_D deep
CROSS = (2.2, 5.2)                     # z span of the cross street (only when at an intersection)
LOD_Z = 12.0                           # beyond this single windows are sub-pixel wide: one band per floor
ZEBRA, BLACK, WHITE = (236, 236, 230), (0, 0, 0), (255, 255, 255)
def _style(sky, road, sidewalk, lane, facades, window, pattern, sign_bg, sign_fg, sign_shape):
    return dict(sky=sky, road=road, sidewalk=sidewalk, lane=lane, facades=facades, window=window,
                pattern=pattern, sign_bg=sign_bg, sign_fg=sign_fg, sign_shape=sign_shape)


# The look of each synthetic city (env_virl.CITIES): sky, road, sidewalk, lane (RGB), facades (a list of RGB),
# window (RGB), pattern ("grid", "brick", "bands", "arches" or "glass"), sign_bg, sign_fg (RGB) and sign_shape
# ("rect", "rounded" or "banner"): a style dict, what the renderer takes.
STYLES = {
    "nyc": _style(
        (170, 200, 230), (70, 70, 75), (165, 160, 150), (240, 200, 60),
        [(150, 80, 60), (120, 110, 100), (180, 170, 150), (90, 90, 100)], (40, 50, 70), "grid",
        (20, 60, 140), (255, 255, 255), "rect"),
    "london": _style(
        (190, 195, 200), (85, 85, 85), (150, 150, 145), (250, 250, 250),
        [(160, 60, 50), (200, 190, 170), (110, 70, 50), (220, 215, 200)], (30, 30, 40), "brick",
        (0, 70, 40), (240, 220, 150), "banner"),
    "tokyo": _style(
        (200, 220, 240), (100, 100, 105), (190, 190, 185), (250, 250, 250),
        [(230, 230, 225), (200, 205, 210), (170, 180, 190), (240, 235, 220)], (90, 130, 170), "bands",
        (230, 40, 40), (255, 255, 255), "banner"),
    "paris": _style(
        (180, 205, 235), (95, 90, 85), (200, 190, 170), (245, 245, 245),
        [(225, 210, 180), (215, 200, 170), (235, 225, 200)], (60, 70, 90), "arches",
        (30, 30, 30), (230, 200, 120), "rounded"),
    "hong_kong": _style(
        (160, 175, 185), (60, 60, 65), (130, 135, 130), (250, 220, 0),
        [(120, 140, 150), (200, 200, 190), (90, 110, 120), (170, 160, 140)], (150, 200, 210), "glass",
        (250, 220, 0), (200, 0, 0), "banner"),
    "melbourne": _style(
        (120, 170, 230), (80, 80, 80), (175, 170, 160), (255, 255, 255),
        [(200, 120, 70), (140, 150, 140), (230, 220, 200), (100, 110, 130)], (30, 40, 60), "grid",
        (250, 250, 250), (20, 90, 60), "rounded"),
    "lagos": _style(
        (220, 225, 200), (110, 100, 90), (190, 170, 140), (250, 250, 250),
        [(220, 190, 100), (180, 210, 200), (230, 150, 120), (240, 240, 230)], (60, 60, 50), "bands",
        (0, 120, 60), (255, 255, 255), "rect"),
    "mumbai": _style(
        (210, 205, 180), (90, 85, 80), (170, 160, 140), (240, 240, 240),
        [(220, 200, 150), (200, 120, 90), (170, 190, 170), (230, 220, 190)], (70, 50, 40), "arches",
        (120, 20, 90), (255, 230, 120), "rect"),
    "buenos_aires": _style(
        (150, 190, 240), (75, 75, 80), (160, 150, 140), (255, 255, 255),
        [(210, 200, 190), (160, 140, 120), (190, 170, 160)], (50, 50, 60), "brick",
        (110, 170, 220), (255, 255, 255), "rounded"),
    "san_francisco": _style(
        (205, 215, 225), (65, 65, 70), (180, 175, 170), (255, 255, 255),
        [(240, 230, 210), (170, 200, 210), (230, 190, 170), (200, 210, 190)], (60, 80, 100), "glass",
        (200, 80, 30), (255, 250, 235), "rect"),
}


_FONTS = {}  # pixel size -> Pillow's built-in font: a few dozen sizes at most


def load_font(px: int):
    """Pillow's built-in font at `px` pixels: scalable with FreeType (Pillow >= 10.1), else its one bitmap size."""
    if px not in _FONTS:
        try:
            _FONTS[px] = ImageFont.load_default(size=px)
        except TypeError:  # an older Pillow: no size to choose
            _FONTS[px] = ImageFont.load_default()
    return _FONTS[px]


def _mix(a, b, t):
    """The colour a fraction t of the way from RGB colour a to RGB colour b (written out: a grid mixes ~900)."""
    return round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t)


def _frange(start, stop, step):
    while start < stop:
        yield start
        start += step


def _camera(size):
    """A pinhole camera with a 90-degree field of view, (focal length, centre x, centre y) in pixels: the vanishing
    point sits a bit above centre."""
    return size / 2, size / 2, HORIZON * size


def _projection(camera):
    """The camera's projection of a point (x, y, z) of the street to pixel coordinates."""
    focal, cx, cy = camera
    return lambda x, y, z: (cx + focal * x / z, cy - focal * (y - CAM_Y) / z)


def _ground(draw, project, size, style, cross):
    quad = lambda x0, x1, z0, z1: [project(x0, 0, z0), project(x1, 0, z0), project(x1, 0, z1), project(x0, 0, z1)]
    draw.rectangle([0, HORIZON * size, size, size], fill=style["sidewalk"])
    if cross:  # the cross street runs left-right through the whole view, its own sidewalks at the edges
        draw.polygon(quad(-100, 100, CROSS[0] + 0.4, CROSS[1] - 0.4), fill=style["road"])
    draw.polygon(quad(-ROAD_W, ROAD_W, NEAR, FAR), fill=style["road"])
    for z in _frange(NEAR, 30, 2.0):  # dashed centre line, interrupted by the crossing
        if not (cross and CROSS[0] - 0.8 < z + 1 and z < CROSS[1]):
            draw.polygon(quad(-0.04, 0.04, z, z + 1), fill=style["lane"])
    if cross:  # zebra crossings: one over the main road, one over the cross street on each sidewalk
        for x in _frange(0.1 - ROAD_W, ROAD_W - 0.2, 0.3):
            draw.polygon(quad(x, x + 0.15, CROSS[0] - 0.8, CROSS[0] - 0.15), fill=ZEBRA)
        for z in _frange(CROSS[0] + 0.5, CROSS[1] - 0.6, 0.5):
            for side in (-1, 1):
                draw.polygon(quad(side * (ROAD_W + 0.1), side * (WALK_W - 0.1), z, z + 0.25), fill=ZEBRA)


def _blocks(rng, style, cross):
    """Building segments (z0, z1, height, colour) along one side, far-to-near for painter's order."""
    out, z = [], NEAR
    while z < FAR:
        z1 = nxt = z + rng.uniform(2.5, 6.0) * (1 + z / 15)  # far buildings longer: their detail is lost anyway
        if cross and z1 > CROSS[0] and z < CROSS[1]:
            z1, nxt = CROSS[0], CROSS[1]  # the block stops at the cross street and resumes beyond it
        out.append((z, z1, rng.uniform(2.5, 9.0), rng.choice(style["facades"])))
        z = nxt
    return out[::-1]


def _rect(y0, y1, za, zb):
    return [(y0, za), (y1, za), (y1, zb), (y0, zb)]


def _arch(y0, y1, za, zb):
    """Window with a semicircular top, approximated by 6 segments."""
    radius, z_mid = (zb - za) / 2, (za + zb) / 2
    return [(y0, za), (y0, zb)] + [(y1 - radius + radius * math.sin(angle), z_mid + radius * math.cos(angle))
                                   for angle in (math.pi * i / 6 for i in range(7))]


def _marks(pattern, z0, z1, height):
    """Facade details in (y, z) wall coordinates, each tagged 'win', 'far' (a blurred window row) or 'line'."""
    if pattern == "glass":  # curtain wall: all glass, thin mullions and floor lines
        yield _rect(0.1, height - 0.1, z0 + 0.05, z1 - 0.05), "win"
        if z0 < 2 * LOD_Z:
            for z in _frange(z0 + 0.6, z1 - 0.3, 0.6):
                yield [(0.1, z), (height - 0.1, z)], "line"
        for y in _frange(1.0, height - 0.3, 1.0):
            yield [(y, z0), (y, z1)], "line"
        return
    floors = list(_frange(1.0, height - 0.9, 1.0))
    if pattern == "brick" and z0 < LOD_Z:  # mortar courses, only where they can be resolved
        for y in _frange(0.3, height, 0.3):
            yield [(y, z0), (y, z1)], "line"
    if pattern == "bands" or z0 > LOD_Z:
        for y in floors:
            yield _rect(y + 0.15, y + 0.65, z0 + 0.2, z1 - 0.2), "win" if pattern == "bands" else "far"
        return
    step, win_w, win_h = {"grid": (0.9, 0.45, 0.6), "brick": (1.3, 0.35, 0.45), "arches": (1.1, 0.45, 0.7)}[pattern]
    shape = _arch if pattern == "arches" else _rect
    for y in floors:
        for z in _frange(z0 + 0.3, z1 - win_w - 0.2, step):
            yield shape(y + 0.15, y + 0.15 + win_h, z, z + win_w), "win"


def _building(draw, camera, side, segment, style, rng):
    z0, z1, height, colour = segment
    project = _projection(camera)
    fog = min(0.6, z0 / FAR)  # atmospheric haze: conveys depth and calms the clutter at the vanishing point
    colour, window = _mix(colour, style["sky"], fog), _mix(style["window"], style["sky"], fog)
    facade_x, far_x = side * WALK_W, side * (WALK_W + BLOCK_D)
    # A building's ~15 polygons go to Pillow's drawing core itself (ImageDraw.polygon parses the colour on each
    # call), its marks projected inline: the same arithmetic as `project` and `_mix`, so the same pixels.
    core, (focal, cx, cy), fx = draw.draw, camera, camera[0] * facade_x
    # end wall facing the camera: seen above shorter buildings in front and across the cross street
    core.draw_polygon([project(facade_x, 0, z0), project(far_x, 0, z0), project(far_x, height, z0),
                       project(facade_x, height, z0)], core.draw_ink(_mix(colour, BLACK, 0.25)), 1)
    core.draw_polygon([project(facade_x, y, z) for y, z in _rect(0, height, z0, z1)], core.draw_ink(colour), 1)
    dark, blurred = core.draw_ink(_mix(colour, BLACK, 0.35)), core.draw_ink(_mix(window, colour, 0.5))
    (w0, w1, w2), (d0, d1, d2) = window, (WHITE[0] - window[0], WHITE[1] - window[1], WHITE[2] - window[2])
    for points, kind in _marks(style["pattern"], z0, z1, height):
        xy = [(cx + fx / z, cy - focal * (y - CAM_Y) / z) for y, z in points]
        if kind == "line":
            core.draw_lines(xy, dark, 1)
        elif kind == "far":
            core.draw_polygon(xy, blurred, 1)
        else:  # window jitter: some panes catch more light than others
            t = 0.3 * rng.random()
            core.draw_polygon(xy, core.draw_ink((round(w0 + d0 * t), round(w1 + d1 * t), round(w2 + d2 * t))), 1)
    # the corner edge: neighbours of the same colour would otherwise read as one building
    core.draw_lines([project(facade_x, 0, z0), project(facade_x, height, z0)], dark, 1)


def _wrap(text, font, max_width, banner):
    """Banners stack one word per line; other boards use 1 line, or 2 balanced lines if too wide."""
    words = text.split()
    if banner:
        return words
    if len(words) == 1 or font.getlength(text) <= max_width:
        return [text]
    cuts = [(" ".join(words[:i]), " ".join(words[i:])) for i in range(1, len(words))]
    return list(min(cuts, key=lambda cut: max(map(font.getlength, cut))))


def _sign_layout(size, style, name, x, placed):
    """A projecting shop sign sticks out from the facade, so it faces the camera as a flat board. Its depth
    is where the facade line projects to x; its size shrinks with depth, but never below a readable font."""
    reach = min(max(abs(x), 0.12), 1.0)  # a sign at the very centre would stand infinitely far away
    z = WALK_W / reach  # the facade line x=WALK_W projects to |x| at this depth (focal length size/2)
    font_px = round(max(size / 16, min(size / 10, size * 0.35 / z)))
    font = load_font(font_px)
    lines = _wrap(name, font, 0.42 * size, style["sign_shape"] == "banner")
    pad, line_h = font_px * 0.35, font_px * 1.2
    width, height = max(map(font.getlength, lines)) + 2 * pad, len(lines) * line_h + 2 * pad
    cx = size / 2 + (reach if x >= 0 else -reach) * size / 2
    cy = HORIZON * size - (size / 2) * (2.4 - CAM_Y) / z  # board centre ~2.4 units above the pavement
    left = min(max(cx - width / 2, 2), size - 2 - width)
    top = min(max(cy - height / 2, 2), size - 2 - height)
    for _ in placed:  # slide below (or else above) any nearer board it overlaps, so every name stays readable
        hit = next((box for box in placed
                    if left < box[2] and box[0] < left + width and top < box[3] and box[1] < top + height), None)
        if hit is None:
            break
        top = hit[3] + 3 if hit[3] + 3 + height <= size - 2 else max(2, hit[1] - 3 - height)
    return [left, top, left + width, top + height], font, lines, pad, line_h


def _draw_sign(draw, size, style, box, font, lines, pad, line_h):
    left, top, right, bottom = box
    edge, line_w = _mix(style["sign_bg"], BLACK, 0.5), max(1, size // 112)
    if style["sign_shape"] == "rounded":
        draw.rounded_rectangle(box, radius=(bottom - top) / 3, fill=style["sign_bg"], outline=edge, width=line_w)
    else:
        if style["sign_shape"] == "banner":  # hanging rods make the vertical board read as a banner
            for rod_x in ((3 * left + right) / 4, (left + 3 * right) / 4):
                draw.line([rod_x, top - font.size / 2, rod_x, top], fill=edge, width=line_w)
        draw.rectangle(box, fill=style["sign_bg"], outline=edge, width=line_w)
    for i, line in enumerate(lines):
        draw.text(((left + right) / 2, top + pad + (i + 0.5) * line_h), line, font=font, fill=style["sign_fg"],
                  anchor="mm")


def draw_view(style: dict, signs: list, at_intersection: bool, size: int, seed: int):
    """One size x size street view, drawn: signs are (name, x) with x in [-1, 1], x < 0 on the left facade."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), style["sky"])
    draw, camera = ImageDraw.Draw(img), _camera(size)
    _ground(draw, _projection(camera), size, style, at_intersection)
    for side in (-1, 1):
        for segment in _blocks(rng, style, at_intersection):
            _building(draw, camera, side, segment, style, rng)
    boards = []
    for name, x in sorted(signs, key=lambda sign: -abs(sign[1])):  # nearer signs claim their spot first
        boards.append(_sign_layout(size, style, name, x, [board[0] for board in boards]))
    for board in reversed(boards):  # painter's order: far boards first
        _draw_sign(draw, size, style, *board)
    return img


# ---- the view cache ----
# A view is a pure function of (style, signs, crossing, size, seed), and a route's places come back (every reset,
# every retry, every epoch), so each is drawn once and kept while there is room.

class ViewCache:
    """Pictures by key, dropping the least recently used once they hold more than max_bytes of pixels."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.views = max_bytes, 0, collections.OrderedDict()

    def get(self, key):
        view = self.views.get(key)
        if view is not None:
            self.views.move_to_end(key)
        return view

    def put(self, key, view):
        if key in self.views:
            self.bytes -= _footprint(self.views.pop(key))
        self.views[key] = view
        self.bytes += _footprint(view)
        while self.bytes > self.max_bytes:
            self.bytes -= _footprint(self.views.popitem(last=False)[1])
        return view


def _footprint(view) -> int:
    return 4 * view.width * view.height  # Pillow keeps an RGB pixel in 4 bytes


VIEW_CACHE = ViewCache(256 << 20)  # 256 MiB: about 1,300 views at 224 px (a 1000-route run starts at ~4,000)


def _frozen(value):
    """A style's value as a hashable one, its lists as tuples: the cache finds an equal style, not the same dict."""
    return tuple(map(_frozen, value)) if isinstance(value, (list, tuple)) else value


def render_view(style: dict, signs: list, at_intersection: bool, size: int, seed: int):
    """`draw_view`, from the view cache when it was drawn before: a copy, which the caller may draw on."""
    key = (tuple(sorted((name, _frozen(value)) for name, value in style.items())), _frozen(signs),
           bool(at_intersection), size, seed)
    view = VIEW_CACHE.get(key)
    if view is None:
        view = VIEW_CACHE.put(key, draw_view(style, signs, at_intersection, size, seed))
    return view.copy()


# ---- vision: the 2x2 grid [front, right / back, left] ----
# The views face the headings the prompt names: front, right (+90), back (+180), left (+270).
# (The paper's code cut diagonal views at -135, -45, +45, +135 while promising these four: fixed here.)

VIEW_OFFSETS = (0, 90, 180, 270)  # front, right, back, left: the grid's reading order


def render_grid(views: list, size: int):
    """Compose 4 views as [front, right / back, left] with separators and a label in each tile."""
    grid = Image.new("RGB", (2 * size, 2 * size), WHITE)
    for i, view in enumerate(views):
        grid.paste(view, ((i % 2) * size, (i // 2) * size))
    draw, line_w = ImageDraw.Draw(grid), max(1, size // 112)
    draw.rectangle([size - line_w, 0, size + line_w - 1, 2 * size], fill=WHITE)
    draw.rectangle([0, size - line_w, 2 * size, size + line_w - 1], fill=WHITE)
    for label, corner in _grid_labels(size):
        grid.paste(label, corner)
    return grid


@functools.lru_cache(maxsize=16)  # one per view size in use
def _grid_labels(size: int) -> list:
    """The tiles' labels, white on a black box at each tile's bottom-left (the ground: signs rarely reach it), as
    (image, top-left corner): the text is drawn once per size, not once per grid."""
    line_w, font = max(1, size // 112), load_font(max(9, size // 20))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = []
    for i, label in enumerate(("front", "right", "back", "left")):
        x, y = (i % 2) * size + line_w + 2, (i // 2 + 1) * size - line_w - 2
        left, top, right, bottom = measure.textbbox((x, y), label, font=font, anchor="ld")
        box = Image.new("RGB", (right - left + 5, bottom - top + 5), BLACK)  # the text's box and 2 px around it
        ImageDraw.Draw(box).text((x - left + 2, y - top + 2), label, font=font, fill=WHITE, anchor="ld")
        labels.append((box, (left - 2, top - 2)))
    return labels


def signs_in_view(landmarks, view_heading: float) -> list:
    """[(name, x)] of landmarks, given as (name, compass bearing), inside a 90-degree view; x in [-1, 1) from
    left edge to right edge. Each bearing falls in exactly one view: [-45, 45) around the view's heading."""
    out = []
    for name, bearing in landmarks:
        relative = (bearing - view_heading + 180) % 360 - 180
        if -45 <= relative < 45:
            out.append((name, math.tan(math.radians(relative))))
    return out


def synthetic_views(style: dict, landmarks: list, heading: float, at_intersection: bool, size: int,
                    spot: str) -> list:
    """Four rendered street views of a synthetic city, in VIEW_OFFSETS order, for someone facing `heading`.
    `spot` names the place: each view's cosmetics are seeded from it and the view's heading, so a place looks
    the same on every visit and on every platform (crc32, never Python's salted hash())."""
    return [render_view(style, signs_in_view(landmarks, heading + offset), at_intersection, size,
                        zlib.crc32(f"{spot}:{round(heading + offset) % 360}".encode())) for offset in VIEW_OFFSETS]


# ---- real street views (V-IRL's Google Street View panoramas) ----

class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dicts, tuples, lists, numbers, strings): a pickle that names any
    class or function, the way malicious pickles run code, is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed: the street-view map must hold plain "
                                     "dicts, tuples, floats and strings only")


def load_pano_map(path: str) -> dict:
    """{(lat, lng): pano_id} from the V-IRL street-view mapping pickle, loaded without running code."""
    try:
        with open(path, "rb") as f:
            data = _DataOnlyUnpickler(io.BytesIO(f.read())).load()
    except FileNotFoundError:
        raise ValueError(f"street-view map {path!r} not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"street-view map {path!r} refused: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"street-view map {path!r}: expected a dict {{(lat, lng): pano_id}}, "
                         f"got {type(data).__name__}")
    try:
        return {(float(k[0]), float(k[1])): str(v) for k, v in data.items()}
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"street-view map {path!r}: keys must be (lat, lng) pairs") from None


def perspective_view(pano, rotation: float, heading: float, size: int, fov: float = 90.0):
    """A size x size pinhole view at `heading` cut from an equirectangular panorama (H, W, 3) array,
    where compass heading h sits at column fraction ((h + rotation) mod 360) / 360."""
    import numpy as np
    pano_h, pano_w = pano.shape[:2]
    focal = (size / 2) / math.tan(math.radians(fov) / 2)
    offsets = np.arange(size) - (size - 1) / 2                                    # (size,) pixels from the centre
    yaw = heading + np.degrees(np.arctan2(offsets, focal))                        # (size,) compass heading per column
    pitch = np.degrees(np.arctan2(-offsets[:, None], np.hypot(offsets[None, :], focal)))  # (size, size)
    cols = ((((yaw + rotation) % 360) / 360 * pano_w).astype(int) % pano_w)[None, :]     # (1, size)
    rows = np.clip(((90 - pitch) / 180 * pano_h).astype(int), 0, pano_h - 1)             # (size, size)
    return pano[rows, cols]                                                               # (size, size, 3)


class StreetViews:
    """Real V-IRL street views: the panorama nearest a point (within `max_meters`), cut at four headings.
    `distance(a, b)` gives the meters between two (lat, lng) points (env_virl passes its haversine)."""

    def __init__(self, folder: str, map_path: str, distance, max_meters: float = 20.0):
        if not os.path.isdir(folder):
            raise ValueError(f"street-view folder {folder!r} not found")
        self.folder, self.distance, self.max_meters = folder, distance, max_meters
        self.map = load_pano_map(map_path)
        self.keys = list(self.map)
        self._last = (None, None)

    def pano_at(self, point) -> str:
        best = min(self.keys, key=lambda k: self.distance(k, point), default=None)
        if best is None or self.distance(best, point) > self.max_meters:
            raise ValueError(f"no street view within {self.max_meters:.0f} m of {point[0]:.6f}, {point[1]:.6f}")
        return self.map[best]

    def pano(self, pano_id: str):
        """(H, W, 3) panorama and its rotation; the last one is kept, as consecutive positions often share it."""
        import numpy as np
        if self._last[0] != pano_id:
            image = os.path.join(self.folder, pano_id + ".jpg")
            meta = os.path.join(self.folder, pano_id + ".metadata.json")
            try:
                with open(meta) as f:
                    rotation = float(json.load(f)["rotation"])
                # JPEG (or PNG) only: Pillow would open any format it knows, EPS through an external Ghostscript
                with Image.open(image, formats=("JPEG", "PNG")) as img:
                    self._last = (pano_id, (np.asarray(img.convert("RGB")), rotation))
            except (OSError, KeyError, ValueError, TypeError) as e:
                raise ValueError(f"street view {pano_id}: cannot read {image} (a JPEG panorama) or its rotation in "
                                 f"{meta}: {e}") from None
        return self._last[1]

    def views(self, point, heading: float, size: int) -> list:
        """The four views (VIEW_OFFSETS order) from the panorama nearest `point`, for someone facing `heading`."""
        pano, rotation = self.pano(self.pano_at(point))
        return [Image.fromarray(perspective_view(pano, rotation, heading + offset, size)) for offset in VIEW_OFFSETS]
