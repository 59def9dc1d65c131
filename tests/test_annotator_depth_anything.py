"""Depth Anything V2 / V1 (preprocessors/nets/depth_anything.py) against transformers'
`DepthAnythingForDepthEstimation` (a local config, no download) holding the same random weights,
and the whole method against comfyui_controlnet_aux's DepthAnythingV2Detector recipe.

The weights are random, of the real ViT-S architecture, saved with the release's key names
(`pretrained.*`, `depth_head.*`) as `.pth` and as ComfyUI-DepthAnythingV2 `.safetensors` (fp16 too);
the test converts them to transformers' names (the rules of transformers'
convert_depth_anything_to_hf.py, with 5.x's split q/k/v/o attention names). Away from 518 x 518 the
position embedding is resized; transformers resizes it to the grid size while the authors (and so
Aux and the trained weights) use a scale factor of (n + 0.1) / 37: there the oracle's
`interpolate_pos_encoding` is replaced by the authors' rule, written here from their dinov2.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors import registry
from comfyui_controlnet_core.preprocessors.nets import depth_anything as da
from comfyui_controlnet_core.preprocessors.nets import files

from helpers_annotators import transformers_or_skip

VITS = dict(dim=384, depth=12, heads=6, features=64, out_channels=[48, 96, 192, 384])


def random_release_state_dict(dim=384, depth=12, features=64, out_channels=(48, 96, 192, 384), seed=0,
                              swiglu=False) -> dict[str, torch.Tensor]:
    """Random weights in the release layout, scaled so every part of the network moves the output:
    N(0, 1/fan_in) kernels, LayerScale around 0.5 (the release's init is 1e-5-ish, which would hide
    the blocks), norms around 1, a positive last bias (the final ReLU would zero a random map)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in da.DepthAnything(dim, depth, features, tuple(out_channels),
                                                          swiglu=swiglu).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith(".gamma"):
            t = 0.5 + 0.1 * torch.randn(shape, generator=g)
        elif "norm" in k and k.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        elif k in ("pretrained.pos_embed", "pretrained.cls_token", "pretrained.mask_token"):
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            if "resize_layers.0" in k or "resize_layers.1" in k:  # ConvTranspose: (in, out, k, k)
                fan_in = shape[0]
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[k] = t.float()
    sd["depth_head.scratch.output_conv2.2.bias"] = torch.tensor([1.0])
    return sd


