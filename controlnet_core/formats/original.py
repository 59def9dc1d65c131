"""The original lllyasviel layout: our native key names, optionally under `control_model.`.

ControlNet 1.0 `.pth` files are whole SD+ControlNet checkpoints with the control net under
`control_model.` (next to `model.diffusion_model.*` etc.); v1.1 files carry the same names without
the prefix. Only the ControlNet part is kept.
"""

from __future__ import annotations

import torch

from .detect import ORIGINAL_PREFIX

StateDict = dict[str, torch.Tensor]


def strip_prefix(sd: StateDict, prefix: str = ORIGINAL_PREFIX) -> StateDict:
    """Keys under `prefix`, without it; other keys (the SD model in 1.0 files) are dropped."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def add_prefix(sd: StateDict, prefix: str = ORIGINAL_PREFIX) -> StateDict:
    return {prefix + k: v for k, v in sd.items()}
