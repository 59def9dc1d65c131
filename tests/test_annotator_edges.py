"""The soft-edge, scribble and line-art networks (issue 28 part B): HED, PiDiNet, lineart realistic /
coarse, lineart_anime, TEED and AnyLine.

Oracles: controlnet-aux 0.0.10 ("CNA"): its modules (the same class bodies as comfyui_controlnet_aux,
"Aux") and its detectors, which equal Aux's wherever no resize or padding happens (sizes that are
multiples of 64, 256 for the anime U-Net); and, when COMFYUI_CONTROLNET_AUX_PATH names a checkout of
comfyui_controlnet_aux, Aux's own detectors on odd sizes (where Aux pads to 64). Weights are random,
saved in each real file's layout (names, container, fp16 for HED), and scaled so that the maps use
the whole 0..255 range; the biases a reference zero-initialises are re-randomised.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors.nets import hed, lineart, lineart_anime, pidinet, teed
from comfyui_controlnet_core.preprocessors.nets.host import Net

from helpers_annotators import cna

FP32_REL = 1e-4  # the project's fp32 parity bound (relative to the reference's largest magnitude)


def randomise(module: torch.nn.Module, gain: float, bias: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """He-normal conv weights x gain (so activations neither vanish nor explode through the depth) and
    N(0, bias) biases, including the ones the references set to zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                w = m.weight
                fan_in = w[0].numel() if isinstance(m, torch.nn.Conv2d) else w.shape[0] * w[0, 0].numel()
                w.copy_(torch.randn(w.shape, generator=g) * gain * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * bias)
    return module.eval()


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB test picture with what these networks look for: dark lines, filled shapes with
    edges, a smooth gradient, small dots, and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([150 + 60 * np.sin(xx / 23.0), 140 + 50 * np.cos(yy / 17.0), 120 + 0.3 * (xx - yy)], -1)
    img = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    for i in range(6):
        p = tuple(int(v) for v in rng.integers(0, [w, h]))
        q = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.line(img, p, q, (20, 20, 30), int(rng.integers(1, 4)))
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 5, (230, 200, 40), -1)
    cv2.rectangle(img, (w // 2, h // 5), (w * 5 // 6, h * 3 // 5), (40, 90, 200), -1)
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.circle(img, c, 2, (10, 10, 10), -1)
    return np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


def release_files(folder: Path) -> dict[str, Path]:
    """The six files in their published layouts, random weights, made from our own modules (no
    oracle needed: for the real-ComfyUI test). PiDiNet's file holds the raw 3x3 difference kernels."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = lambda m: OrderedDict((k, v.clone()) for k, v in m.state_dict().items())  # noqa: E731
    net = randomise(hed.HEDNet(), 0.5, seed=11)
    with torch.no_grad():
        net.norm.copy_(torch.tensor([123.0, 117.0, 104.0]).view(1, 3, 1, 1))
    out = {"ControlNetHED.pth": OrderedDict((k, v.half()) for k, v in sd(net).items())}
    pidi = sd(randomise(pidinet.PiDiNet(), 1.0, seed=12))
    g = torch.Generator().manual_seed(12)
    for key in pidinet._difference_kernels():
        c_out, c_in = pidi[key].shape[:2]
        pidi[key] = torch.randn(c_out, c_in, 3, 3, generator=g) * (2.0 / (9 * c_in)) ** 0.5
    out["table5_pidinet.pth"] = {"state_dict": OrderedDict(("module." + k, v) for k, v in pidi.items())}
    out["sk_model.pth"] = sd(randomise(lineart.LineartGenerator(), 1.0, seed=13))
    out["sk_model2.pth"] = sd(randomise(lineart.LineartGenerator(), 1.0, seed=14))
    out["netG.pth"] = sd(randomise(lineart_anime.AnimeUNet(), 1.0, seed=15))
    out["MTEED.pth"] = sd(randomise(teed.TEEDNet(), 0.5, seed=16))
    paths = {}
    for name, obj in out.items():
        torch.save(obj, folder / name)
        paths[name] = folder / name
    return paths


# ------------------------------------------------------------------------------------------
# the reference modules and the files saved from them in the real layouts


def _hed_ref():
    m = randomise(cna("hed").ControlNetHED_Apache2(), 0.5, seed=1)
    with torch.no_grad():
        m.norm.copy_(torch.tensor([123.0, 117.0, 104.0]).view(1, 3, 1, 1))  # zeros in the reference
    return m


def _pidinet_ref():
    return randomise(cna("pidi").model.pidinet(), 1.0, seed=2)


def _lineart_ref(seed):
    return randomise(cna("lineart").Generator(3, 1, 3), 1.0, seed=seed)


def _anime_ref():
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return randomise(cna("lineart_anime").UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False), 1.0, seed=5)


def _teed_ref():
    return randomise(cna("teed").TED(), 0.5, seed=6)


@pytest.fixture(scope="module")
def refs():
    torch.manual_seed(0)
    return {"hed": _hed_ref(), "pidinet": _pidinet_ref(), "lineart": _lineart_ref(3), "coarse": _lineart_ref(4),
            "anime": _anime_ref(), "teed": _teed_ref()}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, refs):
    """The six files, as their publishers saved them (checked against the notes' key counts)."""
    d = tmp_path_factory.mktemp("annotators")
    sd = lambda m: OrderedDict((k, v.clone()) for k, v in m.state_dict().items())  # noqa: E731
    hed_sd = OrderedDict((k, v.half()) for k, v in sd(refs["hed"]).items())  # the real file is fp16
    assert len(hed_sd) == 37
    torch.save(hed_sd, d / "ControlNetHED.pth")
    pidi_sd = OrderedDict(("module." + k, v) for k, v in sd(refs["pidinet"]).items())
    assert len(pidi_sd) == 83
    torch.save({"state_dict": pidi_sd}, d / "table5_pidinet.pth")
    assert len(sd(refs["lineart"])) == 24
    torch.save(sd(refs["lineart"]), d / "sk_model.pth")
    torch.save(sd(refs["coarse"]), d / "sk_model2.pth")
    assert len(sd(refs["anime"])) == 32
    torch.save(sd(refs["anime"]), d / "netG.pth")
    assert len(sd(refs["teed"])) == 36
    torch.save(sd(refs["teed"]), d / "MTEED.pth")
    return d


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


# ------------------------------------------------------------------------------------------
# networks: ours, built from the file, vs the reference module as CNA loads that file


def test_hed_network_matches_reference(weights_dir):
    ref = cna("hed").HEDdetector.from_pretrained(str(weights_dir)).netNetwork  # fp16 file -> .float(), as Aux
    ours = hed.load(weights_dir / "ControlNetHED.pth")
    x = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        for o, r in zip(ours(x), ref(x)):
            assert _rel(o, r) <= FP32_REL


def test_pidinet_network_matches_reference(weights_dir):
    ref = cna("pidi").PidiNetDetector.from_pretrained(str(weights_dir)).netNetwork
    ours = pidinet.load(weights_dir / "table5_pidinet.pth")
    x = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        r, o = ref(x)[-1], ours(x)
    assert float(r.std()) > 0.05  # the random net does draw something
    assert _rel(o, r) <= FP32_REL


@pytest.mark.parametrize("kind", ["realistic", "coarse"])
def test_lineart_network_matches_reference(weights_dir, kind):
    det = cna("lineart").LineartDetector.from_pretrained(str(weights_dir))
    ref = det.model if kind == "realistic" else det.model_coarse
    ours = lineart.load(weights_dir / ("sk_model.pth" if kind == "realistic" else "sk_model2.pth"))
    x = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert _rel(ours(x), ref(x)) <= FP32_REL


def test_lineart_anime_network_matches_reference(weights_dir):
    ref = cna("lineart_anime").LineartAnimeDetector.from_pretrained(str(weights_dir)).model
    ours = lineart_anime.load(weights_dir / "netG.pth")
    x = torch.rand(1, 3, 256, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        assert _rel(ours(x), ref(x)) <= FP32_REL


def test_teed_network_matches_reference(weights_dir):
    ref = cna("teed").TEEDdetector.from_pretrained(str(weights_dir), filename="MTEED.pth").model.eval()
    ours = teed.load(weights_dir / "MTEED.pth")
    x = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        for o, r in zip(ours(x), ref(x)):
            assert _rel(o, r) <= FP32_REL


def test_pidinet_kernel_conversion_is_the_difference_convolution():
    # Each converted kernel, as a plain conv, equals the reference's pixel-difference conv function.
    pdc = cna("pidi").model.createConvFunc
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 6, 20, 24, generator=g)
    w = torch.randn(6, 1, 3, 3, generator=g)
    for op in ("cd", "ad", "rd"):
        ref = pdc(op)(x, w, None, 1, 1, 1, 6)
        k = pidinet.convert_kernel(w, op)
        ours = torch.nn.functional.conv2d(x, k, padding=k.shape[-1] // 2, groups=6)
        assert _rel(ours, ref) <= 1e-6, op


# ------------------------------------------------------------------------------------------
# whole methods (pad, post-processing, uint8) vs CNA's detectors where they equal Aux's


def _ours(method: str, img: np.ndarray, path: Path, **params) -> np.ndarray:
    """Our method through the registry at the image's own size (no resize), as uint8 (h, w)."""
    out = pp.run(method, img, resolution=min(img.shape[:2]), weights_path=path, **params)
    assert out.shape == (1, *img.shape[:2], 3) and np.all(out[..., 0] == out[..., 2])
    return np.rint(out[0, ..., 0] * 255).astype(np.int16)


def _np(x: np.ndarray) -> np.ndarray:
    return (x[..., 0] if x.ndim == 3 else x).astype(np.int16)


def _assert_close(ours: np.ndarray, ref: np.ndarray, what: str, lsb: int = 1, spread: float = 20.0) -> None:
    assert ours.shape == ref.shape, what
    assert ref.std() > spread or len(np.unique(ref)) == 2, f"{what}: the random net draws nothing to compare"
    diff = np.abs(ours - ref)
    assert diff.max() <= lsb, f"{what}: max |diff| {diff.max()}/255, {np.mean(diff > 0):.2%} of pixels differ"


SIZE = (192, 256)  # multiples of 64: CNA's detectors neither resize nor (like Aux) need to pad


@pytest.mark.parametrize("safe", [True, False])
def test_softedge_and_scribble_hed_match_the_detector(weights_dir, safe):
    det = cna("hed").HEDdetector.from_pretrained(str(weights_dir))
    img = scene(*SIZE)
    r = min(SIZE)
    ref = det(img, detect_resolution=r, image_resolution=r, safe=safe, output_type="np")
    _assert_close(_ours("softedge_hed", img, weights_dir / "ControlNetHED.pth", safe=safe), _np(ref), "softedge_hed")
    ref = det(img, detect_resolution=r, image_resolution=r, safe=safe, scribble=True, output_type="np")
    ours = _ours("scribble_hed", img, weights_dir / "ControlNetHED.pth", safe=safe)
    _assert_close(ours, _np(ref), "scribble_hed", lsb=0)


@pytest.mark.parametrize("safe", [True, False])
def test_softedge_and_scribble_pidinet_match_the_detector(weights_dir, safe):
    det = cna("pidi").PidiNetDetector.from_pretrained(str(weights_dir))
    util = cna("util")
    img = scene(*SIZE, seed=1)
    r = min(SIZE)
    path = weights_dir / "table5_pidinet.pth"
    ref = det(img, detect_resolution=r, image_resolution=r, safe=safe, output_type="np")
    _assert_close(_ours("softedge_pidinet", img, path, safe=safe), _np(ref), "softedge_pidinet")
    # Aux's Scribble_PiDiNet node: the detector's scribble, then the same stroke recipe once more
    ref = det(img, detect_resolution=r, image_resolution=r, safe=safe, scribble=True, output_type="np")
    ref = util.nms(ref, 127, 3.0)
    ref = cv2.GaussianBlur(ref, (0, 0), 3.0)
    ref[ref > 4] = 255
    ref[ref < 255] = 0
    _assert_close(_ours("scribble_pidinet", img, path, safe=safe), _np(ref), "scribble_pidinet", lsb=0)


@pytest.mark.parametrize("method, coarse", [("lineart_realistic", False), ("lineart_coarse", True)])
def test_lineart_matches_the_detector(weights_dir, method, coarse):
    det = cna("lineart").LineartDetector.from_pretrained(str(weights_dir))
    img = scene(*SIZE, seed=2)
    r = min(SIZE)
    ref = det(img, coarse=coarse, detect_resolution=r, image_resolution=r, output_type="np")
    path = weights_dir / ("sk_model2.pth" if coarse else "sk_model.pth")
    _assert_close(_ours(method, img, path), _np(ref), method)


def test_lineart_anime_matches_the_detector(weights_dir):
    # At multiples of 256 CNA's anime detector is Aux's (both resizes are the identity there).
    det = cna("lineart_anime").LineartAnimeDetector.from_pretrained(str(weights_dir))
    img = scene(256, 512, seed=3)
    ref = det(img, detect_resolution=256, image_resolution=256, output_type="np")
    _assert_close(_ours("lineart_anime", img, weights_dir / "netG.pth"), _np(ref), "lineart_anime")


@pytest.mark.parametrize("safe_steps", [2, 0, 5])
def test_softedge_teed_matches_the_detector(weights_dir, safe_steps):
    det = cna("teed").TEEDdetector.from_pretrained(str(weights_dir), filename="MTEED.pth")
    img = scene(*SIZE, seed=4)
    ref = det(img, detect_resolution=min(SIZE), safe_steps=safe_steps, output_type="np")
    ours = _ours("softedge_teed", img, weights_dir / "MTEED.pth", safe_steps=safe_steps)
    _assert_close(ours, _np(ref), f"softedge_teed safe_steps={safe_steps}", spread=5.0)


def _aux_anyline(mteed_u8: np.ndarray, lineart_u8: np.ndarray) -> np.ndarray:
    """Aux's AnyLineArtPreprocessor_aux after its two detector calls (node_wrappers/anyline.py, defaults:
    bounds 0..1, object_min_size 36, connectivity 1), on their uint8 results."""
    from skimage import morphology

    mteed = np.repeat(mteed_u8[..., None], 3, 2).astype(np.float32) / 255.0
    line = np.repeat(lineart_u8[..., None], 3, 2).astype(np.float32) / 255.0
    mask = line[:, :, 0]
    mask = np.where((mask >= 0) & (mask <= 1), mask, 0)
    mask = np.expand_dims(mask, 2).repeat(3, axis=2)
    cleaned = morphology.remove_small_objects(mask.astype(bool), min_size=36, connectivity=1)
    top = mask * cleaned
    m = top.astype(bool)
    return (mteed * (~m) + (1 - (1 - top) * (1 - mteed)) * m)[..., 0]


def test_anyline_matches_aux_recipe(weights_dir):
    # The two detectors Aux's node calls (CNA's equal Aux's at this size), then the node's own steps.
    img = scene(*SIZE, seed=5)
    r = min(SIZE)
    mteed = cna("teed").TEEDdetector.from_pretrained(str(weights_dir), filename="MTEED.pth")(
        img, detect_resolution=r, safe_steps=2, output_type="np")
    line = cna("lineart_standard").LineartStandardDetector()(
        img, guassian_sigma=2, intensity_threshold=3, detect_resolution=r, output_type="np")
    ref = _aux_anyline(_np(mteed).astype(np.uint8), _np(line).astype(np.uint8))
    out = pp.run("anyline", img, resolution=r, weights_path=weights_dir / "MTEED.pth")[0, ..., 0]
    assert np.mean(_np(line) > 0) > 0.02 and np.mean(ref != mteed[..., 0] / 255.0) > 0.01  # lines were merged
    assert np.abs(out - ref).max() <= 1 / 255


def test_anyline_small_objects_follow_scikit_image():
    # Aux's mask is 3 repeated channels, so an object of area a counts 3a voxels for scikit-image.
    from skimage import morphology

    rng = np.random.default_rng(0)
    mask = rng.random((120, 160)) > 0.8
    ref = morphology.remove_small_objects(np.repeat(mask[..., None], 3, 2), min_size=36, connectivity=1)[..., 0]
    assert 0 < ref.sum() < mask.sum()
    assert np.array_equal(teed.keep_large_objects(mask, 36), ref)


# ------------------------------------------------------------------------------------------
# Aux's own code (env-gated: a checkout of comfyui_controlnet_aux), odd sizes: its 64-padding

AUX = os.environ.get("COMFYUI_CONTROLNET_AUX_PATH", "")
needs_aux = pytest.mark.skipif(not AUX, reason="set COMFYUI_CONTROLNET_AUX_PATH to a comfyui_controlnet_aux checkout")


def aux(sub: str):
    src = str(Path(AUX) / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return importlib.import_module(f"custom_controlnet_aux.{sub}")


@needs_aux
def test_every_method_matches_aux_on_an_odd_size(weights_dir, refs):
    import warnings

    warnings.simplefilter("ignore")
    img = scene(250, 301, seed=7)  # padded to 256 x 320 by Aux (and by us), cropped back
    r = 250
    p = weights_dir
    a_hed = aux("hed").HEDdetector(hed.load(p / "ControlNetHED.pth"))  # any module with the same weights
    a_pidi = aux("pidi").PidiNetDetector(refs["pidinet"])
    a_line = aux("lineart").LineartDetector(refs["lineart"], refs["coarse"])
    a_anime = aux("lineart_anime").LineartAnimeDetector(refs["anime"])
    a_teed = aux("teed").TEDDetector(refs["teed"])
    nms = aux("util").nms
    cases = {
        "softedge_hed": (a_hed(img, detect_resolution=r, safe=True, output_type="np"), {"safe": True}),
        "scribble_hed": (a_hed(img, detect_resolution=r, safe=False, scribble=True, output_type="np"), {"safe": False}),
        "softedge_pidinet": (a_pidi(img, detect_resolution=r, safe=False, output_type="np"), {"safe": False}),
        "lineart_realistic": (a_line(img, detect_resolution=r, output_type="np"), {}),
        "lineart_coarse": (a_line(img, coarse=True, detect_resolution=r, output_type="np"), {}),
        "lineart_anime": (a_anime(img, detect_resolution=r, output_type="np"), {}),
        "softedge_teed": (a_teed(img, detect_resolution=r, safe_steps=2, output_type="np"), {"safe_steps": 2}),
    }
    s = a_pidi(img, detect_resolution=r, safe=True, scribble=True, output_type="np")
    s = cv2.GaussianBlur(nms(s, 127, 3.0), (0, 0), 3.0)
    s[s > 4] = 255
    s[s < 255] = 0
    cases["scribble_pidinet"] = (s, {"safe": True})
    files = {"hed": "ControlNetHED.pth", "pidinet": "table5_pidinet.pth", "lineart_realistic": "sk_model.pth",
             "lineart_coarse": "sk_model2.pth", "lineart_anime": "netG.pth", "teed": "MTEED.pth"}
    for method, (ref, params) in cases.items():
        key = next(k for k in files if k in method)
        ours = _ours(method, img, p / files[key], **params)
        lsb = 0 if "scribble" in method else 1
        _assert_close(ours, _np(ref), method, lsb=lsb, spread=5.0)
    mteed = a_teed(img, detect_resolution=r, safe_steps=2, output_type="np")
    line = aux("lineart_standard").LineartStandardDetector()(
        img, guassian_sigma=2, intensity_threshold=3, detect_resolution=r, output_type="np")
    ref = _aux_anyline(_np(mteed).astype(np.uint8), _np(line).astype(np.uint8))
    out = pp.run("anyline", img, resolution=r, weights_path=p / "MTEED.pth")[0, ..., 0]
    assert np.abs(out - ref).max() <= 1 / 255


# ------------------------------------------------------------------------------------------
# files found by name, shared networks, bad input


def test_methods_find_their_files_by_name_and_share_one_network(weights_dir, monkeypatch):
    from comfyui_controlnet_core.preprocessors import registry
    from comfyui_controlnet_core.preprocessors.nets import files

    monkeypatch.setattr(files, "_provider", lambda: [weights_dir])
    files._found.clear()
    registry.clear_models()
    img = scene(64, 64)
    for method, name in [("softedge_hed", "ControlNetHED.pth"), ("scribble_hed", "ControlNetHED.pth"),
                         ("softedge_pidinet", "table5_pidinet.pth"), ("lineart_realistic", "sk_model.pth"),
                         ("lineart_coarse", "sk_model2.pth"), ("lineart_anime", "netG.pth"),
                         ("softedge_teed", "MTEED.pth"), ("anyline", "MTEED.pth")]:
        assert pp.weights_file(method) == weights_dir / name
        pp.run(method, img, resolution=64)
    nets = [m for m in registry._weights_cache.values()]
    assert all(isinstance(n, Net) for n in nets)
    assert len(nets) == 6  # HED and its scribble (and TEED and AnyLine) built once


def test_missing_wrong_and_truncated_files_are_sentences(weights_dir, tmp_path, monkeypatch):
    from comfyui_controlnet_core.preprocessors.nets import files

    monkeypatch.setattr(files, "_provider", lambda: [tmp_path / "models" / "annotators"])
    files._found.clear()
    img = scene(64, 64)
    with pytest.raises(pp.PreprocessorError) as e:
        pp.run("softedge_pidinet", img)
    assert "table5_pidinet.pth was not found" in str(e.value)
    assert "https://huggingface.co/lllyasviel/Annotators" in str(e.value)
    assert str(tmp_path / "models" / "annotators") in str(e.value)
    # another annotator's file under the expected name
    wrong = tmp_path / "wrong" / "ControlNetHED.pth"
    wrong.parent.mkdir()
    wrong.write_bytes((weights_dir / "sk_model.pth").read_bytes())
    with pytest.raises(pp.PreprocessorError, match=r"ControlNetHED.pth is not a HED .* weights file"):
        pp.run("softedge_hed", img, weights_path=wrong)
    for method, name in [("lineart_anime", "netG.pth"), ("softedge_teed", "MTEED.pth"),
                         ("softedge_pidinet", "table5_pidinet.pth"), ("lineart_realistic", "sk_model.pth")]:
        other = tmp_path / method / name
        other.parent.mkdir()
        other.write_bytes((weights_dir / ("netG.pth" if name != "netG.pth" else "MTEED.pth")).read_bytes())
        with pytest.raises(pp.PreprocessorError, match=f"{name} is not a"):
            pp.run(method, img, weights_path=other)
    # a truncated download
    cut = tmp_path / "cut" / "netG.pth"
    cut.parent.mkdir()
    cut.write_bytes((weights_dir / "netG.pth").read_bytes()[:100_000])
    with pytest.raises(pp.PreprocessorError, match="netG.pth"):
        pp.run("lineart_anime", img, weights_path=cut)


def test_tiny_and_batched_inputs(weights_dir):
    with pytest.raises(pp.PreprocessorError, match="too small"):
        pp.run("softedge_hed", np.zeros((4, 4, 3), np.uint8), weights_path=weights_dir / "ControlNetHED.pth")
    # the smallest accepted image at the smallest resolution, through the 64-padding
    out = pp.run("lineart_anime", scene(8, 8), resolution=16, weights_path=weights_dir / "netG.pth")
    assert out.shape == (1, 8, 8, 3) and np.isfinite(out).all()
    batch = np.stack([scene(48, 80, seed=i) for i in range(16)])
    out = pp.run("softedge_teed", batch, resolution=48, weights_path=weights_dir / "MTEED.pth", safe_steps=2)
    one = pp.run("softedge_teed", batch[5], resolution=48, weights_path=weights_dir / "MTEED.pth", safe_steps=2)
    assert out.shape == (16, 48, 80, 3) and np.array_equal(out[5], one[0])


def test_huge_image_is_brought_to_the_working_resolution(weights_dir):
    big = cv2.resize(scene(256, 256), (4096, 4096), interpolation=cv2.INTER_NEAREST)
    out = pp.run("softedge_pidinet", big, resolution=256, weights_path=weights_dir / "table5_pidinet.pth")
    assert out.shape == (1, 4096, 4096, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
