"""The pack's HTTP routes, for its web extension (`web/`): a live hint preview and the loader's label.

    POST /cncore/preview      JSON -> PNG: a preprocessor's hint for an image, without queueing
    GET  /cncore/model_info   ?name=<file in the controlnet folders> -> JSON: family, base model, layout
                              (`found: false` and a label saying so for a file that is not there)

Inside ComfyUI, `register()` adds them to `PromptServer.instance.routes` (ComfyUI serves each at
`/path` and `/api/path`). The handlers are plain aiohttp handlers: tests mount `routes()` on a bare
`web.Application`. Every file access goes through the adapter's path rules (`adapter.resolve_image_path`,
`adapter.resolve_model_path`): nothing outside ComfyUI's input/output/temp and controlnet model
folders is read.

Preview request (JSON object):
    method        a preprocessor name (network methods find their weights file as the node does)
    params        {widget name: value} as the node holds them (validated like the node's)
    resolution, pixel_perfect, target_hw ([height, width] of the generated image, for pixel_perfect)
    image         {"filename", "subfolder", "type"} as ComfyUI's /view names a file (Load Image's value)
    mask          optional, same form: the MASK a Load Image node makes of that file (1 - alpha)
    last_run      instead of image/mask: a Preprocessor node id; uses what that node got on its last run
Answer: the hint as PNG (inpaint's -1 sentinel drawn magenta; header X-CNCore-Weights: the weights
file a network method used), or a 4xx JSON {"error": sentence}.

Bounds: images over MAX_INPUT_SIDE px on a side or MAX_INPUT_PIXELS in all are refused (413) before
their pixels are decoded; larger than PREVIEW_SIDE px are shrunk (area) to it first, so at or below
that size the preview is exactly the node's hint; the working resolution is capped at MAX_RESOLUTION.
Previews run one at a time on a worker thread (never on the event loop, so ComfyUI's queue and
websocket keep going) and answer 504 after PREVIEW_TIMEOUT_S; with MAX_WAITING previews already
waiting, a further one is answered 429 at once (memory stays bounded under a burst of edits).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from .. import preprocessors as pp
from ..preprocessors import image as ppimage
from ..controlnet_core.errors import InputError, LoadError
from . import adapter

log = logging.getLogger(__name__)

PREFIX = "/cncore"
MAX_INPUT_SIDE = 16384
MAX_INPUT_PIXELS = 40_000_000
PREVIEW_SIDE = 1024
MAX_RESOLUTION = 2048
PREVIEW_TIMEOUT_S = 30.0
MAX_REQUEST_BYTES = 64 * 1024
SENTINEL_RGB = (255, 0, 255)  # how inpaint's masked pixels (exactly -1) are drawn
NOT_FOUND_LABEL = "file not found in models/controlnet"  # the loader's label for a file not downloaded yet

WEIGHTS_HEADER = "X-CNCore-Weights"
# Previews waiting for the one preview thread (networks take seconds on a CPU); more get a 429.
MAX_WAITING = 4

_pool: ThreadPoolExecutor | None = None
_waiting = 0


def _preview_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # one worker: previews wait for each other instead of taking every core
        _pool = ThreadPoolExecutor(1, thread_name_prefix="cncore-preview")
    return _pool


class RequestError(Exception):
    """A request we answer with `status` and a sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ------------------------------------------------------------------------------------------
# preview

@dataclass(frozen=True)
class PreviewJob:
    method: str
    params: dict
    resolution: int
    pixel_perfect: bool
    target_hw: tuple[int, int] | None
    image: dict | None
    mask: dict | None
    last_run: str | None


