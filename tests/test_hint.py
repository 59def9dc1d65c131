"""Hint layout, resize modes and batch rules against hand-computed pixels."""

import pytest
import torch

from comfyui_controlnet_core.controlnet_core.errors import InputError
from comfyui_controlnet_core.controlnet_core.hint import resize_hint, tile_to_batch, to_bchw


def grid(h: int, w: int) -> torch.Tensor:
    """(1, 1, h, w) image whose pixel (r, c) holds 10*r + c (easy to read back)."""
    r = torch.arange(h, dtype=torch.float32)[:, None]
    c = torch.arange(w, dtype=torch.float32)[None]
    return (10 * r + c)[None, None]


def test_both_layouts_give_the_same_bchw():
    img = torch.rand(2, 5, 7, 3)
    a = to_bchw(img)
    b = to_bchw(img.permute(0, 3, 1, 2))
    assert a.shape == (2, 3, 5, 7)
    assert torch.equal(a, b)
    assert torch.equal(a[1, 2], img[1, :, :, 2])


@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.rand(5, 7, 3), "batch"),
        (torch.rand(1, 5, 7, 2), r"has 2 channels .* grey \(1\), RGB \(3\) or RGBA \(4, its alpha is dropped\) images: "
                                  "connect an image from Load Image or a ControlNet preprocessor"),
        (torch.rand(1, 5, 7, 5), "has 5 channels"),
        ((torch.rand(1, 5, 7, 3) * 255).to(torch.uint8), "/ 255"),
    ],
)
def test_bad_layouts_are_named(bad, words):
    with pytest.raises(InputError, match=words.replace("/", r"\/")) as e:
        to_bchw(bad)
    if "channels" in words:  # what a node graph can send: a sentence in its terms, not Python advice
        assert "image[" not in str(e.value)


def test_grey_is_copied_to_rgb_and_alpha_is_dropped():
    rgba = torch.rand(2, 5, 7, 4)
    for layout in (rgba, rgba.permute(0, 3, 1, 2)):  # channels last (ComfyUI) and channels first
        got = to_bchw(layout)
        assert got.shape == (2, 3, 5, 7) and torch.equal(got, rgba[..., :3].permute(0, 3, 1, 2))
    grey = torch.rand(2, 5, 7, 1)
    for layout in (grey, grey.permute(0, 3, 1, 2)):
        got = to_bchw(layout)
        assert got.shape == (2, 3, 5, 7)
        assert all(torch.equal(got[:, c], grey[..., 0]) for c in range(3))
    # a model that takes another channel count gets exactly that, nothing converted
    with pytest.raises(InputError, match="has 4 channels .* takes 1-channel images"):
        to_bchw(rgba, channels=1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_hint_is_an_error(value):
    img = torch.rand(1, 4, 4, 3)
    img[0, 1, 2, 0] = value
    with pytest.raises(InputError, match="NaN or Inf"):
        to_bchw(img)


def test_crop_cuts_the_centre_like_comfyui():
    # 4x10 -> 8x8: aspect 2.5 > 1, ComfyUI cuts x = round((10 - 10 * (1 / 2.5)) / 2) = 3 columns
    # each side: columns 3..6 remain, then nearest-exact doubles every pixel.
    out = resize_hint(grid(4, 10), 8, 8, "crop", "nearest-exact")
    want = torch.tensor([[10 * r + c for c in (3, 3, 4, 4, 5, 5, 6, 6)] for r in (0, 0, 1, 1, 2, 2, 3, 3)])
    assert torch.equal(out[0, 0], want.float())


def test_crop_tall_image_cuts_rows():
    # 10x4 -> 8x8: y = 3 rows cut top and bottom, rows 3..6 remain.
    out = resize_hint(grid(10, 4), 8, 8, "crop", "nearest-exact")
    assert torch.equal(out[0, 0, ::2, ::2], grid(10, 4)[0, 0, 3:7])


def test_pad_fits_inside_and_fills_with_zero():
    # 4x8 -> 8x8: scale min(8/8, 8/4) = 1, the image keeps 4x8 and gets 2 zero rows above and below.
    img = grid(4, 8) + 1  # +1 so no image pixel is 0
    out = resize_hint(img, 8, 8, "pad", "nearest-exact")
    assert torch.equal(out[0, 0, 2:6], img[0, 0])
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 8))
    assert torch.equal(out[0, 0, 6:], torch.zeros(2, 8))


def test_stretch_scales_each_axis():
    out = resize_hint(grid(4, 8), 8, 8, "stretch", "nearest-exact")
    assert torch.equal(out[0, 0, 0::2], grid(4, 8)[0, 0])
    assert torch.equal(out[0, 0, 1::2], grid(4, 8)[0, 0])


@pytest.mark.parametrize("interpolation", ["bilinear", "area"])
def test_halving_averages_2x2_blocks(interpolation):
    # With align_corners=False a 2x bilinear shrink samples exactly between four pixels: their mean.
    img = grid(4, 4)
    out = resize_hint(img, 2, 2, "stretch", interpolation)
    want = torch.tensor([[5.5, 7.5], [25.5, 27.5]])
    assert torch.allclose(out[0, 0], want)


