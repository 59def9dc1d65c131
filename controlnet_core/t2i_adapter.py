"""The T2I-Adapter (Mou et al. 2023, TencentARC): a small conv net that turns the hint image into
one feature map per UNet level.

The features depend on nothing but the hint (not the step, the latent or the text), so they are
computed once per run and image (`embed_hint`; `Control` caches it) and only scaled per step.
They are added on the UNet's *encoder* side, to the output of input blocks 2, 5, 8, 11 (SD1.x) or
3, 5, 8 and the middle block (SDXL), which is also the skip those blocks keep: the `input` slot of
ComfyUI's control dict, diffusers' `down_intrablock_additional_residuals`; not the decoder skips a
ControlNet feeds.

Three architectures (`AdapterConfig.kind`); module and parameter names are TencentARC's
(`ldm/modules/encoders/adapter.py`), so the original `.pth` files load without renaming (the
diffusers layout is converted in `formats/t2i_adapter.py`):

  full     SD1.x (`t2iadapter_{canny,sketch,depth,...}_sd14v1 / _sd15v2`): PixelUnshuffle(8),
           `conv_in` 3x3, then 4 levels of `num_res_blocks` ResBlocks (3x3, ReLU, 1x1, + x); levels
           1-3 begin with a 2x average pool, and with a 1x1 `in_conv` where the width changes
           (TencentARC's `Adapter(cin=64c, channels=[320,640,1280,1280], nums_rb=2, ksize=1,
           sk=True, use_conv=False)`; diffusers' `full_adapter`). Features at 1, 1/2, 1/4, 1/8 of
           the latent.
  full_xl  SDXL (`t2i-adapter-*-sdxl-1.0`): the same blocks after PixelUnshuffle(16), and only
           level 2 pools (diffusers' `full_adapter_xl`). Features at 1/2, 1/2, 1/4, 1/4.
  light    SD1.x (`t2iadapter_color_sd14v1`): PixelUnshuffle(8), then 4 levels of [2x pool (levels
           1-3), 1x1 `in_conv` to a quarter of the width, `num_res_blocks` light ResBlocks (3x3,
           ReLU, 3x3, + x), 1x1 `out_conv`] (TencentARC's `Adapter_light`; diffusers' `light_adapter`).

Sizes (one rule, ComfyUI's): the hint is resized to 8x the latent rounded up to a multiple of the
unshuffle factor (`hint_size`; only SDXL at odd latent sizes rounds), and a side of odd length
entering a 2x pool gets one zero cell of padding on each end that counts in the mean
(`downsample`). So every feature has the size of the UNet block it joins (ceil(h / 2**level)),
and an image of any size matches ComfyUI's built-in T2I-Adapter. diffusers pools with
`ceil_mode=True` instead: the same shapes, other values along the border at odd sizes; at latent
sizes divisible by 8 (SD1.x) or 4 (SDXL) the two rules agree exactly.

A 1-channel adapter (canny, sketch) given an RGB hint reads the mean of its channels, as ComfyUI
does. On CUDA the adapter needs no fast path of its own: its per-step cost is scaling cached
features (`fast_path_net` is None, so the CUDA runner steps aside for stacks holding one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEVELS, AdapterConfig
from .errors import InputError
from .formats import t2i_adapter as fmt
from .formats.detect import Detected
from .formats.source import Source, StateDict, assign_weights
from .layers import DEFAULT_OPS, ComputeDtype

# A1111's "My prompt is more important" for T2I-Adapters (sd-webui-controlnet hook.py), also
# ComfyUI-Advanced-ControlNet's T2I soft weights: one factor per feature, shallowest first.
SOFT_WEIGHTS = (0.25, 0.62, 0.825, 1.0)


def downsample(x: torch.Tensor) -> torch.Tensor:
    """2x average pool; an odd side gets one zero of padding on each end, counted in the mean
    (ComfyUI's `Downsample`: `AvgPool2d(2, 2)` with `padding = (h % 2, w % 2)`)."""
    return F.avg_pool2d(x, 2, 2, padding=(x.shape[-2] % 2, x.shape[-1] % 2))


class _ResBlock(nn.Module):
    """TencentARC `ResnetBlock(sk=True, ksize=1, use_conv=False)`: [pool] [1x1 in_conv] then
    x + block2(relu(block1(x)))."""

    def __init__(self, c_in: int, c_out: int, down: bool, ops: Any, **kw: Any):
        super().__init__()
        self.down = down
        self.in_conv = ops.Conv2d(c_in, c_out, 1, **kw) if c_in != c_out else None
        self.block1 = ops.Conv2d(c_out, c_out, 3, padding=1, **kw)
        self.block2 = ops.Conv2d(c_out, c_out, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(F.relu(self.block1(x)))


class _LightResBlock(nn.Module):
    def __init__(self, c: int, ops: Any, **kw: Any):
        super().__init__()
        self.block1 = ops.Conv2d(c, c, 3, padding=1, **kw)
        self.block2 = ops.Conv2d(c, c, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class _LightLevel(nn.Module):
    """TencentARC `extractor`: [pool] 1x1 in_conv -> light ResBlocks -> 1x1 out_conv."""

    def __init__(self, c_in: int, c_out: int, n: int, down: bool, ops: Any, **kw: Any):
        super().__init__()
        inter = c_out // 4
        self.down = down
        self.in_conv = ops.Conv2d(c_in, inter, 1, **kw)
        self.body = nn.Sequential(*(_LightResBlock(inter, ops, **kw) for _ in range(n)))
        self.out_conv = ops.Conv2d(inter, c_out, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = downsample(x)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapter(ComputeDtype, nn.Module):
    """A T2I-Adapter of any kind; implements `control.ControlModel`."""

    family = "T2I-Adapter"
    hint_channels = 3          # ComfyUI IMAGEs are RGB; a 1-channel adapter averages them
    context_dim = None         # reads no text: hosts check `host_archs`
    adm_channels = None
    fast_path_net = None  # cached features are its fast path (see the module docstring)
    supports_global_pool = False  # pooling is a trait of ControlNet 1.1 shuffle models only
    soft_weights = SOFT_WEIGHTS

    def __init__(self, config: AdapterConfig, ops: Any = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        ops = DEFAULT_OPS if ops is None else ops
        kw = {"device": device, "dtype": dtype}
        self.config = cfg = config
        c, n = cfg.channels, cfg.num_res_blocks
        c_in = cfg.in_channels * cfg.unshuffle ** 2
        if cfg.kind == "light":
            self.conv_in = None
            self.body = nn.ModuleList(
                _LightLevel(c_in if i == 0 else c[i - 1], c[i], n, i in cfg.pooled_levels, ops, **kw)
                for i in range(LEVELS)
            )
        else:
            self.conv_in = ops.Conv2d(c_in, c[0], 3, padding=1, **kw)
            self.body = nn.ModuleList(
                _ResBlock(c[i - 1] if (i and j == 0) else c[i], c[i], i in cfg.pooled_levels and j == 0, ops, **kw)
                for i in range(LEVELS) for j in range(n)
            )

    # ---- what the runtime reads (control.ControlModel) --------------------------------------

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def host_archs(self) -> tuple[str, ...]:
        """SDXL adapters fit SDXL. SD1.x adapters also fit SD2.x: its UNet has the same block widths
        and sizes, and ComfyUI runs them there (they were trained on SD1.x, so expect weaker control)."""
        return ("sdxl",) if self.config.xl else ("sd15", "sd21")

    @property
    def host_layout(self) -> tuple:
        return self.config.host_layout

    @property
    def storage_dtype(self) -> torch.dtype:
        return self._first_conv().weight.dtype

    @property
    def device(self) -> torch.device:
        return self._first_conv().weight.device

    def _first_conv(self) -> nn.Module:
        return self.body[0].in_conv if self.conv_in is None else self.conv_in

    def hint_size(self, h: int, w: int) -> tuple[int, int]:
        f = self.config.unshuffle
        return math.ceil(8 * h / f) * f, math.ceil(8 * w / f) * f

    def output_levels(self) -> list[int]:
        """Level of each feature in counting order (input slot, then middle): SD1.x 0..3; SDXL's
        join blocks 3 and 5 (level 1), block 8 and the middle (level 2)."""
        return [1, 1, 2, 2] if self.config.xl else [0, 1, 2, 3]

    def embed_hint(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """The four features of a (B, C, H, W) hint in [0, 1], shallowest first; H, W multiples of
        the unshuffle factor (`hint_size` gives them)."""
        cfg = self.config
        if hint.ndim != 4:
            raise InputError(f"the {self.family} takes a (batch, channels, H, W) hint; got {tuple(hint.shape)}")
        c = hint.shape[1]
        if c != cfg.in_channels:
            if not (cfg.in_channels == 1 and c == 3):
                raise InputError(
                    f"this {cfg.arch} {self.family} reads {_channels(cfg.in_channels)} hints, but the hint has {c} "
                    "channels; give it an RGB image"
                )
            hint = hint.float().mean(dim=1, keepdim=True)  # ComfyUI: mean over RGB, in fp32
        f = cfg.unshuffle
        if hint.shape[-2] % f or hint.shape[-1] % f:
            raise InputError(
                f"the {self.family}'s hint must be a multiple of {f} pixels on each side; got "
                f"{hint.shape[-2]}x{hint.shape[-1]} (hint_size(h, w) gives the size for a latent)"
            )
        return self.features(hint.to(device=self.device, dtype=self.dtype))

    def features(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """The network itself: the feature after each level, shallowest first."""
        cfg = self.config
        x = F.pixel_unshuffle(hint, cfg.unshuffle)
        out = []
        if self.conv_in is None:
            for level in self.body:
                x = level(x)
                out.append(x)
            return out
        x = self.conv_in(x)
        n = cfg.num_res_blocks
        for i in range(LEVELS):
            for block in self.body[i * n:(i + 1) * n]:
                x = block(x)
            out.append(x)
        return out

    def control_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        y: torch.Tensor | None, embedding: list[torch.Tensor]) -> dict[str, list]:
        f = list(embedding)
        if self.config.xl:  # SDXL UNet: 9 input blocks; the deepest feature goes after the middle block
            return {"input": [None, None, None, f[0], None, f[1], None, None, f[2]], "middle": [f[3]]}
        inputs: list = [None] * (3 * LEVELS)
        for i, feat in enumerate(f):
            inputs[3 * i + 2] = feat  # the last block of each level (2, 5, 8, 11)
        return {"input": inputs}


def _channels(n: int) -> str:
    return "1-channel (gray)" if n == 1 else f"{n}-channel (RGB)" if n == 3 else f"{n}-channel"


# ------------------------------------------------------------------------------------------------
# the family's entry points (`loader.FAMILY_LOADERS`)

def load(source: Source, device: Any, dtype: torch.dtype, ops: Any, config: AdapterConfig | None) -> T2IAdapter:
    """A T2I-Adapter in the TencentARC or diffusers layout (formats/t2i_adapter.py)."""
    name = source.name
    sd = fmt.to_native(source.sd, source.detected.layout, name)
    cfg = config if config is not None else fmt.infer_config(sd, name, source.config_json)
    model = T2IAdapter(cfg, ops=ops, device="meta", dtype=dtype)
    return assign_weights(model, sd, name, f"a {cfg.kind} {cfg.arch} T2I-Adapter")


def arch(header: StateDict, found: Detected) -> str:
    return fmt.arch(header, found.layout)
