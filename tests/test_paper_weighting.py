"""The ControlNet paper's own weighting as a weight mode and an Apply node choice.

Zhang, Rao, Agrawala 2023, §3.4 "classifier-free guidance resolution weighting": the control is
added to the conditional half of the CFG batch only, and connection i is multiplied by
w_i = 64 / h_i, h_i the side of block i's feature map for a 512x512 image (64, 32, 16, 8 latent
cells). In general w_i = h_max / h_i. The expectations below take h_i from each residual tensor
itself (latent side / residual side), not from the model's `output_levels()`, so they check the
implementation against the formula rather than against its own bookkeeping.
"""

from __future__ import annotations

import torch

from comfyui_controlnet_core import NODE_CLASS_MAPPINGS
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings
from comfyui_controlnet_core.controlnet_core.host import StepRequest
from helpers_models import make_tiny_config, random_controlnet, rel_err

PAPER = "cfg resolution weighting (paper)"


def everything(p: float) -> float:
    return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1.0 - p))


def test_apply_node_offers_it_as_the_last_control_mode():
    spec = NODE_CLASS_MAPPINGS["CNCore_ApplyControlNet"].INPUT_TYPES()["required"]["control_mode"]
    choices, opts = spec
    # appended after the released choices, which keep their positions (saved workflows store values)
    assert choices[:4] == ["balanced", "prompt is more important", "controlnet is more important", "guess mode"]
    assert choices[-1] == PAPER and opts["default"] == "balanced"
    assert "paper" in opts["tooltip"] and "64" in opts["tooltip"]
    s = ControlSettings.from_mode("CFG resolution weighting (paper)")  # as the paper names it
    assert (s.weights, s.apply_to) == ("paper", "cond-only")


def _paper_case(arch: str, size: int):
    cfg = make_tiny_config(arch)
    net = random_controlnet(cfg, seed=21)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 4, size, size, generator=g)
    hint = torch.rand(1, 3, 8 * size, 8 * size, generator=g)  # already 8x the latent: no resize
    ctx = torch.randn(2, 5, cfg.context_dim, generator=g)
    y = torch.randn(2, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
    t = torch.full((2,), 400.0)
    with torch.no_grad():
        down, mid = net(x[1:], hint, t[1:], ctx[1:], y=None if y is None else y[1:])  # the cond row only
    return net, x, hint, ctx, y, t, [*down, mid]


def test_control_scales_each_residual_by_latent_side_over_its_side_on_the_cond_half_only():
    for arch in ("sd15", "sdxl"):
        size, strength = 16, 0.7
        net, x, hint, ctx, y, t, raw = _paper_case(arch, size)
        c = Control(net, hint, ControlSettings.from_mode(PAPER, strength=strength))
        c.pre_run(everything)
        out = c.residuals(StepRequest(x, torch.full((2,), 3.0), t, ctx, y, (1, 0)))  # uncond row first
        got = out["output"] + out["middle"]
        sides = [r.shape[-1] for r in raw]
        assert sorted(set(sides), reverse=True) == [size >> k for k in range(len(set(sides)))]
        for r, g in zip(raw, got):
            w = size / r.shape[-1]  # 64 / h_i at 512 px: 1, 2, 4, 8 (SDXL: 1, 2, 4)
            assert torch.count_nonzero(g[0]) == 0  # uncond row: nothing
            assert rel_err(g[1], r[0] * strength * w) <= 1e-5
        assert got[-1].shape[-1] == min(sides)  # the middle gets the deepest level's weight ...
        w_mid = size / got[-1].shape[-1]
        assert w_mid == (8.0 if arch == "sd15" else 4.0)  # ... which is 64/8 for SD1.x, 64/16 for SDXL


def test_apply_node_choice_runs_it_through_the_control_object():
    from test_nodes import Sampling, StandInControl, expected, fake_model, hint_image, step_inputs

    from comfyui_controlnet_core.nodes.control_object import NetHandle

    cfg = make_tiny_config("sd15")
    handle = NetHandle(random_controlnet(cfg, seed=3), patcher=object(), name="tiny.safetensors")
    image = hint_image(h=128, w=128)
    c = StandInControl(handle).copy()
    c.set_cond_hint(image.movedim(-1, 1), 0.5, (0.0, 1.0))
    c.cncore_mode = PAPER
    c.pre_run(fake_model(), Sampling().percent_to_sigma)
    x, t, cond = step_inputs(size=16)
    out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})  # cond first, then uncond
    down, mid = expected(handle, image, x, t, cond, 0.5)
    for r, e in zip([*out["output"], *out["middle"]], [*down, mid]):
        assert torch.count_nonzero(r[1]) == 0
        assert rel_err(r[0], e[0] * (16 / r.shape[-1])) <= 1e-4  # e: a batch of 2, r: the cond row alone
