"""The procedural training data: coloured shapes, their prompts and their Canny hints, made on the fly.

    rng = np.random.default_rng(0)
    batch = make_batch(rng, 16)           # images (16,128,128,3) uint8, hints (16,128,128,3) uint8, prompts
    batch.prompts[0]                      # 'a red circle and a blue star on a gray background'

An image holds 1-3 shapes (circle, square, triangle, star, line) in distinct colours, placed with
little overlap, on a plain (black / white / gray) or a linear-gradient background. Every shape colour
is chosen to differ in luminance from the background under it, so its outline survives Canny. The
hint is `preprocessors.canny(image, 100, 200)`: white edges on black, at image resolution (8x the
latent; see `latent.py`). Everything is drawn with OpenCV from a numpy Generator, so a seed fixes the
stream. `ShapeStream` wraps it as an endless torch IterableDataset (one generator per worker).

`edge_f1` is the controllability metric: F1 of the Canny edges of generated images against the hint
edges, with a tolerance radius (a predicted edge pixel counts when a hint edge lies within `radius`
pixels, and vice versa).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch

from ...preprocessors import canny
from ...preprocessors.image import luma
from .text import BACKGROUND_COLOURS, MAX_TOKENS, SHAPE_COLOURS, tokenize

IMAGE_SIZE = 128
CANNY_LOW, CANNY_HIGH = 100, 200
RGB = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 230), "yellow": (240, 220, 30),
    "cyan": (30, 210, 220), "magenta": (220, 40, 200), "orange": (250, 140, 20), "purple": (130, 40, 180),
    "black": (10, 10, 10), "white": (245, 245, 245), "gray": (128, 128, 128),
}
LUMA = {name: float(v) for name, v in zip(RGB, luma(np.array(list(RGB.values()), np.float32)))}
MIN_CONTRAST = 55  # luminance difference between a shape and the background under it
# The classic scenes' kinds. Fixed here (not text.SHAPES, which grows) so a seed gives the same
# scenes as before: the procedural held-out set is the one the shipped models were measured on.
PROCEDURAL_SHAPES = ("circle", "square", "triangle", "star", "line")


@dataclass(frozen=True)
class Shape:
    kind: str          # one of PROCEDURAL_SHAPES
    colour: str        # one of text.SHAPE_COLOURS
    cx: float
    cy: float
    size: float        # radius-like half extent in pixels
    angle: float = 0.0  # radians

    def bbox(self, image_size: int) -> tuple[int, int, int, int]:
        r = self.size + 2
        return (max(0, int(self.cx - r)), max(0, int(self.cy - r)),
                min(image_size, int(self.cx + r) + 1), min(image_size, int(self.cy + r) + 1))


def _polygon(n: int, cx: float, cy: float, r: float, angle: float, inner: float | None = None) -> np.ndarray:
    pts = []
    count = 2 * n if inner else n
    for i in range(count):
        a = angle + 2 * math.pi * i / count - math.pi / 2
        rr = r if (inner is None or i % 2 == 0) else r * inner
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return np.round(np.array(pts) * 16).astype(np.int32)  # 4 fractional bits (cv2 `shift=4`)


def draw_shape(image: np.ndarray, s: Shape) -> None:
    """Draw `s` into the uint8 RGB image in place (anti-aliased)."""
    colour = tuple(int(v) for v in RGB[s.colour])
    aa, shift = cv2.LINE_AA, 4
    if s.kind == "circle":
        cv2.circle(image, (round(s.cx * 16), round(s.cy * 16)), round(s.size * 16), colour, -1, aa, shift)
    elif s.kind == "square":
        cv2.fillPoly(image, [_polygon(4, s.cx, s.cy, s.size * 1.25, s.angle)], colour, aa, shift)
    elif s.kind == "triangle":
        cv2.fillPoly(image, [_polygon(3, s.cx, s.cy, s.size * 1.2, s.angle)], colour, aa, shift)
    elif s.kind == "star":
        cv2.fillPoly(image, [_polygon(5, s.cx, s.cy, s.size * 1.25, s.angle, inner=0.45)], colour, aa, shift)
    elif s.kind == "line":
        dx, dy = math.cos(s.angle) * s.size * 1.3, math.sin(s.angle) * s.size * 1.3
        p0 = (round((s.cx - dx) * 16), round((s.cy - dy) * 16))
        p1 = (round((s.cx + dx) * 16), round((s.cy + dy) * 16))
        cv2.line(image, p0, p1, colour, max(3, round(s.size / 5)), aa, shift)
    else:
        raise ValueError(f"unknown shape {s.kind!r}; use one of {PROCEDURAL_SHAPES}")


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def gradient(size: int, c0: np.ndarray, c1: np.ndarray, angle: float) -> np.ndarray:
    """A linear gradient from colour c0 to c1 along direction `angle`, uint8 (size, size, 3)."""
    if size not in _GRIDS:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
        _GRIDS[size] = (xx, yy)
    xx, yy = _GRIDS[size]
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0.astype(np.float32) + t[..., None] * (c1 - c0).astype(np.float32)
    return img.astype(np.uint8)


def background(kind: str, size: int = IMAGE_SIZE, rng: np.random.Generator | None = None) -> np.ndarray:
    """A plain background ('black', 'white', 'gray') or a random 'gradient' (needs `rng`)."""
    if kind == "gradient":
        assert rng is not None
        c0 = rng.integers(0, 256, 3).astype(np.float32)
        c1 = rng.integers(0, 256, 3).astype(np.float32)
        return gradient(size, c0, c1, float(rng.uniform(0, 2 * math.pi)))
    return np.full((size, size, 3), RGB[kind], dtype=np.uint8)


def prompt_for(shapes: Sequence[Shape], bg: str) -> str:
    parts = " and ".join(f"a {s.colour} {s.kind}" for s in shapes)
    return f"{parts} on a {bg} background"


def random_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, str]:
    """One random image (uint8 RGB) and its prompt."""
    u = rng.random()
    bg = "gradient" if u < 0.4 else BACKGROUND_COLOURS[min(int((u - 0.4) / 0.2), 2)]
    image = background(bg, size, rng)
    flat = bg != "gradient"
    u = rng.random()
    n = 1 if u < 0.3 else (2 if u < 0.7 else 3)
    placed: list[Shape] = []
    used: set[str] = set()
    for _ in range(n):
        for _attempt in range(12):
            kind = PROCEDURAL_SHAPES[int(rng.integers(len(PROCEDURAL_SHAPES)))]
            r = float(rng.uniform(0.11, 0.22) * size)
            cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
            # little overlap: centres at least ~the sum of the radii apart
            if any(math.hypot(cx - p.cx, cy - p.cy) < 0.9 * (r + p.size) for p in placed):
                continue
            s0 = Shape(kind, "red", float(cx), float(cy), r, float(rng.uniform(0, 2 * math.pi)))
            x0, y0, x1, y1 = s0.bbox(size)
            if flat:
                lo = hi = LUMA[bg]
            else:
                lum = luma(image[y0:y1, x0:x1].astype(np.float32))
                lo, hi = float(lum.min()), float(lum.max())
            colours = [SHAPE_COLOURS[i] for i in rng.permutation(len(SHAPE_COLOURS)) if SHAPE_COLOURS[i] not in used]
            ok = [c for c in colours if LUMA[c] < lo - MIN_CONTRAST or LUMA[c] > hi + MIN_CONTRAST]
            if not ok:
                continue
            s = Shape(kind, str(ok[0]), s0.cx, s0.cy, r, s0.angle)
            draw_shape(image, s)
            placed.append(s)
            used.add(s.colour)
            break
    if not placed:  # nothing fitted (a very busy gradient): a plain background always works
        return random_scene(rng, size)
    return image, prompt_for(placed, bg)


def hint_of(image: np.ndarray) -> np.ndarray:
    """The Canny hint of a uint8 RGB image: uint8 HxWx3, white edges on black."""
    return canny(image, CANNY_LOW, CANNY_HIGH)


@dataclass
class Batch:
    images: np.ndarray   # (B, H, W, 3) uint8 RGB
    hints: np.ndarray    # (B, H, W, 3) uint8 Canny edges
    prompts: list[str]


Scenes = Callable[[np.random.Generator, int], "tuple[np.ndarray, str]"]


def make_batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE, scene: Scenes = random_scene) -> Batch:
    """`n` scenes from `scene(rng, size)` (the classic `random_scene`, or `drawn.training_scene`)."""
    images, prompts = zip(*(scene(rng, size) for _ in range(n)))
    imgs = np.stack(images)
    return Batch(imgs, np.stack([hint_of(im) for im in imgs]), list(prompts))


def validation_batch(n: int = 8, seed: int = 1234, size: int = IMAGE_SIZE, scene: Scenes = random_scene) -> Batch:
    """A fixed batch of `scene`s (independent of the training stream) for metrics during and after training."""
    return make_batch(np.random.default_rng([seed, 7]), n, size, scene)


class ShapeStream(torch.utils.data.IterableDataset):
    """Endless batches `{"images", "hints": uint8 (B,H,W,3) tensors, "tokens": (B, 16) int64}`.

    Use with `DataLoader(stream, batch_size=None, num_workers=k)`: worker i draws from
    `default_rng([seed, i])`, so a seed and a worker count fix the data. `scene` makes one
    (image, prompt) from a generator and a size (a module-level function, so workers can pickle it).
    """

    def __init__(self, seed: int, batch: int, size: int = IMAGE_SIZE, max_tokens: int = MAX_TOKENS,
                 scene: Scenes = random_scene):
        super().__init__()
        self.seed, self.batch, self.size, self.max_tokens, self.scene = seed, batch, size, max_tokens, scene

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None:
            cv2.setNumThreads(1)  # one OpenCV thread per loader worker
        rng = np.random.default_rng([self.seed, worker])
        while True:
            b = make_batch(rng, self.batch, self.size, self.scene)
            yield {
                "images": torch.from_numpy(b.images),
                "hints": torch.from_numpy(b.hints),
                "tokens": tokenize(b.prompts, self.max_tokens),
            }


# ------------------------------------------------------------------------------------------------
# built-in demo scenes

BUILTIN_SCENES: dict[str, tuple[str, list[Shape]]] = {
    "circle-square": ("gray", [Shape("circle", "red", 40, 44, 24), Shape("square", "blue", 84, 92, 20, 0.3)]),
    "star": ("gray", [Shape("star", "yellow", 92, 34, 22, 0.0)]),
    "triangle-line": ("black", [Shape("triangle", "green", 40, 88, 26, 0.0), Shape("line", "orange", 84, 40, 30, 0.8)]),
}


def builtin_scene(name: str, size: int = IMAGE_SIZE) -> tuple[np.ndarray, str]:
    """A fixed demo image (uint8 RGB) and its prompt; names in `BUILTIN_SCENES`."""
    if name not in BUILTIN_SCENES:
        raise ValueError(f"unknown built-in scene {name!r}; choose one of {', '.join(BUILTIN_SCENES)}")
    bg, shapes = BUILTIN_SCENES[name]
    image = background(bg, IMAGE_SIZE)
    for s in shapes:
        draw_shape(image, s)
    if size != IMAGE_SIZE:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image, prompt_for(shapes, bg)


# ------------------------------------------------------------------------------------------------
# the controllability metric

def edges(image: np.ndarray) -> np.ndarray:
    """bool (H, W): Canny edges of a uint8 RGB image (same thresholds as the hints)."""
    return hint_of(image)[..., 0] > 0


def edge_f1(pred: np.ndarray, target: np.ndarray, radius: int = 2) -> float:
    """F1 of edge maps (bool H x W) with a tolerance of `radius` pixels.

    precision: the fraction of predicted edge pixels within `radius` of a target edge; recall: the
    fraction of target edge pixels within `radius` of a predicted edge. No edges on either side: 0
    (unless both are empty: 1).
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if not pred.any() or not target.any():
        return float(not pred.any() and not target.any())
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    near_target = cv2.dilate(target.astype(np.uint8), k) > 0
    near_pred = cv2.dilate(pred.astype(np.uint8), k) > 0
    precision = float((pred & near_target).sum()) / float(pred.sum())
    recall = float((target & near_pred).sum()) / float(target.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def batch_edge_f1(images: np.ndarray, hints: np.ndarray, radius: int = 2) -> list[float]:
    """Per-image F1 of the edges of generated uint8 images (B,H,W,3) against uint8 hints (B,H,W,3)."""
    return [edge_f1(edges(im), h[..., 0] > 0, radius) for im, h in zip(images, hints)]
