"""Stability AI's Control-LoRA layout (`stabilityai/control-lora`, `control_lora_rank128_v11p_sd15_*`).

A Control-LoRA is a ControlNet stored as a difference to the base model it runs on. Its keys use
the LDM ControlNet names without a prefix (`input_blocks.1.0.in_layers.2`, `zero_convs.0.0`,
`input_hint_block.0`, ...), and each layer is stored in one of two ways:

* whole: `<module>.weight` / `<module>.bias` (the hint encoder, zero convs, norms, biases);
* low-rank: `<module>.up` (out, r) or (out, r, 1, 1) and `<module>.down` (r, in) or (r, in, kh, kw).
  The layer's weight is then `W_base + (up.flatten(1) @ down.flatten(1)).reshape(W.shape)`, with
  no alpha and no scale, where `W_base` is the file's own `<module>.weight` when it stores one and
  the base model's (host UNet's) weight otherwise (ComfyUI's `ControlLoraOps`, which applies
  `weight + up @ down` to whatever weight the layer holds).

The marker is a key named `lora_controlnet` (an empty tensor). Which keys count follows ComfyUI's
`ControlLora.pre_run`: names ending in `.up`, `.down`, `.weight` or `.bias` without `__`; anything
else is ignored, as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LoadError

MARKER = "lora_controlnet"
_SUFFIXES = (".up", ".down", ".weight", ".bias")

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LowRank:
    """One low-rank layer: its weight is the base weight + `up @ down` (no scale)."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The full weight's shape: (out, in) for a linear layer, (out, in, kh, kw) for a conv."""
        return (int(self.up.shape[0]), *(int(s) for s in self.down.shape[1:]))

    def delta(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype).flatten(1)
        return (up @ down).reshape(self.shape)


def counted(key: str) -> bool:
    """Whether a key of the file is part of the model (ComfyUI's rule; the marker is not)."""
    return key != MARKER and key.endswith(_SUFFIXES) and "__" not in key


def split(sd: StateDict, name: str) -> tuple[StateDict, dict[str, LowRank]]:
    """(tensors stored whole, low-rank layers by module name). Works on meta tensors (shapes only)."""
    full: StateDict = {}
    ups: StateDict = {}
    downs: StateDict = {}
    for key, t in sd.items():
        if not counted(key):
            continue
        module, _, part = key.rpartition(".")
        if part == "up":
            ups[module] = t
        elif part == "down":
            downs[module] = t
        else:
            full[key] = t
    lonely = sorted(set(ups) ^ set(downs))
    if lonely:
        m = lonely[0]
        has, lacks = ("up", "down") if m in ups else ("down", "up")
        raise LoadError(
            f"{name}: the low-rank layer {m} has its .{has} but not its .{lacks} "
            f"({len(lonely)} such layer(s)); the Control-LoRA file is incomplete or damaged, download it again"
        )
    lowrank: dict[str, LowRank] = {}
    for m in sorted(ups):
        up, down = ups[m], downs[m]
        conv = up.ndim == 4
        if (up.ndim not in (2, 4) or down.ndim != up.ndim or up.shape[1] != down.shape[0]
                or (conv and tuple(up.shape[2:]) != (1, 1))):
            raise LoadError(
                f"{name}: the low-rank layer {m} has up {tuple(up.shape)} and down {tuple(down.shape)}, which do "
                "not multiply to a weight (expected up (out, r) with down (r, in), or up (out, r, 1, 1) with "
                "down (r, in, kh, kw)); the file is damaged or not a Control-LoRA"
            )
        lowrank[m] = LowRank(up, down)
    if not lowrank:
        raise LoadError(
            f"{name}: is marked as a Control-LoRA ({MARKER}) but holds no low-rank (.up/.down) layers; "
            "the file is incomplete"
        )
    return full, lowrank


def dense_shapes(full: StateDict, lowrank: dict[str, LowRank], name: str) -> StateDict:
    """Every weight of the ControlNet the file describes, as meta tensors of the right shapes (the
    low-rank layers' full weights included): what config inference and shape checks read."""
    out = {k: torch.empty(t.shape, device="meta") for k, t in full.items()}
    for m, lr in lowrank.items():
        key = m + ".weight"
        if key in out and tuple(out[key].shape) != lr.shape:
            raise LoadError(
                f"{name}: layer {m}: the stored weight {tuple(out[key].shape)} and its low-rank delta {lr.shape} differ in "
                "shape; the Control-LoRA file is damaged"
            )
        out[key] = torch.empty(lr.shape, device="meta")
    return out
