"""ControlNeXt file layouts (dvlab-research/ControlNeXt): the control module and the UNet weights.

A released ControlNeXt is two files (`controlnet.safetensors` + `unet.safetensors`):

The module, keys as the reference `nn.Module`s name them. Two layouts:

    "stem" (SDXL `ControlNeXt-SDXL/models/controlnet.py`, = SD1.5-v2 `ControlNeXt-SD1.5-Training/
    models/controlnext.py`, 52 tensors): `time_embedding.linear_{1,2}`; `embedding.{0,3,6}` convs and
    `embedding.{1,4,7}` GroupNorms (the stem, stride 2); `down_res.{0,1}` diffusers ResnetBlock2Ds
    (128->128 groups 4, 128->256 groups 8 with `conv_shortcut`); `down_sample.{0,1}.conv`;
    `mid_convs.0.{0,3}` convs + `mid_convs.0.{2,4}` GroupNorms (a residual); `mid_convs.1` the 1x1
    projection to the host's width (320). The file does not say which base model it is for: SDXL and
    SD1.5-v2 files are key- and shape-identical, so the host decides when sampling starts.

    "sd15-v1" (`ControlNeXt-SD1.5/models/controlnet.py`, 51 tensors): no stem; `down_res.{0,1,2}`
    (3->128 groups 1, 128->256, 256->256), `down_sample.{0,1,2}.conv`, `mid_convs.0.{0,2}` two convs
    (no norms, no residual), `mid_convs.1` to 1280 (SD1.5's middle block), and `scale`, a learned
    0-dim tensor.

The UNet weights: a subset of the base UNet's attention out-projections (`*.attn1/attn2.to_out.0.
{weight,bias}`), with diffusers names (`down_blocks.1.attentions.0.transformer_blocks.0.attn2...`)
or LDM names (`input_blocks.4.1.transformer_blocks.0.attn2...`; the older SDXL upload). The
reference scripts load the SDXL file as increments (`W += dW`, `load_weight_increasement`) and the
SD1.5 files as replacements (`load_state_dict(strict=False)`); see `unet_patch_kind`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import LoadError

STEM, SD15_V1 = "stem", "sd15-v1"
MODULE_PREFIXES = ("time_embedding.", "embedding.", "down_res.", "down_sample.", "mid_convs.")
# The reference widths (SDXL `utils/tools.py` L79-86; SD1.5-v1 `controlnet.py` L334-336): fixed by
# the architecture; only the last projection's width follows the host.
STEM_RES = ((128, 128, 4), (128, 256, 8))
V1_RES = ((3, 128, 1), (128, 256, 8), (256, 256, 8))


@dataclass(frozen=True)
class ModuleSpec:
    layout: str        # STEM | SD15_V1
    out_channels: int  # width of `mid_convs.1`: the host feature's channels


def is_module(keys: set[str]) -> bool:
    """A ControlNeXt module's key set (either layout)."""
    return ("time_embedding.linear_1.weight" in keys and "down_res.0.conv1.weight" in keys
            and "mid_convs.1.weight" in keys)


def module_layout(keys: set[str]) -> str:
    return STEM if "embedding.0.weight" in keys else SD15_V1


def read_module(shapes: Mapping[str, tuple], file: str) -> ModuleSpec:
    """Layout and output width from the key names and shapes; anything else is refused in a sentence."""
    keys = set(shapes)
    layout = module_layout(keys)
    proj = tuple(shapes.get("mid_convs.1.weight", ()))
    stages = STEM_RES if layout == STEM else V1_RES
    last = stages[-1][1]
    if len(proj) != 4 or proj[1:] != (last, 1, 1):
        raise LoadError(
            f"{file}: mid_convs.1.weight has shape {proj}, but a ControlNeXt {_name(layout)} module ends in a 1x1 "
            f"conv from {last} channels; the file is damaged or another ControlNeXt version (the pre-August-2024 "
            "SDXL upload or an SVD module) that is not supported"
        )
    if layout == SD15_V1 and "scale" not in keys:
        raise LoadError(
            f"{file}: this SD1.5 ControlNeXt module has no learned `scale`; the file is incomplete: download "
            "controlnet.safetensors again"
        )
    if layout == SD15_V1 and "down_res.2.conv1.weight" not in keys:
        raise LoadError(f"{file}: the ControlNeXt module has no down_res.2 (the SD1.5 module has three); it is incomplete")
    return ModuleSpec(layout, int(proj[0]))


def _name(layout: str) -> str:
    return "SDXL / SD1.5-v2" if layout == STEM else "SD1.5 (v1)"


# ------------------------------------------------------------------------------------------------
# the UNet weights file

