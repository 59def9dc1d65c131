"""Hint images: layout, resizing to 8x the latent, and the batch rules.

A hint arrives as a float image batch in [0, 1], either (B, H, W, C) (ComfyUI's IMAGE layout) or
(B, C, H, W), at any size. Before the ControlNet sees it, it is resized to exactly 8x the latent
(`resize_hint`) and matched to the latent batch (`tile_to_batch`).

Resize modes (the aspect ratio of hint and latent may differ):
  stretch  scale each axis on its own (aspect distorted, nothing lost);
  crop     scale to cover the target and cut the overflow evenly on both sides. This is ComfyUI's
           `common_upscale(hint, W, H, method, "center")` used by `ControlNet.get_control`, with the
           same rounding of the cut, so crop + nearest-exact reproduces ComfyUI's hint exactly;
  pad      scale to fit inside the target and fill the border evenly with 0 (black).
Interpolations are torch's `F.interpolate` modes with align_corners=False (what ComfyUI passes):
nearest-exact (ComfyUI's default, `upscale_algorithm`), bilinear, bicubic, area.
Defaults: crop + nearest-exact = ComfyUI.

Nothing is clamped: the inpaint ControlNet marks masked pixels with -1 and that value must reach the
network. Under nearest-exact (and area/bilinear away from mask edges) -1 pixels stay exactly -1;
bicubic may overshoot [0, 1] near edges, as it does in ComfyUI.

Batch rules (`tile_to_batch`): the latent batch the UNet sees is k equal chunks (cond/uncond, the
host's `cond_or_uncond`) of N latents, e.g. N video frames. Allowed: 1 hint (used for every latent),
or N hints (hint i goes with latent i in every chunk). Anything else is an error: ComfyUI silently
cycles or truncates the hints, which hides mistakes such as a 16-frame hint on a 12-frame batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError

RESIZE_MODES = ("stretch", "crop", "pad")
INTERPOLATIONS = ("nearest-exact", "bilinear", "bicubic", "area")


def to_bchw(image: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """A validated float (B, C, H, W) copy of a hint batch given as (B, H, W, C) or (B, C, H, W).

    For a model that takes RGB hints (`channels` 3), other images are taken as the preprocessors take
    them: grey (1 channel) is copied to R, G and B; RGBA (4) drops its alpha channel and uses the
    colour as stored (ComfyUI's Load Image likewise splits alpha off into a separate MASK). Other
    channel counts are refused. A layout whose channel count is exactly `channels` is preferred; when
    both readings fit, the ComfyUI layout (channels last) wins.
    """
    if not isinstance(image, torch.Tensor):
        raise InputError(f"the hint must be a torch tensor image batch; got {type(image).__name__}")
    if image.ndim != 4:
        raise InputError(
            f"the hint must be an image batch (batch, height, width, {channels}) or (batch, {channels}, "
            f"height, width); got shape {tuple(image.shape)}; add a batch dimension with image[None]"
        )
    if not image.is_floating_point():
        raise InputError(
            f"the hint must be a float image in [0, 1]; got {image.dtype}; convert 8-bit images with "
            "image.float() / 255"
        )
    takes = (channels, 1, 4) if channels == 3 else (channels,)
    if image.shape[-1] == channels:
        image = image.movedim(-1, 1)
    elif image.shape[1] == channels:
        pass
    elif image.shape[-1] in takes:
        image = image.movedim(-1, 1)
    elif image.shape[1] not in takes:
        got = image.shape[-1] if image.shape[-1] <= 4 else image.shape[1]
        accepted = "grey (1), RGB (3) or RGBA (4, its alpha is dropped)" if channels == 3 else f"{channels}-channel"
        raise InputError(
            f"the hint image has {got} channels (shape {tuple(image.shape)}); this control model takes "
            f"{accepted} images: connect an image from Load Image or a ControlNet preprocessor"
        )
    if image.shape[1] == 1 and channels == 3:
        image = image.expand(-1, 3, -1, -1)
    elif image.shape[1] == 4 and channels == 3:
        image = image[:, :3]
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise InputError(f"the hint batch is empty: shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise InputError("the hint contains NaN or Inf values; check the preprocessor that made it")
    return image.float().contiguous()


def resize_hint(
    hint: torch.Tensor, height: int, width: int, mode: str = "crop", interpolation: str = "nearest-exact"
) -> torch.Tensor:
    """Resize a (B, C, H, W) hint to exactly (height, width) with a resize mode and interpolation."""
    check_choice("resize mode", mode, RESIZE_MODES)
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    h, w = hint.shape[-2:]
    if mode == "crop":
        # ComfyUI's centre cut: the same rounding, the same cut on both sides.
        old_aspect, new_aspect = w / h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((w - w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((h - h * (old_aspect / new_aspect)) / 2)
        return _interpolate(hint[:, :, y : h - y, x : w - x], height, width, interpolation)
    if mode == "pad":
        scale = min(width / w, height / h)
        fit_h = min(height, max(1, round(h * scale)))
        fit_w = min(width, max(1, round(w * scale)))
        inner = _interpolate(hint, fit_h, fit_w, interpolation)
        top, left = (height - fit_h) // 2, (width - fit_w) // 2
        return F.pad(inner, (left, width - fit_w - left, top, height - fit_h - top), value=0.0)
    return _interpolate(hint, height, width, interpolation)


def _interpolate(image: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (height, width):
        return image
    # align_corners=False for the linear modes is torch's default and what ComfyUI uses.
    extra = {"align_corners": False} if interpolation in ("bilinear", "bicubic") else {}
    return F.interpolate(image, size=(height, width), mode=interpolation, **extra)


def tile_to_batch(t: torch.Tensor, batch: int, chunks: int, what: str = "hint") -> torch.Tensor:
    """Match a per-latent tensor (hints, their embedding, masks) to a batch of `chunks` equal chunks.

    1 entry stays 1 (it broadcasts); N entries for chunks of N latents are repeated once per chunk.
    """
    if chunks < 1 or batch % chunks:
        raise InputError(f"a batch of {batch} cannot be split into {chunks} equal cond/uncond chunks")
    per_chunk = batch // chunks
    n = t.shape[0]
    if n == 1:
        return t
    if n == per_chunk:
        return t.repeat(chunks, *([1] * (t.ndim - 1))) if chunks > 1 else t
    raise InputError(
        f"{n} {what} images for {per_chunk} latents (a batch of {batch} = {chunks} cond/uncond chunk(s) of "
        f"{per_chunk}); give 1 {what} for all latents or exactly {per_chunk}, one per latent"
    )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
