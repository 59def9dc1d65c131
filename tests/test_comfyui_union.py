"""ControlNet Union / ProMax inside a real ComfyUI, over HTTP, on the CPU, at the full SDXL size.

Runs only when COMFYUI_PATH points to a ComfyUI checkout (skipped otherwise), like
tests/test_comfyui_integration.py, whose client and server helpers it uses. ComfyUI's own Union
loader only accepts the real SDXL shapes (it matches diffusers configs by shape), so this writes
full-size random-weight models with ComfyUI's and diffusers' own classes:

* an SDXL checkpoint in the single-file layout (`model.diffusion_model.*` UNet, 2.6 B parameters,
  bf16; `conditioner.embedders.*` CLIP-L + CLIP-G through ComfyUI's own
  `SDXL.process_clip_state_dict_for_saving`, fp16; `first_stage_model.*` VAE, fp16), ~6.9 GB;
* a ControlNet Union ProMax in xinsir's diffusers layout (`diffusers.ControlNetUnionModel`, 8 types,
  1.26 B parameters, bf16), ~2.5 GB.

The server runs with `--cpu --bf16-unet`: ComfyUI keeps the UNet and its own Union net in bf16 and
computes in fp32 (`unet_manual_cast`); our loader keeps fp32 copies of the same bf16 values, so both
compute in fp32 from identical weights. About 12 GB of RAM while a prompt runs (the checkpoint,
plus one Union net at a time: the cache is freed between the built-in and our run) and ~10 GB of
disk in a temporary directory that is deleted afterwards. Wrap the run in
`flock /tmp/comfyui.lock` on shared machines.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

import test_comfyui_integration as ci
import test_workflows as tw

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not ci.COMFYUI_PATH, reason="COMFYUI_PATH is not set (a ComfyUI checkout to test in)"),
]

XL_CKPT = "sd_xl_base_1.0.safetensors"                      # the names the Union workflow uses
PROMAX = "controlnet-union-sdxl-1.0-promax.safetensors"
CANNY_TYPE = "canny/lineart/anime_lineart/mlsd"

# Runs in ComfyUI's interpreter. Random weights of the real shapes; each model in its own process
# so that only one is in memory at a time.
MAKE_CHECKPOINT = r'''
import math, sys, torch
from safetensors.torch import save_file
comfy_path, path = sys.argv[1:3]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ops, comfy.sdxl_clip, comfy.supported_models
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.models.autoencoder import AutoencoderKL

def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
            elif name.endswith("weight"):  # 1-D weights are norm scales
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                v = 0.02 * torch.randn(p.shape, generator=g)
            p.copy_(v)
    return module

UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
            channel_mult=[1, 2, 4], transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
            num_head_channels=64, use_spatial_transformer=True, legacy=False, adm_in_channels=2816,
            num_classes="sequential", use_checkpoint=False)
unet = randomize(UNetModel(dtype=torch.bfloat16, device="cpu", operations=comfy.ops.manual_cast, **UNET), 1)
sd = {"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()}
del unet
vae = randomize(AutoencoderKL(ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                                            ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                                            dropout=0.0), embed_dim=4), 2)
with torch.no_grad():
    vae.decoder.conv_out.weight.mul_(0.2)  # keep decoded pixels mostly inside [0, 1]
sd.update({"first_stage_model." + k: v.half().contiguous() for k, v in vae.state_dict().items()})
del vae
clip = randomize(comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16), 3)
clip_sd = comfy.supported_models.SDXL(UNET).process_clip_state_dict_for_saving(clip.state_dict())
sd.update({k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in clip_sd.items()})
del clip, clip_sd
save_file(sd, path)
'''

MAKE_PROMAX = r'''
import math, sys, torch
from safetensors.torch import save_file
import diffusers
path = sys.argv[1]
with torch.device("meta"):  # no time spent on an initialisation that is overwritten
    dm = diffusers.ControlNetUnionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        conditioning_embedding_out_channels=(16, 32, 96, 256), num_control_type=8)
dm = dm.to_empty(device="cpu")
g = torch.Generator().manual_seed(6)
sd = {}
with torch.no_grad():
    for name, p in sorted(dm.state_dict().items()):
        if p.ndim >= 2:
            v = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
        elif name.endswith("weight"):
            v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            v = 0.02 * torch.randn(p.shape, generator=g)
        sd[name] = v.to(torch.bfloat16).contiguous()
save_file(sd, path, metadata={"format": "pt"})
'''


@pytest.fixture(scope="module")
def comfy_xl(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_xl")
    for d in ("models/checkpoints", "models/controlnet", "input", "output", "user", "temp", "custom_nodes"):
        (base / d).mkdir(parents=True, exist_ok=True)
    os.symlink(ci.ROOT, base / "custom_nodes" / "comfyui-controlnet-core", target_is_directory=True)
    ci._write_input_image(base / "input" / "example.png")
    t0 = time.time()
    for script, args in ((MAKE_CHECKPOINT, [ci.COMFYUI_PATH, str(base / "models/checkpoints" / XL_CKPT)]),
                         (MAKE_PROMAX, [str(base / "models/controlnet" / PROMAX)])):
        (base / "make.py").write_text(script)
        subprocess.run([ci.COMFYUI_PYTHON, str(base / "make.py"), *args], check=True, cwd=base, timeout=1800)
    print(f"\n[union] full-size SDXL checkpoint + ProMax written in {time.time() - t0:.0f} s")
    yield from ci.serve(base, "--bf16-unet")


def union_graph(apply: str, loader: str = "CNCore_LoadControlNet", control_type: str | None = CANNY_TYPE,
                set_type: str | None = None, prefix: str = "u", steps: int = 2) -> dict:
    """ci.graph on the SDXL checkpoint with the Union file; `control_type` for our apply node,
    `set_type` inserts ComfyUI's SetUnionControlNetType between loader and apply."""
    extra = {"control_type": control_type} if apply == "CNCore_ApplyControlNet" and control_type else None
    p = ci.graph(apply, loader=loader, cn_name=PROMAX, prefix=prefix, steps=steps, extra=extra)
    p["1"]["inputs"]["ckpt_name"] = XL_CKPT
    if set_type is not None:
        p["14"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["10", 0], "type": set_type}}
        p["11"]["inputs"]["control_net"] = ["14", 0]
    return p


