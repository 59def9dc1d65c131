"""The reference sampler and schedule: ComfyUI's discrete schedule from its formula, and an
end-to-end run (our UNet + ControlNet + Euler/CFG) against diffusers' UNet driven by a hand loop."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings
from comfyui_controlnet_core.controlnet_core.sampler import sample
from comfyui_controlnet_core.controlnet_core.schedule import DiscreteSchedule
from helpers_models import make_tiny_config, random_controlnet, rel_err
from test_unet import unet_pair

SIZE = 16


def formula_sigmas() -> list[float]:
    """sigma_t = sqrt((1 - abar_t) / abar_t) with scaled-linear betas, in float64 by hand."""
    b0, b1 = math.sqrt(0.00085), math.sqrt(0.012)
    abar, out = 1.0, []
    for t in range(1000):
        abar *= 1.0 - (b0 + t / 999 * (b1 - b0)) ** 2
        out.append(math.sqrt((1 - abar) / abar))
    return out


def test_schedule_matches_the_formula():
    s = DiscreteSchedule()
    ref = torch.tensor(formula_sigmas(), dtype=torch.float64)
    assert torch.allclose(s.sigmas.double(), ref, rtol=1e-5)
    assert s.sigma_min == pytest.approx(0.0292, abs=1e-4) and s.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_normal_sigmas_and_timesteps():
    s = DiscreteSchedule()
    ref = formula_sigmas()
    sig = s.normal_sigmas(20)
    assert len(sig) == 21 and sig[-1] == 0
    for i in range(20):  # model time 999 * (1 - i/19), log-sigma interpolated between integer steps
        t = 999 * (1 - i / 19)
        lo, hi = math.floor(t), math.ceil(t)
        want = math.exp((1 - (t - lo)) * math.log(ref[lo]) + (t - lo) * math.log(ref[hi]))
        assert float(sig[i]) == pytest.approx(want, rel=1e-5)
        assert int(s.timestep(sig[i : i + 1])) == round(t)


def test_percent_to_sigma_follows_comfyui():
    s = DiscreteSchedule()
    assert s.percent_to_sigma(0.0) > 1e8 and s.percent_to_sigma(1.0) == 0.0
    assert s.percent_to_sigma(0.5) == pytest.approx(float(s.sigma(torch.tensor(499.5))), rel=1e-6)


@pytest.fixture(scope="module")
def models():
    cfg = make_tiny_config("sd15")
    dm, unet = unet_pair("sd15", seed=21)
    return cfg, unet, dm, random_controlnet(cfg, seed=22)


def _inputs(cfg, batch=2):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(batch, 4, SIZE, SIZE, generator=g), torch.randn(1, 7, cfg.context_dim, generator=g),
            torch.randn(1, 7, cfg.context_dim, generator=g), torch.rand(1, 3, 8 * SIZE, 8 * SIZE, generator=g))


def test_strength_zero_equals_no_control_exactly(models):
    cfg, unet, _, net = models
    noise, pos, neg, hint = _inputs(cfg)
    plain = sample(unet, noise, pos, neg, steps=4, cfg=5.0)
    zero = sample(unet, noise, pos, neg, steps=4, cfg=5.0, control=Control(net, hint, ControlSettings(strength=0.0)))
    full = sample(unet, noise, pos, neg, steps=4, cfg=5.0, control=Control(net, hint))
    assert torch.equal(plain, zero)
    assert rel_err(full, plain) > 1e-2


def test_end_to_end_matches_diffusers_unet_with_our_residuals(models):
    """A hand-written Euler + CFG loop over diffusers' UNet, fed the ControlNet's residuals (strength
    0.7, first half of the schedule), against our sampler + host UNet."""
    cfg, unet, dm, net = models
    noise, pos, neg, hint = _inputs(cfg)
    steps, guidance, strength, end = 6, 4.0, 0.7, 0.5
    ours = sample(unet, noise, pos, neg, steps=steps, cfg=guidance,
                  control=Control(net, hint, ControlSettings(strength=strength, end_percent=end)))

    s = DiscreteSchedule()
    sigmas = s.normal_sigmas(steps)
    sigma_end = s.percent_to_sigma(end)
    b = noise.shape[0]
    ctx = torch.cat([pos.expand(b, -1, -1), neg.expand(b, -1, -1)])
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    with torch.no_grad():
        for i in range(steps):
            sig, nxt = float(sigmas[i]), float(sigmas[i + 1])
            x_in = torch.cat([x, x]) / math.sqrt(sig**2 + 1)
            t = s.timestep(torch.full((2 * b,), sig))
            kw = {}
            if sig >= sigma_end:
                down, mid = net(x_in, hint, t, ctx)
                kw = dict(down_block_additional_residuals=[d * strength for d in down],
                          mid_block_additional_residual=mid * strength)
            eps = dm(x_in, t, encoder_hidden_states=ctx, return_dict=False, **kw)[0]
            den = torch.cat([x, x]) - eps * sig
            cond, uncond = den.chunk(2)
            den = uncond + guidance * (cond - uncond)
            x = x + (x - den) / sig * (nxt - sig)
    assert rel_err(ours, x) <= 1e-4


def test_controlnet_runs_only_inside_its_window(models, monkeypatch):
    cfg, unet, _, net = models
    noise, pos, neg, hint = _inputs(cfg, batch=1)
    calls = []
    orig = type(net).forward

    def counting(self, x, *a, **k):
        calls.append(x.shape[0])
        return orig(self, x, *a, **k)

    monkeypatch.setattr(type(net), "forward", counting)
    sample(unet, noise, pos, neg, steps=10, cfg=3.0,
           control=Control(net, hint, ControlSettings(start_percent=0.0, end_percent=0.5)))
    # 10 normal steps at model time 999*(1 - i/9); active while t >= 499.5: i = 0..4.
    assert calls == [2] * 5
