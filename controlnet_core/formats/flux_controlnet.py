"""Flux ControlNet key layouts and the config read from shapes.

Layouts (`detect.py` tells them by what the file IS, not by its block names):

  "xlabs"            XLabs' own files (`flux-canny-controlnet-v3.safetensors`): Black Forest Labs'
                     names (`double_blocks.0.img_attn.qkv`), a pixel stem `input_hint_block.{0..14}`;
                     our native names, read as they are.
  "mistoline"        TheMisto's MistoLine (`mistoLine_flux.dev.safetensors`): BFL names, its own pixel
                     stem `input_cond_block.encoder.*`, output blocks `controlnet_blocks.i.linear`
                     (+ SiLU) and `single_controlnet_blocks.*` (renamed to ours, as ComfyUI does).
  "native"           a latent net re-saved with BFL/ComfyUI names (`pos_embed_input`, no
                     `input_hint_block`): ComfyUI builds it as XLabs (the latent stem lost); we read
                     it as the latent net it is.
  "diffusers"        diffusers' `FluxControlNetModel` names (InstantX, Shakker-Labs Union / Union-Pro /
                     Pro-2.0, AliMama inpaint; XLabs' `*-diffusers` repos, whose pixel stem
                     `input_hint_block.conv_in/blocks.k/conv_out` ComfyUI drops): converted here.

The diffusers -> BFL conversion (the one ComfyUI's `flux_to_diffusers` map describes): q, k, v
projections are stacked into `qkv` (double blocks) or, with `proj_mlp`, into `linear1` (single
blocks); norms, modulations, MLPs and embedders are renamed; the ControlNet's own parts
(`controlnet_blocks`, `controlnet_single_blocks`, `controlnet_mode_embedder`) keep their names and
`controlnet_x_embedder` is `pos_embed_input`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from ..errors import LoadError

if TYPE_CHECKING:
    from ..flux_controlnet import FluxControlNetConfig

StateDict = dict[str, torch.Tensor]

XLABS = "xlabs"
MISTOLINE = "mistoline"
NATIVE = "native"
DIFFUSERS = "diffusers"

_RENAMES = {  # diffusers prefix -> BFL prefix (everything but the stacked projections)
    "x_embedder.": "img_in.",
    "context_embedder.": "txt_in.",
    "controlnet_x_embedder.": "pos_embed_input.",
    "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
    "input_hint_block.conv_in.": "input_hint_block.0.",
    "input_hint_block.conv_out.": "input_hint_block.14.",
}
_DOUBLE = {  # inside transformer_blocks.i -> double_blocks.i
    "norm1.linear.": "img_mod.lin.",
    "norm1_context.linear.": "txt_mod.lin.",
    "attn.to_out.0.": "img_attn.proj.",
    "attn.to_add_out.": "txt_attn.proj.",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "ff.net.0.proj.": "img_mlp.0.",
    "ff.net.2.": "img_mlp.2.",
    "ff_context.net.0.proj.": "txt_mlp.0.",
    "ff_context.net.2.": "txt_mlp.2.",
}
_SINGLE = {  # inside single_transformer_blocks.i -> single_blocks.i
    "norm.linear.": "modulation.lin.",
    "proj_out.": "linear2.",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}
_STACKED = {  # BFL name <- the diffusers projections stacked in this order (rows)
    "double": {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
    "single": {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
}
_KEEP = ("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_mode_embedder.")
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_HINT_BLOCK = re.compile(r"^input_hint_block\.blocks\.(\d+)\.(.+)$")


def layout_of(keys: set[str]) -> str:
    """Which Flux ControlNet layout a key set is in (the caller knows it is one)."""
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys) \
            or "controlnet_x_embedder.weight" in keys:
        return DIFFUSERS
    return XLABS if "input_hint_block.0.weight" in keys else NATIVE


def to_native(sd: StateDict, layout: str, name: str) -> StateDict:
    """The state dict with BFL names (what `FluxControlNet` is built with)."""
    if layout == MISTOLINE:
        single = "single_controlnet_blocks."
        return {("controlnet_single_blocks." + k[len(single):] if k.startswith(single) else k): v for k, v in sd.items()}
    if layout != DIFFUSERS:
        return dict(sd)
    out: StateDict = {}
    stacks: dict[tuple[str, str, str, str], dict[str, torch.Tensor]] = {}  # (kind, i, target, param) -> parts
    for key, t in sd.items():
        m = _BLOCK.match(key)
        if m is not None:
            group, index, rest = m.groups()
            kind = "double" if group == "transformer_blocks" else "single"
            prefix = f"{'double_blocks' if kind == 'double' else 'single_blocks'}.{index}."
            stacked = next(((target, part) for target, parts in _STACKED[kind].items() for part in parts
                            if rest.startswith(part + ".")), None)
            if stacked is not None:
                target, part = stacked
                param = rest[len(part) + 1:]
                stacks.setdefault((kind, index, target, param), {})[part] = t
                continue
            table = _DOUBLE if kind == "double" else _SINGLE
            new = next((prefix + v + rest[len(k):] for k, v in table.items() if rest.startswith(k)), None)
            if new is None:
                raise LoadError(f"{name}: {key} is no part of a Flux ControlNet block; the file is a variant we do not know")
            out[new] = t
            continue
        m = _HINT_BLOCK.match(key)
        if m is not None:  # diffusers' ControlNetConditioningEmbedding blocks k -> conv 2 + 2k
            out[f"input_hint_block.{2 + 2 * int(m.group(1))}.{m.group(2)}"] = t
            continue
        new = next((v + key[len(k):] for k, v in _RENAMES.items() if key.startswith(k)), None)
        if new is None and key.startswith(_KEEP):
            new = key
        if new is None:
            raise LoadError(f"{name}: {key} is no part of a Flux ControlNet; the file is a variant we do not know")
        out[new] = t
    for (kind, index, target, param), parts in stacks.items():
        order = next(p for tgt, p in _STACKED[kind].items() if tgt == target)
        missing = [p for p in order if p not in parts]
        if missing:
            raise LoadError(f"{name}: block {index} lacks {', '.join(missing)} ({param}); the file is incomplete")
        prefix = f"{'double_blocks' if kind == 'double' else 'single_blocks'}.{index}."
        out[prefix + target + "." + param] = torch.cat([parts[p] for p in order], dim=0)
    return out


def _count(sd: StateDict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def axes_for(head_dim: int) -> tuple[int, int, int]:
    """The rotary axes of a head: Flux's (16, 56, 56) for 128; the same split (two equal even
    spatial axes of about 7/16 of the head, the rest for the index axis) for other widths."""
    k = int(head_dim * 7 / 16) // 2 * 2
    return head_dim - 2 * k, k, k


def infer_config(sd: StateDict, name: str) -> "FluxControlNetConfig":
    """The architecture from BFL-named shapes (files carry no config)."""
    from ..flux_controlnet import FluxControlNetConfig

    def shape(key: str) -> tuple[int, ...]:
        t = sd.get(key)
        if t is None:
            raise LoadError(f"{name}: {key} is missing; the file is no complete Flux ControlNet")
        return tuple(t.shape)

    hidden, in_channels = shape("img_in.weight")
    depth = _count(sd, r"^double_blocks\.(\d+)\.")
    single = _count(sd, r"^single_blocks\.(\d+)\.")
    if depth + single == 0:
        raise LoadError(f"{name}: a Flux ControlNet without transformer blocks; the file is incomplete")
    if depth:
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
        bias = "double_blocks.0.img_attn.qkv.bias" in sd
    else:
        head_dim = shape("single_blocks.0.norm.query_norm.scale")[0]
        mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
        bias = True
    if hidden % head_dim:
        raise LoadError(f"{name}: width {hidden} is no multiple of the head width {head_dim}; the file is damaged")
    mistoline = "input_cond_block.encoder.0.weight" in sd
    pixel = mistoline or "input_hint_block.0.weight" in sd
    modes = shape("controlnet_mode_embedder.weight")[0] if "controlnet_mode_embedder.weight" in sd else 0
    return FluxControlNetConfig(
        hidden_size=hidden, num_heads=hidden // head_dim, depth=depth, depth_single=single,
        in_channels=in_channels, hint_channels=shape("pos_embed_input.weight")[1],
        context_dim=shape("txt_in.weight")[1], vec_dim=shape("vector_in.in_layer.weight")[1],
        mlp_hidden=mlp_hidden, guidance_embed="guidance_in.in_layer.weight" in sd, qkv_bias=bias,
        axes_dim=axes_for(head_dim), num_modes=modes, hint="pixel" if pixel else "latent",
        stem="mistoline" if mistoline else "xlabs",
    )