def _image_ref(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(400, f"{what} must be an object with filename, subfolder and type (as Load Image holds it)")
    return {"filename": value.get("filename"), "subfolder": value.get("subfolder", ""),
            "type": value.get("type", "input")}


def parse_preview(body: Any) -> PreviewJob:
    """The request, checked for shape (values are checked by the preprocessor itself)."""
    if not isinstance(body, dict):
        raise RequestError(400, "send a JSON object with method, params and image")
    method = body.get("method")
    try:
        pp.get_method(method)
    except pp.PreprocessorError as e:
        raise RequestError(400, str(e)) from None
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise RequestError(400, "params must be an object of widget names and values")
    resolution = body.get("resolution", 512)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)):
        raise RequestError(400, f"resolution must be a whole number of pixels; got {resolution!r}")
    pixel_perfect = body.get("pixel_perfect", False)
    if not isinstance(pixel_perfect, bool):
        raise RequestError(400, f"pixel_perfect must be true or false; got {pixel_perfect!r}")
    target = body.get("target_hw")
    if target is not None:
        ok = (isinstance(target, list) and len(target) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_INPUT_SIDE for v in target))
        if not ok:
            raise RequestError(400, f"target_hw must be [height, width] in pixels (1 to {MAX_INPUT_SIDE}); got "
                                    f"{target!r}")
        target = (target[0], target[1])
    last_run = body.get("last_run")
    if last_run is not None:
        if not isinstance(last_run, (str, int)) or isinstance(last_run, bool) or str(last_run) == "":
            raise RequestError(400, f"last_run must be a node id; got {last_run!r}")
        return PreviewJob(method, params, int(resolution), pixel_perfect, target, None, None, str(last_run))
    if "image" not in body:
        raise RequestError(400, "no image to preview: connect a Load Image node to the preprocessor's image input, "
                                "or run the workflow once to preview the image it got")
    mask = _image_ref(body["mask"], "mask") if body.get("mask") is not None else None
    return PreviewJob(method, params, int(resolution), pixel_perfect, target, _image_ref(body["image"], "image"),
                      mask, None)


def read_image(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 (1, H, W, 3) RGB in [0, 1], Load Image's mask (H, W) = 1 - alpha, or None), the image
    shrunk to PREVIEW_SIDE on its long side; oversized or unreadable files are refused."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    try:
        im = Image.open(path)
    except (UnidentifiedImageError, OSError):
        raise RequestError(415, f"{name} is not an image ComfyUI can read (PNG, JPEG, WebP, ...); upload an image "
                                "in the Load Image node") from None
    with im:
        w, h = im.size
        if max(w, h) > MAX_INPUT_SIDE or w * h > MAX_INPUT_PIXELS:
            raise RequestError(413, f"{name} is {w}x{h} pixels; the preview takes images up to {MAX_INPUT_SIDE} px on "
                                    f"a side and {MAX_INPUT_PIXELS // 1_000_000} megapixels; queue the workflow for "
                                    "larger ones")
        try:
            im.draft("RGB", (PREVIEW_SIDE, PREVIEW_SIDE))  # JPEG: decode at a reduced scale, cheaply
            im = ImageOps.exif_transpose(im)  # as Load Image does
            alpha = None
            if "A" in im.getbands():
                alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
            elif im.mode == "P" and "transparency" in im.info:
                alpha = np.asarray(im.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255.0)
        except (OSError, ValueError) as e:
            raise RequestError(415, f"{name} could not be decoded ({e}); upload it again") from None
    size = ppimage.fit_long_side(*rgb.shape[:2], PREVIEW_SIDE)
    image = ppimage.resize(rgb[None], *size)  # never grows: area shrink or the image as it is
    mask = None
    if alpha is not None:
        mask = 1.0 - ppimage.resize(alpha[None, ..., None], *size)[0, ..., 0]
    return image, mask


def _inputs(job: PreviewJob) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
    if job.last_run is not None:
        entry = adapter.last_input(job.last_run)
        if entry is None:
            raise RequestError(404, "this Preprocessor has not run yet: queue the workflow once, or connect a Load "
                                    "Image node to its image input")
        image = ppimage.frame_to_float(entry["image"][None])
        return image, entry["mask"], job.target_hw or entry["target_hw"]
    path = adapter.resolve_image_path(job.image["filename"], job.image["subfolder"], job.image["type"])
    image, alpha = read_image(path)
    mask = None
    if job.mask is not None:
        mask_path = adapter.resolve_image_path(job.mask["filename"], job.mask["subfolder"], job.mask["type"])
        mask = alpha if mask_path == path else read_image(mask_path)[1]  # the same Load Image: read once
        if mask is None:  # Load Image gives an all-zero mask for an image without alpha
            mask = np.zeros(image.shape[1:3], np.float32)
    return image, mask, job.target_hw


def render(job: PreviewJob) -> tuple[bytes, str | None]:
    """(the PNG of the hint, the weights file a network method used or None); on the preview thread."""
    from PIL import Image

    image, mask, target = _inputs(job)
    m = pp.get_method(job.method)
    weights = None
    if m.load_weights is not None:  # found by name as the node finds it; the answer says which file
        adapter.setup_annotators()
        weights = pp.weights_file(m, job.params)
    resolution = job.resolution
    if job.pixel_perfect and not m.native_size:
        if target is None:
            raise RequestError(400, "pixel_perfect needs the size of the image you generate: connect an Empty Latent "
                                    "Image to the preprocessor's latent input (or run the workflow once), or turn "
                                    "pixel_perfect off")
        resolution = ppimage.pixel_perfect_resolution(image.shape[1], image.shape[2], target)
    resolution = min(resolution, MAX_RESOLUTION)
    if m.needs_mask and mask is None:
        raise RequestError(400, f"{job.method} needs a mask: connect the MASK of the same Load Image node to the "
                                "preprocessor's mask input, or run the workflow once")
    hint = pp.run(job.method, image, resolution=resolution, mask=mask, weights_path=weights, **job.params)[0]
    rgb = ppimage.to_uint8(np.clip(hint, 0.0, 1.0))
    rgb[np.all(hint < -0.5, axis=-1)] = SENTINEL_RGB
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), None if weights is None else str(weights)


