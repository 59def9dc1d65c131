"""The pack inside a real ComfyUI, over HTTP, on the CPU.

Runs only when COMFYUI_PATH points to a ComfyUI checkout (skipped otherwise). COMFYUI_PYTHON is
the interpreter of that ComfyUI's venv (default: this interpreter). See the README, "Tests in a
real ComfyUI".

What happens: a temporary base directory gets models/, input/, output/, user/ and custom_nodes/
(the pack linked in), so nothing is written into the checkout. A random-weight SD1.5 checkpoint
(full size, real single-file layout, fp16) and ControlNets (SD1.5 full size, a tiny SDXL one, a
damaged file) are written with ComfyUI's own model classes, in its interpreter. ComfyUI starts
headless (`--cpu --listen 127.0.0.1`), and the tests talk to it like a client: /object_info,
POST /prompt, /history. Images are 64x64 with 3 steps, so a prompt takes seconds.
Two tests at the end need no server: they run a short script in ComfyUI's interpreter against its
own code (where its UNet and control_merge first read an overlapped residual dict; the fast
path's state dropped when ComfyUI unloads our ControlNet).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import test_workflows as tw
from helpers_comfyui import (COMFYUI_PATH, COMFYUI_PYTHON, NEEDS_COMFYUI, ROOT, error, make_base, ok, pixel_diff,
                             run_in_comfyui, run_small, serve)
# re-exported: tests/test_browser.py imports these from here

pytestmark = NEEDS_COMFYUI

CKPT = "v1-5-pruned-emaonly-fp16.safetensors"      # the name the shipped workflows use
CANNY = "control_v11p_sd15_canny_fp16.safetensors"
TILE = "control_v11f1e_sd15_tile_fp16.safetensors"
SDXL_CN = "cncore_tiny_sdxl_controlnet.safetensors"
BROKEN = "broken_controlnet.safetensors"
T2I = "t2iadapter_canny_sd15v2.pth"  # the name tests and the T2I example workflow use
SDXL_T2I = "cncore_tiny_sdxl_t2i_adapter.safetensors"
CLORA = "control_lora_rank128_v11p_sd15_canny_fp16.safetensors"  # the name the Control-LoRA workflow uses
CKPT_AS_CN = "sd15_checkpoint_in_the_wrong_folder.safetensors"  # the 2 GB checkpoint, hard-linked
QUANTISED = "int8_controlnet.safetensors"                       # an int8 weight: a dtype no ControlNet has
SWAP = "replaced_controlnet.safetensors"                         # replaced on disk between prompts
OUR_NODES = ("CNCore_LoadControlNet", "CNCore_Preprocessor", "CNCore_ApplyControlNet", "CNCore_CombineControls",
             "CNCore_LoadControlNeXtUNet", "CNCore_PoseKeypoints")

# Runs in ComfyUI's interpreter: random weights into ComfyUI's own classes, saved in the layouts
# real files use (checkpoint: model.diffusion_model. / first_stage_model. / cond_stage_model.;
# ControlNet: the unprefixed LDM layout of the v1.1 fp16 safetensors files).
MAKE_MODELS = r'''
import comfy.ops, comfy.sd1_clip
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.cldm.cldm import ControlNet
ckpt_path, cn_path, xl_path, clora_path = sys.argv[1:5]

def half(prefix, module):
    return {prefix + k: v.half().contiguous() for k, v in module.state_dict().items()}

SD15 = dict(image_size=32, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
            use_linear_in_transformer=False, context_dim=768, num_heads=8, use_spatial_transformer=True,
            legacy=False, use_checkpoint=False, adm_in_channels=None)
ops = comfy.ops.manual_cast
unet = UNetModel(out_channels=4, transformer_depth_output=[1] * 9 + [0] * 3, dtype=torch.float32, device="cpu",
                 operations=ops, **SD15)
sd = half("model.diffusion_model.", randomize(unet, 1))
del unet
sd.update(half("first_stage_model.", random_vae(2)))
sd.update(half("cond_stage_model.", randomize(comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32), 3)))
save_file(sd, ckpt_path)
del sd
cn = randomize(ControlNet(hint_channels=3, dtype=torch.float32, device="cpu", operations=ops, **SD15), 4)
save_file(half("", cn), cn_path)

# An SD1.5 Control-LoRA (rank 128, Stability's layout) for that checkpoint: .up/.down on the layers
# diffusers' Control-LoRA conversion lists, everything else (hint encoder, zero convs, norms, biases)
# stored whole, the lora_controlnet marker.
import re
LOWRANK = re.compile(r"(^input_blocks\.0\.0$|^time_embed\.[02]$|\.op$|\.in_layers\.2$|\.out_layers\.3$"
                     r"|\.emb_layers\.1$|\.skip_connection$|\.proj_in$|\.proj_out$|\.attn[12]\.to_[qkv]$"
                     r"|\.attn[12]\.to_out\.0$|\.ff\.net\.0\.proj$|\.ff\.net\.2$)")
g = torch.Generator().manual_seed(6)
clora = {"lora_controlnet": torch.tensor([])}
for k, v in cn.state_dict().items():
    module, _, kind = k.rpartition(".")
    if kind == "weight" and LOWRANK.search(module) and not module.startswith(("zero_convs", "input_hint_block")):
        fan_in = math.prod(v.shape[1:])
        r = min(128, v.shape[0], fan_in)
        up = torch.randn(v.shape[0], r, generator=g) / math.sqrt(r)
        clora[module + ".up"] = (up if v.ndim == 2 else up[:, :, None, None]).half()
        clora[module + ".down"] = (0.3 * torch.randn(r, *v.shape[1:], generator=g) / math.sqrt(fan_in)).half()
    else:
        clora[k] = v.half().contiguous()
save_file(clora, clora_path)
del cn, clora
XL = dict(image_size=32, in_channels=4, model_channels=64, num_res_blocks=[1, 1], transformer_depth=[0, 1],
          channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=2048,
          num_head_channels=64, use_spatial_transformer=True, legacy=False, adm_in_channels=2816,
          num_classes="sequential")
save_file(half("", randomize(ControlNet(hint_channels=3, dtype=torch.float32, device="cpu", operations=ops, **XL), 5)),
          xl_path)
'''

# A full-size SD1.5 T2I-Adapter (1-channel, like the canny/sketch files) built with ComfyUI's own
# class and saved as TencentARC's .pth files are: torch.save of the state dict (fp32).
MAKE_T2I = r'''
from comfy.t2i_adapter.adapter import Adapter
out_path, xl_path = sys.argv[1:3]

adapter = Adapter(cin=64, channels=[320, 640, 1280, 1280], nums_rb=2, ksize=1, sk=True, use_conv=False, xl=False)
torch.save(randomize(adapter, 6).state_dict(), out_path)
# a tiny SDXL adapter (3-channel hints, 16x unshuffle), for the wrong-model checks
xl = Adapter(cin=768, channels=[64, 128, 128, 128], nums_rb=2, ksize=1, sk=True, use_conv=False, xl=True)
save_file({k: v.contiguous() for k, v in randomize(xl, 7).state_dict().items()}, xl_path)
'''


# ------------------------------------------------------------------------------------------
# server

@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("comfyui_base"))
    cn_dir = base / "models" / "controlnet"
    run_in_comfyui(base / "make_models.py", MAKE_MODELS, base / "models/checkpoints" / CKPT, cn_dir / CANNY,
                   cn_dir / SDXL_CN, cn_dir / CLORA, timeout=900)
    os.link(cn_dir / CANNY, cn_dir / TILE)  # same weights under the second workflow name
    run_in_comfyui(base / "make_t2i.py", MAKE_T2I, cn_dir / T2I, cn_dir / SDXL_T2I, timeout=300)
    os.link(cn_dir / CANNY, cn_dir / SWAP)
    os.link(base / "models/checkpoints" / CKPT, cn_dir / CKPT_AS_CN)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(cn_dir / SDXL_CN))
    sd["input_blocks.1.0.in_layers.2.weight"] = sd["input_blocks.1.0.in_layers.2.weight"].to(torch.int8)
    save_file(sd, str(cn_dir / QUANTISED))
    (cn_dir / BROKEN).write_bytes(b"\x00\x01not a safetensors file" * 10)
    # CNCORE_COMFYUI_FLAGS: extra ComfyUI flags for the whole suite, e.g. "--fp16-unet" (fp16 weights,
    # fp32 compute on the CPU: ComfyUI's manual cast, for its loader and ours alike)
    with serve(base, *os.environ.get("CNCORE_COMFYUI_FLAGS", "").split()) as server:
        yield server


# ------------------------------------------------------------------------------------------
# prompts

def graph(control: str | None, loader: str = "CNCore_LoadControlNet", cn_name: str = CANNY, seed: int = 7,
          steps: int = 3, strength: float = 1.0, start: float = 0.0, end: float = 1.0, extra: dict | None = None,
          mask_size: tuple[int, int] | None = None, prefix: str = "cmp", hint_batch: int = 1,
          latent_batch: int = 1, size: tuple[int, int] = (64, 64)) -> dict:
    """ckpt -> text -> [loader + apply] -> KSampler -> VAEDecode -> SaveImage (node "9")."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house by a lake", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size[0], "height": size[1],
                                                           "batch_size": latent_batch}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }
    pos, neg = ["2", 0], ["3", 0]
    if control is not None:
        name_key = "control_net_name"
        p["10"] = {"class_type": loader, "inputs": {name_key: cn_name}}
        hint = ["4", 0]
        if hint_batch > 1:
            p["13"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["4", 0], "amount": hint_batch}}
            hint = ["13", 0]
        inputs = {"positive": pos, "negative": neg, "control_net": ["10", 0], "image": hint,
                  "strength": strength, "start_percent": start, "end_percent": end}
        if control == "CNCore_ApplyControlNet":
            inputs.update({"control_mode": "balanced", "resize_mode": "crop", "interpolation": "nearest-exact"})
        inputs.update(extra or {})
        if mask_size is not None:
            p["12"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": mask_size[0], "height": mask_size[1]}}
            inputs["mask"] = ["12", 0]
        p["11"] = {"class_type": control, "inputs": inputs}
        pos, neg = ["11", 0], ["11", 1]
    p["7"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": pos, "negative": neg, "latent_image": ["6", 0], "denoise": 1.0}}
    return p


# ------------------------------------------------------------------------------------------
# tests

def test_object_info_lists_our_nodes(comfy):
    info = comfy.get("/object_info")
    for node in OUR_NODES:
        assert node in info, f"{node} missing from /object_info"
        assert info[node]["category"] == "conditioning/controlnet"
        assert "(CNCore)" in info[node]["display_name"]
    names = info["CNCore_LoadControlNet"]["input"]["required"]["control_net_name"][0]
    assert CANNY in names and SDXL_CN in names
    apply = info["CNCore_ApplyControlNet"]
    assert apply["input_order"]["required"] == [
        "positive", "negative", "control_net", "image", "strength", "start_percent", "end_percent",
        "control_mode", "resize_mode", "interpolation"]
    assert apply["input_order"]["optional"] == ["vae", "mask", "control_stack", "control_type", "union_multi_condition"]
    assert apply["output"] == ["CONDITIONING", "CONDITIONING"]
    assert info["CNCore_LoadControlNet"]["output"] == ["CONTROL_NET"] == info["ControlNetLoader"]["output"]
    assert "canny" in info["CNCore_Preprocessor"]["input"]["required"]["method"][0]


def workflows_for(ckpt: str) -> list[Path]:
    """The shipped workflows whose API twin loads the checkpoint `ckpt` (each server has one family's
    model files; the SDXL workflows run in tests/test_comfyui_union.py)."""
    return [p for p in tw.UI_FILES
            if any(n["inputs"].get("ckpt_name") == ckpt for n in tw.load_pair(p)[1].values())]


SD15_WORKFLOWS = workflows_for(CKPT)


def test_workflows_validate_against_real_object_info(comfy):
    specs = comfy.get("/object_info")
    for ui_path in SD15_WORKFLOWS:
        ui, api = tw.load_pair(ui_path)
        assert tw.validate_api(api, specs) == [], ui_path.name
        assert tw.validate_ui(ui, specs) == [], ui_path.name
        assert tw.same_graph(ui, api, specs) == [], ui_path.name


@pytest.mark.parametrize("name", [p.name for p in SD15_WORKFLOWS])
def test_api_workflow_runs(comfy, name):
    run_small(comfy, json.loads((tw.WORKFLOWS / "api" / name).read_text()), steps=3)


# (run key, loader node, apply node): ComfyUI's built-in path, ours, and the two mixed pairings
PAIRINGS = [
    ("builtin", "ControlNetLoader", "ControlNetApplyAdvanced"),
    ("ours", "CNCore_LoadControlNet", "CNCore_ApplyControlNet"),
    ("our_loader_builtin_apply", "CNCore_LoadControlNet", "ControlNetApplyAdvanced"),
    ("builtin_loader_our_apply", "ControlNetLoader", "CNCore_ApplyControlNet"),
]


def test_same_image_as_comfyui_builtin_controlnet(comfy):
    runs = {}
    for key, loader, apply in PAIRINGS:
        runs[key] = comfy.images(ok(comfy.run(graph(apply, loader=loader, prefix=key))), "9")
    runs["none"] = comfy.images(ok(comfy.run(graph(None, prefix="none"))), "9")
    img = runs["builtin"][0]
    saturated = float(np.mean((img == 0) | (img == 255)))
    d_ours = pixel_diff(runs["ours"], runs["builtin"])
    effect = pixel_diff(runs["none"], runs["builtin"])
    print(f"\n[parity] max pixel diff CNCore vs ComfyUI built-in: {d_ours} (of 255); "
          f"control effect (no control vs built-in): {effect}; saturated pixels: {saturated:.1%}")
    assert effect > 20, "the ControlNet should visibly change the image"
    assert saturated < 0.5, "images mostly clipped: the comparison would prove little"
    assert d_ours <= 3
    # our net in ComfyUI's apply node runs our runtime: the same image as our apply node
    assert pixel_diff(runs["our_loader_builtin_apply"], runs["ours"]) == 0
    # ComfyUI's net in our apply node with default options is applied exactly like ComfyUI does
    assert pixel_diff(runs["builtin_loader_our_apply"], runs["builtin"]) == 0
    # the loader says in ComfyUI's log what it found
    assert f"CNCore: loaded {CANNY}: ControlNet for SD1.x (original layout, " in comfy.log.read_text()


def test_schedule_and_strength_match_builtin(comfy):
    kw = dict(strength=0.7, start=0.3, end=0.8)
    a = comfy.images(ok(comfy.run(graph("ControlNetApplyAdvanced", loader="ControlNetLoader", prefix="s_b", **kw))), "9")
    b = comfy.images(ok(comfy.run(graph("CNCore_ApplyControlNet", prefix="s_o", **kw))), "9")
    d = pixel_diff(a, b)
    print(f"\n[parity] strength 0.7, start 0.3, end 0.8: max pixel diff {d}")
    assert d <= 3


def test_comfyui_loaded_controlnet_takes_our_options(comfy):
    """A mask (and a non-default mode) on ComfyUI's net goes through our runtime, same as our loader."""
    extra = {"control_mode": "prompt is more important"}
    a = comfy.images(ok(comfy.run(graph("CNCore_ApplyControlNet", loader="ControlNetLoader", mask_size=(64, 64),
                                         extra=extra, prefix="m_b"))), "9")
    b = comfy.images(ok(comfy.run(graph("CNCore_ApplyControlNet", mask_size=(64, 64), extra=extra, prefix="m_o"))), "9")
    assert pixel_diff(a, b) <= 1


def test_bad_prompts_fail_with_a_sentence_and_the_next_prompt_runs(comfy):
    # an SDXL ControlNet on an SD1.5 checkpoint: refused at apply time, before sampling
    err = error(comfy.run(graph("CNCore_ApplyControlNet", cn_name=SDXL_CN)))
    assert err["node_type"] == "CNCore_ApplyControlNet"
    assert "SDXL" in err["exception_message"] and "SD1.x" in err["exception_message"]
    # ... and through ComfyUI's apply node, by our object before the first step
    err = error(comfy.run(graph("ControlNetApplyAdvanced", cn_name=SDXL_CN)))
    assert "SDXL" in err["exception_message"] and "SD1.x" in err["exception_message"]
    # a damaged file
    err = error(comfy.run(graph("CNCore_ApplyControlNet", cn_name=BROKEN)))
    assert err["node_type"] == "CNCore_LoadControlNet" and BROKEN in err["exception_message"]
    # a name outside the model folders never reaches the loader
    code, body = comfy.queue(graph("CNCore_ApplyControlNet", cn_name="../checkpoints/" + CKPT))
    assert code == 400
    # a mask of another shape than the image, found during sampling
    err = error(comfy.run(graph("CNCore_ApplyControlNet", mask_size=(64, 16))))
    assert "mask" in err["exception_message"] and "64x64" in err["exception_message"]
    # 3 hint images for 2 latents
    err = error(comfy.run(graph("CNCore_ApplyControlNet", hint_batch=3, latent_batch=2)))
    assert "3 hint images for 2 latents" in err["exception_message"]
    # the next valid prompt runs normally, twice (cached control objects are reset per run)
    for seed in (11, 12):  # the second re-samples with the cached conditioning and control objects
        ok(comfy.run(graph("CNCore_ApplyControlNet", prefix=f"after{seed}", seed=seed)))


def test_t2i_adapter_same_image_as_comfyui_builtin(comfy):
    """A full-size SD1.5 T2I-Adapter written by ComfyUI's own class: our loader + apply against
    ControlNetLoader + ControlNetApplyAdvanced at the defaults, at 64x64 and at an odd latent size
    (72x88 px = 9x11 latent: ComfyUI's padded pooling is our rule too), and each loader in the other's
    apply node."""
    runs = {}
    for size in ((64, 64), (72, 88)):
        tag = f"{size[0]}x{size[1]}"
        for key, loader, apply in PAIRINGS:
            runs[key, tag] = comfy.images(ok(comfy.run(graph(apply, loader=loader, cn_name=T2I, size=size,
                                                              prefix=f"t2i_{key}_{tag}"))), "9")
        runs["none", tag] = comfy.images(ok(comfy.run(graph(None, size=size, prefix=f"t2i_none_{tag}"))), "9")
        img = runs["builtin", tag][0]
        saturated = float(np.mean((img == 0) | (img == 255)))
        d = pixel_diff(runs["ours", tag], runs["builtin", tag])
        effect = pixel_diff(runs["none", tag], runs["builtin", tag])
        print(f"\n[t2i parity] {tag}: max pixel diff CNCore vs ComfyUI built-in: {d} (of 255); control effect: "
              f"{effect}; saturated pixels: {saturated:.1%}")
        assert effect > 20, "the adapter should visibly change the image"
        assert saturated < 0.5, "images mostly clipped: the comparison would prove little"
        assert d <= 1
        assert pixel_diff(runs["our_loader_builtin_apply", tag], runs["ours", tag]) == 0
        assert pixel_diff(runs["builtin_loader_our_apply", tag], runs["builtin", tag]) == 0
    assert f"CNCore: loaded {T2I}: T2I-Adapter for SD1.x (tencentarc layout, " in comfy.log.read_text()
    # ComfyUI's adapter with our options (a mask) is converted to ours: the same image as our loader's
    extra = {"control_mode": "prompt is more important"}
    a = comfy.images(ok(comfy.run(graph("CNCore_ApplyControlNet", loader="ControlNetLoader", cn_name=T2I,
                                         mask_size=(64, 64), extra=extra, prefix="t2i_m_b"))), "9")
    b = comfy.images(ok(comfy.run(graph("CNCore_ApplyControlNet", cn_name=T2I, mask_size=(64, 64), extra=extra,
                                         prefix="t2i_m_o"))), "9")
    assert pixel_diff(a, b) <= 1


def test_t2i_adapter_on_the_wrong_model_or_stacked_wrongly_gets_a_sentence(comfy):
    # an SDXL adapter on an SD1.5 checkpoint: refused by our apply node, and by our object before the
    # first step when it sits in ComfyUI's apply node
    for apply in ("CNCore_ApplyControlNet", "ControlNetApplyAdvanced"):
        err = error(comfy.run(graph(apply, cn_name=SDXL_T2I)))
        msg = err["exception_message"]
        assert f"T2I-Adapter '{SDXL_T2I}' is made for SDXL models" in msg and "SD1.x" in msg, msg
    # an SD1.5 adapter stacked with an SDXL ControlNet: refused at apply, naming both
    p = graph("CNCore_ApplyControlNet", cn_name=T2I)
    p["14"] = {"class_type": "CNCore_LoadControlNet", "inputs": {"control_net_name": SDXL_CN}}
    p["15"] = {"class_type": "CNCore_CombineControls", "inputs": {
        "control_net": ["14", 0], "image": ["4", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    p["11"]["inputs"]["control_stack"] = ["15", 0]
    err = error(comfy.run(p))
    assert "different architectures" in err["exception_message"] and "T2I-Adapter" in err["exception_message"]
    # the next prompt with the adapter runs
    ok(comfy.run(graph("CNCore_ApplyControlNet", cn_name=T2I, prefix="t2i_after")))


def test_control_lora_matches_comfyui_builtin(comfy):
    """An SD1.5 Control-LoRA: our loader + apply (merged once per run) against ComfyUI's
    ControlNetLoader + ControlNetApplyAdvanced (W + up @ down in every forward), same seed; then
    the mixed pairings. Our loader's two runs sample separately, so the second one rebuilds the
    merged copy the first one's cleanup freed."""
    runs = {}
    for key, loader, apply in PAIRINGS:
        runs[key] = comfy.images(ok(comfy.run(graph(apply, loader=loader, cn_name=CLORA, prefix=f"cl_{key}"))), "9")
    runs["none"] = comfy.images(ok(comfy.run(graph(None, prefix="cl_none"))), "9")
    d_ours = pixel_diff(runs["ours"], runs["builtin"])
    effect = pixel_diff(runs["none"], runs["builtin"])
    mixed = (pixel_diff(runs["our_loader_builtin_apply"], runs["ours"]),
             pixel_diff(runs["builtin_loader_our_apply"], runs["builtin"]))
    print(f"\n[parity] Control-LoRA: max pixel diff CNCore vs ComfyUI built-in: {d_ours} (of 255); control effect "
          f"(no control vs built-in): {effect}; mixed pairings: {mixed[0]}, {mixed[1]}")
    assert effect > 20, "the Control-LoRA should visibly change the image"
    assert d_ours <= 1
    assert mixed == (0, 0)


# ------------------------------------------------------------------------------------------
# overlap: where ComfyUI's own code reads the residual dict (no server needed)

OVERLAP_ORDER = r'''
import importlib.util, sys, torch
comfy_path, overlap_path = sys.argv[1:3]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ops, comfy.controlnet
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
spec = importlib.util.spec_from_file_location("overlap", overlap_path)
overlap = importlib.util.module_from_spec(spec); spec.loader.exec_module(overlap)

cfg = dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1],
           channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
           context_dim=16, num_head_channels=8, use_spatial_transformer=True, legacy=False,
           transformer_depth_middle=1, use_linear_in_transformer=True)
torch.manual_seed(0)
unet = UNetModel(dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init, **cfg)
for p in unet.parameters():
    torch.nn.init.normal_(p, std=0.05)
x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 3, 16)
events = []

class Slot(list):
    def __init__(self, name, items):
        super().__init__(items); self.name = name
    def pop(self, *a):
        events.append(("pop", self.name)); return super().pop(*a)

to = {}
with torch.no_grad():
    # the UNet's skips (h after each input block) and the middle output give the residual shapes
    shapes = []
    def record(h, transformer_options):
        shapes.append(h.shape)
        return h
    unet(x, t, context=ctx, transformer_options={"patches": {"input_block_patch": [record]}})
    shapes.append(shapes[-1])  # the middle block keeps the deepest input block's shape
    down = [torch.full(s, 0.1) for s in shapes[:-1]]
    mid = torch.full(shapes[-1], 0.1)
    want = unet(x, t, context=ctx, control={"input": [], "middle": [mid.clone()], "output": [d.clone() for d in down]},
                transformer_options={})
    d = overlap.SyncOnRead({"input": Slot("input", []), "middle": Slot("middle", [mid.clone()]),
                            "output": Slot("output", [r.clone() for r in down])},
                           lambda: events.append(("sync", to.get("block"))))
    got = unet(x, t, context=ctx, control=d, transformer_options=to)
assert events[0] == ("sync", ("middle", 0)), events[:3]
assert events[1] == ("pop", "middle") and all(e == ("pop", "output") for e in events[2:]), events
assert len(events) == 2 + len(down) and torch.equal(got, want)
# a built-in control chained on top: its control_merge reads ours (control_prev) -> waits first
events.clear()
d2 = overlap.SyncOnRead({"input": [], "middle": [mid.clone()], "output": [r.clone() for r in down]},
                        lambda: events.append(("sync", "merge")))
merged = comfy.controlnet.ControlBase().control_merge({"middle": [mid.clone()], "output": [r.clone() for r in down]}, d2, None)
assert events == [("sync", "merge")] and torch.allclose(merged["middle"][0], 2 * mid)
print("overlap order ok:", len(down), "skips; sync at", ("middle", 0))
'''


def test_overlapped_residuals_are_waited_for_at_comfyuis_first_read(tmp_path):
    """ComfyUI never calls our "sync"; `fast.on_read` makes the first read wait instead. In
    ComfyUI's real UNetModel (a tiny config, CPU) the wait happens when the UNet reads "middle"
    after its middle block (block ("middle", 0)), before any residual is popped, and the result
    equals the plain dict's; a built-in control chained on top waits inside its control_merge."""
    script = tmp_path / "overlap_order.py"
    script.write_text(OVERLAP_ORDER)
    done = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_PATH, str(ROOT / "controlnet_core/fast/overlap.py")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sync at ('middle', 0)" in done.stdout


DETACH_RELEASES = r'''
import asyncio, dataclasses, sys, torch
comfy_path, pack = sys.argv[1:3]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
assert asyncio.run(nodes.load_custom_node(pack))
name = pack.replace(".", "_x_")
m = lambda sub: sys.modules[f"{name}.{sub}"]
fast, adapter = m("controlnet_core.fast"), m("nodes.adapter")
from importlib import import_module
cfg_mod, model_mod, control_mod, host_mod = (import_module(f"{name}.controlnet_core.{x}") for x in ("config", "model", "control", "host"))
cfg = dataclasses.replace(cfg_mod.SD15, model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=64,
                          hint_block_channels=(16, 16, 32, 32))
net = model_mod.ControlNet(cfg).eval()
stack = control_mod.ControlStack([control_mod.Control(net, torch.rand(1, 3, 32, 32))])
stack.pre_run(lambda p: 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1 - p)))
req = host_mod.StepRequest(torch.randn(2, 4, 4, 4), torch.full((2,), 5.0), torch.full((2,), 500.0),
                           torch.randn(2, 5, 64), None, (0, 1))
handle = adapter._make_handle(net, "tiny", torch.device("cpu"), torch.device("cpu"))
with torch.no_grad(), fast.override(allow_cpu=True):
    stack.residuals(req)
assert len(fast.runner._RUNNERS) == 1
handle.patcher.detach()  # what ComfyUI's model_unload (memory pressure, /free) calls
assert fast.runner._RUNNERS == {}, fast.runner._RUNNERS
print("ON_DETACH released the runner")
'''


def test_comfyui_unloading_our_controlnet_drops_its_fast_path_state(tmp_path):
    """ComfyUI unloads a model (memory pressure, /free) through ModelPatcher.detach: our patcher's
    ON_DETACH callback then drops the fast path's runners (graphs, buffers) that use that net,
    even when the run that made them failed before its cleanup. Real ComfyUI, our pack loaded by
    its own load_custom_node; the runner is made on the CPU (allow_cpu)."""
    script = tmp_path / "detach.py"
    script.write_text(DETACH_RELEASES)
    done = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_PATH, str(ROOT)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ON_DETACH released the runner" in done.stdout


def _memory(pid: int) -> tuple[int, int]:
    """(resident now, resident peak since the last `_reset_peak`) of a process, in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmRSS", "VmHWM"))}
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:  # "5": reset the peak resident size to the current one
        f.write("5")


def test_checkpoint_in_the_controlnet_folder_is_refused_without_reading_it(comfy):
    """The 2.1 GB SD1.5 checkpoint under models/controlnet: refused from its header. Before the
    header-first loader, ComfyUI's memory grew by 1.3-1.8 GB here (the file read and upcast)."""
    ok(comfy.run(graph("CNCore_ApplyControlNet", prefix="warm")))  # everything else loaded and cached
    pid = comfy.proc.pid
    _reset_peak(pid)
    before, _ = _memory(pid)
    err = error(comfy.run(graph("CNCore_ApplyControlNet", cn_name=CKPT_AS_CN)))
    after, peak = _memory(pid)
    size = (comfy.base / "models" / "controlnet" / CKPT_AS_CN).stat().st_size
    print(f"\n[memory] {size / 2**30:.2f} GiB checkpoint refused: ComfyUI resident {before / 2**20:.0f} MiB before, "
          f"peak {peak / 2**20:.0f} MiB ({(peak - before) / 2**20:+.0f}), {after / 2**20:.0f} MiB after")
    assert err["node_type"] == "CNCore_LoadControlNet"
    assert f"{CKPT_AS_CN}: this is a full Stable Diffusion checkpoint" in err["exception_message"]
    assert peak - before < 100 * 2**20
    ok(comfy.run(graph("CNCore_ApplyControlNet", prefix="after_ckpt", seed=13)))


def test_int8_weights_are_named_with_key_and_dtype(comfy):
    err = error(comfy.run(graph("CNCore_ApplyControlNet", cn_name=QUANTISED)))
    assert err["node_type"] == "CNCore_LoadControlNet"
    assert (f"{QUANTISED}: the weight input_blocks.1.0.in_layers.2.weight is stored as I8, but the weights of "
            "a ControlNet") in err["exception_message"]


def test_a_file_replaced_under_the_same_name_is_loaded_anew(comfy):
    cn_dir = comfy.base / "models" / "controlnet"
    ok(comfy.run(graph("CNCore_ApplyControlNet", cn_name=SWAP, prefix="swap_sd15")))
    new = cn_dir / "incoming.part"  # not a model extension: never listed
    shutil.copyfile(cn_dir / SDXL_CN, new)
    os.replace(new, cn_dir / SWAP)  # an SDXL ControlNet now has the name the SD1.5 one had
    err = error(comfy.run(graph("CNCore_ApplyControlNet", cn_name=SWAP, prefix="swap_sdxl")))
    assert "SDXL" in err["exception_message"] and "SD1.x" in err["exception_message"]
    (cn_dir / SWAP).unlink()
    os.link(cn_dir / CANNY, cn_dir / SWAP)
    ok(comfy.run(graph("CNCore_ApplyControlNet", cn_name=SWAP, prefix="swap_back")))


def test_rgba_hint_in_apply_and_combine_drops_its_alpha(comfy):
    """Join Image with Alpha makes a 4-channel IMAGE; Apply and Combine take its colour as stored, so
    the image equals the one from the plain RGB picture, bit for bit."""
    runs = {}
    for key in ("rgb", "rgba"):
        p = graph("CNCore_ApplyControlNet", prefix=f"alpha_{key}", seed=21, strength=0.8)
        image = ["4", 0]
        if key == "rgba":
            p["14"] = {"class_type": "SolidMask", "inputs": {"value": 0.3, "width": 64, "height": 64}}
            p["15"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["4", 0], "alpha": ["14", 0]}}
            image = ["15", 0]
        p["16"] = {"class_type": "CNCore_CombineControls", "inputs": {
            "control_net": ["10", 0], "image": image, "strength": 0.5, "start_percent": 0.0, "end_percent": 1.0}}
        p["11"]["inputs"].update(image=image, control_stack=["16", 0])
        runs[key] = comfy.images(ok(comfy.run(p)), "9")
    assert pixel_diff(runs["rgba"], runs["rgb"]) == 0


def _preprocessed(**params) -> dict:
    p = graph("CNCore_ApplyControlNet", prefix="pre")
    widgets = {"low_threshold": 100, "high_threshold": 200, "auto_threshold": False, "blur": 0.0, "threshold": 0.5,
               "sigma": 1.0, "contrast": 0.05, "thickness": 3, "drawn": False, "min_length": 0.03,
               "detector": "auto", "downsample": 2.0, "grid": 8, "seed": 0}
    p["5"] = {"class_type": "CNCore_Preprocessor", "inputs": {
        "image": ["4", 0], "method": "canny", "resolution": 64, "pixel_perfect": False, **widgets, **params}}
    p["11"]["inputs"]["image"] = ["5", 0]
    return p


@pytest.mark.parametrize("params", [{"resolution": 0}, {"resolution": 100000}, {"low_threshold": 300},
                                    {"high_threshold": -1}, {"blur": 1000.0}])
def test_preprocessor_values_out_of_range_are_refused_through_the_api(comfy, params):
    code, body = comfy.queue(_preprocessed(**params))
    assert code == 400, body  # ComfyUI checks the widget ranges before anything runs
    (name,) = params
    assert name in json.dumps(body.get("node_errors", {}))


def test_preprocessor_nan_through_the_api_gets_our_sentence(comfy):
    # NaN passes ComfyUI's range check (every comparison with NaN is false): the node answers
    err = error(comfy.run(_preprocessed(blur=float("nan"))))
    assert err["node_type"] == "CNCore_Preprocessor"
    assert "canny: parameter 'blur' must be a number; got nan" in err["exception_message"]


def test_front_end_routes_and_files_in_real_comfyui(comfy):
    """The web extension's files are served, and its routes answer at /cncore/ and /api/cncore/."""
    import io

    from PIL import Image

    scripts = comfy.get("/extensions")
    assert {s.rsplit("/", 1)[-1] for s in scripts if "/comfyui-controlnet-core/" in s} == {"loader.js",
                                                                                           "preprocessor.js"}
    info = comfy.get("/api/cncore/model_info?name=" + CANNY)
    assert info["label"] == "ControlNet · SD1.x · original" and info["supported"] is True
    try:
        comfy.get("/cncore/model_info?name=" + BROKEN)
        raise AssertionError("a damaged file must be refused")
    except urllib.error.HTTPError as e:
        assert e.code == 422 and BROKEN in json.loads(e.read())["error"]

    def preview(body: dict) -> np.ndarray:
        req = urllib.request.Request(comfy.url + "/api/cncore/preview", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.headers["Content-Type"] == "image/png"
            return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))

    params = {"low_threshold": 100, "high_threshold": 200, "blur": 0.0, "auto_threshold": False}
    from_file = preview({"method": "canny", "params": params, "resolution": 64,
                         "image": {"filename": "example.png", "subfolder": "", "type": "input"}})
    # the image the Preprocessor (node "5" of the canny workflow) got on its last run
    prompt = json.loads((tw.WORKFLOWS / "api" / "ControlNet - Canny (SD1.5).json").read_text())
    prompt["5"]["inputs"]["resolution"] = 96  # not cached: it runs again
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 1
    ok(comfy.run(prompt))
    last = preview({"method": "canny", "params": params, "resolution": 64, "last_run": "5"})
    assert from_file.shape == (64, 64, 3) and 0 < (from_file > 0).mean() < 0.5
    np.testing.assert_array_equal(last, from_file)
