"""NormalBAE (Bae, Budvytis, Cipolla, ICCV 2021): surface normals with an EfficientNet-B5 encoder and
an uncertainty-guided decoder, trained on ScanNet (`scannet.pt`).

Weight names as the release (baegwangbin/surface_normal_uncertainty, the NNET that Aux and
controlnet-aux ship): `encoder.original_model.*` is geffnet's `tf_efficientnet_b5_ap` (TF "same"
padding: stride-2 convs pad by the TF rule, BatchNorm eps 1e-3, SiLU, squeeze-excite), `decoder.*`
the BN decoder. In test mode (what annotators use) the decoder predicts at 1/8, then refines at 1/4,
1/2 and 1/1 with per-pixel MLPs (Conv1d) on the upsampled features + previous prediction; each
prediction is (normal xyz normalised, kappa).

Pipeline (Aux's `NormalBaeDetector`): the image at the working resolution edge-padded to a multiple
of 64, /255, ImageNet normalisation, the network, the finest prediction's xyz, (n + 1) / 2 clipped,
x255 truncated to uint8, the padding cropped. RGB = (x, y, z) as the model outputs them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PreprocessorError
from .common import pad64, to_uint8, uint8_to_float
from .files import load_into, read_state_dict
from .host import Net

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The decoder's full-resolution layers hold 280-channel maps at half and 132 at full size: beyond
# this many working pixels a CPU (or a consumer GPU) runs out of memory.
MAX_PIXELS = 2048 * 2048
BN_EPS = 1e-3  # TF's BatchNorm epsilon (the encoder)
# EfficientNet-B5 stages: (kernel, stride, expansion, out channels, repeats); the first is depthwise-separable
STAGES = ((3, 1, 1, 24, 3), (3, 2, 6, 40, 5), (5, 2, 6, 64, 5), (3, 2, 6, 128, 7), (5, 1, 6, 176, 7),
          (5, 2, 6, 304, 9), (3, 1, 6, 512, 3))


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: for stride 1 a fixed (k - 1) / 2, for stride 2 computed
    from the input size, the extra pixel (when the total is odd) at the bottom / right."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride, (k - 1) // 2 if stride == 1 else 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: width first
            k, s = self.kernel_size[0], self.stride[0]
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv_dw = SameConv(cin, cin, k, stride, groups=cin)
        self.bn1 = _bn(cin)
        self.se = SqueezeExcite(cin, cin // 4)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x)), inplace=True))))
        return x + y if self.residual else y


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.conv_dw = SameConv(mid, mid, k, stride, groups=mid)
        self.bn2 = _bn(mid)
        self.se = SqueezeExcite(mid, cin // 4)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn1(self.conv_pw(x)), inplace=True)  # in place: no extra map per layer
        y = self.se(F.silu(self.bn2(self.conv_dw(y)), inplace=True))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.residual else y


class EfficientNetB5(nn.Module):
    """tf_efficientnet_b5_ap without its classifier; `forward` returns the maps the decoder uses: the
    outputs of stages 0, 1, 2 and 4, and of conv_head (before its BatchNorm, as the release taps it)."""

    def __init__(self):
        super().__init__()
        self.conv_stem = SameConv(3, 48, 3, 2)
        self.bn1 = _bn(48)
        stages, cin = [], 48
        for i, (k, s, e, cout, n) in enumerate(STAGES):
            blocks = []
            for j in range(n):
                stride = s if j == 0 else 1
                blocks.append(DepthwiseSeparable(cin, cout, k, stride) if i == 0
                              else InvertedResidual(cin, cout, k, stride, e))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(cin, 2048, 1, bias=False)
        self.bn2 = _bn(2048)  # in the files; the decoder taps conv_head before it

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.silu(self.bn1(self.conv_stem(x)), inplace=True)
        taps = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in (0, 1, 2, 4):
                taps.append(x)
        taps.append(self.conv_head(x))
        return taps


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.original_model = EfficientNetB5()


class UpSampleBN(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self._net = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([x, skip], dim=1))


def _mlp(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, 128, 1), nn.ReLU(inplace=True), nn.Conv1d(128, 128, 1), nn.ReLU(inplace=True),
                         nn.Conv1d(128, 128, 1), nn.ReLU(inplace=True), nn.Conv1d(128, 4, 1))


def normalize_prediction(out: torch.Tensor) -> torch.Tensor:
    """(x, y, z, kappa) -> unit normal and kappa = elu + 1.01 (the release's norm_normalize)."""
    x, y, z, kappa = torch.split(out, 1, dim=1)
    norm = torch.sqrt(x ** 2.0 + y ** 2.0 + z ** 2.0) + 1e-10
    return torch.cat([x / norm, y / norm, z / norm, F.elu(kappa) + 1.0 + 0.01], dim=1)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(2048, 2048, 1)
        self.up1 = UpSampleBN(2048 + 176, 1024)
        self.up2 = UpSampleBN(1024 + 64, 512)
        self.up3 = UpSampleBN(512 + 40, 256)
        self.up4 = UpSampleBN(256 + 24, 128)
        self.out_conv_res8 = nn.Conv2d(512, 4, 3, padding=1)
        self.out_conv_res4 = _mlp(512 + 4)
        self.out_conv_res2 = _mlp(256 + 4)
        self.out_conv_res1 = _mlp(128 + 4)

    @staticmethod
    def refine(mlp: nn.Sequential, features: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)  # noqa: E731
        f = torch.cat([up(features), up(previous)], dim=1)
        b, c, h, w = f.shape
        return normalize_prediction(mlp(f.view(b, c, -1))).view(b, 4, h, w)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        b0, b1, b2, b3, b4 = taps
        d1 = self.up1(self.conv2(b4), b3)
        d2 = self.up2(d1, b2)
        d3 = self.up3(d2, b1)
        d4 = self.up4(d3, b0)
        out = normalize_prediction(self.out_conv_res8(d2))
        out = self.refine(self.out_conv_res4, d2, out)
        out = self.refine(self.out_conv_res2, d3, out)
        return self.refine(self.out_conv_res1, d4, out)


class NormalBAE(nn.Module):
    """`forward(x (B, 3, H, W) normalised, H and W multiples of 32) -> (B, 4, H, W)`: unit normal, kappa."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.original_model(x))


def load(path: Path) -> NormalBAE:
    """The network of `scannet.pt` (`{'model': ...}`, `module.` prefixes: the format reader's quirks)."""
    net = NormalBAE()
    load_into(net, read_state_dict(path), path=path, what="NormalBAE (scannet.pt)")
    return net


def normal_map(frame: np.ndarray, model: Net, **_params) -> np.ndarray:
    """The method: float RGB (h, w, 3) at the working size -> the normal map (h, w, 3) in [0, 1]."""
    padded, (h, w) = pad64(to_uint8(frame))
    if padded.shape[0] * padded.shape[1] > MAX_PIXELS:
        raise PreprocessorError(
            f"normal_bae: a working size of {w}x{h} pixels needs more memory than the network can have; use a "
            f"resolution of at most {int(math.sqrt(MAX_PIXELS))} (or a smaller image)"
        )
    x = torch.from_numpy(padded).float() / 255.0
    x = x.permute(2, 0, 1)[None]
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    dev = model.device()
    with torch.inference_mode():
        n = model.module(x.to(dev))[:, :3]
        n = ((n + 1) * 0.5).clip(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
    return uint8_to_float((n * 255.0).clip(0, 255).astype(np.uint8)[:h, :w])
