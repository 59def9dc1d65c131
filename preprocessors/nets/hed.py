"""HED soft edges: lllyasviel's Apache-2.0 re-trained HED ("ControlNetHED_Apache2"), file `ControlNetHED.pth`.

The network is five VGG-style blocks (64, 128, 256, 512, 512 channels; 2, 2, 3, 3, 3 3x3 convs with
ReLU; a 2x2 max-pool before blocks 2-5), each with a 1x1 projection to one side output. It takes
RGB in 0..255 minus a learnt per-channel `norm`. The file is an OrderedDict of fp16 tensors with
the key names used here (`norm`, `block{1..5}.convs.{i}.*`, `block{1..5}.projection.*`); it is run
in fp32 (as Aux does: fp16 side outputs would move the uint8 map).

The method (Aux's HEDdetector): pad to 64 (edge), the five side outputs each resized to the padded
size (bilinear), averaged, sigmoid, optionally `safe_step`, x255 to uint8, cropped; "scribble"
turns that map into thick binary strokes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import pad64, safe_step, to_uint8, uint8_to_float
from .edges import build, rgb_tensor, scribble_strokes, sigmoid_mean, truncate_u8
from .files import read_state_dict
from .host import Net

FILE_NAME = "ControlNetHED.pth"
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
WIDTHS = (64, 128, 256, 512, 512)
DEPTHS = (2, 2, 3, 3, 3)


class HEDBlock(nn.Module):
    """`depth` 3x3 conv + ReLU layers (`convs`) and a 1x1 `projection` to the block's side output."""

    def __init__(self, c_in: int, c_out: int, depth: int):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1) for i in range(depth)))
        self.projection = nn.Conv2d(c_out, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)
        return x, self.projection(x)


class HEDNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        c_in = 3
        for i, (c, d) in enumerate(zip(WIDTHS, DEPTHS), 1):
            self.add_module(f"block{i}", HEDBlock(c_in, c, d))
            c_in = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) RGB in 0..255 -> the five side outputs, (B, 1, H / 2^i, W / 2^i)."""
        h = x - self.norm
        sides = []
        for i in range(1, 6):
            if i > 1:
                h = F.max_pool2d(h, 2, 2)
            h, side = getattr(self, f"block{i}")(h)
            sides.append(side)
        return sides


def load(path: Path) -> HEDNet:
    """The network of `ControlNetHED.pth` (its fp16 tensors are read as fp32)."""
    return build(HEDNet, read_state_dict(path), path=path, what="HED (ControlNetHED_Apache2)")


def edge_map(model: Net, img_u8: np.ndarray, safe: bool) -> np.ndarray:
    """The uint8 HED map (h, w) of a uint8 RGB image (h, w, 3): padded to 64, fused, cropped."""
    padded, (h, w) = pad64(img_u8)
    dev = model.device()
    with torch.inference_mode():
        sides = [s[0, 0].float().cpu().numpy() for s in model.module(rgb_tensor(padded, dev))]
    edge = sigmoid_mean(sides, *padded.shape[:2])
    if safe:
        edge = safe_step(edge)
    return truncate_u8(edge)[:h, :w]


def softedge_hed(frame: np.ndarray, *, model: Net, safe: bool) -> np.ndarray:
    """The method: float RGB (h, w, 3) in [0, 1] -> HED soft edges (h, w) in [0, 1]."""
    return uint8_to_float(edge_map(model, to_uint8(frame), safe))


def scribble_hed(frame: np.ndarray, *, model: Net, safe: bool) -> np.ndarray:
    """The method: thick binary strokes from the HED map (Aux's "fake scribble"), (h, w) 0 / 1."""
    img = to_uint8(frame)
    padded, (h, w) = pad64(img)
    # Aux draws the strokes on the padded map, then crops: the blur sees the padding.
    strokes = scribble_strokes(edge_map(model, padded, safe))
    return uint8_to_float(strokes[:h, :w])
