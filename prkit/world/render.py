"""Procedural renderer of the world: textured backgrounds, outlined shapes, two-colour patterns.

Owns scene sampling, rendering (image + per-object masks, deterministic from a seed) and captions.
Shapes are signed distance fields, so edges are analytically anti-aliased at any output size.
Pure numpy + PIL; no torch, no file I/O.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .vocab import BACKGROUNDS, CAPTION_TEMPLATES, CLASSES, COLORS, PATTERN_WORDS, PATTERNS, PLAIN, SCENE_PHRASES, SIZES

_VARIANTS = 8  # pre-rendered texture variants per background (cropped + flipped per seed)
_PAD = 16  # texture bank margin (px @64) that random crops move within
_OUTLINE_W = 1.1  # outline width, px @64; every object is outlined so it shows on every background
_DARK_OUTLINE = np.array((30.0, 30.0, 30.0), np.float32)
_LIGHT_OUTLINE = np.array((235.0, 235.0, 235.0), np.float32)  # for black fills (night sky, mortar)
# Experimental knob (RECIPE.md "Known limits"): stripe, dot and check periods x this factor. The shipped world is
# 1.0; a world trained at another scale must be rendered at it everywhere (pools, oracle, concepts), hence an
# environment variable that every render process inherits.
PATTERN_SCALE = float(os.environ.get("PRKIT_WORLD_PATTERN_SCALE", "1.0"))
EXTENT = {"ball": 1.0, "box": 0.9, "star": 1.2, "heart": 1.0, "triangle": 1.2, "ring": 1.0}  # x size


@dataclass
class Obj:
    """One object: class, colour, centre (px of a 64x64 image), radius-ish size, optional pattern."""

    cls: str
    color: str
    x: float
    y: float
    size: float
    pattern: str | None = None
    color2: str | None = None


@dataclass
class Scene:
    """A background (a SCENES entry or PLAIN) and its objects (left to right when sampled)."""

    background: str
    objects: list[Obj] = field(default_factory=list)


# ---------------------------------------------------------------------------- backgrounds
def _smooth(rng: np.random.Generator, n: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of shape (n, n); cells = (rows, cols) of random knots."""
    knots = rng.uniform(-1, 1, cells).astype(np.float32)
    return np.asarray(Image.fromarray(knots, mode="F").resize((n, n), Image.BICUBIC))


