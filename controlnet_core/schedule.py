"""The SD discrete noise schedule in k-diffusion form, with ComfyUI's conventions.

SD1.x/SD2.x/SDXL were trained with 1000 steps of "scaled linear" betas:
    beta_t = (sqrt(0.00085) + t/999 * (sqrt(0.012) - sqrt(0.00085)))^2,  abar_t = prod(1 - beta)
    sigma_t = sqrt((1 - abar_t) / abar_t)
A sampler walks down in sigma; the UNet sees `x / sqrt(sigma^2 + 1)` and the timestep of sigma.
`timestep(sigma)` is the index of the nearest sigma in log space and `sigma(t)` interpolates
log-sigma linearly between integer t (ComfyUI's `ModelSamplingDiscrete`), so percents and step
gates land on exactly the sigmas ComfyUI computes.
"""

from __future__ import annotations

import torch

NUM_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
# ComfyUI's percent_to_sigma(p <= 0): "bigger than any sigma".
SIGMA_INFINITY = 999999999.9


class DiscreteSchedule:
    def __init__(self, beta_start: float = BETA_START, beta_end: float = BETA_END, steps: int = NUM_TIMESTEPS):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod = alphas_cumprod.float()
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest integer timestep (0..999) of each sigma, by distance in log-sigma."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().reshape(1, -1).cpu() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).reshape(sigma.shape).to(sigma.device)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep: log-sigma interpolated between the integer steps."""
        t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's rule: 0 -> above every sigma, 1 -> 0, else the sigma at model time (1-p)*999."""
        if percent <= 0.0:
            return SIGMA_INFINITY
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * (len(self.sigmas) - 1))))

    def normal_sigmas(self, steps: int) -> torch.Tensor:
        """`steps` sigmas evenly spaced in timestep from the top to the bottom, then 0 (ComfyUI's
        "normal" scheduler)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1; got {steps}")
        top = float(self.timestep(torch.tensor(self.sigma_max)))
        bottom = float(self.timestep(torch.tensor(self.sigma_min)))
        ts = torch.linspace(top, bottom, steps)
        return torch.cat([self.sigma(ts), torch.zeros(1)])
