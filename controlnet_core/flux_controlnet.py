"""The Flux.1 ControlNet family: XLabs, InstantX, Shakker-Labs Union / Union-Pro / Union-Pro-2.0.

All of them are one network (ComfyUI's `ControlNetFlux`, diffusers' `FluxControlNetModel`): a
shortened copy of the Flux transformer whose image tokens get the hint added after `img_in`, and
one zero-initialised linear per block (`controlnet_blocks`, `controlnet_single_blocks`) that turns
each block's image tokens into the residual for the host. They differ in three things, all read
from the file's shapes (`formats/flux_controlnet.py`):

  hint stem   "latent" (InstantX, Union, Pro-2.0): the hint image goes through the host's VAE and
              the Flux latent format, is 2x2-patchified and projected by `pos_embed_input`;
              "pixel" (XLabs): the image itself (at 8x the latent), `*2-1`, through an 8-conv stem
              (`input_hint_block`, three stride-2 convs: to the latent's size, 16 channels), then
              patchified and projected the same way;
  union modes a `controlnet_mode_embedder` (Union, Union-Pro: 10 rows) whose row for the chosen
              control type is put IN FRONT of the text tokens (with a zero position id); "auto"
              adds no token (ComfyUI); Pro-2.0 and the single-purpose nets have none;
  tiling      how n outputs cover the host's 19 double / 38 single blocks (host.BlockMap):
              consecutive repeats for latent nets (ComfyUI and diffusers), cyclic for XLabs.

Module and parameter names are Black Forest Labs' (`double_blocks.i.img_attn.qkv`, ...), which
ComfyUI and XLabs' native files use; the diffusers layout is converted on load. Outputs go to the
host as token tensors (B, th*tw, hidden) added to the leading image tokens after each block:
ComfyUI's Flux/Chroma `control["input"]` (double blocks) and `control["output"]` (single blocks).
Inside the runtime they travel as (B, hidden, th, tw) maps, so masks and pooling work per token
cell as for the UNet families; `host.spread_blocks` turns them into the host's token lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, LoadError
from .formats import flux_controlnet as fmt
from .formats.detect import Detected
from .formats.source import Source, StateDict, assign_weights
from .host import FLUX_HOST, Outputs
from .layers import DEFAULT_OPS, ComputeDtype

PATCH = 2  # Flux packs 2x2 latent cells into one token
# Flux Union / Union-Pro control modes (InstantX and Shakker-Labs model cards; diffusers' pipeline
# docs). ComfyUI's SetUnionControlNetType lists the SDXL Union's names for the same indices, so its
# "openpose" selects canny here (ComfyUI issue #4823): we name the Flux modes.
FLUX_UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "low quality")
AUTO = "auto"


@dataclass(frozen=True)
class FluxControlNetConfig:
    """The shape of a Flux ControlNet (all read from the file, `formats/flux_controlnet.infer_config`)."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19                 # double (joint) blocks
    depth_single: int = 38          # single blocks
    in_channels: int = 64           # packed latent width of `img_in` (16 channels x 2 x 2)
    hint_channels: int = 64         # packed hint width of `pos_embed_input` (16 or 17 (inpaint) x 4)
    context_dim: int = 4096         # T5 width (`txt_in`)
    vec_dim: int = 768              # pooled CLIP-L width (`vector_in`)
    mlp_hidden: int = 12288
    guidance_embed: bool = True     # dev (True) or schnell (False)
    qkv_bias: bool = True
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    num_modes: int = 0              # rows of `controlnet_mode_embedder` (0: no union modes)
    hint: str = "latent"            # "latent" | "pixel"
    stem: str = "xlabs"             # pixel stem and output blocks: "xlabs" | "mistoline" (10 convs; SiLU'd blocks)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise LoadError(
                f"a Flux ControlNet of width {self.hidden_size} with {self.num_heads} heads needs position axes "
                f"summing to {self.hidden_size // max(self.num_heads, 1)}; got {self.axes_dim}"
            )
        if self.hint not in ("latent", "pixel") or self.stem not in ("xlabs", "mistoline"):
            raise LoadError(f"unknown Flux ControlNet hint stem {self.hint!r} / {self.stem!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# ------------------------------------------------------------------------------------------
# the Flux transformer pieces (Black Forest Labs' layout)

def time_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Flux's sinusoidal embedding of t in 0..1, scaled by 1000 first: [cos, sin] halves."""
    t = 1000.0 * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(ids: torch.Tensor, axes_dim: Sequence[int], theta: int) -> torch.Tensor:
    """Rotary position factors for (B, N, axes) position ids: (B, 1, N, head_dim/2, 2, 2) rotations,
    one per pair of channels; each axis gets its slice of the head, frequencies theta^(-2i/d)."""
    parts = []
    for i, d in enumerate(axes_dim):
        scale = torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d
        angle = ids[..., i].double()[..., None] / theta ** scale  # (B, N, d/2), in float64 as ComfyUI
        cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
        parts.append(torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angle.shape, 2, 2))
    return torch.cat(parts, dim=-3)[:, None]


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) channel pair of x (B, H, N, D) by pe (rope)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Joint attention with rotary positions: (B, H, N, D) each -> (B, N, H*D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, **kw: Any):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(device=x.device, dtype=x.dtype)
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * scale


