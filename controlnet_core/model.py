"""The ControlNet (Zhang, Rao, Agrawala 2023): a trainable copy of the UNet encoder and middle block.

    hint (B,3,8h,8w) --input_hint_block--> (B,C0,h,w) ----------------+
                                                                      v
    x (B,4,h,w) --input_blocks[0]--> + --input_blocks[1..]--> middle_block
                                     |        |                      |
                                zero_convs[0] zero_convs[i]   middle_block_out
                                     v        v                      v
                                 down[0]   down[i]                  mid

Each output goes through a zero-initialised 1x1 conv, so a fresh ControlNet adds exactly nothing
to the frozen UNet. `down` lists the skip residuals from the highest resolution down (diffusers'
order); `mid` is added after the UNet's middle block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ControlNetConfig
from .errors import InputError
from .formats.controlnet import controlnet_config, infer_config, native_state_dict
from .formats.detect import Detected
from .formats.source import Source, StateDict, assign_weights
from .layers import DEFAULT_OPS, ComputeDtype, TimestepSequential, build_encoder, build_time_embedding, timestep_embedding

Residuals = tuple[list[torch.Tensor], torch.Tensor]


class ConfigMembers:
    """The `control.ControlModel` members a `ControlNetConfig` answers: for the classic ControlNet and
    the families built on its architecture (Control-LoRA, a Union's control types)."""

    config: ControlNetConfig

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def hint_channels(self) -> int:
        return self.config.hint_channels

    @property
    def context_dim(self) -> int:
        return self.config.context_dim

    @property
    def adm_channels(self) -> int | None:
        return self.config.adm_in_channels

    @property
    def host_archs(self) -> tuple[str, ...]:
        return (self.config.arch,)

    @property
    def host_layout(self) -> tuple:
        cfg = self.config
        return (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks)

    def hint_size(self, h: int, w: int) -> tuple[int, int]:
        return 8 * h, 8 * w

    def output_levels(self) -> list[int]:
        """The resolution level of each residual: the stem and the ResBlocks of level l at l, each
        downsample at the level it leads to; the middle at the deepest."""
        cfg = self.config
        levels = [0]
        for lvl in range(len(cfg.channel_mult)):
            levels += [lvl] * cfg.num_res_blocks
            if lvl < len(cfg.channel_mult) - 1:
                levels.append(lvl + 1)
        return levels + [len(cfg.channel_mult) - 1]


class ControlNet(ConfigMembers, ComputeDtype, nn.Module):
    """The classic ControlNet; also the reference implementation of `control.ControlModel`."""

    family = "ControlNet"

    @property
    def fast_path_net(self) -> "ControlNet | None":
        """The net the CUDA runner (fast/) runs for this model: itself (the runner is written for
        exactly this forward)."""
        return self

    def __init__(self, config: ControlNetConfig, ops: Any = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        ops = DEFAULT_OPS if ops is None else ops
        kw = {"device": device, "dtype": dtype}
        self.config = config
        self.time_embed, self.label_emb = build_time_embedding(config, ops, **kw)
        self.input_blocks, self.middle_block, skip_channels = build_encoder(config, ops, **kw)
        self.input_hint_block = self._hint_encoder(config, ops, **kw)
        self.zero_convs = nn.ModuleList(
            TimestepSequential(ops.Conv2d(ch, ch, 1, **kw)) for ch in skip_channels
        )
        mid_ch = skip_channels[-1]
        self.middle_block_out = TimestepSequential(ops.Conv2d(mid_ch, mid_ch, 1, **kw))
        if device is None or torch.device(device).type != "meta":
            self.zero_init()

    @staticmethod
    def _hint_encoder(cfg: ControlNetConfig, ops: Any, **kw: Any) -> TimestepSequential:
        layers: list[nn.Module] = []
        c_in = cfg.hint_channels
        for i, c in enumerate(cfg.hint_block_channels):
            if i == 0:
                layers += [ops.Conv2d(c_in, c, 3, padding=1, **kw), nn.SiLU()]
            else:  # each new width is entered with a stride-2 conv: 8x down in all
                layers += [ops.Conv2d(c_in, c, 3, padding=1, stride=2, **kw), nn.SiLU()]
            if i < len(cfg.hint_block_channels) - 1:
                layers += [ops.Conv2d(c, c, 3, padding=1, **kw), nn.SiLU()]
            c_in = c
        layers.append(ops.Conv2d(c_in, cfg.model_channels, 3, padding=1, **kw))
        return TimestepSequential(*layers)

    def zero_init(self) -> None:
        """Zero the convs that make a new ControlNet a no-op (the paper's 'zero convolutions')."""
        with torch.no_grad():
            for conv in [*(z[0] for z in self.zero_convs), self.middle_block_out[0], self.input_hint_block[-1]]:
                conv.weight.zero_()
                conv.bias.zero_()

    def control_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        y: torch.Tensor | None, embedding: torch.Tensor) -> dict[str, list]:
        down, mid = self(x, None, timesteps, context, y, hint_embedding=embedding)
        return {"output": down, "middle": [mid]}

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embed[0].weight.device

    def check_inputs(self, x: torch.Tensor, hint: torch.Tensor | None, context: torch.Tensor, y: torch.Tensor | None) -> None:
        """Say what is wrong with the inputs before a shape error from deep inside does."""
        cfg = self.config
        name = f"this {cfg.arch} ControlNet"
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise InputError(f"the latent must be (batch, {cfg.in_channels}, h, w); got {tuple(x.shape)}")
        if hint is not None:
            want = (8 * x.shape[2], 8 * x.shape[3])
            if hint.ndim != 4 or hint.shape[1] != cfg.hint_channels:
                raise InputError(
                    f"the hint must be an image batch (batch, {cfg.hint_channels}, H, W); got {tuple(hint.shape)}"
                )
            if tuple(hint.shape[2:]) != want:
                raise InputError(
                    f"the hint must be 8x the latent size: latent {tuple(x.shape[2:])} needs a hint of "
                    f"{want[0]}x{want[1]} pixels, got {hint.shape[2]}x{hint.shape[3]}; resize the hint"
                )
            if hint.shape[0] not in (1, x.shape[0]):
                raise InputError(f"{hint.shape[0]} hint images for a batch of {x.shape[0]} latents")
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            got = context.shape[-1] if context.ndim == 3 else tuple(context.shape)
            raise InputError(
                f"{name} expects text context of width {cfg.context_dim} ({_context_family(cfg.context_dim)}), "
                f"got {got} ({_context_family(got)}); use a ControlNet made for your checkpoint"
            )
        if (cfg.adm_in_channels is None) != (y is None):
            if y is None:
                raise InputError(f"{name} needs the SDXL `y` vector ({cfg.adm_in_channels} wide)")
            raise InputError(f"{name} takes no `y` vector, but one was given; is the base model SDXL?")
        if y is not None and (y.ndim != 2 or y.shape[-1] != cfg.adm_in_channels):
            raise InputError(f"`y` must be (batch, {cfg.adm_in_channels}); got {tuple(y.shape)}")

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The hint encoder's output. It does not depend on the timestep: compute once per run."""
        return self.input_hint_block(hint.to(self.dtype), None)

    def embed_time(self, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(self.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(self.dtype))
        return emb

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor | None,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        hint_embedding: torch.Tensor | None = None,
    ) -> Residuals:
        """Unscaled residuals `(down, mid)`. Pass `hint_embedding` (from `embed_hint`) to skip the
        hint encoder; then `hint` may be None."""
        if hint_embedding is None and hint is None:
            raise InputError("give the hint image or its precomputed hint_embedding")
        self.check_inputs(x, hint, context, y)
        return self._encode_with(x, hint, timesteps, context, y, hint_embedding)

    def _encode_with(self, x: torch.Tensor, hint: torch.Tensor | None, timesteps: torch.Tensor, context: torch.Tensor,
                     y: torch.Tensor | None, hint_embedding: torch.Tensor | None,
                     extra_emb: torch.Tensor | None = None) -> Residuals:
        """`forward` after `check_inputs`; `extra_emb` is added to the time embedding (a Union's
        type embedding)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.embed_time(timesteps, y)
        if extra_emb is not None:
            emb = emb + extra_emb
        context = context.to(self.dtype)
        guided = self.embed_hint(hint) if hint_embedding is None else hint_embedding.to(self.dtype)
        if guided.shape[2:] != x.shape[2:]:
            raise InputError(
                f"hint embedding is {tuple(guided.shape[2:])} but the latent is {tuple(x.shape[2:])}"
            )
        return self.encode(x, guided, emb, context)

    def encode(self, x: torch.Tensor, guided: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> Residuals:
        """The trainable encoder copy on latent `x`, the hint features `guided` added after the stem
        conv, with time embedding `emb` (`_encode_with` adds a family's own term to it)."""
        h = x.to(self.dtype)
        down = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:  # the hint enters once, added after the stem conv
                h = h + guided
            down.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        return down, self.middle_block_out(h, emb, context)


def _context_family(width: Any) -> str:
    return {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner"}.get(width, "unknown family")


# ------------------------------------------------------------------------------------------------
# the family's entry points (`loader.FAMILY_LOADERS`)

def load(source: Source, device: Any, dtype: torch.dtype, ops: Any, config: ControlNetConfig | None) -> ControlNet:
    """A ControlNet in any of its three layouts (formats/controlnet.py), built on the meta device."""
    sd = native_state_dict(source)
    cfg = controlnet_config(source, sd, config)
    model = ControlNet(cfg, ops=ops, device="meta", dtype=dtype)
    return assign_weights(model, sd, source.name, f"a {cfg.arch} ControlNet")


def arch(header: StateDict, found: Detected) -> str:
    return infer_config(native_state_dict(Source(header, {}, None, "header", found, None)), name="header").arch
