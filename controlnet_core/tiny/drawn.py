"""Training scenes that look like what people draw, and the drawings the evaluation uses.

    rng = np.random.default_rng(0)
    scene = drawn_scene(rng)            # scene.image uint8 (128,128,3), scene.prompt, scene.objects
    image, prompt = training_scene(rng) # 70 % drawn scenes, 30 % `data.random_scene` (the classic set)

`data.random_scene` draws clean filled shapes; users draw something else: white outlines on black,
1-4 px pens, open strokes, several objects, shapes cut by the border, scribbles, wobbly freehand
lines. A `drawn_scene` has 1-4 objects (distinct kinds, distinct colours), each drawn

* `filled` (closed kinds only), as an `outline` (1-4 px) or, for `line` and `scribble`, a `stroke`;
* clean or with hand-drawn wobble (a smooth random displacement along the path's normal);
* sometimes with a gap (an outline left open), sometimes crossing the image border;

on a plain (black / white / gray / one of the colours), linear-gradient or textured (smooth
low-contrast noise or stripes) background. Every object's colour differs in luminance from the
background under it by at least `data.MIN_CONTRAST` (more for 1 px pens), so its lines survive
Canny. The caption names each object's colour and kind in drawing order (`a red star and a blue
circle on a gray background`); the background phrase is left out when it would not fit the text
encoder's 16 tokens, and in 20 % of captions anyway, because people often do not name it.

`user_drawing` makes the other side: the object geometry drawn white on black (a pen drawing, as
a user gives it to `demo --hint`), with a prompt that asks for colours; the evaluation
(`evaluate.py`) uses it. Each `Drawn` object keeps its paths, so `Drawn.region` gives the pixels
the drawn object covers (its inside for closed outlines), where the colour score looks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ...preprocessors.image import luma
from .data import IMAGE_SIZE, LUMA, MIN_CONTRAST, RGB, gradient, random_scene
from .text import BACKGROUND_COLOURS, MAX_TOKENS, SHAPE_COLOURS, words

DRAWN_SHAPES = ("circle", "square", "triangle", "star", "line", "house", "rectangle", "scribble")
OPEN_SHAPES = ("line", "scribble")  # always a stroke: they have no inside
# How far each kind reaches from its centre, in units of its `size` (placement keeps objects apart).
EXTENT = {"circle": 1.0, "square": 1.25, "triangle": 1.2, "star": 1.25, "line": 1.3, "house": 1.3,
          "rectangle": 1.3, "scribble": 1.2}
PEN_WIDTHS = (1, 2, 3, 4)
THIN_CONTRAST = 90  # a 1 px anti-aliased line loses contrast: it needs more to keep its Canny edge
DRAWN_FRACTION = 0.7  # of `training_scene`: the rest are the classic filled scenes


@dataclass(frozen=True)
class Drawn:
    """One drawn object: what it is, how it is drawn, and its paths in pixel coordinates."""

    kind: str                      # one of DRAWN_SHAPES
    colour: str                    # one of text.SHAPE_COLOURS (a user drawing: the colour its prompt asks for)
    style: str                     # "filled" | "outline" | "stroke"
    width: int                     # pen width in pixels (filled: 0)
    paths: tuple[np.ndarray, ...]  # float (N, 2) x, y points
    closed: bool                   # the paths are closed polygons (no gap)

    def draw(self, image: np.ndarray, rgb: tuple[int, int, int] | None = None) -> None:
        """Draw into a uint8 RGB image in place (anti-aliased)."""
        colour = tuple(int(v) for v in (RGB[self.colour] if rgb is None else rgb))
        if self.style == "filled":
            pts = [np.round(p * 16).astype(np.int32) for p in self.paths]
            cv2.fillPoly(image, pts, colour, cv2.LINE_AA, 4)
            return
        alpha, (x0, y0) = stroke_coverage(self.paths, self.closed, self.width, image.shape[0])
        if alpha.size:
            crop = image[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
            a = alpha[..., None]
            crop[:] = np.round(crop * (1 - a) + np.array(colour, np.float32) * a).astype(np.uint8)

    def region(self, size: int = IMAGE_SIZE, margin: int = 2) -> np.ndarray:
        """bool (size, size): the pixels the object covers, its inside included (closed kinds), and
        `margin` pixels around its lines (a generated line need not sit exactly on the drawn one)."""
        mask = np.zeros((size, size), np.uint8)
        alpha, (x0, y0) = stroke_coverage(self.paths, self.closed, max(1, self.width), size)
        mask[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha > 0
        if margin:
            mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1)))
        if self.kind not in OPEN_SHAPES:  # an outline left open still encloses its inside
            cv2.fillPoly(mask, [np.round(p * 16).astype(np.int32) for p in self.paths], 1, cv2.LINE_8, 4)
        return mask > 0


SUPERSAMPLE = 4


def stroke_coverage(paths: tuple[np.ndarray, ...] | list[np.ndarray], closed: bool, width: int, size: int
                    ) -> tuple[np.ndarray, tuple[int, int]]:
    """How much of each pixel a pen of `width` pixels covers along the paths: float32 values in
    [0, 1] over the paths' bounding box inside the (size, size) image, and the box's (x0, y0).
    OpenCV's `thickness` is not a pixel width (2 draws 3 px, 3 and 4 draw 5), so the pen is a 1 px
    centre line at 4x resolution dilated by a disc `4 * width` across, then area-averaged back: a
    line `width` pixels wide, anti-aliased."""
    f, pad = SUPERSAMPLE, width + 2
    allp = np.concatenate(paths)
    # the box reaches `pad` beyond the image too, so a line just outside it still covers the edge
    x0, y0 = (max(-pad, int(math.floor(v)) - pad) for v in allp.min(0))
    x1, y1 = (min(size + pad, int(math.ceil(v)) + pad + 1) for v in allp.max(0))
    if x1 <= max(0, x0) or y1 <= max(0, y0) or x0 >= size or y0 >= size:
        return np.zeros((0, 0), np.float32), (0, 0)
    big = np.zeros(((y1 - y0) * f, (x1 - x0) * f), np.uint8)
    pts = [np.round((p - (x0, y0) + 0.5) * f * 16 - 8).astype(np.int32) for p in paths]  # pixel centres at 4x
    cv2.polylines(big, pts, closed, 1, 1, cv2.LINE_8, 4)
    big = cv2.dilate(big, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (f * width, f * width)))
    alpha = cv2.resize(big.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    cx0, cy0 = max(0, x0), max(0, y0)
    return alpha[cy0 - y0:min(size, y1) - y0, cx0 - x0:min(size, x1) - x0], (cx0, cy0)


@dataclass
class Scene:
    image: np.ndarray            # uint8 (H, W, 3)
    prompt: str
    objects: list[Drawn]
    background: str              # the caption's background word ("gradient", a colour, ...)


# ------------------------------------------------------------------------------------------------
# geometry: every kind as paths around a centre


def _regular(n: int, r: float, angle: float, inner: float | None = None) -> np.ndarray:
    count = 2 * n if inner else n
    a = angle - math.pi / 2 + 2 * math.pi * np.arange(count) / count
    rr = np.where(np.arange(count) % 2 == 0, r, r * (inner or 1.0))
    return np.stack([rr * np.cos(a), rr * np.sin(a)], 1)


def _rotate(p: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return p @ np.array([[c, s], [-s, c]])


def _smooth_curve(points: np.ndarray, per_segment: int = 12) -> np.ndarray:
    """A Catmull-Rom curve through `points` (open)."""
    p = np.concatenate([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
    out.append(points[-1:])
    return np.concatenate(out)


def shape_paths(kind: str, cx: float, cy: float, size: float, angle: float,
                rng: np.random.Generator) -> tuple[list[np.ndarray], bool]:
    """(paths, closed) of one object of half-extent about `size` pixels centred at (cx, cy)."""
    if kind == "circle":
        a = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        p = np.stack([np.cos(a), np.sin(a)], 1) * size
        return [p + (cx, cy)], True
    if kind == "square":
        return [_regular(4, size * 1.25, angle) + (cx, cy)], True
    if kind == "triangle":
        return [_regular(3, size * 1.2, angle) + (cx, cy)], True
    if kind == "star":
        return [_regular(5, size * 1.25, angle, inner=0.45) + (cx, cy)], True
    if kind == "rectangle":  # a bar: 2.2-4 times as long as it is high
        w = size * 1.3
        h = w / rng.uniform(2.2, 4.0)
        p = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
        return [_rotate(p, angle) + (cx, cy)], True
    if kind == "house":  # a square body with a roof, upright give or take a little
        s = size * 0.8
        p = np.array([[-s, s], [s, s], [s, -0.25 * s], [0, -1.25 * s], [-s, -0.25 * s]])
        return [_rotate(p, 0.15 * math.sin(angle)) + (cx, cy)], True
    if kind == "line":  # an open stroke: straight, or bent once
        d = np.array([math.cos(angle), math.sin(angle)]) * size * 1.3
        bend = rng.uniform(-0.35, 0.35) * size if rng.random() < 0.4 else 0.0
        mid = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9) * bend
        p = _smooth_curve(np.array([-d, mid, d]), per_segment=10)
        return [p + (cx, cy)], False
    if kind == "scribble":  # a smooth random curve through 4-7 points around the centre
        k = int(rng.integers(4, 8))
        pts = rng.uniform(-size, size, (k, 2))
        return [_smooth_curve(pts) + (cx, cy)], False
    raise ValueError(f"unknown drawn shape {kind!r}; use one of {DRAWN_SHAPES}")


def densify(path: np.ndarray, closed: bool, step: float = 1.5) -> np.ndarray:
    """Points every ~`step` pixels along the path (corners kept)."""
    p = np.concatenate([path, path[:1]]) if closed else path
    out = []
    for a, b in zip(p[:-1], p[1:]):
        n = max(1, int(math.ceil(float(np.linalg.norm(b - a)) / step)))
        out.append(a + (b - a) * (np.arange(n)[:, None] / n))
    if not closed:
        out.append(p[-1:])
    return np.concatenate(out)


def wobble(path: np.ndarray, closed: bool, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A freehand version of the path: each point moved along the normal by a smooth random
    signal (three sinusoids of 1-6 cycles over the path, plus a little fine jitter) of about
    `amplitude` pixels."""
    p = densify(path, closed)
    n = len(p)
    d = np.roll(p, -1, 0) - np.roll(p, 1, 0) if closed else np.gradient(p, axis=0)
    normal = np.stack([-d[:, 1], d[:, 0]], 1) / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
    t = np.arange(n) / n
    signal = np.zeros(n)
    for _ in range(3):
        cycles = int(rng.integers(1, 7)) if closed else rng.uniform(0.5, 6)
        signal += rng.uniform(0.3, 1.0) * np.sin(2 * math.pi * (cycles * t + rng.random()))
    jitter = np.convolve(rng.normal(0, 1, n + 4), np.ones(5) / 5, mode="valid")[:n]
    signal = amplitude * (signal / max(1e-6, np.abs(signal).max()) + 0.3 * jitter)
    return p + normal * signal[:, None]


