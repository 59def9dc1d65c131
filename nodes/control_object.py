"""Our control object's behaviour in ComfyUI's control protocol, kept free of any `comfy` import.

ComfyUI puts a control object in every conditioning's `control` entry and drives it from the
sampler (see `comfy/controlnet.py`, `comfy/samplers.py`):

    pre_run(model, percent_to_sigma)       once per sampling run (also for the chain)
    get_control(x, sigma, cond, batched_number, transformer_options)
                                           once per model call; returns {"input", "middle", "output"}
    get_models() / inference_memory_requirements(dtype)   memory planning
    cleanup()                              after a run that ended normally (skipped on errors)
    copy() / set_cond_hint(...) / set_previous_controlnet(prev)   apply nodes

`CoreControlMixin` implements that on top of `controlnet_core`: `adapter.control_class()` mixes it
with ComfyUI's own `ControlBase` at run time, so the attributes the host and other packs read
(`previous_controlnet`, `extra_hooks`, `strength`, `timestep_percent_range`, ...) are inherited.
One object can carry several controls (the main one plus a CONTROL_STACK); they are evaluated in
one call through `ControlStack`, and the result is added to the residuals of the previous control
in the chain, exactly like ComfyUI's `control_merge` sums a chain.

Traps handled here: every call returns fresh lists (the UNet pops them); per-run state (active
sigma ranges, cached hint embeddings) is rebuilt in `pre_run` because `cleanup` is skipped when a
run fails or is interrupted and node outputs are reused across re-queues. The CUDA fast path's
graphs and buffers of a run are released in `cleanup` (and, after a failed run, at the next
`pre_run`), so ComfyUI's model unloading and `/free` get that memory back. With the fast path's
`overlap` on, the residual dict makes ComfyUI's stream wait at its first read (`fast.on_read`),
because ComfyUI never calls the dict's "sync".

Attention-input patches (ControlNet-LLLite; `controlnet_core/host.py`) go through ComfyUI's own
mechanism: `get_control` receives the `transformer_options` of this one model call, and we add an
`attn1_patch` and an `attn2_patch` to its `patches` (in a new dict and new lists, so nothing that
ComfyUI or another pack shares is changed). ComfyUI's `BasicTransformerBlock` calls them with the
inputs of the projections, `(n, context_attn1, value_attn1, extra_options)` for self-attention and
`(n, context, value)` for cross-attention; `extra_options["block"]` and `["block_index"]` name the
site. The options die with the call, so nothing can leak into the next step or prompt, even when a
run fails.

Feature additions (ControlNeXt; `host.FEATURE`) go the same way, as two more per-call patches:
`input_block_patch_after_skip` (ComfyUI calls it after each input block, once the skip is kept, with
`transformer_options["block"] == ("input", i)`) for the ("input", i) points, and `output_block_patch`
at ("output", 0) on its first argument `h` (the middle block's output with the `middle` residual
added; ComfyUI has no middle-block patch) for the ("middle", 0) point. Both return new tensors, so
the skip the decoder reads stays untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..controlnet_core import fast
from ..controlnet_core.control import Control, ControlSettings, ControlStack, with_control_type
from ..controlnet_core.errors import ControlNetError, InputError
from ..controlnet_core.hint import resize_hint
from ..controlnet_core.host import (
    ATTENTION, COND, FEATURE, AttnFn, AttnSite, FeatureFn, StepRequest, apply_attention, apply_features,
)

DEFAULT_MODE = "balanced"
DEFAULT_RESIZE = "crop"
DEFAULT_INTERPOLATION = "nearest-exact"
DEFAULT_CONTROL_TYPE = "auto"

FAMILY = {"sd15": "SD1.x", "sd21": "SD2.x", "sdxl": "SDXL", "flux": "Flux.1"}
ARCH_OF_WIDTH = {768: "sd15", 1024: "sd21", 2048: "sdxl"}  # text-conditioning width -> base model


def family_of_width(width: int) -> str:
    """The checkpoint family a text-conditioning width belongs to."""
    return {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner", 4096: "a T5-based model"}.get(
        int(width), f"an unknown model (text width {int(width)})"
    )


def needs_y(net: Any) -> bool:
    """Whether a control model takes SDXL's `y` vector (pooled text + sizes)."""
    return getattr(net, "adm_channels", None) is not None


