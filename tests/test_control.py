"""Controls and stacks against independent expectations: ComfyUI's schedule formula, lllyasviel's
soft scales, diffusers' logspace, raw ControlNet outputs scaled by hand."""

import dataclasses
import math

import pytest
import torch

from comfyui_controlnet_core.controlnet_core.config import SD15, SDXL
from comfyui_controlnet_core.controlnet_core.control import (
    Control,
    ControlSettings,
    ControlStack,
    default_global_pool,
    residual_weights,
)
from comfyui_controlnet_core.controlnet_core.errors import ControlNetError, InputError
from comfyui_controlnet_core.controlnet_core.host import StepRequest
from comfyui_controlnet_core.controlnet_core.model import ControlNet

TINY_SD15 = dataclasses.replace(SD15, model_channels=32, channel_mult=(1, 2, 2, 2))
TINY_SDXL = dataclasses.replace(
    SDXL, model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1), transformer_depth_middle=1,
    head_dim=16, adm_in_channels=64,
)


def tiny_net(cfg=TINY_SD15, seed=0) -> ControlNet:
    torch.manual_seed(seed)
    net = ControlNet(cfg).eval()
    with torch.no_grad():  # every parameter random, zero convs included
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    return net


@pytest.fixture(scope="module")
def net():
    return tiny_net()


def everything(p: float) -> float:
    """percent_to_sigma of a schedule where every sigma below 1e9 is inside [0, 1]."""
    return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1.0 - p))


def request(batch=2, cond_or_uncond=(0, 1), size=8, sigma=5.0, seed=1, ctx_dim=768, y=None):
    g = torch.Generator().manual_seed(seed)
    return StepRequest(
        x=torch.randn(batch, 4, size, size, generator=g),
        sigma=torch.full((batch,), sigma),
        timesteps=torch.full((batch,), 500.0),
        context=torch.randn(batch, 5, ctx_dim, generator=g),
        y=y,
        cond_or_uncond=cond_or_uncond,
    )


def hint_image(batch=1, size=64, seed=2):
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


def raw(net, req, hint_bhwc):
    """The ControlNet's unscaled outputs [down..., mid] straight from the model with the hint."""
    hint = hint_bhwc.permute(0, 3, 1, 2)
    down, mid = net(req.x, hint, req.timesteps, req.context, req.y)
    return [*down, mid]


def as_list(d):
    assert d["input"] == []
    assert len(d["middle"]) == 1
    return [*d["output"], d["middle"][0]]


# ----------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"start_percent": 0.7, "end_percent": 0.3}, "start_percent 0.7 is after end_percent 0.3"),
        ({"strength": -0.1}, "strength -0.1 is out of range"),
        ({"strength": 10.5}, "strength 10.5 is out of range"),
        ({"strength": float("nan")}, "strength must be a number"),
        ({"start_percent": -0.1}, "start_percent -0.1 is out of range"),
        ({"end_percent": 1.2}, "end_percent 1.2 is out of range"),
        ({"weights": "sharp"}, "unknown weights 'sharp'"),
        ({"weights": [1.0, float("inf")]}, "finite"),
        ({"apply_to": "uncond"}, "unknown apply_to 'uncond'"),
        ({"resize": "fill"}, "unknown resize mode"),
    ],
)
def test_bad_settings_are_named(kw, words):
    with pytest.raises(InputError, match=words):
        ControlSettings(**kw)


def test_modes_as_users_know_them():
    assert ControlSettings.from_mode("balanced") == ControlSettings(weights="uniform", apply_to="both")
    assert ControlSettings.from_mode("prompt is more important").weights == "soft"
    assert ControlSettings.from_mode("prompt is more important").apply_to == "both"
    more = ControlSettings.from_mode("ControlNet is more important", strength=0.5)
    assert (more.weights, more.apply_to, more.strength) == ("soft", "cond-only", 0.5)
    assert ControlSettings.from_mode("guess mode") == ControlSettings.from_mode("ControlNet is more important")
    with pytest.raises(InputError, match="unknown control mode"):
        ControlSettings.from_mode("my way")


