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

def builtin(cn, latent, union_type):
    if latent:
        c = comfy.controlnet.ControlNet(cn, compression_ratio=1, latent_format=comfy.latent_formats.Flux(),
                                        load_device=torch.device("cpu"), extra_conds=["y", "guidance"])
    else:
        c = comfy.controlnet.ControlNet(cn, load_device=torch.device("cpu"), extra_conds=["y", "guidance"])
    if union_type is not None:
        c.set_extra_arg("control_type", [union_type])
    return c

def ours(cn, union_type):
    net = loader.load_controlnet({k: v.clone() for k, v in cn.state_dict().items()}, name="flux-cn.safetensors")
    c = adapter.control_class()(adapter._make_handle(net, "flux-cn.safetensors", torch.device("cpu"), torch.device("cpu")))
    if union_type is not None:
        c.extra_args = {"control_type": [union_type]}  # what SetUnionControlNetType stores
    return c, net

def host_out(control_object, hint, strength, x, sigma, cond, batched):
    c = control_object.copy().set_cond_hint(hint, strength, (0.0, 1.0), vae=vae)
    c.pre_run(model, ms.percent_to_sigma)
    with torch.no_grad():
        control = c.get_control(x, sigma, cond, batched, {"cond_or_uncond": [0, 1][:batched]})
        out = host(x, ms.timestep(sigma), cond["c_crossattn"], y=cond["y"], guidance=cond["guidance"], control=control)
    c.cleanup()
    return out, control

g = torch.Generator().manual_seed(3)
CASES = [  # name, double, single, latent, union modes, type, batch (cond+uncond chunks), latent size
    ("instantx-5-0", 5, 0, True, 0, None, 2, (8, 12)),
    ("union-2-4-type-3", 2, 4, True, 10, 3, 1, (8, 12)),
    ("xlabs-2-0", 2, 0, False, 0, None, 2, (8, 10)),
    ("odd-latent-3-2", 3, 2, True, 0, None, 1, (7, 9)),
]
worst = 0.0
for case, depth, single, latent, modes, union_type, batch, (h, w) in CASES:
    cn = ControlNetFlux(latent_input=latent, num_union_modes=modes, control_latent_channels=16 if latent else None,
                        depth=depth, depth_single_blocks=single, operations=OPS, dtype=torch.float32, **TINY)
    cn = randomize(cn, 11 + depth)
    hint = torch.rand(1, 3, 8 * h, 8 * w, generator=g)
    x = torch.randn(batch, 16, h, w, generator=g)
    sigma = torch.full((batch,), 0.6)
    cond = {"c_crossattn": torch.randn(batch, 5, 32, generator=g), "y": torch.randn(batch, 24, generator=g),
            "guidance": torch.full((batch,), 3.5)}
    want, their = host_out(builtin(cn, latent, union_type), hint, 0.7, x, sigma, cond, batch)
    mine, net = ours(cn, union_type)
    got, control = host_out(mine, hint, 0.7, x, sigma, cond, batch)
    plain = host(x, ms.timestep(sigma), cond["c_crossattn"], y=cond["y"], guidance=cond["guidance"])
    assert len(control["input"]) == 19 and len(control["output"]) == (38 if single else 0), case
    assert net.source_format == ("native" if latent else "xlabs") and net.hint_space == ("latent" if latent else "pixel")
    rel = float((got - want).abs().max() / want.abs().max())
    effect = float((plain - want).abs().max() / want.abs().max())
    worst = max(worst, rel)
    print(f"{case}: rel {rel:.2e}, control effect {effect:.2f}")
    assert rel <= 1e-4 and effect > 0.05, (case, rel, effect)

# the host check: a Flux ControlNet on an SD1.5 model -> a sentence before the first step
sd_model = SimpleNamespace(model_sampling=ms, latent_format=None, diffusion_model=None,
                           model_config=SimpleNamespace(unet_config={"context_dim": 768, "adm_in_channels": None}))
c = mine.copy().set_cond_hint(hint, 0.7, (0.0, 1.0), vae=vae)
try:
    c.pre_run(sd_model, ms.percent_to_sigma)
    raise AssertionError("no refusal")
except errors.InputError as e:
    assert "made for Flux.1 models" in str(e) and "SD1.x (a UNet)" in str(e), e
    print("refused:", e)
# a latent net without a VAE
c = mine.copy().set_cond_hint(hint, 0.7, (0.0, 1.0), vae=None)
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
