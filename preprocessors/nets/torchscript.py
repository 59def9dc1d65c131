"""The tensors of a TorchScript archive (`torch.jit.save`), read without running it.

`torch.jit.load` executes the archive's code (and is deprecated); `torch.load(weights_only=True)`
refuses TorchScript archives. The weights are plain tensors inside the archive's `data.pkl`: an
object tree of the saved modules (`__torch__.<class>` objects whose state is a dict of their
attributes) with tensors stored as `data/<n>`. A restricted unpickler rebuilds just that: module
classes become inert records, only tensor-rebuilding functions and storage types are allowed, and
the tree is flattened to the module-path state dict the modules had when they were traced.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import PreprocessorError

def _rebuild_tensor(flat: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    # torch._utils._rebuild_tensor_v2's layout arguments, on the flat tensor persistent_load made
    return flat.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *_ignored) -> torch.Tensor:
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}
_STORAGES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
             "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
             "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
             "BoolStorage": torch.bool}


class _Record:
    """A saved module or object: its attributes, nothing callable."""

    def __setstate__(self, state):
        self.__dict__["_state"] = state if isinstance(state, dict) else {"_value": state}


class _Storage:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return type(name, (_Record,), {})
        if module == "torch" and name in _STORAGES:
            return _Storage(_STORAGES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights archive")

    def persistent_load(self, pid):
        kind, storage, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        if not raw:
            return torch.empty(0, dtype=storage.dtype)
        return torch.frombuffer(bytearray(raw), dtype=storage.dtype)[:numel]


def _flatten(obj, prefix: str, out: dict) -> None:
    for k, v in getattr(obj, "_state", {}).items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
        elif isinstance(v, _Record):
            _flatten(v, f"{prefix}{k}.", out)


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """`{module.path: tensor}` of a TorchScript archive; PreprocessorError naming the file when it
    is not one (or holds more than weights)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkl:
                raise ValueError("no data.pkl: not a TorchScript archive")
            prefix = pkl[0][: -len("data.pkl")]
            with z.open(pkl[0]) as f:
                root = _Unpickler(f, z, prefix).load()
    except (zipfile.BadZipFile, ValueError, KeyError, pickle.UnpicklingError, EOFError, TypeError) as e:
        raise PreprocessorError(
            f"{path.name} is not a readable TorchScript weights archive ({e}); the file may be damaged or "
            "incomplete: fetch it again"
        ) from None
    out: dict[str, torch.Tensor] = {}
    _flatten(root, "", out)
    return out