def keys_cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> torch.Tensor:
    """Resampling matrix of Keys' cubic convolution (a = -0.75, OpenCV's and torch's), written from the
    formula: output i samples the input at (i + 0.5) * n_in / n_out - 0.5 (align_corners=False), with
    weights W(d) = (a+2)|d|^3 - (a+3)|d|^2 + 1 for |d| <= 1, a|d|^3 - 5a|d|^2 + 8a|d| - 4a for 1 < |d| < 2,
    and the border pixels repeated."""
    import math

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(x)
        for k in range(-1, 3):
            d = abs(x - (x0 + k))
            w = (a + 2) * d**3 - (a + 3) * d**2 + 1 if d <= 1 else a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
            m[i, min(max(x0 + k, 0), n_in - 1)] += w
    return m


def test_bicubic_is_keys_cubic_convolution():
    img = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    out = resize_hint(img, 16, 12, "stretch", "bicubic")
    rows, cols = keys_cubic_matrix(5, 16), keys_cubic_matrix(7, 12)
    want = torch.einsum("ij,bcjk,lk->bcil", rows, img.double(), cols)
    assert out.shape == (1, 3, 16, 12)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["stretch", "crop", "pad"])
def test_inpaint_sentinel_passes_unclipped(mode):
    img = torch.full((1, 3, 4, 8), 0.5)
    img[:, :, :, 3:5] = -1.0  # masked pixels of an inpaint hint
    out = resize_hint(img, 8, 8, mode, "nearest-exact")
    assert out.min() == -1.0
    assert ((out == -1.0) | (out == 0.5) | (out == 0.0)).all()
    # Smooth interpolation is not clamped either: bicubic overshoots below -1 next to the edge.
    smooth = resize_hint(img, 16, 16, mode, "bicubic")
    assert smooth.min() < -1.0


def test_unknown_mode_is_named():
    with pytest.raises(InputError, match="resize mode 'fill'"):
        resize_hint(grid(2, 2), 4, 4, "fill")
    with pytest.raises(InputError, match="interpolation 'lanczos'"):
        resize_hint(grid(2, 2), 4, 4, "crop", "lanczos")


def test_batch_rules():
    one = torch.rand(1, 3)
    assert tile_to_batch(one, 6, 2) is one  # one hint broadcasts
    frames = torch.rand(3, 3)
    tiled = tile_to_batch(frames, 6, 2)  # 3 frames, cond+uncond chunks of 3
    assert torch.equal(tiled, torch.cat([frames, frames]))
    assert tile_to_batch(frames, 3, 1) is frames
    with pytest.raises(InputError, match="2 hint images for 3 latents"):
        tile_to_batch(torch.rand(2, 3), 6, 2)
    # ComfyUI would repeat a 6-hint batch onto 3 latents per chunk; we refuse.
    with pytest.raises(InputError, match="exactly 3"):
        tile_to_batch(torch.rand(6, 3), 6, 2)


def test_hint_embedding_is_computed_a_few_hints_at_a_time(monkeypatch):
    """The encoder's first layers work at the hint's full size; a big batch is embedded in chunks of
    EMBED_CHUNK_PIXELS and concatenated, which must equal embedding the whole batch at once."""
    from comfyui_controlnet_core.controlnet_core import control
    from helpers_models import make_tiny_config, random_controlnet

    net = random_controlnet(make_tiny_config("sd15"), seed=2)
    hints = torch.rand(5, 64, 64, 3)
    seen = []
    real = net.embed_hint
    monkeypatch.setattr(net, "embed_hint", lambda h: seen.append(h.shape[0]) or real(h))
    monkeypatch.setattr(control, "EMBED_CHUNK_PIXELS", 2 * 64 * 64)
    c = control.Control(net, hints)
    c.pre_run(lambda p: 1e9 if p <= 0 else 0.0)
    with torch.no_grad():
        got = c.hint_embedding(8, 8, "cpu")
        want = real(to_bchw(hints))
    assert seen == [2, 2, 1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_many_big_hints_stay_within_the_stated_memory_bound():
    """16 hints at 512 px through SD1.5's hint encoder (README: "Big hints"): the peak resident memory
    above the start stays under 3x the IMAGE (48 MiB) + 400 MiB. Measured on a 2-core CPU, torch 2.13:
    374 MiB; embedding all 16 at once peaked at 877 MiB (16 channels at 512x512 per hint, 256 MiB per
    activation)."""
    import subprocess
    import sys

    code = r'''
import dataclasses, resource, torch
from comfyui_controlnet_core.controlnet_core import SD15, Control, ControlNet
torch.set_num_threads(2)
cfg = dataclasses.replace(SD15, model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 1), context_dim=64)
net = ControlNet(cfg).eval()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
image = torch.rand(16, 512, 512, 3)
c = Control(net, image)
c.pre_run(lambda p: 1e9 if p <= 0 else 0.0)
with torch.no_grad():
    c.hint_embedding(64, 64, "cpu")
with open("/proc/self/status") as f:  # VmHWM: this process's peak (ru_maxrss can carry the parent's over exec)
    peak = int(next(l for l in f if l.startswith("VmHWM:")).split()[1]) * 1024
print((peak - before) / 2**20, image.numel() * 4 / 2**20)
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    peak, image = map(float, r.stdout.split())
    assert peak < 3 * image + 400, (peak, image)
