"""ControlNeXt (Peng et al. 2024, dvlab-research/ControlNeXt): a small conv module that reads only the
hint and the timestep, and adds its output at ONE point of the frozen UNet by cross normalisation.

The module (key layouts: `formats/controlnext.py`) maps a (B, 3, H, W) hint in [0, 1] and the
timestep to a map c. At its point of the UNet, with h the host's feature there, per sample b and
with mean / std (unbiased, N-1) one scalar each over (C, H, W), the reference code computes

    c_hat = (c - mean(c_b)) * std(h_b) / (std(c_b) + eps) + mean(h_b)
    h'    = h + s * c_hat

(ControlNeXt-SDXL/models/unet.py L1205-1212, ControlNeXt-SD1.5/models/unet.py L1271-1278,
ControlNeXt-SD1.5-Training/models/unet.py L1236-1244). The paper's text describes another
normalisation (the main branch's statistics applied to a standardised control, no shift); we
follow the code, which the released weights were trained with. Per variant:

    variant   module                 point (host.py FEATURE)                 pool / cast order        s
    SDXL      stem layout, 320 ch    after conv_in, skip kept: ("input", 0)   cast, normalise, pool    strength
    SD1.5 v2  stem layout, 320 ch    after down_blocks[0] + its downsampler,  pool, cast, normalise    strength
                                     skips kept: ("input", 3)
    SD1.5 v1  v1 layout, 1280 ch     after the middle block: ("middle", 0)    pool, cast, normalise    scale * strength

eps = 1e-12 in all three; `pool` is `adaptive_avg_pool2d` to the feature's size (an identity for SDXL,
whose map is already the latent's size); the cast is to the host's dtype, so the statistics are in
the host's precision as in the reference. v1's `scale` is the file's learned scalar: at strength 1
the result is the authors'. SDXL and SD1.5-v2 files are identical in keys and shapes: `bind_host`
(at the start of every run) picks the variant from the host UNet (SDXL has the `label_emb` vector
input, SD1.5 has none) and checks its width, so a module for another base model fails there in a
sentence.

fp16 guard: in half precision 1e-12 rounds to 0, so a constant control map (std 0) would give
0 * inf = NaN where fp32 gives mean(h). Where std(h) / (std(c) + eps) is not finite, the ratio is taken
as 0 (c_hat = mean(h), the fp32 limit); finite ratios, so every fp32 case, are untouched.

Stacking: the term sees the feature with the residuals of that point already added (a classic
ControlNet's middle residual before a v1 module, a T2I-Adapter's input feature before SDXL's), as
ComfyUI's UNet orders them; controls at one point apply oldest first.

Cost: the module sees only the hint and t, so it runs once per model call for all rows that share
a hint (a CFG batch with one hint: once, not twice), and the SDXL stem (`embedding`, no t) once per
run (`embed_hint`, cached by `control.Control`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, LoadError
from .formats import controlnext as fmt
from .formats.detect import Detected
from .formats.source import Source, StateDict, assign_weights
from .host import FEATURE, HostWeights, Outputs
from .layers import DEFAULT_OPS, ComputeDtype, timestep_embedding

EPS = 1e-12  # all three image variants (SVD uses 1e-5; not supported)
TIME_DIM, TIME_EMBED_DIM = 128, 256


@dataclass(frozen=True)
class Variant:
    """Where and how one ControlNeXt variant adds to the host (module docstring)."""

    name: str                 # "SDXL", "SD1.5 v2", "SD1.5 v1"
    arch: str                 # the host it is for
    block: tuple[str, int]    # host.py feature point
    level: int                # resolution level of that point (0 = the latent's)
    pool_first: bool          # pool to the feature's size before the cast and the statistics


SDXL = Variant("SDXL", "sdxl", ("input", 0), 0, False)
SD15_V2 = Variant("SD1.5 v2", "sd15", ("input", 3), 1, True)
SD15_V1 = Variant("SD1.5 v1", "sd15", ("middle", 0), 3, True)


def cross_normalize(h: torch.Tensor, c: torch.Tensor, pool_first: bool, eps: float = EPS) -> torch.Tensor:
    """c_hat for the host feature h (B, C, h, w) and the control map c (1 or B, C, hc, wc), in h's dtype."""
    if pool_first and tuple(c.shape[-2:]) != tuple(h.shape[-2:]):
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    c = c.to(h)
    dims = (1, 2, 3)
    mean_h, std_h = h.mean(dim=dims, keepdim=True), h.std(dim=dims, keepdim=True)
    mean_c, std_c = c.mean(dim=dims, keepdim=True), c.std(dim=dims, keepdim=True)
    ratio = std_h / (std_c + eps)
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))  # fp16 guard (docstring)
    out = (c - mean_c) * ratio + mean_h
    if not pool_first and tuple(out.shape[-2:]) != tuple(h.shape[-2:]):
        out = F.adaptive_avg_pool2d(out, h.shape[-2:])
    return out


