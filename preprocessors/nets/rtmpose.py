"""RTMPose-L (mmpose: CSPNeXt P5 backbone + RTMCCHead with a GAU block) as torch modules with mmpose's
module paths, for the DWPose pose files that hold the network by module names rather than as a
graph: the TorchScript archives (`dw-ll_ucoco_384_bs5.torchscript.pt`), read by torchscript.py
without running their code. Widths and depths come from the state dict's shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, k, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    def __init__(self, cin, cout, add_identity=True):
        super().__init__()
        self.conv1 = ConvModule(cin, cout, 3)
        self.conv2 = DepthwiseSeparableConvModule(cout, cout, 5)
        self.add_identity = add_identity and cin == cout

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return y + x if self.add_identity else y


class ChannelAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(c, c, 1, bias=True)
        self.act = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.act(self.fc(self.global_avgpool(x)))


class CSPNeXtLayer(nn.Module):
    def __init__(self, cin, cout, n, add_identity=True):
        super().__init__()
        mid = int(cout * 0.5)
        self.main_conv = ConvModule(cin, mid, 1)
        self.short_conv = ConvModule(cin, mid, 1)
        self.final_conv = ConvModule(2 * mid, cout, 1)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, mid, add_identity) for _ in range(n)])
        self.attention = ChannelAttention(2 * mid)

    def forward(self, x):
        y = torch.cat((self.blocks(self.main_conv(x)), self.short_conv(x)), 1)
        return self.final_conv(self.attention(y))


class SPPFBottleneck(nn.Module):
    def __init__(self, cin, cout, ks=(5, 9, 13)):
        super().__init__()
        mid = cin // 2
        self.conv1 = ConvModule(cin, mid, 1)
        self.poolings = nn.ModuleList([nn.MaxPool2d(k, 1, k // 2) for k in ks])
        self.conv2 = ConvModule(mid * (len(ks) + 1), cout, 1)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [p(x) for p in self.poolings], 1))


class CSPNeXt(nn.Module):
    """mmdet CSPNeXt arch P5, out_indices=(4,)."""

    def __init__(self, widen=1.0, deepen=1.0):
        super().__init__()
        arch = [[64, 128, 3, True, False], [128, 256, 6, True, False], [256, 512, 6, True, False],
                [512, 1024, 3, False, True]]
        c0 = int(arch[0][0] * widen)
        self.stem = nn.Sequential(ConvModule(3, c0 // 2, 3, 2), ConvModule(c0 // 2, c0 // 2, 3),
                                  ConvModule(c0 // 2, c0, 3))
        for i, (cin, cout, n, add, spp) in enumerate(arch):
            cin, cout, n = int(cin * widen), int(cout * widen), max(round(n * deepen), 1)
            stage = [ConvModule(cin, cout, 3, 2)]
            if spp:
                stage.append(SPPFBottleneck(cout, cout))
            stage.append(CSPNeXtLayer(cout, cout, n, add))
            self.add_module(f"stage{i + 1}", nn.Sequential(*stage))

    def forward(self, x):
        x = self.stem(x)
        for i in range(4):
            x = getattr(self, f"stage{i + 1}")(x)
        return x


class ScaleNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.scale = dim ** -0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        norm = torch.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class Scale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale


class RTMCCBlock(nn.Module):
    def __init__(self, num_token, dims, s=128, expansion=2):
        super().__init__()
        self.s, self.e = s, int(dims * expansion)
        self.o = nn.Linear(self.e, dims, bias=False)
        self.uv = nn.Linear(dims, 2 * self.e + s, bias=False)
        self.gamma = nn.Parameter(torch.rand((2, s)))
        self.beta = nn.Parameter(torch.rand((2, s)))
        self.ln = ScaleNorm(dims)
        self.act_fn = nn.SiLU()
        self.res_scale = Scale(dims)
        self.sqrt_s = math.sqrt(s)

    def forward(self, x):
        res = x
        x = self.act_fn(self.uv(self.ln(x)))
        u, v, base = torch.split(x, [self.e, self.e, self.s], dim=2)
        base = base.unsqueeze(2) * self.gamma[None, None, :] + self.beta
        q, k = torch.unbind(base, dim=2)
        qk = torch.bmm(q, k.permute(0, 2, 1))
        kernel = torch.square(F.relu(qk / self.sqrt_s))
        x = self.o(u * torch.bmm(kernel, v))
        return self.res_scale(res) + x


class RTMCCHead(nn.Module):
    def __init__(self, cin, k=133, input_size=(288, 384), split=2.0, hidden=256):
        super().__init__()
        fw, fh = input_size[0] // 32, input_size[1] // 32
        self.final_layer = nn.Conv2d(cin, k, 7, padding=3)
        self.mlp = nn.Sequential(ScaleNorm(fw * fh), nn.Linear(fw * fh, hidden, bias=False))
        self.gau = RTMCCBlock(k, hidden)
        self.cls_x = nn.Linear(hidden, int(input_size[0] * split), bias=False)
        self.cls_y = nn.Linear(hidden, int(input_size[1] * split), bias=False)

    def forward(self, x):
        x = self.final_layer(x).flatten(2)
        x = self.gau(self.mlp(x))
        return self.cls_x(x), self.cls_y(x)


class RTMPose(nn.Module):
    """dw-ll_ucoco_384: (N, 3, 384, 288) normalised -> simcc_x (N, 133, 576), simcc_y (N, 133, 768)."""

    def __init__(self, widen=1.0, deepen=1.0, input_size=(288, 384)):
        super().__init__()
        self.backbone = CSPNeXt(widen, deepen)
        self.head = RTMCCHead(int(1024 * widen), input_size=input_size)

    def forward(self, x):
        return self.head(self.backbone(x))