def free(comfy: ci.Comfy) -> None:
    """Drop ComfyUI's cached outputs and models (one Union net in memory at a time). The free request
    is picked up with the next prompt, so a tiny prompt follows it."""
    code, _ = comfy.post("/free", {"unload_models": True, "free_memory": True})
    assert code == 200
    ci._ok(comfy.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                      "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}))


def timed_run(comfy: ci.Comfy, prompt: dict, what: str) -> list:
    t0 = time.time()
    images = comfy.images(ci._ok(comfy.run(prompt, timeout=3600)), "9")
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
    d, effect = ci._diff(ours, builtin), ci._diff(none, builtin)
    print(f"\n[union parity] max pixel diff CNCore vs ComfyUI built-in Union: {d} (of 255); control effect: "
          f"{effect}; saturated pixels: {saturated:.1%}")
    assert effect > 20, "the Union ControlNet should visibly change the image"
    assert saturated < 0.5, "images mostly clipped: the comparison would prove little"
    assert d <= 1
    assert ci._diff(mixed, ours) == 0


def test_union_workflows_validate_and_run(comfy_xl):
    specs = comfy_xl.get("/object_info")
    # our control types are ComfyUI's, in its order ("auto" first)
    assert (specs["CNCore_ApplyControlNet"]["input"]["optional"]["control_type"][0]
            == specs["SetUnionControlNetType"]["input"]["required"]["type"][0])
    # the SDXL workflows that load the ProMax file (the LLLite one runs in tests/test_comfyui_lllite.py)
    union_workflows = [p for p in ci.workflows_for(XL_CKPT) if any(
        n["inputs"].get("control_net_name") == PROMAX for n in tw.load_pair(p)[1].values())]
    assert union_workflows
    for ui_path in union_workflows:
        ui, api = tw.load_pair(ui_path)
        assert tw.validate_api(api, specs) == [] and tw.validate_ui(ui, specs) == [], ui_path.name
        for node in api.values():  # tiny and quick; everything else as shipped
            if node["class_type"] == "EmptyLatentImage":
                node["inputs"].update(width=64, height=64)
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = 2
            if node["class_type"] == "CNCore_Preprocessor":
                node["inputs"]["resolution"] = 64
        t0 = time.time()
        entry = ci._ok(comfy_xl.run(api, timeout=3600))
        print(f"\n[union] workflow {ui_path.name}: {time.time() - t0:.0f} s")
        saved = [n for n, node in api.items() if node["class_type"] == "SaveImage"]
        assert saved and all(comfy_xl.images(entry, n) for n in saved)