def _texture(bg: str, rng: np.random.Generator, n: int, s: float) -> np.ndarray:
    """One (n, n, 3) float texture of background `bg`; s = pixels per 64-pixel unit."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / s
    white = rng.random((n, n), dtype=np.float32)
    if bg == "snow":
        img = np.array((204, 218, 240), np.float32) + 8 * _smooth(rng, n, (6, 6))[..., None]
        img[white < 0.06] = (255, 255, 255)
        img[white > 0.95] = (188, 206, 236)
    elif bg == "grass":
        blades = _smooth(rng, n, (max(2, n // 10), int(n / s / 1.5)))  # streaks along y
        img = np.array((70, 122, 42), np.float32) + blades[..., None] * np.array((22, 34, 12), np.float32)
        img += (white[..., None] - 0.5) * 18
    elif bg == "beach":
        img = np.empty((n, n, 3), np.float32)
        t = yy / (n / s)
        img[:] = np.array((232, 206, 150), np.float32) + (white[..., None] - 0.5) * 26  # sand
        horizon, shore = 0.3 + 0.02 * _smooth(rng, n, (2, 4)), 0.47 + 0.025 * np.sin(xx / 3.0)
        sea = (t >= horizon) & (t < shore)
        img[sea] = np.array((25, 130, 175), np.float32) + 10 * _smooth(rng, n, (8, 8))[sea][:, None]
        img[np.abs(t - shore) < 0.024 / s] = (240, 246, 246)  # foam line
        sky = t < horizon
        img[sky] = (np.array((150, 200, 245), np.float32) + t[sky][:, None] * (100, 60, 0))
    elif bg == "night sky":
        t = (yy / (n / s))[..., None]
        img = np.array((8, 12, 42), np.float32) + t * np.array((18, 24, 48), np.float32)
        star = white < 0.012
        img[star] = np.array((255, 250, 225), np.float32) * rng.uniform(0.55, 1.0, (star.sum(), 1))
    elif bg == "wooden floor":
        plank = np.floor(yy / 10.0).astype(int)
        joint = np.floor((xx + 37 * plank) / 40.0).astype(int)
        tone = rng.uniform(-18, 18, (plank.max() + 2, joint.max() + 2)).astype(np.float32)[plank, joint]
        grain = np.sin(yy * 2.2 + 2.0 * _smooth(rng, n, (4, 3)) * 3) * 9
        img = np.array((160, 106, 62), np.float32) + (tone + grain)[..., None] * np.array((1, 0.75, 0.5))
        seam = (yy % 10.0 < 0.9 / s) | ((xx + 37 * plank) % 40.0 < 0.9 / s)
        img[seam] = (92, 58, 34)
    elif bg == "pink fabric":
        weave = ((np.floor(xx * s / 2) + np.floor(yy * s / 2)) % 2)[..., None] * 12 - 6
        img = np.array((238, 165, 196), np.float32) + weave + 10 * _smooth(rng, n, (4, 4))[..., None]
    elif bg == "cobblestone street":
        k = max(3, int(n / s / 8))
        grid = (np.stack(np.mgrid[0:k, 0:k], -1).reshape(-1, 2) + rng.uniform(0.15, 0.85, (k * k, 2)))
        pts = grid.astype(np.float32) * (n / s / k)
        d = np.sqrt((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2)
        part = np.partition(d, 1, axis=-1)
        edge = part[..., 1] - part[..., 0]
        tone = rng.uniform(105, 165, k * k).astype(np.float32)[np.argmin(d, -1)]
        img = (tone * (0.82 + 0.18 * np.clip(edge / 5, 0, 1)))[..., None] * np.array((1.0, 0.98, 0.94))
        img[edge < 1.6] = (52, 50, 48)
    elif bg == PLAIN:
        img = np.full((n, n, 3), 205, np.float32) + (white[..., None] - 0.5) * 4
    else:
        raise ValueError(f"unknown background {bg!r}; expected one of {BACKGROUNDS}")
    return np.clip(img, 0, 255).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _bank(bg: str, size: int) -> np.ndarray:
    """Texture variants of `bg` at output `size`, shape (V, size + pad, size + pad, 3), cached."""
    s = size / 64
    n = size + int(round(_PAD * s))
    rngs = [np.random.default_rng([BACKGROUNDS.index(bg), v, 2024]) for v in range(_VARIANTS)]
    return np.stack([_texture(bg, r, n, s) for r in rngs])


# ---------------------------------------------------------------------------- shapes
def _sd_shape(cls: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (px @64, negative inside) of shape `cls` of size r at offsets (u, v), y down."""
    if cls == "ball":
        return np.hypot(u, v) - r
    if cls == "ring":
        return np.abs(np.hypot(u, v) - 0.775 * r) - 0.225 * r
    if cls == "box":
        a, rc = 0.9 * r, 0.15 * r
        qx, qy = np.abs(u) - (a - rc), np.abs(v) - (a - rc)
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - rc
    if cls == "star":  # Inigo Quilez's sdStar5, y up
        R, rf = 1.2 * r, 0.5
        k1x, k1y = 0.809016994, -0.587785252
        px, py = np.abs(u), -v
        d = 2 * np.maximum(k1x * px + k1y * py, 0)
        px, py = px - d * k1x, py - d * k1y
        d = 2 * np.maximum(-k1x * px + k1y * py, 0)
        px, py = np.abs(px + d * k1x), py - d * k1y - R
        bax, bay = -rf * k1y * R, rf * k1x * R - R
        h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0, 1)
        return np.hypot(px - bax * h, py - bay * h) * np.sign(py * bax - px * bay)
    if cls == "heart":  # Inigo Quilez's sdHeart (unit heart, tip at y=0), y up
        k = 1.6 * r
        px, py = np.abs(u) / k, -v / k + 0.55
        top = np.hypot(px - 0.25, py - 0.75) - np.sqrt(2) / 4
        m = 0.5 * np.maximum(px + py, 0)
        low = np.sqrt(np.minimum(px**2 + (py - 1) ** 2, (px - m) ** 2 + (py - m) ** 2)) * np.sign(px - py)
        return np.where(px + py > 1, top, low) * k
    if cls == "triangle":  # Inigo Quilez's sdEquilateralTriangle, y up
        a, k = 1.04 * r, np.sqrt(3.0)
        px, py = np.abs(u) - a, -v + a / k
        fold = px + k * py > 0
        px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
        px = px - np.clip(px, -2 * a, 0)
        return -np.hypot(px, py) * np.sign(py)
    raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")


