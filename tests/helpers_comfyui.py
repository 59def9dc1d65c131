"""What the tests in a real ComfyUI share (the optional COMFYUI_PATH suite): the environment switch,
a temporary base directory with the pack linked in, scripts run in ComfyUI's interpreter to write
random-weight models with ComfyUI's own classes, the headless server and its HTTP client.

Used by tests/test_comfyui_integration.py, test_comfyui_lllite.py and test_comfyui_union.py.
`serve` also fits tests/test_browser.py's server (pass it `--disable-all-custom-nodes
--whitelist-custom-nodes comfyui-controlnet-core`; `--disable-metadata` only affects saved images).
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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
# `pytestmark = NEEDS_COMFYUI` in a test module: the `comfyui` marker, skipped without COMFYUI_PATH
NEEDS_COMFYUI = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set (a ComfyUI checkout to test in)"),
]
ROOT = Path(__file__).resolve().parents[1]
PACK = "comfyui-controlnet-core"  # the pack's folder name in custom_nodes/
BASE_FOLDERS = ("models/checkpoints", "models/controlnet", "input", "output", "user", "temp", "custom_nodes")


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


def ok(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    return entry


def error(entry: dict) -> dict:
    """The execution error of a prompt that was expected to fail."""
    assert entry["status"]["status_str"] == "error", "the prompt was expected to fail"
    errs = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errs, entry["status"]
    return errs[0]


def pixel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    """Largest difference of two runs' images, in 1/255."""
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return int(max(np.abs(x - y).max() for x, y in zip(a, b)))


def run_small(server: Comfy, prompt: dict, steps: int, timeout: float = 600) -> dict:
    """Queue a shipped API workflow at 64x64 px (latents, preprocessor resolution) with `steps`
    sampling steps, everything else as shipped; every SaveImage node must have saved an image.
    Returns the history entry."""
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
        if node["class_type"] == "CNCore_Preprocessor":
            node["inputs"]["resolution"] = 64
    entry = ok(server.run(prompt, timeout=timeout))
    saved = [n for n, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert saved and all(server.images(entry, n) for n in saved)
    return entry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_input_image(path: Path) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), (30, 40, 60))
    d = ImageDraw.Draw(im)
    d.rectangle([8, 10, 40, 50], fill=(220, 200, 80))
    d.ellipse([30, 6, 60, 36], fill=(90, 180, 230))
    d.line([0, 63, 63, 20], fill=(255, 255, 255), width=3)
    im.save(path)


def make_base(base: Path, *folders: str) -> Path:
    """A ComfyUI base directory: `BASE_FOLDERS` plus `folders`, the pack linked into custom_nodes/,
    input/example.png (`write_input_image`)."""
    for d in (*BASE_FOLDERS, *folders):
        (base / d).mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT, base / "custom_nodes" / PACK, target_is_directory=True)
    write_input_image(base / "input" / "example.png")
    return base


# Put before every script `run_in_comfyui` runs: ComfyUI's code importable and in CPU mode, the
# random weights every fixture model gets, and the random VAE of the checkpoints.
SCRIPT_PRELUDE = r'''
import math, os, sys, torch
from safetensors.torch import save_file
sys.path.insert(0, os.environ["COMFYUI_PATH"])
import comfy.cli_args
comfy.cli_args.args.cpu = True

def randomize(module, seed):
    """N(0, 1/fan_in) for matrices and kernels, 1 + N(0, 0.1) for 1-D weights (norm scales),
    N(0, 0.02) for biases; in the order of the sorted parameter names."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
            elif name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                v = 0.02 * torch.randn(p.shape, generator=g)
            p.copy_(v)
    return module

def random_vae(seed):
    """Stable Diffusion's VAE (SD1.x and SDXL share its shapes), random; the decoder's last conv
    scaled down so that decoded pixels stay mostly inside [0, 1]."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    vae = randomize(AutoencoderKL(ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                                                ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                                                dropout=0.0), embed_dim=4), seed)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.2)
    return vae
'''


def run_in_comfyui(script: Path, body: str, *args: str | Path, timeout: float, python: str | None = None) -> None:
    """Write `SCRIPT_PRELUDE` + `body` to `script` and run it in ComfyUI's interpreter (in the
    script's folder), `args` in its sys.argv[1:]. `python`: another interpreter (ComfyUI's code is
    still importable), e.g. the test's own for a script that needs a test extra such as diffusers,
    which ComfyUI's environment need not have."""
    script.write_text(SCRIPT_PRELUDE + body)
    subprocess.run([python or COMFYUI_PYTHON, str(script), *map(str, args)], check=True, cwd=script.parent, timeout=timeout,
                   env={**os.environ, "COMFYUI_PATH": COMFYUI_PATH})


@contextmanager
def serve(base: Path, *flags: str) -> Iterator[Comfy]:
    """ComfyUI headless on the CPU on `base` (with extra command-line `flags`): a `Comfy` client
    once it answers /system_stats; afterwards the server is stopped, its log tail printed and `base`
    deleted."""
    port = free_port()
    log = base / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", *flags, "--listen", "127.0.0.1", "--port", str(port),
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
