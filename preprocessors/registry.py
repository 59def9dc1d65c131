"""The method registry and `run`, the one entry point the node (and scripts) call.

Parameters
----------
`PARAMS` is the ordered union of every method's parameters. The ComfyUI node makes one widget per
entry, in this order, and passes all of them to `run`; a method reads the ones it lists in
`Method.params` and ignores the rest. The order is part of saved workflows: never reorder or
remove an entry, only append.

Out-of-range values (what an API prompt can send past the widgets) are refused, never clamped: a
number below `min` or above `max`, a NaN, or a value of the wrong kind raises a PreprocessorError
that names the method, the parameter, its range and the value; `resolution` must be 16..16384 (the
node's widget: 64..16384). Canny takes a high threshold below the low one as OpenCV does (swapped).

Working resolution
------------------
Methods that look at structure (edges, lines, cells) work on the image resized so its short side is
`resolution` (area when shrinking, bicubic when growing), and their hint is resized back to the input
size (area / bilinear), so hints look alike whatever the input size. `pixel_perfect=True` with
`target_hw` (the latent size x 8) instead picks the resolution at which the image, scaled to cover
the target (ComfyUI's crop fit), has the target's pixel size. Pixel-wise methods (threshold,
invert, grayscale, inpaint: `Method.native_size`) ignore both and work at the input size, exactly.
Methods that must see the whole picture (`Method.full_frame`: the pose detectors, which find people
and draw on the image at its own size as Aux does) get the frame at the input size and the
working `resolution` as a keyword, and return their hint at any size (it is resized to the input).

Data beside the hint
--------------------
A method with `Method.returns_data` returns `(hint, data)` per frame, `data` a JSON-able dict (the
pose methods: the keypoints in the OpenPose JSON layout, see nets/pose_draw.py). `run(...,
data_out=[])` fills the list with one entry per frame (None for methods without data).

Methods that need weights (network annotators: preprocessors/nets/)
-------------------------------------------------------------------
This package never downloads anything. A method that needs a model sets:

* `Method.load_weights`: `Path -> model`, the network built from that file (it imports torch
  *inside* itself, so importing this package stays numpy-only). A torch `nn.Module` it returns is
  handed to the host (`nets.host`: ComfyUI's model management inside ComfyUI, so the net runs on
  the GPU when there is one and is offloaded like other models; the CPU elsewhere) and reaches `fn`
  as a `nets.Net` (`net.module`, `net.device()` loads it and says where it runs).
* `Method.weights`: the default file(s), so the node needs no path widget: a `Weights(files=(...),
  source=...)` (accepted file names, preferred first, and the public repository they come from), or
  a function `params -> Weights` when the file depends on a parameter (e.g. the model size). `run`
  looks the file up by name with `nets.find_weights` (ComfyUI's models/annotators, Aux's ckpts,
  models/depthanything, subfolders included; see nets/files.py); a missing file is a sentence
  naming the file, its source and the folder to put it in. `weights_path=` overrides the search.
* `Method.weights_doc`: one line for the README / tooltips: which file(s) and where they come from.

The model is built once per file and loader (cached by path, size and mtime: a replaced file is
built anew, the stale one dropped) and shared by every method with the same `load_weights`.
`fn(frame, model=model, **params)` is then called; frames of a network method run one after another
(the network uses the threads / the GPU itself). `weights_file(method, params)` says which file a
method would use (the node and the preview show it). New methods are APPENDED with `register(...)`.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import methods as M
from .errors import PreprocessorError
from .image import (
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    as_image_array,
    frame_to_float,
    pixel_perfect_resolution,
    resize,
    to_mask_batch,
    working_size,
)

KINDS = ("int", "float", "bool", "choice")


@dataclass(frozen=True)
class Weights:
    """The default weights file of a network method: accepted file names (preferred first; the first
    one found anywhere wins) and the public repository they come from (named when none is found)."""

    files: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Param:
    """One method parameter, i.e. one node widget. `kind` is "int", "float", "bool" or "choice"."""

    name: str
    kind: str
    default: Any
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple = ()
    tooltip: str = ""

    def check(self, value, method: str):
        """The value, validated (and an int given as 3.0 made 3); PreprocessorError otherwise."""
        bad = None
        if self.kind == "bool":
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            bad = "true or false"
        elif self.kind == "choice":
            if value in self.choices:
                return value
            bad = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            ok_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
            ok_float = isinstance(value, (float, np.floating)) and np.isfinite(value)
            if self.kind == "int" and ok_float and float(value).is_integer():
                value, ok_float, ok_int = int(value), False, True
            if self.kind == "int" and not ok_int:
                bad = "a whole number"
            elif self.kind == "float" and not (ok_int or ok_float):
                bad = "a number"
            else:
                value = int(value) if self.kind == "int" else float(value)
                if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                    bad = f"between {self.min} and {self.max}"
                else:
                    return value
        raise PreprocessorError(f"{method}: parameter {self.name!r} must be {bad}; got {value!r}")


PARAMS: tuple[Param, ...] = (
    Param("low_threshold", "int", 100, 0, 255, 1,
          tooltip="canny: gradient below this is never an edge (0-255 grey levels)"),
    Param("high_threshold", "int", 200, 0, 255, 1,
          tooltip="canny: gradient above this is always an edge; between the two, only if connected to one"),
    Param("auto_threshold", "bool", False,
          tooltip="canny: ignore the two thresholds and use (0.67, 1.33) x the median grey level"),
    Param("blur", "float", 0.0, 0.0, 32.0, 0.1,
          tooltip="canny, threshold, tile: Gaussian blur sigma in pixels (at the working resolution); 0 = none"),
    Param("threshold", "float", 0.5, 0.0, 1.0, 0.01,
          tooltip="threshold: luma cut (white at or above); scribble: cut on the soft-edge map, or on luma "
                  "for a drawing"),
    Param("sigma", "float", 1.0, 0.3, 16.0, 0.1,
          tooltip="softedge, scribble, lineart (weight-free; the trained networks are softedge_hed, softedge_pidinet, "
                  "softedge_teed, scribble_hed, scribble_pidinet, lineart_realistic, lineart_anime): scale of the "
                  "edges/lines looked for, in pixels"),
    Param("contrast", "float", 0.05, 0.005, 1.0, 0.005,
          tooltip="lineart (weight-free; lineart_realistic / lineart_coarse / lineart_anime run the trained "
                  "networks): how much darker than its surroundings (0-1) a line must be; full white at 2x"),
    Param("thickness", "int", 3, 1, 64, 1,
          tooltip="scribble (weight-free; scribble_hed / scribble_pidinet run the trained networks): stroke "
                  "width in pixels (from an image)"),
    Param("drawn", "bool", False,
          tooltip="scribble: the input is a user drawing; only binarise it (inverted if dark strokes on white)"),
    Param("min_length", "float", 0.03, 0.0, 1.0, 0.005,
          tooltip="lines (weight-free; mlsd runs the M-LSD network): shortest segment kept, as a fraction of "
                  "the short side"),
    Param("detector", "choice", "auto", choices=("auto", "lsd", "hough"),
          tooltip="lines: OpenCV's LSD (auto when this OpenCV has it) or probabilistic Hough on Canny edges"),
    Param("downsample", "float", 2.0, 1.0, 64.0, 0.1,
          tooltip="tile: shrink by this factor, then scale back up (bicubic); 1 = no shrink"),
    Param("grid", "int", 8, 1, 512, 1,
          tooltip="color_grid, shuffle: number of cells along the short side"),
    Param("seed", "int", 0, 0, 2**32 - 1, 1, tooltip="shuffle: random seed (same seed, same shuffle)"),
    Param("depth_model", "choice", "v2_vitl",
          choices=("v2_vitl", "v2_vitb", "v2_vits", "v2_vitg", "v1_vitl", "v1_vitb", "v1_vits"),
          tooltip="depth_anything_v2: which Depth Anything file: v2_vitl = depth_anything_v2_vitl.pth (Large, "
                  "best, 1.3 GB), v2_vitb (Base, 390 MB), v2_vits (Small, 99 MB), v2_vitg (Giant); v1_* = "
                  "Depth Anything V1 (depth_anything_vitl14.pth ...). ComfyUI-DepthAnythingV2's .safetensors "
                  "work too"),
    Param("score_threshold", "float", 0.1, 0.01, 2.0, 0.01,
          tooltip="mlsd: a line's centre must score above this (0-1; lower finds more, fainter lines)"),
    Param("dist_threshold", "float", 0.1, 0.01, 20.0, 0.01,
          tooltip="mlsd: shortest segment kept, in pixels at half the working resolution"),
    # the edge / line-art networks (registry_edge_nets.py)
    Param("safe", "bool", True,
          tooltip="softedge_hed, softedge_pidinet and their scribbles: quantise the soft edges to 2 levels "
                  "(\"safe\" mode: drops faint texture); Aux's default"),
    Param("safe_steps", "int", 2, 0, 10, 1,
          tooltip="softedge_teed: quantise the soft edges to this many levels; 0 = off (Aux's default 2)"),
    # pose (issue 22): Aux's DWPose/OpenPose widget names, as on/off toggles
    Param("detect_body", "bool", True, tooltip="dwpose, openpose: draw (and output) the body sticks and joints"),
    Param("detect_hand", "bool", True, tooltip="dwpose, openpose: draw (and output) the hand keypoints"),
    Param("detect_face", "bool", True, tooltip="dwpose, openpose: draw (and output) the face keypoints"),
    Param("scale_stick_for_xinsr_cn", "bool", False,
          tooltip="dwpose, openpose: thicker limbs on big images, for xinsir's SDXL openpose ControlNet (trained so)"),
)
_PARAM_BY_NAME = {p.name: p for p in PARAMS}


@dataclass(frozen=True)
class Method:
    """A registered hint maker.

    fn: per frame `fn(frame (h, w, 3) float32 in [0, 1], **params) -> (h, w) or (h, w, 3) float32`,
        or with `batched=True` the same on a whole (N, h, w, 3) batch. Inpaint-style methods
        (`needs_mask`) also get `mask=` (N, h, w) float32 (batched) or (h, w) (per frame).
    params: the names (from PARAMS) passed to fn as keywords.
    feeds: the public ControlNet(s) the hint is for.
    native_size: works at the input size (pixel-wise); `resolution` / `pixel_perfect` are ignored.
    full_frame: fn gets the frame at the input size plus `resolution=`; returns a hint of any size.
    returns_data: fn returns (hint, data dict); see the module docstring.
    load_weights / weights_doc / weights: see the module docstring; None for methods without weights.
    """

    name: str
    fn: Callable[..., np.ndarray]
    params: tuple[str, ...]
    feeds: str
    needs_mask: bool = False
    doc: str = ""
    native_size: bool = False
    batched: bool = False
    full_frame: bool = False
    returns_data: bool = False
    load_weights: Callable[[Path], Any] | None = None
    weights_doc: str = ""
    weights: "Weights | Callable[[dict[str, Any]], Weights] | None" = None

    def __post_init__(self):
        unknown = [p for p in self.params if p not in _PARAM_BY_NAME]
        if unknown:
            raise PreprocessorError(
                f"method {self.name!r} uses parameters {unknown} that are not in PARAMS; append them to PARAMS"
            )


METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry (at the end of `list_methods()`)."""
    if method.name in METHODS and not replace:
        raise PreprocessorError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def list_methods() -> list[str]:
    """Method names in a stable order, canny first."""
    return list(METHODS)


