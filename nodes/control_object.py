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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..controlnet_core import fast
from ..controlnet_core.control import Control, ControlSettings, ControlStack
from ..controlnet_core.errors import ControlNetError, InputError
from ..controlnet_core.host import COND, StepRequest

DEFAULT_MODE = "balanced"
DEFAULT_RESIZE = "crop"
DEFAULT_INTERPOLATION = "nearest-exact"

FAMILY = {"sd15": "SD1.x", "sd21": "SD2.x", "sdxl": "SDXL"}
ARCH_OF_WIDTH = {768: "sd15", 1024: "sd21", 2048: "sdxl"}  # text-conditioning width -> base model


def family_of_width(width: int) -> str:
    """The checkpoint family a text-conditioning width belongs to."""
    return {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner", 4096: "a T5-based model"}.get(
        int(width), f"an unknown model (text width {int(width)})"
    )


def needs_y(net: Any) -> bool:
    """Whether a control model takes SDXL's `y` vector (pooled text + sizes)."""
    return getattr(net, "adm_channels", None) is not None


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

    def fits(self, context_dim: int | None, adm: int | None, check_adm: bool = True) -> bool:
        """Whether it runs on a base model of this text width (and `y` width). A model that knows
        its base model's text width (a ControlNet: `context_dim`) must match it exactly; other
        families (adapters) name the base models they fit (`host_archs`)."""
        net = self.net
        want = getattr(net, "context_dim", None)
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


@dataclass(frozen=True)
class BoundEntry:
    """A stack entry resolved to one of our networks."""

    handle: NetHandle
    hint: torch.Tensor  # (B, C, H, W)
    strength: float
    start_percent: float
    end_percent: float
    mask: torch.Tensor | None


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
        a = list((own or {}).get(key) or [])
        b = list((prev or {}).get(key) or [])
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else None
            p = b[i] if i < len(b) else None
            out[key].append(p if x is None else x if p is None else p + x)
    return out


def model_family(model: Any) -> tuple[int | None, int | None, str]:
    """(context width, adm width, display name) of the model being sampled (ComfyUI BaseModel)."""
    cfg = getattr(getattr(model, "model_config", None), "unet_config", None) or {}
    ctx = cfg.get("context_dim")
    adm = cfg.get("adm_in_channels")
    if ctx is None:
        return None, None, f"a {type(model).__name__} model (not a Stable Diffusion UNet)"
    return int(ctx), (None if adm is None else int(adm)), family_of_width(ctx)


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
        self.cncore_entries: list[BoundEntry] = []
        self._cncore_stack: ControlStack | None = None
        self._cncore_sampling: Any = None
        self._cncore_checked: set = set()

    # ---- settings ---------------------------------------------------------------------------

    def cncore_settings(self, strength: float, start: float, end: float) -> ControlSettings:
        return ControlSettings.from_mode(
            self.cncore_mode,
            strength=float(strength),
            start_percent=float(start),
            end_percent=float(end),
            global_pool=bool(self.global_average_pooling),
            resize=self.cncore_resize,
            interpolation=self.cncore_interpolation,
        )

    def cncore_stack(self) -> ControlStack:
        """The core controls this object evaluates, its own (unless strength 0) + its stack entries, as
        one stack (which refuses controls of different architectures)."""
        controls = []
        if self.cond_hint_original is None:
            raise InputError(
                f"the ControlNet {self.handle.name!r} has no hint image; connect it to an Apply ControlNet node "
                "with an image"
            )
        start, end = self.timestep_percent_range
        if self.strength != 0:
            controls.append(
                Control(self.handle.net, self.cond_hint_original, self.cncore_settings(self.strength, start, end),
                        mask=self.cncore_mask)
            )
        for e in self.cncore_entries:
            controls.append(
                Control(e.handle.net, e.hint, self.cncore_settings(e.strength, e.start_percent, e.end_percent),
                        mask=e.mask)
            )
        return ControlStack(controls)

    def cncore_handles(self) -> list[NetHandle]:
        out: list[NetHandle] = []
        for h in [self.handle, *(e.handle for e in self.cncore_entries)]:
            if not any(h is o for o in out):
                out.append(h)
        return out

    def cncore_check_model(self, model: Any) -> None:
        """Refuse a control model of another family than the model, before the first step."""
        ctx, adm, model_name = model_family(model)
        for h in self.cncore_handles():
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
        stack.pre_run(percent_to_timestep_function, None if unet is None else unet.state_dict)
        self._cncore_stack = stack
        self._cncore_sampling = model.model_sampling

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None):
        prev = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        return merge_residuals(self.cncore_residuals(x_noisy, t, cond, batched_number, transformer_options), prev)

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
        if needs_y(net):
            y = cond.get("y")
            if y is None:
                raise InputError(
                    f"the ControlNet {self.handle.name!r} is an SDXL ControlNet and needs the SDXL size/pooled "
                    "conditioning, which this model does not provide; use an SDXL checkpoint"
                )
            y = y.to(device=device, dtype=dtype)
        cond_or_uncond = (transformer_options or {}).get("cond_or_uncond") or [COND] * int(batched_number)
        request = StepRequest(x_in, t, timesteps, context, y, tuple(cond_or_uncond))
        with torch.no_grad():
            return fast.on_read(stack.residuals(request))

    def copy(self):
        c = type(self)(self.handle)
        self.copy_to(c)
        c.cncore_mode = self.cncore_mode
        c.cncore_resize = self.cncore_resize
        c.cncore_interpolation = self.cncore_interpolation
        c.cncore_mask = self.cncore_mask
        c.cncore_entries = list(self.cncore_entries)
        return c

    def get_models(self):
        out = super().get_models()
        for h in self.cncore_handles():
            if h.patcher is not None and not any(h.patcher is o for o in out):
                out.append(h.patcher)
        return out

    def cleanup(self):
        self._cncore_release()
        self._cncore_sampling = None
        super().cleanup()

    def _cncore_release(self) -> None:
        """Drop this run's controls and the fast path's graphs and buffers for them."""
        if self._cncore_stack is not None:
            fast.release(self._cncore_stack)
        self._cncore_stack = None
