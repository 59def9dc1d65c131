"""The hint makers: pure functions of float32 RGB frames in [0, 1] (numpy + OpenCV, no torch).

Per-frame functions take one (h, w, 3) frame at the working resolution and return (h, w) or
(h, w, 3) float32; batched ones (the pixel-wise utilities) take the whole (N, H, W, 3) batch.
The registry (`registry.py`) does the input conversion, the resizing and the batching around them.
All are deterministic: same input and parameters, same output, bit for bit.
"""

from __future__ import annotations

import threading

import numpy as np

from ._cv import cv2, has_lsd
from .errors import PreprocessorError
from .image import luma, to_uint8

AUTO_CANNY_SPREAD = 0.33  # auto thresholds: (1 -/+ spread) x median intensity


# ----------------------------------------------------------------------------------------- canny
def _gray_u8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise PreprocessorError(
            f"canny() takes a uint8 image; got {a.dtype}; convert float images with "
            "(image * 255).round().astype(np.uint8) or use run('canny', ...), which accepts any type"
        )
    cv = cv2()
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return np.ascontiguousarray(a)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return cv.cvtColor(np.ascontiguousarray(a), cv.COLOR_RGB2GRAY if a.shape[2] == 3 else cv.COLOR_RGBA2GRAY)
    raise PreprocessorError(f"canny() takes one (height, width, 3) RGB image; got shape {a.shape}")


def canny(image: np.ndarray, low: float = 100, high: float = 200, blur: float = 0.0) -> np.ndarray:
    """Canny edges of a uint8 RGB (H, W, 3) image (grey (H, W) and RGBA also accepted).

    Grey = OpenCV's RGB->grey (BT.601 weights, fixed point); `blur` > 0 is a Gaussian pre-blur of
    that sigma in pixels; then `cv2.Canny(grey, low, high)` (3x3 Sobel, L1 gradient; OpenCV swaps
    low/high if given the other way round). Returns uint8 (H, W, 3): white (255) edges on black.
    """
    cv = cv2()
    gray = _gray_u8(image)
    if blur and blur > 0:
        gray = cv.GaussianBlur(gray, (0, 0), float(blur))
    edges = cv.Canny(gray, float(low), float(high))
    return cv.cvtColor(edges, cv.COLOR_GRAY2RGB)


def auto_thresholds(gray_u8: np.ndarray) -> tuple[float, float]:
    """(low, high) = (1 -/+ 0.33) x the median grey level, clipped to 0..255."""
    m = float(np.median(gray_u8))
    return max(0.0, (1.0 - AUTO_CANNY_SPREAD) * m), min(255.0, (1.0 + AUTO_CANNY_SPREAD) * m)


def canny_method(img, *, low_threshold, high_threshold, blur, auto_threshold):
    cv = cv2()
    gray = cv.cvtColor(to_uint8(img), cv.COLOR_RGB2GRAY)
    if blur > 0:
        gray = cv.GaussianBlur(gray, (0, 0), float(blur))
    lo, hi = auto_thresholds(gray) if auto_threshold else (low_threshold, high_threshold)
    return cv.Canny(gray, float(lo), float(hi)).astype(np.float32) * np.float32(1.0 / 255.0)


# ------------------------------------------------------------------------------------- soft edge
SOFTEDGE_SCALES = (1.0, 2.0, 4.0)
SOFTEDGE_PERCENTILE = 99.0  # this percentile of the response becomes white (1% of pixels saturate)
SOFTEDGE_FLOOR = 0.04  # normaliser floor: a 10% step edge; keeps noise on flat images dark