def reads_input(net: Any, name: str) -> bool:
    """Whether a control model reads this optional host input ("y": a DiT's pooled text,
    "guidance": Flux dev's distilled guidance)."""
    return name in getattr(net, "host_inputs", ())


def arch_of(context_dim: int | None, adm: int | None) -> str | None:
    """"sd15", "sd21", "sdxl" for the public base models' widths; None for anything else."""
    arch = ARCH_OF_WIDTH.get(int(context_dim)) if context_dim is not None else None
    if arch is not None and (arch == "sdxl") != (adm == 2816):
        return None
    return arch


class NetHandle:
    """A loaded ControlNet, its display name, and the host's memory-manager handle (a ComfyUI
    ModelPatcher). Shared by every copy of a control object, so the weights load once."""

    def __init__(self, net: Any, patcher: Any = None, name: str = "ControlNet"):
        self.net = net
        self.patcher = patcher
        self.name = name

    @property
    def family(self) -> str:
        """The base model family it is made for ("SD1.x", "SD2.x", "SDXL")."""
        return FAMILY.get(self.net.arch, self.net.arch)

    @property
    def kind(self) -> str:
        """What it is, for messages: "ControlNet", "T2I-Adapter", ..."""
        return getattr(self.net, "family", "ControlNet")

    @property
    def host(self) -> Any:
        """The DiT host layout it is made for (`controlnet_core.host.DiTHost`), None for UNet families."""
        return getattr(self.net, "host", None)

    def fits(self, context_dim: int | None, adm: int | None, check_adm: bool = True) -> bool:
        """Whether it runs on a base model of this text width (and `y` width). A model that knows
        its base model's text width (a ControlNet: `context_dim`) must match it exactly; other
        families (adapters) name the base models they fit (`host_archs`). A DiT family reads no SDXL
        `y`: only its text width counts (the host kind is checked by `cncore_check_model`)."""
        net = self.net
        want = getattr(net, "context_dim", None)
        if self.host is not None:
            return context_dim == want
        if want is not None:
            return context_dim == want and (not check_adm or (adm is None) == (getattr(net, "adm_channels", None) is None))
        if not check_adm:
            adm = 2816 if context_dim == 2048 else None
        return arch_of(context_dim, adm) in tuple(net.host_archs)


@dataclass(frozen=True)
class StackEntry:
    """One control of a CONTROL_STACK (the CNCore_CombineControls output)."""

    control_net: Any
    image: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    mask: torch.Tensor | None = None
    control_type: str = DEFAULT_CONTROL_TYPE


@dataclass(frozen=True)
class BoundEntry:
    """A stack entry resolved to one of our networks."""

    handle: NetHandle
    hint: torch.Tensor  # (B, C, H, W)
    strength: float
    start_percent: float
    end_percent: float
    mask: torch.Tensor | None
    global_pool: bool = False  # its own control object's `global_average_pooling` (shuffle files)
    control_type: str = DEFAULT_CONTROL_TYPE