class QKNorm(nn.Module):
    def __init__(self, dim: int, **kw: Any):
        super().__init__()
        self.query_norm = RMSNorm(dim, **kw)
        self.key_norm = RMSNorm(dim, **kw)


class MLPEmbedder(nn.Module):
    def __init__(self, dim_in: int, dim: int, ops: Any, **kw: Any):
        super().__init__()
        self.in_layer = ops.Linear(dim_in, dim, **kw)
        self.out_layer = ops.Linear(dim, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """`lin(silu(vec))` split into (shift, scale, gate) once (single) or twice (double), per row."""

    def __init__(self, dim: int, count: int, ops: Any, **kw: Any):
        super().__init__()
        self.count = count
        self.lin = ops.Linear(dim, count * dim, **kw)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return list(self.lin(F.silu(vec))[:, None].chunk(self.count, dim=-1))


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool, ops: Any, **kw: Any):
        super().__init__()
        self.heads = heads
        self.qkv = ops.Linear(dim, 3 * dim, bias=bias, **kw)
        self.norm = QKNorm(dim // heads, **kw)
        self.proj = ops.Linear(dim, dim, **kw)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def _mlp(dim: int, hidden: int, ops: Any, **kw: Any) -> nn.Sequential:
    return nn.Sequential(ops.Linear(dim, hidden, **kw), nn.GELU(approximate="tanh"), ops.Linear(hidden, dim, **kw))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, one joint attention over [text, image]."""

    def __init__(self, cfg: FluxControlNetConfig, ops: Any, **kw: Any):
        super().__init__()
        d = cfg.hidden_size
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(d, 6, ops, **kw))
            setattr(self, f"{side}_attn", SelfAttention(d, cfg.num_heads, cfg.qkv_bias, ops, **kw))
            setattr(self, f"{side}_mlp", _mlp(d, cfg.mlp_hidden, ops, **kw))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(_norm(img) * (1 + i_scale1) + i_shift1)
        tq, tk, tv = self.txt_attn.qkv_heads(_norm(txt) * (1 + t_scale1) + t_shift1)
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(i_attn)
        img = img + i_gate2 * self.img_mlp(_norm(img) * (1 + i_scale2) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(t_attn)
        txt = txt + t_gate2 * self.txt_mlp(_norm(txt) * (1 + t_scale2) + t_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text, image]: attention and MLP side by side (`linear1` makes q, k, v and
    the MLP input at once; `linear2` reads the attention output and the activated MLP)."""

    def __init__(self, cfg: FluxControlNetConfig, ops: Any, **kw: Any):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.split = (3 * d, cfg.mlp_hidden)
        self.linear1 = ops.Linear(d, 3 * d + cfg.mlp_hidden, **kw)
        self.linear2 = ops.Linear(d + cfg.mlp_hidden, d, **kw)
        self.norm = QKNorm(cfg.head_dim, **kw)
        self.modulation = Modulation(d, 3, ops, **kw)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(_norm(x) * (1 + scale) + shift).split(self.split, dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        return x + gate * self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2))


def hint_stem(ops: Any, **kw: Any) -> nn.Sequential:
    """XLabs' pixel stem: 8 convs 3x3 (3 -> 16, then 16), SiLU between, three of stride 2 (/8)."""
    layers: list[nn.Module] = []
    for i in range(8):
        if i:
            layers.append(nn.SiLU())
        layers.append(ops.Conv2d(3 if i == 0 else 16, 16, 3, padding=1, stride=2 if i in (2, 4, 6) else 1, **kw))
    return nn.Sequential(*layers)


