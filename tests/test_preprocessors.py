"""Preprocessors against independent references: cv2/numpy formulas, geometry, permutations.

No test compares a method with a stored copy of its own output.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from comfyui_controlnet_core import preprocessors as P
from comfyui_controlnet_core.preprocessors import PreprocessorError, run
from comfyui_controlnet_core.preprocessors.image import fit_long_side, working_size

PKG = Path(P.__file__).resolve().parent
RNG = np.random.default_rng(1234)


def photo(h=64, w=80, n=None, seed=0) -> np.ndarray:
    """A uint8 RGB test picture: smooth colour gradients, a filled disk, a bar, and some noise."""
    rng = np.random.default_rng(seed)
    shape = (h, w) if n is None else (n, h, w)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, 0.5 + 0.3 * np.sin(x / 7.0)], -1) * 170 + 40
    img = np.broadcast_to(base, shape + (3,)).copy()
    img[..., (y - h / 2) ** 2 + (x - w / 3) ** 2 < (min(h, w) / 4) ** 2, :] = (230, 40, 30)
    img[..., h // 5 : h // 5 + 3, w // 2 :, :] = 10
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def luma601(rgb01: np.ndarray) -> np.ndarray:
    return 0.299 * rgb01[..., 0] + 0.587 * rgb01[..., 1] + 0.114 * rgb01[..., 2]


def native(img) -> int:
    """The resolution that makes the working size the input size (no resampling)."""
    return min(img.shape[-3], img.shape[-2])


def all_kwargs(method: str, img: np.ndarray) -> dict:
    kw = {"resolution": native(img)}
    if P.get_method(method).needs_mask:
        m = np.zeros(img.shape[-3:-1], np.float32)
        m[10:30, 20:50] = 1.0
        kw["mask"] = m
    return kw


# ----------------------------------------------------------------------------------- interface
def test_registry_shape_and_order():
    names = P.list_methods()
    assert names[0] == "canny"
    for required in ("canny", "softedge", "scribble", "lineart", "threshold", "invert", "grayscale", "tile",
                     "color_grid", "shuffle", "inpaint", "lines"):
        assert required in names
    param_names = [p.name for p in P.PARAMS]
    assert len(param_names) == len(set(param_names))
    assert param_names[:4] == ["low_threshold", "high_threshold", "auto_threshold", "blur"]  # never reorder
    for name in names:
        m = P.get_method(name)
        assert m.feeds and m.doc
        assert set(m.params) <= set(param_names)
    for p in P.PARAMS:
        assert p.kind in ("int", "float", "bool", "choice") and p.tooltip
        if p.kind in ("int", "float"):
            assert p.min <= p.default <= p.max
        if p.kind == "choice":
            assert p.default in p.choices


def test_no_torch_anywhere_in_preprocessors():
    # torch lives only in nets/ (the network annotators), imported when a network method first runs
    for f in PKG.rglob("*.py"):
        if "nets" in f.relative_to(PKG).parts:
            continue
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            assert not any(m.split(".")[0] == "torch" for m in mods), f"{f.name} imports torch"


def test_import_is_cheap_and_torch_free_in_a_fresh_process():
    # Loaded on its own (not through the pack's __init__, which other layers own): importing must not
    # pull in torch or OpenCV; running every method must not pull in torch.
    code = textwrap.dedent(f"""
        import importlib.util, sys
        import numpy as np
        spec = importlib.util.spec_from_file_location(
            "pp", {str(PKG / '__init__.py')!r}, submodule_search_locations=[{str(PKG)!r}])
        P = importlib.util.module_from_spec(spec); sys.modules["pp"] = P; spec.loader.exec_module(P)
        assert "cv2" not in sys.modules and "torch" not in sys.modules, sorted(sys.modules)
        img = np.zeros((16, 16, 3), np.uint8); m = np.ones((16, 16))
        for name in P.list_methods():
            if P.get_method(name).load_weights is None:  # the network methods need torch and a file
                P.run(name, img, resolution=64, mask=m)
        assert "torch" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("name", ["canny", "softedge", "scribble", "lineart", "threshold", "invert", "grayscale",
                                  "tile", "color_grid", "shuffle", "inpaint", "lines"])
