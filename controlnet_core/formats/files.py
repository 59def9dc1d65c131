"""Safe reading of checkpoint files into `{name: tensor}` dicts.

* `.safetensors` is read lazily with `safe_open`, one tensor at a time, and each tensor is cast as
  soon as it is read, so the peak memory stays near the size of the file (not file + full copy).
* Pickle-based files (`.pth`, `.ckpt`, `.pt`, `.bin`) are read only with
  `torch.load(weights_only=True)`: a file that needs arbitrary Python objects is refused, because
  unpickling runs code from the file.
The container is recognised from the first bytes, not trusted from the extension.

Every reader can be given a `check(header)` callback, called with each tensor's name, shape and
dtype *before* any tensor data is read (safetensors: from the JSON header; zip checkpoints: from
the memory-mapped archive; only legacy non-zip pickles must be unpickled whole first). The loader
uses it to refuse a file of the wrong kind without reading (and upcasting) its weights.
`read_header` returns the same information alone, for tools that only describe a file.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import LoadError

StateDict = dict[str, torch.Tensor]
Cast = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the file's header describes it (no data read)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype torch does not know
    stored: str = ""           # the dtype as the file names it ("F16", "I8", "float16", ...), for messages


Header = dict[str, TensorInfo]
Check = Callable[[Header], None]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}

SAFETENSORS_EXTS = (".safetensors", ".sft")
PICKLE_EXTS = (".pth", ".ckpt", ".pt", ".bin")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def sniff_container(path: Path) -> str:
    """'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save) or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol marker
        return "pickle"
    return "unknown"