def to_transformers(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Release names -> transformers 5.x DepthAnythingForDepthEstimation names."""
    out = {}
    emb = "backbone.embeddings."
    out[emb + "cls_token"] = sd["pretrained.cls_token"]
    out[emb + "mask_token"] = sd["pretrained.mask_token"]
    out[emb + "position_embeddings"] = sd["pretrained.pos_embed"]
    for t in ("weight", "bias"):
        out[emb + f"patch_embeddings.projection.{t}"] = sd[f"pretrained.patch_embed.proj.{t}"]
        out[f"backbone.layernorm.{t}"] = sd[f"pretrained.norm.{t}"]
    for i in range(depth):
        src, dst = f"pretrained.blocks.{i}.", f"backbone.encoder.layer.{i}."
        for t in ("weight", "bias"):
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[dst + f"{n}.{t}"] = sd[src + f"{n}.{t}"]
            q, k, v = sd[src + f"attn.qkv.{t}"].chunk(3, dim=0)
            out[dst + f"attention.q_proj.{t}"], out[dst + f"attention.k_proj.{t}"] = q, k
            out[dst + f"attention.v_proj.{t}"] = v
            out[dst + f"attention.o_proj.{t}"] = sd[src + f"attn.proj.{t}"]
        out[dst + "layer_scale1.lambda1"] = sd[src + "ls1.gamma"]
        out[dst + "layer_scale2.lambda1"] = sd[src + "ls2.gamma"]
    h = "depth_head."
    for i in range(4):
        for t in ("weight", "bias"):
            out[f"neck.reassemble_stage.layers.{i}.projection.{t}"] = sd[h + f"projects.{i}.{t}"]
            if i != 2:
                out[f"neck.reassemble_stage.layers.{i}.resize.{t}"] = sd[h + f"resize_layers.{i}.{t}"]
        out[f"neck.convs.{i}.weight"] = sd[h + f"scratch.layer{i + 1}_rn.weight"]
        src, dst = h + f"scratch.refinenet{4 - i}.", f"neck.fusion_stage.layers.{i}."
        for t in ("weight", "bias"):
            out[dst + f"projection.{t}"] = sd[src + f"out_conv.{t}"]
            for r in (1, 2):
                for c in (1, 2):
                    out[dst + f"residual_layer{r}.convolution{c}.{t}"] = sd[src + f"resConfUnit{r}.conv{c}.{t}"]
    for t in ("weight", "bias"):
        out[f"head.conv1.{t}"] = sd[h + f"scratch.output_conv1.{t}"]
        out[f"head.conv2.{t}"] = sd[h + f"scratch.output_conv2.0.{t}"]
        out[f"head.conv3.{t}"] = sd[h + f"scratch.output_conv2.2.{t}"]
    return out


def hf_model(sd: dict, *, dim=384, depth=12, heads=6, features=64, out_channels=(48, 96, 192, 384), version=2):
    transformers = transformers_or_skip()
    taps = {384: [3, 6, 9, 12], 768: [3, 6, 9, 12], 1024: [5, 12, 18, 24]}[dim] if version == 2 else \
        list(range(depth - 3, depth + 1))
    backbone = transformers.Dinov2Config(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, patch_size=14, image_size=518,
        out_indices=taps, apply_layernorm=True, reshape_hidden_states=False, layerscale_value=1.0)
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=dim, patch_size=14, fusion_hidden_size=features,
        neck_hidden_sizes=list(out_channels), depth_estimation_type="relative", max_depth=1)
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    missing, unexpected = model.load_state_dict(to_transformers(sd, depth), strict=False)
    assert not missing and not unexpected, (missing[:3], unexpected[:3])
    return model


def authors_pos_embed(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The DINOv2 release's interpolate_pos_encoding (depth_anything_v2/dinov2.py), for the oracle."""
    pos = self.position_embeddings
    n = pos.shape[1] - 1
    if embeddings.shape[1] - 1 == n and height == width:
        return pos
    side = int(math.sqrt(n))
    h0, w0 = height // 14 + 0.1, width // 14 + 0.1
    grid = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic", antialias=False)
    assert (grid.shape[-2], grid.shape[-1]) == (int(h0), int(w0))
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
    return torch.cat([pos[:, :1], grid.to(pos.dtype)], dim=1)


@pytest.fixture
def authors_rule(monkeypatch):
    transformers = transformers_or_skip()
    from transformers.models.dinov2 import modeling_dinov2

    monkeypatch.setattr(modeling_dinov2.Dinov2Embeddings, "interpolate_pos_encoding", authors_pos_embed)
    return transformers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def vits_sd():
    return random_release_state_dict(seed=0)


@pytest.fixture
def weights_dir(tmp_path, vits_sd):
    root = tmp_path / "models" / "annotators"
    (root / "depth-anything" / "Depth-Anything-V2-Small").mkdir(parents=True)
    torch.save(vits_sd, root / "depth-anything" / "Depth-Anything-V2-Small" / "depth_anything_v2_vits.pth")
    files.set_roots_provider(lambda: [root])
    try:
        yield root
    finally:
        files.set_roots_provider(None)
        registry.clear_models()


# ------------------------------------------------------------------------------------------
# the network


def test_network_equals_transformers_at_518(vits_sd, tmp_path):
    torch.save(vits_sd, tmp_path / "depth_anything_v2_vits.pth")
    ours = da.load(tmp_path / "depth_anything_v2_vits.pth").eval()
    ref = hf_model(vits_sd)
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref(pixel_values=x).predicted_depth
        got = ours(x)
    assert want.std() > 0.05 * want.abs().mean()  # the random weights give a map with structure
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("hw", [(392, 700), (700, 518)])
def test_network_equals_transformers_with_the_authors_position_embedding(vits_sd, tmp_path, authors_rule, hw):
    torch.save(vits_sd, tmp_path / "depth_anything_v2_vits.pth")
    ours = da.load(tmp_path / "depth_anything_v2_vits.pth").eval()
    ref = hf_model(vits_sd)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref(pixel_values=x).predicted_depth
        got = ours(x)
    assert got.shape == want.shape == (1, *hw)
    assert rel_err(got, want) <= 1e-4


def test_v1_taps_the_last_four_blocks(tmp_path):
    sd = random_release_state_dict(seed=3)
    path = tmp_path / "depth_anything_vits14.pth"
    torch.save(sd, path)
    ours = da.load(path).eval()
    assert ours.version == 1 and ours.taps == [8, 9, 10, 11]
    ref = hf_model(sd, version=1)
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert rel_err(ours(x), ref(pixel_values=x).predicted_depth) <= 1e-4


@pytest.mark.parametrize("size", ["vitb", "vitl", "vitg"])
def test_other_sizes_are_read_from_the_shapes(size):
    dim, depth, features, out = {
        "vitb": (768, 12, 128, (96, 192, 384, 768)), "vitl": (1024, 24, 256, (256, 512, 1024, 1024)),
        "vitg": (1536, 40, 384, (1536, 1536, 1536, 1536))}[size]
    with torch.device("meta"):
        sd = da.DepthAnything(dim, depth, features, out, swiglu=size == "vitg").state_dict()
    cfg = da.config_of(sd, f"depth_anything_v2_{size}.pth")
    assert cfg == {"dim": dim, "depth": depth, "features": features, "out_channels": out, "version": 2,
                   "swiglu": size == "vitg"}
    with torch.device("meta"):
        assert da.DepthAnything(**cfg).taps == da.ENCODERS[dim][1]
    if size != "vitg":  # transformers' layout has the same weights, one for one (ViT-g's SwiGLU: fused w12)
        transformers = transformers_or_skip()
        heads = dim // 64
        with torch.device("meta"):
            bc = transformers.Dinov2Config(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                           patch_size=14, image_size=518, out_indices=[depth], layerscale_value=1.0,
                                           reshape_hidden_states=False)
            hf = transformers.DepthAnythingForDepthEstimation(transformers.DepthAnythingConfig(
                backbone_config=bc, reassemble_hidden_size=dim, patch_size=14, fusion_hidden_size=features,
                neck_hidden_sizes=list(out)))
        want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in to_transformers(sd, depth).items()}
        assert got == want


