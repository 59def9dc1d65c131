"""Control-LoRA fixtures, following the recipe in shared/notes/control-families.md §2.3.

A base model = a random diffusers `UNet2DConditionModel` (the tiny configs of helpers_models, or a
full-size one); its encoder copied by diffusers' own `ControlNetModel.from_unet` is what the
Control-LoRA is a difference to. The file is written in Stability's layout: for every low-rank
layer (the modules diffusers' `CONTROL_LORA_TO_DIFFUSERS` lists, under their LDM names) a random
`.up` / `.down`; the hint encoder, zero convs, middle_block_out and every norm stored whole; every
bias stored whole (equal to the base model's on low-rank layers unless asked otherwise); the
`lora_controlnet` marker; a `.safetensors` container.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import safetensors.torch
import torch

from comfyui_controlnet_core.controlnet_core.config import ControlNetConfig
from comfyui_controlnet_core.controlnet_core.formats.diffusers import diffusers_to_native
from comfyui_controlnet_core.controlnet_core.model import ControlNet

ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")

# LDM names of the layers diffusers' Control-LoRA conversion treats as low-rank (to_q/k/v,
# to_out.0, ff.net.0.proj, ff.net.2, proj_in/out, the downsample conv, conv1/conv2, conv_in,
# conv_shortcut, the time/label embedding linears, time_emb_proj).
_LOWRANK = re.compile(
    r"(^input_blocks\.0\.0$|^time_embed\.[02]$|^label_emb\.0\.[02]$|\.op$|\.in_layers\.2$|\.out_layers\.3$"
    r"|\.emb_layers\.1$|\.skip_connection$|\.proj_in$|\.proj_out$|\.attn[12]\.to_[qkv]$|\.attn[12]\.to_out\.0$"
    r"|\.ff\.net\.0\.proj$|\.ff\.net\.2$)"
)


def is_lowrank(module: str) -> bool:
    return module.startswith(ENCODER) and _LOWRANK.search(module) is not None


def unet_config(arch: str) -> dict:
    """A diffusers UNet2DConditionModel config whose encoder is helpers_models' tiny `arch` config."""
    from helpers_models import diffusers_config

    c = diffusers_config(arch)
    for k in ("conditioning_embedding_out_channels",):
        c.pop(k)
    c["up_block_types"] = tuple(
        "CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(c["down_block_types"]))
    c["out_channels"] = 4
    c["sample_size"] = 8
    return c


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    from helpers_models import _randomize_

    _randomize_(module.named_parameters(), seed)
    return module.eval()


def host_weights_of(controlnet_model) -> dict[str, torch.Tensor]:
    """The base model's encoder in LDM names, from diffusers' ControlNetModel.from_unet copy."""
    native = diffusers_to_native(dict(controlnet_model.state_dict()), "base")
    return {k: v for k, v in native.items() if k.startswith(ENCODER)}


def make_file_sd(cfg: ControlNetConfig, host: dict[str, torch.Tensor], rank: int, seed: int,
                 bias_override: bool = False) -> dict[str, torch.Tensor]:
    """A Control-LoRA state dict for base model `host` (LDM names). Low-rank factors are scaled so
    the delta is of the order of the weight itself (a visible change, well-conditioned)."""
    g = torch.Generator().manual_seed(seed)
    skeleton = ControlNet(cfg, device="meta")
    sd: dict[str, torch.Tensor] = {}
    for key, p in skeleton.state_dict().items():
        module, _, kind = key.rpartition(".")
        if is_lowrank(module) and kind == "weight":
            out, fan_in = p.shape[0], math.prod(p.shape[1:])
            r = min(rank, out, fan_in)
            up = torch.randn(out, r, generator=g) / math.sqrt(r)
            down = torch.randn(r, *p.shape[1:], generator=g) / math.sqrt(fan_in)
            sd[module + ".up"] = up if p.ndim == 2 else up[:, :, None, None]
            sd[module + ".down"] = down
        elif is_lowrank(module) and kind == "bias" and not bias_override:
            sd[key] = host[key].clone()
        elif p.ndim >= 2:
            sd[key] = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
        elif "norm" in key or "in_layers.0" in key or "out_layers.0" in key:
            sd[key] = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(p.shape, generator=g)
    sd["lora_controlnet"] = torch.tensor([])
    return sd


def save(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype = torch.float32) -> Path:
    safetensors.torch.save_file({k: (v.to(dtype) if v.numel() else v).contiguous() for k, v in sd.items()}, path)
    return path


def by_the_rule(cfg: ControlNetConfig, host: dict[str, torch.Tensor], file_sd: dict[str, torch.Tensor]) -> ControlNet:
    """The ControlNet the stated rule describes, built by hand in float64: each low-rank layer's
    weight is `W + up.flatten(1) @ down.flatten(1)` with W the file's own weight if it stores one,
    else the host's; everything else the file stores whole is the file's, the rest the host's."""
    net = ControlNet(cfg)
    sd = {}
    for key, p in net.state_dict().items():
        module = key[: -len(".weight")]
        base = file_sd[key] if key in file_sd else host[key]  # a low-rank layer may also store its weight
        if key.endswith(".weight") and module + ".up" in file_sd:
            up, down = file_sd[module + ".up"].double(), file_sd[module + ".down"].double()
            sd[key] = (base.double() + (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
                       .reshape(p.shape)).float()
        else:
            sd[key] = base
    net.load_state_dict(sd)
    return net.eval()
