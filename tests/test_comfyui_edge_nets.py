"""The edge and line-art networks (softedge_hed ... anyline) inside a real ComfyUI (COMFYUI_PATH;
skipped otherwise), over HTTP, on the CPU.

A temporary base directory gets the six weight files (random weights in the published layouts) in
`models/annotators/` (five in Aux's `lllyasviel/Annotators` subfolder, MTEED.pth at the top) and a
160x224 picture of lines and shapes (padded to 192x256 by the methods). One prompt runs every method
(`LoadImage -> CNCore_Preprocessor(method) -> SaveImage` each); the preview route runs one. Reference:
our library on the same pixels and files in this interpreter, so the nodes inside ComfyUI (its model
management, its folder_paths) must give the same hints within 1/255.
"""

from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import pytest
from PIL import Image

from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors import registry
from helpers_comfyui import NEEDS_COMFYUI, make_base, ok, serve
from test_annotator_edges import release_files, scene
from test_comfyui_annotators import opencv_overlay

pytestmark = NEEDS_COMFYUI

METHODS = {  # method -> (its file, the widgets it reads)
    "softedge_hed": ("ControlNetHED.pth", {"safe": True}),
    "scribble_hed": ("ControlNetHED.pth", {"safe": False}),
    "softedge_pidinet": ("table5_pidinet.pth", {"safe": False}),
    "scribble_pidinet": ("table5_pidinet.pth", {"safe": True}),
    "lineart_realistic": ("sk_model.pth", {}),
    "lineart_coarse": ("sk_model2.pth", {}),
    "lineart_anime": ("netG.pth", {}),
    "softedge_teed": ("MTEED.pth", {"safe_steps": 3}),
    "anyline": ("MTEED.pth", {}),
}
RES = 160


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("comfy-edge-nets"), "models/annotators/lllyasviel/Annotators")
    files = release_files(base / "models/annotators/lllyasviel/Annotators")
    files["MTEED.pth"].rename(base / "models/annotators/MTEED.pth")
    Image.fromarray(scene(160, 224, seed=9)).save(base / "input" / "lines.png")
    overlay = opencv_overlay(tmp_path_factory.mktemp("opencv"))
    with pytest.MonkeyPatch.context() as mp:
        if overlay:
            mp.setenv("PYTHONPATH", overlay)
        with serve(base, "--disable-all-custom-nodes", "--whitelist-custom-nodes", "comfyui-controlnet-core") as server:
            yield server


def where(comfy, name: str):
    top = comfy.base / "models/annotators" / name
    return top if top.exists() else comfy.base / "models/annotators/lllyasviel/Annotators" / name


def reference(comfy, method: str, params: dict) -> np.ndarray:
    rgb = np.asarray(Image.open(comfy.base / "input" / "lines.png").convert("RGB"))
    try:
        out = pp.run(method, rgb, resolution=RES, weights_path=where(comfy, METHODS[method][0]), **params)
    finally:
        registry.clear_models()
    return np.rint(out[0] * 255).astype(np.int16)


def test_every_edge_net_runs_in_comfyui_equal_to_the_library_and_names_its_file(comfy):
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "lines.png"}}}
    for i, (method, (_file, params)) in enumerate(METHODS.items()):
        # the 0.1.0 widgets as a saved API prompt has them, plus the method's own (optional) ones
        inputs = {"image": ["1", 0], "method": method, "resolution": RES, "pixel_perfect": False,
                  "low_threshold": 100, "high_threshold": 200, "auto_threshold": False, "blur": 0.0,
                  "threshold": 0.5, "sigma": 1.0, "contrast": 0.05, "thickness": 3, "drawn": False,
                  "min_length": 0.03, "detector": "auto", "downsample": 2.0, "grid": 8, "seed": 0, **params}
        prompt[str(10 + 2 * i)] = {"class_type": "CNCore_Preprocessor", "inputs": inputs}
        prompt[str(11 + 2 * i)] = {"class_type": "SaveImage",
                                   "inputs": {"images": [str(10 + 2 * i), 0], "filename_prefix": method}}
    entry = ok(comfy.run(prompt))
    for i, (method, (file, params)) in enumerate(METHODS.items()):
        (got,) = comfy.images(entry, str(11 + 2 * i))
        want = reference(comfy, method, params)
        assert got.shape == want.shape == (160, 224, 3), method
        assert np.abs(got - want).max() <= 1 and want.std() > 5, method
        assert entry["outputs"][str(10 + 2 * i)]["cncore_weights"] == [str(where(comfy, file))], method


def test_preview_route_runs_an_edge_net(comfy):
    body = {"method": "softedge_pidinet", "params": {"safe": False}, "resolution": RES,
            "image": {"filename": "lines.png", "subfolder": "", "type": "input"}}
    req = urllib.request.Request(comfy.url + "/api/cncore/preview", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200 and r.headers["X-CNCore-Weights"].endswith("table5_pidinet.pth")
        got = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")).astype(np.int16)
    want = reference(comfy, "softedge_pidinet", {"safe": False})
    assert np.abs(got - want).max() <= 1
