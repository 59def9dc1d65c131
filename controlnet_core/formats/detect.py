"""Which kind of file a key set is: the ControlNet layouts, the other control families, and the
well-known files that are not controls at all (named, so the user hears what they gave us).

A file of one family must never be half-read as another. The tell-tale keys follow what the hosts
use to tell families apart (ComfyUI's `load_controlnet_state_dict`, ComfyUI-Advanced-ControlNet),
checked most specific first. Detection needs only the key names, so the loader runs it on the
file's header before any tensor is read (a 2 GB checkpoint in the wrong folder costs nothing).

`detect(keys)` returns a `Detected(family, layout, display)`; whether a family can be *run* is the
loader's business (`loader.FAMILY_LOADERS`), not detection's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import LoadError
from . import controlnext

ORIGINAL_PREFIX = "control_model."

# Families (`Detected.family`).
CONTROLNET = "controlnet"
T2I_ADAPTER = "t2i-adapter"
CONTROL_LORA = "control-lora"
UNION = "controlnet-union"
LLLITE = "controlnet-lllite"
CONTROLNEXT = "controlnext"
FLUX = "flux-controlnet"
OTHER = "other"  # recognised, named, not run by this pack (Flux, SD3, style adapters, ...)

# ControlNet layouts (`Detected.layout` of the controlnet family).
ORIGINAL = "original"                     # lllyasviel v1.1 / unprefixed LDM names (our native names)
ORIGINAL_PREFIXED = "original-prefixed"   # lllyasviel v1.0 `control_model.` prefix
DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class Detected:
    family: str    # one of the family constants above
    layout: str    # key layout within the family ("original", "diffusers", ...; "" if it has one)
    display: str   # what users call it, for messages: "a T2I-Adapter (light)"


def _any(keys: Iterable[str], pred) -> bool:
    return any(pred(k) for k in keys)


def _other_family(keys: set[str]) -> Detected | None:
    """A recognised control family other than the classic ControlNet, else None."""
    has = keys.__contains__
    if controlnext.is_module(keys):
        # the layout names the variant(s) for the loader's label: "ControlNeXt · SDXL · SDXL / SD1.5-v2 module"
        if controlnext.module_layout(keys) == controlnext.STEM:
            return Detected(CONTROLNEXT, "SDXL / SD1.5-v2 module", "a ControlNeXt")
        return Detected(CONTROLNEXT, "SD1.5-v1 module", "a ControlNeXt")
    if has("style_embedding"):  # before Union: the style adapter also has `transformer_layes`
        return Detected(OTHER, "", "a T2I-Adapter (style)")
    if has("after_proj_list.18.bias"):
        return Detected(OTHER, "", "a HunyuanDiT ControlNet")
    if has("lora_controlnet") or _any(keys, lambda k: k.startswith("lora_controlnet")):
        return Detected(CONTROL_LORA, "", "a Control-LoRA (Stability AI)")
    if has("lllite_conditioning1.conv1.weight") or _any(keys, lambda k: k.startswith("lllite_dit_blocks_")):
        return Detected(OTHER, "", "an Anima ControlNet-LLLite (DiT)")
    if _any(keys, lambda k: "lllite" in k):
        return Detected(LLLITE, "", "a ControlNet-LLLite")
    if _any(keys, lambda k: k.startswith("task_embedding") or k.startswith("control_add_embedding.")
            or ".transformer_layes." in k or k.startswith("transformer_layes.")
            or k.startswith("control_model.task_embedding")):
        return Detected(UNION, DIFFUSERS, "a ControlNet Union / ProMax (xinsir)")
    if has("controlnet_blocks.0.y_rms.weight"):
        return Detected(OTHER, "", "a Qwen-Image block-wise ControlNet (DiffSynth)")
    if has("controlnet_blocks.0.linear.weight") and has("img_in.weight") and has("input_cond_block.encoder.0.weight"):
        return Detected(FLUX, "mistoline", "a Flux ControlNet (pixel hint)")  # TheMisto's MistoLine
    if has("controlnet_blocks.0.weight") or _any(keys, lambda k: k.startswith("controlnet_blocks.")):
        if has("transformer_blocks.0.img_mlp.net.0.proj.weight"):  # before Flux: Qwen also has img_in
            return Detected(OTHER, "", "a Qwen-Image ControlNet (InstantX)")
        flux = _flux_layout(keys)
        if flux is not None:
            return flux
        if has("pos_embed_input.proj.weight"):
            return Detected(OTHER, "", "an SD3 / SD3.5 ControlNet")
        return Detected(OTHER, "", "a DiT ControlNet (SD3 / Flux family)")
    if _any(keys, lambda k: "motion_modules" in k):
        return Detected(OTHER, "", "a SparseCtrl / AnimateDiff motion model")
    if _any(keys, lambda k: "temporal_res_block" in k):
        return Detected(OTHER, "", "an SVD ControlNet")
    if _any(keys, lambda k: "lora_layer" in k) and _any(keys, lambda k: "zero_convs" in k or "controlnet" in k):
        return Detected(OTHER, "", "a CtrLoRA")
    if _any(keys, lambda k: k.startswith("adapter.") or k.startswith("body.")):
        layout = DIFFUSERS if _any(keys, lambda k: k.startswith("adapter.")) else "tencentarc"
        light = "body.0.in_conv.weight" in keys or _any(keys, lambda k: k.startswith("adapter.body.0.in_conv."))
        return Detected(T2I_ADAPTER, layout, "a T2I-Adapter (light)" if light else "a T2I-Adapter")
    if has("backbone.0.0.weight") or has("backbone.10.blocks.0.weight"):
        return Detected(OTHER, "", "a Stable Cascade ControlNet")
    if has(ORIGINAL_PREFIX + "zero_convs.0.0.weight") and has("difference"):
        return Detected(OTHER, "", "a Diff-ControlNet (weights stored as a difference to the base model)")
    return None


def _flux_layout(keys: set[str]) -> Detected | None:
    """A Flux ControlNet, told by what it is rather than by its block names (ComfyUI builds a
    latent net re-saved with BFL names as XLabs, and XLabs' diffusers files as latent nets):
    the pixel stem `input_hint_block` makes it XLabs-style (pixel hint), else the hint is a latent."""
    diffusers = "controlnet_x_embedder.weight" in keys and (
        "x_embedder.weight" in keys or _any(keys, lambda k: k.startswith(("transformer_blocks.", "single_transformer_blocks.")))
    )
    native = "img_in.weight" in keys and "pos_embed_input.weight" in keys and (
        "double_blocks.0.img_attn.norm.key_norm.scale" in keys or "single_blocks.0.linear1.weight" in keys
    )
    if not (diffusers or native):
        return None
    pixel = _any(keys, lambda k: k.startswith("input_hint_block."))
    hint = "pixel hint" if pixel else "latent hint"
    layout = "diffusers" if diffusers else "xlabs" if pixel else "native"
    return Detected(FLUX, layout, f"a Flux ControlNet ({hint})")


def _not_a_controlnet(keys: set[str]) -> str | None:
    """What a non-ControlNet file is, if it looks like something well known."""
    if controlnext.is_unet_weights(keys):
        return ("the UNet-weights half of a ControlNeXt (attention out-projections only), not a control model; "
                "load it with 'Load ControlNeXt UNet Weights (CNCore)' on your MODEL, and the module file beside "
                "it (controlnet.safetensors) with this loader")
    if _any(keys, lambda k: k.startswith("model.diffusion_model.")):
        return "a full Stable Diffusion checkpoint (UNet + VAE + text encoder), not a ControlNet; load it with a checkpoint loader"
    if _any(keys, lambda k: ("lora_up" in k or "lora_down" in k or "lora_A" in k or "lora_B" in k
                              or k.startswith("lora_unet_") or k.startswith("lora_te") or k.endswith(".alpha"))):
        return "a LoRA, not a ControlNet; load it with a LoRA loader"
    if (_any(keys, lambda k: k.startswith("encoder.conv_in.") or k.startswith("first_stage_model."))
            and _any(keys, lambda k: k.startswith("decoder.") or k.startswith("first_stage_model."))):
        return "a VAE, not a ControlNet; load it with a VAE loader"
    if _any(keys, lambda k: ("text_model.encoder." in k or k.startswith("cond_stage_model.")
                              or k.startswith("conditioner.embedders") or k.startswith("encoder.block.0.layer")
                              or k.startswith("shared.weight") or "token_embedding" in k)):
        return "a text encoder (CLIP/T5), not a ControlNet; load it with a CLIP loader"
    if _any(keys, lambda k: k.startswith("up_blocks.")) and "conv_in.weight" in keys:
        return "a diffusers UNet, not a ControlNet; load it with a UNet loader"
    if _any(keys, lambda k: k.startswith("output_blocks.") or k.startswith("out.0.")):
        return "a Stable Diffusion UNet, not a ControlNet; load it with a UNet loader"
    return None


def detect(keys: Iterable[str], name: str) -> Detected:
    """The family and layout of a key set; a LoadError naming what it is when it is no control model.

    `name` is the file name used in the message.
    """
    keys = set(keys)
    if not keys:
        raise LoadError(f"{name}: holds no tensors at all; it is not a model checkpoint")
    family = _other_family(keys)
    if family is not None:
        return family
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return Detected(CONTROLNET, DIFFUSERS, "a ControlNet (diffusers layout)")
    if ORIGINAL_PREFIX + "zero_convs.0.0.weight" in keys:
        return Detected(CONTROLNET, ORIGINAL_PREFIXED, "a ControlNet (original layout)")
    if "zero_convs.0.0.weight" in keys:
        return Detected(CONTROLNET, ORIGINAL, "a ControlNet (v1.1 layout)")
    what = _not_a_controlnet(keys)
    if what is not None:
        raise LoadError(f"{name}: this is {what}")
    some = ", ".join(sorted(keys)[:4])
    raise LoadError(
        f"{name}: is not a ControlNet: it has none of the keys a ControlNet has "
        f"(zero_convs.*, controlnet_cond_embedding.*); first keys: {some}"
    )