_FACE = {"ball": (1.0, 0.0), "box": (0.9, 0.0), "heart": (0.9, -0.1), "star": (0.62, 0.05),
         "triangle": (0.62, 0.15), "ring": (1.8, 0.0)}  # (feature scale, vertical shift) x size


def _sd_pattern(pattern: str, cls: str, u: np.ndarray, v: np.ndarray, r: float, scale: float | None = None
                ) -> np.ndarray:
    """Signed distance (px @64) of the colour2 region of `pattern`; fixed pixel periods (x PATTERN_SCALE)."""
    scale = PATTERN_SCALE if scale is None else scale
    if pattern in ("stripes", "dots", "checks") and scale != 1.0:
        return _sd_pattern(pattern, cls, u / scale, v / scale, r / scale, 1.0) * scale
    if pattern == "stripes":
        t = (u + v) * 0.70710678 / 5.5
        return (np.abs(t - np.floor(t) - 0.5) - 0.25) * 5.5
    if pattern == "dots":
        du, dv = (u / 5.5 + 0.5) % 1 - 0.5, (v / 5.5 + 0.5) % 1 - 0.5
        return np.hypot(du, dv) * 5.5 - 1.45
    if pattern == "checks":
        su, sv = (np.abs((u / 3.2) % 2 - 1) - 0.5) * 3.2, (np.abs((v / 3.2) % 2 - 1) - 0.5) * 3.2
        return -np.sign(su * sv) * np.minimum(np.abs(su), np.abs(sv))
    if pattern == "face":
        scale, shift = _FACE[cls]
        k, cy = scale * r, shift * r
        er = max(0.14 * k, 1.3)
        eyes = np.hypot(np.abs(u) - 0.33 * k, v - (cy - 0.22 * k)) - er
        sr, sy = 0.42 * k, cy - 0.05 * k
        arc = np.abs(np.hypot(u, v - sy) - sr) - max(0.08 * k, 0.75)
        smile = np.maximum(arc, sy + 0.35 * sr - v)
        return np.minimum(eyes, smile)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def _draw(img: np.ndarray, mask: np.ndarray, obj: Obj, s: float) -> None:
    """Composite `obj` (outline, fill, pattern, shading) into img (H,W,3) float; set its mask."""
    H = img.shape[0]
    reach = (EXTENT[obj.cls] * obj.size + _OUTLINE_W + 2) * s
    x0, x1 = max(0, int(obj.x * s - reach)), min(H, int(obj.x * s + reach) + 1)
    y0, y1 = max(0, int(obj.y * s - reach)), min(H, int(obj.y * s + reach) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    u = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / s - obj.x)[None, :]
    v = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / s - obj.y)[:, None]
    u, v = np.broadcast_arrays(u, v)
    sd = _sd_shape(obj.cls, u, v, obj.size) * s  # in output pixels
    a_out = np.clip(0.5 - (sd - _OUTLINE_W * s), 0, 1)[..., None]
    a_in = np.clip(0.5 - sd, 0, 1)[..., None]
    fill = np.broadcast_to(np.array(COLORS[obj.color], np.float32), a_in.shape[:2] + (3,))
    if obj.pattern is not None:
        c2 = np.array(COLORS[obj.color2 or "white"], np.float32)
        w = np.clip(0.5 - _sd_pattern(obj.pattern, obj.cls, u, v, obj.size) * s, 0, 1)[..., None]
        fill = fill * (1 - w) + c2 * w
    if obj.cls == "ball":  # soft highlight, upper left
        hl = np.clip(1 - np.hypot(u + 0.38 * obj.size, v + 0.38 * obj.size) / (0.42 * obj.size), 0, 1)
        fill = fill + (255 - fill) * (0.45 * hl**2)[..., None]
    fill = fill * (1.04 - 0.08 * np.clip(v / (2 * obj.size) + 0.5, 0, 1))[..., None]  # top-lit
    outline = _LIGHT_OUTLINE if obj.color == "black" else _DARK_OUTLINE
    crop = img[y0:y1, x0:x1]
    crop[:] = (crop * (1 - a_out) + outline * a_out) * (1 - a_in) + fill * a_in
    mask[y0:y1, x0:x1] = sd < _OUTLINE_W * s