def test_weight_rules_against_their_sources():
    # lllyasviel/ControlNet gradio apps: [strength * 0.825 ** float(12 - i) for i in range(13)].
    assert residual_weights("soft", 13) == pytest.approx([0.825 ** (12 - i) for i in range(13)], rel=1e-12)
    assert residual_weights("soft", 13)[0] == pytest.approx(0.0994140, rel=1e-5)  # 0.825**12 = 0.680625**6 by hand
    # SDXL (our documented rule, as ACN): 0.825 ** (9 - i), middle at full strength.
    sdxl = residual_weights("soft", 10)
    assert sdxl[-1] == 1.0 and sdxl[0] == pytest.approx(0.825**9)
    # diffusers' guess mode: torch.logspace(-1, 0, n) = 10 ** (-1 + i / (n - 1)).
    assert residual_weights("diffusers", 13) == pytest.approx([10 ** (-1 + i / 12) for i in range(13)], rel=1e-6)
    assert residual_weights("uniform", 10) == [1.0] * 10
    with pytest.raises(InputError, match="12 weights given but this sd15 ControlNet has 13 outputs"):
        residual_weights([1.0] * 12, 13, "sd15 ControlNet")


def test_default_global_pool_by_file_name():
    assert default_global_pool("models/controlnet/control_v11e_sd15_shuffle.safetensors")
    assert default_global_pool("control_v11e_sd15_shuffle_fp16.pth")
    assert not default_global_pool("control_v11p_sd15_canny.safetensors")
    assert not default_global_pool("shuffle_canny.pth")


# ------------------------------------------------------------------------------------- scaling


@torch.no_grad()
def test_strength_and_soft_weights_scale_each_residual(net):
    req, hint = request(), hint_image()
    c = Control(net, hint, ControlSettings(strength=0.7, weights="soft"))
    c.pre_run(everything)
    got = as_list(c.residuals(req))
    want = raw(net, req, hint)
    assert len(got) == 13
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.allclose(g, w * (0.7 * 0.825 ** (12 - i)), atol=1e-6, rtol=1e-5), i


@torch.no_grad()
def test_user_weight_list_and_strength_zero(net):
    req, hint = request(), hint_image()
    weights = [0.1 * i for i in range(13)]
    c = Control(net, hint, ControlSettings(strength=2.0, weights=weights))
    c.pre_run(everything)
    for i, (g, w) in enumerate(zip(as_list(c.residuals(req)), raw(net, req, hint))):
        assert torch.allclose(g, w * (2.0 * 0.1 * i), atol=1e-6), i
    off = Control(net, hint, ControlSettings(strength=0.0))
    off.pre_run(everything)
    assert off.residuals(req) is None  # strength 0 attaches nothing, as ComfyUI's apply node
    with pytest.raises(InputError, match="3 weights given"):
        Control(net, hint, ControlSettings(weights=[1.0, 1.0, 1.0]))


@torch.no_grad()
def test_global_pool_replaces_each_residual_by_its_mean(net):
    req, hint = request(), hint_image()
    c = Control(net, hint, ControlSettings(global_pool=True, strength=0.5))
    c.pre_run(everything)
    for g, w in zip(as_list(c.residuals(req)), raw(net, req, hint)):
        want = 0.5 * w.mean(dim=(2, 3), keepdim=True).expand_as(w)
        assert g.shape == w.shape
        assert torch.allclose(g, want, atol=1e-6)


# ----------------------------------------------------------------------------------- schedule


