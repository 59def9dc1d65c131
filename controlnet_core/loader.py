"""Load and save ControlNets: detect the layout, rename keys, infer the config, build the model.

    cn = load_controlnet("control_v11p_sd15_canny.safetensors")
    cn.arch                          # "sd15" | "sd21" | "sdxl"
    down, mid = cn(x, hint, timesteps, context, y=None)

Supported: the original lllyasviel layout (`control_model.` prefix, `.pth`/`.safetensors`), the v1.1
layout (same names, no prefix), and the diffusers `ControlNetModel` layout (a single
`diffusion_pytorch_model.safetensors` or a folder with `config.json`), for SD1.x, SD2.x and SDXL.
Other control families are recognised and named in the error (see `formats/detect.py`).

How the config is found. Everything but three fields is read from tensor shapes. The three that
shapes cannot show:
* attention heads: from diffusers `config.json` or our own file metadata when present; otherwise
  the rule of the public models: 1x1-conv projections (SD1.x) -> 8 heads; linear projections
  (SD2.x/SDXL) -> 64-wide heads, falling back to 8 heads if some attention width is not a
  multiple of 64 (only tiny test models);
* GroupNorm groups: `config.json` / our metadata, else 32 (every public model);
* nothing else: a `config=` override replaces all of it (still checked against the shapes).
`save_controlnet` writes the full config into the safetensors metadata, so our own files always
round-trip exactly.

Loading is memory-light: the model is built on the meta device and the (already cast) tensors are
assigned into it, so no second copy of the weights is ever allocated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .config import ControlNetConfig
from .errors import LoadError
from .formats import detect
from .formats.diffusers import diffusers_to_native, from_diffusers_config, native_to_diffusers, to_diffusers_config
from .formats.files import read_json, read_state_dict, write_pickle, write_safetensors
from .formats.original import add_prefix, strip_prefix
from .model import ControlNet

StateDict = dict[str, torch.Tensor]

META_CONFIG_KEY = "controlnet_core.config"
SAVE_FORMATS = ("original", "original-prefixed", "diffusers")
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


# --------------------------------------------------------------------------------------------
# config inference

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

class _Reader:
    """Reads tensors cast to the target dtype/device and remembers the file's own dtypes."""

    def __init__(self, device: Any, dtype: torch.dtype | None):
        self.device, self.dtype = device, dtype
        self.file_dtypes: Counter[torch.dtype] = Counter()

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        self.file_dtypes[t.dtype] += t.numel()
        if t.is_floating_point() and self.dtype is not None:
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(device=self.device)

    @property
    def checkpoint_dtype(self) -> torch.dtype | None:
        floats = [(n, d) for d, n in self.file_dtypes.items() if d.is_floating_point]
        return max(floats)[1] if floats else None


def _diffusers_folder(folder: Path, dtype: torch.dtype | None) -> tuple[list[Path], Path | None]:
    config = folder / "config.json"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        return [folder / f for f in sorted(set(weight_map.values()))], config if config.exists() else None
    present = [folder / f for f in _DIFFUSERS_WEIGHTS if (folder / f).exists()]
    if not present:
        others = sorted(p.name for p in folder.iterdir())[:6]
        raise LoadError(
            f"{folder.name}: this folder has no diffusion_pytorch_model(.fp16).safetensors (found: {others}); "
            "give a diffusers ControlNet folder or a checkpoint file"
        )
    if dtype == torch.float16:  # a half-precision run prefers the .fp16 variant
        present.sort(key=lambda p: ".fp16." not in p.name)
    return [present[0]], config if config.exists() else None


def _read_source(src: Any, reader: _Reader, name: str | None) -> tuple[StateDict, dict[str, str], dict | None, str]:
    """(tensors, safetensors metadata, diffusers config.json or None, display name)."""
    if isinstance(src, dict):
        sd = {}
        for k, v in src.items():
            if not isinstance(v, torch.Tensor):
                raise LoadError(f"{name or 'state dict'}: value of {k!r} is a {type(v).__name__}, not a tensor")
            sd[k] = reader.cast(v)
        return sd, {}, None, name or "state dict"
    path = Path(os.fspath(src))
    if path.is_dir():
        files, config_path = _diffusers_folder(path, reader.dtype)
        sd, meta = {}, {}
        for f in files:
            part, part_meta = read_state_dict(f, reader.cast)
            sd.update(part)
            meta.update(part_meta)
        config = read_json(config_path) if config_path is not None else None
        return sd, meta, config, name or path.name
    sd, meta = read_state_dict(path, reader.cast)
    return sd, meta, None, name or path.name