def method_inputs(name: str) -> tuple[str, ...]:
    """The `run` arguments (node widgets) the method reads: `resolution` and `pixel_perfect` unless it
    works at the input size, then its own parameters. The front end shows only these widgets."""
    m = get_method(name)
    return (() if m.native_size else ("resolution", "pixel_perfect")) + m.params


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise PreprocessorError(
            f"unknown preprocessor {name!r}; available: {', '.join(METHODS)}"
        ) from None


_weights_cache: dict[tuple, Any] = {}
_weights_lock = threading.Lock()


def _weights_spec(method: Method, params: dict[str, Any]) -> Weights | None:
    spec = method.weights
    return spec(params) if callable(spec) else spec


def weights_file(method: str | Method, params: dict[str, Any] | None = None, weights_path=None) -> Path | None:
    """The weights file `run` would use for this method and these parameters: `weights_path` when
    given, else the method's default file found by name; None for a method without weights.
    A missing file raises the PreprocessorError `run` would raise."""
    m = method if isinstance(method, Method) else get_method(method)
    if m.load_weights is None:
        return None
    if weights_path is not None and str(weights_path) != "":
        return Path(os.fspath(weights_path)).expanduser()
    kw = {name: _PARAM_BY_NAME[name].check(params[name], m.name) if params and name in params
          else _PARAM_BY_NAME[name].default for name in m.params}
    spec = _weights_spec(m, kw)
    if spec is None:
        raise PreprocessorError(
            f"{m.name} needs a weights file that you provide (nothing is downloaded): "
            f"{m.weights_doc or 'see the method documentation'}; pass its path as weights_path"
        )
    from .nets.files import find_weights

    return find_weights(spec.files, source=spec.source)