async def _read_body(request: web.Request) -> bytes:
    too_big = RequestError(413, f"the preview request is larger than {MAX_REQUEST_BYTES // 1024} KiB; send the "
                                "image by reference (file name), not its pixels")
    if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(16384):
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def preview(request: web.Request) -> web.Response:
    try:
        raw = await _read_body(request)
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            raise RequestError(400, "the preview request is not JSON; send a JSON object") from None
        job = parse_preview(body)
        global _waiting
        if _waiting >= MAX_WAITING:
            raise RequestError(429, f"{_waiting} previews are already waiting; the preview of this change comes when "
                                    "they are done (try again in a moment)")
        _waiting += 1
        try:
            loop = asyncio.get_running_loop()
            png, weights = await asyncio.wait_for(loop.run_in_executor(_preview_pool(), render, job),
                                                  PREVIEW_TIMEOUT_S)
        finally:
            _waiting -= 1
    except RequestError as e:
        return _error(e.status, str(e))
    except asyncio.TimeoutError:
        return _error(504, f"the preview took longer than {PREVIEW_TIMEOUT_S:g} s; lower the resolution or queue "
                           "the workflow")
    except FileNotFoundError as e:
        return _error(404, str(e))
    except (pp.PreprocessorError, InputError) as e:
        return _error(400, str(e))
    except Exception as e:  # a bug of ours: say so in the node, keep the server going
        log.exception("CNCore preview failed")
        return _error(500, f"the preview failed ({type(e).__name__}: {e}); queue the workflow to see the hint")
    headers = {"Cache-Control": "no-store"}
    if weights is not None:  # which file a network method used (the node shows it under the preview)
        headers[WEIGHTS_HEADER] = weights.encode("ascii", "backslashreplace").decode("ascii")
    return web.Response(body=png, content_type="image/png", headers=headers)


# ------------------------------------------------------------------------------------------
# model info

async def model_info(request: web.Request) -> web.Response:
    name = request.query.get("name", "")
    try:
        adapter.check_model_name(name)
    except LoadError as e:
        return _error(400, str(e))
    if name not in adapter.controlnet_names():
        # Not downloaded yet: an expected state (ComfyUI's Missing Models dialog names the file), so an
        # answer, not an error status the browser would log as a console error for every such loader.
        return web.json_response({"name": name, "found": False, "supported": False, "label": NOT_FOUND_LABEL})
    try:
        info = await asyncio.get_running_loop().run_in_executor(None, adapter.model_info, name)
    except LoadError as e:
        return _error(422, str(e))
    except OSError as e:
        return _error(422, f"{name}: the file could not be read ({e})")
    return web.json_response({**info, "found": True})


# ------------------------------------------------------------------------------------------
# registration

def routes() -> list[web.RouteDef]:
    return [web.post(f"{PREFIX}/preview", preview), web.get(f"{PREFIX}/model_info", model_info)]


def register() -> bool:
    """Add the routes to ComfyUI's server when ComfyUI is loading the pack; False (and nothing done)
    elsewhere. ComfyUI imports custom nodes before it mounts its route table, so this is in time."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    table = getattr(instance, "routes", None)
    if not isinstance(table, web.RouteTableDef):
        return False
    for r in routes():
        table.route(r.method, r.path)(r.handler)
    return True
