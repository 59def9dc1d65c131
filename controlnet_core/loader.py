"""Load and save control models: detect the family and layout, rename keys, infer the config, build.

    cn = load_controlnet("control_v11p_sd15_canny.safetensors")
    cn.family, cn.arch               # "ControlNet", "sd15" | "sd21" | "sdxl"
    down, mid = cn(x, hint, timesteps, context, y=None)

One loader for every family: the family is told from the key names in the file's header, before
any tensor is read (`formats/detect.py`), and the file goes to that family's loader
(`FAMILY_LOADERS`); families we recognise but do not run are named in an `UnsupportedFamilyError`.

The classic ControlNet family lives here: the original lllyasviel layout (`control_model.` prefix,
`.pth`/`.safetensors`), the v1.1 layout (same names, no prefix), and the diffusers
`ControlNetModel` layout (a single `diffusion_pytorch_model.safetensors` or a folder with
`config.json`), for SD1.x, SD2.x and SDXL.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import control_lora
from .config import ControlNetConfig
from .errors import LoadError, UnsupportedFamilyError
from .formats import detect
from .formats import t2i_adapter as t2i_format
from .formats import lllite as lllite_format
from .formats.diffusers import diffusers_to_native, from_diffusers_config, native_to_diffusers, to_diffusers_config
from .formats.files import (
    Header, header_of, read_header, read_json, read_state_dict, tensor_names, write_pickle, write_safetensors,
)
from .formats.original import add_prefix, strip_prefix
from .lllite import ControlNetLLLite
from .model import ControlNet
from .t2i_adapter import AdapterConfig, T2IAdapter

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
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype if self.dtype is not None else compute_dtype(t.dtype))
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


@dataclass
class Source:
    """A file's tensors (already cast), its metadata and what detection found: a family loader's input."""

    sd: StateDict
    meta: dict[str, str]
    config_json: dict | None  # a diffusers folder's config.json
    name: str                 # for messages
    detected: detect.Detected
    checkpoint_dtype: torch.dtype | None


@dataclass(frozen=True)
class FamilyLoader:
    """How one family is built from a `Source`, and how its base-model family is read from shapes.

    load(source, device, dtype, ops, config) -> the model (dtype already resolved: never None);
    arch(header) -> "sd15" | "sd21" | "sdxl" from the header's shapes alone (for `inspect`), where
    `header` maps names to meta tensors of the right shapes.
    """

    load: Callable[..., Any]
    arch: Callable[[StateDict, detect.Detected], str]


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


def compute_dtype(file_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a model runs in when the caller keeps the file's (`dtype=None`): the file's own,
    except float8, which torch cannot convolve in (2.13, CPU and CUDA): float16 then."""
    if file_dtype is not None and file_dtype.itemsize == 1 and file_dtype.is_floating_point:
        return torch.float16
    return file_dtype


def _read_source(src: Any, reader: _Reader, name: str | None) -> Source:
    if isinstance(src, dict):
        name = name or "state dict"
        found = _detect_or_refuse(src.keys(), name)
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
            seen.append(_detect_or_refuse(header.keys(), name))
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
    return Source(sd, meta, None, name, _detect_or_refuse(sd.keys(), name), reader.checkpoint_dtype)


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


