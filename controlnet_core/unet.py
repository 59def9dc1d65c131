"""The reference host: a full SD-architecture UNet that takes ControlNet residuals like ComfyUI's.

The encoder and middle block are the very blocks the ControlNet copies (`layers.build_encoder`);
the decoder mirrors them. Key names follow the LDM checkpoints (`input_blocks.*`, `middle_block.*`,
`output_blocks.*`, `out.*`), so an SD checkpoint's `model.diffusion_model.*` weights load as is.

How control is consumed, exactly as ComfyUI's `UNetModel._forward`:

    for each encoder block:  h = block(h); h += control["input"].pop() (if any); keep h as a skip
    h = middle_block(h);     h += control["middle"].pop()
    for each decoder block:  skip = skips.pop(); skip += control["output"].pop(); h = block(cat(h, skip))

The lists are popped from the end, so `output[-1]` (the deepest skip) is used first; the caller
must hand fresh lists every call (`host.unet_control` does). `control["attention"]` (host.py's
attention-input patches, `{AttnSite: [fn, ...]}`) is applied inside the transformer blocks: the site
`(("input", 4), 0, "attn1", "q")` is the input of `input_blocks.4.1.transformer_blocks.0.attn1.to_q`,
exactly where ComfyUI calls `attn1_patch` with `block=("input", 4)`, `block_index=0`. A site this UNet
does not have is an error, not a silent no-op. `control["feature"]` (host.py's feature additions,
`{block: [fn, ...]}`) acts after input block i once its skip is kept, or after the middle block and
its residual, as ComfyUI's `input_block_patch_after_skip` / `output_block_patch` ("output", 0) do. A dict may also carry `"sync"`: a
callable run once just before the first residual is consumed, so a host-side fast path can compute
the residuals on a side stream while the encoder runs (see `fast/`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .config import ControlNetConfig
from .errors import InputError
from .host import ATTENTION, FEATURE, AttnFn, AttnSite, FeatureFn, apply_attention, apply_features
from .layers import (
    DEFAULT_OPS, AttnPatch, ResBlock, SpatialTransformer, TimestepSequential, Upsample, build_encoder,
    build_time_embedding, timestep_embedding,
)

Control = dict[str, Any]


class UNet(nn.Module):
    """An SD1.x / SD2.x / SDXL UNet described by the same config as its ControlNet."""

    def __init__(self, config: ControlNetConfig, ops: Any = None, device: Any = None, dtype: torch.dtype | None = None,
                 out_channels: int | None = None):
        super().__init__()
        ops = DEFAULT_OPS if ops is None else ops
        kw = {"device": device, "dtype": dtype}
        self.config = config
        self.out_channels = config.in_channels if out_channels is None else out_channels
        self.time_embed, self.label_emb = build_time_embedding(config, ops, **kw)
        self.input_blocks, self.middle_block, skip_channels = build_encoder(config, ops, **kw)
        self.output_blocks = self._decoder(config, list(skip_channels), ops, **kw)
        mc = config.model_channels
        self.out = nn.Sequential(
            ops.GroupNorm(config.norm_groups, mc, eps=1e-5, **kw), nn.SiLU(),
            ops.Conv2d(mc, self.out_channels, 3, padding=1, **kw),
        )
        self._sites = self.attention_sites()  # the blocks are fixed from here on

    @staticmethod
    def _decoder(cfg: ControlNetConfig, skips: list[int], ops: Any, **kw: Any) -> nn.ModuleList:
        blocks = nn.ModuleList()
        mc = cfg.model_channels
        ch = skips[-1]
        for level in reversed(range(len(cfg.channel_mult))):
            out_ch = cfg.channel_mult[level] * mc
            for i in range(cfg.num_res_blocks + 1):  # one more than the encoder: it eats the downsample's skip
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), cfg.time_embed_dim, out_ch, cfg.norm_groups, ops, **kw)]
                ch = out_ch
                if cfg.transformer_depth[level] > 0:
                    layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg, ops, **kw))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, ops, **kw))
                blocks.append(TimestepSequential(*layers))
        return blocks

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        control: Control | None = None,
    ) -> torch.Tensor:
        """The model output (eps) for latent `x` at `timesteps` (0..999), residuals from `control`."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise InputError(f"the UNet takes a (batch, {cfg.in_channels}, h, w) latent; got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise InputError(f"this {cfg.arch} UNet takes context of width {cfg.context_dim}; got {tuple(context.shape)}")
        if (cfg.adm_in_channels is None) != (y is None):
            raise InputError(f"this {cfg.arch} UNet {'needs' if y is None else 'takes no'} `y` vector")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        sync: Callable[[], None] | None = control.get("sync") if control is not None else None
        attention = self._group_sites(control.get(ATTENTION) if control is not None else None)
        features = self._check_features(control.get(FEATURE) if control is not None else None)

        h = x.to(dtype)
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, _block_patch(attention, ("input", i)))
            h = _apply(h, control, "input")
            skips.append(h)
            h = apply_features(features.get(("input", i)), h)
        h = self.middle_block(h, emb, context, _block_patch(attention, ("middle", 0)))
        if sync is not None:
            sync()
        h = _apply(h, control, "middle")
        h = apply_features(features.get(("middle", 0)), h)
        for i, block in enumerate(self.output_blocks):
            skip = _apply(skips.pop(), control, "output")
            h = torch.cat([h, skip], dim=1)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            patch = _block_patch(attention, ("output", i))
            for layer in block:
                if isinstance(layer, ResBlock):
                    h = layer(h, emb)
                elif isinstance(layer, SpatialTransformer):
                    h = layer(h, context, patch)
                else:  # Upsample to the next skip's size, so odd latent sizes round-trip
                    h = layer(h, size)
        return self.out(h)

    def attention_sites(self) -> dict[tuple[str, int], int]:
        """Each block with attention -> its number of transformer blocks (as ComfyUI names blocks)."""
        out = {}
        named = [(("input", i), b) for i, b in enumerate(self.input_blocks)]
        named += [(("middle", 0), self.middle_block)] + [(("output", i), b) for i, b in enumerate(self.output_blocks)]
        for name, block in named:
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    out[name] = len(layer.transformer_blocks)
        return out

    def _group_sites(self, attention: dict[AttnSite, list[AttnFn]] | None) -> _Grouped | None:
        """The attention-input patches checked against this UNet and grouped by block:
        {block: {(index, attn, proj): fns}}."""
        if not attention:
            return None
        grouped: _Grouped = {}
        for site, fns in attention.items():
            AttnSite(*site).check()
            block = tuple(site.block)
            if site.index >= self._sites.get(block, 0):
                raise InputError(
                    f"an attention-input patch is meant for {site.block[0]} block {site.block[1]}, transformer "
                    f"block {site.index}, which this {self.config.arch} UNet does not have; the control was made "
                    "for another base model"
                )
            grouped.setdefault(block, {})[(site.index, site.attn, site.proj)] = fns
        return grouped


    def _check_features(self, features: dict[tuple[str, int], list[FeatureFn]] | None) -> dict:
        """The feature additions, each at a block this UNet has."""
        if not features:
            return {}
        for kind, number in features:
            if kind == "input" and number >= len(self.input_blocks):
                raise InputError(
                    f"a feature addition is meant for input block {number}, which this {self.config.arch} UNet "
                    f"(with {len(self.input_blocks)} input blocks) does not have; the control was made for another "
                    "base model"
                )
        return features


_Grouped = dict[tuple[str, int], dict[tuple[int, str, str], list[AttnFn]]]


def _block_patch(grouped: _Grouped | None, block: tuple[str, int]) -> AttnPatch | None:
    """The patches of one UNet block as the `attn_patch` its transformer blocks call."""
    mine = grouped.get(block) if grouped else None
    if not mine:
        return None

    def patch(index: int, attn: str, proj: str, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        fns = mine.get((index, attn, proj))
        return h if fns is None else apply_attention(fns, h, grid)

    return patch


def _apply(h: torch.Tensor, control: Control | None, name: str) -> torch.Tensor:
    """Pop one residual of `control[name]` (from the end) and add it, as ComfyUI's `apply_control`."""
    if control is None:
        return h
    residuals = control.get(name)
    if not residuals:
        return h
    r = residuals.pop()
    if r is None:
        return h
    if r.shape[-2:] != h.shape[-2:] or r.shape[1] != h.shape[1]:
        raise InputError(
            f"a {name} control residual of shape {tuple(r.shape)} does not fit the UNet's {tuple(h.shape)}; "
            "the ControlNet was made for another base model"
        )
    return h + r.to(h.dtype)