def _check_keys(model: ControlNet, sd: StateDict, name: str, cfg: ControlNetConfig) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights are missing (e.g. {', '.join(missing[:4])})")
        if extra:
            parts.append(f"{len(extra)} weights are not part of a {cfg.arch} ControlNet (e.g. {', '.join(extra[:4])})")
        raise LoadError(f"{name}: {'; '.join(parts)}; the file is incomplete or a variant we do not support")
    for k, t in expected.items():
        if sd[k].shape != t.shape:
            raise LoadError(
                f"{name}: {k} has shape {tuple(sd[k].shape)} but the inferred {cfg.arch} config needs "
                f"{tuple(t.shape)}; the shapes fit no config we can build"
            )


def load_controlnet(
    src: str | os.PathLike | dict[str, torch.Tensor],
    device: Any = "cpu",
    dtype: torch.dtype | None = torch.float32,
    ops: Any = None,
    name: str | None = None,
    *,
    config: ControlNetConfig | None = None,
) -> ControlNet:
    """Load a ControlNet from a file, a diffusers folder or a state dict.

    `dtype=None` keeps the checkpoint's own dtype. `ops` is a host layer namespace (ComfyUI's
    `comfy.ops.*`). `config` overrides the inferred architecture (checked against the shapes).
    The returned model carries `source_name`, `source_format` and `checkpoint_dtype`.
    """
    reader = _Reader(device, dtype)
    sd, meta, diffusers_config, name = _read_source(src, reader, name)
    fmt = detect.detect_format(sd.keys(), name)
    if fmt == detect.ORIGINAL_PREFIXED:
        sd = strip_prefix(sd)
    elif fmt == detect.DIFFUSERS:
        sd = diffusers_to_native(sd, name)

    if config is not None:
        cfg = config
    else:
        cfg = infer_config(sd, name=name)
        if diffusers_config is not None:
            cfg = _take_unseen(cfg, from_diffusers_config(diffusers_config, name), "config.json", name)
        meta_cfg = _config_from_metadata(meta, name)
        if meta_cfg is not None:  # our own files: exact, so it goes last
            cfg = _take_unseen(cfg, meta_cfg, "its saved config", name)

    model = ControlNet(cfg, ops=ops, device="meta", dtype=dtype if dtype is not None else reader.checkpoint_dtype)
    _check_keys(model, sd, name, cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    model.source_name = name
    model.source_format = fmt
    model.checkpoint_dtype = reader.checkpoint_dtype
    return model


# --------------------------------------------------------------------------------------------
# saving

def save_controlnet(model: ControlNet, path: str | os.PathLike, format: str = "original", dtype: torch.dtype | None = None) -> None:
    """Write `model` as "original" (v1.1 names), "original-prefixed" (`control_model.`) or "diffusers".

    The container follows the extension: `.safetensors` (with our config in the metadata) or
    `.pth`/`.ckpt`/`.pt`. "diffusers" to a path not ending in `.safetensors` writes a folder with
    `config.json` + `diffusion_pytorch_model.safetensors`.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown format {format!r}; use one of {SAVE_FORMATS}")
    cfg = model.config
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    meta = {"format": "pt", META_CONFIG_KEY: json.dumps(dataclasses.asdict(cfg))}
    path = Path(os.fspath(path))
    is_st = path.suffix.lower() in (".safetensors", ".sft")
    if format == "diffusers":
        sd = native_to_diffusers(sd, cfg)
        if not is_st:
            path.mkdir(parents=True, exist_ok=True)
            with open(path / "config.json", "w", encoding="utf-8") as f:
                json.dump(to_diffusers_config(cfg), f, indent=2)
            write_safetensors(sd, path / "diffusion_pytorch_model.safetensors", meta)
            return
    elif format == "original-prefixed":
        sd = add_prefix(sd)
    if is_st:
        write_safetensors(sd, path, meta)
    else:
        write_pickle(sd, path)