def comfy_discrete_schedule():
    """ComfyUI's ModelSamplingDiscrete (scaled-linear betas) and normal scheduler, written from the
    formulas: sigma(t) interpolates log-sigma linearly; percent p -> sigma(t = (1 - p) * 999)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()

    def sigma(t: float) -> float:
        lo, hi = math.floor(t), math.ceil(t)
        w = t - lo
        return math.exp((1 - w) * log_sigmas[lo].item() + w * log_sigmas[hi].item())

    def percent_to_sigma(p: float) -> float:
        if p <= 0.0:
            return 999999999.9
        if p >= 1.0:
            return 0.0
        return sigma((1.0 - p) * 999.0)

    # normal scheduler: timesteps linspace(999, 0, steps), then a final 0 sigma (not a model call).
    steps = [sigma(999.0 * (1 - i / 19)) for i in range(20)]
    return steps, percent_to_sigma


@torch.no_grad()
def test_start_end_gate_on_a_20_step_euler_schedule(net):
    sigmas, percent_to_sigma = comfy_discrete_schedule()
    c = Control(net, hint_image(), ControlSettings(start_percent=0.2, end_percent=0.6))
    c.pre_run(percent_to_sigma)
    active = [i for i, s in enumerate(sigmas) if c.residuals(request(sigma=s)) is not None]
    # Step i sits at model time 999 * (1 - i/19); active iff 0.4 * 999 <= t_i <= 0.8 * 999,
    # i.e. 0.2 <= i/19 <= 0.6, i.e. 3.8 <= i <= 11.4.
    assert active == list(range(4, 12))
    full = Control(net, hint_image(), ControlSettings())
    full.pre_run(percent_to_sigma)
    assert all(full.is_active(s) for s in sigmas)


def test_gate_is_inclusive_at_both_ends(net):
    c = Control(net, hint_image(), ControlSettings(start_percent=0.25, end_percent=0.75))
    c.pre_run(lambda p: {0.25: 8.0, 0.75: 2.0}[p])
    assert [c.is_active(s) for s in (8.0001, 8.0, 5.0, 2.0, 1.9999)] == [False, True, True, True, False]


def test_residuals_before_pre_run_is_an_error(net):
    c = Control(net, hint_image())
    with pytest.raises(ControlNetError, match="pre_run"):
        c.residuals(request())


# ------------------------------------------------------------------------------ halves, masks


@torch.no_grad()
def test_cond_only_leaves_uncond_rows_untouched(net):
    hint = hint_image()
    for order in ((0, 1), (1, 0)):
        req = request(cond_or_uncond=order)
        c = Control(net, hint, ControlSettings.from_mode("ControlNet is more important"))
        c.pre_run(everything)
        got = as_list(c.residuals(req))
        cond, uncond = order.index(0), order.index(1)
        # Reference: diffusers' guess mode runs the ControlNet on the cond rows alone.
        alone = StepRequest(req.x[cond : cond + 1], req.sigma[:1], req.timesteps[:1], req.context[cond : cond + 1])
        want = raw(net, alone, hint)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g[uncond], torch.zeros_like(g[uncond]))
            assert torch.allclose(g[cond : cond + 1], w * 0.825 ** (12 - i), atol=1e-6)
        # An uncond-only call gets no control at all.
        assert c.residuals(request(batch=1, cond_or_uncond=(1,))) is None


@torch.no_grad()
def test_mask_zeroes_residuals_outside_the_region(net):
    req, hint = request(size=16), hint_image(size=128)
    mask = torch.ones(1, 128, 128)
    mask[:, :, :64] = 0.0  # left half off; it stays on the grid of every block (16, 8, 4, 2 cells)
    masked = Control(net, hint, ControlSettings(), mask=mask)
    plain = Control(net, hint, ControlSettings())
    masked.pre_run(everything)
    plain.pre_run(everything)
    for g, w in zip(as_list(masked.residuals(req)), as_list(plain.residuals(req))):
        half = g.shape[-1] // 2
        assert torch.equal(g[..., :half], torch.zeros_like(g[..., :half]))
        assert torch.equal(g[..., half:], w[..., half:])


def test_bad_masks_are_named(net):
    with pytest.raises(InputError, match=r"\(batch, height, width\)"):
        Control(net, hint_image(), mask=torch.ones(64, 64))
    with pytest.raises(InputError, match="from 0 to 1"):
        Control(net, hint_image(), mask=torch.full((1, 8, 8), 2.0))
    c = Control(net, hint_image(), mask=torch.ones(3, 8, 8))
    c.pre_run(everything)
    with pytest.raises(InputError, match="3 mask images for 1 latents"):
        c.residuals(request())


@torch.no_grad()
def test_hint_per_frame_tiles_over_cond_and_uncond(net):
    frames = hint_image(batch=2)
    req = request(batch=4, cond_or_uncond=(0, 1))
    c = Control(net, frames)
    c.pre_run(everything)
    got = as_list(c.residuals(req))
    want = raw(net, req, torch.cat([frames, frames]))  # frame i with latent i in both chunks
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
    bad = Control(net, hint_image(batch=3))
    bad.pre_run(everything)
    with pytest.raises(InputError, match="3 hint images for 2 latents"):
        bad.residuals(req)


# ----------------------------------------------------------------------------- stacks, caches


@torch.no_grad()
def test_stack_equals_the_sum_of_its_parts():
    net_a, net_b = tiny_net(seed=0), tiny_net(seed=1)
    req = request()
    a = Control(net_a, hint_image(seed=3), ControlSettings(strength=0.8, weights="soft"))
    b = Control(net_b, hint_image(seed=4), ControlSettings(strength=1.3, apply_to="cond-only"))
    stack = ControlStack([a, b])
    stack.pre_run(everything)
    parts = [as_list(a.residuals(req)), as_list(b.residuals(req))]
    for g, pa, pb in zip(as_list(stack.residuals(req)), *parts):
        assert torch.allclose(g, pa + pb, atol=1e-6)
    # A chain (ComfyUI's set_previous_controlnet) is the same sum, and flattening does not count twice.
    b.set_previous(a)
    b.pre_run(everything)
    for g, s in zip(as_list(b.residuals(req)), as_list(stack.residuals(req))):
        assert torch.allclose(g, s, atol=1e-6)
    assert len(ControlStack([b, a]).controls) == 2
    with pytest.raises(InputError, match="loop"):
        a.set_previous(b)


@torch.no_grad()
def test_each_call_returns_fresh_lists(net):
    c = Control(net, hint_image())
    c.pre_run(everything)
    first = c.residuals(request())
    first["output"].pop()
    first["middle"].pop()
    second = c.residuals(request())
    assert len(second["output"]) == 12 and len(second["middle"]) == 1


@torch.no_grad()
def test_hint_embedding_is_computed_once_per_run(net, monkeypatch):
    calls = []
    original = net.embed_hint

    def counting(hint):
        calls.append(tuple(hint.shape))
        return original(hint)

    monkeypatch.setattr(net, "embed_hint", counting)
    c = Control(net, hint_image())
    c.pre_run(everything)
    for s in (9.0, 7.0, 5.0, 3.0):
        c.residuals(request(sigma=s))
    assert calls == [(1, 3, 64, 64)]
    c.residuals(request(size=16))  # another latent size needs its own hint
    assert calls[-1] == (1, 3, 128, 128) and len(calls) == 2
    c.pre_run(everything)  # a new run starts from scratch
    c.residuals(request())
    assert len(calls) == 3


def test_mixed_architectures_are_refused_by_name(net):
    xl = Control(tiny_net(TINY_SDXL), hint_image())
    with pytest.raises(InputError, match=r"control 1 is sd15.*control 2 is sdxl"):
        ControlStack([Control(net, hint_image()), xl])
    with pytest.raises(InputError, match="different architectures"):
        Control(net, hint_image(), previous=xl)


@torch.no_grad()
def test_context_of_the_wrong_family_names_both_sides(net):
    xl = Control(tiny_net(TINY_SDXL), hint_image())
    xl.pre_run(everything)
    with pytest.raises(InputError, match=r"sdxl ControlNet expects text context of width 2048 \(SDXL\), got 768 \(SD1.x\)"):
        xl.residuals(request(y=torch.randn(2, 64)))
    sd = Control(net, hint_image())
    sd.pre_run(everything)
    with pytest.raises(InputError, match=r"sd15 ControlNet expects text context of width 768 \(SD1.x\), got 2048 \(SDXL\)"):
        sd.residuals(request(ctx_dim=2048))


def test_step_request_checks_chunks():
    with pytest.raises(InputError, match="3 chunk"):
        request(batch=2, cond_or_uncond=(0, 1, 1))
    with pytest.raises(InputError, match="0 \\(cond\\) or 1 \\(uncond\\)"):
        request(batch=2, cond_or_uncond=(0, 2))