def _model_for(method: Method, weights_path) -> Any:
    if weights_path is None or str(weights_path) == "":
        raise PreprocessorError(
            f"{method.name} needs a weights file that you provide (nothing is downloaded): "
            f"{method.weights_doc or 'see the method documentation'}; pass its path as weights_path"
        )
    path = Path(os.fspath(weights_path)).expanduser()
    if not path.is_file():
        raise PreprocessorError(
            f"{method.name}: weights file {str(path)!r} does not exist; {method.weights_doc}"
        )
    st = path.stat()
    # Keyed by the loader, not the method: methods reading the same file with the same loader (a
    # net and its "scribble" variant) share one network.
    key = (method.load_weights, str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _weights_lock:  # the node and the preview thread may ask at once: build once
        if key not in _weights_cache:
            for k in [k for k in _weights_cache if k[:2] == key[:2]]:
                del _weights_cache[k]  # the file changed: drop the stale model
            model = method.load_weights(path)
            if "torch" in sys.modules:  # a torch network goes to the host (device, offloading)
                from .nets.host import adopt

                model = adopt(model, f"{method.name} ({path.name})")
            _weights_cache[key] = model
        return _weights_cache[key]


def clear_models() -> None:
    """Forget every cached network (they are rebuilt from their files when next used)."""
    with _weights_lock:
        _weights_cache.clear()


def _as_rgb(out: np.ndarray, shape: tuple, name: str) -> np.ndarray:
    out = np.asarray(out, dtype=np.float32)
    if out.shape == shape[:-1]:
        out = np.repeat(out[..., None], 3, axis=-1)
    if out.shape != shape:
        raise PreprocessorError(f"method {name!r} returned shape {out.shape}, expected {shape}")
    return out


def run(
    method: str,
    images,
    *,
    resolution: int = 512,
    pixel_perfect: bool = False,
    target_hw: tuple[int, int] | None = None,
    mask=None,
    weights_path=None,
    progress: Callable[[int, int], None] | None = None,
    data_out: list | None = None,
    **params,
) -> np.ndarray:
    """Make hints: float32 (N, H, W, 3) in [0, 1] at the input size (always 4-D; N = 1 for one image).

    images: (N, H, W, C) or (H, W, C) (or (H, W) grey); uint8, uint16, bool or float in [0, 1];
    C = 1, 3 or 4 (alpha dropped). mask: for methods with needs_mask, (H, W) / (N or 1, H, W)
    [/ (.., 1)], >= 0.5 = masked. The inpaint hint holds exactly -1.0 at masked pixels.
    Every frame is processed alone, so a batch gives the same hints as one call per frame.
    progress: called as `progress(frames_done, frames)` in the calling thread after each frame; an
    exception it raises (e.g. the host's "interrupted") stops the batch: frames not started are dropped.
    data_out: a list to receive one data entry per frame (see the module docstring).
    """
    m = get_method(method)
    unknown = sorted(k for k in params if k not in _PARAM_BY_NAME)
    if unknown:
        raise PreprocessorError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for preprocessors; known: "
            f"{', '.join(p.name for p in PARAMS)}"
        )
    kw = {}
    for name in m.params:
        p = _PARAM_BY_NAME[name]
        kw[name] = p.check(params[name], m.name) if name in params else p.default

    raw = as_image_array(images)
    n, h, w, _ = raw.shape
    if m.needs_mask:
        kw["mask"] = to_mask_batch(mask, n, h, w)
    if m.load_weights is not None:
        kw["model"] = _model_for(m, weights_file(m, kw, weights_path))

    if m.native_size:
        wh, ww = h, w
    else:
        if pixel_perfect:
            if target_hw is None:
                raise PreprocessorError(
                    "pixel_perfect needs target_hw, the (height, width) the hint will be used at (latent x 8); "
                    "pass it or turn pixel_perfect off"
                )
            resolution = pixel_perfect_resolution(h, w, target_hw)
        if isinstance(resolution, (bool, np.bool_)) or not isinstance(resolution, (int, np.integer, float)):
            raise PreprocessorError(f"resolution must be a whole number of pixels; got {resolution!r}")
        resolution = int(round(resolution))
        if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            raise PreprocessorError(
                f"resolution {resolution} is out of range; use {MIN_RESOLUTION} to {MAX_RESOLUTION} pixels "
                "(the short side the method works at)"
            )
        wh, ww = working_size(h, w, resolution)

    out = [None] * n
    data: list = [None] * n

    def one(i: int) -> None:
        # The whole chain per frame: the working set stays in cache, and frames run in parallel
        # (OpenCV and large numpy operations release the GIL). Frames never interact, so the
        # result does not depend on the batch or the thread that made it.
        frame = frame_to_float(raw[i : i + 1])
        work = frame if m.full_frame else resize(frame, wh, ww)
        frame_kw = dict(kw)
        if m.needs_mask:
            frame_kw["mask"] = kw["mask"][i : i + 1] if m.batched else kw["mask"][i]
        if m.full_frame:
            frame_kw["resolution"] = resolution
        r = m.fn(work, **frame_kw) if m.batched else m.fn(work[0], **frame_kw)
        if m.returns_data:
            r, data[i] = r
        if not m.batched:
            r = np.asarray(r)[None]
        shape = work.shape
        if m.full_frame:  # any size: only the channels are checked
            shape = tuple(np.shape(r)[:3]) + (3,)
        out[i] = resize(_as_rgb(r, shape, m.name), h, w, grow="linear")

    report = progress or (lambda done, total: None)
    workers = 1 if m.load_weights is not None else min(n, _threads())
    if workers <= 1:
        for i in range(n):
            one(i)
            report(i + 1, n)
    else:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="preprocessors")
        try:
            for done, _ in enumerate(pool.map(one, range(n)), 1):  # re-raises the first error
                report(done, n)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if data_out is not None:
        data_out.extend(data)
    return np.ascontiguousarray(out[0]) if n == 1 else np.concatenate(out)