def softedge_map(gray: np.ndarray, sigma: float) -> np.ndarray:
    """Multi-scale, scale-normalised gradient magnitude of a float grey frame, scaled to [0, 1].

    For each sigma s in sigma x (1, 2, 4): s * |grad(G_s * gray)| (3x3 Sobel / 8, so a unit step edge
    peaks at 1/sqrt(2 pi) ~ 0.4 at every scale); the mean over scales is divided by its 99th
    percentile (at least SOFTEDGE_FLOOR) and clipped, so the strong edges are white whatever the
    image contrast.
    """
    cv = cv2()
    acc = np.zeros(gray.shape, np.float32)
    for k in SOFTEDGE_SCALES:
        s = float(sigma) * k
        g = cv.GaussianBlur(gray, (0, 0), s)
        gx = cv.Sobel(g, cv.CV_32F, 1, 0, ksize=3, scale=0.125)
        gy = cv.Sobel(g, cv.CV_32F, 0, 1, ksize=3, scale=0.125)
        acc += np.float32(s) * np.sqrt(gx * gx + gy * gy)  # not cv.magnitude: its SIMD path varies with alignment
    acc *= np.float32(1.0 / len(SOFTEDGE_SCALES))
    acc /= np.float32(max(float(np.percentile(acc, SOFTEDGE_PERCENTILE)), SOFTEDGE_FLOOR))
    return np.clip(acc, 0.0, 1.0, out=acc)


def softedge_method(img, *, sigma):
    return softedge_map(luma(img), sigma)


# -------------------------------------------------------------------------------------- scribble
def scribble_method(img, *, sigma, threshold, thickness, drawn):
    cv = cv2()
    gray = luma(img)
    if drawn:
        strokes = gray >= np.float32(threshold)
        if strokes.mean() > 0.5:  # mostly light: dark strokes drawn on white paper -> invert
            strokes = ~strokes
        return strokes.astype(np.float32)
    edges = (softedge_map(gray, sigma) >= np.float32(threshold)).astype(np.uint8)
    if thickness > 1:
        kernel = cv.getStructuringElement(cv.MORPH_ELLIPSE, (int(thickness), int(thickness)))
        edges = cv.dilate(edges, kernel)
    return edges.astype(np.float32)


# --------------------------------------------------------------------------------------- lineart
def line_darkness(gray: np.ndarray, sigma: float) -> np.ndarray:
    """How much darker each pixel is than its local background: the black top-hat (morphological
    closing minus the image) with a disk of 2 ceil(3 sigma) + 1 px, after a sigma/2 Gaussian.

    The closing fills dark features narrower than the disk and leaves smooth shading and bright
    features as they are, so only dark lines respond (no halo beside bright lines, unlike a DoG).
    """
    cv = cv2()
    fine = cv.GaussianBlur(gray, (0, 0), 0.5 * float(sigma))
    d = 2 * int(np.ceil(3.0 * float(sigma))) + 1
    disk = cv.getStructuringElement(cv.MORPH_ELLIPSE, (d, d))
    return cv.morphologyEx(fine, cv.MORPH_BLACKHAT, disk)


def lineart_method(img, *, sigma, contrast):
    d = line_darkness(luma(img), sigma)
    c = np.float32(contrast)
    return np.clip((d - c) / c, 0.0, 1.0)


# ----------------------------------------------------------------------------- pixel utilities
def threshold_method(batch, *, threshold, blur):
    y = luma(batch)
    if blur > 0:
        cv = cv2()
        y = np.stack([cv.GaussianBlur(f, (0, 0), float(blur)) for f in y])
    return (y >= np.float32(threshold)).astype(np.float32)


def invert_method(batch):
    return np.float32(1.0) - batch


def grayscale_method(batch):
    return luma(batch)


# ------------------------------------------------------------------------------------------ tile
def tile_method(img, *, downsample, blur):
    cv = cv2()
    h, w = img.shape[:2]
    out = img
    if downsample > 1:
        sh, sw = max(1, int(round(h / downsample))), max(1, int(round(w / downsample)))
        small = cv.resize(img, (sw, sh), interpolation=cv.INTER_AREA)
        out = np.clip(cv.resize(small, (w, h), interpolation=cv.INTER_CUBIC), 0.0, 1.0)
    if blur > 0:
        out = cv.GaussianBlur(out, (0, 0), float(blur))
    return out


