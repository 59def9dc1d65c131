"""Flux ControlNets in a real ComfyUI (COMFYUI_PATH; skipped otherwise), on the CPU, no server:
our control object (the pack loaded by ComfyUI's own `load_custom_node`) against ComfyUI's built-in
`ControlNetFlux` + `comfy.controlnet.ControlNet` on the same random weights, both feeding ComfyUI's
own `comfy.ldm.flux.model.Flux` host through its `control` dict.

ComfyUI's model detection hard-codes Flux's width (3072), so the tiny-width classes are built
directly (the host with Flux's real 19 double / 38 single blocks: the tiling rule is written for
them); our side loads the ControlNet from its state dict with our loader (BFL names: the XLabs
file for the pixel net, a re-saved latent net for the others). The VAE is a fixed stand-in with
ComfyUI's VAE interface (`encode` of a BHWC image, `spacial_compression_encode`), given to both.
Compared: the host's output for each case, fp32, relative error <= 1e-4.
"""

from __future__ import annotations

import subprocess

from helpers_comfyui import COMFYUI_PATH, COMFYUI_PYTHON, NEEDS_COMFYUI, ROOT

pytestmark = NEEDS_COMFYUI

FLUX_PARITY = r'''
import asyncio, math, sys, torch
from types import SimpleNamespace
comfy_path, pack = sys.argv[1:3]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
assert asyncio.run(nodes.load_custom_node(pack))
import comfy.controlnet, comfy.latent_formats, comfy.model_sampling, comfy.ops
from comfy.ldm.flux.model import Flux
from comfy.ldm.flux.controlnet import ControlNetFlux
name = pack.replace(".", "_x_")
adapter = sys.modules[f"{name}.nodes.adapter"]
from importlib import import_module
loader = import_module(f"{name}.controlnet_core.loader")
errors = import_module(f"{name}.controlnet_core.errors")

def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            elif n.endswith("scale"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module.eval()

OPS = comfy.ops.disable_weight_init
TINY = dict(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=32, mlp_ratio=4.0,
            num_heads=2, axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
host = randomize(Flux(depth=19, depth_single_blocks=38, operations=OPS, dtype=torch.float32, **TINY), 1)

class MS(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
    pass
ms = MS(None)
model = SimpleNamespace(model_sampling=ms, latent_format=comfy.latent_formats.Flux(), diffusion_model=host,
                        model_config=SimpleNamespace(unet_config={"image_model": "flux", **TINY}))

class FakeVAE:
    """ComfyUI's VAE interface: BHWC pixels in [0, 1] -> (B, 16, H/8, W/8)."""
    proj = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))
    def spacial_compression_encode(self):
        return 8
    def encode(self, pixels):
        pooled = torch.nn.functional.avg_pool2d(pixels[..., :3].movedim(-1, 1) * 2 - 1, 8)
        return torch.einsum("oc,bchw->bohw", self.proj, pooled)
vae = FakeVAE()

def builtin(cn, latent, union_type, inpaint=False):
    if latent:  # as load_controlnet_flux_instantx builds it (concat_mask for a 17-channel inpaint net)
        c = comfy.controlnet.ControlNet(cn, compression_ratio=1, latent_format=comfy.latent_formats.Flux(),
                                        load_device=torch.device("cpu"), extra_conds=["y", "guidance"],
                                        concat_mask=inpaint)
    else:
        c = comfy.controlnet.ControlNet(cn, load_device=torch.device("cpu"), extra_conds=["y", "guidance"])
    if union_type is not None:
        c.set_extra_arg("control_type", [union_type])
    return c

def ours(cn, union_type):
    # the file as its authors save it: MistoLine's single blocks under `single_controlnet_blocks.`
    rename = lambda k: "single_controlnet_blocks." + k[len("controlnet_single_blocks."):] if (
        cn.mistoline and k.startswith("controlnet_single_blocks.")) else k
    net = loader.load_controlnet({rename(k): v.clone() for k, v in cn.state_dict().items()}, name="flux-cn.safetensors")
    c = adapter.control_class()(adapter._make_handle(net, "flux-cn.safetensors", torch.device("cpu"), torch.device("cpu")))
    if union_type is not None:
        c.extra_args = {"control_type": [union_type]}  # what SetUnionControlNetType stores
    return c, net

def host_out(control_object, hint, strength, x, sigma, cond, batched, extra=()):
    c = control_object.copy().set_cond_hint(hint, strength, (0.0, 1.0), vae=vae, extra_concat=list(extra))
    c.pre_run(model, ms.percent_to_sigma)
    with torch.no_grad():
        control = c.get_control(x, sigma, cond, batched, {"cond_or_uncond": [0, 1][:batched]})
        out = host(x, ms.timestep(sigma), cond["c_crossattn"], y=cond["y"], guidance=cond["guidance"], control=control)
    c.cleanup()
    return out, control

g = torch.Generator().manual_seed(3)
CASES = [  # name, double, single, latent, union modes, type, batch (cond+uncond chunks), latent size, inpaint
    ("instantx-5-0", 5, 0, True, 0, None, 2, (8, 12), False),
    ("union-2-4-type-3", 2, 4, True, 10, 3, 1, (8, 12), False),
    ("xlabs-2-0", 2, 0, False, 0, None, 2, (8, 10), False),
    ("odd-latent-3-2", 3, 2, True, 0, None, 1, (7, 9), False),
    ("alimama-inpaint-2-1", 2, 1, True, 0, None, 2, (8, 12), True),
    ("alimama-inpaint-no-mask", 1, 1, True, 0, None, 1, (8, 12), None),
    ("mistoline-2-2", 2, 2, False, 0, None, 2, (8, 12), "mistoline"),
]
worst = 0.0
for case, depth, single, latent, modes, union_type, batch, (h, w), inpaint in CASES:
    mistoline = inpaint == "mistoline"
    cn = ControlNetFlux(latent_input=latent, num_union_modes=modes, mistoline=mistoline,
                        control_latent_channels=(17 if inpaint is not False else 16) if latent else None,
                        depth=depth, depth_single_blocks=single, operations=OPS, dtype=torch.float32, **TINY)
    cn = randomize(cn, 11 + depth)
    hint = torch.rand(1, 3, 8 * h, 8 * w, generator=g)
    extra = ()
    if inpaint is True:  # what ControlNetInpaintingAliMamaApply passes: the inverted mask, at the image's size
        mask = (torch.rand(1, 8 * h, 8 * w, generator=g) > 0.5).float()
        extra = [1.0 - mask.reshape(-1, 1, 8 * h, 8 * w)]
    x = torch.randn(batch, 16, h, w, generator=g)
    sigma = torch.full((batch,), 0.6)
    cond = {"c_crossattn": torch.randn(batch, 5, 32, generator=g), "y": torch.randn(batch, 24, generator=g),
            "guidance": torch.full((batch,), 3.5)}
    want, their = host_out(builtin(cn, latent, union_type, inpaint in (True, None)), hint, 0.7, x, sigma, cond, batch, extra)
    mine, net = ours(cn, union_type)
    if case == "instantx-5-0":
        latent_net = mine  # for the refusals below
    got, control = host_out(mine, hint, 0.7, x, sigma, cond, batch, extra)
    plain = host(x, ms.timestep(sigma), cond["c_crossattn"], y=cond["y"], guidance=cond["guidance"])
    assert len(control["input"]) == 19 and len(control["output"]) == (38 if single else 0), case
    layout = "native" if latent else "mistoline" if mistoline else "xlabs"
    assert net.source_format == layout and net.hint_space == ("latent" if latent else "pixel"), (case, net.source_format)
    rel = float((got - want).abs().max() / want.abs().max())
    effect = float((plain - want).abs().max() / want.abs().max())
    worst = max(worst, rel)
    print(f"{case}: rel {rel:.2e}, control effect {effect:.2f}")
    assert rel <= 1e-4 and effect > 0.05, (case, rel, effect)

# the host check: a Flux ControlNet on an SD1.5 model -> a sentence before the first step
sd_model = SimpleNamespace(model_sampling=ms, latent_format=None, diffusion_model=None,
                           model_config=SimpleNamespace(unet_config={"context_dim": 768, "adm_in_channels": None}))
hint = torch.rand(1, 3, 64, 96, generator=g)
c = latent_net.copy().set_cond_hint(hint, 0.7, (0.0, 1.0), vae=vae)
try:
    c.pre_run(sd_model, ms.percent_to_sigma)
    raise AssertionError("no refusal")
except errors.InputError as e:
    assert "made for Flux.1 models" in str(e) and "SD1.x (a UNet)" in str(e), e
    print("refused:", e)
# a latent net without a VAE
c = latent_net.copy().set_cond_hint(hint, 0.7, (0.0, 1.0), vae=None)
try:
    c.pre_run(model, ms.percent_to_sigma)
    raise AssertionError("no refusal")
except errors.InputError as e:
    assert "connect the VAE" in str(e), e
print(f"flux parity ok: worst rel {worst:.2e}")
'''