def test_output_contract_and_batch_equals_single_calls(name):
    frames = photo(48, 72, n=3)
    kw = all_kwargs(name, frames[0])
    kw["resolution"] = 64  # resampled both ways, to cover that path too
    out = run(name, frames, **kw)
    assert out.dtype == np.float32 and out.shape == (3, 48, 72, 3)
    lo = -1.0 if name == "inpaint" else 0.0
    assert np.isfinite(out).all() and out.min() >= lo and out.max() <= 1.0
    for i in range(3):
        single = run(name, frames[i], **kw)
        assert single.shape == (1, 48, 72, 3)
        np.testing.assert_array_equal(out[i], single[0])
    np.testing.assert_array_equal(out, run(name, frames, **kw))  # deterministic


def test_all_node_params_are_accepted_and_unused_ones_ignored():
    everything = {p.name: p.default for p in P.PARAMS}
    img = photo()
    a = run("invert", img, **everything)
    b = run("invert", img)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------- canny
@pytest.mark.parametrize("low, high, blur", [(100, 200, 0.0), (30, 90, 1.5), (50, 60, 3.0)])
def test_canny_equals_cv2_canny_on_the_same_blurred_input(low, high, blur):
    img = photo(96, 128)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if blur:
        gray = cv2.GaussianBlur(gray, (0, 0), blur)
    ref = cv2.Canny(gray, low, high)
    assert ref.any()
    # the public function
    out = P.canny(img, low, high, blur)
    assert out.dtype == np.uint8 and out.shape == (96, 128, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], ref)
    # the registry method at native resolution: the same pixels, as 0/1 floats
    hint = run("canny", img, resolution=96, low_threshold=low, high_threshold=high, blur=blur)
    np.testing.assert_array_equal(hint[0], np.repeat(ref[..., None], 3, -1) / np.float32(255))


def test_canny_auto_thresholds_on_a_crafted_image():
    """Grey 100 on 64 of 96 columns, a band of 132 and a band of 135 on 16 columns each: the median is
    100, so the automatic thresholds are (1 - 0.33) x 100 = 67 and (1 + 0.33) x 100 = 133. OpenCV's
    Canny (3x3 Sobel, L1 gradient) sees 4 x 32 = 128 across the 100|132 steps (below 133, and connected
    to nothing stronger: no edge) and 4 x 35 = 140 across the 100|135 step (an edge)."""
    img = np.full((96, 96, 3), 100, np.uint8)
    img[:, 48:64] = 132
    img[:, 80:96] = 135
    hint = run("canny", img, resolution=96, auto_threshold=True, low_threshold=0, high_threshold=1)[0, ..., 0]
    cols = np.flatnonzero(hint.any(axis=0))
    assert set(cols) <= {79, 80} and len(cols) > 0  # the 100|135 step only
    assert not hint[:, 40:72].any()  # nothing at the 100|132 steps
    gray = img[..., 0]
    np.testing.assert_array_equal(hint, cv2.Canny(gray, 67.0, 133.0) / np.float32(255))
    # thresholds a little lower would take the 128 steps too: the test can tell them apart
    assert cv2.Canny(gray, 60.0, 125.0)[:, 40:72].any()


# ------------------------------------------------------------------------ pixel-wise utilities
def test_grayscale_is_bt601_luma():
    img = photo()
    out = run("grayscale", img)
    ref = luma601(img.astype(np.float64) / 255)
    for c in range(3):
        np.testing.assert_allclose(out[0, ..., c], ref, atol=1e-6)


def test_invert_is_one_minus_x_for_float_input():
    img = RNG.random((2, 20, 30, 3)).astype(np.float32)
    np.testing.assert_allclose(run("invert", img), 1.0 - img, atol=1e-7)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.81])
