"""NormalBAE (preprocessors/nets/normal_bae.py) against controlnet-aux 0.0.10's `NNET` (the release's
network with geffnet's tf_efficientnet_b5_ap, as comfyui_controlnet_aux ships it) holding the same
random weights, and the whole method against comfyui_controlnet_aux's NormalBaeDetector recipe
(pad to 64, /255, ImageNet normalisation, (n + 1) / 2, uint8, crop), written out from Aux's source.

Weights: random, the real architecture (72 M parameters), saved as `scannet.pt` the way the release
is: `{'model': state_dict}` with DataParallel's `module.` prefix, BatchNorm statistics re-randomised.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors import registry
from comfyui_controlnet_core.preprocessors.nets import files
from comfyui_controlnet_core.preprocessors.nets import normal_bae as nb

from helpers_annotators import cna
from test_annotator_depth_anything import test_image

FILE = "scannet.pt"


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """N(0, 1/fan_in) kernels (so activations neither vanish nor blow up through 40 blocks), BN
    statistics and affines near identity, small biases."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in nb.NormalBAE().state_dict().items():
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
            t = torch.randn(v.shape, generator=g) / math.sqrt(math.prod(v.shape[1:]))
        sd[k] = t.to(v.dtype)
    return sd


def reference_net(sd):
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    net = cna("normalbae.nets.NNET").NNET(args).eval()
    net.load_state_dict(sd, strict=True)
    return net


@pytest.fixture(scope="module")
def sd():
    return random_state_dict()


@pytest.fixture(scope="module")
def ref(sd):
    return reference_net(sd)


@pytest.fixture
def weights(tmp_path, sd):
    root = tmp_path / "annotators"
    root.mkdir()
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, root / FILE)
    files.set_roots_provider(lambda: [root])
    try:
        yield root / FILE
    finally:
        files.set_roots_provider(None)
        registry.clear_models()


@pytest.mark.parametrize("hw", [(256, 320), (200, 328)])
def test_network_equals_controlnet_aux(ref, weights, hw):
    ours = nb.load(weights).eval()
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
    with torch.inference_mode():
        want = ref(x)[0][-1]
        got = ours(x)
    assert got.shape == want.shape == (1, 4, *hw)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
    assert want[:, :3].std() > 0.1


def aux_recipe(rgb: np.ndarray, net) -> np.ndarray:
    """Aux's NormalBaeDetector.__call__ at detect_resolution = the short side (no resize)."""
    h, w = rgb.shape[:2]
    ph, pw = int(np.ceil(h / 64) * 64 - h), int(np.ceil(w / 64) * 64 - w)
    img = np.pad(rgb, [[0, ph], [0, pw], [0, 0]], mode="edge")
    with torch.no_grad():
        x = torch.from_numpy(img).float() / 255.0
        x = x.permute(2, 0, 1)[None]
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        x = (x - mean[:, None, None]) / std[:, None, None]  # torchvision's Normalize
        normal = net(x)[0][-1][:, :3]
        normal = ((normal + 1) * 0.5).clip(0, 1)
        normal = normal[0].permute(1, 2, 0).numpy()
        out = (normal * 255.0).clip(0, 255).astype(np.uint8)
    return out[:h, :w]


def test_method_equals_aux_recipe(ref, weights):
    rgb = test_image(200, 264, seed=5)
    want = aux_recipe(rgb, ref)
    got = np.rint(pp.run("normal_bae", rgb, resolution=200)[0] * 255).astype(np.int32)
    diff = np.abs(got - want.astype(np.int32))
    # <= 1/255: the uint8 step truncates, so a float difference of 1e-6 can flip a value by one level
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert want.std() > 10


def test_bad_inputs(weights):
    with pytest.raises(pp.PreprocessorError, match="too small: 4x4"):
        pp.run("normal_bae", np.zeros((4, 4, 3), np.uint8))
    assert pp.run("normal_bae", test_image(8, 8), resolution=16).shape == (1, 8, 8, 3)
    huge = pp.run("normal_bae", np.zeros((4096, 4096, 3), np.uint8), resolution=64)
    assert huge.shape == (1, 4096, 4096, 3)
    with pytest.raises(pp.PreprocessorError, match="resolution of at most 2048"):
        pp.run("normal_bae", np.zeros((64, 64, 3), np.uint8), resolution=4096)
    batch = np.stack([test_image(64, 64, seed=i) for i in range(16)])
    out = pp.run("normal_bae", batch, resolution=64)
    assert out.shape == (16, 64, 64, 3)
    np.testing.assert_array_equal(out[7], pp.run("normal_bae", batch[7], resolution=64)[0])
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(pp.PreprocessorError, match=f"{FILE}: .*truncated or corrupt"):
        pp.run("normal_bae", test_image(64, 64))
    torch.save({"model": {"backbone.features.0.0.weight": torch.zeros(32, 4, 3, 3)}}, weights)  # M-LSD's keys
    with pytest.raises(pp.PreprocessorError, match=rf"{FILE} is not a NormalBAE .* weights file"):
        pp.run("normal_bae", test_image(64, 64))
