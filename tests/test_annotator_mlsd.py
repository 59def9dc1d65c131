"""M-LSD (preprocessors/nets/mlsd.py) against controlnet-aux 0.0.10: its `MobileV2_MLSD_Large`
holding the same random weights (the network), its `pred_lines` (the decoder; the same code as
comfyui_controlnet_aux's), and comfyui_controlnet_aux's MLSDdetector recipe around them (the whole
method: pad to 64, decode, cv2.line, crop), written out here from Aux's source.

Weights: random, the real architecture, saved as `mlsd_large_512_fp32.pth` with the release's key
names (incl. BatchNorm running stats, which the reference initialises to 0/1: re-randomised).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors import registry
from comfyui_controlnet_core.preprocessors.nets import files
from comfyui_controlnet_core.preprocessors.nets import mlsd

from helpers_annotators import cna
from test_annotator_depth_anything import test_image

FILE = "mlsd_large_512_fp32.pth"


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in mlsd.MLSD().state_dict().items():
        if k.endswith("num_batches_tracked"):
            t = torch.tensor(100)
        elif k.endswith("running_var"):
            t = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("running_mean"):
            t = 0.1 * torch.randn(v.shape, generator=g)
        elif v.ndim == 1 and k.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif v.ndim == 1:
            t = 0.05 * torch.randn(v.shape, generator=g)
        else:
            t = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / math.prod(v.shape[1:]))
        sd[k] = t.to(v.dtype)
    return sd


def reference_net(sd):
    net = cna("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large().eval()
    net.load_state_dict(sd, strict=True)
    return net


@pytest.fixture(scope="module")
def sd():
    return random_state_dict()


@pytest.fixture
def weights(tmp_path, sd):
    root = tmp_path / "annotators" / "lllyasviel" / "Annotators"
    root.mkdir(parents=True)
    torch.save(sd, root / FILE)
    files.set_roots_provider(lambda: [tmp_path / "annotators"])
    try:
        yield root / FILE
    finally:
        files.set_roots_provider(None)
        registry.clear_models()


def test_network_equals_controlnet_aux(sd, weights):
    ref = reference_net(sd)
    ours = mlsd.load(weights).eval()
    x = torch.rand(1, 4, 320, 448, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        want, got = ref(x), ours(x)
    assert got.shape == want.shape == (1, 9, 160, 224)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
    assert want[:, 0].std() > 0.1  # the centre map has structure


class Fixed(torch.nn.Module):
    """A 'network' returning a given output (the decoder tested alone on a peaked map)."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.out


def test_decoder_equals_pred_lines_on_peaked_maps():
    g = torch.Generator().manual_seed(2)
    h, w = 96, 128
    out = torch.full((1, 9, h, w), -8.0)
    ys, xs = torch.randint(2, h - 2, (300,), generator=g), torch.randint(2, w - 2, (300,), generator=g)
    out[0, 0, ys, xs] = torch.rand(300, generator=g) * 8 - 4  # distinct peaks, some below the threshold
    out[0, 1:5] = torch.randn(4, h, w, generator=g) * 6
    pred_lines = cna("mlsd.utils").pred_lines
    image = np.zeros((2 * h, 2 * w, 3), np.uint8)
    for thr_v, thr_d in ((0.1, 0.1), (0.3, 5.0)):
        want = pred_lines(image, Fixed(out), [2 * h, 2 * w], thr_v, thr_d)
        got = mlsd.decode(out, thr_v, thr_d)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert len(got) > 20


def aux_recipe(rgb: np.ndarray, net, thr_v: float, thr_d: float) -> np.ndarray:
    """Aux's MLSDdetector.__call__ at detect_resolution = the short side (its resize is then a no-op):
    resize_image_with_pad (edge pad to 64), pred_lines on the padded image, cv2.line, remove_pad."""
    import cv2

    pred_lines = cna("mlsd.utils").pred_lines
    h, w = rgb.shape[:2]
    ph, pw = int(np.ceil(h / 64) * 64 - h), int(np.ceil(w / 64) * 64 - w)
    img = np.pad(rgb, [[0, ph], [0, pw], [0, 0]], mode="edge")
    out = np.zeros_like(img)
    try:
        with torch.no_grad():
            for line in pred_lines(img, net, [img.shape[0], img.shape[1]], thr_v, thr_d):
                x0, y0, x1, y1 = [int(v) for v in line]
                cv2.line(out, (x0, y0), (x1, y1), [255, 255, 255], 1)
    except Exception:  # Aux swallows every error (e.g. no line at all): an empty map
        pass
    return out[:h, :w, 0]


@pytest.mark.parametrize("hw,thr", [((256, 320), (0.1, 0.1)), ((200, 300), (0.5, 8.0))])
def test_method_equals_aux_recipe(sd, weights, hw, thr):
    rgb = test_image(*hw, seed=hw[1])
    want = aux_recipe(rgb, reference_net(sd), *thr)
    got = pp.run("mlsd", rgb, resolution=min(hw), score_threshold=thr[0], dist_threshold=thr[1])[0]
    got8 = np.rint(got * 255).astype(np.uint8)
    assert (got8[..., 0] == got8[..., 2]).all()
    assert (want > 0).sum() > 50  # lines were drawn
    np.testing.assert_array_equal(got8[..., 0], want)


def test_bad_inputs(weights, tmp_path):
    # tiny: the registry's sentence; huge and batches run
    with pytest.raises(pp.PreprocessorError, match="too small: 4x4"):
        pp.run("mlsd", np.zeros((4, 4, 3), np.uint8))
    small = pp.run("mlsd", test_image(8, 8), resolution=16)
    assert small.shape == (1, 8, 8, 3)
    huge = pp.run("mlsd", np.zeros((4096, 4096, 3), np.uint8), resolution=512)
    assert huge.shape == (1, 4096, 4096, 3)
    batch = np.stack([test_image(64, 96, seed=i) for i in range(16)])
    out = pp.run("mlsd", batch, resolution=64)
    assert out.shape == (16, 64, 96, 3)
    np.testing.assert_array_equal(out[3], pp.run("mlsd", batch[3], resolution=64)[0])
    # a truncated file, another annotator's file under the name
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(pp.PreprocessorError, match=f"{FILE}: .*truncated or corrupt"):
        pp.run("mlsd", test_image(64, 64))
    torch.save({"block1.convs.0.weight": torch.zeros(64, 3, 3, 3)}, weights)
    with pytest.raises(pp.PreprocessorError, match=rf"{FILE} is not a M-LSD .* weights file"):
        pp.run("mlsd", test_image(64, 64))
    weights.unlink()
    with pytest.raises(pp.PreprocessorError, match=f"{FILE} was not found; .*huggingface.co/lllyasviel/Annotators"):
        pp.run("mlsd", test_image(64, 64))