def open_gap(path: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A closed path as an open one with 8-20 % of its length left out (a sketch not closed)."""
    p = densify(path, True)
    n = len(p)
    gap = max(2, int(n * rng.uniform(0.08, 0.2)))
    start = int(rng.integers(n))
    return np.roll(p, -(start + gap), 0)[: n - gap]


# ------------------------------------------------------------------------------------------------
# backgrounds


def texture(base: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """The colour `base` (3,) with a low-contrast texture: smooth noise or soft stripes, at most
    about +-14 grey levels and gentle slopes, so Canny (100/200) finds no edges in it."""
    if rng.random() < 0.6:
        noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), float(rng.uniform(1.5, 5)))
        t = np.clip(noise / max(1e-6, 2.5 * float(noise.std())), -1, 1)
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        a = rng.uniform(0, math.pi)
        t = np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / rng.uniform(8, 24) + rng.uniform(0, 6.3))
    amp = rng.uniform(6, 14)
    img = base.astype(np.float32)[None, None] + amp * t[..., None] * rng.uniform(0.6, 1.0, 3).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shade(colour: str, rng: np.random.Generator) -> np.ndarray:
    """A background version of a shape colour: dark or light, so shapes keep their contrast on it."""
    c = np.array(RGB[colour], np.float32)
    return c * rng.uniform(0.25, 0.4) if rng.random() < 0.6 else c + (255 - c) * rng.uniform(0.55, 0.75)


def random_background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, str]:
    """(uint8 image, caption word): plain neutral 35 %, plain coloured 15 %, gradient 20 %, textured 30 %."""
    u = rng.random()
    if u < 0.35 or u >= 0.7:
        if rng.random() < 0.7:
            word = BACKGROUND_COLOURS[int(rng.integers(3))]
            base = np.array(RGB[word], np.float32)
        else:
            word = SHAPE_COLOURS[int(rng.integers(len(SHAPE_COLOURS)))]
            base = _shade(word, rng)
        if u < 0.35:
            return np.broadcast_to(base.astype(np.uint8), (size, size, 3)).copy(), word
        return texture(base, rng, size), word
    if u < 0.5:
        word = SHAPE_COLOURS[int(rng.integers(len(SHAPE_COLOURS)))]
        return np.broadcast_to(_shade(word, rng).astype(np.uint8), (size, size, 3)).copy(), word
    c0, c1 = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    return gradient(size, c0, c1, float(rng.uniform(0, 2 * math.pi))), "gradient"


# ------------------------------------------------------------------------------------------------
# scenes


def caption(objects: list[Drawn], background: str | None) -> str:
    """`a red star and a blue circle on a gray background`; without the background phrase when it
    would not fit the text encoder's MAX_TOKENS words (or when `background` is None)."""
    text = " and ".join(f"a {o.colour} {o.kind}" for o in objects)
    if background is not None:
        full = f"{text} on a {background} background"
        if len(words(full)) <= MAX_TOKENS:
            return full
    return text


def place_objects(rng: np.random.Generator, size: int, n: int, kinds: tuple[str, ...] = DRAWN_SHAPES,
                  border_p: float = 0.2, spacing: float = 0.9) -> list[tuple[str, float, float, float, float]]:
    """Up to `n` (kind, cx, cy, size, angle) of distinct kinds, centres at least `spacing` x the sum
    of their reaches apart (0.9: little overlap; > 1: none); an object crosses the image border
    with probability `border_p`."""
    placed: list[tuple[str, float, float, float, float]] = []
    free = list(kinds)
    scale = {1: (0.16, 0.3), 2: (0.13, 0.24), 3: (0.11, 0.2), 4: (0.1, 0.17)}[min(n, 4)]
    for _ in range(n):
        for _attempt in range(20):
            kind = free[int(rng.integers(len(free)))]
            r = float(rng.uniform(*scale) * size)
            lo, hi = (0.3 * r, size - 0.3 * r) if rng.random() < border_p else (r + 3, size - r - 3)
            cx, cy = rng.uniform(lo, hi, size=2)
            if any(math.hypot(cx - x, cy - y) < spacing * (EXTENT[kind] * r + EXTENT[k] * s) for k, x, y, s, _ in placed):
                continue
            placed.append((kind, float(cx), float(cy), r, float(rng.uniform(0, 2 * math.pi))))
            free.remove(kind)
            break
    return placed


def _contrasting(colours: list[str], image: np.ndarray, bbox: tuple[int, int, int, int], need: float) -> list[str]:
    x0, y0, x1, y1 = bbox
    lum = luma(image[y0:y1, x0:x1].astype(np.float32))
    lo, hi = float(lum.min()), float(lum.max())
    return [c for c in colours if LUMA[c] < lo - need or LUMA[c] > hi + need]


def drawn_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """One random drawn-style scene (see the module docstring)."""
    image, bg = random_background(rng, size)
    u = rng.random()
    n = 1 if u < 0.25 else 2 if u < 0.6 else 3 if u < 0.85 else 4
    pen = int(rng.choice(PEN_WIDTHS)) if rng.random() < 0.7 else None  # one pen for the scene, or one per object
    amplitude = rng.uniform(0.6, 2.2) if rng.random() < 0.5 else 0.0   # freehand or ruler-clean
    used = {bg}
    objects: list[Drawn] = []
    for kind, cx, cy, r, angle in place_objects(rng, size, n):
        paths, closed = shape_paths(kind, cx, cy, r, angle, rng)
        if kind in OPEN_SHAPES:
            style = "stroke"
        else:
            style = "filled" if rng.random() < 0.35 else "outline"
        width = 0 if style == "filled" else (pen or int(rng.choice(PEN_WIDTHS)))
        if style == "outline" and rng.random() < 0.15:
            paths, closed = [open_gap(p, rng) for p in paths], False
        if amplitude:
            paths = [wobble(p, closed, amplitude, rng) for p in paths]
        pts = np.concatenate(paths)
        pad = width + 2
        bbox = (max(0, int(pts[:, 0].min()) - pad), max(0, int(pts[:, 1].min()) - pad),
                min(size, int(pts[:, 0].max()) + pad + 1), min(size, int(pts[:, 1].max()) + pad + 1))
        if bbox[2] - bbox[0] < 3 or bbox[3] - bbox[1] < 3:
            continue  # pushed off the image
        colours = [SHAPE_COLOURS[i] for i in rng.permutation(len(SHAPE_COLOURS)) if SHAPE_COLOURS[i] not in used]
        ok = _contrasting(colours, image, bbox, THIN_CONTRAST if width == 1 else MIN_CONTRAST)
        if not ok:
            continue
        obj = Drawn(kind, str(ok[0]), style, width, tuple(paths), closed)
        obj.draw(image)
        objects.append(obj)
        used.add(obj.colour)
    if not objects:  # nothing contrasted with a busy background: draw again
        return drawn_scene(rng, size)
    return Scene(image, caption(objects, None if rng.random() < 0.2 else bg), objects, bg)


def training_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, str]:
    """The training mix: a `drawn_scene` (70 %) or a classic `data.random_scene` (30 %), as
    (uint8 image, prompt); a module-level function so data-loader workers can pickle it."""
    if rng.random() < DRAWN_FRACTION:
        s = drawn_scene(rng, size)
        return s.image, s.prompt
    return random_scene(rng, size)