def _threads() -> int:
    """Frames processed at once: PREPROCESSOR_THREADS, else the usable CPU cores (at most 8)."""
    env = os.environ.get("PREPROCESSOR_THREADS", "")
    if env.strip().isdigit() and int(env) >= 1:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _builtin(name, fn, params, feeds, doc, **extra):
    register(Method(name=name, fn=fn, params=tuple(params), feeds=feeds, doc=doc, **extra))


_builtin(
    "canny", M.canny_method, ("low_threshold", "high_threshold", "blur", "auto_threshold"),
    "control_v11p_sd15_canny, control_sd15_canny, diffusers/controlnet-canny-sdxl-1.0, t2iadapter_canny",
    "Canny edges, white on black: OpenCV grey, optional Gaussian pre-blur, cv2.Canny(low, high); "
    "auto_threshold uses (0.67, 1.33) x the median grey level.",
)
_builtin(
    "softedge", M.softedge_method, ("sigma",),
    "control_v11p_sd15_softedge, control_sd15_hed (HED/PiDiNet-style soft edges)",
    "Multi-scale gradient magnitude (sigma x 1, 2, 4, scale-normalised), the strongest edge white.",
)
_builtin(
    "scribble", M.scribble_method, ("sigma", "threshold", "thickness", "drawn"),
    "control_v11p_sd15_scribble, control_sd15_scribble, t2iadapter_sketch",
    "Thick binary white strokes: soft edges >= threshold, dilated to `thickness`. With drawn=True the "
    "input is a user drawing: only binarised at `threshold`, and inverted when it is dark strokes on white.",
)
_builtin(
    "lineart", M.lineart_method, ("sigma", "contrast"),
    "control_v11p_sd15_lineart, control_v11p_sd15s2_lineart_anime",
    "Dark lines of the image as white lines on black: black top-hat (closing minus image, disk of about "
    "6 sigma px) after a sigma/2 blur; black below `contrast` darkness, white from 2 x contrast.",
)
_builtin(
    "threshold", M.threshold_method, ("threshold", "blur"), "any (utility): binary masks / hints",
    "White where the BT.601 luma (after an optional blur) is >= threshold, black elsewhere.",
    native_size=True, batched=True,
)
_builtin(
    "invert", M.invert_method, (), "any (utility): e.g. black-on-white line art to white-on-black",
    "1 - x on every RGB channel.", native_size=True, batched=True,
)
_builtin(
    "grayscale", M.grayscale_method, (), "any (utility)",
    "ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B on all three channels.", native_size=True, batched=True,
)
_builtin(
    "tile", M.tile_method, ("downsample", "blur"), "control_v11f1e_sd15_tile, SDXL tile ControlNets",
    "The image shrunk by `downsample` (area) and scaled back (bicubic), optionally blurred.",
)
_builtin(
    "color_grid", M.color_grid_method, ("grid",), "t2iadapter_color_sd14v1 (T2I colour adapter)",
    "Coarse colour map: the mean colour of each of `grid` cells along the short side, as flat blocks.",
)
_builtin(
    "shuffle", M.shuffle_method, ("grid", "seed"), "control_v11e_sd15_shuffle",
    "Content shuffle: square cells permuted, rotated and mirrored at random from `seed` (a permutation of "
    "the pixels; the same seed gives the same shuffle for every frame).",
)
_builtin(
    "inpaint", M.inpaint_method, (), "control_v11p_sd15_inpaint",
    "The image with masked pixels (mask >= 0.5) set to exactly -1.0, the sentinel the inpaint ControlNet "
    "was trained with; it passes the hint pipeline unclipped.",
    needs_mask=True, native_size=True, batched=True,
)
_builtin(
    "lines", M.lines_method, ("min_length", "detector"), "control_v11p_sd15_mlsd, control_sd15_mlsd",
    "Straight line segments (OpenCV LSD, else probabilistic Hough on Canny edges) longer than "
    "min_length x short side, drawn 1 px (per 512 px) white on black; no M-LSD weights needed (`mlsd` runs the "
    "M-LSD network itself).",
)


