"""The pack inside a real ComfyUI, over HTTP, on the CPU.

Runs only when COMFYUI_PATH points to a ComfyUI checkout (skipped otherwise). COMFYUI_PYTHON is
the interpreter of that ComfyUI's venv (default: this interpreter). See nodes/README_SECTION.md.

What happens: a temporary base directory gets models/, input/, output/, user/ and custom_nodes/
(the pack linked in), so nothing is written into the checkout. A random-weight SD1.5 checkpoint
(full size, real single-file layout, fp16) and ControlNets (SD1.5 full size, a tiny SDXL one, a
damaged file) are written with ComfyUI's own model classes, in its interpreter. ComfyUI starts
headless (`--cpu --listen 127.0.0.1`), and the tests talk to it like a client: /object_info,
POST /prompt, /history. Images are 64x64 with 3 steps, so a prompt takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import test_workflows as tw

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set (a ComfyUI checkout to test in)"),
]

CKPT = "v1-5-pruned-emaonly-fp16.safetensors"      # the name the shipped workflows use
CANNY = "control_v11p_sd15_canny_fp16.safetensors"
TILE = "control_v11f1e_sd15_tile_fp16.safetensors"
SDXL_CN = "cncore_tiny_sdxl_controlnet.safetensors"
BROKEN = "broken_controlnet.safetensors"
OUR_NODES = ("CNCore_LoadControlNet", "CNCore_Preprocessor", "CNCore_ApplyControlNet", "CNCore_CombineControls")

# Runs in ComfyUI's interpreter: random weights into ComfyUI's own classes, saved in the layouts
# real files use (checkpoint: model.diffusion_model. / first_stage_model. / cond_stage_model.;
# ControlNet: the unprefixed LDM layout of the v1.1 fp16 safetensors files).
MAKE_MODELS = r'''
import math, sys, torch
from safetensors.torch import save_file
comfy_path, ckpt_path, cn_path, xl_path = sys.argv[1:5]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ops, comfy.sd1_clip
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy.cldm.cldm import ControlNet

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
vae = randomize(AutoencoderKL(ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                                            ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                                            dropout=0.0), embed_dim=4), 2)
with torch.no_grad():
    vae.decoder.conv_out.weight.mul_(0.2)  # keep decoded pixels mostly inside [0, 1]
sd.update(half("first_stage_model.", vae))
sd.update(half("cond_stage_model.", randomize(comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32), 3)))
save_file(sd, ckpt_path)
del sd
cn = randomize(ControlNet(hint_channels=3, dtype=torch.float32, device="cpu", operations=ops, **SD15), 4)
save_file(half("", cn), cn_path)
del cn
XL = dict(image_size=32, in_channels=4, model_channels=64, num_res_blocks=[1, 1], transformer_depth=[0, 1],
          channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=2048,
          num_head_channels=64, use_spatial_transformer=True, legacy=False, adm_in_channels=2816,
          num_classes="sequential")
save_file(half("", randomize(ControlNet(hint_channels=3, dtype=torch.float32, device="cpu", operations=ops, **XL), 5)),
          xl_path)
'''


# ------------------------------------------------------------------------------------------
# server

class Comfy:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log: Path):
        self.base, self.port, self.proc, self.log = base, port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": prompt, "client_id": "cncore-tests"})

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue and wait; returns the history entry (status + outputs)."""
        code, body = self.queue(prompt)
        assert code == 200, f"prompt refused: {body}"
        pid = body["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            h = self.get(f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                if h[pid]["status"].get("status_str") in ("success", "error"):
                    return h[pid]
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited; log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s")

    def images(self, entry: dict, node: str) -> list[np.ndarray]:
        from PIL import Image

        out = []
        for im in entry["outputs"][node]["images"]:
            path = self.base / "output" / im["subfolder"] / im["filename"]
            out.append(np.asarray(Image.open(path).convert("RGB")).astype(np.int16))
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_input_image(path: Path) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), (30, 40, 60))
    d = ImageDraw.Draw(im)
    d.rectangle([8, 10, 40, 50], fill=(220, 200, 80))
    d.ellipse([30, 6, 60, 36], fill=(90, 180, 230))
    d.line([0, 63, 63, 20], fill=(255, 255, 255), width=3)
    im.save(path)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_base")
    for d in ("models/checkpoints", "models/controlnet", "input", "output", "user", "temp", "custom_nodes"):
        (base / d).mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT, base / "custom_nodes" / "comfyui-controlnet-core", target_is_directory=True)
    _write_input_image(base / "input" / "example.png")
    script = base / "make_models.py"
    script.write_text(MAKE_MODELS)
    cn_dir = base / "models" / "controlnet"
    subprocess.run(
        [COMFYUI_PYTHON, str(script), COMFYUI_PATH, str(base / "models/checkpoints" / CKPT), str(cn_dir / CANNY),
         str(cn_dir / SDXL_CN)], check=True, cwd=base, timeout=900,
    )
    os.link(cn_dir / CANNY, cn_dir / TILE)  # same weights under the second workflow name
    (cn_dir / BROKEN).write_bytes(b"\x00\x01not a safetensors file" * 10)
    port = _free_port()
    log = base / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
             "--disable-metadata"],
            cwd=COMFYUI_PATH, stdout=logf, stderr=subprocess.STDOUT,
        )
    server = Comfy(base, port, proc, log)
    try:
        end = time.time() + 240
        while True:
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > end:
                    raise AssertionError(f"ComfyUI did not start; log:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"\n[ComfyUI log tail]\n{log.read_text()[-1500:]}")
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# prompts

def graph(control: str | None, loader: str = "CNCore_LoadControlNet", cn_name: str = CANNY, seed: int = 7,
          steps: int = 3, strength: float = 1.0, start: float = 0.0, end: float = 1.0, extra: dict | None = None,
          mask_size: tuple[int, int] | None = None, prefix: str = "cmp", hint_batch: int = 1,
          latent_batch: int = 1) -> dict:
    """ckpt -> text -> [loader + apply] -> KSampler -> VAEDecode -> SaveImage (node "9")."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house by a lake", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": latent_batch}},
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


def _ok(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    return entry


def _error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", "the prompt was expected to fail"
    errs = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errs, entry["status"]
    return errs[0]


def _diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return int(max(np.abs(x - y).max() for x, y in zip(a, b)))


# ------------------------------------------------------------------------------------------
# tests

def test_object_info_lists_the_four_nodes(comfy):
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
    assert apply["input_order"]["optional"] == ["vae", "mask", "control_stack"]
    assert apply["output"] == ["CONDITIONING", "CONDITIONING"]
    assert info["CNCore_LoadControlNet"]["output"] == ["CONTROL_NET"] == info["ControlNetLoader"]["output"]
    assert "canny" in info["CNCore_Preprocessor"]["input"]["required"]["method"][0]


def test_workflows_validate_against_real_object_info(comfy):
    specs = comfy.get("/object_info")
    for ui_path in tw.UI_FILES:
        ui, api = tw.load_pair(ui_path)
        assert tw.validate_api(api, specs) == [], ui_path.name
        assert tw.validate_ui(ui, specs) == [], ui_path.name
        assert tw.same_graph(ui, api, specs) == [], ui_path.name


@pytest.mark.parametrize("name", [p.name for p in tw.UI_FILES])
def test_api_workflow_runs(comfy, name):
    prompt = json.loads((tw.WORKFLOWS / "api" / name).read_text())
    for node in prompt.values():  # tiny and quick; everything else as shipped
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
        if node["class_type"] == "CNCore_Preprocessor":
            node["inputs"]["resolution"] = 64
    entry = _ok(comfy.run(prompt))
    saved = [n for n, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert saved and all(comfy.images(entry, n) for n in saved)


def test_same_image_as_comfyui_builtin_controlnet(comfy):
    runs = {}
    for key, loader, apply in [
        ("builtin", "ControlNetLoader", "ControlNetApplyAdvanced"),
        ("ours", "CNCore_LoadControlNet", "CNCore_ApplyControlNet"),
        ("our_loader_builtin_apply", "CNCore_LoadControlNet", "ControlNetApplyAdvanced"),
        ("builtin_loader_our_apply", "ControlNetLoader", "CNCore_ApplyControlNet"),
    ]:
        runs[key] = comfy.images(_ok(comfy.run(graph(apply, loader=loader, prefix=key))), "9")
    runs["none"] = comfy.images(_ok(comfy.run(graph(None, prefix="none"))), "9")
    img = runs["builtin"][0]
    saturated = float(np.mean((img == 0) | (img == 255)))
    d_ours = _diff(runs["ours"], runs["builtin"])
    effect = _diff(runs["none"], runs["builtin"])
    print(f"\n[parity] max pixel diff CNCore vs ComfyUI built-in: {d_ours} (of 255); "
          f"control effect (no control vs built-in): {effect}; saturated pixels: {saturated:.1%}")
    assert effect > 20, "the ControlNet should visibly change the image"
    assert saturated < 0.5, "images mostly clipped: the comparison would prove little"
    assert d_ours <= 3
    # our net in ComfyUI's apply node runs our runtime: the same image as our apply node
    assert _diff(runs["our_loader_builtin_apply"], runs["ours"]) == 0
    # ComfyUI's net in our apply node with default options is applied exactly like ComfyUI does
    assert _diff(runs["builtin_loader_our_apply"], runs["builtin"]) == 0


def test_schedule_and_strength_match_builtin(comfy):
    kw = dict(strength=0.7, start=0.3, end=0.8)
    a = comfy.images(_ok(comfy.run(graph("ControlNetApplyAdvanced", loader="ControlNetLoader", prefix="s_b", **kw))), "9")
    b = comfy.images(_ok(comfy.run(graph("CNCore_ApplyControlNet", prefix="s_o", **kw))), "9")
    d = _diff(a, b)
    print(f"\n[parity] strength 0.7, start 0.3, end 0.8: max pixel diff {d}")
    assert d <= 3


def test_comfyui_loaded_controlnet_takes_our_options(comfy):
    """A mask (and a non-default mode) on ComfyUI's net goes through our runtime, same as our loader."""
    extra = {"control_mode": "prompt is more important"}
    a = comfy.images(_ok(comfy.run(graph("CNCore_ApplyControlNet", loader="ControlNetLoader", mask_size=(64, 64),
                                         extra=extra, prefix="m_b"))), "9")
    b = comfy.images(_ok(comfy.run(graph("CNCore_ApplyControlNet", mask_size=(64, 64), extra=extra, prefix="m_o"))), "9")
    assert _diff(a, b) <= 1


def test_bad_prompts_fail_with_a_sentence_and_the_next_prompt_runs(comfy):
    # an SDXL ControlNet on an SD1.5 checkpoint: refused at apply time, before sampling
    err = _error(comfy.run(graph("CNCore_ApplyControlNet", cn_name=SDXL_CN)))
    assert err["node_type"] == "CNCore_ApplyControlNet"
    assert "SDXL" in err["exception_message"] and "SD1.x" in err["exception_message"]
    # ... and through ComfyUI's apply node, by our object before the first step
    err = _error(comfy.run(graph("ControlNetApplyAdvanced", cn_name=SDXL_CN)))
    assert "SDXL" in err["exception_message"] and "SD1.x" in err["exception_message"]
    # a damaged file
    err = _error(comfy.run(graph("CNCore_ApplyControlNet", cn_name=BROKEN)))
    assert err["node_type"] == "CNCore_LoadControlNet" and BROKEN in err["exception_message"]
    # a name outside the model folders never reaches the loader
    code, body = comfy.queue(graph("CNCore_ApplyControlNet", cn_name="../checkpoints/" + CKPT))
    assert code == 400
    # a mask of another shape than the image, found during sampling
    err = _error(comfy.run(graph("CNCore_ApplyControlNet", mask_size=(64, 16))))
    assert "mask" in err["exception_message"] and "64x64" in err["exception_message"]
    # 3 hint images for 2 latents
    err = _error(comfy.run(graph("CNCore_ApplyControlNet", hint_batch=3, latent_batch=2)))
    assert "3 hint images for 2 latents" in err["exception_message"]
    # the next valid prompt runs normally, twice (cached control objects are reset per run)
    for seed in (11, 12):  # the second re-samples with the cached conditioning and control objects
        _ok(comfy.run(graph("CNCore_ApplyControlNet", prefix=f"after{seed}", seed=seed)))


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
    prompt = json.loads((tw.WORKFLOWS / "api" / "controlnet_canny.json").read_text())
    prompt["5"]["inputs"]["resolution"] = 96  # not cached: it runs again
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 1
    _ok(comfy.run(prompt))
    last = preview({"method": "canny", "params": params, "resolution": 64, "last_run": "5"})
    assert from_file.shape == (64, 64, 3) and 0 < (from_file > 0).mean() < 0.5
    np.testing.assert_array_equal(last, from_file)
