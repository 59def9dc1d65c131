"""The network annotators inside a real ComfyUI (COMFYUI_PATH; skipped otherwise), over HTTP, on the CPU.

A temporary base directory (nothing is written into the checkout) gets `models/annotators/` with a
random-weight Depth Anything file (a 4-block ViT-S in the release's V1 layout and key names, so a
prompt takes seconds) and an `extra_model_paths.yaml` folder (key `annotators`) with another one.
ComfyUI starts headless; the tests queue `LoadImage -> CNCore_Preprocessor(depth_anything_v2) ->
SaveImage` and ask POST /cncore/preview. Reference: our library on the same pixels in this
interpreter (`preprocessors.run` with the same file), so the node inside ComfyUI (its model
management, its folder_paths) must give the same hint within 1/255 (another torch build there).
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors import registry
from helpers_comfyui import COMFYUI_PYTHON, NEEDS_COMFYUI, error, make_base, ok, serve
from test_annotator_depth_anything import random_release_state_dict

pytestmark = NEEDS_COMFYUI

V1S = "depth_anything_vits14.pth"
EXTRA = "depth_anything_vitl14.pth"  # a small ViT-S file under the ViT-L name: sizes come from the shapes


def prompt(depth_model: str = "v1_vits") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "CNCore_Preprocessor", "inputs": {
            "image": ["1", 0], "method": "depth_anything_v2", "resolution": 512, "pixel_perfect": False,
            "low_threshold": 100, "high_threshold": 200, "auto_threshold": False, "blur": 0.0, "threshold": 0.5,
            "sigma": 1.0, "contrast": 0.05, "thickness": 3, "drawn": False, "min_length": 0.03, "detector": "auto",
            "downsample": 2.0, "grid": 8, "seed": 0, "depth_model": depth_model}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "depth"}},
    }


def opencv_overlay(folder: Path) -> str | None:
    """A PYTHONPATH entry holding this interpreter's OpenCV, when ComfyUI's interpreter lacks it.

    opencv-python is one of the pack's requirements (a user installs it into ComfyUI's venv); a test
    venv of ComfyUI that was made without it (and may not be changed) gets ours for the server."""
    if subprocess.run([COMFYUI_PYTHON, "-c", "import cv2"], capture_output=True).returncode == 0:
        return None
    import cv2

    site = Path(cv2.__file__).resolve().parent.parent
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("cv2", "opencv_python.libs"):
        if (site / name).exists():
            (folder / name).symlink_to(site / name, target_is_directory=True)
    return str(folder)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("comfy-annotators"), "models/annotators/LiheYoung", "elsewhere")
    torch.save(random_release_state_dict(depth=4, seed=21), base / "models/annotators/LiheYoung" / V1S)
    torch.save(random_release_state_dict(depth=4, seed=22), base / "elsewhere" / EXTRA)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"cncore_test:\n  base_path: {base}\n  annotators: elsewhere\n")
    overlay = opencv_overlay(tmp_path_factory.mktemp("opencv"))
    with pytest.MonkeyPatch.context() as mp:
        if overlay:
            mp.setenv("PYTHONPATH", overlay)
        with serve(base, "--disable-all-custom-nodes", "--whitelist-custom-nodes", "comfyui-controlnet-core",
                   "--extra-model-paths-config", str(yaml)) as server:
            yield server


def reference(comfy, path, model: str) -> np.ndarray:
    from comfyui_controlnet_core.preprocessors.nets import files

    files.set_roots_provider(lambda: [path.parent])
    try:
        rgb = np.asarray(Image.open(comfy.base / "input" / "example.png").convert("RGB"))
        return np.rint(pp.run("depth_anything_v2", rgb, depth_model=model)[0] * 255).astype(np.int16)
    finally:
        files.set_roots_provider(None)
        registry.clear_models()


def test_depth_anything_node_in_comfyui_equals_the_library_and_names_its_file(comfy):
    entry = ok(comfy.run(prompt()))
    (got,) = comfy.images(entry, "3")
    want = reference(comfy, comfy.base / "models/annotators/LiheYoung" / V1S, "v1_vits")
    assert np.abs(got - want).max() <= 1 and want.std() > 10
    assert entry["outputs"]["2"]["cncore_weights"] == [str(comfy.base / "models/annotators/LiheYoung" / V1S)]


def test_extra_model_paths_annotators_folder(comfy):
    entry = ok(comfy.run(prompt("v1_vitl")))
    (got,) = comfy.images(entry, "3")
    want = reference(comfy, comfy.base / "elsewhere" / EXTRA, "v1_vitl")
    assert np.abs(got - want).max() <= 1
    assert entry["outputs"]["2"]["cncore_weights"] == [str(comfy.base / "elsewhere" / EXTRA)]


def test_preview_route_runs_the_network(comfy):
    body = {"method": "depth_anything_v2", "params": {"depth_model": "v1_vits"}, "resolution": 512,
            "image": {"filename": "example.png", "subfolder": "", "type": "input"}}
    req = urllib.request.Request(comfy.url + "/api/cncore/preview", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200 and r.headers["X-CNCore-Weights"].endswith(V1S)
        import io

        got = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")).astype(np.int16)
    want = reference(comfy, comfy.base / "models/annotators/LiheYoung" / V1S, "v1_vits")
    assert np.abs(got - want).max() <= 1


def test_missing_file_is_a_sentence_free_unloads_and_the_next_prompt_runs(comfy):
    err = error(comfy.run(prompt("v2_vitl")))
    assert "depth_anything_v2_vitl.pth" in err["exception_message"]
    assert "huggingface.co/depth-anything/Depth-Anything-V2-Large" in err["exception_message"]
    assert str(comfy.base / "models" / "annotators") in err["exception_message"]
    code, _ = comfy.post("/free", {"unload_models": True, "free_memory": True})
    assert code == 200
    ok(comfy.run(prompt()))
