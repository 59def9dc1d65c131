"""Safe reading of checkpoint files into `{name: tensor}` dicts.

* `.safetensors` is read lazily with `safe_open`, one tensor at a time, and each tensor is cast as
  soon as it is read, so the peak memory stays near the size of the file (not file + full copy).
* Pickle-based files (`.pth`, `.ckpt`, `.pt`, `.bin`) are read only with
  `torch.load(weights_only=True)`: a file that needs arbitrary Python objects is refused, because
  unpickling runs code from the file.
The container is recognised from the first bytes, not trusted from the extension.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable

import torch

from ..errors import LoadError

StateDict = dict[str, torch.Tensor]
Cast = Callable[[torch.Tensor], torch.Tensor]

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


def read_safetensors(path: Path, cast: Cast = _identity) -> tuple[StateDict, dict[str, str]]:
    from safetensors import safe_open

    name = path.name
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


def read_pickle(path: Path, cast: Cast = _identity) -> StateDict:
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
    return _unwrap(obj, name, cast)


def _unwrap(obj: object, name: str, cast: Cast) -> StateDict:
    # Training checkpoints wrap the weights: {"state_dict": {...}, "epoch": ...}.
    for _ in range(3):
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        elif isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
            obj = next(iter(obj.values()))
        else:
            break
    if not isinstance(obj, dict):
        raise LoadError(
            f"{name}: the file holds a {type(obj).__name__}, not a dictionary of weights; "
            "it is not a model checkpoint"
        )
    sd: StateDict = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):  # drop non-tensor bookkeeping (epoch, step, ...)
            sd[str(key)] = cast(value)
    return sd


def read_state_dict(path: str | os.PathLike, cast: Cast = _identity) -> tuple[StateDict, dict[str, str]]:
    """Read a single checkpoint file: `(tensors, safetensors metadata or {})`.

    `cast` is applied to every tensor as it is read (dtype conversion without a second full copy).
    """
    path = Path(path)
    name = path.name
    if not path.exists():
        raise LoadError(f"{name}: no such file ({path}); check the path")
    if path.is_dir():
        raise LoadError(f"{name}: is a folder; give a checkpoint file or a diffusers folder with config.json")
    if path.stat().st_size == 0:
        raise LoadError(f"{name}: the file is empty (0 bytes); the download or copy failed: get it again")
    kind = sniff_container(path)
    if kind == "safetensors":
        return read_safetensors(path, cast)
    if kind in ("zip", "pickle"):
        return read_pickle(path, cast), {}
    if path.suffix.lower() in SAFETENSORS_EXTS:
        raise LoadError(
            f"{name}: does not start with a safetensors header; the file is truncated, corrupt or not a "
            "model at all: download it again"
        )
    if path.suffix.lower() in PICKLE_EXTS:
        raise LoadError(
            f"{name}: is not a PyTorch checkpoint (no zip or pickle header); the file is corrupt or not "
            "a model at all"
        )
    raise LoadError(
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
