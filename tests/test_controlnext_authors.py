"""ControlNeXt against the authors' own code (dvlab-research/ControlNeXt), imported from a checkout
outside the repository: set CONTROLNEXT_PATH to it (skipped without; nothing of it is copied here).

For each variant the authors' module class and their modified UNet2DConditionModel (which holds the
injection) get random weights; the module's state dict is saved as .safetensors and loaded by our
loader, the UNet's weights are ours (the reference host, LDM names) converted by diffusers' own
single-file converter. Compared: the module output and the full UNet output, fp32, <= 1e-4 relative.

    SDXL      ControlNeXt-SDXL/models/controlnet.py ControlNetModel, models/unet.py forward(controls=...)
    SD1.5 v2  ControlNeXt-SD1.5-Training/models/controlnext.py ControlNeXtModel, models/unet.py
              forward(conditional_controls=...)
    SD1.5 v1  ControlNeXt-SD1.5/models/controlnet.py ControlNetModel, models/unet.py
              forward(mid_block_additional_residual=...)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from comfyui_controlnet_core.controlnet_core import loader
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings
from comfyui_controlnet_core.controlnet_core.host import StepRequest
from helpers_models import _randomize_, make_inputs, make_tiny_config, rel_err
from test_controlnext import everything, host_width, save_module
from test_unet import SIZE, diffusers_unet_config

CONTROLNEXT_PATH = os.environ.get("CONTROLNEXT_PATH", "")
pytestmark = pytest.mark.skipif(not CONTROLNEXT_PATH, reason="CONTROLNEXT_PATH is not set (a ControlNeXt checkout)")

VARIANTS = {
    # name: (host arch, module file, module class, kwargs, UNet file, forward keyword, output key)
    "sdxl": ("sdxl", "ControlNeXt-SDXL/models/controlnet.py", "ControlNetModel", "final_out_channels",
             "ControlNeXt-SDXL/models/unet.py", "controls", "out"),
    "sd15-v2": ("sd15", "ControlNeXt-SD1.5-Training/models/controlnext.py", "ControlNeXtModel", None,
                "ControlNeXt-SD1.5-Training/models/unet.py", "conditional_controls", "output"),
    "sd15-v1": ("sd15", "ControlNeXt-SD1.5/models/controlnet.py", "ControlNetModel", None,
                "ControlNeXt-SD1.5/models/unet.py", "mid_block_additional_residual", "out"),
}


def import_file(rel: str):
    """A module of the checkout, by path, under a unique name (the variant folders all call theirs `models`)."""
    sys.modules.setdefault("einops", types.SimpleNamespace(rearrange=lambda *a, **k: None))  # dead-code import
    path = Path(CONTROLNEXT_PATH) / rel
    name = "cnx_authors_" + rel.replace("/", "_").replace("-", "_").replace(".", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def authors_module(variant: str, width: int, seed: int):
    arch, mfile, cls, width_kw, *_ = VARIANTS[variant]
    Model = getattr(import_file(mfile), cls)
    m = Model(**({width_kw: width} if width_kw else {}))
    if width_kw is None:  # the SD1.5 classes hard-code the width (320 / 1280): the last 1x1 conv for the tiny host
        c = m.mid_convs[1]
        m.mid_convs[1] = torch.nn.Conv2d(c.in_channels, width, 1)
    _randomize_(m.named_parameters(), seed)
    if variant == "sd15-v1":
        with torch.no_grad():
            m.scale.fill_(0.8)
    if variant == "sd15-v2":
        m.scale = 1.0  # controlnext_scale, the training scale the pipeline passes
    return m.eval()


def authors_unet(variant: str, ours):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    arch, *_, ufile, _, _ = VARIANTS[variant]
    UNet = import_file(ufile).UNet2DConditionModel
    dm = UNet(**diffusers_unet_config(arch))
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    dm.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(dm.config)), strict=True)
    return dm.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ours_equals_the_authors_code(variant, tmp_path):
    from comfyui_controlnet_core.controlnet_core.unet import UNet

    arch, *_, kw, out_key = VARIANTS[variant]
    cfg = make_tiny_config(arch)
    ours_unet = UNet(cfg)
    _randomize_(ours_unet.named_parameters(), seed=40)
    ours_unet.eval()
    dm = authors_unet(variant, ours_unet)
    ref = authors_module(variant, host_width(arch, variant), seed=41)
    save_module(ref, tmp_path / "controlnet.safetensors")
    net = loader.load_controlnet(tmp_path / "controlnet.safetensors")

    inp = make_inputs(cfg, batch=2, size=SIZE)
    inp.t = torch.tensor([700.0, 700.0])
    hint = torch.rand(1, 3, 8 * SIZE, 8 * SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        controls = ref(hint.expand(2, -1, -1, -1), inp.t)
        module_rel = rel_err(net.control_map(net.embed_hint(hint), inp.t).expand_as(controls[out_key]),
                             controls[out_key])
        kwargs = {kw: controls}
        if inp.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": inp.text_embeds, "time_ids": inp.time_ids}
        want = dm(inp.x, inp.t, encoder_hidden_states=inp.context, return_dict=False, **kwargs)[0]
        control = Control(net, hint, ControlSettings())
        control.pre_run(everything, ours_unet.state_dict)
        res = control.residuals(StepRequest(inp.x, torch.full((2,), 5.0), inp.t, inp.context, inp.y, (0,)))
        got = ours_unet(inp.x, inp.t, inp.context, inp.y, control=res)
        plain = ours_unet(inp.x, inp.t, inp.context, inp.y)
    unet_rel = rel_err(got, want)
    print(f"\n[authors' code, {variant}] module output rel {module_rel:.2e}; UNet output rel {unet_rel:.2e}; "
          f"effect of the control {rel_err(plain, want):.3f}")
    assert module_rel <= 1e-4
    assert unet_rel <= 1e-4
    assert rel_err(plain, want) > 3e-3
