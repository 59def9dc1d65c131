"""Load and save control models: detect the family and layout, hand the file to that family, build.

    cn = load_controlnet("control_v11p_sd15_canny.safetensors")
    cn.family, cn.arch               # "ControlNet", "sd15" | "sd21" | "sdxl"
    down, mid = cn(x, hint, timesteps, context, y=None)

One loader for every family: the family is told from the key names in the file's header, before
any tensor is read (`formats/detect.py`), and a `Source` goes to that family's `load`
(`FAMILY_LOADERS`: each family module's `load` and `arch`); families we recognise but do not run
are named in an `UnsupportedFamilyError`. Weights whose dtype no control model has (int, bool) are
refused from the header too.

Loading is memory-light: a family builds its model on the meta device and the (already cast)
tensors are assigned into it (`formats/source.py`), so no second copy of the weights is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import control_lora, controlnext, flux_controlnet, lllite, t2i_adapter, union
from . import model as classic
from .errors import LoadError, UnsupportedFamilyError
from .formats import detect
from .formats.controlnet import META_CONFIG_KEY, infer_config  # noqa: F401  (infer_config: public API)
from .formats.diffusers import native_to_diffusers, to_diffusers_config
from .formats.files import (
    Header, header_of, read_header, read_json, read_state_dict, tensor_names, write_pickle, write_safetensors,
)
from .formats.original import add_prefix
from .formats.source import FamilyLoader, Source
from .layers import CAST_OPS
from .model import ControlNet

StateDict = dict[str, torch.Tensor]

SAVE_FORMATS = ("original", "original-prefixed", "diffusers")
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


# --------------------------------------------------------------------------------------------
# config inference

class _Reader:
    """Reads tensors cast to the target dtype/device and remembers the file's own dtypes."""

    def __init__(self, device: Any, dtype: torch.dtype | None):
        self.device, self.dtype = device, dtype
        self.file_dtypes: Counter[torch.dtype] = Counter()
        self.keep_narrower = False  # the family's `keeps_file_dtype`, set once detection has found it

    def found(self, detected: detect.Detected) -> detect.Detected:
        family = FAMILY_LOADERS.get(detected.family)
        self.keep_narrower = family is not None and family.keeps_file_dtype
        return detected

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        self.file_dtypes[t.dtype] += t.numel()
        if t.is_floating_point():
            dtype = self.dtype if self.dtype is not None else kept_dtype(t.dtype)
            if self.keep_narrower and 1 < t.element_size() < torch.empty((), dtype=dtype).element_size():
                dtype = t.dtype
            return t.to(device=self.device, dtype=dtype)
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


def _detect_or_refuse(keys: Any, name: str) -> detect.Detected:
    """Detection plus the question whether we run that family: asked before tensors are read."""
    found = detect.detect(keys, name)
    if found.family not in FAMILY_LOADERS:
        raise UnsupportedFamilyError(
            f"{name}: this is {found.display}; that family is recognised but not yet supported by "
            "ControlNet Core. Load it with ComfyUI's own ControlNet loader instead"
        )
    return found


def check_weight_dtypes(header: Header, name: str, found: detect.Detected) -> None:
    """Every weight of a control model is a float (float32/16, bfloat16, float64; float8 is upcast on
    load): an integer or bool tensor means a file quantised for another program, or a damaged one.
    Asked from the header, so such a file is refused before its data is read."""
    for key, info in header.items():
        if 0 in info.shape:  # an empty marker (Control-LoRA's `lora_controlnet`) holds no weight
            continue
        if info.dtype is None or not info.dtype.is_floating_point:
            stored = info.stored or str(info.dtype)
            raise LoadError(
                f"{name}: the weight {key} is stored as {stored}, but the weights of {found.display} are "
                "floating point (float16, bfloat16 or float32; float8 is upcast when loaded); the file is "
                "quantised for another program or damaged: use a float16 or float32 version of the model"
            )