# ------------------------------------------------------------------------------------------
# the method against Aux's recipe


def aux_recipe(rgb: np.ndarray, model) -> np.ndarray:
    """comfyui_controlnet_aux's DepthAnythingV2Detector(max_depth=1) + resize_image_with_pad at
    resolution = the short side (a no-op resize), written out from Aux's source with the oracle net."""
    import cv2

    h, w = rgb.shape[:2]
    image = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2RGB) / 255.0
    # Resize(518, 518, keep_aspect_ratio, ensure_multiple_of=14, lower_bound, INTER_CUBIC)
    scale = max(518 / h, 518 / w)

    def constrain(x):
        y = (np.round(x / 14) * 14).astype(int)
        return (np.ceil(x / 14) * 14).astype(int) if y < 518 else y

    nh, nw = constrain(scale * h), constrain(scale * w)
    image = cv2.resize(image, (int(nw), int(nh)), interpolation=cv2.INTER_CUBIC)
    image = (image - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(image, (2, 0, 1))).astype(np.float32))[None]
    with torch.no_grad():
        depth = model(pixel_values=x).predicted_depth * 1.0
        depth = F.interpolate(depth[:, None], (h, w), mode="bilinear", align_corners=True)[0, 0].numpy()
    depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
    depth = depth.astype(np.uint8)
    out = np.repeat(depth[..., None], 3, axis=2)
    k = min(h, w) / min(h, w)  # resolution = short side
    out = cv2.resize(out, (int(np.round(w * k)), int(np.round(h * k))), interpolation=cv2.INTER_AREA)
    return out


def test_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB: smooth gradients, discs and noise (depth maps with real structure)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], -1) * 180
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(2, min(h, w) / 3))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


test_image.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("hw", [(300, 400), (480, 270)])
def test_method_equals_aux_recipe(weights_dir, vits_sd, authors_rule, hw):
    rgb = test_image(*hw, seed=hw[0])
    want = aux_recipe(rgb, hf_model(vits_sd))
    got = pp.run("depth_anything_v2", rgb, depth_model="v2_vits")[0]
    got8 = np.rint(got * 255).astype(np.int32)
    diff = np.abs(got8 - want.astype(np.int32))
    # <= 1/255: the uint8 step truncates, so a float difference of 1e-5 can flip a value by one level
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert want.std() > 10  # a depth map with structure, not a flat one
    assert pp.weights_file("depth_anything_v2", {"depth_model": "v2_vits"}).name == "depth_anything_v2_vits.pth"


def test_safetensors_fp32_and_fp16_files_load(tmp_path, vits_sd):
    from safetensors.torch import save_file

    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(5))
    ref = da.DepthAnything(**da.config_of(vits_sd, "x")).eval()
    ref.load_state_dict(vits_sd)
    with torch.inference_mode():
        want = ref(x)
    for name, dtype, tol in (("fp32", torch.float32, 1e-6), ("fp16", torch.float16, 2e-2)):
        path = tmp_path / f"depth_anything_v2_vits_{name}.safetensors"
        save_file({k: v.to(dtype) for k, v in vits_sd.items()}, str(path))
        net = da.load(path).eval()
        assert all(p.dtype == torch.float32 for p in net.parameters())
        with torch.inference_mode():
            assert rel_err(net(x), want) <= tol, name


