"""A minimal sampler for the reference host: Euler on the SD discrete schedule, with CFG.

It drives controls exactly as ComfyUI's KSampler does: `pre_run(percent_to_sigma)` once per run,
then for every model call the residuals for that call's batch. With CFG the cond and uncond rows
run in one batch, cond first (`cond_or_uncond = (0, 1)`). Per step, with s = sigma:

    eps      = unet(x / sqrt(s^2 + 1), timestep(s), context, control=residuals)
    denoised = x - s * eps                      (eps prediction)
    guided   = uncond + cfg * (cond - uncond)   (on the denoised estimates)
    x        = x + (x - guided) / s * (s_next - s)
"""

from __future__ import annotations

from typing import Callable

import torch

from .host import COND, UNCOND, ControlSource, StepRequest
from .schedule import DiscreteSchedule
from .unet import UNet

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


@torch.no_grad()
def sample(
    unet: UNet,
    noise: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor | None = None,
    *,
    steps: int = 20,
    cfg: float = 7.5,
    control: ControlSource | None = None,
    y: torch.Tensor | None = None,
    uncond_y: torch.Tensor | None = None,
    schedule: DiscreteSchedule | None = None,
    sigmas: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise `noise` (B, C, h, w; unit variance) to a clean latent.

    `context` (B or 1, L, D) is the prompt, `uncond_context` the negative prompt (CFG is skipped
    when it is None or cfg == 1). `sigmas` overrides the schedule's "normal" sigmas.
    """
    schedule = schedule or DiscreteSchedule()
    sigmas = schedule.normal_sigmas(steps) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)
    batch = noise.shape[0]
    use_cfg = uncond_context is not None and cfg != 1.0
    ctx = _rows(context, batch)
    yy = None if y is None else _rows(y, batch)
    cond_or_uncond: tuple[int, ...] = (COND,)
    if use_cfg:
        ctx = torch.cat([ctx, _rows(uncond_context, batch)])
        if y is not None:
            yy = torch.cat([yy, _rows(uncond_y if uncond_y is not None else y, batch)])
        cond_or_uncond = (COND, UNCOND)
    if control is not None:
        control.pre_run(schedule.percent_to_sigma, unet.state_dict)

    x = noise.float() * (1.0 + sigmas[0] ** 2).sqrt()  # ComfyUI's full-denoise noise scaling
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_in = torch.cat([x] * len(cond_or_uncond))
        sig = s.expand(x_in.shape[0])
        t = schedule.timestep(sig).to(x.device)
        scaled = x_in / (s**2 + 1).sqrt()
        residuals = None
        if control is not None:
            residuals = control.residuals(StepRequest(scaled, sig, t, ctx, yy, cond_or_uncond))
        eps = unet(scaled, t, ctx, yy, control=residuals).float()
        denoised = x_in - eps * s
        if use_cfg:
            cond, uncond = denoised.chunk(2)
            denoised = uncond + cfg * (cond - uncond)
        x = x + (x - denoised) / s * (s_next - s)
        if callback is not None:
            callback(i, n)
    return x


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{t.shape[0]} conditioning rows for a batch of {batch}; give 1 or {batch}")