def _check_keys(model: Any, sd: StateDict, name: str, what: str) -> None:
    """The file's keys and shapes against the model built for it, in a sentence."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights are missing (e.g. {', '.join(missing[:4])})")
        if extra:
            parts.append(f"{len(extra)} weights are not part of {what} (e.g. {', '.join(extra[:4])})")
        raise LoadError(f"{name}: {'; '.join(parts)}; the file is incomplete or a variant we do not support")
    for k, t in expected.items():
        if sd[k].shape != t.shape:
            raise LoadError(
                f"{name}: {k} has shape {tuple(sd[k].shape)} but the inferred {what} needs "
                f"{tuple(t.shape)}; the shapes fit no config we can build"
            )


def assign_weights(model: Any, sd: StateDict, name: str, what: str) -> Any:
    """Check `sd` against `model` (built on the meta device) and move the tensors in without a copy."""
    _check_keys(model, sd, name, what)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _native_controlnet_sd(source: Source) -> StateDict:
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


def _load_classic(source: Source, device: Any, dtype: torch.dtype, ops: Any, config: ControlNetConfig | None) -> ControlNet:
    name, sd = source.name, _native_controlnet_sd(source)
    cfg = controlnet_config(source, sd, config)
    model = ControlNet(cfg, ops=ops, device="meta", dtype=dtype)
    return assign_weights(model, sd, name, f"a {cfg.arch} ControlNet")


def _arch_classic(sd: StateDict, found: detect.Detected) -> str:
    source = Source(sd, {}, None, "header", found, None)
    return infer_config(_native_controlnet_sd(source), name="header").arch


def _load_t2i_adapter(
    source: Source, device: Any, dtype: torch.dtype, ops: Any, config: AdapterConfig | None
) -> T2IAdapter:
    name = source.name
    sd = t2i_format.to_native(source.sd, source.detected.layout, name)
    cfg = config if config is not None else t2i_format.infer_config(sd, name, source.config_json)
    model = T2IAdapter(cfg, ops=ops, device="meta", dtype=dtype)
    return assign_weights(model, sd, name, f"a {cfg.kind} {cfg.arch} T2I-Adapter")


def _arch_t2i_adapter(sd: StateDict, found: detect.Detected) -> str:
    return t2i_format.arch(sd, found.layout)


def _load_lllite(source: Source, device: Any, dtype: torch.dtype, ops: Any, config: Any) -> ControlNetLLLite:
    if config is not None:
        raise LoadError(f"{source.name}: a config override is for ControlNets; an LLLite's shape is read from its file")
    specs = lllite_format.read_modules({k: tuple(v.shape) for k, v in source.sd.items()}, source.name)
    model = ControlNetLLLite(specs, ops=ops, device="meta", dtype=dtype)
    return assign_weights(model, source.sd, source.name, "a ControlNet-LLLite of these module shapes")


def _arch_lllite(sd: StateDict, found: detect.Detected) -> str:
    lllite_format.read_modules({k: tuple(v.shape) for k, v in sd.items()}, "header")  # refuses what we cannot run
    return ControlNetLLLite.arch


FAMILY_LOADERS: dict[str, FamilyLoader] = {
    detect.CONTROLNET: FamilyLoader(_load_classic, _arch_classic),
    detect.T2I_ADAPTER: FamilyLoader(_load_t2i_adapter, _arch_t2i_adapter),
    detect.CONTROL_LORA: FamilyLoader(control_lora.load, control_lora.arch),
    detect.LLLITE: FamilyLoader(_load_lllite, _arch_lllite),
}


def load_controlnet(
    src: str | os.PathLike | dict[str, torch.Tensor],
    device: Any = "cpu",
    dtype: torch.dtype | None = torch.float32,
    ops: Any = None,
    name: str | None = None,
    *,
    config: Any = None,
) -> Any:
    """Load a control model of any supported family from a file, a diffusers folder or a state dict.

    `dtype=None` keeps the checkpoint's own dtype (float8 files: float16, see `compute_dtype`). `ops` is a host layer namespace (ComfyUI's
    `comfy.ops.*`). `config` overrides the inferred architecture (checked against the shapes).
    The returned model carries `source_name`, `source_format` (the layout) and `checkpoint_dtype`.
    """
    reader = _Reader(device, dtype)
    source = _read_source(src, reader, name)
    family = FAMILY_LOADERS[source.detected.family]
    model = family.load(source, device, dtype if dtype is not None else compute_dtype(reader.checkpoint_dtype), ops,
                        config)
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
    if loader is None:
        return ModelInfo(family, None, found.layout, False, size)
    meta_sd = {k: torch.empty(v.shape, device="meta") for k, v in header.items()}
    return ModelInfo(family, loader.arch(meta_sd, found), found.layout, True, size)


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
