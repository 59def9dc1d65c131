"""dwpose inside a real ComfyUI (COMFYUI_PATH; skipped otherwise), over HTTP, on the CPU.

A temporary base directory gets `models/annotators/yzd-v/DWPose/` with random-weight exports of the
two DWPose networks (tests/helpers_pose.py: the real topology, narrow), as Aux's ckpts keep them.
The tests queue `LoadImage -> CNCore_PoseKeypoints(dwpose) -> SaveImage` (and the Preprocessor with
method dwpose), and the preview route. Reference: our library on the same pixels in this
interpreter, with the same files: ComfyUI's model management and folder_paths must give the same
picture (within 1/255: another torch build there) and the same keypoints.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import helpers_pose as H
from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors import registry
from helpers_comfyui import NEEDS_COMFYUI, error, make_base, ok, serve
from test_comfyui_annotators import opencv_overlay

pytestmark = NEEDS_COMFYUI

FOLDER = "models/annotators/yzd-v/DWPose"
POSE = {"detect_body": True, "detect_hand": True, "detect_face": True, "scale_stick_for_xinsr_cn": False}


def prompt(method_node: str = "CNCore_PoseKeypoints") -> dict:
    inputs = {"image": ["1", 0], "method": "dwpose", "resolution": 512, "pixel_perfect": False, **POSE}
    if method_node == "CNCore_Preprocessor":
        inputs |= {p.name: p.default for p in pp.PARAMS if p.name not in inputs}
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": method_node, "inputs": inputs},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "pose"}},
    }


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("comfy-pose"), FOLDER)
    folder = base / FOLDER
    H.export_onnx(H.random_yolox(), torch.rand(1, 3, 640, 640) * 255, folder / "yolox_l.onnx", "images", ["output"])
    H.export_onnx(H.randomize(H.RTMPose(0.25, 0.33), seed=2), torch.randn(1, 3, 384, 288),
                  folder / "dw-ll_ucoco_384.onnx", "input", ["simcc_x", "simcc_y"])
    overlay = opencv_overlay(tmp_path_factory.mktemp("opencv"))
    with pytest.MonkeyPatch.context() as mp:
        if overlay:
            mp.setenv("PYTHONPATH", overlay)
        with serve(base, "--disable-all-custom-nodes", "--whitelist-custom-nodes", "comfyui-controlnet-core") as server:
            yield server


def reference(comfy) -> tuple[np.ndarray, list]:
    rgb = np.asarray(Image.open(comfy.base / "input" / "example.png").convert("RGB"))
    data: list = []
    try:
        out = pp.run("dwpose", rgb, resolution=512, weights_path=comfy.base / FOLDER / "dw-ll_ucoco_384.onnx",
                     data_out=data, **POSE)
    finally:
        registry.clear_models()
    return np.rint(out[0] * 255).astype(np.int16), data


def test_pose_keypoints_node_in_comfyui_equals_the_library(comfy):
    entry = ok(comfy.run(prompt()))
    (got,) = comfy.images(entry, "3")
    want, data = reference(comfy)
    assert np.abs(got - want).max() <= 1 and want.max() > 100
    ui = entry["outputs"]["2"]
    assert ui["cncore_weights"] == [str(comfy.base / FOLDER / "dw-ll_ucoco_384.onnx")]
    theirs = json.loads(ui["openpose_json"][0])
    assert len(theirs) == 1 and len(theirs[0]["people"]) == len(data[0]["people"]) >= 1
    a = np.array(theirs[0]["people"][0]["pose_keypoints_2d"])
    b = np.array(data[0]["people"][0]["pose_keypoints_2d"])
    assert np.abs(a - b).max() < 0.05  # pixels; another torch build in ComfyUI's venv


def test_preprocessor_node_and_preview_make_the_same_picture(comfy):
    (got,) = comfy.images(ok(comfy.run(prompt("CNCore_Preprocessor"))), "3")
    want, _ = reference(comfy)
    assert np.abs(got - want).max() <= 1
    body = {"method": "dwpose", "params": POSE, "resolution": 512,
            "image": {"filename": "example.png", "subfolder": "", "type": "input"}}
    req = urllib.request.Request(comfy.url + "/api/cncore/preview", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.status == 200 and r.headers["X-CNCore-Weights"].endswith("dw-ll_ucoco_384.onnx")
        import io

        preview = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")).astype(np.int16)
    assert np.abs(preview - want).max() <= 1


def test_missing_detector_is_a_sentence_and_the_next_prompt_runs(comfy):
    import os
    import time

    pose, det = comfy.base / FOLDER / "dw-ll_ucoco_384.onnx", comfy.base / FOLDER / "yolox_l.onnx"
    hidden = det.with_name("yolox_l.onnx.away")
    det.rename(hidden)
    try:
        os.utime(pose, (time.time() + 5, time.time() + 5))  # a "new" pose file: the model is built anew
        p = prompt()
        p["2"]["inputs"]["resolution"] = 520  # another prompt: ComfyUI would reuse the cached result
        err = error(comfy.run(p))
        assert "yolox_l.onnx" in err["exception_message"] and "yzd-v/DWPose" in err["exception_message"]
    finally:
        hidden.rename(det)
    os.utime(pose, (time.time() + 10, time.time() + 10))
    ok(comfy.run(prompt()))
