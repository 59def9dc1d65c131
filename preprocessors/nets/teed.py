"""TEED soft edges (Soria et al. 2023, "Tiny and Efficient Edge Detector") and AnyLine (TheMistoAI's
MistoLine recipe): file `MTEED.pth` (AnyLine's weights; `7_model.pth`, the original TEED, has the same
layout).

TEED (58.9 k parameters, smish activations `x tanh(ln(1 + sigmoid(x)))`): two double-conv blocks
(the first at stride 2), a max-pool and a one-layer dense block, with 1x1 skip convs; three
upsampling heads (1x1 conv + transposed convs) give side outputs at the input size, fused by a
depthwise "double fusion" into a fourth. The file is a plain state dict with the names used here.

softedge_teed (Aux's TEEDdetector): pad to 64 (edge), RGB in 0..255 (not normalised, as Aux feeds
it), the four outputs resized to the padded size (bilinear), averaged, sigmoid, `safe_step` with
`safe_steps` levels (0 = off), uint8, cropped.
anyline (Aux's AnyLineArtPreprocessor_aux with its defaults): the MTEED map (safe_steps 2) screen-
blended with Aux's "lineart_standard" lines where those lines form connected objects larger than
`object_min_size` pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._cv import cv2
from .common import pad64, safe_step, to_uint8, uint8_to_float
from .edges import build, rgb_tensor, sigmoid_mean, truncate_u8
from .files import read_state_dict
from .host import Net

FILE_NAME = "MTEED.pth"
SOURCE = "https://huggingface.co/TheMistoAI/MistoLine (folder Anyline)"
# TEED's own release (Aux's TEEDPreprocessor default), the same network trained by TEED's authors
TEED_FILE_NAME = "7_model.pth"
TEED_SOURCE = "https://huggingface.co/bdsqlsz/qinglong_controlnet-lllite (folder Annotators)"


def smish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tanh(torch.log(1 + torch.sigmoid(x)))


class DoubleConv(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int | None = None, stride: int = 1, act: bool = True):
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(c_mid, c_out or c_mid, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(smish(self.conv1(x)))
        return smish(x) if self.act else x


class SingleConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DenseLayer(nn.Module):
    """conv 3x3 (padding 2), smish, conv 3x3 (no padding) on smish(x1), averaged with x2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=2)
        self.conv2 = nn.Conv2d(c_out, c_out, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.conv2(smish(self.conv1(smish(x1)))) + x2)


class DenseBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.denselayer1 = DenseLayer(c_in, c_out)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.denselayer1(x1, x2)


class UpHead(nn.Module):
    """`steps` x (1x1 conv, smish, stride-2 transposed conv): 16 channels, 1 after the last step."""

    def __init__(self, c_in: int, steps: int):
        super().__init__()
        k, pad = 2 ** steps, (0, 0, 1)[steps]
        layers: list[nn.Module] = []
        for i in range(steps):
            c_out = 1 if i == steps - 1 else 16
            layers += [nn.Conv2d(c_in, c_out, 1), _Smish(), nn.ConvTranspose2d(c_out, c_out, k, stride=2, padding=pad)]
            c_in = c_out
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _Smish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smish(x)


