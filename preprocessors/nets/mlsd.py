"""M-LSD (Gu et al. 2021, NAVER's Apache-2.0 release): straight line segments, white on black.

The network is `MobileV2_MLSD_Large` of the release (lihaoweicv's PyTorch port, as Aux and
controlnet-aux ship it), with its weight names, so `mlsd_large_512_fp32.pth` loads as it is:
a MobileNetV2 backbone on RGB + a constant plane (4 channels; stride-2 convs pad right/bottom by
one, TF style), features of blocks 1, 3, 6, 10 and 13 fused top-down (`block15` .. `block22`),
a dilated head (`block23`) whose last 9 channels, at half resolution, are a centre map (1) and
start/end displacements (4) (the other 4 are unused).

Pipeline (Aux's `MLSDdetector`, node defaults score 0.1, distance 0.1): the image at the working
resolution, edge-padded to a multiple of 64, `x / 127.5 - 1`; centres = sigmoid, local maxima of a
3x3 window, the 200 best; a segment where score > score_threshold and its length (in half-res
pixels) > dist_threshold, coordinates x2; each drawn with cv2.line (1 px, 8-connected, truncated
to whole pixels) on black; the padding cropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import pad64, to_uint8, uint8_to_float
from .files import load_into, read_state_dict
from .host import Net

TOP_K = 200


class ConvBNReLU(nn.Sequential):
    """conv (no bias) + BN + ReLU6; stride 2 pads right and bottom by one instead of both sides."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        pad = 0 if stride == 2 else (kernel - 1) // 2
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """The first 14 blocks of MobileNetV2 (to 96 channels at 1/16), the taps M-LSD uses."""

    TAPS = (1, 3, 6, 10, 13)
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))  # t, c, n, s

    def __init__(self):
        super().__init__()
        blocks: list[nn.Module] = [ConvBNReLU(4, 32, stride=2)]
        cin = 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.TAPS:
                out.append(x)
        return out


def _cbr(cin: int, cout: int, k: int = 1, pad: int = 0, dil: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dil), nn.BatchNorm2d(cout), nn.ReLU())


class BlockA(nn.Module):
    """Lateral 1x1 of the finer map + 1x1 of the coarser (x2 bilinear, align_corners), concatenated."""

    def __init__(self, c_fine: int, c_coarse: int, upscale: bool = True):
        super().__init__()
        self.conv1 = _cbr(c_coarse, 64)
        self.conv2 = _cbr(c_fine, 64)
        self.upscale = upscale

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        coarse = self.conv1(coarse)
        if self.upscale:
            coarse = F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat([self.conv2(fine), coarse], dim=1)


class BlockB(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = _cbr(128, 128, 3, 1)
        self.conv2 = _cbr(128, 64, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class BlockC(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = _cbr(64, 64, 3, 5, 5)
        self.conv2 = _cbr(64, 64, 3, 1)
        self.conv3 = nn.Conv2d(64, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSD(nn.Module):
    """`forward(x (B, 4, H, W) in [-1, 1]) -> (B, 9, H/2, W/2)`: centre logits, then displacements."""

    def __init__(self):
        super().__init__()
        self.backbone = MobileNetV2()
        self.block15 = BlockA(64, 96, upscale=False)
        self.block16 = BlockB()
        self.block17 = BlockA(32, 64)
        self.block18 = BlockB()
        self.block19 = BlockA(24, 64)
        self.block20 = BlockB()
        self.block21 = BlockA(16, 64)
        self.block22 = BlockB()
        self.block23 = BlockC()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:]


def load(path: Path) -> MLSD:
    """The network of `mlsd_large_512_fp32.pth`."""
    net = MLSD()
    load_into(net, read_state_dict(path), path=path, what="M-LSD (mlsd_large_512_fp32.pth)")
    return net


def decode(out: torch.Tensor, score_threshold: float, dist_threshold: float) -> np.ndarray:
    """(N, 4) segments x0, y0, x1, y1 in input pixels from one (1, 9, h, w) output (M-LSD's decoder)."""
    h, w = out.shape[-2:]
    heat = torch.sigmoid(out[:, 0])
    peak = F.max_pool2d(heat, 3, stride=1, padding=1)
    heat = (heat * (peak == heat).float()).reshape(-1)
    scores, idx = torch.topk(heat, min(TOP_K, heat.numel()))
    ys, xs = (idx // w).cpu().numpy(), (idx % w).cpu().numpy()
    scores = scores.cpu().numpy()
    disp = out[0, 1:5].permute(1, 2, 0).cpu().numpy()  # (h, w, 4): start dx, dy, end dx, dy
    length = np.sqrt(np.sum((disp[..., :2] - disp[..., 2:]) ** 2, axis=-1))
    keep = (scores > score_threshold) & (length[ys, xs] > dist_threshold)
    ys, xs = ys[keep], xs[keep]
    d = disp[ys, xs]
    segments = np.stack([xs + d[:, 0], ys + d[:, 1], xs + d[:, 2], ys + d[:, 3]], axis=-1)
    return 2 * segments  # the map is at half the input's resolution


def lines_map(frame: np.ndarray, model: Net, score_threshold: float = 0.1, dist_threshold: float = 0.1,
              **_params) -> np.ndarray:
    """The method: float RGB (h, w, 3) at the working size -> white segments on black (h, w)."""
    from .._cv import cv2

    padded, (h, w) = pad64(to_uint8(frame))
    x = np.concatenate([padded, np.ones(padded.shape[:2] + (1,))], axis=-1).transpose(2, 0, 1)[None]
    x = torch.from_numpy(x.astype(np.float32) / np.float32(127.5) - np.float32(1.0))
    dev = model.device()
    with torch.inference_mode():
        out = model.module(x.to(dev)).float()
    canvas = np.zeros(padded.shape[:2], np.uint8)
    for x0, y0, x1, y1 in decode(out, score_threshold, dist_threshold):
        cv2().line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return uint8_to_float(canvas[:h, :w])
