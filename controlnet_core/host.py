"""The host protocol: how a sampler asks the controls for residuals, one model call at a time.

A host (ComfyUI through `nodes/adapter.py`, or our reference sampler) does two things:

1. once per sampling run, before the first step: `source.pre_run(percent_to_sigma)`, where
   `percent_to_sigma(p)` maps a fraction of the schedule to a sigma of the host's noise schedule
   (ComfyUI: `model.model_sampling.percent_to_sigma`, p <= 0 -> a huge sigma, p >= 1 -> 0). This
   fixes each control's active sigma range and drops per-run caches (the hint embedding);
2. on every model call: `source.residuals(StepRequest(...))`, which returns
   `{"input": [...], "middle": [mid], "output": down}` or None when no control is active.

The dict is in the order ComfyUI's UNet consumes it: each encoder block pops `input` from the END
and adds it to its output (which is also the skip it keeps: T2I-Adapter features go here, None for
blocks that get nothing); `middle` is popped and added after the middle block; each decoder block
pops `output` from the END, so `down[-1]` (deepest skip) is used first. The lists are consumed, so
every call returns fresh lists.

Families build their answer as `Outputs`: the same three slots with every list in *encoder* order
(input block 0 first, the first skip first); `control_dict` turns that into the consumable dict.

`pre_run` may also get `host_weights`, a callable returning the host UNet's state dict with LDM
key names (`input_blocks.*`, ...) as it is now, LoRAs applied: families made of the host's own
weights (Control-LoRA) are built from it at the start of every run.

`source` is a `control.Control` or `control.ControlStack` (anything with `pre_run` and `residuals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch

from .errors import InputError

PercentToSigma = Callable[[float], float]
ResidualDict = dict[str, list[torch.Tensor]]
Outputs = dict[str, list]  # slot -> tensors (or None holes) in encoder order; see the module docstring
HostWeights = Callable[[], Mapping[str, torch.Tensor]]

SLOTS = ("input", "output", "middle")  # also the order in which outputs are counted for weights

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond markers


@dataclass(frozen=True)
class StepRequest:
    """One model call of the host.

    x:         the noisy latent as the UNet sees it (B, 4, h, w), already scaled by the host
               (ComfyUI's `calculate_input`: x / sqrt(sigma^2 + 1) for eps/v models);
    sigma:     (B,) the sampler's sigma; every row shares it (only sigma[0] is read, as ComfyUI);
    timesteps: (B,) the same step on the model's 0..999 scale;
    context:   (B, L, D) text context; y: (B, adm) SDXL vector or None;
    cond_or_uncond: one entry per equal chunk of the batch, 0 = cond (positive), 1 = uncond
               (negative), in batch order (ComfyUI's `transformer_options["cond_or_uncond"]`).
    """

    x: torch.Tensor
    sigma: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor | None = None
    cond_or_uncond: tuple[int, ...] = (COND,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cond_or_uncond", tuple(int(c) for c in self.cond_or_uncond))
        batch = self.x.shape[0] if self.x.ndim else 0
        chunks = len(self.cond_or_uncond)
        if self.x.ndim != 4:
            raise InputError(f"the latent must be (batch, channels, h, w); got {tuple(self.x.shape)}")
        if chunks == 0 or batch % chunks:
            raise InputError(
                f"cond_or_uncond lists {chunks} chunk(s) but the batch has {batch} rows; give one 0/1 "
                "entry per equal-size chunk of the batch"
            )
        if any(c not in (COND, UNCOND) for c in self.cond_or_uncond):
            raise InputError(f"cond_or_uncond entries must be 0 (cond) or 1 (uncond); got {self.cond_or_uncond}")
        sigma = torch.as_tensor(self.sigma)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        object.__setattr__(self, "sigma", sigma)
        timesteps = torch.as_tensor(self.timesteps)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        object.__setattr__(self, "timesteps", timesteps)

    @property
    def chunk_size(self) -> int:
        return self.x.shape[0] // len(self.cond_or_uncond)

    def rows(self, kind: int) -> torch.Tensor:
        """Batch indices of the chunks marked `kind` (COND or UNCOND)."""
        n = self.chunk_size
        idx = [i * n + j for i, c in enumerate(self.cond_or_uncond) if c == kind for j in range(n)]
        return torch.tensor(idx, dtype=torch.long, device=self.x.device)


class ControlSource(Protocol):
    def pre_run(self, percent_to_sigma: PercentToSigma, host_weights: HostWeights | None = None) -> None: ...

    def residuals(self, request: StepRequest) -> ResidualDict | None: ...


def control_dict(outputs: Outputs) -> ResidualDict:
    """The dict ComfyUI's UNet consumes, with fresh lists (the UNet pops them empty): `input` is
    reversed (popped from the end, block 0 first); `output` stays in encoder order (popped from the
    end by the decoder, deepest first)."""
    return {
        "input": list(reversed(outputs.get("input", []))),
        "middle": list(outputs.get("middle", [])),
        "output": list(outputs.get("output", [])),
    }


def unet_control(down: list[torch.Tensor], mid: torch.Tensor) -> ResidualDict:
    """`control_dict` of a ControlNet's residuals."""
    return control_dict({"output": down, "middle": [mid]})


def as_sampler_hook(
    source: ControlSource, percent_to_sigma: PercentToSigma, host_weights: HostWeights | None = None
) -> Callable[..., ResidualDict | None]:
    """Start a sampling run on `source` and return the `control_fn` the reference sampler calls:
    `control_fn(x_in, sigma, timesteps, context, y, cond_or_uncond) -> dict | None`.

    Call once per run: it runs `pre_run`, which resets the run's caches.
    """
    source.pre_run(percent_to_sigma, host_weights)

    def control_fn(
        x_in: torch.Tensor, sigma: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
        y: torch.Tensor | None, cond_or_uncond: Any,
    ) -> ResidualDict | None:
        return source.residuals(StepRequest(x_in, sigma, timesteps, context, y, tuple(cond_or_uncond)))

    return control_fn
