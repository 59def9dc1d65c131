"""The ControlNet Union / ProMax layout (xinsir `controlnet-union-sdxl-1.0`, diffusers
`ControlNetUnionModel`): a diffusers SDXL ControlNet plus the union part, in both the single file
(`diffusion_pytorch_model.safetensors`, `..._promax.safetensors`) and the folder with `config.json`.

The union part (xinsir `models/controlnet_union.py`, same names in diffusers):

    task_embedding                           (num_types, 320)   one learned vector per control type
    transformer_layes.{i}.attn.in_proj_weight/_bias, .attn.out_proj.*, .ln_1.*, .ln_2.*,
        .mlp.c_fc.*, .mlp.c_proj.*           one CLIP-style block over the type tokens ("layes" sic)
    spatial_ch_projs.{weight,bias}           (320, 320)         token -> per-channel offset
    control_add_embedding.linear_{1,2}.*     (1280, 256 * num_types), (1280, 1280)

The type count is `task_embedding.shape[0]`: 6 for Union, 8 for ProMax. Our names keep the file's,
except `attn.in_proj_weight` -> `attn.in_proj.weight` (a Linear layer, so a host's casting layers
handle it like every other weight; ComfyUI names it the same way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import LoadError
from .diffusers import diffusers_to_native

StateDict = dict[str, torch.Tensor]

UNION_PREFIXES = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")
DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"


@dataclass(frozen=True)
class UnionShape:
    """What the union part's shapes say."""

    num_types: int       # 6 (Union) or 8 (ProMax)
    width: int           # token width; must be the ControlNet's first width (320)
    token_layers: int    # blocks in transformer_layes (1)
    type_embed_dim: int  # sinusoid width per type in control_add_embedding (256)
    emb_dim: int         # the time-embedding width it adds to (1280)


def is_union_key(key: str) -> bool:
    return key.startswith(UNION_PREFIXES)


def _native_key(key: str) -> str:
    return re.sub(r"\.attn\.in_proj_(weight|bias)$", r".attn.in_proj.\1", key)


def split_union(sd: StateDict, name: str) -> tuple[StateDict, StateDict]:
    """(the classic ControlNet part in our names, the union part in our names)."""
    if DIFFUSERS_MARKER not in sd:
        raise LoadError(
            f"{name}: a ControlNet Union file without the diffusers ControlNet keys ({DIFFUSERS_MARKER}); "
            "only the diffusers layout of xinsir's files (single file or folder) is read"
        )
    union = {_native_key(k): v for k, v in sd.items() if is_union_key(k)}
    classic = diffusers_to_native({k: v for k, v in sd.items() if not is_union_key(k)}, name)
    return classic, union


def union_shape(union: StateDict, name: str) -> UnionShape:
    """The union part's sizes, from our names; a LoadError when a piece is missing or inconsistent."""
    def need(key: str) -> torch.Tensor:
        t = union.get(key)
        if t is None:
            raise LoadError(f"{name}: the Union weight {key} is missing; the file is incomplete or damaged")
        return t

    task = need("task_embedding")
    if task.ndim != 2 or task.shape[0] < 1:
        raise LoadError(f"{name}: task_embedding has shape {tuple(task.shape)}; a Union file has (types, 320)")
    num_types, width = task.shape
    layers = sorted({int(m.group(1)) for k in union if (m := re.match(r"^transformer_layes\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise LoadError(f"{name}: the Union token blocks (transformer_layes.*) are missing or not numbered 0..n")
    lin1 = need("control_add_embedding.linear_1.weight")
    if lin1.ndim != 2 or lin1.shape[1] % num_types:
        raise LoadError(
            f"{name}: control_add_embedding.linear_1 takes {tuple(lin1.shape)[1:]} inputs, not a multiple of "
            f"the {num_types} control types; the file is damaged"
        )
    return UnionShape(num_types, width, len(layers), lin1.shape[1] // num_types, lin1.shape[0])