def user_drawing(rng: np.random.Generator, kinds: list[str], *, size: int = IMAGE_SIZE, width: int = 2,
                 amplitude: float = 0.0, gap: bool = False, border_p: float = 0.0,
                 background: str | None = None) -> Scene:
    """What a user gives `demo --hint`: the objects of `kinds` as white pen lines (`width` px, wobble
    `amplitude`) on black, each asked for in a distinct random colour by the prompt. The image is the
    drawing itself; its Canny is the hint."""
    image = np.zeros((size, size, 3), np.uint8)
    colours = [SHAPE_COLOURS[i] for i in rng.permutation(len(SHAPE_COLOURS))]
    objects: list[Drawn] = []
    for _ in range(100):  # every object asked for, apart (one colour each)
        placed = place_objects(rng, size, len(kinds), tuple(kinds), border_p, spacing=1.05)
        if len(placed) == len(kinds):
            break
    for (kind, cx, cy, r, angle), colour in zip(placed, colours):
        paths, closed = shape_paths(kind, cx, cy, r, angle, rng)
        if gap and kind not in OPEN_SHAPES:
            paths, closed = [open_gap(p, rng) for p in paths], False
        if amplitude:
            paths = [wobble(p, closed, amplitude, rng) for p in paths]
        style = "stroke" if kind in OPEN_SHAPES else "outline"
        obj = Drawn(kind, colour, style, width, tuple(paths), closed)
        obj.draw(image, RGB["white"])
        objects.append(obj)
    return Scene(image, caption(objects, background), objects, background or "")