def kept_dtype(file_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a model's weights are kept in when the caller keeps the file's (`dtype=None`): the
    file's own, except float8, which torch cannot convolve in (2.13, CPU and CUDA): float16 then."""
    if file_dtype is not None and file_dtype.itemsize == 1 and file_dtype.is_floating_point:
        return torch.float16
    return file_dtype


def _read_source(src: Any, reader: _Reader, name: str | None) -> Source:
    if isinstance(src, dict):
        name = name or "state dict"
        found = reader.found(_detect_or_refuse(src.keys(), name))
        for k, v in src.items():
            if not isinstance(v, torch.Tensor):
                raise LoadError(f"{name}: value of {k!r} is a {type(v).__name__}, not a tensor")
        check_weight_dtypes(header_of(src), name, found)
        sd = {k: reader.cast(v) for k, v in src.items()}
        return Source(sd, {}, None, name, found, reader.checkpoint_dtype)
    path = Path(os.fspath(src))
    name = name or path.name
    seen: list[detect.Detected] = []

    def check(header: Header) -> None:
        if not seen:  # a sharded folder: the first shard tells the family
            seen.append(reader.found(_detect_or_refuse(header.keys(), name)))
        check_weight_dtypes(header, name, seen[0])

    if path.is_dir():
        files, config_path = _diffusers_folder(path, reader.dtype)
        sd, meta = {}, {}
        for f in files:
            part, part_meta = read_state_dict(f, reader.cast, check)
            sd.update(part)
            meta.update(part_meta)
        config = read_json(config_path) if config_path is not None else None
        found = _detect_or_refuse(sd.keys(), name)  # all shards together
        return Source(sd, meta, config, name, found, reader.checkpoint_dtype)
    try:
        sd, meta = read_state_dict(path, reader.cast, check)
    except UnsupportedFamilyError:
        raise
    except LoadError as e:
        raise _naming_the_family(e, path, name, seen[0] if seen else None) from None
    # `check` saw this file's header, whose names are the keys of `sd` (safetensors: its JSON; a
    # pickle: the tensors it returns), so its detection stands.
    return Source(sd, meta, None, name, seen[0], reader.checkpoint_dtype)


def _naming_the_family(e: LoadError, path: Path, name: str, found: detect.Detected | None) -> LoadError:
    """A damaged file's error, with the family its header still names (a truncated safetensors
    keeps its header; a truncated .pth loses its index, so nothing can be said there)."""
    text = str(e)
    if not text.startswith(f"{name}: "):
        return e
    if found is None:
        names = tensor_names(path)
        try:
            found = detect.detect(names, name) if names else None
        except LoadError:  # the header names no control model: the error says enough
            return e
    if found is None:
        return e
    return type(e)(f"{text}. Its header says it is {found.display}")


FAMILY_LOADERS: dict[str, FamilyLoader] = {
    detect.CONTROLNET: FamilyLoader(classic.load, classic.arch),
    detect.T2I_ADAPTER: FamilyLoader(t2i_adapter.load, t2i_adapter.arch),
    detect.CONTROL_LORA: FamilyLoader(control_lora.load, control_lora.arch, keeps_file_dtype=True),
    detect.UNION: FamilyLoader(union.load, union.arch),
    detect.LLLITE: FamilyLoader(lllite.load, lllite.arch),
    detect.CONTROLNEXT: FamilyLoader(controlnext.load, controlnext.arch),
    detect.FLUX: FamilyLoader(flux_controlnet.load, flux_controlnet.arch),
}


def load_controlnet(
    src: str | os.PathLike | dict[str, torch.Tensor],
    device: Any = "cpu",
    dtype: torch.dtype | None = torch.float32,
    ops: Any = None,
    name: str | None = None,
    *,
    config: Any = None,
    compute_dtype: torch.dtype | None = None,
) -> Any:
    """Load a control model of any supported family from a file, a diffusers folder or a state dict.

    `dtype` is the dtype the weights are stored in; `dtype=None` keeps the checkpoint's own (float8
    files: float16, see `kept_dtype`). `compute_dtype` (None: the same) is the dtype the model
    computes in: with another one the weights stay stored in `dtype` and every layer casts them to
    its input's dtype as it runs (ComfyUI's manual cast: fp16 weights, fp32 compute on a CPU), so
    they are held once, at the storage size; the model's `dtype` is then `compute_dtype`, its
    `storage_dtype` the weights'. `ops` is a host layer namespace (ComfyUI's `comfy.ops.*`; for a
    `compute_dtype`, casting layers such as `comfy.ops.manual_cast`; default: `layers.CAST_OPS`).
    `config` overrides the inferred architecture (checked against the shapes).
    The returned model carries `source_name`, `source_format` (the layout) and `checkpoint_dtype`.
    """
    reader = _Reader(device, dtype)
    source = _read_source(src, reader, name)
    family = FAMILY_LOADERS[source.detected.family]
    stored = dtype if dtype is not None else kept_dtype(reader.checkpoint_dtype)
    cast = compute_dtype is not None and compute_dtype != stored
    if cast and ops is None:
        ops = CAST_OPS
    model = family.load(source, device, stored, ops, config)
    if cast:
        model.compute_dtype = compute_dtype
    model.source_name = source.name
    model.source_format = source.detected.layout
    model.checkpoint_dtype = reader.checkpoint_dtype
    return model


@dataclass(frozen=True)
class ModelInfo:
    """What a file is, read from its header alone (no tensor data): for the loader node's label."""

    family: str        # "ControlNet", "T2I-Adapter", ... (`display` without the article)
    arch: str | None   # "sd15" | "sd21" | "sdxl"; None when the family is not run by us
    layout: str
    supported: bool
    size_bytes: int
    weight_dtype: torch.dtype | None = None  # the dtype most of its numbers are stored in (ComfyUI's weight_dtype)


def inspect_controlnet(path: str | os.PathLike) -> ModelInfo:
    """Family, base model and layout of a file or diffusers folder without reading its weights.

    Raises the loader's own `LoadError` sentences for files that are no control model at all.
    """
    path = Path(os.fspath(path))
    if path.is_dir():
        files, _ = _diffusers_folder(path, None)
        header: Header = {}
        for f in files:
            header.update(read_header(f)[0])
        size = sum(f.stat().st_size for f in files)
    else:
        header = read_header(path)[0]
        size = path.stat().st_size
    found = detect.detect(header.keys(), path.name)
    family = found.display.split(" ", 1)[1] if found.display.startswith(("a ", "an ")) else found.display
    loader = FAMILY_LOADERS.get(found.family)
    counts: Counter[torch.dtype] = Counter()
    for v in header.values():
        if v.dtype is not None:
            counts[v.dtype] += math.prod(v.shape)
    weight_dtype = counts.most_common(1)[0][0] if counts else None
    if loader is None:
        return ModelInfo(family, None, found.layout, False, size, weight_dtype)
    meta_sd = {k: torch.empty(v.shape, device="meta") for k, v in header.items()}
    return ModelInfo(family, loader.arch(meta_sd, found), found.layout, True, size, weight_dtype)


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