def normalize_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """ComfyUI MASKs are (B, H, W), sometimes (H, W); anything else is refused."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"the mask must be a ComfyUI MASK (a tensor); got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[-1] == 1:  # (B, H, W, 1) from some image-to-mask nodes
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise InputError(
            f"the mask must be (batch, height, width) like ComfyUI's MASK; got shape {tuple(mask.shape)}"
        )
    return mask


def check_mask_fits(mask: torch.Tensor, latent_h: int, latent_w: int, what: str = "mask") -> None:
    """A region mask must have the shape of the generated image (up to scale), or it is stretched."""
    mh, mw = mask.shape[-2:]
    if abs(mw * latent_h / mh - latent_w) > 1.0:  # more than one latent cell off
        raise InputError(
            f"the {what} is {mw}x{mh} pixels but the image being generated is {8 * latent_w}x{8 * latent_h}: "
            "their shapes differ, so the region would be stretched; give a mask of the same size (or aspect "
            "ratio) as the generated image"
        )


def merge_residuals(own: dict | None, prev: dict | None) -> dict | None:
    """Index-wise sum of two control dicts (prev + own), in fresh lists; None entries are holes.
    With one of them None the other is returned as it is (already fresh lists; an overlapped
    dict keeps its wait-on-read until the UNet reads it)."""
    if own is None or prev is None:
        return prev if own is None else own
    out: dict[str, list] = {"input": [], "middle": [], "output": []}
    for key in out:
        a = list(own.get(key) or [])
        b = list(prev.get(key) or [])
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else None
            p = b[i] if i < len(b) else None
            out[key].append(p if x is None else x if p is None else p + x)
    return out


class AttentionPatches:
    """Attention-input patches in ComfyUI's `attn1_patch` / `attn2_patch` form, for one model call."""

    def __init__(self, patches: dict[AttnSite, list[AttnFn]]):
        self.patches = patches

    def _site(self, extra_options: dict, attn: str, proj: str, h: torch.Tensor) -> torch.Tensor:
        block = extra_options.get("block")  # None outside a UNet block (other model types)
        fns = None if block is None else self.patches.get(
            AttnSite(tuple(block), int(extra_options.get("block_index", 0)), attn, proj))
        return h if fns is None else apply_attention(fns, h, token_grid(extra_options, h.shape[1]))

    def attn1(self, q, k, v, extra_options):
        site = self._site
        return site(extra_options, "attn1", "q", q), site(extra_options, "attn1", "k", k), site(extra_options, "attn1", "v", v)

    def attn2(self, q, k, v, extra_options):
        return self._site(extra_options, "attn2", "q", q), k, v


def token_grid(extra_options: dict, tokens: int) -> tuple[int, int]:
    """The (h, w) token grid of the running block: ComfyUI's `activations_shape` (set by its
    SpatialTransformer), else the latent size halved (rounded up) until the count fits."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == tokens:
        return int(shape[2]), int(shape[3])
    original = extra_options.get("original_shape")
    if original is not None and len(original) == 4:
        h, w = int(original[2]), int(original[3])
        while h * w > tokens:
            h, w = -(-h // 2), -(-w // 2)
        if h * w == tokens:
            return h, w
    raise ControlNetError(
        f"ComfyUI did not say which token grid its attention runs on ({tokens} tokens; no activations_shape); "
        "this ComfyUI version is too old or too new for ControlNet-LLLite in ControlNet Core"
    )


def _append_call_patches(transformer_options: dict | None, entries: dict, name: str, what: str) -> None:
    """Append `entries` ({ComfyUI patch list name: fn}) to this model call's patches only (module
    docstring): a copy of the patches dict, so the model's own lists are never extended."""
    if transformer_options is None:
        raise ControlNetError(
            f"{name!r} {what}, but this ComfyUI passes no transformer_options to control objects; update ComfyUI"
        )
    old = transformer_options.get("patches") or {}
    new = dict(old)
    for kind, fn in entries.items():
        new[kind] = [*old.get(kind, []), fn]
    transformer_options["patches"] = new


def add_attention_patches(transformer_options: dict | None, patches: dict, name: str) -> None:
    """Register `patches` for this model call only (module docstring)."""
    p = AttentionPatches(patches)
    _append_call_patches(transformer_options, {"attn1_patch": p.attn1, "attn2_patch": p.attn2}, name,
                         "patches the UNet's attention")


class FeaturePatches:
    """Feature additions in ComfyUI's `input_block_patch_after_skip` / `output_block_patch` form."""

    def __init__(self, features: dict[tuple[str, int], list[FeatureFn]]):
        self.features = features

    def after_skip(self, h, transformer_options):
        block = transformer_options.get("block")
        return h if block is None else apply_features(self.features.get(tuple(block)), h)

    def output_block(self, h, hsp, transformer_options):
        if tuple(transformer_options.get("block") or ()) == ("output", 0):
            h = apply_features(self.features.get(("middle", 0)), h)
        return h, hsp


