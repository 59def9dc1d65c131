"""The building blocks shared by the ControlNet and the reference UNet (LDM `openaimodel` layout).

Module and parameter names follow the original LDM/ControlNet checkpoints exactly
(`input_blocks.1.0.in_layers.0.weight`, `...transformer_blocks.0.attn2.to_k.weight`, ...), so the
original and v1.1 files load with no renaming and our own checkpoints load in ComfyUI.

Every layer with weights is built through `ops` (default `torch.nn`): a host may pass its own
namespace with `Linear`, `Conv2d`, `GroupNorm`, `LayerNorm` (ComfyUI's `comfy.ops` casting layers,
which its low-VRAM partial loading needs) without this module importing the host.

Attention-input patches (host.py's hook): `TimestepSequential` and `SpatialTransformer` take an
optional `attn_patch(index, attn, proj, h, grid) -> h`, which a transformer block calls on the input
of each projection (`to_q/to_k/to_v` of attn1, `to_q` of attn2) before the projection reads it.
Without it every forward is exactly the plain one.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ControlNetConfig

DEFAULT_OPS = SimpleNamespace(
    Linear=nn.Linear, Conv2d=nn.Conv2d, GroupNorm=nn.GroupNorm, LayerNorm=nn.LayerNorm
)


# ---- weights stored in one dtype, computed in another ------------------------------------------
# A host that keeps weights in a small storage dtype (fp16/bf16) but computes in fp32 (ComfyUI's
# "manual cast": a CPU, or a GPU without fast fp16/bf16) holds each weight once, in the storage
# dtype, and casts it to the input's dtype inside the layer's forward. `CAST_OPS` are such layers
# for hosts without their own (ComfyUI passes `comfy.ops.manual_cast`, which does the same and
# also follows its low-VRAM offloading). Cast weights are temporaries: the values computed with
# are exactly the stored ones, widened.

def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return t if t is None or t.dtype == like.dtype else t.to(like.dtype)


class CastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


class CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class CastGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


CAST_OPS = SimpleNamespace(Linear=CastLinear, Conv2d=CastConv2d, GroupNorm=CastGroupNorm, LayerNorm=CastLayerNorm)


class ComputeDtype:
    """For models whose weights may be stored in another dtype than they compute in: `dtype` is the
    compute dtype (what inputs are cast to; `compute_dtype`, set by the loader, or else the weights'
    own), `storage_dtype` the weights' (each family defines it). The layers must cast their weights
    to the input's dtype (`CAST_OPS`, a host's casting ops) when the two differ."""

    compute_dtype: torch.dtype | None = None

    @property
    def storage_dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.storage_dtype

# (transformer block index, "attn1"|"attn2", "q"|"k"|"v", projection input, token grid) -> new input
AttnPatch = Callable[[int, str, str, torch.Tensor, tuple[int, int]], torch.Tensor]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (LDM; diffusers' `flip_sin_to_cos=True, shift=0`)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepSequential(nn.Sequential):
    """A Sequential whose ResBlocks get the time embedding and transformers the text context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                attn_patch: AttnPatch | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, attn_patch)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_dim: int, out_channels: int, groups: int, ops: Any, **kw: Any):
        super().__init__()
        self.in_layers = nn.Sequential(
            ops.GroupNorm(groups, channels, eps=1e-5, **kw), nn.SiLU(), ops.Conv2d(channels, out_channels, 3, padding=1, **kw)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_dim, out_channels, **kw))
        self.out_layers = nn.Sequential(
            ops.GroupNorm(groups, out_channels, eps=1e-5, **kw),
            nn.SiLU(),
            nn.Dropout(0.0),
            ops.Conv2d(out_channels, out_channels, 3, padding=1, **kw),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else ops.Conv2d(channels, out_channels, 1, **kw)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, heads: int, head_dim: int, ops: Any, **kw: Any):
        super().__init__()
        inner = heads * head_dim
        context_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = ops.Linear(dim, inner, bias=False, **kw)
        self.to_k = ops.Linear(context_dim, inner, bias=False, **kw)
        self.to_v = ops.Linear(context_dim, inner, bias=False, **kw)
        self.to_out = nn.Sequential(ops.Linear(inner, dim, **kw), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                value: torch.Tensor | None = None) -> torch.Tensor:
        """q from `x`, k from `context` (default x), v from `value` (default context): as ComfyUI's
        CrossAttention, so patched inputs can differ per projection."""
        context = x if context is None else context
        value = context if value is None else value
        b, n, _ = x.shape
        q, k, v = (
            t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(value))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int, ops: Any, **kw: Any):
        super().__init__()
        self.proj = ops.Linear(dim, inner * 2, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, ops: Any, **kw: Any):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, head_dim, ops, **kw)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, dim * 4, ops, **kw), nn.Dropout(0.0), ops.Linear(dim * 4, dim, **kw))
        self.attn2 = Attention(dim, context_dim, heads, head_dim, ops, **kw)
        self.norm1 = ops.LayerNorm(dim, **kw)
        self.norm2 = ops.LayerNorm(dim, **kw)
        self.norm3 = ops.LayerNorm(dim, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None,
                patch: Callable[[str, str, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        if patch is None:
            x = self.attn1(self.norm1(x)) + x
            x = self.attn2(self.norm2(x), context) + x
        else:  # attention-input patches: each projection reads its own patched input
            n = self.norm1(x)
            x = self.attn1(patch("attn1", "q", n), patch("attn1", "k", n), patch("attn1", "v", n)) + x
            x = self.attn2(patch("attn2", "q", self.norm2(x)), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, depth: int, cfg: ControlNetConfig, ops: Any, **kw: Any):
        super().__init__()
        heads, head_dim = cfg.heads(channels)
        inner = heads * head_dim
        self.use_linear = cfg.use_linear_projection
        self.norm = ops.GroupNorm(cfg.norm_groups, channels, eps=1e-6, **kw)
        if self.use_linear:
            self.proj_in = ops.Linear(channels, inner, **kw)
            self.proj_out = ops.Linear(inner, channels, **kw)
        else:
            self.proj_in = ops.Conv2d(channels, inner, 1, **kw)
            self.proj_out = ops.Conv2d(inner, channels, 1, **kw)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, cfg.context_dim, ops, **kw) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, attn_patch: AttnPatch | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for index, block in enumerate(self.transformer_blocks):
            patch = None
            if attn_patch is not None:
                def patch(attn: str, proj: str, t: torch.Tensor, index: int = index) -> torch.Tensor:
                    return attn_patch(index, attn, proj, t, (h, w))
            x = block(x, context, patch)
        if self.use_linear:
            x = self.proj_out(x)
        # The token-major result viewed as (b, c, h, w) is channels_last; copied back to the layout of
        # the block's input, as ComfyUI and diffusers do (.contiguous()). Left as the view, every later
        # layer ran channels_last with NCHW weights: 19-32 % slower per ControlNet call on a CPU
        # (benchmarks/results/control_call_cpu.md). A channels_last net (fast.prepare) stays so.
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=memory_format(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor laid out so (and not also plain contiguous), else contiguous."""
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Downsample(nn.Module):
    def __init__(self, channels: int, ops: Any, **kw: Any):
        super().__init__()
        self.op = ops.Conv2d(channels, channels, 3, stride=2, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, ops: Any, **kw: Any):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size` lets odd latent sizes round-trip (the skip's size, not a blind 2x).
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def block_with_attention(channels_in: int, channels_out: int, depth: int, cfg: ControlNetConfig, ops: Any, **kw: Any) -> TimestepSequential:
    layers: list[nn.Module] = [ResBlock(channels_in, cfg.time_embed_dim, channels_out, cfg.norm_groups, ops, **kw)]
    if depth > 0:
        layers.append(SpatialTransformer(channels_out, depth, cfg, ops, **kw))
    return TimestepSequential(*layers)


def build_time_embedding(cfg: ControlNetConfig, ops: Any, **kw: Any) -> tuple[nn.Sequential, nn.Sequential | None]:
    """`time_embed` and, for SDXL, `label_emb` (keys `label_emb.0.0`, `label_emb.0.2`)."""
    ted = cfg.time_embed_dim
    time_embed = nn.Sequential(ops.Linear(cfg.model_channels, ted, **kw), nn.SiLU(), ops.Linear(ted, ted, **kw))
    label_emb = None
    if cfg.adm_in_channels is not None:
        label_emb = nn.Sequential(
            nn.Sequential(ops.Linear(cfg.adm_in_channels, ted, **kw), nn.SiLU(), ops.Linear(ted, ted, **kw))
        )
    return time_embed, label_emb


def build_encoder(cfg: ControlNetConfig, ops: Any, **kw: Any) -> tuple[nn.ModuleList, TimestepSequential, list[int]]:
    """The UNet encoder (`input_blocks`) and `middle_block`, plus the width of every skip.

    The ControlNet is a trainable copy of exactly this; the reference UNet adds a decoder.
    """
    mc = cfg.model_channels
    blocks = nn.ModuleList([TimestepSequential(ops.Conv2d(cfg.in_channels, mc, 3, padding=1, **kw))])
    skip_channels = [mc]
    ch = mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            blocks.append(block_with_attention(ch, mult * mc, cfg.transformer_depth[level], cfg, ops, **kw))
            ch = mult * mc
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepSequential(Downsample(ch, ops, **kw)))
            skip_channels.append(ch)
    middle_layers: list[nn.Module] = [ResBlock(ch, cfg.time_embed_dim, ch, cfg.norm_groups, ops, **kw)]
    if cfg.transformer_depth_middle > 0:  # some distilled nets drop the middle attention
        middle_layers.append(SpatialTransformer(ch, cfg.transformer_depth_middle, cfg, ops, **kw))
    middle_layers.append(ResBlock(ch, cfg.time_embed_dim, ch, cfg.norm_groups, ops, **kw))
    return blocks, TimestepSequential(*middle_layers), skip_channels
