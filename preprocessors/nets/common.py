"""Image recipes the network annotators share, as comfyui_controlnet_aux ("Aux",
`custom_controlnet_aux/util.py`) does them, so a hint equals Aux's on the same input.

The registry already brings a frame to the working size (short side = `resolution`, the same
rounding as Aux's `resize_image_with_pad`); what is left is Aux's padding to a multiple of 64 and
its uint8 steps.
"""

from __future__ import annotations

import numpy as np

from ..image import to_uint8

__all__ = ["nms", "pad64", "safe_step", "to_uint8", "uint8_to_float"]


def pad64(img: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """(img edge-padded at the bottom and right to multiples of 64, its (h, w) to crop back to)."""
    h, w = img.shape[:2]
    ph, pw = -h % 64, -w % 64
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (img.ndim - 2)
    return (np.pad(img, pad, mode="edge") if ph or pw else img), (h, w)


def uint8_to_float(x: np.ndarray) -> np.ndarray:
    """A uint8 hint as the registry's float32 [0, 1]."""
    return x.astype(np.float32) / np.float32(255.0)


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """Aux's `safe_step`: quantise a [0, 1] map to `step` levels (floor), in float32."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def nms(x: np.ndarray, t: float, s: float) -> np.ndarray:
    """Aux's `nms`: Gaussian blur sigma s, keep the maxima along the four 3x3 line directions, > t -> 255."""
    from .._cv import cv2

    cv = cv2()
    x = cv.GaussianBlur(x.astype(np.float32), (0, 0), s)
    kernels = (
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], np.uint8),
    )
    y = np.zeros_like(x)
    for f in kernels:
        np.putmask(y, cv.dilate(x, kernel=f) == x, x)
    z = np.zeros_like(y, dtype=np.uint8)
    z[y > t] = 255
    return z