def test_threshold_matches_numpy(t):
    img = photo()
    out = run("threshold", img, threshold=t)
    ref = (luma601(img.astype(np.float64) / 255) >= t).astype(np.float32)
    # only pixels within float rounding of the cut may differ
    near = np.abs(luma601(img.astype(np.float64) / 255) - t) < 1e-6
    assert np.array_equal(out[0, ..., 0][~near], ref[~near])
    assert set(np.unique(out)) <= {0.0, 1.0}


def test_threshold_with_blur_matches_a_blurred_reference():
    img = photo()
    y = luma601(img.astype(np.float32) / 255).astype(np.float32)
    ref = cv2.GaussianBlur(y, (0, 0), 2.0) >= 0.5
    out = run("threshold", img, threshold=0.5, blur=2.0)[0, ..., 0]
    assert (out.astype(bool) != ref).mean() < 1e-3  # float luma rounding at the cut only


def test_inpaint_sentinel_exactly_where_the_mask_is():
    img = RNG.random((2, 40, 50, 3)).astype(np.float32)
    mask = RNG.random((2, 40, 50)).astype(np.float32)
    out = run("inpaint", img, mask=mask)
    where = mask >= 0.5
    assert np.all(out[where] == -1.0)
    np.testing.assert_array_equal(out[~where], img[~where])
    # one mask for the batch, bool or uint8, with a trailing channel axis
    m1 = np.zeros((40, 50), bool)
    m1[5:9, 7:20] = True
    for m in (m1, m1.astype(np.uint8) * 255, m1[None, ..., None].astype(np.float32)):
        o = run("inpaint", img, mask=m)
        assert np.array_equal(o[:, m1], np.full((2, m1.sum(), 3), -1.0, np.float32))
        assert (o[:, ~m1] >= 0).all()


def test_inpaint_without_a_mask_is_a_clear_error():
    with pytest.raises(PreprocessorError, match="needs a mask"):
        run("inpaint", photo())
    with pytest.raises(PreprocessorError, match="3 frames but the image has 2"):
        run("inpaint", photo(n=2), mask=np.zeros((3, 64, 80)))


# ------------------------------------------------------------------------------- tile, colours
def test_color_grid_is_the_block_mean():
    img = RNG.random((64, 96, 3)).astype(np.float32)
    out = run("color_grid", img, resolution=64, grid=4)[0]  # 16 px cells, 4 x 6 of them
    blocks = img.reshape(4, 16, 6, 16, 3).mean(axis=(1, 3))
    ref = np.repeat(np.repeat(blocks, 16, 0), 16, 1)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_tile_keeps_smooth_images_and_flattens_fine_detail():
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    smooth = np.stack([x / 63, y / 63, 0.5 + 0.2 * np.sin(x / 10)], -1)
    out = run("tile", smooth, resolution=64, downsample=2.0)[0]
    assert np.abs(out - smooth)[4:-4, 4:-4].max() < 0.01
    checker = np.broadcast_to((((x + y) % 2) * 0.8 + 0.1)[..., None], (64, 64, 3)).astype(np.float32)
    out = run("tile", checker, resolution=64, downsample=2.0)[0]
    np.testing.assert_allclose(out, np.full_like(out, checker.mean()), atol=1e-5)
    const = np.full((40, 60, 3), 0.3, np.float32)
    np.testing.assert_allclose(run("tile", const, downsample=3.0, blur=2.0)[0], const, atol=1e-5)


def _rows_sorted(a):
    flat = a.reshape(-1, a.shape[-1])
    return flat[np.lexsort(flat.T[::-1])]


@pytest.mark.parametrize("h, w, grid", [(64, 64, 8), (70, 101, 5), (48, 80, 48)])
def test_shuffle_is_a_seeded_permutation(h, w, grid):
    img = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a = run("shuffle", img, resolution=min(h, w), grid=grid, seed=7)[0]
    b = run("shuffle", img, resolution=min(h, w), grid=grid, seed=7)[0]
    c = run("shuffle", img, resolution=min(h, w), grid=grid, seed=8)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, img / np.float32(255))
    # the same multiset of pixels (hence the same histogram in every channel)
    np.testing.assert_array_equal(_rows_sorted(a), _rows_sorted(img.astype(np.float32) / np.float32(255)))
    for ch in range(3):
        np.testing.assert_array_equal(np.bincount(np.rint(a[..., ch] * 255).astype(int).ravel(), minlength=256),
                                      np.bincount(img[..., ch].ravel(), minlength=256))


