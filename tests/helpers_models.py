"""Shared test helpers: tiny configs, random-weight ControlNets (ours and diffusers), inputs.

Tiny configs follow the head rule the loader uses on files without a config (see loader.py):
SD1.5 -> 8 heads (conv projections), SD2.1/SDXL -> 64-wide heads (linear projections), and every
width is a multiple of 32 (the default GroupNorm groups). So they load from any format.

Random weights cover *every* parameter, zero convs included: zero-initialised outputs would make
all residuals trivially zero and any parity test meaningless.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from comfyui_controlnet_core.controlnet_core.config import SD15, SD21, SDXL, ControlNetConfig
from comfyui_controlnet_core.controlnet_core.layers import timestep_embedding
from comfyui_controlnet_core.controlnet_core.model import ControlNet

TINY_HINT_BLOCKS = (16, 16, 32, 32)


def make_tiny_config(arch: str) -> ControlNetConfig:
    """A small config of the same family: 'sd15' (13 residuals), 'sd21' (13), 'sdxl' (10)."""
    if arch == "sd15":
        return dataclasses.replace(
            SD15, model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=64, hint_block_channels=TINY_HINT_BLOCKS
        )
    if arch == "sd21":
        return dataclasses.replace(
            SD21, model_channels=64, channel_mult=(1, 2, 2, 2), context_dim=96, hint_block_channels=TINY_HINT_BLOCKS
        )
    if arch == "sdxl":
        return dataclasses.replace(
            SDXL, model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2),
            transformer_depth_middle=2, context_dim=128, hint_block_channels=TINY_HINT_BLOCKS,
        )
    raise ValueError(f"unknown arch {arch!r}")


def _randomize_(named_params, seed: int) -> None:
    """Deterministic, well-scaled random values: weights ~ N(0, 1/fan_in), norms ~ 1, biases small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(named_params, key=lambda kv: kv[0]):
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                val = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
            elif "norm" in name or "in_layers.0" in name or "out_layers.0" in name:
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                val = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(val.to(p.dtype))


def random_controlnet(cfg: ControlNetConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> ControlNet:
    """Our ControlNet with every weight random (zero convs too), in eval mode."""
    model = ControlNet(cfg, dtype=dtype)
    _randomize_(model.named_parameters(), seed)
    return model.eval()


def diffusers_config(arch: str) -> dict:
    """A diffusers ControlNetModel config matching `make_tiny_config(arch)`, written by hand.

    Independent of our own config.json writer, so it checks it.
    """
    common = dict(
        conditioning_embedding_out_channels=TINY_HINT_BLOCKS, layers_per_block=2, norm_num_groups=32, in_channels=4
    )
    if arch == "sd15":
        return dict(
            common, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64,
            attention_head_dim=8,  # diffusers quirk: 8 *heads*
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        )
    if arch == "sd21":
        return dict(
            common, block_out_channels=(64, 128, 128, 128), cross_attention_dim=96,
            attention_head_dim=(1, 2, 2, 2), use_linear_projection=True,  # 64-wide heads
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        )
    if arch == "sdxl":
        return dict(
            common, block_out_channels=(64, 128, 128), cross_attention_dim=128,
            attention_head_dim=(1, 2, 2), use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    raise ValueError(f"unknown arch {arch!r}")


def random_diffusers_controlnet(arch: str, seed: int = 0):
    """A diffusers ControlNetModel with every weight random, in eval mode."""
    from diffusers import ControlNetModel

    model = ControlNetModel(**diffusers_config(arch))
    _randomize_(model.named_parameters(), seed)
    return model.eval()


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    hint: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def y(self) -> torch.Tensor | None:
        """SDXL `y` as ComfyUI builds it: pooled text, then each size/crop number embedded in 256."""
        if self.text_embeds is None:
            return None
        b = self.text_embeds.shape[0]
        return torch.cat([self.text_embeds, timestep_embedding(self.time_ids.flatten(), 256).reshape(b, -1)], dim=1)


def make_inputs(cfg: ControlNetConfig, batch: int = 2, size: int = 8, seed: int = 1) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    inputs = Inputs(
        x=torch.randn(batch, cfg.in_channels, size, size, generator=g),
        hint=torch.rand(batch, cfg.hint_channels, 8 * size, 8 * size, generator=g),
        t=torch.tensor([999.0, 421.0][:batch] + [10.0] * max(0, batch - 2)),
        context=torch.randn(batch, 7, cfg.context_dim, generator=g),
    )
    if cfg.adm_in_channels is not None:
        inputs.text_embeds = torch.randn(batch, cfg.adm_in_channels - 6 * 256, generator=g)
        inputs.time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch)
    return inputs


def run_ours(model: ControlNet, inp: Inputs) -> list[torch.Tensor]:
    """All residuals as one list: the skips in order, then the middle."""
    with torch.no_grad():
        down, mid = model(inp.x, inp.hint, inp.t, inp.context, y=inp.y)
    return [*down, mid]


def run_diffusers(model, inp: Inputs) -> list[torch.Tensor]:
    kw = {}
    if inp.text_embeds is not None:
        kw["added_cond_kwargs"] = {"text_embeds": inp.text_embeds, "time_ids": inp.time_ids}
    with torch.no_grad():
        down, mid = model(inp.x, inp.t, encoder_hidden_states=inp.context, controlnet_cond=inp.hint,
                          return_dict=False, **kw)
    return [*down, mid]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