class DoubleFusion(nn.Module):
    """Depthwise 3x3 (3 -> 24), depthwise 3x3 (24 -> 24) on smish of each; smish of the channel sum of both."""

    def __init__(self):
        super().__init__()
        self.DWconv1 = nn.Conv2d(3, 24, 3, padding=1, groups=3)
        self.DWconv2 = nn.Conv2d(24, 24, 3, padding=1, groups=24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.DWconv1(smish(x))
        b = self.DWconv2(smish(a))
        return smish((b + a).sum(1, keepdim=True))


class TEEDNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block_1 = DoubleConv(3, 16, 16, stride=2)
        self.block_2 = DoubleConv(16, 32, act=False)
        self.dblock_3 = DenseBlock(32, 48)
        self.side_1 = SingleConv(16, 32, 2)
        self.pre_dense_3 = SingleConv(32, 48, 1)
        self.up_block_1 = UpHead(16, 1)
        self.up_block_2 = UpHead(32, 1)
        self.up_block_3 = UpHead(48, 2)
        self.block_cat = DoubleFusion()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) RGB in 0..255, H and W even multiples of 4 -> four (B, 1, H, W) edge logits."""
        b1 = self.block_1(x)
        b2 = self.block_2(b1)
        b2_down = F.max_pool2d(b2, 3, 2, 1)
        b3 = self.dblock_3(b2_down + self.side_1(b1), self.pre_dense_3(b2_down))
        outs = [self.up_block_1(b1), self.up_block_2(b2), self.up_block_3(b3)]
        return outs + [self.block_cat(torch.cat(outs, 1))]


def load(path: Path) -> TEEDNet:
    """The network of `MTEED.pth` (or TEED's own `7_model.pth`: the same layout)."""
    return build(TEEDNet, read_state_dict(path), path=path, what="TEED (MTEED.pth)")


def edge_map(model: Net, img_u8: np.ndarray, safe_steps: int) -> np.ndarray:
    """The uint8 TEED map (h, w) of a uint8 RGB image (h, w, 3): padded to 64, 0..255 in, cropped."""
    padded, (h, w) = pad64(img_u8)
    dev = model.device()
    with torch.inference_mode():
        sides = [s[0, 0].float().cpu().numpy() for s in model.module(rgb_tensor(padded, dev))]
    edge = sigmoid_mean(sides, *padded.shape[:2])
    if safe_steps != 0:
        edge = safe_step(edge, safe_steps)
    return truncate_u8(edge)[:h, :w]


def softedge_teed(frame: np.ndarray, *, model: Net, safe_steps: int) -> np.ndarray:
    """The method: float RGB (h, w, 3) in [0, 1] -> TEED soft edges (h, w) in [0, 1]."""
    return uint8_to_float(edge_map(model, to_uint8(frame), safe_steps))


# Aux's AnyLine node runs "lineart_standard" with these instead of that detector's own defaults (6, 8),
# and MTEED with TEED's default safe_steps.
ANYLINE_SIGMA = 2.0
ANYLINE_INTENSITY_THRESHOLD = 3
ANYLINE_SAFE_STEPS = 2
ANYLINE_MIN_OBJECT = 36  # Aux's object_min_size default


def lineart_standard(img_u8: np.ndarray, sigma: float = ANYLINE_SIGMA,
                     intensity_threshold: float = ANYLINE_INTENSITY_THRESHOLD) -> np.ndarray:
    """Aux's LineartStandardDetector on a uint8 RGB image (h, w, 3) -> uint8 (h, w): how much darker
    each pixel is than its blurred surroundings (the least over the channels), normalised by the
    median of the clear lines; computed on the padded image, as Aux does."""
    padded, (h, w) = pad64(img_u8)
    x = padded.astype(np.float32)
    g = cv2().GaussianBlur(x, (0, 0), sigma)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > intensity_threshold]
    # Aux divides by max(16, median); with no such pixel the median is NaN there and max(16, NaN) is 16.
    intensity /= max(16.0, float(np.median(strong))) if strong.size else 16.0
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)[:h, :w]


def keep_large_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """The pixels of the 4-connected components of `mask` (h, w) bool that are larger than `min_size`.

    Aux calls scikit-image's `remove_small_objects(min_size=.., connectivity=1)` on the mask repeated
    into 3 identical channels, so its objects are 3-D: a 2-D component of area a is one object of 3a
    voxels (face-connected), and scikit-image >= 0.26 removes objects of at most `min_size` voxels
    (0.25 and older: fewer than `min_size`; the two differ only for 3a == min_size, i.e. area 12).
    """
    cv = cv2()
    _n, labels, stats, _c = cv.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    keep = 3 * stats[:, cv.CC_STAT_AREA] > min_size
    keep[0] = False  # the background
    return keep[labels]


def anyline(frame: np.ndarray, *, model: Net) -> np.ndarray:
    """The method (Aux's AnyLineArtPreprocessor_aux with its defaults): float RGB (h, w, 3) in [0, 1] ->
    the MTEED map screen-blended with the larger lineart_standard lines, (h, w) in [0, 1]."""
    img = to_uint8(frame)
    base = uint8_to_float(edge_map(model, img, ANYLINE_SAFE_STEPS))
    line = uint8_to_float(lineart_standard(img))
    # Aux's intensity mask [lower 0, upper 1] keeps every value; the objects are the non-zero pixels.
    line = line * keep_large_objects(line != 0, ANYLINE_MIN_OBJECT)
    screen = 1 - (1 - line) * (1 - base)
    return np.where(line != 0, screen, base).astype(np.float32)