def test_kijai_safetensors_found_in_models_depthanything(tmp_path, vits_sd):
    from safetensors.torch import save_file

    depthanything = tmp_path / "models" / "depthanything"
    depthanything.mkdir(parents=True)
    save_file(vits_sd, str(depthanything / "depth_anything_v2_vits_fp32.safetensors"))
    files.set_roots_provider(lambda: [tmp_path / "models" / "annotators", depthanything])
    try:
        assert pp.weights_file("depth_anything_v2", {"depth_model": "v2_vits"}) == (
            depthanything / "depth_anything_v2_vits_fp32.safetensors")
        out = pp.run("depth_anything_v2", test_image(64, 80), depth_model="v2_vits")
        assert out.shape == (1, 64, 80, 3) and out.max() == 1.0 and out.min() == 0.0
    finally:
        files.set_roots_provider(None)
        registry.clear_models()


# ------------------------------------------------------------------------------------------
# bad inputs


def test_missing_file_names_it_its_source_and_the_folder(weights_dir):
    with pytest.raises(pp.PreprocessorError) as e:
        pp.run("depth_anything_v2", test_image(32, 32))  # default v2_vitl: not there
    text = str(e.value)
    assert "depth_anything_v2_vitl.pth" in text and "huggingface.co/depth-anything/Depth-Anything-V2-Large" in text
    assert f"put it in {weights_dir}" in text


def test_truncated_and_wrong_files(weights_dir, vits_sd, tmp_path):
    good = weights_dir / "depth-anything" / "Depth-Anything-V2-Small" / "depth_anything_v2_vits.pth"
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 3])
    with pytest.raises(pp.PreprocessorError, match="depth_anything_v2_vits.pth: .*truncated or corrupt"):
        pp.run("depth_anything_v2", test_image(32, 32), depth_model="v2_vits")
    # another annotator's file under the expected name (HED-like keys)
    torch.save({"block1.convs.0.weight": torch.zeros(64, 3, 3, 3)}, good)
    with pytest.raises(pp.PreprocessorError, match="depth_anything_v2_vits.pth is not a Depth Anything weights file"):
        pp.run("depth_anything_v2", test_image(32, 32), depth_model="v2_vits")
    # a ViT-B file under the ViT-S name loads as what it is (the size comes from the shapes)
    assert da.config_of(random_release_state_dict(dim=768, features=128, out_channels=(96, 192, 384, 768)),
                        good.name)["dim"] == 768


def test_tiny_huge_wide_and_batch(tmp_path):
    # A 4-block ViT-S (V1 layout: it taps the last four blocks), so 16 frames stay quick on a CPU.
    root = tmp_path / "annotators"
    root.mkdir()
    torch.save(random_release_state_dict(depth=4, seed=7), root / "depth_anything_vits14.pth")
    files.set_roots_provider(lambda: [root])
    run = lambda image: pp.run("depth_anything_v2", image, depth_model="v1_vits")  # noqa: E731
    try:
        with pytest.raises(pp.PreprocessorError, match="too small: 4x4 pixels.*upscale it first"):
            run(test_image(4, 4))
        tiny = run(test_image(8, 8))
        assert tiny.shape == (1, 8, 8, 3) and np.isfinite(tiny).all()
        flat = run(np.full((20, 20, 3), 128, np.uint8))
        assert np.isfinite(flat).all()
        huge = run(np.zeros((4096, 4096, 3), np.uint8))
        assert huge.shape == (1, 4096, 4096, 3) and np.isfinite(huge).all()
        with pytest.raises(pp.PreprocessorError, match="more than 4 times wider than high.*crop it first"):
            run(np.zeros((16, 200, 3), np.uint8))
        batch = np.stack([test_image(28, 36, seed=i) for i in range(16)])
        out = run(batch)
        assert out.shape == (16, 28, 36, 3)
        np.testing.assert_array_equal(out[5], run(batch[5])[0])
    finally:
        files.set_roots_provider(None)
        registry.clear_models()


def test_depth_model_choices_match_the_file_table():
    assert registry._PARAM_BY_NAME["depth_model"].choices == tuple(da.MODELS)
    assert pp.method_inputs("depth_anything_v2") == ("depth_model",)  # native size: no resolution widget
