"""Where annotator networks run: a small seam the ComfyUI adapter fills in.

The registry hands every network it builds to `adopt`, which wraps it in a `Net`. A method's `fn`
calls `net.device()` before each use: the host then makes the network ready on its compute device
and says which one. The default host is the CPU (scripts, tests); inside ComfyUI the adapter sets a
host that gives the network to ComfyUI's model management (`nodes/adapter.py`), so it runs on the
GPU when there is one, is offloaded with the other models and is unloaded by /free. Networks always
compute in float32 (the fp32 parity of the tests; fp16 visibly degrades some annotators).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Host(Protocol):
    def adopt(self, net: "Net") -> None:
        """Take a newly built network (e.g. wrap it for a model manager); called once per network."""

    def device(self, net: "Net") -> torch.device:
        """Make the network ready on the device it should run on now, and return that device."""


class CPUHost:
    """Runs everything on the CPU."""

    def adopt(self, net: "Net") -> None:
        net.module.to("cpu")

    def device(self, net: "Net") -> torch.device:
        return torch.device("cpu")


class Net:
    """A built annotator network as methods receive it (`model=`).

    module: the torch module (eval mode, float32, no gradients). label: what it is, for messages.
    handle: whatever the host keeps for it (ComfyUI: its ModelPatcher)."""

    def __init__(self, module: nn.Module, label: str):
        self.module = module.eval().requires_grad_(False)
        self.label = label
        self.handle: Any = None

    def device(self) -> torch.device:
        """Load the network where it runs now (the host decides) and return that device."""
        return _host.device(self)

    def __repr__(self) -> str:
        return f"Net({self.label})"


_host: Host = CPUHost()


def set_host(host: Host | None) -> None:
    """Where networks built from now on run (None: back to the CPU). The adapter calls this."""
    global _host
    _host = host if host is not None else CPUHost()


def adopt(model: Any, label: str) -> Any:
    """A torch module wrapped as a `Net` and given to the host; anything else returned as it is."""
    if not isinstance(model, nn.Module):
        return model
    net = Net(model.float(), label)
    _host.adopt(net)
    return net