# ------------------------------------------------------------------------------ edges and lines
def step_image(h=48, w=64, col=32):
    img = np.zeros((h, w, 3), np.float32)
    img[:, col:] = 1.0
    return img


def test_softedge_peaks_on_the_edge_and_is_smooth_and_contrast_free():
    img = step_image()
    out = run("softedge", img, resolution=48, sigma=1.0)[0, ..., 0]
    assert np.all(out == out[0])  # a vertical step: every row the same
    prof = out[0]
    assert set(np.argsort(prof)[-2:]) == {31, 32} and prof.max() == 1.0
    assert np.all(np.diff(prof[20:32]) >= 0) and np.all(np.diff(prof[32:45]) <= 0)  # smooth, unimodal
    assert prof[:10].max() < 1e-3 and prof[-10:].max() < 1e-3
    # half the contrast, same (normalised) map; a flat image, nothing
    half = run("softedge", img * 0.5 + 0.25, resolution=48, sigma=1.0)[0, ..., 0]
    np.testing.assert_allclose(half, out, atol=1e-5)
    assert run("softedge", np.full((32, 32, 3), 0.7, np.float32), resolution=64)[0].max() < 1e-4  # bicubic ripple


def test_lineart_finds_dark_lines_only():
    y, x = np.mgrid[0:64, 0:96].astype(np.float32)
    bg = 0.6 + 0.2 * x / 95  # a gentle gradient is no line
    img = np.repeat(bg[..., None], 3, -1)
    img[30:32, 10:86] = 0.1  # a dark horizontal line
    out = run("lineart", img, resolution=64, sigma=1.0, contrast=0.05)[0, ..., 0]
    assert out[30:32, 15:80].min() == 1.0
    far = np.ones_like(out, bool)
    far[26:36, 6:90] = False
    assert out[far].max() == 0.0
    bright = np.repeat(bg[..., None], 3, -1)
    bright[30:32, 10:86] = 1.0  # a bright line is not a drawn line
    assert run("lineart", bright, resolution=64)[0].max() == 0.0


def test_scribble_from_an_image_is_thick_binary_strokes_on_the_contour():
    y, x = np.mgrid[0:96, 0:96].astype(np.float32)
    r = np.hypot(y - 48, x - 48)
    img = np.repeat((r < 25).astype(np.float32)[..., None], 3, -1)
    out = run("scribble", img, resolution=96, thickness=5)[0, ..., 0]
    assert set(np.unique(out)) == {0.0, 1.0}
    on = out > 0
    assert np.all(np.abs(r[on] - 25) < 7)  # only near the circle
    angles = np.arctan2(y[on] - 48, x[on] - 48)
    assert np.histogram(angles, bins=12, range=(-np.pi, np.pi))[0].min() > 0  # all the way round
    thin = run("scribble", img, resolution=96, thickness=1)[0, ..., 0]
    assert thin.sum() < out.sum()


def test_scribble_drawn_pass_through_inverts_black_on_white():
    drawing = np.ones((64, 64), np.float32)
    drawing[20:23, 5:60] = 0.0  # black pen on white paper
    drawing[5:60, 40:42] = 0.2
    out = run("scribble", drawing[..., None], resolution=64, drawn=True, threshold=0.5)[0, ..., 0]
    np.testing.assert_array_equal(out, (drawing < 0.5).astype(np.float32))
    white_on_black = 1.0 - drawing
    out = run("scribble", white_on_black[..., None], resolution=64, drawn=True, threshold=0.5)[0, ..., 0]
    np.testing.assert_array_equal(out, (white_on_black >= 0.5).astype(np.float32))