def _raw_safetensors_header(path: str | os.PathLike) -> tuple[Any, int]:
    """(the parsed JSON header of a safetensors file, its length in bytes): 8 bytes of length, then
    the header; no tensor read. Raises OSError, ValueError or struct.error when it cannot."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if not 0 < n < 100_000_000:
            raise ValueError(f"header length {n}")
        return json.loads(f.read(n)), n


def _safetensors_header(path: Path) -> tuple[Header, dict[str, str]]:
    """The JSON header of a safetensors file: 8 bytes of length, then the header; no tensor read."""
    name = path.name
    try:
        raw, n = _raw_safetensors_header(path)
        size = path.stat().st_size
        header: Header = {}
        meta: dict[str, str] = {}
        for key, entry in raw.items():
            if key == "__metadata__":
                meta = {str(k): str(v) for k, v in (entry or {}).items()}
                continue
            start, end = entry["data_offsets"]
            if not 0 <= start <= end <= size - 8 - n:
                raise ValueError(f"{key} lies beyond the end of the file")
            dtype = str(entry["dtype"])
            header[key] = TensorInfo(tuple(int(d) for d in entry["shape"]), _ST_DTYPES.get(dtype), dtype)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise LoadError(
            f"{name}: cannot read it as a .safetensors file ({e}); the file is probably truncated or "
            "corrupt: download it again"
        ) from e
    return header, meta


def read_safetensors(path: Path, cast: Cast = _identity, check: Check | None = None) -> tuple[StateDict, dict[str, str]]:
    from safetensors import safe_open

    name = path.name
    if check is not None:
        check(_safetensors_header(path)[0])
    try:
        sd: StateDict = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for key in f.keys():
                # Cast each tensor as it is read: only one uncast tensor is alive at a time.
                sd[key] = cast(f.get_tensor(key))
    except LoadError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError and OSError variants
        raise LoadError(
            f"{name}: cannot read it as a .safetensors file ({e}); the file is probably truncated or "
            "corrupt: download it again"
        ) from e
    return sd, meta


def read_pickle(path: Path, cast: Cast = _identity, check: Check | None = None) -> StateDict:
    name = path.name
    obj = None
    last_error: Exception | None = None
    # mmap keeps the tensors on disk until they are cast; it only works for the zip format.
    for mmap in (True, False):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except pickle.UnpicklingError as e:
            text = str(e)
            if "Weights only load failed" in text:
                raise LoadError(
                    f"{name}: this file needs arbitrary Python objects to be unpickled, which could run "
                    "code from the file, so it is refused. Use a .safetensors version of the model, or "
                    "convert this file in a trusted environment"
                ) from e
            last_error = e
            break
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            last_error = e
            if mmap and "mmap" in str(e).lower():
                continue
            break
    if obj is None:
        raise LoadError(
            f"{name}: cannot read it as a PyTorch checkpoint ({type(last_error).__name__}: "
            f"{str(last_error)[:200]}); the file is probably truncated or corrupt: download it again"
        ) from last_error
    return _unwrap(obj, name, cast, check)


def _unwrap(obj: object, name: str, cast: Cast, check: Check | None = None) -> StateDict:
    # Training checkpoints wrap the weights: {"state_dict": {...}, "epoch": ...}.
    for _ in range(3):
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        elif isinstance(obj, dict) and isinstance(obj.get("adapter"), dict):  # T2I-Adapter training files
            obj = obj["adapter"]
        elif isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
            obj = next(iter(obj.values()))
        else:
            break
    if not isinstance(obj, dict):
        raise LoadError(
            f"{name}: the file holds a {type(obj).__name__}, not a dictionary of weights; "
            "it is not a model checkpoint"
        )
    # Non-tensor bookkeeping (epoch, step, ...) is dropped. With mmap the tensors are still on disk
    # here: `check` sees names, shapes and dtypes before `cast` reads any data.
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if check is not None:
        check(header_of(tensors))
    return {k: cast(v) for k, v in tensors.items()}


def tensor_names(path: str | os.PathLike) -> list[str]:
    """The tensor names a safetensors header lists, even when the data after it is cut short (to
    say what a truncated file was); [] when there is no readable header."""
    try:
        raw, _ = _raw_safetensors_header(path)
        return [str(k) for k in raw if k != "__metadata__"] if isinstance(raw, dict) else []
    except (OSError, ValueError, struct.error):
        return []


def header_of(tensors: dict[str, torch.Tensor]) -> Header:
    """The header of tensors already in memory (a state dict handed to the loader, a pickle)."""
    return {k: TensorInfo(tuple(v.shape), v.dtype, str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}


def read_state_dict(
    path: str | os.PathLike, cast: Cast = _identity, check: Check | None = None
) -> tuple[StateDict, dict[str, str]]:
    """Read a single checkpoint file: `(tensors, safetensors metadata or {})`.

    `cast` is applied to every tensor as it is read (dtype conversion without a second full copy);
    `check` sees the header first (see the module docstring) and may raise to stop the read.
    """
    path = _checked_file(path)
    kind = sniff_container(path)
    if kind == "safetensors":
        return read_safetensors(path, cast, check)
    if kind in ("zip", "pickle"):
        return read_pickle(path, cast, check), {}
    raise _not_a_model(path)


def read_header(path: str | os.PathLike) -> tuple[Header, dict[str, str]]:
    """Each tensor's shape and dtype, and the safetensors metadata, without reading tensor data
    (a legacy non-zip pickle is the exception: it has to be unpickled)."""
    path = _checked_file(path)
    kind = sniff_container(path)
    if kind == "safetensors":
        return _safetensors_header(path)
    if kind in ("zip", "pickle"):
        found: list[Header] = []

        def grab(header: Header) -> None:
            found.append(header)
            raise _HeaderRead

        try:
            read_pickle(path, check=grab)
        except _HeaderRead:
            pass
        return found[0], {}
    raise _not_a_model(path)


class _HeaderRead(Exception):
    """Stops a pickle read once its header has been seen."""


def _checked_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    name = path.name
    if not path.exists():
        raise LoadError(f"{name}: no such file ({path}); check the path")
    if path.is_dir():
        raise LoadError(f"{name}: is a folder; give a checkpoint file or a diffusers folder with config.json")
    if path.stat().st_size == 0:
        raise LoadError(f"{name}: the file is empty (0 bytes); the download or copy failed: get it again")
    return path


def _not_a_model(path: Path) -> LoadError:
    name = path.name
    if path.suffix.lower() in SAFETENSORS_EXTS:
        return LoadError(
            f"{name}: does not start with a safetensors header; the file is truncated, corrupt or not a "
            "model at all: download it again"
        )
    if path.suffix.lower() in PICKLE_EXTS:
        return LoadError(
            f"{name}: is not a PyTorch checkpoint (no zip or pickle header); the file is corrupt or not "
            "a model at all"
        )
    return LoadError(
        f"{name}: is not a model file (neither safetensors nor a PyTorch checkpoint); "
        "give a .safetensors or .pth ControlNet"
    )


def write_safetensors(sd: StateDict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path), metadata=metadata)


def write_pickle(sd: StateDict, path: str | os.PathLike) -> None:
    torch.save({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path))


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise LoadError(f"{path.name}: cannot read it as JSON ({e}); fix or replace the file") from e
    if not isinstance(data, dict):
        raise LoadError(f"{path.name}: expected a JSON object, got {type(data).__name__}")
    return data