_DIFFUSERS = re.compile(
    r"^(?:(down|up)_blocks\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.0)\.(transformer_blocks\.\d+\.attn[12]"
    r"\.to_out\.0\.(?:weight|bias))$"
)
_LDM = re.compile(
    r"^(?:(?:input|output)_blocks\.\d+\.1|middle_block\.1)\.transformer_blocks\.\d+\.attn[12]\.to_out\.0\.(?:weight|bias)$"
)
LAYERS_PER_BLOCK = 2  # SD1.x and SDXL UNets: 2 ResBlocks per encoder level, 3 per decoder level


def is_unet_weights(keys: set[str]) -> bool:
    """Only attention out-projections of a UNet (either naming): a ControlNeXt UNet weights file."""
    return bool(keys) and all(_DIFFUSERS.match(k) or _LDM.match(_strip(k)) for k in keys)


def _strip(key: str) -> str:
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def to_ldm(key: str, file: str) -> str:
    """One UNet-weights key with LDM names (ComfyUI's `diffusion_model.*` without the prefix).

    diffusers `down_blocks.b.attentions.a` is LDM input block 1 + b * 3 + a (each level: 2 ResBlock
    blocks then a downsample), `up_blocks.b.attentions.a` output block b * 3 + a, `mid_block` the
    middle block's transformer (index 1), as diffusers' own converter maps them
    (`convert_ldm_unet_checkpoint`) for SD1.x and SDXL."""
    stripped = _strip(key)
    if _LDM.match(stripped):
        return stripped
    m = _DIFFUSERS.match(key)
    if m is None:
        raise LoadError(
            f"{file}: {key!r} is not an attention out-projection of a Stable Diffusion UNet; a ControlNeXt UNet "
            "weights file holds only *.attn1/attn2.to_out.0 weights"
        )
    kind, block, attn, rest = m.groups()
    if kind is None:
        return f"middle_block.1.{rest}"
    b, a = int(block), int(attn)
    if kind == "down":
        return f"input_blocks.{1 + b * (LAYERS_PER_BLOCK + 1) + a}.1.{rest}"
    return f"output_blocks.{b * (LAYERS_PER_BLOCK + 1) + a}.1.{rest}"


def unet_patch_kind(weights: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> str:
    """"delta" (the file holds W_finetuned - W_base, the SDXL release) or "absolute" (W_finetuned,
    the SD1.5 releases), told by which the file is closer to: the base weights or zero. A fine-tuned
    weight is the base weight moved a little; an increment is that little move. Summed over the file
    (fp32), so one odd tensor does not decide."""
    to_base = to_zero = 0.0
    for k, w in weights.items():
        f, b = w.float(), base[k].float().to(w.device)
        to_base += float((f - b).pow(2).sum())
        to_zero += float(f.pow(2).sum())
    return "absolute" if to_base < to_zero else "delta"


def read_unet_weights(path: str, name: str) -> dict[str, torch.Tensor]:
    """A ControlNeXt UNet weights file as {LDM key: tensor}; any other file is refused in a sentence
    from its header, before its tensors are read."""
    from .files import read_state_dict

    def check(header: Mapping) -> None:
        keys = set(header)
        if is_module(keys):
            raise LoadError(
                f"{name}: this is the ControlNeXt module (controlnet.safetensors), not its UNet weights; load it "
                "with 'Load ControlNet (CNCore)' and apply it with 'Apply ControlNet (CNCore)'; this node takes the "
                "unet.safetensors beside it"
            )
        if not is_unet_weights(keys):
            some = ", ".join(sorted(keys)[:3])
            raise LoadError(
                f"{name}: is no ControlNeXt UNet weights file (those hold only attention out-projections, "
                f"*.attn1/attn2.to_out.0.*); first keys: {some}"
            )

    sd, _ = read_state_dict(path, check=check)
    return {to_ldm(k, name): v for k, v in sd.items()}


def unet_patches(weights: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], name: str,
                 model_name: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, {LDM key: increment}) for the base UNet `base` (LDM keys): the file's increments as
    they are, or its absolute weights as W_file - W_base (fp32), so both apply as `W + strength * dW`
    (strength 1: exactly the reference scripts' result). Keys or shapes the base lacks: a sentence."""
    for k, w in weights.items():
        b = base.get(k)
        if b is None or tuple(b.shape) != tuple(w.shape):
            got = "has no such weight" if b is None else f"has {tuple(b.shape)} there"
            raise LoadError(
                f"{name}: the ControlNeXt UNet weights are for another base model: {k} is {tuple(w.shape)} in the "
                f"file but the model ({model_name}) {got}; use the unet.safetensors released with a ControlNeXt "
                "for your checkpoint's family (SDXL or SD1.5)"
            )
    kind = unet_patch_kind(weights, base)
    if kind == "delta":
        return kind, dict(weights)
    return kind, {k: w.float() - base[k].float().to(w.device) for k, w in weights.items()}
