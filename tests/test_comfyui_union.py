"""The SDXL families at the full SDXL size inside a real ComfyUI, over HTTP, on the CPU: ControlNet
Union / ProMax and ControlNet-LLLite, on one server.

Runs only when COMFYUI_PATH points to a ComfyUI checkout (skipped otherwise), like the other
real-ComfyUI tests (tests/helpers_comfyui.py). ComfyUI's own Union loader only accepts the real SDXL
shapes (it matches diffusers configs by shape), and ComfyUI recognises an SDXL checkpoint only by
its full shapes, so this writes full-size random-weight models with ComfyUI's and diffusers' own
classes:

* an SDXL checkpoint in the single-file layout (`model.diffusion_model.*` UNet, 2.6 B parameters,
  bf16; `conditioner.embedders.*` CLIP-L + CLIP-G through ComfyUI's own
  `SDXL.process_clip_state_dict_for_saving`, fp16; `first_stage_model.*` VAE, fp16), ~6.9 GB;
* a ControlNet Union ProMax in xinsir's diffusers layout (`diffusers.ControlNetUnionModel`, 8 types,
  1.26 B parameters, bf16), ~2.5 GB;
* a ControlNet-LLLite in kohya's layout for that UNet (all 136 modules, cond_emb_dim 32, mlp_dim 64
  as kohya's "032064" files, stored as bf16 here, 44 MB) under the name the shipped LLLite workflow
  uses.

The server runs with `--cpu --bf16-unet`: ComfyUI keeps the UNet and its own Union net in bf16 and
computes in fp32 (`unet_manual_cast`); our loader keeps the same bf16 weights and computes in fp32
through the same `comfy.ops.manual_cast` layers, so both compute in fp32 from identical weights.
The LLLite file is bf16 for the same reason: under `--bf16-unet` our loader stores it in bf16, as
ComfyUI's loader stores every control model, so an fp16 file would be rounded to bf16 and differ
from the reference's fp16 values (8.7e-4 relative, measured); this suite checks the full-size
math, the storage rule is checked in tests/test_compute_dtype.py. The LLLite reference is the kohya-style MODEL patch of
tests/test_comfyui_lllite.py (its test pack is added to this base). About 12-15 GB of RAM while a
prompt runs (the checkpoint, plus one Union net at a time: the cache is freed between the built-in
and our run, and before the LLLite prompts) and ~10 GB of disk in a temporary directory that is
deleted afterwards. Wrap the run in `flock /tmp/comfyui.lock` on shared machines.
"""

from __future__ import annotations

import sys
import time

import pytest
import safetensors.torch
import torch

import test_comfyui_integration as ci
import test_workflows as tw
from helpers_comfyui import NEEDS_COMFYUI, Comfy, make_base, ok, pixel_diff, run_in_comfyui, run_small, serve
from test_comfyui_lllite import add_test_pack, check_lllite_parity
from test_lllite import SDXL_BLOCKS, lllite_state_dict

pytestmark = NEEDS_COMFYUI

XL_CKPT = "sd_xl_base_1.0.safetensors"                      # the names the SDXL workflows use
PROMAX = "controlnet-union-sdxl-1.0-promax.safetensors"
LLLITE = "controllllite_v01032064e_sdxl_canny.safetensors"
CANNY_TYPE = "canny/lineart/anime_lineart/mlsd"

# Run in ComfyUI's interpreter (helpers_comfyui.run_in_comfyui). Random weights of the real shapes;
# each model in its own process so that only one is in memory at a time.
MAKE_CHECKPOINT = r'''
import comfy.ops, comfy.sdxl_clip, comfy.supported_models
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
path = sys.argv[1]

UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
            channel_mult=[1, 2, 4], transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
            num_head_channels=64, use_spatial_transformer=True, legacy=False, adm_in_channels=2816,
            num_classes="sequential", use_checkpoint=False)
unet = randomize(UNetModel(dtype=torch.bfloat16, device="cpu", operations=comfy.ops.manual_cast, **UNET), 1)
sd = {"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()}
del unet
vae = random_vae(2)
sd.update({"first_stage_model." + k: v.half().contiguous() for k, v in vae.state_dict().items()})
del vae
clip = randomize(comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16), 3)
clip_sd = comfy.supported_models.SDXL(UNET).process_clip_state_dict_for_saving(clip.state_dict())
sd.update({k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in clip_sd.items()})
del clip, clip_sd
save_file(sd, path)
'''

MAKE_PROMAX = r'''
import diffusers
path = sys.argv[1]
with torch.device("meta"):  # no time spent on an initialisation that is overwritten
    dm = diffusers.ControlNetUnionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        conditioning_embedding_out_channels=(16, 32, 96, 256), num_control_type=8)
dm = randomize(dm.to_empty(device="cpu"), 6)  # fp32: the random values, then stored as bf16
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in dm.state_dict().items()}, path, metadata={"format": "pt"})
'''


