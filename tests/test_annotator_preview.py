"""Network annotators through the node and the preview route (no ComfyUI: a stand-in folder_paths
with ComfyUI's models folder functions; the real adapter registers `annotators` with it).

References: the preview and the node must give the library's own hint for the same pixels
(`preprocessors.run` with the same file); a burst of 20 previews must leave the event loop
answering, run one network at a time, and answer the rest 200 or 429 with a sentence.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import types

import numpy as np
import pytest
import torch

from comfyui_controlnet_core import NODE_CLASS_MAPPINGS
from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.nodes import adapter, routes
from comfyui_controlnet_core.preprocessors import registry
from comfyui_controlnet_core.preprocessors.image import to_uint8
from comfyui_controlnet_core.preprocessors.nets import files, host
from test_annotator_depth_anything import random_release_state_dict
from test_routes import png_pixels, scene, serve

METHOD = {"method": "depth_anything_v2", "params": {"depth_model": "v1_vits"}, "resolution": 512,
          "pixel_perfect": False, "image": {"filename": "example.png", "subfolder": "", "type": "input"}}


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """input/output/temp and models/ folders, and a folder_paths answering like ComfyUI's."""
    dirs = {t: tmp_path / t for t in ("input", "output", "temp")}
    for d in dirs.values():
        d.mkdir()
    models = tmp_path / "models"
    folders: dict[str, tuple[list[str], set]] = {"controlnet": ([str(models / "controlnet")], set()),
                                                 "custom_nodes": ([str(tmp_path / "custom_nodes")], set())}
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)
    fp.folder_names_and_paths = folders
    fp.get_directory_by_type = lambda t: str(dirs[t]) if t in dirs else None
    fp.get_folder_paths = lambda name: list(folders[name][0])
    fp.get_filename_list = lambda name: []  # the model_info route's look-up: no controlnet files here

    def add_model_folder_path(name, path, is_default=False):  # ComfyUI's: append, or create the entry
        paths = folders.setdefault(name, ([], set()))[0]
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)

    fp.add_model_folder_path = add_model_folder_path
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setattr(adapter, "_annotators_ready", False)
    scene().save(dirs["input"] / "example.png")
    weights = models / "annotators" / "LiheYoung" / "Depth-Anything" / "checkpoints" / "depth_anything_vits14.pth"
    weights.parent.mkdir(parents=True)
    torch.save(random_release_state_dict(depth=4, seed=11), weights)
    try:
        yield types.SimpleNamespace(root=tmp_path, weights=weights, models=models, **dirs)
    finally:
        files.set_roots_provider(None)
        host.set_host(None)
        registry.clear_models()


def post(client, body):
    return client.post("/cncore/preview", data=json.dumps(body), headers={"Content-Type": "application/json"})


def test_adapter_registers_models_annotators_and_searches_aux_and_depthanything(comfy):
    aux = comfy.root / "custom_nodes" / "comfyui_controlnet_aux" / "ckpts"
    aux.mkdir(parents=True)
    adapter.setup_annotators()
    assert sys.modules["folder_paths"].get_folder_paths("annotators") == [str(comfy.models / "annotators")]
    assert [str(r) for r in files.search_roots()] == [
        str(comfy.models / "annotators"), str(aux), str(comfy.models / "depthanything")]


def test_node_finds_the_file_says_which_and_matches_the_library(comfy):
    image = np.asarray(scene(), np.float32) / 255
    out = NODE_CLASS_MAPPINGS["CNCore_Preprocessor"]().run(
        torch.from_numpy(image[None]), "depth_anything_v2", 512, False, depth_model="v1_vits")
    assert out["ui"] == {"cncore_weights": [str(comfy.weights)]}
    (hint,) = out["result"]
    np.testing.assert_array_equal(hint[0].numpy(), pp.run("depth_anything_v2", image, depth_model="v1_vits")[0])
    assert hint.std() > 0.05


def test_node_is_changed_follows_the_weights_file(comfy):
    node = NODE_CLASS_MAPPINGS["CNCore_Preprocessor"]
    assert node.IS_CHANGED(method="canny", low_threshold=10) == ""
    first = node.IS_CHANGED(method="depth_anything_v2", depth_model="v1_vits")
    assert first.startswith(str(comfy.weights))
    st = comfy.weights.stat()
    os.utime(comfy.weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # replaced under the same name
    assert node.IS_CHANGED(method="depth_anything_v2", depth_model="v1_vits") != first
    assert node.IS_CHANGED(method="depth_anything_v2", depth_model="v2_vitl") == "missing"


def test_node_missing_file_sentence(comfy):
    image = torch.zeros(1, 32, 32, 3)
    with pytest.raises(pp.PreprocessorError) as e:
        NODE_CLASS_MAPPINGS["CNCore_Preprocessor"]().run(image, "depth_anything_v2", 512, False)  # v2_vitl
    assert "depth_anything_v2_vitl.pth" in str(e.value) and str(comfy.models / "annotators") in str(e.value)


def test_preview_is_the_hint_and_names_the_file(comfy):
    async def fn(client):
        r = await post(client, METHOD)
        return r.status, await r.read(), r.headers.get(routes.WEIGHTS_HEADER)

    status, png, weights = serve(fn)
    assert status == 200, png
    assert weights == str(comfy.weights)
    pixels = np.asarray(scene(), np.uint8)
    expected = to_uint8(pp.run("depth_anything_v2", pixels, depth_model="v1_vits")[0])
    np.testing.assert_array_equal(png_pixels(png), expected)


def test_preview_missing_file_is_a_400_sentence(comfy):
    comfy.weights.unlink()

    async def fn(client):
        r = await post(client, METHOD)
        return r.status, await r.json()

    status, body = serve(fn)
    assert status == 400 and "depth_anything_vits14.pth was not found" in body["error"]


def test_twenty_concurrent_previews_one_at_a_time_loop_stays_responsive(comfy, monkeypatch):
    running, most = [0], [0]
    real = registry.run

    def counting_run(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            return real(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(routes.pp, "run", counting_run)

    async def fn(client):
        burst = [asyncio.ensure_future(post(client, METHOD)) for _ in range(20)]
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        r = await client.get("/cncore/model_info", params={"name": "absent.safetensors"})
        ping = time.perf_counter() - t0
        answers = []
        for f in burst:
            resp = await f
            answers.append((resp.status, await resp.read()))
        return r.status, ping, answers

    status, ping, answers = serve(fn)
    assert status == 200 and ping < 2.0  # the event loop answered during the burst (model_info: a missing file is data, 200)
    codes = [s for s, _ in answers]
    assert set(codes) <= {200, 429} and codes.count(200) >= 1, codes
    assert codes.count(200) <= routes.MAX_WAITING + 1
    for s, body in answers:
        if s == 429:
            assert "previews are already waiting" in json.loads(body)["error"]
    assert most[0] == 1  # one network run at a time
    assert routes._waiting == 0