@pytest.mark.parametrize("detector", ["lsd", "hough", "auto"])
def test_lines_lie_on_the_straight_edges(detector):
    img = np.zeros((128, 160, 3), np.float32)
    img[30:100, 40:130] = 1.0  # a rectangle: 4 straight edges
    out = run("lines", img, resolution=128, detector=detector)[0, ..., 0]
    assert set(np.unique(out)) <= {0.0, 1.0}
    edges = np.zeros((128, 160), np.uint8)
    cv2.rectangle(edges, (40, 30), (129, 99), 1, 1)
    dist = cv2.distanceTransform(1 - edges, cv2.DIST_L2, 3)
    on = out > 0
    assert on.any() and dist[on].max() <= 2.0  # every drawn pixel is on an edge
    near = cv2.dilate(on.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert near[edges > 0].mean() > 0.8  # and most of the edges are drawn


def test_lines_min_length_drops_short_segments():
    img = np.zeros((128, 128, 3), np.float32)
    img[60:64, 10:120] = 1.0  # long bar
    img[20:24, 10:18] = 1.0  # tiny blob
    out = run("lines", img, resolution=128, min_length=0.3)[0, ..., 0]
    assert out[55:70].any() and not out[10:30].any()


# ------------------------------------------------------------------------ resolution handling
@pytest.mark.parametrize("shape, res", [((50, 90), 64), ((90, 50), 256), ((128, 128), 512), ((300, 200), 64)])
def test_resolution_returns_the_input_size_and_works_at_the_short_side(shape, res, monkeypatch):
    seen = []
    m = P.get_method("softedge")
    monkeypatch.setitem(P.METHODS, "softedge", P.Method(
        m.name, lambda f, **k: (seen.append(f.shape), m.fn(f, **k))[1], m.params, m.feeds, doc=m.doc))
    img = photo(*shape)
    out = run("softedge", img, resolution=res)
    assert out.shape == (1, *shape, 3)
    assert min(seen[0][:2]) == res and seen[0][:2] == working_size(*shape, res)
    ratio = seen[0][1] / seen[0][0]
    assert abs(ratio - shape[1] / shape[0]) < 2 / res


def test_pixel_perfect_picks_the_resolution_from_the_target(monkeypatch):
    seen = []
    m = P.get_method("canny")
    monkeypatch.setitem(P.METHODS, "canny", P.Method(
        m.name, lambda f, **k: (seen.append(f.shape), m.fn(f, **k))[1], m.params, m.feeds, doc=m.doc))
    img = photo(100, 150)
    out = run("canny", img, pixel_perfect=True, target_hw=(512, 640), resolution=64)
    assert out.shape == (1, 100, 150, 3)
    # cover fit: scale max(512/100, 640/150) = 5.12 -> working 512 x 768
    assert seen[0][:2] == (512, 768)
    with pytest.raises(PreprocessorError, match="target_hw"):
        run("canny", img, pixel_perfect=True)


def test_native_size_methods_ignore_resolution():
    img = photo(40, 60)
    np.testing.assert_array_equal(run("grayscale", img, resolution=64), run("grayscale", img, resolution=2048))


# -------------------------------------------------------------------------------- input types
def test_rgba_gray_uint16_and_float_inputs_agree():
    img = photo(48, 64)
    ref = run("canny", img, resolution=48)
    rgba = np.concatenate([img, np.full((48, 64, 1), 77, np.uint8)], -1)
    np.testing.assert_array_equal(run("canny", rgba, resolution=48), ref)
    np.testing.assert_array_equal(run("canny", img.astype(np.uint16) * 257, resolution=48), ref)
    np.testing.assert_array_equal(run("canny", img.astype(np.float32) / 255, resolution=48), ref)
    np.testing.assert_array_equal(run("canny", img.astype(np.float64) / 255, resolution=48), ref)
    gray = img[..., :1]
    np.testing.assert_allclose(run("grayscale", gray)[0], np.repeat(gray / np.float32(255), 3, -1), atol=1e-6)
    np.testing.assert_array_equal(run("grayscale", gray[..., 0]), run("grayscale", gray))


def test_uint16_keeps_its_precision():
    img = np.full((16, 16, 3), 32768, np.uint16)
    np.testing.assert_allclose(run("invert", img), 1 - 32768 / 65535, atol=1e-7)


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((0, 64, 64, 3), np.uint8), "empty"),
        (np.zeros((64, 0, 3), np.uint8), "empty"),
        (np.zeros((4, 64, 3), np.uint8), "too small: 4x64 pixels"),
        (np.zeros((1, 7, 7, 3), np.float32), "at least 8 pixels"),
        (np.zeros((32, 32, 2), np.uint8), "1 \\(grey\\), 3 \\(RGB\\) or 4 \\(RGBA\\)"),
        (np.zeros((32, 32, 3), np.int32), "unsupported pixel type int32"),
        (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
        (np.zeros((2, 2, 32, 32, 3), np.uint8), "expected an image"),
    ],
)
def test_bad_images_are_rejected_with_a_clear_message(bad, words):
    with pytest.raises(PreprocessorError, match=words):
        run("canny", bad)


