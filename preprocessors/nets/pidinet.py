"""PiDiNet soft edges (Su et al. 2021, "table 5" model), file `table5_pidinet.pth`.

The checkpoint is `{'state_dict': {'module.<name>': tensor}}` of the *pixel-difference* network
(config "carv4": the 3x3 kernels of layer i are central (cd), angular (ad), radial (rd) or vanilla
(cv) difference convolutions, cycling cd, ad, rd, cv over the init block and 15 blocks). Every
difference convolution is a plain convolution with a rearranged kernel, so we convert the kernels
once at load and run vanilla convs (the paper's "converted" form; exact, fewer ops):
  cd: y = conv(x, w) - conv(x, sum(w)) -> w with its centre tap reduced by sum(w);
  ad: w - w[clockwise neighbour]      -> one 3x3 kernel;
  rd: the 8 outer taps on the 5x5 ring (+w) and the inner ring (-w), padding 2 -> one 5x5 kernel.
Then 4 side branches (CDCM dilated convs, CSAM spatial attention, 1x1 reduce), each upsampled
(bilinear) to the input size, and a 1x1 classifier over the four; the detector uses the sigmoid of
the classifier. Input: BGR in [0, 1] (Aux flips ComfyUI's RGB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import pad64, safe_step, to_uint8, uint8_to_float
from .edges import build, rgb_tensor, scribble_strokes, truncate_u8
from .files import read_state_dict
from .host import Net

FILE_NAME = "table5_pidinet.pth"
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
INPLANE = 60
DIL = 24
# carv4: the op of the init block (layer 0) and of blocks 1_1 .. 4_4 (layers 1-15)
OPS = ("cd", "ad", "rd", "cv") * 4
# (name, in, out, stride) of the 15 blocks after the init block
BLOCKS = (
    [("block1_1", 60, 60, 1), ("block1_2", 60, 60, 1), ("block1_3", 60, 60, 1)]
    + [("block2_1", 60, 120, 2)] + [(f"block2_{i}", 120, 120, 1) for i in (2, 3, 4)]
    + [("block3_1", 120, 240, 2)] + [(f"block3_{i}", 240, 240, 1) for i in (2, 3, 4)]
    + [("block4_1", 240, 240, 2)] + [(f"block4_{i}", 240, 240, 1) for i in (2, 3, 4)]
)
SIDE_WIDTHS = (60, 120, 240, 240)  # channels of the four stages the side branches read


def convert_kernel(w: torch.Tensor, op: str) -> torch.Tensor:
    """The vanilla kernel equal to the pixel-difference conv `op` with 3x3 kernel `w` (O, I, 3, 3)."""
    if op == "cv":
        return w
    o, i = w.shape[:2]
    flat = w.reshape(o, i, 9)
    if op == "cd":
        out = flat.clone()
        out[:, :, 4] -= flat.sum(dim=2)
        return out.reshape(o, i, 3, 3)
    if op == "ad":
        return (flat - flat[:, :, [3, 0, 1, 6, 4, 2, 7, 8, 5]]).reshape(o, i, 3, 3)
    if op == "rd":
        out = w.new_zeros(o, i, 25)
        out[:, :, [0, 2, 4, 10, 14, 20, 22, 24]] = flat[:, :, 1:]
        out[:, :, [6, 7, 8, 11, 13, 16, 17, 18]] = -flat[:, :, 1:]
        return out.reshape(o, i, 5, 5)
    raise ValueError(op)


def _kernel(op: str) -> tuple[int, int]:
    return (5, 2) if op == "rd" else (3, 1)


class PDCBlock(nn.Module):
    """Depthwise (converted) difference conv -> ReLU -> 1x1, plus the input (max-pooled and 1x1-projected
    when the block halves the resolution)."""

    def __init__(self, op: str, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        k, pad = _kernel(op)
        if stride > 1:
            self.shortcut = nn.Conv2d(c_in, c_out, 1)
        self.conv1 = nn.Conv2d(c_in, c_in, k, padding=pad, groups=c_in, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, 2, 2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class CDCM(nn.Module):
    """ReLU, 1x1 to `c_out`, then the sum of four dilated 3x3 convs (dilation 5, 7, 9, 11)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 1)
        for j, d in enumerate((5, 7, 9, 11), 1):
            self.add_module(f"conv2_{j}", nn.Conv2d(c_out, c_out, 3, dilation=d, padding=d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class CSAM(nn.Module):
    """Spatial attention: x * sigmoid(3x3(1x1(relu(x))))."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """The converted (vanilla-conv) PiDiNet; parameter names are the checkpoint's (less `module.`)."""

    def __init__(self):
        super().__init__()
        k, pad = _kernel(OPS[0])
        self.init_block = nn.Conv2d(3, INPLANE, k, padding=pad, bias=False)
        for (name, c_in, c_out, stride), op in zip(BLOCKS, OPS[1:]):
            self.add_module(name, PDCBlock(op, c_in, c_out, stride))
        self.dilations = nn.ModuleList(CDCM(c, DIL) for c in SIDE_WIDTHS)
        self.attentions = nn.ModuleList(CSAM(DIL) for _ in SIDE_WIDTHS)
        self.conv_reduces = nn.ModuleList(MapReduce(DIL) for _ in SIDE_WIDTHS)
        self.classifier = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) BGR in [0, 1] -> the edge probability (B, 1, H, W)."""
        h, w = x.shape[2:]
        x = self.init_block(x)
        stages = []
        for i, (name, *_rest) in enumerate(BLOCKS):
            x = getattr(self, name)(x)
            if i in (2, 6, 10, 14):  # the last block of each stage
                stages.append(x)
        sides = [
            F.interpolate(red(att(dil(s))), (h, w), mode="bilinear", align_corners=False)
            for s, dil, att, red in zip(stages, self.dilations, self.attentions, self.conv_reduces)
        ]
        return torch.sigmoid(self.classifier(torch.cat(sides, dim=1)))


def _difference_kernels() -> dict[str, str]:
    """Checkpoint key of every difference-conv kernel -> its op (the vanilla `cv` ones are left out)."""
    keys = {"init_block.weight": OPS[0]}
    for (name, *_rest), op in zip(BLOCKS, OPS[1:]):
        keys[f"{name}.conv1.weight"] = op
    return {k: op for k, op in keys.items() if op != "cv"}


def load(path: Path) -> PiDiNet:
    """The converted network of `table5_pidinet.pth` (`{'state_dict': {'module.*': ...}}`, unwrapped by
    read_state_dict); the difference-conv kernels are turned into plain ones here."""
    sd = dict(read_state_dict(path))
    for key, op in _difference_kernels().items():
        w = sd.get(key)
        if isinstance(w, torch.Tensor) and w.ndim == 4 and tuple(w.shape[2:]) == (3, 3):
            sd[key] = convert_kernel(w, op)
    return build(PiDiNet, sd, path=path, what="PiDiNet (table5, carv4)")


def edge_map(model: Net, img_u8: np.ndarray, safe: bool) -> np.ndarray:
    """The uint8 PiDiNet map (h, w) of a uint8 RGB image (h, w, 3): padded to 64, BGR / 255 in, cropped."""
    padded, (h, w) = pad64(img_u8)
    dev = model.device()
    with torch.inference_mode():
        edge = model.module(rgb_tensor(padded[:, :, ::-1], dev) / 255.0)[0, 0].float().cpu().numpy()
    if safe:
        edge = safe_step(edge)
    return truncate_u8(edge)[:h, :w]


def softedge_pidinet(frame: np.ndarray, *, model: Net, safe: bool) -> np.ndarray:
    """The method: float RGB (h, w, 3) in [0, 1] -> PiDiNet soft edges (h, w) in [0, 1]."""
    return uint8_to_float(edge_map(model, to_uint8(frame), safe))


def scribble_pidinet(frame: np.ndarray, *, model: Net, safe: bool) -> np.ndarray:
    """The method: Aux's Scribble_PiDiNet strokes, (h, w) 0 / 1. Aux draws the strokes twice: inside its
    detector on the padded map, then once more in the node on the cropped result (wider, smoother
    strokes); so do we, in that order (the blurs see the padding the first time only)."""
    padded, (h, w) = pad64(to_uint8(frame))
    once = scribble_strokes(edge_map(model, padded, safe))[:h, :w]
    return uint8_to_float(scribble_strokes(np.ascontiguousarray(once)))
