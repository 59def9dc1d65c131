"""The reference host UNet against diffusers' UNet2DConditionModel on the same random weights.

Residuals go in the two ways the hosts take them: diffusers' `down_block_additional_residuals` /
`mid_block_additional_residual`, and our (ComfyUI's) popped `{"input", "middle", "output"}` dict.
The key mapping below is written for this test from diffusers' block structure (up_blocks.L is the
decoder level from the deepest up; L*(n+1)+j numbers the flat LDM `output_blocks`).
"""

from __future__ import annotations

import pytest
import torch

from comfyui_controlnet_core.controlnet_core.errors import InputError
from comfyui_controlnet_core.controlnet_core.formats.diffusers import _RESNET_BACK, Layout, _prefix_table, _rename
from comfyui_controlnet_core.controlnet_core.host import unet_control
from comfyui_controlnet_core.controlnet_core.unet import UNet
from helpers_models import _randomize_, diffusers_config, make_inputs, make_tiny_config, random_controlnet, rel_err

ARCHS = ["sd15", "sd21", "sdxl"]
SIZE = 16  # see test_model_parity: 8x8 leaves 1x1 at the deepest level of tiny widths


def diffusers_unet_config(arch: str) -> dict:
    c = diffusers_config(arch)
    for k in ("conditioning_embedding_out_channels",):
        c.pop(k)
    ups = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    c["up_block_types"] = tuple(ups[t] for t in reversed(c["down_block_types"]))
    c["out_channels"] = 4
    c["sample_size"] = SIZE
    return c


def diffusers_unet_to_native(sd: dict, cfg) -> dict:
    layout = Layout.from_config(cfg)
    table = {d: (n, r) for n, d, r in _prefix_table(layout)
             if not n.startswith(("zero_convs", "input_hint_block", "middle_block_out"))}
    nrb, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    for L in range(levels):
        level = levels - 1 - L
        for j in range(nrb + 1):
            idx = L * (nrb + 1) + j
            table[f"up_blocks.{L}.resnets.{j}"] = (f"output_blocks.{idx}.0", True)
            table[f"up_blocks.{L}.attentions.{j}"] = (f"output_blocks.{idx}.1", False)
        if level > 0:
            pos = 2 if cfg.transformer_depth[level] else 1
            table[f"up_blocks.{L}.upsamplers.0.conv"] = (f"output_blocks.{L * (nrb + 1) + nrb}.{pos}.conv", False)
    table["conv_norm_out"] = ("out.0", False)
    table["conv_out"] = ("out.2", False)
    out, unmapped = _rename(sd, table, _RESNET_BACK)
    assert not unmapped, unmapped[:5]
    return out


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    from diffusers import UNet2DConditionModel

    arch = request.param
    dm = UNet2DConditionModel(**diffusers_unet_config(arch))
    _randomize_(dm.named_parameters(), seed=10 + ARCHS.index(arch))
    dm.eval()
    cfg = make_tiny_config(arch)
    ours = UNet(cfg)
    ours.load_state_dict(diffusers_unet_to_native(dm.state_dict(), cfg), strict=True)
    return arch, dm.eval(), ours.eval(), cfg


def _random_residuals(cfg, inp, seed=3):
    """Residuals of the right shapes and scale: those of a random ControlNet of the same config."""
    with torch.no_grad():
        down, mid = random_controlnet(cfg, seed=seed)(inp.x, inp.hint, inp.t, inp.context, y=inp.y)
    return down, mid


def _run_diffusers(dm, inp, down=None, mid=None):
    kw = {}
    if inp.text_embeds is not None:
        kw["added_cond_kwargs"] = {"text_embeds": inp.text_embeds, "time_ids": inp.time_ids}
    with torch.no_grad():
        return dm(inp.x, inp.t, encoder_hidden_states=inp.context, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid, return_dict=False, **kw)[0]


def test_unet_without_control_matches_diffusers(pair):
    arch, dm, ours, cfg = pair
    inp = make_inputs(cfg, batch=2, size=SIZE)
    with torch.no_grad():
        got = ours(inp.x, inp.t, inp.context, inp.y)
    want = _run_diffusers(dm, inp)
    assert rel_err(got, want) <= 1e-4


def test_unet_consumes_residuals_like_diffusers(pair):
    arch, dm, ours, cfg = pair
    inp = make_inputs(cfg, batch=2, size=SIZE)
    down, mid = _random_residuals(cfg, inp)
    assert len(down) + 1 == cfg.num_outputs
    with torch.no_grad():
        got = ours(inp.x, inp.t, inp.context, inp.y, control=unet_control(down, mid))
        plain = ours(inp.x, inp.t, inp.context, inp.y)
    want = _run_diffusers(dm, inp, [d.clone() for d in down], mid.clone())
    assert rel_err(got, want) <= 1e-4
    assert rel_err(got, plain) > 1e-3  # the residuals did something


def test_control_lists_are_consumed_from_the_end():
    cfg = make_tiny_config("sd15")
    ours = UNet(cfg).eval()
    inp = make_inputs(cfg, batch=1, size=SIZE)
    down, mid = _random_residuals(cfg, inp)
    control = unet_control(down, mid)
    with torch.no_grad():
        ours(inp.x, inp.t, inp.context, control=control)
    assert control["output"] == [] and control["middle"] == []


def test_odd_latent_sizes_round_trip():
    cfg = make_tiny_config("sd15")
    ours = UNet(cfg).eval()
    inp = make_inputs(cfg, batch=1, size=SIZE)
    x = torch.randn(1, 4, 13, 11)
    with torch.no_grad():
        assert ours(x, inp.t[:1], inp.context[:1]).shape == x.shape


def test_residual_of_another_model_is_named():
    cfg = make_tiny_config("sd15")
    ours = UNet(cfg).eval()
    inp = make_inputs(cfg, batch=1, size=SIZE)
    down, mid = _random_residuals(cfg, inp)
    with pytest.raises(InputError, match="another base model"):
        ours(inp.x, inp.t, inp.context, control=unet_control(down, torch.randn(1, 7, 2, 2)))
