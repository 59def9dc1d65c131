"""The reference host UNet against diffusers' UNet2DConditionModel on the same random weights.

Residuals go in the two ways the hosts take them: diffusers' `down_block_additional_residuals` /
`mid_block_additional_residual`, and our (ComfyUI's) popped `{"input", "middle", "output"}` dict.
The weights go from ours to diffusers through diffusers' own single-file converter
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`, what `from_single_file` uses on
real SD checkpoints), so no key table of ours is involved: a wrong name on our side fails the strict
load, a wrong placement fails the numbers.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_controlnet_core.controlnet_core.errors import InputError
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


def unet_pair(arch: str, seed: int):
    """(diffusers UNet2DConditionModel, our UNet) with the same random weights: ours randomised, then
    written as a single-file checkpoint and converted by diffusers' own converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = UNet(make_tiny_config(arch))
    _randomize_(ours.named_parameters(), seed=seed)
    dm = UNet2DConditionModel(**diffusers_unet_config(arch))
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    dm.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(dm.config)), strict=True)
    return dm.eval(), ours.eval()


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    arch = request.param
    dm, ours = unet_pair(arch, seed=10 + ARCHS.index(arch))
    return arch, dm, ours, make_tiny_config(arch)


def test_real_sd15_unet_key_names():
    """Our UNet at the SD1.5 config has exactly the key names of v1-5-pruned-emaonly's UNet
    (model.diffusion_model.*, 686 tensors), spot-checked against names written out by hand."""
    from comfyui_controlnet_core.controlnet_core.config import SD15

    with torch.device("meta"):
        keys = set(UNet(SD15).state_dict())
    assert len(keys) == 686
    for k in ("time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
              "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.1.1.proj_in.weight",
              "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
              "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.11.0.out_layers.3.bias",
              "middle_block.0.in_layers.0.weight", "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
              "middle_block.2.emb_layers.1.weight", "output_blocks.2.1.conv.weight",
              "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
              "output_blocks.11.1.transformer_blocks.0.norm3.weight", "output_blocks.0.0.skip_connection.weight",
              "out.0.weight", "out.2.bias"):
        assert k in keys, k
    assert not any(k.startswith(("zero_convs", "input_hint_block", "middle_block_out")) for k in keys)


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