# ------------------------------------------------------------------------------------------
# network annotators (preprocessors/nets/): torch is imported when one first runs, not here.
# Appended after the weight-free methods, in the order they were added (saved workflows store the
# method by name, the list order is what the node's menu shows).

@functools.lru_cache(maxsize=None)
def _net(module: str, attr: str) -> Callable[..., Any]:
    """`preprocessors.nets.<module>.<attr>`, imported on first call (keeps this module torch-free).
    One function per name: methods loading with `_net(m, "load")` share the cached network."""
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"{__package__}.nets.{module}"), attr)(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{module}.{attr}"
    return call


def _depth_anything_weights(params: dict[str, Any]) -> Weights:
    from .nets import depth_anything as da

    model = params["depth_model"]
    return Weights(da.MODELS[model], da.source_of(model))


register(Method(
    name="depth_anything_v2",
    fn=_net("depth_anything", "depth_map"),
    params=("depth_model",),
    feeds="control_v11f1p_sd15_depth, control_sd15_depth, SDXL / Flux depth ControlNets, union (depth)",
    doc="Depth Anything V2 (or V1) relative depth, nearer brighter, as comfyui_controlnet_aux's "
        "DepthAnythingV2Preprocessor: the network sees the image at short side 518 whatever `resolution` "
        "(so the method works at the input size), min-max scaled to 0..255.",
    native_size=True,
    load_weights=_net("depth_anything", "load"),
    weights=_depth_anything_weights,
    weights_doc="depth_anything_v2_vit{l,b,s,g}.pth from huggingface.co/depth-anything/Depth-Anything-V2-{Large,Base,"
                "Small,Giant} (or depth_anything_v2_vit?_fp32/fp16.safetensors from Kijai/DepthAnythingV2-safetensors; "
                "V1: depth_anything_vit?14.pth from LiheYoung/Depth-Anything)",
))


register(Method(
    name="mlsd",
    fn=_net("mlsd", "lines_map"),
    params=("score_threshold", "dist_threshold"),
    feeds="control_v11p_sd15_mlsd, control_sd15_mlsd",
    doc="M-LSD straight line segments, 1 px white on black, as comfyui_controlnet_aux's M-LSDPreprocessor (the "
        "image at `resolution`, padded to a multiple of 64). The weight-free `lines` needs no file.",
    load_weights=_net("mlsd", "load"),
    weights=Weights(("mlsd_large_512_fp32.pth",), "https://huggingface.co/lllyasviel/Annotators"),
    weights_doc="mlsd_large_512_fp32.pth from huggingface.co/lllyasviel/Annotators",
))

register(Method(
    name="normal_bae",
    fn=_net("normal_bae", "normal_map"),
    params=(),
    feeds="control_v11p_sd15_normalbae, union (normal)",
    doc="NormalBAE surface normals (RGB = x, y, z mapped from [-1, 1]) as comfyui_controlnet_aux's "
        "BAE-NormalMapPreprocessor (the image at `resolution`, padded to a multiple of 64).",
    load_weights=_net("normal_bae", "load"),
    weights=Weights(("scannet.pt",), "https://huggingface.co/lllyasviel/Annotators"),
    weights_doc="scannet.pt from huggingface.co/lllyasviel/Annotators",
))


from . import registry_edge_nets  # noqa: E402,F401  (HED, PiDiNet, lineart, anime, TEED/AnyLine)

# ------------------------------------------------------------------------------------------
# pose (issue 22): preprocessors/nets/dwpose.py (and openpose.py), drawing/JSON in nets/pose_draw.py

_builtin(
    "dwpose", _net("dwpose", "method"), ("detect_body", "detect_hand", "detect_face", "scale_stick_for_xinsr_cn"),
    "control_v11p_sd15_openpose, control_sd15_openpose, t2iadapter_openpose, SDXL openpose ControlNets "
    "(xinsir: scale_stick_for_xinsr_cn), ControlNet Union's openpose type",
    "DWPose whole-body pose (YOLOX-L person boxes + RTMPose-L, 133 keypoints) drawn as OpenPose sticks, hands "
    "and face dots on black, exactly as Aux's DWPose preprocessor draws them; runs on our torch code (no "
    "onnxruntime). The keypoints also come out as data (OpenPose JSON).",
    full_frame=True, returns_data=True, load_weights=_net("dwpose", "load"),
    weights=Weights(("dw-ll_ucoco_384.onnx", "dw-ll_ucoco_384_bs5.torchscript.pt"),
                    "https://huggingface.co/yzd-v/DWPose (the .torchscript.pt: hr16/DWPose-TorchScript-BatchSize5)"),
    weights_doc="dw-ll_ucoco_384.onnx (or Aux's dw-ll_ucoco_384_bs5.torchscript.pt) and yolox_l.onnx from "
                "https://huggingface.co/yzd-v/DWPose (one folder)",
)

_builtin(
    "openpose", _net("openpose", "method"), ("detect_body", "detect_hand", "detect_face", "scale_stick_for_xinsr_cn"),
    "control_v11p_sd15_openpose, control_sd15_openpose, t2iadapter_openpose, SDXL openpose ControlNets",
    "OpenPose body (CMU's 18-keypoint PAF network), hands and face as Aux's OpenPose preprocessor: "
    "detected and drawn at `resolution`, on black.",
    full_frame=True, returns_data=True, load_weights=_net("openpose", "load"),
    weights=Weights(("body_pose_model.pth",), "https://huggingface.co/lllyasviel/Annotators"),
    weights_doc="body_pose_model.pth (+ hand_pose_model.pth, facenet.pth for hands and face) from "
                "https://huggingface.co/lllyasviel/Annotators",
)