def test_flux_controlnets_match_comfyuis_builtin_in_comfyuis_flux(tmp_path):
    script = tmp_path / "flux_parity.py"
    script.write_text(FLUX_PARITY)
    done = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_PATH, str(ROOT)], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "flux parity ok" in done.stdout


# ------------------------------------------------------------------ full width, real loaders, real files

MAKE_FULL_WIDTH = r'''
import math, sys, torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[3])
from helpers_flux import randomize_
host_path, cn_path = sys.argv[1:3]
# Flux.1 dev's real widths (3072 = 24 x 128, T5 4096, CLIP 768, guidance), 1 double + 1 single block each
kw = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
          axes_dims_rope=[16, 56, 56])
host = randomize_(FluxTransformer2DModel(**kw), 1)
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in host.state_dict().items()}, host_path)
del host
cn = randomize_(FluxControlNetModel(num_mode=10, **{k: v for k, v in kw.items() if k != "patch_size"}), 2)
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in cn.state_dict().items()}, cn_path)
'''

FULL_WIDTH_PARITY = r'''
import asyncio, os, sys, time, torch
comfy_path, pack, folder = sys.argv[1:4]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes, folder_paths
assert asyncio.run(nodes.load_custom_node(pack))
import comfy.controlnet, comfy.sd, comfy.utils
name = pack.replace(".", "_x_")
adapter = sys.modules[f"{name}.nodes.adapter"]
folder_paths.add_model_folder_path("controlnet", folder)

class FakeVAE:
    proj = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))
    def spacial_compression_encode(self):
        return 8
    def encode(self, pixels):
        pooled = torch.nn.functional.avg_pool2d(pixels[..., :3].movedim(-1, 1) * 2 - 1, 8)
        return torch.einsum("oc,bchw->bohw", self.proj, pooled)

t0 = time.time()
patcher = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(os.path.join(folder, "flux1-tiny-host.safetensors")))
model = patcher.model
assert type(model.diffusion_model).__name__ == "Flux" and len(model.diffusion_model.double_blocks) == 1
builtin = comfy.controlnet.load_controlnet(os.path.join(folder, "flux-union-1-1.safetensors"))
assert type(builtin.control_model).__name__ == "ControlNetFlux" and builtin.control_model.latent_input
ours = adapter.load_control("flux-union-1-1.safetensors")
print(f"loaded in {time.time() - t0:.1f} s; ours: {ours.handle.net.family}, {ours.handle.net.source_format}, "
      f"{ours.handle.net.dtype}; label: {adapter.model_info('flux-union-1-1.safetensors')['label']}")
builtin.set_extra_arg("control_type", [2])
ours.extra_args = {"control_type": [2]}
g = torch.Generator().manual_seed(3)
hint = torch.rand(1, 3, 64, 96, generator=g)
x = torch.randn(2, 16, 8, 12, generator=g)
sigma = torch.full((2,), 0.55)
cond = {"c_crossattn": torch.randn(2, 4, 4096, generator=g), "y": torch.randn(2, 768, generator=g),
        "guidance": torch.full((2,), 4.0)}
outs = {}
for label, obj in (("builtin", builtin), ("ours", ours)):
    c = obj.copy().set_cond_hint(hint, 0.8, (0.0, 1.0), vae=FakeVAE())
    c.pre_run(model, model.model_sampling.percent_to_sigma)
    t1 = time.time()
    with torch.no_grad():
        control = c.get_control(x, sigma, cond, 2, {"cond_or_uncond": [0, 1]})
        outs[label] = model.apply_model(x, sigma, c_crossattn=cond["c_crossattn"], control=control,
                                        transformer_options={}, y=cond["y"], guidance=cond["guidance"])
    print(f"{label}: control + host {time.time() - t1:.1f} s")
    c.cleanup()
with torch.no_grad():
    plain = model.apply_model(x, sigma, c_crossattn=cond["c_crossattn"], transformer_options={}, y=cond["y"],
                              guidance=cond["guidance"])
ref = outs["builtin"]
rel = float((outs["ours"] - ref).abs().max() / ref.abs().max())
effect = float((plain - ref).abs().max() / ref.abs().max())
print(f"full width: rel {rel:.2e}, control effect {effect:.2f}")
assert rel <= 1e-4 and effect > 0.01, (rel, effect)
print("full width parity ok")
'''