def add_feature_patches(transformer_options: dict | None, features: dict, name: str) -> None:
    """Register feature additions for this model call only (module docstring)."""
    p = FeaturePatches(features)
    entries = {}
    if any(kind == "input" for kind, _ in features):
        entries["input_block_patch_after_skip"] = p.after_skip
    if ("middle", 0) in features:
        entries["output_block_patch"] = p.output_block
    _append_call_patches(transformer_options, entries, name, "adds to a UNet feature")


def model_family(model: Any) -> tuple[int | None, int | None, str]:
    """(context width, adm width, display name) of the model being sampled (ComfyUI BaseModel)."""
    cfg = getattr(getattr(model, "model_config", None), "unet_config", None) or {}
    ctx = cfg.get("context_dim")
    adm = cfg.get("adm_in_channels")
    if ctx is None:
        kind = cfg.get("image_model")
        name = KIND_NAMES.get(kind, kind) if kind else type(model).__name__
        return None, None, f"a {name} model (not a Stable Diffusion UNet)"
    return int(ctx), (None if adm is None else int(adm)), family_of_width(ctx)


# ComfyUI's `image_model` of the transformer models, as users call them
KIND_NAMES = {"flux": "Flux", "chroma": "Chroma", "mmdit": "SD3", "qwen_image": "Qwen-Image", "hydit": "HunyuanDiT"}


def model_kind(model: Any) -> str | None:
    """The transformer kind of the model being sampled (ComfyUI's `image_model`: "flux", "chroma",
    ...); None for a UNet."""
    cfg = getattr(getattr(model, "model_config", None), "unet_config", None) or {}
    kind = cfg.get("image_model")
    return None if kind is None else str(kind)


class HostWeights(Mapping):
    """The host UNet's weights as its layers compute with them: what `pre_run` hands to families
    built from the host (Control-LoRA).

    `state_dict()` alone is not that in ComfyUI. A fully loaded model has its LoRAs patched into the
    weights in place, but a module left on the offload device by a partial load (--lowvram, or too
    little free VRAM) keeps its unpatched weight and applies the LoRA on the fly through
    `weight_function` / `bias_function` (comfy/model_patcher.py `LowVramPatch`), and scaled-fp8
    checkpoints store fp8 weights that `convert_weight` multiplies by `scale_weight`. (ComfyUI's own
    ControlLora reads the bare state dict, so it misses both.) Here a weight with such functions is
    computed like the layer's forward does, in fp32 on the device it sits on, only when read; all
    others are the state dict's tensors, not copied.
    """

    def __init__(self, unet: Any):
        self._sd = unet.state_dict()
        self._modules = dict(unet.named_modules())

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._sd[key]
        name, _, kind = key.rpartition(".")
        module = self._modules.get(name)
        if module is None or kind not in ("weight", "bias"):
            return t
        functions = list(getattr(module, f"{kind}_function", None) or [])
        convert = getattr(module, "convert_weight", None) if kind == "weight" else None
        if not functions and convert is None:
            return t
        t = t.to(torch.float32, copy=True)  # the functions may work in place (ComfyUI casts with copy=True)
        for f in functions:
            t = f(t)
        return t if convert is None else convert(t)

    def __iter__(self):
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)


