"""Anime line art (Aux's LineartAnimeDetector): file `netG.pth`, a pix2pix U-Net generator.

The U-Net has 8 levels (64, 128, 256, 512 x 5 channels), 4x4 stride-2 convs down (LeakyReLU 0.2),
4x4 stride-2 transposed convs up (ReLU), InstanceNorm without affine parameters (so every conv has
a bias), skip connections by concatenation and a tanh output. It is built, as pix2pix builds it,
from nested blocks whose `model` Sequential holds [down..., inner block, up...], which gives the
file's key names (`model.model.0.weight`, `model.model.1.model.3.weight`, ...); files saved from
DataParallel carry a `module.` prefix, removed here.

The method: pad to 64 (edge), resize to the next multiple of 256 (bicubic, uint8), x / 127.5 - 1,
the net, y * 127.5 + 127.5 to uint8, back to the padded size (area), inverted, cropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._cv import cv2
from .common import pad64, to_uint8, uint8_to_float
from .edges import build, rgb_tensor
from .files import read_state_dict
from .host import Net

FILE_NAME = "netG.pth"
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
LEVELS = 8
NGF = 64
MULTIPLE = 256  # the U-Net halves the size 8 times


def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm2d(c)


class UNetLevel(nn.Module):
    """One level of the U-Net: down conv, the inner levels, up conv; concatenates its input to its output
    (except the outermost level, which ends in tanh)."""

    def __init__(self, outer: int, inner: int, inner_level: "UNetLevel | None" = None, c_in: int | None = None,
                 outermost: bool = False):
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(c_in or outer, inner, 4, stride=2, padding=1)
        up_in = inner if inner_level is None else inner * 2
        up = nn.ConvTranspose2d(up_in, outer, 4, stride=2, padding=1)
        if outermost:
            layers = [down, inner_level, nn.ReLU(True), up, nn.Tanh()]
        elif inner_level is None:  # innermost: no norm after its down conv
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, _norm(outer)]
        else:
            layers = [nn.LeakyReLU(0.2, True), down, _norm(inner), inner_level, nn.ReLU(True), up, _norm(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class AnimeUNet(nn.Module):
    def __init__(self, levels: int = LEVELS, ngf: int = NGF):
        super().__init__()
        level = UNetLevel(ngf * 8, ngf * 8)
        for _ in range(levels - 5):
            level = UNetLevel(ngf * 8, ngf * 8, level)
        for mult in (4, 2, 1):
            level = UNetLevel(ngf * mult, ngf * mult * 2, level)
        self.model = UNetLevel(1, ngf, level, c_in=3, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) RGB in [-1, 1], H and W multiples of 256 -> (B, 1, H, W) in [-1, 1]."""
        return self.model(x)


def load(path: Path) -> AnimeUNet:
    """The U-Net of `netG.pth` (a `module.` anywhere in a key is dropped, as Aux does)."""
    sd = {k.replace("module.", ""): v for k, v in read_state_dict(path).items()}
    return build(AnimeUNet, sd, path=path, what="anime line-art (netG, pix2pix U-Net)")


def lineart_anime(frame: np.ndarray, *, model: Net) -> np.ndarray:
    """The method: float RGB (h, w, 3) in [0, 1] -> white-on-black anime lines (h, w) in [0, 1]."""
    cv = cv2()
    padded, (h, w) = pad64(to_uint8(frame))
    ph, pw = padded.shape[:2]
    hn, wn = -(-ph // MULTIPLE) * MULTIPLE, -(-pw // MULTIPLE) * MULTIPLE
    feed = cv.resize(padded, (wn, hn), interpolation=cv.INTER_CUBIC)
    dev = model.device()
    with torch.inference_mode():
        line = model.module(rgb_tensor(feed, dev) / 127.5 - 1.0)[0, 0] * 127.5 + 127.5
        line = line.float().cpu().numpy()
    line = cv.resize(line.clip(0, 255).astype(np.uint8), (pw, ph), interpolation=cv.INTER_AREA)
    return uint8_to_float(255 - line[:h, :w])
