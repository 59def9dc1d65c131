"""The classic ControlNet family's files: native (LDM) state dicts from each layout, and the config
read from tensor shapes.

How the config is found. Everything but three fields is read from tensor shapes. The three that
shapes cannot show:
* attention heads: from diffusers `config.json` or our own file metadata when present; otherwise
  the rule of the public models: 1x1-conv projections (SD1.x) -> 8 heads; linear projections
  (SD2.x/SDXL) -> 64-wide heads, falling back to 8 heads if some attention width is not a
  multiple of 64 (only tiny test models);
* GroupNorm groups: `config.json` / our metadata, else 32 (every public model);
* nothing else: a `config=` override replaces all of it (still checked against the shapes).
`loader.save_controlnet` writes the full config into the safetensors metadata (`META_CONFIG_KEY`),
so our own files always round-trip exactly.
"""

from __future__ import annotations

import dataclasses
import json
import re

import torch

from ..config import ControlNetConfig
from ..errors import LoadError
from . import detect
from .diffusers import diffusers_to_native, from_diffusers_config
from .original import strip_prefix
from .source import Source, StateDict

META_CONFIG_KEY = "controlnet_core.config"


def _need(sd: StateDict, key: str, name: str) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise LoadError(f"{name}: the weight {key} is missing; the ControlNet file is incomplete or damaged")
    return t