class CoreControlMixin:
    """See the module docstring. The host base class supplies `__init__` attributes and the chain."""

    cncore = True  # marks our objects (the apply nodes test for it)

    def __init__(self, handle: NetHandle):
        super().__init__()  # the host's ControlBase
        self.handle = handle
        self.cncore_mode = DEFAULT_MODE
        self.cncore_resize = DEFAULT_RESIZE
        self.cncore_interpolation = DEFAULT_INTERPOLATION
        self.cncore_mask: torch.Tensor | None = None
        self.cncore_control_type = DEFAULT_CONTROL_TYPE
        self.cncore_multi_condition = False  # Union: one multi-condition pass (ControlStack fuse)
        self.cncore_entries: list[BoundEntry] = []
        self.cncore_vae: Any = None  # the apply node's VAE: latent-hint families encode their hint with it
        self.cncore_extra_concat: list = []  # inpaint masks (ComfyUI's ControlNetInpaintingAliMamaApply)
        self._cncore_latent_format: Any = None  # the sampled model's latent format (set at pre_run)
        self._cncore_stack: ControlStack | None = None
        self._cncore_sampling: Any = None
        self._cncore_checked: set = set()

    # ---- settings ---------------------------------------------------------------------------

    def cncore_settings(
        self, strength: float, start: float, end: float, global_pool: bool | None = None
    ) -> ControlSettings:
        """The mode and hint options of this object; pooling is each model's own (the main one's by
        default), so a shuffle ControlNet and a T2I-Adapter can share a stack."""
        return ControlSettings.from_mode(
            self.cncore_mode,
            strength=float(strength),
            start_percent=float(start),
            end_percent=float(end),
            global_pool=bool(self.global_average_pooling if global_pool is None else global_pool),
            resize=self.cncore_resize,
            interpolation=self.cncore_interpolation,
        )

    def cncore_stack(self) -> ControlStack:
        """The core controls this object evaluates, its own (unless strength 0) + its stack entries, as
        one stack (which refuses controls of different architectures)."""
        controls = []
        if self.cond_hint_original is None:
            raise InputError(
                f"the {self.handle.kind} {self.handle.name!r} has no hint image; connect it to an Apply ControlNet "
                "node with an image"
            )
        start, end = self.timestep_percent_range
        if self.strength != 0:
            net = with_control_type(self.handle.net, self.cncore_type(), self.handle.name)
            controls.append(
                Control(net, self.cond_hint_original, self.cncore_settings(self.strength, start, end),
                        mask=self.cncore_mask, hint_encoder=self.cncore_hint_encoder(net))
            )
        for e in self.cncore_entries:
            net = with_control_type(e.handle.net, e.control_type, e.handle.name)
            controls.append(
                Control(net, e.hint,
                        self.cncore_settings(e.strength, e.start_percent, e.end_percent, e.global_pool), mask=e.mask,
                        hint_encoder=self.cncore_hint_encoder(net))
            )
        return ControlStack(controls, fuse=self.cncore_multi_condition)

    def cncore_hint_encoder(self, net: Any) -> Any:
        """For a latent-hint family: the hint image -> the VAE's latent in the sampled model's latent
        format (ComfyUI's `latent_format.process_in(vae.encode(...))`); None when no VAE is connected
        (the Control then says so) or the family reads pixels."""
        if getattr(net, "hint_space", "pixel") != "latent" or self.cncore_vae is None:
            return None
        vae = self.cncore_vae
        extra = list(self.cncore_extra_concat) or [torch.ones(1, 1, 1, 1)]

        def encode(image: torch.Tensor) -> torch.Tensor:
            latent = self.cncore_vae_encode(vae, image)
            fmt = self._cncore_latent_format
            latent = latent if fmt is None else fmt.process_in(latent)
            want = getattr(net, "latent_channels", latent.shape[1])
            if want <= latent.shape[1]:
                return latent
            # an inpaint net (AliMama: 16 + 1): the mask(s) ComfyUI's inpaint apply node passes (already
            # inverted: 1 = keep), else ones, each resized to the latent as ComfyUI does (centre crop,
            # nearest-exact) and concatenated after it
            parts = [latent]
            b = latent.shape[0]
            for m in extra:
                m = m.reshape(-1, 1, *m.shape[-2:]).to(device=latent.device, dtype=torch.float32)
                m = resize_hint(m, latent.shape[-2], latent.shape[-1], "crop", "nearest-exact")
                parts.append(m.repeat(-(-b // m.shape[0]), 1, 1, 1)[:b])  # ComfyUI's repeat_to_batch_size
            out = torch.cat([p.to(latent.dtype) for p in parts], dim=1)
            if out.shape[1] != want:
                raise InputError(
                    f"the {net.family} {self.handle.name!r} takes a {want}-channel latent (the image latent and "
                    f"{want - latent.shape[1]} mask channel(s)), got {out.shape[1]}; connect one inpaint mask"
                )
            return out

        return encode

    @staticmethod
    def cncore_vae_encode(vae: Any, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the VAE's latent (the adapter adds ComfyUI's model reloading)."""
        return vae.encode(image.movedim(1, -1))

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None, extra_concat=()):
        # ControlBase keeps the VAE only for its own latent-format families: ours decide per model
        out = super().set_cond_hint(cond_hint, strength, timestep_percent_range, vae=vae, extra_concat=list(extra_concat))
        self.cncore_vae = vae
        self.cncore_extra_concat = list(extra_concat)
        return out

    def cncore_type(self, control_type: str = DEFAULT_CONTROL_TYPE) -> str | int:
        """The Union type to run this net with: `control_type` (a Combine node's, for a stack entry of
        this net) unless 'auto', else this control's own node's control_type unless 'auto', else the
        one ComfyUI's SetUnionControlNetType node stored (`extra_args["control_type"] = [n]`; [] is auto)."""
        for given in (control_type, self.cncore_control_type):
            if given != DEFAULT_CONTROL_TYPE:
                return given
        types = (getattr(self, "extra_args", None) or {}).get("control_type") or []
        return int(types[0]) if types else DEFAULT_CONTROL_TYPE

    def cncore_handles(self) -> list[NetHandle]:
        out: list[NetHandle] = []
        for h in [self.handle, *(e.handle for e in self.cncore_entries)]:
            if not any(h is o for o in out):
                out.append(h)
        return out

    def cncore_check_model(self, model: Any) -> None:
        """Refuse a control model of another family than the model, before the first step."""
        ctx, adm, model_name = model_family(model)
        kind = model_kind(model)
        for h in self.cncore_handles():
            host = h.host
            if host is not None:
                if kind not in host.models:
                    what = f"{model_name} (a UNet)" if ctx is not None else model_name.split(" (")[0]
                    kinds = ", ".join(KIND_NAMES.get(k, k) for k in host.models)
                    raise InputError(
                        f"the {h.kind} {h.name!r} is made for {host.name} models ({kinds}), but the checkpoint "
                        f"being sampled is {what}; use it with a {host.name} checkpoint, or load a ControlNet made "
                        "for your checkpoint"
                    )
                continue
            if not h.fits(ctx, adm):
                raise InputError(
                    f"the {h.kind} {h.name!r} is made for {h.family} models, but the checkpoint being sampled "
                    f"is {model_name}; load a {h.kind} made for that checkpoint"
                )

    # ---- the host protocol ------------------------------------------------------------------

    def pre_run(self, model: Any, percent_to_timestep_function: Any) -> None:
        super().pre_run(model, percent_to_timestep_function)  # timestep_range + the previous chain
        self._cncore_release()  # a failed run skipped cleanup: drop its graphs now
        self._cncore_checked = set()
        self.cncore_check_model(model)
        stack = self.cncore_stack()
        # Families built from the host's own weights (Control-LoRA) read them now, LoRAs applied.
        unet = getattr(model, "diffusion_model", None)
        stack.pre_run(percent_to_timestep_function, None if unet is None else (lambda: HostWeights(unet)))
        self._cncore_stack = stack
        self._cncore_sampling = model.model_sampling
        self._cncore_latent_format = getattr(model, "latent_format", None)

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None):
        prev = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        own = self.cncore_residuals(x_noisy, t, cond, batched_number, transformer_options)
        if own is not None and (ATTENTION in own or FEATURE in own):
            if ATTENTION in own:
                add_attention_patches(transformer_options, own.pop(ATTENTION), self.handle.name)
            if FEATURE in own:
                add_feature_patches(transformer_options, own.pop(FEATURE), self.handle.name)
            if not any(own[k] for k in ("input", "middle", "output")):
                own = None
        return merge_residuals(own, prev)

    def cncore_residuals(self, x_noisy, t, cond, batched_number, transformer_options=None) -> dict | None:
        stack = self._cncore_stack
        if stack is None:
            raise ControlNetError(
                "the ControlNet was asked for residuals before the sampler started its run (pre_run was not "
                "called); sample with a ComfyUI sampler node"
            )
        sigma = float(t[0])
        if not any(c.is_active(sigma) for c in stack.controls):
            return None
        ms = self._cncore_sampling
        net = self.handle.net
        dtype, device = net.dtype, x_noisy.device
        h, w = x_noisy.shape[-2:]
        if (h, w) not in self._cncore_checked:
            for c in stack.controls:
                if c.mask is not None:
                    check_mask_fits(c.mask, h, w)
            self._cncore_checked.add((h, w))
        x_in = ms.calculate_input(t, x_noisy).to(dtype)
        timesteps = ms.timestep(t).float()
        context = cond.get("crossattn_controlnet", cond["c_crossattn"]).to(device=device, dtype=dtype)
        y = None
        if any(needs_y(c.net) for c in stack.controls):
            y = cond.get("y")
            if y is None:
                raise InputError(
                    f"the ControlNet {self.handle.name!r} is an SDXL ControlNet and needs the SDXL size/pooled "
                    "conditioning, which this model does not provide; use an SDXL checkpoint"
                )
            y = y.to(device=device, dtype=dtype)
        elif any(reads_input(c.net, "y") for c in stack.controls) and cond.get("y") is not None:
            y = cond["y"].to(device=device, dtype=dtype)  # a DiT's pooled text (Flux); absent (Chroma): zeros
        guidance = None
        if any(reads_input(c.net, "guidance") for c in stack.controls) and cond.get("guidance") is not None:
            guidance = cond["guidance"].to(device=device, dtype=torch.float32)
        cond_or_uncond = (transformer_options or {}).get("cond_or_uncond") or [COND] * int(batched_number)
        request = StepRequest(x_in, t, timesteps, context, y, tuple(cond_or_uncond), guidance=guidance)
        with torch.no_grad():
            return fast.on_read(stack.residuals(request))

    def copy(self):
        c = type(self)(self.handle)
        self.copy_to(c)
        c.cncore_mode = self.cncore_mode
        c.cncore_resize = self.cncore_resize
        c.cncore_interpolation = self.cncore_interpolation
        c.cncore_mask = self.cncore_mask
        c.cncore_control_type = self.cncore_control_type
        c.cncore_multi_condition = self.cncore_multi_condition
        c.cncore_entries = list(self.cncore_entries)
        c.cncore_vae = self.cncore_vae
        c.cncore_extra_concat = list(self.cncore_extra_concat)
        return c

    def get_models(self):
        out = super().get_models()
        for h in self.cncore_handles():
            if h.patcher is not None and not any(h.patcher is o for o in out):
                out.append(h.patcher)
        return out

    def inference_memory_requirements(self, dtype):
        """The chain's needs plus what our models build at pre_run (a Control-LoRA's merged copy),
        so ComfyUI frees that much before loading (its own ControlLora counts its file here)."""
        built = sum(int(getattr(h.net, "bound_bytes", 0)) for h in self.cncore_handles())
        return super().inference_memory_requirements(dtype) + built

    def cleanup(self):
        self._cncore_release()
        self._cncore_sampling = None
        for h in self.cncore_handles():  # free what pre_run built from the host (merged copies)
            unbind = getattr(h.net, "unbind_host", None)
            if unbind is not None:
                unbind()
        super().cleanup()

    def _cncore_release(self) -> None:
        """Drop this run's controls and the fast path's graphs and buffers for them."""
        if self._cncore_stack is not None:
            fast.release(self._cncore_stack)
        self._cncore_stack = None
