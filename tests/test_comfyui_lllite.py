"""ControlNet-LLLite inside a real ComfyUI, over HTTP, on the CPU, on a tiny SDXL-shaped stand-in
(runs only with COMFYUI_PATH).

The same LLLite check at the full SDXL size runs in tests/test_comfyui_union.py (a random full-size
SDXL checkpoint: ~3 min to write, 15 GB of RAM), with `check_lllite_parity` and the reference
node of TEST_PACK from here. This module is the quick one (under a minute, ~2 GB) and holds what
the full size does not: LLLite + a ControlNet in one stack, and the refusals. A small test pack
(written into the temporary ComfyUI base, never shipped) builds a tiny SDXL-shaped model with
ComfyUI's OWN classes (`supported_models.SDXL`, `model_base.SDXL`, `openaimodel.UNetModel`: SDXL's
block numbering and `y`, widths 64/128/256, 1-2 transformer blocks), random text conditioning of
SDXL's widths (2048 / pooled 1280), and `CNCoreTest_KohyaLLLite`: the reference, an LLLite applied
the way kohya's own ComfyUI node does it (a cloned MODEL with `set_model_attn1_patch` /
`set_model_attn2_patch`), with kohya's module math written out in F.conv2d / F.linear. Everything
between (ComfyUI's sampler, `transformer_options`, `BasicTransformerBlock` calling the patches with
`block` / `block_index`, our nodes) is the real thing. Latents are compared (SaveLatent), so no VAE
is needed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch

from helpers_comfyui import NEEDS_COMFYUI, Comfy, error, make_base, ok, run_in_comfyui, serve
from test_lllite import lllite_state_dict

pytestmark = NEEDS_COMFYUI

XL_UNET = "cncore_tiny_sdxl_unet.safetensors"
SD15_UNET = "cncore_tiny_sd15_unet.safetensors"
XL_CN = "cncore_tiny_sdxl_controlnet.safetensors"
LLLITE = "cncore_tiny_controllllite_xl.safetensors"
WIDE_LLLITE = "cncore_wide_controllllite_xl.safetensors"  # made for wider attention than the tiny UNet's
# the tiny SDXL UNet's attention: input 4, 5 (1 transformer block, 128 wide), input 7, 8 and middle (2, 256)
XL_BLOCKS = {"input_blocks_4": (1, 128), "input_blocks_5": (1, 128), "input_blocks_7": (2, 256),
             "input_blocks_8": (2, 256), "middle_block": (2, 256)}

MAKE_MODELS = r'''
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.cldm.cldm import ControlNet
xl_path, sd15_path, cn_path = sys.argv[1:4]

def save(module, path):
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)

ops = comfy.ops.disable_weight_init
XL = dict(image_size=32, in_channels=4, model_channels=64, num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
          channel_mult=[1, 2, 4], transformer_depth_middle=2, use_linear_in_transformer=True, context_dim=2048,
          num_head_channels=64, use_spatial_transformer=True, legacy=False, adm_in_channels=2816, num_classes="sequential")
save(randomize(UNetModel(out_channels=4, transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], dtype=torch.float32,
                         device="cpu", operations=ops, **XL), 1), xl_path)
save(randomize(ControlNet(hint_channels=3, dtype=torch.float32, device="cpu", operations=ops, **XL), 4), cn_path)
SD15 = dict(image_size=32, in_channels=4, model_channels=32, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1] * 6 + [0, 0],
            channel_mult=[1, 2, 2, 2], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
            num_heads=8, use_spatial_transformer=True, legacy=False, adm_in_channels=None)
save(randomize(UNetModel(out_channels=4, transformer_depth_output=[1] * 9 + [0] * 3, dtype=torch.float32, device="cpu",
                         operations=ops, **SD15), 2), sd15_path)
'''

TEST_PACK = r'''
"""Test-only nodes for tests/test_comfyui_lllite.py and test_comfyui_union.py (written into a temporary ComfyUI base)."""
import torch
import torch.nn.functional as F

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import folder_paths


class TinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": ("STRING", {"default": ""}), "family": (["sdxl", "sd15"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, unet_name, family):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        config = comfy.model_detection.detect_unet_config(sd, "")  # ComfyUI's own reading of the shapes
        kind = comfy.supported_models.SDXL if family == "sdxl" else comfy.supported_models.SD15
        model_config = kind(config)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model(sd, "")
        model.load_model_weights(sd, "")
        return (comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device()),)


class Conditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "width": ("INT", {"default": 2048})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, width):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if width == 2048 else {}
        return ([[torch.randn(1, 77, width, generator=g), extra]],)


class KohyaLLLite:
    """The reference: kohya's LLLiteModule math as attn1/attn2 patches on a cloned MODEL."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "lllite_name": ("STRING", {"default": ""}), "image": ("IMAGE",),
                             "strength": ("FLOAT", {"default": 1.0}), "start_percent": ("FLOAT", {"default": 0.0}),
                             "end_percent": ("FLOAT", {"default": 1.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "testing"

    def apply(self, model, lllite_name, image, strength, start_percent, end_percent):
        sd = {k: v.float() for k, v in comfy.utils.load_torch_file(
            folder_paths.get_full_path_or_raise("controlnet", lllite_name)).items()}
        image = image.movedim(-1, 1) * 2.0 - 1.0  # kohya's conditioning images are in [-1, 1]
        sampling = model.get_model_object("model_sampling")
        sigma_hi, sigma_lo = sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent)

        def cond_emb(name):
            w = lambda k: sd[f"{name}.conditioning1.{k}.weight"]
            b = lambda k: sd[f"{name}.conditioning1.{k}.bias"]
            x = F.conv2d(image, w(0), b(0), stride=4)
            if f"{name}.conditioning1.4.weight" in sd:
                x = F.conv2d(F.relu(x), w(2), b(2), stride=4)
                x = F.conv2d(F.relu(x), w(4), b(4), stride=2)
            else:
                x = F.conv2d(F.relu(x), w(2), b(2), stride=sd[f"{name}.conditioning1.2.weight"].shape[-1])
            n, c, h, ww = x.shape
            return x.view(n, c, h * ww).permute(0, 2, 1)

        def module(name, x):
            if f"{name}.down.0.weight" not in sd:
                return x
            cx = cond_emb(name).to(x)
            cx = cx.repeat(x.shape[0] // cx.shape[0], 1, 1)
            p = lambda part: (sd[f"{name}.{part}.0.weight"].to(x), sd[f"{name}.{part}.0.bias"].to(x))
            cx = torch.cat([cx, F.relu(F.linear(x, *p("down")))], dim=2)
            cx = F.relu(F.linear(cx, *p("mid")))
            return x + F.linear(cx, *p("up")) * strength

        def prefix(extra):
            kind, i = extra["block"]
            where = "middle_block" if kind == "middle" else f"{kind}_blocks_{i}"
            return f"lllite_unet_{where}_1_transformer_blocks_{extra['block_index']}_"

        def active(extra):
            return sigma_lo <= float(extra["sigmas"][0]) <= sigma_hi

        def attn1(q, k, v, extra):
            if not active(extra):
                return q, k, v
            p = prefix(extra)
            return module(p + "attn1_to_q", q), module(p + "attn1_to_k", k), module(p + "attn1_to_v", v)

        def attn2(q, k, v, extra):
            if not active(extra):
                return q, k, v
            return module(prefix(extra) + "attn2_to_q", q), k, v

        m = model.clone()
        m.set_model_attn1_patch(attn1)
        m.set_model_attn2_patch(attn2)
        return (m,)


NODE_CLASS_MAPPINGS = {"CNCoreTest_TinyModel": TinyModel, "CNCoreTest_Conditioning": Conditioning,
                       "CNCoreTest_KohyaLLLite": KohyaLLLite}
'''


TEST_PACK_NAME = "cncore_testing_lllite"


def add_test_pack(base: Path) -> None:
    """Put TEST_PACK (the stand-in model, conditioning and the kohya-style reference) into base's custom_nodes."""
    (base / "custom_nodes" / TEST_PACK_NAME).mkdir()
    (base / "custom_nodes" / TEST_PACK_NAME / "__init__.py").write_text(TEST_PACK)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    t0 = time.time()
    base = make_base(tmp_path_factory.mktemp("comfyui_lllite"), "models/diffusion_models")
    add_test_pack(base)
    models = base / "models"
    run_in_comfyui(base / "make_models.py", MAKE_MODELS, models / "diffusion_models" / XL_UNET,
                   models / "diffusion_models" / SD15_UNET, models / "controlnet" / XL_CN, timeout=600)
    safetensors.torch.save_file(lllite_state_dict(XL_BLOCKS, e=8, m=16, seed=3, dtype=torch.float16),
                                models / "controlnet" / LLLITE)
    wide = {**XL_BLOCKS, "input_blocks_4": (1, 640)}
    safetensors.torch.save_file(lllite_state_dict(wide, e=8, m=16, seed=4), models / "controlnet" / WIDE_LLLITE)
    with serve(base, "--disable-all-custom-nodes", "--whitelist-custom-nodes", "comfyui-controlnet-core",
               TEST_PACK_NAME) as server:
        print(f"\n[lllite] fixtures + ComfyUI start: {time.time() - t0:.1f} s")
        yield server


def graph(ours: str | None = None, ref: str | None = None, *, strength: float = 1.0, start: float = 0.0,
          end: float = 1.0, stack_cn: bool = False, builtin_cn: bool = False, family: str = "sdxl",
          prefix: str = "x", seed: int = 7, size: int = 64) -> dict:
    """tiny model -> [reference LLLite patch] -> [our loader + apply (+ a ControlNet in its stack)]
    -> [ComfyUI's ControlNet apply] -> KSampler (3 steps, CFG 7) -> SaveLatent (node "9")."""
    width = 2048 if family == "sdxl" else 768
    p = {
        "1": {"class_type": "CNCoreTest_TinyModel", "inputs": {"unet_name": XL_UNET if family == "sdxl" else SD15_UNET,
                                                               "family": family}},
        "2": {"class_type": "CNCoreTest_Conditioning", "inputs": {"seed": 1, "width": width}},
        "3": {"class_type": "CNCoreTest_Conditioning", "inputs": {"seed": 2, "width": width}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"lllite/{prefix}"}},
    }
    model, pos, neg = ["1", 0], ["2", 0], ["3", 0]
    sched = {"strength": strength, "start_percent": start, "end_percent": end}
    if ref is not None:
        p["20"] = {"class_type": "CNCoreTest_KohyaLLLite", "inputs": {"model": model, "lllite_name": ref,
                                                                     "image": ["4", 0], **sched}}
        model = ["20", 0]
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
        "model": model, "seed": seed, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": pos, "negative": neg, "latent_image": ["6", 0], "denoise": 1.0}}
    return p


def latent(server: Comfy, entry: dict, node: str = "9") -> torch.Tensor:
    (f,) = entry["outputs"][node]["latents"]
    return safetensors.torch.load_file(server.base / "output" / f["subfolder"] / f["filename"])["latent_tensor"]


def run_latent(server: Comfy, prompt: dict, sampled: bool = False) -> tuple[torch.Tensor, float]:
    """The saved latent of `prompt` and the seconds it took; `sampled`: the KSampler (node "7") must
    have run, not come from ComfyUI's cache."""
    t0 = time.time()
    entry = ok(server.run(prompt, timeout=3600))
    if sampled:
        cached = [m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"]
        assert cached and "7" not in cached[0], cached
    return latent(server, entry), time.time() - t0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_lllite_parity(server: Comfy, graph: Callable[..., dict], lllite: str, tag: str) -> None:
    """Our loader + Apply with the LLLite file `lllite` against the kohya-style patch
    (CNCoreTest_KohyaLLLite) on the same model: relative difference of the sampled latents <= 1e-4 at
    the defaults and at strength 0.6, start/end 0.2/0.7 (the window must hold a sampling step: 3
    steps of the normal schedule do, 2 do not); the control changes the result; a prompt without it
    right after ours samples anew and gives the latent of the one before, bit for bit.
    `graph(ours, ref, *, strength, start, end, prefix)` builds the prompts (latent saved by node "9")."""
    plain, t_plain = run_latent(server, graph(prefix="plain"))
    ours, t_ours = run_latent(server, graph(lllite, prefix="ours"))
    after, _ = run_latent(server, graph(prefix="after"), sampled=True)
    ref, t_ref = run_latent(server, graph(ref=lllite, prefix="ref"))
    kw = dict(strength=0.6, start=0.2, end=0.7)
    ours_s, _ = run_latent(server, graph(lllite, prefix="ours_s", **kw))
    ref_s, _ = run_latent(server, graph(ref=lllite, prefix="ref_s", **kw))
    print(f"\n[lllite, {tag}] rel. difference ours vs kohya patch: {rel(ours, ref):.2e} (max abs "
          f"{(ours - ref).abs().max():.2e}); strength 0.6, start 0.2, end 0.7: {rel(ours_s, ref_s):.2e} (max abs "
          f"{(ours_s - ref_s).abs().max():.2e}); effect of the control: {rel(plain, ref):.3f} (with the window: "
          f"{rel(plain, ref_s):.3f}); seconds per prompt: "
          f"plain {t_plain:.1f}, ours {t_ours:.1f}, reference {t_ref:.1f}")
    assert rel(plain, ref) > 1e-2, "the LLLite should change the result"
    assert rel(ours, ref) <= 1e-4
    assert rel(ours_s, ref_s) <= 1e-4 and rel(ours_s, ours) > 1e-3
    # the window must hold a sampling step: the windowed control's effect stands far above the
    # difference measured between ours and the reference (on the tiny stand-in it is ~1e-3 at
    # strength 0.6 with one of 3 steps inside, against a difference of ~3e-7)
    effect_s = rel(plain, ref_s)
    assert effect_s > 1e-4 and effect_s > 100 * rel(ours_s, ref_s), \
        "no sampling step inside start/end: the comparison would prove little"
    assert torch.equal(after, plain), "a prompt after an LLLite prompt must be untouched by it"


# ------------------------------------------------------------------------------------------

def test_lllite_in_comfyui_equals_kohyas_patch_and_leaves_no_trace(xl):
    check_lllite_parity(xl, graph, LLLITE, "tiny SDXL-shaped stand-in")


def test_lllite_and_a_controlnet_in_one_stack(xl):
    ours, _ = run_latent(xl, graph(LLLITE, stack_cn=True, prefix="stack"))
    ref, _ = run_latent(xl, graph(ref=LLLITE, builtin_cn=True, prefix="stack_ref"))
    only_lllite, _ = run_latent(xl, graph(ref=LLLITE, prefix="stack_l"))
    print(f"\n[lllite] LLLite + ControlNet stack vs kohya patch + ComfyUI's ControlNet: rel {rel(ours, ref):.2e}")
    assert rel(only_lllite, ref) > 1e-2  # the ControlNet acts too
    assert rel(ours, ref) <= 1e-4


def test_bad_lllite_prompts_fail_with_a_sentence_and_the_next_prompt_runs(xl):
    err = error(xl.run(graph(WIDE_LLLITE, prefix="wide")))
    assert "attention in input block 4 is 640 wide" in err["exception_message"], err["exception_message"]
    err = error(xl.run(graph(LLLITE, family="sd15", prefix="sd15")))
    assert err["node_type"] == "CNCore_ApplyControlNet"
    assert "made for SDXL models" in err["exception_message"] and "SD1.x" in err["exception_message"]
    plain, _ = run_latent(xl, graph(prefix="plain2"))
    again, _ = run_latent(xl, graph(prefix="plain3"))
    assert torch.equal(plain, again)