class MistolineStem(nn.Module):
    """TheMisto's MistoLine pixel stem (`input_cond_block.encoder`): 10 convs, SiLU between, kernel
    sizes 3, 1, 3, 3s2, 3, 3s2, 3, 3s2, 1, 3 (/8 overall, 3 -> 16 channels)."""

    LAYERS = ((3, 1), (1, 1), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1), (3, 2), (1, 1), (3, 1))

    def __init__(self, ops: Any, **kw: Any):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (k, stride) in enumerate(self.LAYERS):
            if i:
                layers.append(nn.SiLU())
            layers.append(ops.Conv2d(3 if i == 0 else 16, 16, k, padding=k // 2, stride=stride, **kw))
        self.encoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class MistolineBlock(nn.Module):
    """MistoLine's output block: SiLU(linear(x)) (the other nets use a bare linear)."""

    def __init__(self, dim: int, ops: Any, **kw: Any):
        super().__init__()
        self.linear = ops.Linear(dim, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.linear(x))


def patchify(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, ceil(h/2)*ceil(w/2), C*4): odd sides padded (ComfyUI: circular), 2x2 cells
    packed channel-major (c, ph, pw), as Flux and diffusers' `_pack_latents` do."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % PATCH, -w % PATCH
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def image_ids(th: int, tw: int, batch: int, device: Any) -> torch.Tensor:
    """(B, th*tw, 3) position ids (0, row, column) of the image tokens."""
    ids = torch.zeros(th, tw, 3, device=device)
    ids[..., 1] = torch.arange(th, device=device, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(tw, device=device, dtype=torch.float32)[None, :]
    return ids.reshape(1, th * tw, 3).expand(batch, -1, -1)


# ------------------------------------------------------------------------------------------
# the ControlNet

class FluxControlNet(ComputeDtype, nn.Module):
    """A Flux ControlNet as a `control.ControlModel` (module docstring)."""

    family = "Flux ControlNet"
    arch = "flux"
    host_archs = ("flux",)
    host = FLUX_HOST
    adm_channels = None      # reads no SDXL `y`; its pooled vector is `host_inputs`' "y"
    host_inputs = ("y", "guidance")
    fast_path_net = None     # the CUDA runner (fast/) runs UNet ControlNets only
    fusion_key = None

    def __init__(self, config: FluxControlNetConfig, ops: Any = None, device: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        ops = DEFAULT_OPS if ops is None else ops
        kw = {"device": device, "dtype": dtype}
        self.config = cfg = config
        d = cfg.hidden_size
        self.img_in = ops.Linear(cfg.in_channels, d, **kw)
        self.time_in = MLPEmbedder(256, d, ops, **kw)
        self.vector_in = MLPEmbedder(cfg.vec_dim, d, ops, **kw)
        self.guidance_in = MLPEmbedder(256, d, ops, **kw) if cfg.guidance_embed else None
        self.txt_in = ops.Linear(cfg.context_dim, d, **kw)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg, ops, **kw) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg, ops, **kw) for _ in range(cfg.depth_single))
        mistoline = cfg.hint == "pixel" and cfg.stem == "mistoline"
        out_block = (lambda: MistolineBlock(d, ops, **kw)) if mistoline else (lambda: ops.Linear(d, d, **kw))
        self.controlnet_blocks = nn.ModuleList(out_block() for _ in range(cfg.depth))
        self.controlnet_single_blocks = nn.ModuleList(out_block() for _ in range(cfg.depth_single))
        embedding = getattr(ops, "Embedding", nn.Embedding)
        self.controlnet_mode_embedder = embedding(cfg.num_modes, d, **kw) if cfg.num_modes else None
        self.pos_embed_input = ops.Linear(cfg.hint_channels, d, **kw)
        self.input_hint_block = hint_stem(ops, **kw) if cfg.hint == "pixel" and not mistoline else None
        self.input_cond_block = MistolineStem(ops, **kw) if mistoline else None

    # ---- ControlModel members -------------------------------------------------------------

    @property
    def storage_dtype(self) -> torch.dtype:
        """The weights' dtype, read from a bias: with fp8 weight storage asked by a flag (fast.prepare)
        the biases stay in the dtype the net was loaded in; `dtype` (layers.ComputeDtype) is the
        compute dtype, the loader's `compute_dtype` where the weights are stored narrower (manual cast)."""
        return self.pos_embed_input.bias.dtype

    @property
    def device(self) -> torch.device:
        return self.pos_embed_input.bias.device

    @property
    def hint_channels(self) -> int:
        return 3

    @property
    def hint_space(self) -> str:
        """"latent": the hint reaches `embed_hint` through the host's VAE; "pixel": as an image."""
        return self.config.hint

    @property
    def latent_channels(self) -> int:
        """The latent channels the hint stem reads (16; 17 for an inpaint net: + the mask)."""
        return self.config.hint_channels // (PATCH * PATCH)

    @property
    def mask_channels(self) -> int:
        """Channels after the image latent in the hint (AliMama inpaint: 1, the inverted mask)."""
        return self.latent_channels - self.config.in_channels // 4 if self.config.hint == "latent" else 0

    @property
    def context_dim(self) -> int:
        return self.config.context_dim

    @property
    def tiling(self) -> str:
        """How n block outputs cover the host's blocks: XLabs repeats its list, latent nets each block."""
        return "cyclic" if self.config.hint == "pixel" else "consecutive"

    @property
    def host_layout(self) -> tuple:
        return (self.config.hidden_size, self.host.name)

    @property
    def control_types(self) -> tuple[str, ...]:
        return FLUX_UNION_MODES[: self.config.num_modes] if self.config.num_modes else ()

    def hint_size(self, h: int, w: int) -> tuple[int, int]:
        return 8 * h, 8 * w

    def output_levels(self) -> list[int]:
        return [0] * (self.config.depth + self.config.depth_single)

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The hint tokens (B, N, hint_channels): a latent (B, C, h, w) for a latent net, the image
        (B, 3, 8h, 8w) in [0, 1] for a pixel net."""
        hint = hint.to(device=self.device, dtype=self.dtype)
        stem = self.input_hint_block if self.input_hint_block is not None else self.input_cond_block
        if stem is not None:
            hint = stem(hint * 2.0 - 1.0)
        elif hint.shape[1] != self.latent_channels:
            raise InputError(
                f"this Flux ControlNet takes a {self.latent_channels}-channel Flux latent as its hint, got "
                f"{hint.shape[1]} channels; encode the hint with the Flux VAE (connect it to the apply node)"
            )
        return patchify(hint)

    def select_type(self, control_type: str | int) -> "FluxControlNet | FluxUnionMode":
        """The model of one union mode ("auto": this network, no mode token)."""
        if isinstance(control_type, str) and control_type.strip().lower() == AUTO:
            return self
        name = getattr(self, "source_name", None)
        if not self.config.num_modes:
            which = f"{name!r}" if name else "this Flux ControlNet"
            raise InputError(
                f"{which} has no control modes (a single-purpose net, or Union-Pro-2.0, whose mode embedding was "
                f"removed), so control type {control_type!r} would do nothing; set control_type to 'auto'"
            )
        index = mode_index(control_type, self.config.num_modes)
        return FluxUnionMode(self, index)

    def control_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        y: torch.Tensor | None, embedding: torch.Tensor, guidance: torch.Tensor | None = None,
                        modes: Sequence[int] = ()) -> Outputs:
        """Unscaled outputs: `input` one (B, hidden, th, tw) map per double block, `output` one per
        single block (host.spread_blocks makes the host's token lists of them)."""
        th, tw = -(-x.shape[-2] // PATCH), -(-x.shape[-1] // PATCH)
        double, single = self.forward(x, embedding, timesteps, context, y, guidance, modes)
        grid = lambda t: t.transpose(1, 2).unflatten(2, (th, tw))  # noqa: E731
        return {"input": [grid(t) for t in double], "output": [grid(t) for t in single]}

    # ---- the network ----------------------------------------------------------------------

    def check_inputs(self, x: torch.Tensor, hint_tokens: torch.Tensor, context: torch.Tensor) -> None:
        cfg = self.config
        name = getattr(self, "source_name", None) or "the Flux ControlNet"
        if x.ndim != 4 or x.shape[1] * PATCH * PATCH != cfg.in_channels:
            raise InputError(
                f"{name} takes the Flux latent ({cfg.in_channels // 4} channels), got {tuple(x.shape)}; "
                "use it with a Flux (or Chroma) model"
            )
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise InputError(
                f"{name} expects T5 text conditioning of width {cfg.context_dim}, got {tuple(context.shape)}; "
                "use it with a Flux (or Chroma) model and its text encoders"
            )
        n = (-(-x.shape[-2] // PATCH)) * (-(-x.shape[-1] // PATCH))
        if hint_tokens.shape[1] != n:
            raise InputError(f"the hint has {hint_tokens.shape[1]} tokens but the latent {n}; resize the hint")

    def forward(self, x: torch.Tensor, hint_tokens: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                modes: Sequence[int] = ()) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Unscaled per-block image-token outputs (double, single), each (B, th*tw, hidden).

        x: the noisy latent (B, 16, h, w) as the host gets it; hint_tokens: `embed_hint`'s output;
        timesteps: the host's t in 0..1 (Flux: sigma); y: pooled CLIP (B, 768) or None (zeros);
        guidance: (B,) distilled guidance (dev nets; None adds no guidance term, as ComfyUI's host);
        modes: union mode rows prepended to the text ([] / auto: none).
        """
        self.check_inputs(x, hint_tokens, context)
        cfg, dtype = self.config, self.dtype
        b = x.shape[0]
        th, tw = -(-x.shape[-2] // PATCH), -(-x.shape[-1] // PATCH)
        img = self.img_in(patchify(x.to(dtype))) + self.pos_embed_input(hint_tokens.to(dtype))
        t = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps.reshape(b)
        vec = self.time_in(time_embedding(t).to(dtype))
        if self.guidance_in is not None and guidance is not None:
            g = guidance.reshape(-1).expand(b) if guidance.numel() == 1 else guidance.reshape(b)
            vec = vec + self.guidance_in(time_embedding(g).to(dtype))
        pooled = torch.zeros(b, cfg.vec_dim, device=x.device, dtype=dtype) if y is None else y[:, : cfg.vec_dim]
        vec = vec + self.vector_in(pooled.to(dtype))
        txt = self.txt_in(context.to(dtype))
        if modes:
            if self.controlnet_mode_embedder is None:
                raise InputError("this Flux ControlNet has no control modes; use control type 'auto'")
            rows = self.controlnet_mode_embedder.weight[list(modes)].to(device=txt.device, dtype=dtype)
            txt = torch.cat([rows[None].expand(b, -1, -1), txt], dim=1)
        ids = torch.cat([torch.zeros(b, txt.shape[1], 3, device=x.device), image_ids(th, tw, b, x.device)], dim=1)
        pe = rope(ids, cfg.axes_dim, cfg.theta)
        double, single = [], []
        for block, out in zip(self.double_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, vec, pe)
            double.append(out(img))
        h = torch.cat((txt, img), 1)
        for block, out in zip(self.single_blocks, self.controlnet_single_blocks):
            h = block(h, vec, pe)
            single.append(out(h[:, txt.shape[1]:]))
        return double, single


def mode_index(control_type: str | int, num_modes: int) -> int:
    """A Flux Union mode by name (FLUX_UNION_MODES) or row number."""
    if isinstance(control_type, bool):
        control_type = str(control_type)
    if isinstance(control_type, int):
        index = control_type
    else:
        key = str(control_type).strip().lower()
        if key.isdigit():
            index = int(key)
        elif key in FLUX_UNION_MODES:
            index = FLUX_UNION_MODES.index(key)
        else:
            raise InputError(
                f"{control_type!r} is no Flux Union control mode; choose one of {', '.join(FLUX_UNION_MODES)} "
                "(or 'auto')"
            )
    if not 0 <= index < num_modes:
        raise InputError(f"control mode {index} is out of range: this Flux Union has {num_modes} modes")
    return index


class FluxUnionMode:
    """One control mode of a Flux Union network: a `control.ControlModel` sharing its weights."""

    fast_path_net = None
    fusion_key = None  # each mode runs its own pass (diffusers' FluxMultiControlNetModel sums them)

    def __init__(self, net: FluxControlNet, index: int):
        self.net = net
        self.index = index

    def __repr__(self) -> str:
        return f"FluxUnionMode({FLUX_UNION_MODES[self.index] if self.index < len(FLUX_UNION_MODES) else self.index!r})"

    def __getattr__(self, name: str) -> Any:  # every other ControlModel member is the network's
        return getattr(self.net, name)

    def control_outputs(self, x, timesteps, context, y, embedding, guidance=None) -> Outputs:
        return self.net.control_outputs(x, timesteps, context, y, embedding, guidance, modes=(self.index,))


# ------------------------------------------------------------------------------------------
# the family's entry points (`loader.FAMILY_LOADERS`)

def load(source: Source, device: Any, dtype: torch.dtype, ops: Any, config: FluxControlNetConfig | None) -> FluxControlNet:
    sd = fmt.to_native(source.sd, source.detected.layout, source.name)
    cfg = fmt.infer_config(sd, source.name)
    if config is not None:
        cfg = replace(config)  # an explicit config (tests, odd head splits) is checked by the shapes below
    model = FluxControlNet(cfg, ops=ops, device="meta", dtype=dtype)
    what = f"a Flux ControlNet with {cfg.depth} double and {cfg.depth_single} single blocks"
    return assign_weights(model, sd, source.name, what)


def arch(header: StateDict, found: Detected) -> str:
    return "flux"