def test_bad_method_and_parameters_are_named():
    img = photo()
    with pytest.raises(PreprocessorError, match="unknown preprocessor 'depth'; available: canny"):
        run("depth", img)
    with pytest.raises(PreprocessorError, match="unknown parameter\\(s\\) 'low'"):
        run("canny", img, low=10)
    with pytest.raises(PreprocessorError, match="'high_threshold' must be between 0 and 255; got 300"):
        run("canny", img, high_threshold=300)
    with pytest.raises(PreprocessorError, match="'detector' must be one of 'auto', 'lsd', 'hough'"):
        run("lines", img, detector="mlsd")
    with pytest.raises(PreprocessorError, match="resolution 8 is out of range"):
        run("canny", img, resolution=8)
    with pytest.raises(PreprocessorError, match="canny\\(\\) takes a uint8 image"):
        P.canny(img.astype(np.float32))
    assert issubclass(PreprocessorError, ValueError)


def _method_using(param: str) -> str:
    return next(m for m in P.METHODS.values() if param in m.params).name


@pytest.mark.parametrize("param", [p for p in P.PARAMS if p.kind in ("int", "float")], ids=lambda p: p.name)
def test_every_number_outside_its_range_is_refused_never_clamped(param):
    """What an API prompt can send past the widgets: below min, above max, NaN; each is a sentence that
    names the method, the parameter, its range and the value."""
    img = photo(32, 32)
    method = _method_using(param.name)
    for value in (param.min - 1, param.max + 1):
        value = int(value) if param.kind == "int" else float(value)
        with pytest.raises(PreprocessorError, match=rf"{method}: parameter '{param.name}' must be between "
                                                    rf"{param.min} and {param.max}; got {value!r}"):
            run(method, img, resolution=32, **{param.name: value})
    with pytest.raises(PreprocessorError, match=rf"'{param.name}' must be (a number|a whole number); got nan"):
        run(method, img, resolution=32, **{param.name: float("nan")})


@pytest.mark.parametrize("resolution", [0, -512, 15, 16385, 100000])
def test_resolution_outside_16_to_16384_is_refused(resolution):
    with pytest.raises(PreprocessorError, match=rf"resolution {resolution} is out of range; use 16 to 16384 pixels"):
        run("canny", photo(32, 32), resolution=resolution)


def test_canny_thresholds_given_high_below_low_are_swapped_as_opencv_does():
    img = photo(64, 64)
    np.testing.assert_array_equal(run("canny", img, resolution=64, low_threshold=200, high_threshold=100),
                                  run("canny", img, resolution=64, low_threshold=100, high_threshold=200))


