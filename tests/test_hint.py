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
        (torch.rand(1, 5, 7, 4), "colour channels"),
        ((torch.rand(1, 5, 7, 3) * 255).to(torch.uint8), "/ 255"),
    ],
)
def test_bad_layouts_are_named(bad, words):
    with pytest.raises(InputError, match=words.replace("/", r"\/")):
        to_bchw(bad)


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


def test_bicubic_runs():
    out = resize_hint(torch.rand(1, 3, 5, 5), 16, 16, "stretch", "bicubic")
    assert out.shape == (1, 3, 16, 16)


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