@pytest.fixture(scope="module")
def comfy_xl(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("comfyui_xl"))
    add_test_pack(base)  # the kohya-style LLLite reference node
    t0 = time.time()
    run_in_comfyui(base / "make_checkpoint.py", MAKE_CHECKPOINT, base / "models/checkpoints" / XL_CKPT, timeout=1800)
    # diffusers is our test extra, not a ComfyUI requirement: this one runs in the test's interpreter
    run_in_comfyui(base / "make_promax.py", MAKE_PROMAX, base / "models/controlnet" / PROMAX, timeout=1800,
                   python=sys.executable)
    safetensors.torch.save_file(lllite_state_dict(SDXL_BLOCKS, e=32, m=64, seed=5, dtype=torch.bfloat16),
                                base / "models/controlnet" / LLLITE)
    print(f"\n[sdxl] full-size SDXL checkpoint + ProMax + LLLite written in {time.time() - t0:.0f} s")
    with serve(base, "--bf16-unet") as server:
        yield server


def xl_graph(*args, **kw) -> dict:
    """ci.graph on the SDXL checkpoint."""
    p = ci.graph(*args, **kw)
    p["1"]["inputs"]["ckpt_name"] = XL_CKPT
    return p


def union_graph(apply: str, loader: str = "CNCore_LoadControlNet", control_type: str | None = CANNY_TYPE,
                set_type: str | None = None, prefix: str = "u", steps: int = 2) -> dict:
    """xl_graph with the Union file; `control_type` for our apply node,
    `set_type` inserts ComfyUI's SetUnionControlNetType between loader and apply."""
    extra = {"control_type": control_type} if apply == "CNCore_ApplyControlNet" and control_type else None
    p = xl_graph(apply, loader=loader, cn_name=PROMAX, prefix=prefix, steps=steps, extra=extra)
    if set_type is not None:
        p["14"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["10", 0], "type": set_type}}
        p["11"]["inputs"]["control_net"] = ["14", 0]
    return p


def free(comfy: Comfy) -> None:
    """Drop ComfyUI's cached outputs and models (one Union net in memory at a time). The free request
    is picked up with the next prompt, so a tiny prompt follows it."""
    code, _ = comfy.post("/free", {"unload_models": True, "free_memory": True})
    assert code == 200
    ok(comfy.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                      "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}))


def timed_run(comfy: Comfy, prompt: dict, what: str) -> list:
    t0 = time.time()
    images = comfy.images(ok(comfy.run(prompt, timeout=3600)), "9")
    print(f"\n[union] {what}: {time.time() - t0:.0f} s")
    return images


def test_union_prompt_matches_comfyui_builtin_union(comfy_xl):
    none = timed_run(comfy_xl, union_graph(None, prefix="none"), "no control")
    builtin = timed_run(comfy_xl, union_graph("ControlNetApplyAdvanced", loader="ControlNetLoader", set_type=CANNY_TYPE,
                                              prefix="builtin"), "ControlNetLoader + SetUnionControlNetType + apply")
    free(comfy_xl)
    ours = timed_run(comfy_xl, union_graph("CNCore_ApplyControlNet", prefix="ours"),
                     "CNCore loader + apply (control_type set)")
    # ComfyUI's SetUnionControlNetType on our loader's object, in ComfyUI's apply node
    mixed = timed_run(comfy_xl, union_graph("ControlNetApplyAdvanced", set_type=CANNY_TYPE, prefix="mixed"),
                      "CNCore loader + SetUnionControlNetType + ComfyUI apply")
    img = builtin[0]
    saturated = float(((img == 0) | (img == 255)).mean())
    d, effect = pixel_diff(ours, builtin), pixel_diff(none, builtin)
    print(f"\n[union parity] max pixel diff CNCore vs ComfyUI built-in Union: {d} (of 255); control effect: "
          f"{effect}; saturated pixels: {saturated:.1%}")
    assert effect > 20, "the Union ControlNet should visibly change the image"
    assert saturated < 0.5, "images mostly clipped: the comparison would prove little"
    assert d <= 1
    assert pixel_diff(mixed, ours) == 0


def two_type_graph(ours: bool, multi: bool = False, prefix: str = "two") -> dict:
    """Canny (strength 0.6, on the image) and depth (0.9, on the inverted image) of the one Union file:
    ComfyUI's chain (ControlNetLoader -> SetUnionControlNetType -> ControlNetApplyAdvanced, twice), or
    ours (Combine canny -> Apply depth's control_stack, `union_multi_condition` = `multi`)."""
    p = union_graph(None, prefix=prefix)
    p["15"] = {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}}
    canny = {"image": ["4", 0], "strength": 0.6, "start_percent": 0.0, "end_percent": 1.0}
    depth = {"image": ["15", 0], "strength": 0.9, "start_percent": 0.0, "end_percent": 1.0}
    if ours:
        p["10"] = {"class_type": "CNCore_LoadControlNet", "inputs": {"control_net_name": PROMAX}}
        p["16"] = {"class_type": "CNCore_CombineControls", "inputs": {
            "control_net": ["10", 0], **canny, "control_type": CANNY_TYPE}}
        p["11"] = {"class_type": "CNCore_ApplyControlNet", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["10", 0], **depth, "control_mode": "balanced",
            "resize_mode": "crop", "interpolation": "nearest-exact", "control_stack": ["16", 0], "control_type": "depth",
            "union_multi_condition": multi}}
        last = "11"
    else:
        p["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": PROMAX}}
        p["14"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["10", 0], "type": CANNY_TYPE}}
        p["17"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["10", 0], "type": "depth"}}
        p["11"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["14", 0], **canny}}
        p["18"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["11", 0], "negative": ["11", 1], "control_net": ["17", 0], **depth}}
        last = "18"
    p["7"]["inputs"]["positive"], p["7"]["inputs"]["negative"] = [last, 0], [last, 1]
    return p


