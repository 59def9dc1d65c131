"""Realistic and coarse line art (Aux's LineartDetector): files `sk_model.pth` and `sk_model2.pth`.

Both files hold the same network, a ResNet generator with 3 residual blocks (informative-drawings
style): reflect-pad 3 + 7x7 conv to 64 + InstanceNorm + ReLU (`model0`); two stride-2 3x3 convs to
128 and 256 (`model1`); three residual blocks of reflect-padded 3x3 convs (`model2`); two stride-2
transposed convs back to 64 (`model3`); reflect-pad 3 + 7x7 conv to 1 + sigmoid (`model4`). The
InstanceNorms have no affine parameters, so the file's 24 tensors are the convs' weights and biases,
stored under the Sequential indices used here (`model0.1.weight`, ..., `model4.1.bias`).

The method: pad to 64 (edge), RGB / 255 in, line x 255 to uint8, inverted (the net draws dark
lines on white; hints are white on black), cropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import pad64, to_uint8, uint8_to_float
from .edges import build, rgb_tensor, truncate_u8
from .files import read_state_dict
from .host import Net

FILE_NAMES = {"realistic": "sk_model.pth", "coarse": "sk_model2.pth"}
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
RES_BLOCKS = 3


def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm2d(c)  # affine=False, no running stats: nothing of it is in the file


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(c), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    def __init__(self, res_blocks: int = RES_BLOCKS):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), _norm(64), nn.ReLU(inplace=True))
        down = []
        for c_in, c_out in ((64, 128), (128, 256)):
            down += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), _norm(c_out), nn.ReLU(inplace=True)]
        self.model1 = nn.Sequential(*down)
        self.model2 = nn.Sequential(*(ResidualBlock(256) for _ in range(res_blocks)))
        up = []
        for c_in, c_out in ((256, 128), (128, 64)):
            up += [nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1), _norm(c_out),
                   nn.ReLU(inplace=True)]
        self.model3 = nn.Sequential(*up)
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W), dark lines (0) on white (1)."""
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def load(path: Path) -> LineartGenerator:
    """The generator of `sk_model.pth` (realistic) or `sk_model2.pth` (coarse): the same network."""
    return build(LineartGenerator, read_state_dict(path), path=path, what="line-art (sk_model)")


def lineart_net(frame: np.ndarray, *, model: Net) -> np.ndarray:
    """The method (lineart_realistic / lineart_coarse, by the file): float RGB (h, w, 3) in [0, 1] ->
    white-on-black lines (h, w) in [0, 1]."""
    padded, (h, w) = pad64(to_uint8(frame))
    dev = model.device()
    with torch.inference_mode():
        line = model.module(rgb_tensor(padded, dev) / 255.0)[0, 0].float().cpu().numpy()
    return uint8_to_float(255 - truncate_u8(line)[:h, :w])
