"""Input normalisation and resizing shared by every method (numpy + OpenCV, no torch).

Accepted images: (N, H, W, C) or (H, W, C), also (H, W) for one grey frame; uint8, uint16, bool or
float in [0, 1] (float values a hair outside are clipped; NaN/Inf are errors); C = 1 (grey, copied to
RGB), 3 (RGB) or 4 (RGBA: the alpha channel is dropped, the colour is used as stored, like ComfyUI's
LoadImage which splits alpha into a separate MASK). Everything becomes float32 RGB in [0, 1].
"""

from __future__ import annotations

import numpy as np

from ._cv import cv2
from .errors import PreprocessorError

MIN_SIDE = 8  # smaller images carry no usable structure for any method
MIN_RESOLUTION = 16
MAX_RESOLUTION = 16384


def _describe(a) -> str:
    return f"shape {tuple(a.shape)}, dtype {a.dtype}"


def as_image_array(images) -> np.ndarray:
    """`images` as a validated (N, H, W, C) array, not yet converted (cheap: no pass over the pixels)."""
    if hasattr(images, "detach") and hasattr(images, "cpu"):  # a torch tensor from the node
        images = images.detach().cpu().numpy()
    a = np.asarray(images)
    if a.dtype == object:
        raise PreprocessorError("the image is not a numeric array; pass a numpy array of pixels")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise PreprocessorError(
            f"expected an image (height, width, channels) or a batch (frames, height, width, channels); got "
            f"{_describe(a)}"
        )
    n, h, w, c = a.shape
    if a.size == 0:
        raise PreprocessorError(
            f"the image is empty ({n} frames of {h}x{w} pixels, {c} channels); pass at least one frame with "
            "pixels in it"
        )
    if c not in (1, 3, 4):
        raise PreprocessorError(
            f"expected 1 (grey), 3 (RGB) or 4 (RGBA) channels in the last axis; got {c} ({_describe(a)}); "
            "images must be channels-last (frames, height, width, channels)"
        )
    if h < MIN_SIDE or w < MIN_SIDE:
        raise PreprocessorError(
            f"the image is too small: {h}x{w} pixels; preprocessors need at least {MIN_SIDE} pixels on each "
            "side; upscale it first"
        )
    if not (a.dtype in (np.uint8, np.uint16, np.bool_) or np.issubdtype(a.dtype, np.floating)):
        raise PreprocessorError(
            f"unsupported pixel type {a.dtype}; use uint8, uint16 or float in [0, 1] (e.g. image / 255)"
        )
    return a


def frame_to_float(a: np.ndarray) -> np.ndarray:
    """One validated (..., H, W, C) array to float32 RGB (..., H, W, 3) in [0, 1] (a new array)."""
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / np.float32(255.0)  # correctly rounded k / 255
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / np.float32(65535.0)
    elif a.dtype == np.bool_:
        f = a.astype(np.float32)
    else:
        f = a.astype(np.float32)  # copies
        if not np.isfinite(f).all():
            raise PreprocessorError("the image contains NaN or Inf values; check the node that produced it")
        np.clip(f, 0.0, 1.0, out=f)
    c = f.shape[-1]
    if c == 1:
        f = np.repeat(f, 3, axis=-1)
    elif c == 4:
        f = f[..., :3]
    return np.ascontiguousarray(f)


def to_float_batch(images) -> np.ndarray:
    """A float32 (N, H, W, 3) copy of `images` in [0, 1]; PreprocessorError on anything unusable."""
    return frame_to_float(as_image_array(images))


def to_mask_batch(mask, n: int, h: int, w: int) -> np.ndarray:
    """A float32 (N, h, w) mask in [0, 1] from (H, W), (M, H, W) or (M, H, W, 1), M in (1, N).

    A mask of another size is resized (bilinear) to the image first.
    """
    if mask is None:
        raise PreprocessorError("this method needs a mask; connect a MASK (white = the area to repaint)")
    if hasattr(mask, "detach") and hasattr(mask, "cpu"):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.size == 0:
        raise PreprocessorError(
            f"the mask must be (height, width) or (frames, height, width); got {_describe(m)}"
        )
    if m.shape[0] not in (1, n):
        raise PreprocessorError(
            f"the mask has {m.shape[0]} frames but the image has {n}; pass 1 mask (used for every frame) "
            f"or {n}"
        )
    if m.dtype == np.uint8:
        m = m.astype(np.float32) / 255.0
    elif m.dtype == np.uint16:
        m = m.astype(np.float32) / 65535.0
    elif m.dtype == np.bool_ or np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer):
        m = m.astype(np.float32)
    else:
        raise PreprocessorError(f"unsupported mask type {m.dtype}; use float in [0, 1], uint8 or bool")
    if not np.isfinite(m).all():
        raise PreprocessorError("the mask contains NaN or Inf values")
    if m.shape[1:] != (h, w):
        m = np.stack([cv2().resize(x, (w, h), interpolation=cv2().INTER_LINEAR) for x in m])
    if m.shape[0] != n:
        m = np.repeat(m, n, axis=0)
    return np.ascontiguousarray(m)


def working_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """(height, width) with the short side = `resolution` and the aspect ratio of (h, w) kept."""
    s = resolution / min(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def pixel_perfect_resolution(h: int, w: int, target_hw) -> int:
    """The working resolution whose image, scaled to cover `target_hw`, needs no further resampling.

    The hint is later fit to the target (ComfyUI's default is crop, i.e. cover), which scales the
    image by max(H*/h, W*/w); working at that scale means the hint is made at its final pixel size.
    """
    try:
        th, tw = (int(v) for v in target_hw)
    except (TypeError, ValueError) as e:
        raise PreprocessorError(
            f"target_hw must be (height, width) in pixels, the latent size x 8; got {target_hw!r}"
        ) from e
    if th <= 0 or tw <= 0:
        raise PreprocessorError(f"target_hw must be positive (height, width) in pixels; got {target_hw!r}")
    return int(round(max(th / h, tw / w) * min(h, w)))


def resize(batch: np.ndarray, h: int, w: int, grow: str = "cubic") -> np.ndarray:
    """Resize a float32 (N, H, W, C) batch to (N, h, w, C): area when shrinking; when growing,
    `grow="cubic"` for images (clipped to [0, 1], since bicubic overshoots) or `"linear"` for hints
    going back to the input size (binary edge maps get no ringing and stay in [0, 1])."""
    n, H, W, c = batch.shape
    if (H, W) == (h, w):
        return batch
    cv = cv2()
    if h <= H and w <= W:
        interp = cv.INTER_AREA
    else:
        interp = {"cubic": cv.INTER_CUBIC, "linear": cv.INTER_LINEAR}[grow]
    out = np.empty((n, h, w, c), np.float32)
    for i in range(n):
        out[i] = cv.resize(batch[i], (w, h), interpolation=interp).reshape(h, w, c)
    if interp == cv.INTER_CUBIC:
        np.clip(out, 0.0, 1.0, out=out)
    return out


def fit_long_side(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) scaled down, aspect kept, so the long side is at most `side` (never scaled up, never 0)."""
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of float RGB (..., 3): 0.299 R + 0.587 G + 0.114 B, float32."""
    return (
        np.float32(0.299) * rgb[..., 0] + np.float32(0.587) * rgb[..., 1] + np.float32(0.114) * rgb[..., 2]
    ).astype(np.float32, copy=False)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float in [0, 1] to uint8 with rounding (exact round-trip of uint8 inputs)."""
    return np.clip(np.rint(x * np.float32(255.0)), 0, 255).astype(np.uint8)