def test_two_types_of_one_union_file_in_a_stack_equal_comfyuis_chain(comfy_xl):
    """Combine canny + Apply depth on one Union file = ComfyUI's SetUnionControlNetType -> Apply chain
    (one pass per type, outputs summed) by default; `union_multi_condition` is another image."""
    free(comfy_xl)
    builtin = timed_run(comfy_xl, two_type_graph(False, prefix="chain_builtin"), "built-in chain canny -> depth")
    free(comfy_xl)
    ours = timed_run(comfy_xl, two_type_graph(True, prefix="chain_ours"), "CNCore Combine canny + Apply depth")
    multi = timed_run(comfy_xl, two_type_graph(True, multi=True, prefix="chain_multi"),
                      "CNCore Combine canny + Apply depth, union_multi_condition")
    one = timed_run(comfy_xl, union_graph("CNCore_ApplyControlNet", prefix="chain_one"), "CNCore canny alone")
    d, d_multi, d_one = pixel_diff(ours, builtin), pixel_diff(multi, builtin), pixel_diff(one, builtin)
    print(f"\n[union chain] max pixel diff, two types: CNCore default vs built-in chain {d}/255; "
          f"multi-condition vs chain {d_multi}/255; one type vs the two-type chain {d_one}/255")
    # 64 px, 2 steps: the second type moved pixels by 13/255, the multi-condition pass by 12/255 when measured
    assert d_one > 5, "the second type should visibly change the image"
    assert d <= 1
    assert d_multi > 5, "the multi-condition pass is another computation: it should give another image"


def test_sdxl_workflows_validate_and_run(comfy_xl):
    """The shipped SDXL workflows (Union multi-type, LLLite) against the real /object_info, then
    queued as shipped but at 64x64 and 2 steps, on the files the fixture wrote under their names."""
    specs = comfy_xl.get("/object_info")
    # our control types are ComfyUI's, in its order ("auto" first), then the Flux Union modes it lacks
    theirs = specs["SetUnionControlNetType"]["input"]["required"]["type"][0]
    assert specs["CNCore_ApplyControlNet"]["input"]["optional"]["control_type"][0][: len(theirs)] == theirs
    workflows = ci.workflows_for(XL_CKPT)
    assert {"ControlNet-LLLite - Canny (SDXL).json", "ControlNet Union - Canny and Tile (SDXL).json"} <= {p.name for p in workflows}
    for ui_path in workflows:
        ui, api = tw.load_pair(ui_path)
        assert tw.validate_api(api, specs) == [] and tw.validate_ui(ui, specs) == [], ui_path.name
        assert tw.same_graph(ui, api, specs) == [], ui_path.name
        t0 = time.time()
        run_small(comfy_xl, api, steps=2, timeout=3600)
        print(f"\n[sdxl] workflow {ui_path.name}: {time.time() - t0:.0f} s")


def lllite_graph(ours: str | None = None, ref: str | None = None, *, strength: float = 1.0, start: float = 0.0,
                 end: float = 1.0, prefix: str = "l") -> dict:
    """The SDXL checkpoint at 64x64, 3 steps, its latent saved by node "9": with our loader + Apply
    for the LLLite file `ours`, or the kohya-style reference patch on the MODEL for the file `ref`."""
    p = xl_graph("CNCore_ApplyControlNet" if ours else None, cn_name=ours or LLLITE, prefix=prefix, steps=3,
                 strength=strength, start=start, end=end)
    del p["8"]
    p["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"lllite/{prefix}"}}
    if ref is not None:
        p["20"] = {"class_type": "CNCoreTest_KohyaLLLite", "inputs": {
            "model": ["1", 0], "lllite_name": ref, "image": ["4", 0], "strength": strength, "start_percent": start,
            "end_percent": end}}
        p["7"]["inputs"]["model"] = ["20", 0]
    return p


def test_lllite_at_full_size_equals_kohyas_patch_and_leaves_no_trace(comfy_xl):
    """All 136 modules of a kohya-layout LLLite on the full SDXL UNet (input blocks 4, 5: 2
    transformer blocks each; 7, 8 and the middle: 10 each), in ComfyUI's real attention."""
    free(comfy_xl)  # no Union net from the tests above stays in memory
    check_lllite_parity(comfy_xl, lllite_graph, LLLITE, "full-size SDXL")