def test_full_width_union_through_the_real_loaders(tmp_path):
    """A full-width Flux dev host (1 double + 1 single block, 545 M parameters, diffusers layout)
    and a full-width Union ControlNet (1 + 1 blocks, 10 modes, 546 M parameters, diffusers layout as
    InstantX/Shakker ship it), bf16 files written here from diffusers' classes: ComfyUI's
    `load_diffusion_model_state_dict` + `load_controlnet` (real detection and key conversion) vs our
    `load_control` from the controlnet folder; same hint, union type 2 (depth), CFG batch; ComfyUI's
    model output (denoised) compared, fp32 compute from the same bf16 values. ~8 GB of RAM."""
    import sys

    models = tmp_path / "models"
    models.mkdir()
    make = tmp_path / "make.py"
    make.write_text(MAKE_FULL_WIDTH)
    subprocess.run([sys.executable, str(make), str(models / "flux1-tiny-host.safetensors"),
                    str(models / "flux-union-1-1.safetensors"), str(ROOT / "tests")], check=True, timeout=900)
    script = tmp_path / "full_width.py"
    script.write_text(FULL_WIDTH_PARITY)
    done = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_PATH, str(ROOT), str(models)], capture_output=True,
                          text=True, timeout=1200, cwd=tmp_path)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "full width parity ok" in done.stdout
