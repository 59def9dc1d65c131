"""Depth Anything V2 (and V1): a DINOv2 ViT encoder and a DPT head, relative depth from one image.

Architecture and weight names as the authors' release (DepthAnything/Depth-Anything-V2 `dpt.py`,
`dinov2.py`; the same module Aux runs), so `depth_anything_v2_vit{s,b,l,g}.pth`, V1's
`depth_anything_vit{s,b,l}14.pth` and kijai's ComfyUI-DepthAnythingV2 `.safetensors` load as they are:

* `pretrained.*`: ViT, patch 14, a position embedding for 37x37 patches (518 px) resized bicubically
  to the image (the authors' rule: scale factor (n + 0.1) / 37, not a target size), LayerScale,
  fused `attn.qkv`; MLP blocks, SwiGLU for ViT-g (`mlp.w12`, `mlp.w3`).
* `depth_head.*`: the tokens of four blocks (V2: blocks [2, 5, 8, 11] (S, B), [4, 11, 17, 23] (L),
  [9, 19, 29, 39] (G); V1: the last four), each after the final LayerNorm, projected (1x1), resized
  (x4, x2, x1, /2), fused coarse to fine (RefineNet blocks, bilinear align_corners), two output
  convolutions, ReLU.
The size (S/B/L/G) is read from the tensor shapes; V1 or V2 from the file name (their layouts are
the same, only the tapped blocks differ).

Pipeline (Aux's `DepthAnythingV2Detector`, node default `max_depth=1`): the full-size RGB image
in [0, 1], resized with cv2 bicubic so its short side is 518 and both sides are multiples of 14,
ImageNet normalisation, the network, the depth bilinearly (align_corners) back to the image size,
min-max to 0..255 and truncated to uint8. So the method works at the input size (`native_size`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PreprocessorError
from .common import to_uint8, uint8_to_float
from .files import load_into, read_state_dict
from .host import Net

INPUT_SIZE = 518
PATCH = 14
BASE_PATCHES = 37  # 518 / 14: the grid the position embedding was trained for
# The widest image handled: tokens grow with the long side at short side 518 (attention with them).
MAX_ASPECT = 4.0
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])

# encoder width -> (name, blocks tapped by V2); the depth (number of blocks) is read from the file
ENCODERS = {384: ("vits", [2, 5, 8, 11]), 768: ("vitb", [2, 5, 8, 11]),
            1024: ("vitl", [4, 11, 17, 23]), 1536: ("vitg", [9, 19, 29, 39])}
HEAD_DIM = 64  # every DINOv2 size has 64-wide heads

SOURCES = {
    "vits": "https://huggingface.co/depth-anything/Depth-Anything-V2-Small",
    "vitb": "https://huggingface.co/depth-anything/Depth-Anything-V2-Base",
    "vitl": "https://huggingface.co/depth-anything/Depth-Anything-V2-Large",
    "vitg": "https://huggingface.co/depth-anything/Depth-Anything-V2-Giant",
    "v1": "https://huggingface.co/spaces/LiheYoung/Depth-Anything (checkpoints/)",
    "kijai": "https://huggingface.co/Kijai/DepthAnythingV2-safetensors",
}
# the `depth_model` choices -> accepted files, preferred first
MODELS: dict[str, tuple[str, ...]] = {
    "v2_vitl": ("depth_anything_v2_vitl.pth", "depth_anything_v2_vitl_fp32.safetensors",
                "depth_anything_v2_vitl_fp16.safetensors"),
    "v2_vitb": ("depth_anything_v2_vitb.pth", "depth_anything_v2_vitb_fp32.safetensors",
                "depth_anything_v2_vitb_fp16.safetensors"),
    "v2_vits": ("depth_anything_v2_vits.pth", "depth_anything_v2_vits_fp32.safetensors",
                "depth_anything_v2_vits_fp16.safetensors"),
    "v2_vitg": ("depth_anything_v2_vitg.pth",),
    "v1_vitl": ("depth_anything_vitl14.pth",),
    "v1_vitb": ("depth_anything_vitb14.pth",),
    "v1_vits": ("depth_anything_vits14.pth",),
}


def source_of(model: str) -> str:
    version, size = model.split("_")
    if version == "v1":
        return SOURCES["v1"]
    kijai = f" (or the .safetensors of {SOURCES['kijai']})" if size != "vitg" else ""
    return SOURCES[size] + kijai


# ------------------------------------------------------------------------------------------
# the network


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, memory-efficient kernels
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8  # DINOv2's SwiGLUFFNFused width
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, dim: int, swiglu: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim) if swiglu else Mlp(dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    def __init__(self, dim: int, depth: int, swiglu: bool):
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, BASE_PATCHES * BASE_PATCHES + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # training only; in the files
        self.blocks = nn.ModuleList(Block(dim, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.pos_embed
        if gh == gw == BASE_PATCHES:
            return pos
        cls, grid = pos[:, :1], pos[:, 1:].float()
        dim = grid.shape[-1]
        grid = grid.reshape(1, BASE_PATCHES, BASE_PATCHES, dim).permute(0, 3, 1, 2)
        # The authors' rule (and so the trained model's): a scale factor of (n + 0.1) / 37, which
        # samples the table at other points than a plain resize to n would.
        scale = ((gh + 0.1) / BASE_PATCHES, (gw + 0.1) / BASE_PATCHES)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos.dtype)
        return torch.cat([cls, grid], dim=1)

    def forward(self, x: torch.Tensor, taps: list[int]) -> list[torch.Tensor]:
        gh, gw = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding(gh, gw)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in taps:
                out.append(self.norm(x)[:, 1:])
        return out


class ResidualConvUnit(nn.Module):
    def __init__(self, f: int):
        super().__init__()
        self.conv1 = nn.Conv2d(f, f, 3, padding=1)
        self.conv2 = nn.Conv2d(f, f, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    def __init__(self, f: int):
        super().__init__()
        self.out_conv = nn.Conv2d(f, f, 1)
        self.resConfUnit1 = ResidualConvUnit(f)  # unused by the deepest block, but in the files
        self.resConfUnit2 = ResidualConvUnit(f)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int] | None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    def __init__(self, dim: int, features: int, out_channels: list[int]):
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in out_channels)
        c = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], 4, 4), nn.ConvTranspose2d(c[1], c[1], 2, 2), nn.Identity(),
            nn.Conv2d(c[3], c[3], 3, 2, 1),
        ])
        s = self.scratch = nn.Module()
        for i, ch in enumerate(out_channels, 1):
            setattr(s, f"layer{i}_rn", nn.Conv2d(ch, features, 3, padding=1, bias=False))
            setattr(s, f"refinenet{i}", FusionBlock(features))
        s.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        s.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU(), nn.Identity(),
        )

    def forward(self, tokens: list[torch.Tensor], gh: int, gw: int) -> torch.Tensor:
        s = self.scratch
        layers = []
        for i, x in enumerate(tokens):
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], gh, gw)
            x = self.resize_layers[i](self.projects[i](x))
            layers.append(getattr(s, f"layer{i + 1}_rn")(x))
        l1, l2, l3, l4 = layers
        p = s.refinenet4(l4, None, l3.shape[2:])
        p = s.refinenet3(p, l3, l2.shape[2:])
        p = s.refinenet2(p, l2, l1.shape[2:])
        p = s.refinenet1(p, l1, None)
        p = F.interpolate(s.output_conv1(p), (gh * PATCH, gw * PATCH), mode="bilinear", align_corners=True)
        return s.output_conv2(p)


class DepthAnything(nn.Module):
    """`forward(x (B, 3, 14m, 14n) normalised) -> (B, 14m, 14n)` relative depth (larger = nearer)."""

    def __init__(self, dim: int = 1024, depth: int = 24, features: int = 256,
                 out_channels: tuple[int, ...] = (256, 512, 1024, 1024), version: int = 2, swiglu: bool = False):
        super().__init__()
        if dim not in ENCODERS:
            raise ValueError(f"no Depth Anything encoder of width {dim}")
        self.version = version
        self.taps = ENCODERS[dim][1] if version == 2 else list(range(depth - 4, depth))
        self.pretrained = DINOv2(dim, depth, swiglu)
        self.depth_head = DPTHead(dim, features, list(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gh, gw = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        return self.depth_head(self.pretrained(x, self.taps), gh, gw).squeeze(1)


# ------------------------------------------------------------------------------------------
# loading


def config_of(sd: dict, name: str) -> dict:
    """The constructor arguments that fit a state dict (sizes from the shapes, V1/V2 from the name)."""
    what = "Depth Anything"
    if "pretrained.cls_token" not in sd or "depth_head.scratch.layer1_rn.weight" not in sd:
        raise PreprocessorError(
            f"{name} is not a {what} weights file (no 'pretrained.cls_token' / 'depth_head.*' weights); it is "
            "probably another model's file under this name: get the right file again"
        )
    dim = int(sd["pretrained.cls_token"].shape[-1])
    if dim not in ENCODERS:
        raise PreprocessorError(f"{name}: a {what} encoder of width {dim} is not one of ViT-S/B/L/G (384/768/1024/1536)")
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("pretrained.blocks."))
    out_channels = tuple(int(sd[f"depth_head.projects.{i}.weight"].shape[0]) for i in range(4))
    features = int(sd["depth_head.scratch.layer1_rn.weight"].shape[0])
    lower = name.lower()
    version = 1 if ("depth_anything_vit" in lower or "depth-anything-v1" in lower) and "v2" not in lower else 2
    return {"dim": dim, "depth": depth, "features": features, "out_channels": out_channels, "version": version,
            "swiglu": "pretrained.blocks.0.mlp.w12.weight" in sd}


def load(path: Path) -> DepthAnything:
    """The network of a Depth Anything weights file (original .pth or ComfyUI-DepthAnythingV2 .safetensors)."""
    sd = read_state_dict(path)
    net = DepthAnything(**config_of(sd, Path(path).name))
    load_into(net, sd, path=path, what="Depth Anything")
    return net


# ------------------------------------------------------------------------------------------
# the method


def net_input_size(h: int, w: int) -> tuple[int, int]:
    """(height, width) the network sees: Aux's Resize(518, keep aspect, lower bound, multiple of 14)."""
    scale = max(INPUT_SIZE / h, INPUT_SIZE / w)

    def fit(x: float) -> int:
        y = int(np.round(x / PATCH) * PATCH)
        return y if y >= INPUT_SIZE else int(math.ceil(x / PATCH) * PATCH)

    return fit(scale * h), fit(scale * w)


