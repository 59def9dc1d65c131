"""The HTTP routes of nodes/routes.py on a bare aiohttp application (no ComfyUI).

ComfyUI's `folder_paths` is replaced by a small module over temporary folders (input, output, temp,
models/controlnet) with the functions the adapter calls, so the real path rules of the adapter run.
References: the preview must equal the preprocessor library's own hint for the same pixels
(`preprocessors.run`, what the node returns) as 8-bit PNG; the model label must name what the file
was saved as (family, base model, layout written by `save_controlnet`).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
import types

import numpy as np
import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from comfyui_controlnet_core import NODE_CLASS_MAPPINGS
from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.controlnet_core.loader import save_controlnet
from comfyui_controlnet_core.nodes import adapter, routes
from comfyui_controlnet_core.preprocessors.image import to_uint8
from helpers_models import make_tiny_config, random_controlnet

CANNY = {"low_threshold": 60, "high_threshold": 140, "blur": 0.0, "auto_threshold": False}


def scene(h: int = 96, w: int = 128, alpha: bool = False) -> Image.Image:
    """A small picture with edges in it (a rectangle, a disc, a diagonal band)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = (30, 40, 60)
    img[(yy > h // 6) & (yy < h // 2) & (xx > w // 8) & (xx < w // 2)] = (220, 200, 80)
    img[(yy - 2 * h // 3) ** 2 + (xx - 3 * w // 4) ** 2 < (h // 5) ** 2] = (90, 180, 230)
    img[np.abs(yy - xx * h / w) < 3] = (255, 255, 255)
    if not alpha:
        return Image.fromarray(img, "RGB")
    a = np.full((h, w), 255, np.uint8)
    a[:, : w // 3] = 0  # transparent left third: Load Image's mask is 1 there
    return Image.fromarray(np.dstack([img, a]), "RGBA")


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """ComfyUI's folders and a stand-in `folder_paths` that answers like ComfyUI's."""
    dirs = {t: tmp_path / t for t in ("input", "output", "temp")}
    for d in dirs.values():
        d.mkdir()
    cn_dir = tmp_path / "models" / "controlnet"
    cn_dir.mkdir(parents=True)
    fp = types.ModuleType("folder_paths")
    fp.get_directory_by_type = lambda t: str(dirs[t]) if t in dirs else None
    fp.get_folder_paths = lambda folder: [str(cn_dir)] if folder == "controlnet" else []

    def names(folder):
        if folder != "controlnet":
            return []
        return sorted(str(p.relative_to(cn_dir)).replace(os.sep, "/") for p in cn_dir.rglob("*") if p.is_file())

    def full_path(folder, name):
        p = cn_dir / os.path.relpath(os.path.join("/", name), "/")
        return str(p) if folder == "controlnet" and p.is_file() else None

    fp.get_filename_list, fp.get_full_path = names, full_path
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    scene().save(dirs["input"] / "example.png")
    return types.SimpleNamespace(root=tmp_path, controlnet=cn_dir, **dirs)


def serve(fn):
    """Run `fn(client)` against the routes mounted on a bare aiohttp app."""
    async def main():
        app = web.Application()
        app.add_routes(routes.routes())
        async with TestClient(TestServer(app)) as client:
            return await fn(client)

    return asyncio.run(main())


def post_preview(body) -> tuple[int, dict | bytes, str]:
    async def fn(client):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        r = await client.post("/cncore/preview", data=data, headers={"Content-Type": "application/json"})
        raw = await r.read()
        return r.status, (raw if r.content_type == "image/png" else json.loads(raw)), r.content_type

    return serve(fn)


def png_pixels(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def request(**kw) -> dict:
    body = {"method": "canny", "params": dict(CANNY), "resolution": 64, "pixel_perfect": False,
            "image": {"filename": "example.png", "subfolder": "", "type": "input"}}
    body.update(kw)
    return body


# ------------------------------------------------------------------------------------------
# preview: good requests

def test_preview_is_the_nodes_hint_as_png(comfy):
    status, png, ctype = post_preview(request())
    assert status == 200 and ctype == "image/png"
    pixels = np.asarray(scene(), np.uint8)
    expected = to_uint8(pp.run("canny", pixels, resolution=64, **CANNY)[0])
    got = png_pixels(png)
    assert got.shape == expected.shape == (96, 128, 3)
    np.testing.assert_array_equal(got, expected)
    assert 0 < (got > 0).mean() < 0.5  # edges, not a blank or a full image
    # the node, fed the same pixels as ComfyUI's LoadImage would (float in [0, 1]), makes the same hint
    node_params = {p.name: p.default for p in pp.PARAMS} | CANNY
    (hint,) = NODE_CLASS_MAPPINGS["CNCore_Preprocessor"]().run(
        torch.from_numpy(pixels[None].astype(np.float32) / 255), "canny", 64, False, **node_params)
    np.testing.assert_array_equal(to_uint8(hint[0].numpy()), got)


def test_preview_of_each_method_that_needs_no_mask_matches_the_library(comfy):
    pixels = np.asarray(scene(), np.uint8)
    for method in pp.list_methods():
        if pp.get_method(method).needs_mask or pp.get_method(method).load_weights is not None:
            continue  # the network methods' previews: tests/test_annotator_preview.py
        status, png, _ = post_preview(request(method=method, params={}))
        assert status == 200, (method, png)
        expected = to_uint8(pp.run(method, pixels, resolution=64)[0])
        np.testing.assert_array_equal(png_pixels(png), expected, err_msg=method)


def test_inpaint_preview_uses_load_images_mask_and_draws_the_sentinel_magenta(comfy):
    scene(alpha=True).save(comfy.input / "cutout.png")
    ref = {"filename": "cutout.png", "subfolder": "", "type": "input"}
    status, png, _ = post_preview(request(method="inpaint", params={}, image=ref, mask=ref))
    assert status == 200, png
    got = png_pixels(png)
    assert (got[:, : 128 // 3] == (255, 0, 255)).all()  # alpha 0 -> mask 1 -> the -1 sentinel
    rgb = np.asarray(scene(), np.uint8)
    np.testing.assert_array_equal(got[:, 128 // 3:], rgb[:, 128 // 3:])  # the rest is the image itself


def test_images_in_subfolders_and_the_output_and_temp_folders(comfy):
    (comfy.input / "pasted").mkdir()
    scene().save(comfy.input / "pasted" / "a.png")
    scene().save(comfy.output / "b.png")
    scene().convert("RGB").save(comfy.temp / "c.jpg", quality=95)
    for ref in ({"filename": "a.png", "subfolder": "pasted", "type": "input"},
                {"filename": "b.png", "subfolder": "", "type": "output"},
                {"filename": "c.jpg", "subfolder": "", "type": "temp"}):
        status, body, _ = post_preview(request(image=ref))
        assert status == 200, (ref, body)


def test_large_images_are_shrunk_to_the_preview_side_and_pixel_perfect_uses_the_target(comfy):
    scene(h=1536, w=2048).save(comfy.input / "big.png")
    status, png, _ = post_preview(request(image={"filename": "big.png", "subfolder": "", "type": "input"}))
    assert status == 200 and png_pixels(png).shape == (768, 1024, 3)
    # pixel_perfect: the working resolution comes from the generated size, as in the node
    body = request(pixel_perfect=True, target_hw=[192, 256])
    status, png, _ = post_preview(body)
    expected = to_uint8(pp.run("canny", np.asarray(scene(), np.uint8), pixel_perfect=True, target_hw=(192, 256),
                               **CANNY)[0])
    assert status == 200
    np.testing.assert_array_equal(png_pixels(png), expected)


def test_last_run_previews_what_the_node_got(comfy, monkeypatch):
    monkeypatch.setattr(adapter, "_executing_node_id", lambda: "12")
    image = torch.from_numpy(np.asarray(scene(), np.float32)[None] / 255)
    adapter.remember_input(torch.cat([image, image.flip(1)]), None, (64, 80))
    status, png, _ = post_preview({"method": "canny", "params": CANNY, "resolution": 64, "last_run": "12"})
    assert status == 200, png
    np.testing.assert_array_equal(png_pixels(png), to_uint8(pp.run("canny", np.asarray(scene()), resolution=64,
                                                                   **CANNY)[0]))
    # pixel_perfect takes the latent size of that run
    status, png, _ = post_preview({"method": "canny", "params": CANNY, "pixel_perfect": True, "last_run": "12"})
    expected = to_uint8(pp.run("canny", np.asarray(scene()), pixel_perfect=True, target_hw=(64, 80), **CANNY)[0])
    assert status == 200
    np.testing.assert_array_equal(png_pixels(png), expected)


def test_last_run_keeps_a_small_area_shrunk_frame(monkeypatch):
    import cv2

    monkeypatch.setattr(adapter, "_executing_node_id", lambda: "13")
    rng = np.random.default_rng(0)
    frame = rng.random((1536, 2048, 3), dtype=np.float32)
    mask = rng.random((300, 400), dtype=np.float32)  # another size than the image: grown to its stored size
    adapter.remember_input(torch.from_numpy(frame[None]), torch.from_numpy(mask[None]), None)
    entry = adapter.last_input("13")
    # 1024 px on the long side (hand-computed: 1536 * 1024 / 2048 = 768), area-resized like OpenCV does
    area = cv2.resize(frame, (1024, 768), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(entry["image"], to_uint8(area))
    np.testing.assert_array_equal(entry["mask"], cv2.resize(mask, (1024, 768), interpolation=cv2.INTER_AREA))


# ------------------------------------------------------------------------------------------
# preview: every bad request gets a 4xx and a sentence

@pytest.mark.parametrize("body, status, words", [
    (dict(image={"filename": "missing.png", "subfolder": "", "type": "input"}), 404, "not in ComfyUI's input"),
    (dict(image={"filename": "../secret.png", "subfolder": "", "type": "input"}), 400, "refusing"),
    (dict(image={"filename": "example.png", "subfolder": "../..", "type": "input"}), 400, "refusing"),
    (dict(image={"filename": "/etc/passwd", "subfolder": "", "type": "input"}), 400, "refusing"),
    (dict(image={"filename": "C:\\x.png", "subfolder": "", "type": "input"}), 400, "refusing"),
    (dict(image={"filename": "example.png", "subfolder": "", "type": "models"}), 400, "folder type"),
    (dict(image={"filename": "", "subfolder": "", "type": "input"}), 400, "empty"),
    (dict(image="example.png"), 400, "filename, subfolder and type"),
    (dict(method="depth_anything"), 400, "unknown preprocessor"),
    (dict(params={"low_threshold": 999}), 400, "low_threshold"),
    (dict(params={"strength": 1}), 400, "unknown parameter"),
    (dict(params=[1, 2]), 400, "params must be an object"),
    (dict(resolution="big"), 400, "resolution"),
    (dict(resolution=8), 400, "out of range"),
    (dict(pixel_perfect=True), 400, "Empty Latent Image"),
    (dict(target_hw=[0, 64]), 400, "target_hw"),
    (dict(method="inpaint", params={}), 400, "needs a mask"),
    (dict(last_run="999"), 404, "has not run yet"),
])
def test_bad_preview_requests(comfy, body, status, words):
    b = request(**body)
    got_status, got, _ = post_preview(b)
    assert got_status == status, got
    assert words in got["error"] and "Traceback" not in got["error"]


def test_no_image_not_json_and_oversized_requests(comfy):
    body = request()
    del body["image"]
    status, got, _ = post_preview(body)
    assert status == 400 and "Load Image" in got["error"]
    status, got, _ = post_preview(b"{not json")
    assert status == 400 and "not JSON" in got["error"]
    status, got, _ = post_preview(request(params={"x": "y" * (routes.MAX_REQUEST_BYTES + 1)}))
    assert status == 413 and "KiB" in got["error"]


def test_a_symlink_out_of_the_input_folder_is_refused(comfy, tmp_path):
    outside = tmp_path / "outside.png"
    scene().save(outside)
    os.symlink(outside, comfy.input / "link.png")
    status, got, _ = post_preview(request(image={"filename": "link.png", "subfolder": "", "type": "input"}))
    assert status == 400 and "outside" in got["error"]


def test_a_file_that_is_not_an_image_is_refused(comfy):
    (comfy.input / "notes.png").write_bytes(b"these are my notes, not pixels\n" * 20)
    status, got, _ = post_preview(request(image={"filename": "notes.png", "subfolder": "", "type": "input"}))
    assert status == 415 and "not an image" in got["error"]


def test_oversize_images_are_refused_before_decoding(comfy):
    # 1-bit images: a huge size in a tiny file; the refusal reads only the header
    Image.new("1", (routes.MAX_INPUT_SIDE + 1, 8)).save(comfy.input / "wide.png")
    Image.new("1", (8000, 6000)).save(comfy.input / "many.png")
    for name in ("wide.png", "many.png"):
        status, got, _ = post_preview(request(image={"filename": name, "subfolder": "", "type": "input"}))
        assert status == 413 and "megapixels" in got["error"], got


# ------------------------------------------------------------------------------------------
# the event loop stays free while a preview runs, and a slow preview is cut off

SLOW_S = 1.0  # a blocked event loop would stall this long; a free one ticks every 10 ms


def _slow(frame, **_):
    time.sleep(SLOW_S)
    return frame


@pytest.fixture
def slow_method():
    pp.register(pp.Method("slow_for_tests", _slow, (), "tests", native_size=True), replace=True)
    yield "slow_for_tests"
    pp.METHODS.pop("slow_for_tests", None)


def test_the_event_loop_stays_responsive_during_a_preview(comfy, slow_method):
    async def fn(client):
        async def preview():
            r = await client.post("/cncore/preview", json=request(method=slow_method, params={}))
            return r.status, time.perf_counter()

        task = asyncio.create_task(preview())
        await asyncio.sleep(0.05)
        gaps, last, start = [], time.perf_counter(), time.perf_counter()
        while not task.done():  # the loop keeps ticking every 10 ms while the preview works
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        t0 = time.perf_counter()
        r = await client.get("/cncore/model_info", params={"name": "nothing.safetensors"})
        other = (r.status, time.perf_counter() - t0)
        status, finished = await task
        return status, finished - start, max(gaps), len(gaps), other

    status, took, worst_gap, ticks, other = serve(fn)
    assert status == 200 and took >= 0.8 * SLOW_S
    assert worst_gap < SLOW_S / 2 and ticks >= 20, (worst_gap, ticks)  # slack for a busy 2-core machine
    assert other[0] == 200


def test_other_requests_answer_while_a_preview_is_running(comfy, slow_method):
    async def fn(client):
        task = asyncio.create_task(client.post("/cncore/preview", json=request(method=slow_method, params={})))
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        r = await client.get("/cncore/model_info", params={"name": "nothing.safetensors"})
        answered = time.perf_counter() - t0
        still_running = not task.done()
        await task
        return r.status, answered, still_running

    status, answered, still_running = serve(fn)
    assert status == 200 and still_running and answered < SLOW_S / 2


def test_a_preview_over_the_time_limit_answers_504(comfy, slow_method, monkeypatch):
    monkeypatch.setattr(routes, "PREVIEW_TIMEOUT_S", 0.1)
    status, got, _ = post_preview(request(method=slow_method, params={}))
    assert status == 504 and "longer than" in got["error"]


# ------------------------------------------------------------------------------------------
# model info

def test_model_info_labels_the_file_from_its_header(comfy):
    save_controlnet(random_controlnet(make_tiny_config("sd15")), comfy.controlnet / "tiny_sd15.safetensors")
    (comfy.controlnet / "xl").mkdir()
    save_controlnet(random_controlnet(make_tiny_config("sdxl")), comfy.controlnet / "xl" / "tiny.safetensors",
                    format="diffusers")

    async def fn(client):
        out = []
        for name in ("tiny_sd15.safetensors", "xl/tiny.safetensors"):
            r = await client.get("/cncore/model_info", params={"name": name})
            out.append((r.status, await r.json()))
        return out

    (s1, a), (s2, b) = serve(fn)
    assert (s1, s2) == (200, 200)
    assert a["label"] == "ControlNet · SD1.x · original" and a["supported"] is True and a["found"] is True
    assert (a["family"], a["arch"], a["layout"]) == ("ControlNet", "sd15", "original")
    assert a["size_bytes"] == (comfy.controlnet / "tiny_sd15.safetensors").stat().st_size
    assert b["label"] == "ControlNet · SDXL · diffusers"


def test_model_info_of_a_file_not_downloaded_yet_is_an_answer_not_an_error(comfy):
    """A workflow opened before its model is downloaded asks for a name that is not in the folder: an
    expected state, answered 200 (the browser logs every 4xx/5xx answer as a console error)."""
    save_controlnet(random_controlnet(make_tiny_config("sd15")), comfy.controlnet / "there.safetensors")

    async def fn(client):
        out = []
        for name in ("not_there.safetensors", "sub/not_there.safetensors", "There.safetensors"):
            r = await client.get("/cncore/model_info", params={"name": name})
            out.append((r.status, await r.json()))
        return out

    for (status, got), name in zip(serve(fn), ("not_there.safetensors", "sub/not_there.safetensors",
                                                "There.safetensors")):
        assert status == 200, got
        assert got == {"name": name, "found": False, "supported": False,
                       "label": "file not found in models/controlnet"}


@pytest.mark.parametrize("name, status, words", [
    ("", 400, "empty"),
    ("../checkpoints/model.safetensors", 400, "refusing"),
    ("/etc/passwd", 400, "refusing"),
    ("damaged.safetensors", 422, "damaged.safetensors"),
])
def test_model_info_bad_names(comfy, name, status, words):
    (comfy.controlnet / "damaged.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 8)

    async def fn(client):
        r = await client.get("/cncore/model_info", params={"name": name})
        return r.status, await r.json()

    got_status, got = serve(fn)
    assert got_status == status, got
    assert words in got["error"]


# ------------------------------------------------------------------------------------------
# registration

def test_routes_register_on_comfyuis_prompt_server_only(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert routes.register() is False  # not inside ComfyUI: nothing happens
    table = web.RouteTableDef()
    fake = types.ModuleType("server")
    fake.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(routes=table))
    monkeypatch.setitem(sys.modules, "server", fake)
    assert routes.register() is True
    assert {(r.method, r.path) for r in table} == {("POST", "/cncore/preview"), ("GET", "/cncore/model_info")}