def infer_config(state_dict: StateDict, *, name: str = "state dict") -> ControlNetConfig:
    """The architecture from tensor shapes of a state dict with native (LDM) key names.

    Heads and GroupNorm groups cannot be seen in shapes; see the module docstring for the rule.
    """
    sd = state_dict
    stem = _need(sd, "input_blocks.0.0.weight", name)
    if stem.ndim != 4:
        raise LoadError(f"{name}: input_blocks.0.0.weight has shape {tuple(stem.shape)}; a conv weight is 4-D")
    mc, in_channels = stem.shape[0], stem.shape[1]

    depth_of: dict[str, int] = {}
    rx = re.compile(r"^(input_blocks\.\d+|middle_block)\.1\.transformer_blocks\.(\d+)\.")
    for k in sd:
        m = rx.match(k)
        if m:
            depth_of[m.group(1)] = max(depth_of.get(m.group(1), 0), int(m.group(2)) + 1)

    levels: list[list[tuple[int, int]]] = [[]]  # per level: (width, transformer depth) per block
    i = 1
    while True:
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        elif f"input_blocks.{i}.0.out_layers.3.weight" in sd:
            width = sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]
            levels[-1].append((width, depth_of.get(f"input_blocks.{i}", 0)))
        else:
            break
        i += 1
    if not levels[0]:
        raise LoadError(f"{name}: no ResBlocks found under input_blocks.1; the file is not a complete ControlNet")
    nres = len(levels[0])
    if any(len(lv) != nres for lv in levels):
        raise LoadError(
            f"{name}: the levels have {[len(lv) for lv in levels]} ResBlocks each; only a fixed number per "
            "level is supported (shapes fit no config)"
        )
    channel_mult, depths = [], []
    for lv in levels:
        widths = {w for w, _ in lv}
        level_depths = {d for _, d in lv}
        if len(widths) != 1 or len(level_depths) != 1 or next(iter(widths)) % mc:
            raise LoadError(
                f"{name}: a level mixes widths {sorted(widths)} or transformer depths {sorted(level_depths)}; "
                "shapes fit no config"
            )
        channel_mult.append(next(iter(widths)) // mc)
        depths.append(next(iter(level_depths)))

    context_dim = 768
    use_linear = False
    for k, t in sd.items():
        if k.endswith("attn2.to_k.weight"):
            context_dim = t.shape[1]
        if k.endswith(".proj_in.weight"):
            use_linear = t.ndim == 2

    attn_widths = [mc * m for m, d in zip(channel_mult, depths) if d] + [mc * channel_mult[-1]]
    num_heads, head_dim = 8, None
    if use_linear and all(w % 64 == 0 for w in attn_widths):
        head_dim = 64

    hint_idx = sorted(
        int(m.group(1)) for k in sd if (m := re.match(r"^input_hint_block\.(\d+)\.weight$", k))
    )
    if not hint_idx:
        raise LoadError(f"{name}: the weight input_hint_block.0.weight is missing; the file is incomplete")
    hint_widths = [sd[f"input_hint_block.{j}.weight"].shape[0] for j in hint_idx]
    if len(hint_idx) % 2 or hint_idx != list(range(0, 2 * len(hint_idx), 2)):
        raise LoadError(
            f"{name}: the hint encoder has convs at {hint_idx}; expected an even number at 0, 2, 4, ... "
            "(shapes fit no config)"
        )
    adm = sd.get("label_emb.0.0.weight")
    try:
        return ControlNetConfig(
            model_channels=mc,
            channel_mult=tuple(channel_mult),
            num_res_blocks=nres,
            transformer_depth=tuple(depths),
            transformer_depth_middle=depth_of.get("middle_block", 0),
            context_dim=context_dim,
            num_heads=num_heads,
            head_dim=head_dim,
            use_linear_projection=use_linear,
            adm_in_channels=None if adm is None else adm.shape[1],
            in_channels=in_channels,
            hint_channels=sd["input_hint_block.0.weight"].shape[1],
            hint_block_channels=tuple(hint_widths[0:-1:2]),
        )
    except ValueError as e:
        raise LoadError(f"{name}: the tensor shapes fit no ControlNet config ({e})") from e


def _config_from_metadata(meta: dict[str, str], name: str) -> ControlNetConfig | None:
    raw = meta.get(META_CONFIG_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        fields = {f.name for f in dataclasses.fields(ControlNetConfig)}
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return ControlNetConfig(**data)
    except (ValueError, TypeError) as e:
        raise LoadError(f"{name}: its {META_CONFIG_KEY} metadata is not a valid config ({e}); re-save the file") from e


_UNSEEN_FIELDS = ("num_heads", "head_dim", "norm_groups")  # not visible in tensor shapes


def _take_unseen(inferred: ControlNetConfig, source: ControlNetConfig, what: str, name: str) -> ControlNetConfig:
    """`inferred` with heads and groups from `source`, after checking that the visible fields agree."""
    for f in dataclasses.fields(ControlNetConfig):
        if f.name in _UNSEEN_FIELDS:
            continue
        a, b = getattr(source, f.name), getattr(inferred, f.name)
        if a != b:
            raise LoadError(
                f"{name}: {what} says {f.name}={a!r} but the weights have {f.name}={b!r}; the config does "
                "not belong to these weights: fix or remove it"
            )
    try:
        return dataclasses.replace(inferred, **{k: getattr(source, k) for k in _UNSEEN_FIELDS})
    except ValueError as e:
        raise LoadError(f"{name}: {what} does not fit the weights ({e})") from e


# --------------------------------------------------------------------------------------------
# reading

def native_state_dict(source: Source) -> StateDict:
    layout = source.detected.layout
    if layout == detect.ORIGINAL_PREFIXED:
        return strip_prefix(source.sd)
    if layout == detect.DIFFUSERS:
        return diffusers_to_native(source.sd, source.name)
    return source.sd


def controlnet_config(source: Source, sd: StateDict, config: ControlNetConfig | None = None) -> ControlNetConfig:
    """The ControlNet config of `sd` (native key names): `config` when given, else inferred from the
    shapes, heads and groups taken from a diffusers config.json or our saved metadata. Also for
    family loaders built on the classic ControlNet (Union)."""
    if config is not None:
        return config
    name = source.name
    cfg = infer_config(sd, name=name)
    if source.config_json is not None:
        cfg = _take_unseen(cfg, from_diffusers_config(source.config_json, name), "config.json", name)
    meta_cfg = _config_from_metadata(source.meta, name)
    if meta_cfg is not None:  # our own files: exact, so it goes last
        cfg = _take_unseen(cfg, meta_cfg, "its saved config", name)
    return cfg
