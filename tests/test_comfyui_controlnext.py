"""ControlNeXt inside a real ComfyUI, over HTTP, on the CPU (runs only with COMFYUI_PATH).

Hosts are built with ComfyUI's OWN classes (the test pack of tests/test_comfyui_lllite.py:
`supported_models.SDXL/SD15`, `openaimodel.UNetModel`): an SDXL-shaped UNet (SDXL's block numbering
and `y`) and an SD1.5 UNet, tiny by default; with CNCORE_FULL_SIZE=1 both at full size (SD1.5 860 M
parameters in fp32, SDXL 2.6 B stored in bf16, computed in fp32: ~11 GB of RAM at the peak; the
stack test then skips, its ControlNet being tiny). Random weights.

The reference is a second test pack written here (never shipped): the ControlNeXt module written
out in F.conv2d / F.group_norm / F.linear from the authors' classes, and the injection as the
authors' UNet files compute it, installed on a cloned MODEL with ComfyUI's own
`set_model_input_block_patch_after_skip` (SDXL after conv_in, SD1.5-v2 after input block 3) or
`set_model_output_block_patch` at ("output", 0) (SD1.5-v1, after the middle block); the UNet
weights go in as ComfyUI "set" (absolute, SD1.5) or "diff" (increments, SDXL) patches, keys mapped
with ComfyUI's own `comfy.utils.unet_to_diffusers`. Ours: CNCore_LoadControlNeXtUNet +
CNCore_LoadControlNet + CNCore_ApplyControlNet. Sampled latents are compared (SaveLatent, 3 steps,
CFG 7): relative difference <= 1e-4, far tighter than 1/255 of a decoded image.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from helpers_comfyui import NEEDS_COMFYUI, error, make_base, run_in_comfyui, serve
from test_comfyui_lllite import TEST_PACK_NAME, add_test_pack, rel, run_latent
from test_controlnext import ref_module, save_module

pytestmark = NEEDS_COMFYUI
FULL = os.environ.get("CNCORE_FULL_SIZE") == "1"

XL_UNET, SD15_UNET = "cnx_tiny_sdxl_unet.safetensors", "cnx_sd15_unet.safetensors"
XL_CN = "cnx_tiny_sdxl_controlnet.safetensors"
XL_DELTA, SD15_ABS = "cnx_sdxl_unet.safetensors", "cnx_sd15_unet_weights.safetensors"
XL_MODULE, V1_MODULE, V2_MODULE = "cnx_sdxl_controlnet.safetensors", "cnx_sd15_v1.safetensors", "cnx_sd15_v2.safetensors"

MAKE_MODELS = r'''
import comfy.ops, comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.cldm.cldm import ControlNet
dm, cn_dir, full = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
ops = comfy.ops.disable_weight_init

def save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, path)

def to_out_file(unet, pattern, scale, absolute, path, seed):
    """Random fine-tuning of the UNet's attention out-projections, with diffusers names (ComfyUI's map
    for the config ComfyUI detects)."""
    import comfy.model_detection
    sd = unet.state_dict()
    to_ldm = comfy.utils.unet_to_diffusers(comfy.model_detection.detect_unet_config(sd, ""))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for dkey, lkey in sorted(to_ldm.items()):
        if pattern in dkey and ".to_out.0." in dkey:
            w = sd[lkey]
            d = scale * w.float().std() * torch.randn(w.shape, generator=g)
            out[dkey] = (w.float() + d if absolute else d).half()
    assert out, "no to_out keys"
    save(out, path)

# SDXL: tiny (widths 64/128/256) or, full size, SDXL's own config stored in bf16 (5 GB; ComfyUI computes in fp32)
depth, middle, XL_OUT = (([0, 0, 2, 2, 10, 10], 10, [0, 0, 0, 2, 2, 2, 10, 10, 10]) if full
                         else ([0, 0, 1, 1, 2, 2], 2, [0, 0, 0, 1, 1, 1, 2, 2, 2]))
XL = dict(image_size=32, in_channels=4, model_channels=320 if full else 64, num_res_blocks=[2, 2, 2],
          transformer_depth=depth, channel_mult=[1, 2, 4], transformer_depth_middle=middle, use_linear_in_transformer=True,
          context_dim=2048, num_head_channels=64, use_spatial_transformer=True, legacy=False, adm_in_channels=2816,
          num_classes="sequential")
xl = randomize(UNetModel(out_channels=4, transformer_depth_output=XL_OUT, dtype=torch.bfloat16 if full else torch.float32,
                         device="cpu", operations=ops, **XL), 1)
save(xl.state_dict(), dm + "/''' + XL_UNET + r'''")
to_out_file(xl, "attn2", 0.3, False, cn_dir + "/''' + XL_DELTA + r'''", 5)
del xl
if not full:  # the stack test's ControlNet (tiny host only)
  save(randomize(ControlNet(hint_channels=3, dtype=torch.float32, device="cpu", operations=ops, **XL), 4).state_dict(),
       cn_dir + "/''' + XL_CN + r'''")
mc, mult = (320, [1, 2, 4, 4]) if full else (32, [1, 2, 2, 2])
SD15 = dict(image_size=32, in_channels=4, model_channels=mc, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1] * 6 + [0, 0],
            channel_mult=mult, transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
            num_heads=8, use_spatial_transformer=True, legacy=False, adm_in_channels=None)
SD15_OUT = [1] * 9 + [0] * 3
sd15 = randomize(UNetModel(out_channels=4, transformer_depth_output=SD15_OUT, dtype=torch.float32, device="cpu",
                           operations=ops, **SD15), 2)
save(sd15.state_dict(), dm + "/''' + SD15_UNET + r'''")
to_out_file(sd15, "attn", 0.3, True,
            cn_dir + "/''' + SD15_ABS + r'''", 6)
'''

REF_PACK = r'''
"""Test-only reference nodes for tests/test_comfyui_controlnext.py (written into a temporary ComfyUI base)."""
import math
import torch
import torch.nn.functional as F

import comfy.utils
import folder_paths


def load(name):
    return {k: v.float() for k, v in comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("controlnet", name)).items()}


def module_out(sd, image, t):
    """The authors' module (ControlNeXt-SDXL/models/controlnet.py; ControlNeXt-SD1.5/models/controlnet.py)."""
    conv = lambda x, p, stride=1, pad=1: F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride, pad)
    gn = lambda x, p, groups, eps: F.group_norm(x, groups, sd[p + ".weight"], sd[p + ".bias"], eps)
    freqs = torch.exp(-math.log(10000) * torch.arange(64, dtype=torch.float32) / 64)
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # Timesteps(128, flip_sin_to_cos=True, 0)
    emb = F.linear(F.silu(F.linear(temb, sd["time_embedding.linear_1.weight"], sd["time_embedding.linear_1.bias"])),
                   sd["time_embedding.linear_2.weight"], sd["time_embedding.linear_2.bias"])
    stem = "embedding.0.weight" in sd
    x = image
    if stem:
        x = F.relu(gn(conv(x, "embedding.0", 2), "embedding.1", 2, 1e-5))
        x = F.relu(gn(conv(x, "embedding.3"), "embedding.4", 2, 1e-5))
        x = F.relu(gn(conv(x, "embedding.6"), "embedding.7", 2, 1e-5))
    groups = [4, 8] if stem else [1, 8, 8]
    for i, g in enumerate(groups):
        p = f"down_res.{i}"
        h = conv(F.silu(gn(x, p + ".norm1", g, 1e-6)), p + ".conv1")
        h = h + F.linear(F.silu(emb), sd[p + ".time_emb_proj.weight"], sd[p + ".time_emb_proj.bias"])[:, :, None, None]
        h = conv(F.silu(gn(h, p + ".norm2", g, 1e-6)), p + ".conv2")
        x = (conv(x, p + ".conv_shortcut", 1, 0) if p + ".conv_shortcut.weight" in sd else x) + h
        x = conv(x, f"down_sample.{i}.conv", 2)
    if stem:  # x + Seq(conv, ReLU, GN, conv, GN)(x)
        y = gn(F.relu(conv(x, "mid_convs.0.0")), "mid_convs.0.2", 8, 1e-5)
        x = gn(conv(y, "mid_convs.0.3"), "mid_convs.0.4", 8, 1e-5) + x
    else:
        x = conv(F.relu(conv(x, "mid_convs.0.0")), "mid_convs.0.2")
    return conv(x, "mid_convs.1", 1, 0)