# -------------------------------------------------------------------- weights (future methods)
def test_a_method_with_weights_loads_a_local_file_once(tmp_path, monkeypatch):
    loads = []

    def load(path):
        loads.append(path)
        return float(path.read_text())

    m = P.Method("gain", lambda f, *, model: f * model, (), "none (test)", doc="test",
                 load_weights=load, weights_doc="gain.txt: a number; put it anywhere and pass its path")
    monkeypatch.setitem(P.METHODS, "gain", m)
    img = np.full((16, 16, 3), 0.5, np.float32)
    with pytest.raises(PreprocessorError, match="needs a weights file that you provide .*gain.txt"):
        run("gain", img)
    with pytest.raises(PreprocessorError, match="does not exist"):
        run("gain", img, weights_path=tmp_path / "missing.txt")
    w = tmp_path / "gain.txt"
    w.write_text("0.5")
    np.testing.assert_allclose(run("gain", img, weights_path=w), 0.25)
    np.testing.assert_allclose(run("gain", img, weights_path=str(w)), 0.25)
    assert len(loads) == 1


def test_the_hint_never_aliases_the_input():
    img = np.full((1, 32, 32, 3), 0.25, np.float32)
    out = run("tile", img, resolution=32, downsample=1.0)
    np.testing.assert_array_equal(out, img)
    out[:] = 1.0
    assert (img == 0.25).all()


# ------------------------------------------------------------------------------------------
# which widgets a method reads; progress of a batch

def test_method_inputs_are_the_run_arguments_each_method_reads():
    for name in P.list_methods():
        m = P.get_method(name)
        expected = m.params if m.native_size else ("resolution", "pixel_perfect") + m.params
        assert P.method_inputs(name) == expected
    assert P.method_inputs("canny") == ("resolution", "pixel_perfect", "low_threshold", "high_threshold", "blur",
                                        "auto_threshold")
    assert P.method_inputs("invert") == ()  # pixel-wise: not even the resolution
    # a widget no method reads would be hidden for every method: there is none
    assert {p.name for p in P.PARAMS} == {n for m in P.list_methods() for n in P.method_inputs(m)} - {
        "resolution", "pixel_perfect"}


@pytest.mark.parametrize("threads", ["1", "2"])
def test_progress_is_reported_once_per_frame_in_the_calling_thread(threads, monkeypatch):
    import threading

    monkeypatch.setenv("PREPROCESSOR_THREADS", threads)
    calls = []
    caller = threading.get_ident()
    frames = np.random.default_rng(0).random((5, 24, 32, 3)).astype(np.float32)
    out = run("canny", frames, resolution=32, progress=lambda done, total: calls.append((done, total,
                                                                                        threading.get_ident())))
    assert [(d, t) for d, t, _ in calls] == [(i, 5) for i in range(1, 6)]
    assert {tid for _, _, tid in calls} == {caller}
    np.testing.assert_array_equal(out, run("canny", frames, resolution=32))


def test_an_error_from_progress_stops_the_batch(monkeypatch):
    monkeypatch.setenv("PREPROCESSOR_THREADS", "1")
    seen = []

    def count(frame):
        seen.append(1)
        return frame

    P.register(P.Method("count_for_tests", count, (), "tests", native_size=True), replace=True)
    try:
        def interrupt(done, total):
            raise KeyboardInterrupt("interrupted")  # what the host's progress hook raises on Cancel

        with pytest.raises(KeyboardInterrupt):
            run("count_for_tests", np.zeros((6, 8, 8, 3), np.float32), progress=interrupt)
        assert len(seen) == 1
    finally:
        P.METHODS.pop("count_for_tests", None)


def test_fit_long_side_shrinks_to_the_side_and_never_grows():
    assert fit_long_side(1536, 2048, 1024) == (768, 1024)  # 1536 * 1024 / 2048
    assert fit_long_side(3000, 1000, 1024) == (1024, 341)  # 1000 * 1024 / 3000 = 341.33
    assert fit_long_side(600, 800, 1024) == (600, 800)
    assert fit_long_side(1, 5000, 1024) == (1, 1024)  # 0.2 rounds to 0: kept at 1 px