class ResnetBlock(nn.Module):
    """diffusers' `ResnetBlock2D` with its defaults (eps 1e-6, SiLU, temb added after conv1, 1x1
    `conv_shortcut` when the width changes), the block the reference module is made of; its key names."""

    def __init__(self, cin: int, cout: int, groups: int, ops: Any, **kw: Any):
        super().__init__()
        self.norm1 = ops.GroupNorm(groups, cin, eps=1e-6, **kw)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1, **kw)
        self.time_emb_proj = ops.Linear(TIME_EMBED_DIM, cout, **kw)
        self.norm2 = ops.GroupNorm(groups, cout, eps=1e-6, **kw)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1, **kw)
        self.conv_shortcut = ops.Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """diffusers' `Downsample2D(use_conv=True, padding=1)`: a stride-2 3x3 conv named `conv`."""

    def __init__(self, ch: int, ops: Any, **kw: Any):
        super().__init__()
        self.conv = ops.Conv2d(ch, ch, 3, stride=2, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TimeEmbedding(nn.Module):
    """diffusers' `TimestepEmbedding(128, 256)`: linear_1 -> SiLU -> linear_2."""

    def __init__(self, ops: Any, **kw: Any):
        super().__init__()
        self.linear_1 = ops.Linear(TIME_DIM, TIME_EMBED_DIM, **kw)
        self.linear_2 = ops.Linear(TIME_EMBED_DIM, TIME_EMBED_DIM, **kw)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_emb)))


