"""What every family loader gets and the one way it builds a model: shared by the families' `load`.

`loader.load_controlnet` reads a file (or a folder, or a state dict), tells its family from the
header (`detect.py`) and hands a `Source` to that family's `load(source, device, dtype, ops,
config)`; `arch(header, found)` answers the same question from shapes alone for `inspect`. A family
builds its model on the meta device and moves the (already cast) tensors in with `assign_weights`,
which first checks names and shapes and says in a sentence what does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import LoadError
from .detect import Detected

StateDict = dict[str, torch.Tensor]


@dataclass
class Source:
    """A file's tensors (already cast), its metadata and what detection found: a family loader's input."""

    sd: StateDict
    meta: dict[str, str]
    config_json: dict | None  # a diffusers folder's config.json
    name: str                 # for messages
    detected: Detected
    checkpoint_dtype: torch.dtype | None


@dataclass(frozen=True)
class FamilyLoader:
    """How one family is built from a `Source`, and how its base-model family is read from shapes.

    load(source, device, dtype, ops, config) -> the model (dtype already resolved: never None);
    arch(header) -> "sd15" | "sd21" | "sdxl" from the header's shapes alone (for `inspect`), where
    `header` maps names to meta tensors of the right shapes;
    keeps_file_dtype: float tensors the file stores narrower than `dtype` are read as they are
    (a Control-LoRA: its tensors are the inputs of a merge, kept as ComfyUI keeps them; the model
    computes in `dtype`).
    """

    load: Callable[..., Any]
    arch: Callable[[StateDict, Detected], str]
    keeps_file_dtype: bool = False


def check_keys(model: Any, sd: StateDict, name: str, what: str) -> None:
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
    check_keys(model, sd, name, what)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