def prepare(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> the normalised (1, 3, h, w) float32 input, as Aux makes it."""
    from .._cv import cv2

    h, w = rgb.shape[:2]
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise PreprocessorError(
            f"depth_anything_v2: the image is {w}x{h}, more than {MAX_ASPECT:g} times wider than high (or the other way "
            "round); the network would need too much memory for it: crop it first"
        )
    nh, nw = net_input_size(h, w)
    # float32 where Aux has float64: half the memory and time on large images; the difference
    # (~1e-7 relative) is far below what the uint8 output can show
    x = cv2().resize(rgb.astype(np.float32) / np.float32(255.0), (nw, nh), interpolation=cv2().INTER_CUBIC)
    x = (x - MEAN.astype(np.float32)) / STD.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def depth_to_uint8(depth: np.ndarray) -> np.ndarray:
    """Aux's min-max to 0..255, truncated to uint8; a flat depth (all equal) is black, not NaN."""
    lo, hi = depth.min(), depth.max()  # float32 scalars: the same rounding as Aux's expression
    if not hi > lo:
        return np.zeros(depth.shape, np.uint8)
    return ((depth - lo) / (hi - lo) * 255.0).astype(np.uint8)


def depth_map(frame: np.ndarray, model: Net, **_params) -> np.ndarray:
    """The method: float RGB (H, W, 3) in [0, 1] -> depth hint (H, W) in [0, 1], nearer brighter."""
    rgb = to_uint8(frame)
    h, w = rgb.shape[:2]
    x = prepare(rgb)
    dev = model.device()
    with torch.inference_mode():
        d = model.module(x.to(dev))
        d = F.interpolate(d[:, None], (h, w), mode="bilinear", align_corners=True)[0, 0]
        d = d.float().cpu().numpy()
    return uint8_to_float(depth_to_uint8(d))
