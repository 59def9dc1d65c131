"""Test-only torch models of the two DWPose networks, written from the architecture descriptions
(YOLOX's `yolox_l` = CSPDarknet + PAFPN + decoupled head, Megvii's export layout; RTMPose-L =
mmdet CSPNeXt P5 + mmpose RTMCCHead with a GAU block, from the product's nets/rtmpose.py), with the real module paths so an export
gets the real node names (`/backbone/backbone/stem/conv/conv/Conv`, `/head/gau/uv/MatMul`, ...).

`width` / `depth` shrink the channel / block counts (the real files: 1.0 / 1.0) so the tests stay
fast on a 2-core machine; the graph has the same operators and topology either way. Weights are
random and scaled so activations neither vanish nor saturate: the outputs must move when the input
moves, or a wrong operator could pass unnoticed.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
import torch.nn.functional as F

from comfyui_controlnet_core.preprocessors.nets.rtmpose import RTMCCBlock, RTMPose


# --------------------------------------------------------------------------- YOLOX (Megvii)


class BaseConv(nn.Module):
    def __init__(self, cin, cout, k, stride, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Focus(nn.Module):
    def __init__(self, cin, cout, k=1):
        super().__init__()
        self.conv = BaseConv(cin * 4, cout, k, 1)

    def forward(self, x):
        tl, tr = x[..., ::2, ::2], x[..., ::2, 1::2]
        bl, br = x[..., 1::2, ::2], x[..., 1::2, 1::2]
        return self.conv(torch.cat((tl, bl, tr, br), 1))


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, shortcut=True, expansion=0.5):
        super().__init__()
        hidden = int(cout * expansion)
        self.conv1 = BaseConv(cin, hidden, 1, 1)
        self.conv2 = BaseConv(hidden, cout, 3, 1)
        self.use_add = shortcut and cin == cout

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class CSPLayer(nn.Module):
    def __init__(self, cin, cout, n=1, shortcut=True, expansion=0.5):
        super().__init__()
        hidden = int(cout * expansion)
        self.conv1 = BaseConv(cin, hidden, 1, 1)
        self.conv2 = BaseConv(cin, hidden, 1, 1)
        self.conv3 = BaseConv(2 * hidden, cout, 1, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden, hidden, shortcut, 1.0) for _ in range(n)])

    def forward(self, x):
        return self.conv3(torch.cat((self.m(self.conv1(x)), self.conv2(x)), 1))


class SPPBottleneck(nn.Module):
    def __init__(self, cin, cout, ks=(5, 9, 13)):
        super().__init__()
        hidden = cin // 2
        self.conv1 = BaseConv(cin, hidden, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(k, 1, k // 2) for k in ks])
        self.conv2 = BaseConv(hidden * (len(ks) + 1), cout, 1, 1)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [m(x) for m in self.m], 1))


class CSPDarknet(nn.Module):
    def __init__(self, depth, width):
        super().__init__()
        c, d = int(width * 64), max(round(depth * 3), 1)
        self.stem = Focus(3, c, 3)
        self.dark2 = nn.Sequential(BaseConv(c, c * 2, 3, 2), CSPLayer(c * 2, c * 2, d))
        self.dark3 = nn.Sequential(BaseConv(c * 2, c * 4, 3, 2), CSPLayer(c * 4, c * 4, d * 3))
        self.dark4 = nn.Sequential(BaseConv(c * 4, c * 8, 3, 2), CSPLayer(c * 8, c * 8, d * 3))
        self.dark5 = nn.Sequential(BaseConv(c * 8, c * 16, 3, 2), SPPBottleneck(c * 16, c * 16),
                                   CSPLayer(c * 16, c * 16, d, shortcut=False))

    def forward(self, x):
        x = self.dark2(self.stem(x))
        d3 = self.dark3(x)
        d4 = self.dark4(d3)
        return d3, d4, self.dark5(d4)


class YOLOPAFPN(nn.Module):
    def __init__(self, depth, width):
        super().__init__()
        self.backbone = CSPDarknet(depth, width)
        c = [int(256 * width), int(512 * width), int(1024 * width)]
        n = round(3 * depth)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral_conv0 = BaseConv(c[2], c[1], 1, 1)
        self.C3_p4 = CSPLayer(2 * c[1], c[1], n, False)
        self.reduce_conv1 = BaseConv(c[1], c[0], 1, 1)
        self.C3_p3 = CSPLayer(2 * c[0], c[0], n, False)
        self.bu_conv2 = BaseConv(c[0], c[0], 3, 2)
        self.C3_n3 = CSPLayer(2 * c[0], c[1], n, False)
        self.bu_conv1 = BaseConv(c[1], c[1], 3, 2)
        self.C3_n4 = CSPLayer(2 * c[1], c[2], n, False)

    def forward(self, x):
        x2, x1, x0 = self.backbone(x)
        fpn_out0 = self.lateral_conv0(x0)
        f_out0 = self.C3_p4(torch.cat([self.upsample(fpn_out0), x1], 1))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.C3_p3(torch.cat([self.upsample(fpn_out1), x2], 1))
        pan_out1 = self.C3_n3(torch.cat([self.bu_conv2(pan_out2), fpn_out1], 1))
        pan_out0 = self.C3_n4(torch.cat([self.bu_conv1(pan_out1), fpn_out0], 1))
        return pan_out2, pan_out1, pan_out0


class YOLOXHead(nn.Module):
    def __init__(self, width, num_classes=80):
        super().__init__()
        hid = int(256 * width)
        ins = [int(256 * width), int(512 * width), int(1024 * width)]
        self.stems = nn.ModuleList([BaseConv(c, hid, 1, 1) for c in ins])
        self.cls_convs = nn.ModuleList([nn.Sequential(BaseConv(hid, hid, 3, 1), BaseConv(hid, hid, 3, 1)) for _ in ins])
        self.reg_convs = nn.ModuleList([nn.Sequential(BaseConv(hid, hid, 3, 1), BaseConv(hid, hid, 3, 1)) for _ in ins])
        self.cls_preds = nn.ModuleList([nn.Conv2d(hid, num_classes, 1) for _ in ins])
        self.reg_preds = nn.ModuleList([nn.Conv2d(hid, 4, 1) for _ in ins])
        self.obj_preds = nn.ModuleList([nn.Conv2d(hid, 1, 1) for _ in ins])

    def forward(self, feats):
        outs = []
        for k, x in enumerate(feats):
            x = self.stems[k](x)
            cls = self.cls_preds[k](self.cls_convs[k](x))
            reg_feat = self.reg_convs[k](x)
            reg, obj = self.reg_preds[k](reg_feat), self.obj_preds[k](reg_feat)
            outs.append(torch.cat([reg, obj.sigmoid(), cls.sigmoid()], 1))
        return torch.cat([o.flatten(start_dim=2) for o in outs], dim=2).permute(0, 2, 1)


class YOLOX(nn.Module):
    """yolox_l with depth=1.0, width=1.0; output (N, 8400, 85) raw (decode_in_inference=False)."""

    def __init__(self, depth=1.0, width=1.0):
        super().__init__()
        self.backbone = YOLOPAFPN(depth, width)
        self.head = YOLOXHead(width)

    def forward(self, x):
        return self.head(self.backbone(x))


# RTMPose (mmpose) is product code: preprocessors/nets/rtmpose.py (TorchScript pose files load into it)


# --------------------------------------------------------------------------- weights and files


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with a variance that keeps activations O(1) through the depth; BN statistics
    random too (they are folded into the convs at export, so they must not be identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.6 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, RTMCCBlock):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g))
                m.beta.copy_(torch.rand(m.beta.shape, generator=g))
    return model.eval()


def random_yolox(width=0.25, depth=0.33, seed=1) -> YOLOX:
    """A random YOLOX whose boxes are person-sized (box offsets and log-sizes near 0, i.e. boxes of
    about one stride cell... to a few) and whose scores spread around the 0.1 / 0.3 thresholds."""
    model = randomize(YOLOX(depth, width), seed)
    with torch.no_grad():
        for conv in model.head.reg_preds:
            conv.weight.mul_(0.03)
            conv.bias.copy_(torch.tensor([0.0, 0.0, 2.0, 2.5]))
        for conv in list(model.head.obj_preds) + list(model.head.cls_preds):
            conv.weight.mul_(0.06)
            conv.bias.fill_(-2.3)
    return model


def export_onnx(model: nn.Module, example: torch.Tensor, path, input_name: str, output_names: list[str],
                opset: int = 11) -> None:
    """torch.onnx.export with the TorchScript exporter (what mmdeploy and YOLOX's tools used),
    batch norm folded (eval mode + constant folding), a dynamic batch axis."""
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated: it is what made the real files
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=[input_name], output_names=output_names, opset_version=opset,
            do_constant_folding=True, dynamo=False,
            dynamic_axes={input_name: {0: "batch"}, **{o: {0: "batch"} for o in output_names}},
        )
