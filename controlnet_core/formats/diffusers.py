"""The diffusers `ControlNetModel` layout: key renaming both ways and `config.json` both ways.

Diffusers groups the encoder by level (`down_blocks.L.resnets.j`, `.attentions.j`,
`.downsamplers.0`) where the LDM layout numbers blocks flat (`input_blocks.N`); inside a transformer
the names are identical, inside a ResBlock they differ (`norm1` = `in_layers.0`, ...). The renaming
is a table of module prefixes built from the block structure (levels, res blocks per level, hint
convs, middle attention), which both sides' keys reveal.

`config.json` quirk: diffusers' `attention_head_dim` holds the number of heads (per level) unless
`num_attention_heads` is set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ControlNetConfig
from ..errors import LoadError

StateDict = dict[str, torch.Tensor]

# ResBlock sub-module names: native -> diffusers.
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}


@dataclass(frozen=True)
class Layout:
    """The block structure the key renaming depends on."""

    levels: int
    num_res_blocks: int
    hint_convs: int           # convs in the hint encoder, the final one included
    level_attention: tuple[bool, ...]
    mid_attention: bool

    @classmethod
    def from_config(cls, cfg: ControlNetConfig) -> Layout:
        return cls(
            levels=len(cfg.channel_mult),
            num_res_blocks=cfg.num_res_blocks,
            hint_convs=2 * len(cfg.hint_block_channels),
            level_attention=tuple(d > 0 for d in cfg.transformer_depth),
            mid_attention=cfg.transformer_depth_middle > 0,
        )

    @classmethod
    def from_diffusers_keys(cls, keys: set[str], name: str) -> Layout:
        def indices(pattern: str) -> set[int]:
            rx = re.compile(pattern)
            return {int(m.group(1)) for k in keys if (m := rx.match(k))}

        levels = indices(r"down_blocks\.(\d+)\.")
        if not levels:
            raise LoadError(f"{name}: diffusers ControlNet without any down_blocks.* keys; the file is incomplete")
        n_levels = max(levels) + 1
        nres = indices(r"down_blocks\.0\.resnets\.(\d+)\.")
        hint = indices(r"controlnet_cond_embedding\.blocks\.(\d+)\.")
        return cls(
            levels=n_levels,
            num_res_blocks=max(nres) + 1 if nres else 0,
            hint_convs=(max(hint) + 1 if hint else 0) + 2,
            level_attention=tuple(
                any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(n_levels)
            ),
            mid_attention=any(k.startswith("mid_block.attentions.0.") for k in keys),
        )


def _prefix_table(layout: Layout) -> list[tuple[str, str, bool]]:
    """(native module prefix, diffusers module prefix, is a ResBlock) for every module with weights."""
    t: list[tuple[str, str, bool]] = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("label_emb.0.0", "add_embedding.linear_1", False),
        ("label_emb.0.2", "add_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("input_hint_block.0", "controlnet_cond_embedding.conv_in", False),
        (f"input_hint_block.{2 * (layout.hint_convs - 1)}", "controlnet_cond_embedding.conv_out", False),
        ("middle_block_out.0", "controlnet_mid_block", False),
        ("middle_block.0", "mid_block.resnets.0", True),
    ]
    for k in range(layout.hint_convs - 2):
        t.append((f"input_hint_block.{2 * (k + 1)}", f"controlnet_cond_embedding.blocks.{k}", False))
    block = 1
    for level in range(layout.levels):
        for j in range(layout.num_res_blocks):
            t.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", True))
            t.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", False))
            block += 1
        if level != layout.levels - 1:
            t.append((f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False))
            block += 1
    for i in range(block):
        t.append((f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", False))
    if layout.mid_attention:
        t += [("middle_block.1", "mid_block.attentions.0", False), ("middle_block.2", "mid_block.resnets.1", True)]
    else:
        t.append(("middle_block.1", "mid_block.resnets.1", True))
    return t


def _rename_key(key: str, table: dict[str, tuple[str, bool]], resnet_names: dict[str, str]) -> str | None:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
        hit = table.get(".".join(parts[:cut]))
        if hit is None:
            continue
        new_prefix, is_resnet = hit
        rest = parts[cut:]
        if is_resnet:
            sub = resnet_names.get(".".join(rest[:-1]))
            if sub is None:
                return None
            rest = [*sub.split("."), rest[-1]]
        return ".".join([new_prefix, *rest])
    return None


def _rename(sd: StateDict, table: dict[str, tuple[str, bool]], resnet_names: dict[str, str]) -> tuple[StateDict, list[str]]:
    """Rename by the longest module prefix found in `table`; returns (renamed, unmapped keys)."""
    out: StateDict = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        new = _rename_key(key, table, resnet_names)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    return out, unmapped


def diffusers_to_native(sd: StateDict, name: str) -> StateDict:
    """Diffusers key names -> our (LDM) names. Keys that fit nowhere are a LoadError naming a few."""
    layout = Layout.from_diffusers_keys(set(sd), name)
    table = {d: (n, r) for n, d, r in _prefix_table(layout)}
    out, unmapped = _rename(sd, table, _RESNET_BACK)
    if unmapped:
        raise LoadError(
            f"{name}: {len(unmapped)} diffusers keys fit no part of a ControlNet (e.g. "
            f"{', '.join(sorted(unmapped)[:4])}); this is a ControlNet variant we do not support"
        )
    return out


def native_to_diffusers(sd: StateDict, cfg: ControlNetConfig) -> StateDict:
    table = {n: (d, r) for n, d, r in _prefix_table(Layout.from_config(cfg))}
    out, unmapped = _rename(sd, table, _RESNET)
    if unmapped:
        raise ValueError(f"cannot name these weights in the diffusers layout: {sorted(unmapped)[:4]}")
    return out


# --------------------------------------------------------------------------------------------
# config.json

def to_diffusers_config(cfg: ControlNetConfig) -> dict:
    """A diffusers `ControlNetModel` config describing the same network."""
    levels = len(cfg.channel_mult)
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    if cfg.transformer_depth[-1] > 0 and cfg.transformer_depth[-1] != cfg.transformer_depth_middle:
        # diffusers uses the last level's depth for the middle block too
        raise ValueError(
            "this ControlNet cannot be written in the diffusers layout: its last level and its middle "
            f"block have different transformer depths ({cfg.transformer_depth[-1]} vs "
            f"{cfg.transformer_depth_middle})"
        )
    if cfg.transformer_depth_middle == 0:
        raise ValueError("this ControlNet has no middle attention, which diffusers' ControlNetModel cannot express")
    depths = [d if d > 0 else 1 for d in cfg.transformer_depth]
    depths[-1] = cfg.transformer_depth_middle
    heads = [cfg.heads(w)[0] for w in widths]
    config = {
        "_class_name": "ControlNetModel",
        "in_channels": cfg.in_channels,
        "conditioning_channels": cfg.hint_channels,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if d > 0 else "DownBlock2D" for d in cfg.transformer_depth],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "only_cross_attention": False,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": depths,
        # the diffusers naming quirk: this field holds the number of heads per level
        "attention_head_dim": heads if len(set(heads)) > 1 else heads[0],
        "num_attention_heads": None,
        "use_linear_projection": cfg.use_linear_projection,
        "class_embed_type": None,
        "addition_embed_type": "text_time" if cfg.adm_in_channels is not None else None,
        "addition_time_embed_dim": 256 if cfg.adm_in_channels is not None else None,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "controlnet_conditioning_channel_order": "rgb",
        "conditioning_embedding_out_channels": list(cfg.hint_block_channels),
        "global_pool_conditions": False,
    }
    assert len(config["down_block_types"]) == levels
    return config


def _per_level(value, levels: int, field: str, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, (list, tuple)) and len(value) == levels and all(isinstance(v, int) for v in value):
        return list(value)
    raise LoadError(f"{name}: config.json field {field}={value!r} is not one integer or one per level ({levels})")


def from_diffusers_config(c: dict, name: str) -> ControlNetConfig:
    """Our config from a diffusers ControlNetModel `config.json` (checked against shapes later)."""
    try:
        widths = list(c["block_out_channels"])
        types = list(c.get("down_block_types") or ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        levels = len(widths)
        mc = widths[0]
        if any(w % mc for w in widths):
            raise LoadError(f"{name}: block_out_channels {widths} are not multiples of the first width")
        mid_type = c.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid_type != "UNetMidBlock2DCrossAttn":
            raise UnsupportedLayout(f"{name}: mid_block_type {mid_type!r} is not supported (only UNetMidBlock2DCrossAttn)")
        if c.get("class_embed_type") or c.get("encoder_hid_dim_type"):
            raise UnsupportedLayout(f"{name}: class_embed_type / encoder_hid_dim_type are not supported")
        addition = c.get("addition_embed_type")
        if addition not in (None, "text_time"):
            raise UnsupportedLayout(f"{name}: addition_embed_type {addition!r} is not supported (only 'text_time')")
        depths_cfg = _per_level(c.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block", name)
        attn = [t.startswith("CrossAttn") for t in types]
        heads_field = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
        heads = _per_level(heads_field, levels, "attention_head_dim", name)
        attn_widths = [(w, h) for w, h, a in zip(widths, heads, attn) if a] + [(widths[-1], heads[-1])]
        num_heads, head_dim = 8, None
        if len({h for _, h in attn_widths}) == 1 and not c.get("use_linear_projection", False):
            num_heads = attn_widths[0][1]
        elif len({w // h for w, h in attn_widths}) == 1:
            head_dim = attn_widths[0][0] // attn_widths[0][1]
        elif len({h for _, h in attn_widths}) == 1:
            num_heads = attn_widths[0][1]
        else:
            raise UnsupportedLayout(
                f"{name}: attention heads {heads} over widths {widths} are neither a fixed count nor a fixed width"
            )
        return ControlNetConfig(
            model_channels=mc,
            channel_mult=tuple(w // mc for w in widths),
            num_res_blocks=int(c.get("layers_per_block", 2)),
            transformer_depth=tuple(d if a else 0 for d, a in zip(depths_cfg, attn)),
            transformer_depth_middle=depths_cfg[-1],
            context_dim=int(c.get("cross_attention_dim", 1280)),
            num_heads=num_heads,
            head_dim=head_dim,
            use_linear_projection=bool(c.get("use_linear_projection", False)),
            adm_in_channels=c.get("projection_class_embeddings_input_dim") if addition == "text_time" else None,
            in_channels=int(c.get("in_channels", 4)),
            hint_channels=int(c.get("conditioning_channels", 3)),
            norm_groups=int(c.get("norm_num_groups", 32)),
            hint_block_channels=tuple(c.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
        )
    except LoadError:
        raise
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise LoadError(f"{name}: config.json does not describe a ControlNetModel we can build ({e})") from e


class UnsupportedLayout(LoadError):
    """A diffusers config using options this implementation does not build."""