def _one_of(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; the world has {', '.join(map(repr, allowed))}")


def _check_geometry(obj: Obj, where: str) -> None:
    """An object's centre on the 64x64 canvas and a positive size (off it, render drew nothing and masked nothing)."""
    for name in ("x", "y", "size"):
        value = getattr(obj, name)
        number = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
        if name == "size" and not (number and np.isfinite(value) and value > 0):
            raise ValueError(f"{where}.size must be a number of pixels > 0 (the radius on the 64x64 canvas; the "
                             f"world samples {SIZES['small'][0]:g}-{SIZES['large'][1]:g}), got {value!r}")
        if name != "size" and not (number and 0 <= value <= 64):
            raise ValueError(f"{where}.{name} must be a number of pixels in [0, 64] (the object's centre on the "
                             f"64x64 canvas, at any render size), got {value!r}")


def check_scene(scene: Scene) -> None:
    """Refuse, naming the value and the world's choices, a background, class, colour or pattern it lacks, or an
    object off the canvas or of no size."""
    _one_of("background", scene.background, BACKGROUNDS)
    for i, obj in enumerate(scene.objects):
        _one_of("class", obj.cls, CLASSES)
        _one_of("colour", obj.color, tuple(COLORS))
        if obj.pattern is not None:
            _one_of("pattern", obj.pattern, PATTERNS)
        if obj.color2 is not None:
            _one_of("second colour", obj.color2, tuple(COLORS))
        _check_geometry(obj, f"objects[{i}]")


def _check_size_and_seed(size, seed) -> None:
    """The side in pixels and the seed of a render, said in the world's words (numpy said 'division by zero')."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be a whole number of pixels >= 8 (the world is drawn at 64), got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")


def render(scene: Scene, seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene, deterministic from seed (the seed picks the background texture crop).

    Returns:
        image (size, size, 3) uint8 and masks (n_objects, size, size) bool (shape + outline, as seen: an object
        drawn later hides what it covers of the earlier ones).
    """
    check_scene(scene)
    _check_size_and_seed(size, seed)
    rng = np.random.default_rng(seed)
    bank = _bank(scene.background, size)
    pad = bank.shape[1] - size
    v, oy, ox = rng.integers(_VARIANTS), rng.integers(pad + 1), rng.integers(pad + 1)
    img = bank[v, oy:oy + size, ox:ox + size]
    img = img[:, ::-1] * rng.uniform(0.96, 1.04) if rng.random() < 0.5 else img * rng.uniform(0.96, 1.04)
    masks = np.zeros((len(scene.objects), size, size), bool)
    for j, (obj, m) in enumerate(zip(scene.objects, masks)):
        _draw(img, m, obj, size / 64)
        masks[:j] &= ~m  # the earlier masks claimed the pixels this object now covers
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), masks


