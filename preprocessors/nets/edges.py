"""What the edge and line-art networks (HED, PiDiNet, lineart, lineart_anime, TEED) share: building
a network from its file without a second copy of the weights, and the post-processing as
comfyui_controlnet_aux ("Aux") does it, so the uint8 maps equal Aux's: the sigmoid of the mean of the
side outputs, Aux's truncating uint8 cast and its "scribble" strokes. (Padding, `safe_step` and `nms`
are in common.py.)
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn

from .._cv import cv2
from .common import nms
from .files import load_into

M = TypeVar("M", bound=nn.Module)


def build(make: Callable[[], M], sd: dict, *, path: str | os.PathLike, what: str) -> M:
    """`make()` with the weights of `sd` (names and shapes checked by load_into, a sentence if they do
    not fit). The module is made without storage and takes the file's tensors as its parameters, so
    the weights are in memory once (loading into a built module would hold them twice at the peak)."""
    with torch.device("meta"):
        net = make()
    with warnings.catch_warnings():  # load_into's copy onto the storage-less module is a no-op: say nothing
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        load_into(net, sd, path=path, what=what)  # the names and shapes, a sentence when they do not fit
    net.load_state_dict(sd, strict=True, assign=True)
    return net


def rgb_tensor(img_u8: np.ndarray, device: torch.device) -> torch.Tensor:
    """A uint8 (H, W, 3) image as a float32 (1, 3, H, W) tensor of 0..255 values on `device`."""
    return torch.from_numpy(np.ascontiguousarray(img_u8)).to(device).permute(2, 0, 1)[None].float()


def sigmoid_mean(sides: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """The fused edge map of HED / TEED: every side output resized to (h, w) (bilinear, OpenCV), their
    mean, then a float64 sigmoid (as Aux computes it, so uint8 ties fall the same way)."""
    cv = cv2()
    up = [cv.resize(s, (w, h), interpolation=cv.INTER_LINEAR) if s.shape != (h, w) else s for s in sides]
    mean = np.mean(np.stack(up, axis=2), axis=2).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-mean))


def truncate_u8(edge: np.ndarray) -> np.ndarray:
    """Aux's final cast of a map in [0, 1]: x 255, clipped, truncated (not rounded) to uint8."""
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def scribble_strokes(edge_u8: np.ndarray) -> np.ndarray:
    """Aux's scribble of a uint8 soft-edge map: thin ridges (nms at 127, sigma 3), blurred (sigma 3),
    and everything above 4 made white: thick binary strokes, uint8 0 / 255."""
    m = cv2().GaussianBlur(nms(edge_u8, 127, 3.0), (0, 0), 3.0)
    return np.where(m > 4, np.uint8(255), np.uint8(0))