# ------------------------------------------------------------------------------------ color grid
def color_grid_method(img, *, grid):
    cv = cv2()
    h, w = img.shape[:2]
    cell = min(h, w) / int(grid)
    gh, gw = max(1, int(round(h / cell))), max(1, int(round(w / cell)))
    small = cv.resize(img, (gw, gh), interpolation=cv.INTER_AREA)
    return cv.resize(small, (w, h), interpolation=cv.INTER_NEAREST)


# --------------------------------------------------------------------------------------- shuffle
def shuffle_method(img, *, grid, seed):
    """Square cells (short side / grid pixels) permuted, each rotated by a random multiple of 90
    degrees and maybe mirrored; the strips left over at the right/bottom edge stay in place. A pure
    permutation of the pixels: the colour histogram is exactly preserved."""
    h, w = img.shape[:2]
    s = max(1, min(h, w) // int(grid))
    rows, cols = h // s, w // s
    rng = np.random.default_rng(int(seed))
    order = rng.permutation(rows * cols)
    turns = rng.integers(0, 4, rows * cols)
    flips = rng.integers(0, 2, rows * cols).astype(bool)
    cells = img[: rows * s, : cols * s].reshape(rows, s, cols, s, 3).swapaxes(1, 2).reshape(-1, s, s, 3)
    cells = cells[order]
    cells[flips] = cells[flips][:, :, ::-1]
    for k in (1, 2, 3):
        sel = turns == k
        cells[sel] = np.rot90(cells[sel], k, axes=(1, 2))
    out = img.copy()
    out[: rows * s, : cols * s] = cells.reshape(rows, cols, s, s, 3).swapaxes(1, 2).reshape(rows * s, cols * s, 3)
    return out


# --------------------------------------------------------------------------------------- inpaint
INPAINT_SENTINEL = -1.0


def inpaint_method(batch, *, mask):
    out = batch.copy()
    out[mask >= 0.5] = INPAINT_SENTINEL
    return out


# ----------------------------------------------------------------------------------------- lines
_local = threading.local()  # one LSD object per thread (they are not shared between threads)


def _segments_lsd(gray_u8):
    lsd = getattr(_local, "lsd", None)
    if lsd is None:
        lsd = _local.lsd = cv2().createLineSegmentDetector()
    segs = lsd.detect(gray_u8)[0]
    return np.zeros((0, 4), np.float32) if segs is None else segs.reshape(-1, 4)


def _segments_hough(gray_u8, min_len):
    cv = cv2()
    edges = cv.Canny(gray_u8, 50, 150)
    short = min(gray_u8.shape)
    segs = cv.HoughLinesP(
        edges, 1, np.pi / 180, threshold=max(10, int(min_len / 2)), minLineLength=max(2.0, min_len),
        maxLineGap=max(1.0, short / 100),
    )
    return np.zeros((0, 4), np.float32) if segs is None else segs.reshape(-1, 4).astype(np.float32)


def lines_method(img, *, min_length, detector):
    cv = cv2()
    gray = to_uint8(luma(img))
    h, w = gray.shape
    min_len = float(min_length) * min(h, w)
    if detector == "auto":
        detector = "lsd" if has_lsd() else "hough"
    if detector == "lsd":
        if not has_lsd():
            raise PreprocessorError(
                f"this OpenCV ({cv.__version__}) has no LSD line detector (removed in 3.4.6 - 4.5.0); set "
                "detector to 'hough' or 'auto', or upgrade opencv-python"
            )
        segs = _segments_lsd(gray)
    else:
        segs = _segments_hough(gray, min_len)
    length = np.hypot(segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1])
    segs = segs[length >= min_len]
    canvas = np.zeros((h, w), np.uint8)
    width = max(1, int(round(min(h, w) / 512)))
    for x0, y0, x1, y1 in np.rint(segs).astype(np.int64):
        cv.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, width, cv.LINE_8)
    return canvas.astype(np.float32) * np.float32(1.0 / 255.0)