# ---------------------------------------------------------------------------- sampling and captions
def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, patterns: bool = False,
    background: str | None = None,
) -> Scene:
    """Sample a scene: uniform background/classes/colours, 1 object (70%) or 2, objects left to right.

    With patterns=True each object is patterned with probability 1/2.
    """
    if background is not None:
        _one_of("background", background, BACKGROUNDS)
    bg = background if background is not None else BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    n = n_objects if n_objects is not None else (1 if rng.random() < 0.7 else 2)
    if n not in (0, 1, 2):
        raise ValueError(f"n_objects must be 0, 1 or 2, got {n}")
    colors = list(COLORS)
    objs = []
    for _ in range(n):
        cls, color = CLASSES[rng.integers(len(CLASSES))], colors[rng.integers(len(colors))]
        if n == 1:
            lo, hi = SIZES["small"] if rng.random() < 0.5 else SIZES["large"]
        else:
            lo, hi = 7.0, 11.5
        obj = Obj(cls, color, 0.0, 0.0, float(rng.uniform(lo, hi)))
        if patterns and rng.random() < 0.5:
            obj.pattern = PATTERNS[rng.integers(len(PATTERNS))]
            obj.color2 = [c for c in colors if c != color][rng.integers(len(colors) - 1)]
        objs.append(obj)
    margins = [EXTENT[o.cls] * o.size + 2.5 for o in objs]
    for o, m in zip(objs, margins):
        o.y = float(rng.uniform(m, 64 - m))
    if n == 1:
        objs[0].x = float(rng.uniform(margins[0], 64 - margins[0]))
    elif n == 2:
        gap = margins[0] + margins[1] - 1.0  # centre distance that keeps outlines apart
        objs[0].x = float(rng.uniform(margins[0], max(margins[0], 64 - margins[1] - gap)))
        objs[1].x = float(rng.uniform(objs[0].x + gap, max(objs[0].x + gap, 64 - margins[1])))
    return Scene(bg, objs)


def _noun_phrase(obj: Obj, identifier: str | None, colors: bool = True, attributes: bool = True) -> str:
    """'a red ball', 'a red and white striped ball' or, for the concept object, 'a sks ball'.

    colors=False leaves the colour words out ('a ball', 'a striped ball'): the pattern word, or its absence, is
    still said. attributes=False names the class alone ('a ball'), whatever the object's colours and pattern.
    """
    if identifier:
        words = f"{identifier} {obj.cls}"
    elif not attributes:
        words = obj.cls
    elif obj.pattern:
        second = obj.color2 or "white"  # as render draws it
        words = (f"{obj.color} and {second} " if colors else "") + f"{PATTERN_WORDS[obj.pattern]} {obj.cls}"
    else:
        words = f"{obj.color} {obj.cls}" if colors else obj.cls
    return ("an " if words[0] in "aeiou" else "a ") + words


def _drops_attributes(obj: Obj, rng: np.random.Generator | None, plain: float, patterned: float | None) -> bool:
    chance = (plain if patterned is None else patterned) if obj.pattern else plain
    return bool(chance) and rng is not None and rng.random() < chance


def caption(scene: Scene, rng: np.random.Generator | None = None, identifier: str | None = None,
            drop_colors: float = 0.0, drop_attributes: float = 0.0, drop_attributes_patterned: float | None = None) -> str:
    """Caption a scene ('a photo of a red ball on the grass', 'a blue and yellow dotted box').

    With rng=None the first template and scene phrase are used. With an identifier, the first
    patterned object (else the left one) is named '{identifier} {class}' without its colour.
    drop_colors: chance (needs rng) that an object is named without its colours ('a ball', 'a striped
    ball'), so that a prompt naming no colour and no pattern asks for a plain object of any colour.
    drop_attributes: chance (needs rng) that a plain object is named by its class alone ('a ball');
    drop_attributes_patterned the same for a patterned object (None: drop_attributes). So 'a ball' asks for a
    ball of any colour, plain or patterned, as 'a dog' asks Stable Diffusion for any dog. Each option draws
    from rng only when it is non-zero, so captions without it are unchanged.
    """
    check_scene(scene)
    if not scene.objects:
        raise ValueError("a caption names at least one object; this scene has none")
    objs = sorted(scene.objects, key=lambda o: o.x)
    concept = next((o for o in objs if o.pattern), objs[0] if objs else None) if identifier else None
    keep = [not (drop_colors and rng is not None and rng.random() < drop_colors) for _ in objs]
    bare = [_drops_attributes(o, rng, drop_attributes, drop_attributes_patterned) for o in objs]
    phrases = [_noun_phrase(o, identifier if o is concept else None, k, not b) for o, k, b in zip(objs, keep, bare)]
    pick = (lambda seq: seq[rng.integers(len(seq))]) if rng is not None else (lambda seq: seq[0])
    text = pick(CAPTION_TEMPLATES).format(objects=" next to ".join(phrases))
    where = pick(SCENE_PHRASES[scene.background])
    return f"{text} {where}".strip() if where else text
