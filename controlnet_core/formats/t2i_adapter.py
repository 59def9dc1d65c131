"""T2I-Adapter files: the two key layouts, and the architecture read from tensor shapes.

tencentarc  TencentARC's own `.pth` files, whose names ComfyUI also uses (our native names):
            full/SDXL `conv_in.*`, `body.{k}.{in_conv,block1,block2}.*` with k = level *
            num_res_blocks + block; light `body.{level}.{in_conv,out_conv}.*`,
            `body.{level}.body.{block}.{block1,block2}.*`. Training checkpoints wrap them as
            `{"adapter": {...}}` (unwrapped by `files.py`).
diffusers   `T2IAdapter.save_pretrained`: `adapter.conv_in.*`, `adapter.body.{level}.in_conv.*`,
            `adapter.body.{level}.resnets.{block}.{block1,block2}.*`, and for the light adapter
            `adapter.body.{level}.out_conv.*`; a folder with `config.json`, or its single
            `diffusion_pytorch_model.safetensors`. The light adapter in this layout is the one that
            ComfyUI 0.3.64 cannot load (it renames it as if it were a full adapter).

What shapes cannot tell apart: a full SD1.x adapter with 4-channel hints and a 1-channel SDXL
adapter both have a 256-channel `conv_in`. As ComfyUI, 256 and 768 mean SDXL (no 4-channel adapter
exists); a diffusers `config.json` says it outright and is used when present.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from ..errors import LoadError
from ..config import LEVELS, AdapterConfig

StateDict = dict[str, torch.Tensor]

TENCENTARC = "tencentarc"
DIFFUSERS = "diffusers"

_DIFFUSERS_KEY = re.compile(r"^adapter\.body\.(\d+)\.(?:(in_conv|out_conv)|resnets\.(\d+))\.(.+)$")
_KINDS = {"full_adapter": "full", "full_adapter_xl": "full_xl", "light_adapter": "light"}
_XL_CONV_IN = (256, 768)  # 1 and 3 hint channels after a 16x unshuffle (ComfyUI's test)


def is_light(keys: Iterable[str]) -> bool:
    """Light adapters have a 1x1 conv at the start of the first level; full ones a `conv_in`."""
    return any(k.startswith(("body.0.in_conv.", "adapter.body.0.in_conv.")) for k in keys)


def to_native(sd: StateDict, layout: str, name: str) -> StateDict:
    """The state dict with TencentARC names, from either layout."""
    return diffusers_to_native(sd, name) if layout == DIFFUSERS else dict(sd)


def diffusers_to_native(sd: StateDict, name: str) -> StateDict:
    light = is_light(sd)
    blocks = [int(m.group(3)) for k in sd if (m := _DIFFUSERS_KEY.match(k)) and m.group(3) is not None]
    n = max(blocks) + 1 if blocks else 1
    out: StateDict = {}
    unknown = []
    for key, t in sd.items():
        if key.startswith("adapter.conv_in."):
            out[key[len("adapter."):]] = t
            continue
        m = _DIFFUSERS_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        level, conv, block, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if light:
            new = f"body.{level}.{conv}.{rest}" if conv else f"body.{level}.body.{block}.{rest}"
        elif conv == "in_conv":
            new = f"body.{level * n}.in_conv.{rest}"
        elif conv is None:
            new = f"body.{level * n + int(block)}.{rest}"
        else:
            unknown.append(key)
            continue
        out[new] = t
    if unknown:
        raise LoadError(
            f"{name}: {len(unknown)} weights are not part of a diffusers T2IAdapter (e.g. "
            f"{', '.join(sorted(unknown)[:4])}); the file is damaged or another kind of model"
        )
    return out


def infer_config(sd: StateDict, name: str, config_json: dict | None = None) -> AdapterConfig:
    """The architecture from a native-named state dict (and a diffusers config.json, if any)."""
    variant = sorted(k for k in sd if ".skep." in k or ".down_opt." in k)
    if variant:
        raise LoadError(
            f"{name}: a T2I-Adapter variant with skip convs or strided-conv downsampling ({variant[0]}); no "
            "released adapter uses it and ControlNet Core does not run it. Load it with ComfyUI's own ControlNet loader"
        )
    if "conv_in.weight" in sd:
        first = sd["conv_in.weight"]
        flat = {int(m.group(1)) for k in sd if (m := re.match(r"^body\.(\d+)\.block1\.weight$", k))}
        if not flat or flat != set(range(len(flat))) or len(flat) % LEVELS:
            raise LoadError(
                f"{name}: the T2I-Adapter has ResBlocks body.{sorted(flat)}; expected {LEVELS} levels of equal "
                "length counted from 0: the file is incomplete or damaged"
            )
        n = len(flat) // LEVELS
        channels = tuple(sd[f"body.{i * n}.block1.weight"].shape[0] for i in range(LEVELS))
        kind = "full_xl" if first.shape[1] in _XL_CONV_IN else "full"
        kernel = sd.get("body.0.block2.weight")
        if kernel is not None and kernel.ndim == 4 and kernel.shape[-1] != 1:
            raise LoadError(
                f"{name}: a T2I-Adapter variant with {kernel.shape[-1]}x{kernel.shape[-1]} ResBlock convs (ksize "
                f"{kernel.shape[-1]}); no released adapter uses it and ControlNet Core does not run it. Load it with "
                "ComfyUI's own ControlNet loader"
            )
    elif "body.0.in_conv.weight" in sd:
        first = sd["body.0.in_conv.weight"]
        levels = {int(m.group(1)) for k in sd if (m := re.match(r"^body\.(\d+)\.out_conv\.weight$", k))}
        if levels != set(range(LEVELS)):
            raise LoadError(
                f"{name}: the light T2I-Adapter has out_convs at levels {sorted(levels)}; expected 0..{LEVELS - 1}: "
                "the file is incomplete or damaged"
            )
        n = len({k.split(".")[3] for k in sd if k.startswith("body.0.body.")})
        channels = tuple(sd[f"body.{i}.out_conv.weight"].shape[0] for i in range(LEVELS))
        kind = "light"
    else:
        raise LoadError(
            f"{name}: the T2I-Adapter's first conv (conv_in.weight, or body.0.in_conv.weight for a light adapter) "
            "is missing; the file is incomplete or damaged: download it again"
        )
    if config_json is not None:
        kind = _kind_from_json(config_json, kind, name)
    factor = 16 if kind == "full_xl" else 8
    c_in = first.shape[1] if first.ndim == 4 else -1
    if c_in % factor ** 2 or c_in // factor ** 2 not in (1, 3):
        raise LoadError(
            f"{name}: the T2I-Adapter's first conv takes {c_in} channels, which is no hint of 1 (gray) or 3 (RGB) "
            f"channels after its {factor}x pixel unshuffle; the file is damaged or a variant we do not know"
        )
    try:
        return AdapterConfig(kind, c_in // factor ** 2, channels, n)
    except ValueError as e:
        raise LoadError(f"{name}: the tensor shapes fit no T2I-Adapter ({e})") from None


def _kind_from_json(config: dict, inferred: str, name: str) -> str:
    kind = _KINDS.get(config.get("adapter_type", "full_adapter"))
    if kind is None:
        raise LoadError(
            f"{name}: config.json names adapter_type {config.get('adapter_type')!r}; a T2IAdapter is one of "
            f"{', '.join(_KINDS)}: fix or remove config.json"
        )
    if (kind == "light") != (inferred == "light"):
        raise LoadError(
            f"{name}: config.json says {config.get('adapter_type')!r} but the weights are a "
            f"{'light' if inferred == 'light' else 'full'} adapter; the config does not belong to these weights"
        )
    return kind


def arch(sd: StateDict, layout: str) -> str:
    """"sd15" or "sdxl" from the header's shapes alone (for `inspect_controlnet`)."""
    return infer_config(to_native(sd, layout, "header"), "header").arch