class ControlNeXt(ComputeDtype, nn.Module):
    """One ControlNeXt module (either layout; the file's key names); implements `control.ControlModel`."""

    family = "ControlNeXt"
    hint_channels = 3
    context_dim = None  # reads no text and no `y`
    adm_channels = None
    fast_path_net = None
    supports_global_pool = False  # one map re-standardised to the host: pooling it has no meaning
    host_layout = None  # fits the host it is bound to at pre_run (bind_host checks the width)

    def __init__(self, spec: fmt.ModuleSpec, ops: Any = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        ops = DEFAULT_OPS if ops is None else ops
        kw = {"device": device, "dtype": dtype}
        self.spec = spec
        self.time_embedding = TimeEmbedding(ops, **kw)
        if spec.layout == fmt.STEM:
            self.embedding = nn.Sequential(
                ops.Conv2d(3, 64, 3, stride=2, padding=1, **kw), ops.GroupNorm(2, 64, **kw), nn.ReLU(),
                ops.Conv2d(64, 64, 3, padding=1, **kw), ops.GroupNorm(2, 64, **kw), nn.ReLU(),
                ops.Conv2d(64, 128, 3, padding=1, **kw), ops.GroupNorm(2, 128, **kw), nn.ReLU(),
            )
            stages, last = fmt.STEM_RES, 256
            mid = nn.Sequential(  # GroupNorm's default eps 1e-5, as the reference's nn.GroupNorm
                ops.Conv2d(last, last, 3, padding=1, **kw), nn.ReLU(), ops.GroupNorm(8, last, **kw),
                ops.Conv2d(last, last, 3, padding=1, **kw), ops.GroupNorm(8, last, **kw),
            )
            self.variants = (SDXL, SD15_V2)
            self.scale = None
        else:
            self.embedding = None
            stages, last = fmt.V1_RES, 256
            mid = nn.Sequential(ops.Conv2d(last, last, 3, padding=1, **kw), nn.ReLU(),
                                ops.Conv2d(last, last, 3, padding=1, **kw))
            self.variants = (SD15_V1,)
            self.scale = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        self.down_res = nn.ModuleList(ResnetBlock(i, o, g, ops, **kw) for i, o, g in stages)
        self.down_sample = nn.ModuleList(Downsample(o, ops, **kw) for _, o, _ in stages)
        self.mid_convs = nn.ModuleList([mid, ops.Conv2d(last, spec.out_channels, 1, **kw)])
        self.variant: Variant | None = self.variants[0] if len(self.variants) == 1 else None

    # ---- what the runtime reads ---------------------------------------------------------------

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.time_embedding.linear_1.weight.dtype

    @property
    def arch(self) -> str:
        """The base model it was released for (the stem layout: SDXL; SD1.5-v2 is chosen by the host)."""
        return self.variants[0].arch

    @property
    def host_archs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v.arch for v in self.variants))

    def hint_size(self, h: int, w: int) -> tuple[int, int]:
        return 8 * h, 8 * w

    def output_levels(self) -> list[int]:
        """One weighted output: the feature point (for the stem layout, SDXL's; only "paper" weights read it)."""
        return [(self.variant or self.variants[0]).level]

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The step-independent part: the stem on the [0, 1] hint (the v1 layout has none: the hint itself)."""
        x = hint.to(self.dtype)  # stays on the latent's device (comfy ops cast weights to it)
        return x if self.embedding is None else self.embedding(x)

    def control_map(self, embedding: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The module's output c (B', C, h, w) for the embedded hint (B' rows) at `timesteps`."""
        t = timesteps.reshape(-1)
        if t.shape[0] != embedding.shape[0]:
            if embedding.shape[0] != 1 and t.shape[0] != 1:
                raise InputError(f"{embedding.shape[0]} hint rows for {t.shape[0]} timesteps")
            if embedding.shape[0] == 1 and bool((t == t[0]).all()):
                t = t[:1]  # one hint, one step for every row: run the module once (CFG de-duplication)
        emb = self.time_embedding(timestep_embedding(t, TIME_DIM).to(device=embedding.device, dtype=self.dtype))
        x = embedding
        if x.shape[0] != emb.shape[0]:
            x = x.expand(emb.shape[0], *x.shape[1:])
        for res, down in zip(self.down_res, self.down_sample):
            x = down(res(x, emb))
        if self.embedding is not None:
            x = self.mid_convs[0](x) + x
        else:
            x = self.mid_convs[0](x)
        return self.mid_convs[1](x)

    def control_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        y: torch.Tensor | None, embedding: torch.Tensor) -> Outputs:
        """One feature addition at the bound variant's point; the map is computed now (it depends on
        t only), the normalisation when the host reaches the point."""
        variant = self.bound_variant()
        if embedding.shape[0] not in (1, x.shape[0]):
            raise InputError(f"{embedding.shape[0]} hint rows for a batch of {x.shape[0]}")
        c = self.control_map(embedding, timesteps)
        return {FEATURE: [(variant.block, partial(self._term, variant, c))]}

    def _term(self, variant: Variant, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if h.shape[1] != c.shape[1]:
            raise InputError(
                f"the ControlNeXt ({variant.name}) makes a {c.shape[1]}-channel map but the UNet's feature at its "
                f"point is {h.shape[1]} channels wide; the module was made for another base model"
            )
        if c.shape[0] not in (1, h.shape[0]):
            raise InputError(f"{c.shape[0]} ControlNeXt maps for {h.shape[0]} rows of the UNet's batch")
        out = cross_normalize(h, c, variant.pool_first)
        return out if self.scale is None else out * self.scale.to(out)

    # ---- the host ------------------------------------------------------------------------------

    def bound_variant(self) -> Variant:
        if self.variant is None:
            raise InputError(
                "this ControlNeXt module fits SDXL and SD1.5 (v2) UNets, and which one it acts on is read from "
                "the base model when sampling starts; the host gave no model weights (pre_run without "
                "host_weights): pass them"
            )
        return self.variant

    def bind_host(self, host_weights: HostWeights | None) -> None:
        """Pick the variant for the host UNet (LDM key names) and check that its width fits, before
        the first step."""
        if host_weights is None:
            return
        sd = host_weights()
        sdxl = "label_emb.0.0.weight" in sd  # SDXL's size/pooled-text input; SD1.x has none
        candidates = [v for v in self.variants if (v.arch == "sdxl") == sdxl]
        if not candidates:
            want = " or ".join(v.name for v in self.variants)
            raise InputError(
                f"this ControlNeXt module is the {want} one, but the model being sampled is "
                f"{'an SDXL' if sdxl else 'an SD1.x-shaped'} UNet; use a ControlNeXt made for your checkpoint"
            )
        variant = candidates[0]
        key, what = {
            ("input", 0): ("input_blocks.0.0.weight", "its first conv"),
            ("input", 3): ("input_blocks.3.0.op.weight", "its first downsample (input block 3)"),
            ("middle", 0): ("middle_block.2.out_layers.3.weight", "its middle block"),
        }[variant.block]
        w = sd.get(key)
        if w is None or w.shape[0] != self.spec.out_channels:
            got = "has no such layer" if w is None else f"is {w.shape[0]} channels wide there"
            raise InputError(
                f"the ControlNeXt ({variant.name}) adds a {self.spec.out_channels}-channel map after {what}, but the "
                f"model being sampled {got}; use a ControlNeXt made for your checkpoint"
            )
        self.variant = variant

    @property
    def variant_label(self) -> str:
        return " / ".join(v.name for v in self.variants)


# ------------------------------------------------------------------------------------------------
# the family's entry points (`loader.FAMILY_LOADERS`)

def _spec(sd: StateDict, name: str) -> fmt.ModuleSpec:
    return fmt.read_module({k: tuple(v.shape) for k, v in sd.items()}, name)


def load(source: Source, device: Any, dtype: torch.dtype, ops: Any, config: Any) -> ControlNeXt:
    if config is not None:
        raise LoadError(f"{source.name}: a config override is for ControlNets; a ControlNeXt's shape is read from its file")
    spec = _spec(source.sd, source.name)
    model = ControlNeXt(spec, ops=ops, device="meta", dtype=dtype)
    what = f"a ControlNeXt module ({model.variant_label} layout)"
    sd = source.sd
    if spec.layout == fmt.SD15_V1:  # the learned scalar: 0-dim in the file; keep a float tensor
        sd = dict(sd)
        sd["scale"] = sd["scale"].reshape(())
    return assign_weights(model, sd, source.name, what)


def arch(header: StateDict, found: Detected) -> str:
    spec = _spec(header, "header")
    return SD15_V1.arch if spec.layout == fmt.SD15_V1 else SDXL.arch