def inject(h, c, scale, pool_first):
    """The authors' UNet lines (ControlNeXt-SDXL/models/unet.py L1205-1212; SD1.5 L1271-1278)."""
    if pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    c = c.to(h)
    mean_l, std_l = torch.mean(h, dim=(1, 2, 3), keepdim=True), torch.std(h, dim=(1, 2, 3), keepdim=True)
    mean_c, std_c = torch.mean(c, dim=(1, 2, 3), keepdim=True), torch.std(c, dim=(1, 2, 3), keepdim=True)
    c = (c - mean_c) * (std_l / (std_c + 1e-12)) + mean_l
    if not pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    return h + c * scale


class ModuleRef:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "module_name": ("STRING", {"default": ""}), "image": ("IMAGE",),
                             "variant": (["sdxl", "sd15-v2", "sd15-v1"],), "strength": ("FLOAT", {"default": 1.0}),
                             "start_percent": ("FLOAT", {"default": 0.0}), "end_percent": ("FLOAT", {"default": 1.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "testing"

    def apply(self, model, module_name, image, variant, strength, start_percent, end_percent):
        sd = load(module_name)
        image = image.movedim(-1, 1).float()
        sampling = model.get_model_object("model_sampling")
        hi, lo = sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent)
        scale = (float(sd["scale"]) if "scale" in sd else 1.0) * strength
        block = {"sdxl": ("input", 0), "sd15-v2": ("input", 3), "sd15-v1": ("output", 0)}[variant]

        def control(h, to):
            sigma = to["sigmas"]
            if not (lo <= float(sigma[0]) <= hi):
                return h
            c = module_out({k: v.to(h.device) for k, v in sd.items()}, image.to(h.device), sampling.timestep(sigma[:1]))
            return inject(h, c, scale, variant != "sdxl")

        m = model.clone()
        if variant == "sd15-v1":
            m.set_model_output_block_patch(lambda h, hsp, to: (control(h, to) if to["block"] == block else h, hsp))
        else:
            m.set_model_input_block_patch_after_skip(lambda h, to: control(h, to) if to["block"] == block else h)
        return (m,)


class UNetRef:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "unet_name": ("STRING", {"default": ""}),
                             "kind": (["delta", "absolute"],), "strength": ("FLOAT", {"default": 1.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "testing"

    def apply(self, model, unet_name, kind, strength):
        sd = load(unet_name)
        to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
        m = model.clone()
        if kind == "delta":
            m.add_patches({"diffusion_model." + to_ldm[k]: ("diff", (v,)) for k, v in sd.items()}, strength)
        else:
            assert strength == 1.0
            m.add_patches({"diffusion_model." + to_ldm[k]: ("set", (v,)) for k, v in sd.items()}, 1.0)
        return (m,)


NODE_CLASS_MAPPINGS = {"CNCoreTest_ControlNeXtRef": ModuleRef, "CNCoreTest_ControlNeXtUNetRef": UNetRef}
'''
REF_PACK_NAME = "cncore_testing_controlnext"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    t0 = time.time()
    base = make_base(tmp_path_factory.mktemp("comfyui_controlnext"), "models/diffusion_models")
    add_test_pack(base)
    (base / "custom_nodes" / REF_PACK_NAME).mkdir()
    (base / "custom_nodes" / REF_PACK_NAME / "__init__.py").write_text(REF_PACK)
    models = base / "models"
    run_in_comfyui(base / "make_models.py", MAKE_MODELS, models / "diffusion_models", models / "controlnet",
                   "1" if FULL else "0", timeout=900)
    cn = models / "controlnet"
    save_module(ref_module("stem", 320 if FULL else 64, seed=11), cn / XL_MODULE)
    save_module(ref_module("sd15-v1", 1280 if FULL else 64, seed=12), cn / V1_MODULE)
    save_module(ref_module("stem", 320 if FULL else 32, seed=13), cn / V2_MODULE)
    data = (cn / XL_MODULE).read_bytes()
    (cn / "cnx_truncated.safetensors").write_bytes(data[: len(data) // 2])
    with serve(base, "--disable-all-custom-nodes", "--whitelist-custom-nodes", "comfyui-controlnet-core",
               TEST_PACK_NAME, REF_PACK_NAME) as server:
        print(f"\n[controlnext] fixtures + ComfyUI start: {time.time() - t0:.1f} s (SD1.5 full size: {FULL})")
        yield server


def graph(family: str, *, ours: str | None = None, ref: str | None = None, variant: str = "sdxl",
          unet: str | None = None, ref_unet: tuple[str, str] | None = None, strength: float = 1.0,
          start: float = 0.0, end: float = 1.0, unet_strength: float = 1.0, stack_cn: bool = False,
          builtin_cn: bool = False, prefix: str = "x") -> dict:
    """host -> [our UNet-weights node | reference UNet patch] -> [reference module patch] ->
    [our loader + Apply] -> KSampler (3 steps, CFG 7, 64 px) -> SaveLatent (node "9")."""
    width = 2048 if family == "sdxl" else 768
    p = {
        "1": {"class_type": "CNCoreTest_TinyModel", "inputs": {"unet_name": XL_UNET if family == "sdxl" else SD15_UNET,
                                                               "family": family}},
        "2": {"class_type": "CNCoreTest_Conditioning", "inputs": {"seed": 1, "width": width}},
        "3": {"class_type": "CNCoreTest_Conditioning", "inputs": {"seed": 2, "width": width}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"cnx/{prefix}"}},
    }
    model, pos, neg = ["1", 0], ["2", 0], ["3", 0]
    sched = {"strength": strength, "start_percent": start, "end_percent": end}
    if unet is not None:
        p["30"] = {"class_type": "CNCore_LoadControlNeXtUNet",
                   "inputs": {"model": model, "weights_name": unet, "strength": unet_strength}}
        model = ["30", 0]
    if ref_unet is not None:
        p["20"] = {"class_type": "CNCoreTest_ControlNeXtUNetRef",
                   "inputs": {"model": model, "unet_name": ref_unet[0], "kind": ref_unet[1], "strength": unet_strength}}
        model = ["20", 0]
    if ref is not None:
        p["21"] = {"class_type": "CNCoreTest_ControlNeXtRef", "inputs": {
            "model": model, "module_name": ref, "image": ["4", 0], "variant": variant, **sched}}
        model = ["21", 0]
    if ours is not None:
        p["10"] = {"class_type": "CNCore_LoadControlNet", "inputs": {"control_net_name": ours}}
        inputs = {"positive": pos, "negative": neg, "control_net": ["10", 0], "image": ["4", 0], **sched,
                  "control_mode": "balanced", "resize_mode": "crop", "interpolation": "nearest-exact"}
        if stack_cn:
            p["12"] = {"class_type": "CNCore_LoadControlNet", "inputs": {"control_net_name": XL_CN}}
            p["13"] = {"class_type": "CNCore_CombineControls", "inputs": {
                "control_net": ["12", 0], "image": ["4", 0], "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}}
            inputs["control_stack"] = ["13", 0]
        p["11"] = {"class_type": "CNCore_ApplyControlNet", "inputs": inputs}
        pos, neg = ["11", 0], ["11", 1]
    if builtin_cn:
        p["14"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": XL_CN}}
        p["15"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": pos, "negative": neg, "control_net": ["14", 0], "image": ["4", 0], "strength": 0.8,
            "start_percent": 0.0, "end_percent": 1.0}}
        pos, neg = ["15", 0], ["15", 1]
    p["7"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 7, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": pos, "negative": neg, "latent_image": ["6", 0], "denoise": 1.0}}
    return p


CASES = {
    # name: (family, module, variant, our UNet weights, reference UNet patch)
    "sdxl": ("sdxl", XL_MODULE, "sdxl", XL_DELTA, (XL_DELTA, "delta")),
    "sd15-v1": ("sd15", V1_MODULE, "sd15-v1", SD15_ABS, (SD15_ABS, "absolute")),
    "sd15-v2": ("sd15", V2_MODULE, "sd15-v2", None, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_controlnext_in_comfyui_equals_the_reference_patch_and_leaves_no_trace(comfy, name):
    family, module, variant, unet, ref_unet = CASES[name]
    plain, t_plain = run_latent(comfy, graph(family, prefix=f"{name}_plain"))
    ours, t_ours = run_latent(comfy, graph(family, ours=module, unet=unet, prefix=f"{name}_ours"))
    after, _ = run_latent(comfy, graph(family, prefix=f"{name}_after"), sampled=True)
    ref, t_ref = run_latent(comfy, graph(family, ref=module, variant=variant, ref_unet=ref_unet, prefix=f"{name}_ref"))
    kw = dict(strength=0.6, start=0.2, end=0.7)
    ours_s, _ = run_latent(comfy, graph(family, ours=module, prefix=f"{name}_ours_s", **kw))
    ref_s, _ = run_latent(comfy, graph(family, ref=module, variant=variant, prefix=f"{name}_ref_s", **kw))
    only_module, _ = run_latent(comfy, graph(family, ref=module, variant=variant, prefix=f"{name}_mod"))
    print(f"\n[controlnext {name}{' full-size SD1.5' if FULL and family == 'sd15' else ''}] rel. difference ours vs "
          f"reference: {rel(ours, ref):.2e} (max abs {(ours - ref).abs().max():.2e}); strength 0.6, 0.2-0.7: "
          f"{rel(ours_s, ref_s):.2e}; effect of the control: {rel(plain, ref):.3f}, of the window "
          f"{rel(plain, ref_s):.3f}, of the UNet weights {rel(only_module, ref):.3f}; s per prompt: plain "
          f"{t_plain:.1f}, ours {t_ours:.1f}, ref {t_ref:.1f}")
    assert rel(plain, ref) > 1e-2, "the ControlNeXt should change the result"
    assert rel(ours, ref) <= 1e-4
    assert rel(ours_s, ref_s) <= 1e-4 and rel(plain, ref_s) > 100 * max(rel(ours_s, ref_s), 1e-7)
    if unet is not None:
        assert rel(only_module, ref) > 1e-3, "the UNet weights should change the result"
    assert torch.equal(after, plain), "a prompt after a ControlNeXt prompt must be untouched by it (unpatched)"


def test_unet_weights_strength_follows_comfyuis_diff_patch(comfy):
    ours, _ = run_latent(comfy, graph("sdxl", unet=XL_DELTA, unet_strength=0.5, prefix="ustr"))
    ref, _ = run_latent(comfy, graph("sdxl", ref_unet=(XL_DELTA, "delta"), unet_strength=0.5, prefix="ustr_ref"))
    assert rel(ours, ref) <= 1e-4


@pytest.mark.skipif(FULL, reason="the stack's ControlNet is written for the tiny SDXL host only")
def test_controlnext_and_a_controlnet_in_one_stack(comfy):
    ours, _ = run_latent(comfy, graph("sdxl", ours=XL_MODULE, stack_cn=True, prefix="stack"))
    ref, _ = run_latent(comfy, graph("sdxl", ref=XL_MODULE, builtin_cn=True, prefix="stack_ref"))
    only, _ = run_latent(comfy, graph("sdxl", ref=XL_MODULE, prefix="stack_only"))
    print(f"\n[controlnext] + ControlNet stack vs reference patch + ComfyUI's ControlNet: rel {rel(ours, ref):.2e}")
    assert rel(only, ref) > 1e-2
    assert rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("case, node, pattern", [
    (dict(family="sdxl", ours=V1_MODULE), "CNCore_ApplyControlNet", "made for SD1.x models"),
    (dict(family="sdxl", unet=SD15_ABS), "CNCore_LoadControlNeXtUNet", "for another base model"),
    (dict(family="sd15", unet=XL_MODULE), "CNCore_LoadControlNeXtUNet", "this is the ControlNeXt module"),
    (dict(family="sd15", ours=SD15_ABS), "CNCore_LoadControlNet", "UNet-weights half of a ControlNeXt"),
    (dict(family="sdxl", ours="cnx_truncated.safetensors"), "CNCore_LoadControlNet", "ControlNeXt"),
])
def test_bad_controlnext_prompts_fail_with_a_sentence_and_the_next_prompt_runs(comfy, case, node, pattern):
    err = error(comfy.run(graph(prefix="bad", **case)))
    assert err["node_type"] == node, err
    assert pattern in err["exception_message"], err["exception_message"]
    assert "Traceback" not in err["exception_message"]
    run_latent(comfy, graph(case["family"], prefix="after_bad"))


# ------------------------------------------------------------------------------------------
# the UNet weights with ComfyUI's own ModelPatcher, in-process: --lowvram, LoRAs, unpatching

LOWVRAM_SCRIPT = r'''
import copy, importlib.util, json, sys
import torch
comfy_path, pack, folder = sys.argv[1:4]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_patcher, comfy.ops, comfy.supported_models, comfy.model_detection, comfy.utils
import folder_paths
folder_paths.add_model_folder_path("controlnet", folder, is_default=True)
spec = importlib.util.spec_from_file_location("cncore", pack + "/__init__.py", submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules["cncore"] = module
spec.loader.exec_module(module)
from cncore.nodes import adapter
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

cpu = torch.device("cpu")
SD15 = dict(image_size=32, in_channels=4, model_channels=32, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1] * 6 + [0, 0],
            channel_mult=[1, 2, 2, 2], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
            num_heads=8, use_spatial_transformer=True, legacy=False, adm_in_channels=None)
torch.manual_seed(0)
unet = UNetModel(out_channels=4, transformer_depth_output=[1] * 9 + [0] * 3, dtype=torch.float32, device="cpu",
                 operations=comfy.ops.disable_weight_init, **SD15)
with torch.no_grad():
    for p in unet.parameters():
        p.normal_(0, 0.05)
sd = unet.state_dict()
config = comfy.model_detection.detect_unet_config(sd, "")
mc = comfy.supported_models.SD15(config)
mc.set_inference_dtype(torch.float32, None)
base = mc.get_model(dict(sd), "")
base.load_model_weights(dict(sd), "")  # pops what it loads: a copy
to_ldm = comfy.utils.unet_to_diffusers(config)
g = torch.Generator().manual_seed(1)
file = {}
for dkey, lkey in sorted(to_ldm.items()):
    if ".to_out.0." in dkey:
        file[dkey] = sd[lkey] + 3.0 * sd[lkey].std() * torch.randn(sd[lkey].shape, generator=g)  # absolute (SD1.5)
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in file.items()}, folder + "/unet.safetensors")
lora_key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
lora = torch.randn(sd[lora_key.removeprefix("diffusion_model.")].shape, generator=g) * 0.1

x = torch.randn(2, 4, 8, 8, generator=g)
t = torch.tensor([500.0, 500.0])
ctx = torch.randn(2, 7, 768, generator=g)

def run(p, lowvram):
    p = p.clone()
    if lowvram:
        p.load(device_to=cpu, lowvram_model_memory=1)  # nothing fits: every module patched on the fly
    else:
        p.patch_model(device_to=cpu)
    with torch.no_grad():
        out = p.model.diffusion_model(x, t, ctx)
    lowvram_modules = sum(len(getattr(m, "weight_function", [])) > 0 for m in p.model.modules())
    p.unpatch_model(device_to=cpu)
    return out, lowvram_modules

def expected(strength, with_lora):
    ref = copy.deepcopy(unet)
    rsd = ref.state_dict()
    with torch.no_grad():
        for dkey, w in file.items():
            k = to_ldm[dkey]
            rsd[k].copy_(rsd[k] + strength * (w - rsd[k]))
        if with_lora:
            rsd[lora_key.removeprefix("diffusion_model.")].add_(lora)
        return ref(x, t, ctx)

with torch.inference_mode():
    plain = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    before = {k: v.clone() for k, v in plain.model.diffusion_model.state_dict().items()}
    ours = adapter.patch_controlnext_unet(plain, "unet.safetensors", 1.0)
    half = adapter.patch_controlnext_unet(plain, "unet.safetensors", 0.5)
    with_lora = ours.clone()
    with_lora.add_patches({lora_key: (lora,)}, 1.0)  # a "diff" patch, as a LoRA's
    rel = lambda a, b: float((a - b).norm() / b.norm())
    report = {}
    for name, p, want in (("full", ours, expected(1.0, False)), ("half", half, expected(0.5, False)),
                          ("lora", with_lora, expected(1.0, True))):
        for mode in (False, True):
            out, low = run(p, mode)
            report[f"{name}_{'lowvram' if mode else 'loaded'}"] = rel(out, want)
            report["lowvram_modules"] = max(report.get("lowvram_modules", 0), low)
    report["effect"] = rel(expected(1.0, False), unet(x, t, ctx))
    after = plain.model.diffusion_model.state_dict()
    report["unpatched_max_abs"] = max(float((after[k] - before[k]).abs().max()) for k in before)
print(json.dumps(report))
'''


def test_unet_weights_with_lowvram_loras_and_unpatching_through_comfyuis_model_patcher(tmp_path):
    """ComfyUI's ModelPatcher in-process: our patches on a loaded and on a --lowvram partially loaded
    model (every module patched on the fly) give the model with the file's weights written in by hand
    (strength 1 and 0.5, and with a LoRA-style diff on top), and unpatching restores every weight."""
    import json
    import subprocess
    from pathlib import Path

    from helpers_comfyui import COMFYUI_PATH, COMFYUI_PYTHON

    script = tmp_path / "lowvram.py"
    script.write_text(LOWVRAM_SCRIPT)
    out = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_PATH, str(Path(__file__).resolve().parents[1]),
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n[controlnext UNet weights, ModelPatcher] {report}")
    assert report["lowvram_modules"] > 10 and report["effect"] > 1e-2
    for k, v in report.items():
        if k.endswith(("_loaded", "_lowvram")):
            assert v <= 1e-5, (k, v)
    assert report["unpatched_max_abs"] == 0.0
