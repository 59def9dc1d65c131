"""Controls: a control model + hint images + settings, and stacks of them, speaking `host.py`'s protocol.

A control model is any family that speaks `ControlModel` (below): the classic ControlNet
(`model.ControlNet`) and the other families, each in its own module. The runtime here knows none of
them by name: a model returns its unscaled outputs per UNet slot, and this module gates, scales,
masks and sums them the same way for every family.

How one control turns the model's raw outputs (n of them; a ControlNet's `[down_0 .. down_{n-2},
mid]`, SD1/SD2 13, SDXL 10) into what the UNet adds, in this order:

1. gate: active only while the step's sigma lies in [sigma(end_percent), sigma(start_percent)],
   both ends inclusive, with `percent_to_sigma` from the host (ComfyUI's `ControlNet.get_control`:
   skipped when `t[0] > range[0] or t[0] < range[1]`). strength 0 is inactive (ComfyUI's apply
   nodes attach no control at strength 0), so it equals no control exactly;
2. which rows: `both` halves of a CFG batch (ComfyUI's ControlNetApplyAdvanced), or `cond-only`:
   the ControlNet runs on the cond rows only and the uncond rows get zeros (lllyasviel's guess
   mode, A1111's "ControlNet is more important", diffusers' guess_mode);
3. global average pooling (optional; shuffle ControlNets): each residual replaced by its mean over
   H, W. ComfyUI pools every row it computes; A1111 and diffusers also force cond-only for shuffle
   models. We keep the two choices separate: pass apply_to="cond-only" to get the peers' behaviour;
4. scale output i by `strength * weight_i` (`residual_weights`; outputs counted in the order
   `input` slot, `output` slot, `middle`, each in encoder order: for a ControlNet the first skip
   first and the middle last);
5. mask (optional, regional control): multiply by the mask resized to the residual's h, w — area
   averaging when shrinking (each cell gets the fraction of it inside the region, so a region on
   the block grid stays exactly 0/1), bilinear when enlarging (align_corners=False).

Attention-input patches (`host.ATTENTION`, ControlNet-LLLite) get the same treatment, applied to
the term each deferred function returns when the host calls it: the gate (inactive: no patch is
handed to the host), the rows (cond-only: the function sees the cond rows of the activation, the
uncond rows get a zero term), pooling over the tokens, `strength * weight`, and the mask resized to
the block's token grid (same area/bilinear rule) and flattened like the tokens. Weights count one
output per UNet block an attention slot patches (all sites of a block share it), after the residual
slots; for an LLLite that is input 4, 5, 7, 8, middle.

Feature additions (`host.FEATURE`, ControlNeXt) are treated the same way: the term a deferred
function returns for the host's feature is gated, computed on the selected rows only (the others get
zero), pooled over H, W, scaled by `strength * weight` (one weight per feature block, counted after
the attention blocks) and masked at the feature's size.

Several controls add up: `ControlStack([a, b]).residuals(r)` is the sum of each control's residuals
(ComfyUI's `control_merge`), and a control chained with `previous` (ComfyUI's
`set_previous_controlnet`) is the stack of its chain. Attention patches of a stack are applied one
after the other at their site, oldest control first (host.py).

Fused passes (opt-in: `ControlStack(..., fuse=True)`). Some families take several hints in one
network pass (a ControlNet Union with several control types, as it was trained: xinsir's
multi-condition inference, diffusers' `ControlNetUnionModel` with several types). That is another
computation than the sum of one pass per control (ComfyUI's chain), so it gives another image: by
default a stack is that sum, and a host asks for fused passes explicitly. With `fuse=True`, on each
model call the active controls of a stack whose models share a `fusion_key` (`ControlModel`) and
that agree on everything applied after the network (rules 2-5: `apply_to`, `global_pool`, the
weights, and the mask: the same tensor or equal values) are evaluated in ONE call of the model's
`fused_outputs`; the result is pooled, weighted and masked once, like one control's. Strength and
start/end may differ: the gate (rule 1) is applied per call, so a control outside its window is
simply not part of that call's pass, and each control's strength goes into the pass (the model
applies it; the fused outputs are not scaled by strength again). Controls that differ in rules 2-5 cannot share one output, so they run
separately; a group of one is an ordinary control.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from .errors import ControlNetError, InputError
from .hint import INTERPOLATIONS, RESIZE_MODES, check_choice, resize_hint, tile_to_batch, to_bchw
from .host import (
    ATTENTION, COND, FEATURE, SLOTS, AttnFn, FeatureFn, HostWeights, Outputs, PercentToSigma, ResidualDict,
    StepRequest, control_dict, spread_blocks,
)
from .fast.runner import stack_residuals

# lllyasviel/ControlNet gradio apps, guess mode: scales = [strength * 0.825 ** (12 - i) for i in 0..12].
SOFT_BASE = 0.825
WEIGHT_MODES = ("uniform", "soft", "diffusers", "paper")
APPLY_TO = ("both", "cond-only")
MAX_STRENGTH = 10.0
# Hint images embedded at once, in pixels (4 hints of 512 x 512): bounds the hint encoder's working set.
EMBED_CHUNK_PIXELS = 4 * 512 * 512

# The modes users know, as (weights, apply_to). "guess mode" is lllyasviel's original name of what
# A1111 calls "ControlNet is more important".
MODES: dict[str, tuple[str, str]] = {
    "balanced": ("uniform", "both"),
    "prompt is more important": ("soft", "both"),
    "controlnet is more important": ("soft", "cond-only"),
    "guess mode": ("soft", "cond-only"),
    "cfg resolution weighting (paper)": ("paper", "cond-only"),
}


class ControlModel(Protocol):
    """What `Control` needs from a model of any family. `model.ControlNet` is the reference
    implementation; each other family's module implements the same few members.

    family:       what users call it ("ControlNet", "T2I-Adapter", ...), for messages;
    hint_channels: the channels of the hint image it takes (3: RGB);
    arch:         the base model it was made for: "sd15" | "sd21" | "sdxl";
    host_archs:   the base models whose UNet it fits (a ControlNet: its own arch);
    context_dim, adm_channels: the text width and SDXL `y` width it reads (None: it reads none;
                  then hosts check `host_archs` instead of the exact widths);
    host_layout:  the UNet it adds to, as (model_channels, channel_mult, num_res_blocks): controls
                  of one stack must agree on it; None for a model that fits several and checks the
                  host's widths itself at `bind_host` (ControlNeXt);
    hint_size(h, w):  the pixel size (H, W) a hint is resized to for an h x w latent;
    embed_hint(hint): the part that does not depend on the step, from a (B, 3, H, W) hint in
                  [0, 1] (a tensor or a list of tensors whose dim 0 is the hint batch); computed
                  once per run and size;
    output_levels():  for each weighted output (in the order of rule 4 above; an attention slot
                  counts once per UNet block it patches) its resolution level (0 = the latent's,
                  +1 per 2x down): what the "paper" weights are made of;
    control_outputs(x, timesteps, context, y, embedding): the unscaled `Outputs` for a batch,
                  `embedding` already matched to the batch's rows: residual tensors in the
                  `input`/`output`/`middle` slots and/or attention-input patches in `attention`,
                  `(AttnSite, fn)` pairs whose `fn(h, grid)` returns the term for the host's
                  activation `h` (host.py); and/or feature additions in `feature`, `(block, fn)`
                  pairs whose `fn(h)` returns the term for the host's feature there (ControlNeXt);
                  `fn` gets exactly the rows `x` had.
    Optional: `bind_host(host_weights)`, called at `pre_run` with the host UNet's weights: families
    built from them (Control-LoRA) build themselves, families that patch the host's attention
    (LLLite) check that its widths fit; with it, `bound_bytes` (what binding allocates, for a
    host's memory planning) and `unbind_host()` (frees it; a host calls it when its run ends);
    `fast_path_net`: the `model.ControlNet` the CUDA runner (fast/) may run for this model now, or
    None (the plain path runs; absent means None);
    `soft_weights`: the family's own "soft" factors, one per output (T2I-Adapter: A1111's table),
    used instead of `SOFT_BASE ** (n-1-i)`; `supports_global_pool` (default True): False where
    global average pooling has no meaning (a T2I-Adapter), so asking for it is an error, not
    silently done or skipped.
    `fusion_key` + `fused_outputs(x, timesteps, context, y, parts)`: models with equal non-None
    `fusion_key`s (the control types of one Union network) evaluate several controls in one pass
    (see "Fused passes" above); `parts` is [(model, embedding, strength)] in stack order and the
    outputs come back unscaled by strength, the model having applied each control's own;
    `select_type(control_type)` (with `control_types`): the model of one control type (Union).
    """

    family: str
    hint_channels: int
    arch: str
    host_archs: tuple[str, ...]
    context_dim: int | None
    adm_channels: int | None
    host_layout: tuple | None
    dtype: torch.dtype

    def hint_size(self, h: int, w: int) -> tuple[int, int]: ...

    def embed_hint(self, hint: torch.Tensor) -> Any: ...

    def output_levels(self) -> list[int]: ...

    def control_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        y: torch.Tensor | None, embedding: Any) -> Outputs: ...


@dataclass(frozen=True)
class ControlSettings:
    """How a control acts; validated on construction.

    strength:       0..10, multiplies every residual;
    start_percent, end_percent: 0..1 of the sampling schedule (in the model's time, as ComfyUI);
    weights:        per-output factors: "uniform" (all 1), "soft" (SOFT_BASE ** (n-1-i), see
                    `residual_weights`), "diffusers" (logspace(-1, 0, n)), "paper" (2 ** level, the
                    paper's CFG resolution weighting), or one number per output;
    apply_to:       "both" halves of a CFG batch or "cond-only";
    global_pool:    average each residual over H, W (shuffle ControlNets; see `default_global_pool`);
    resize, interpolation: how the hint is brought to 8x the latent (hint.py); the defaults
                    crop + nearest-exact reproduce ComfyUI.
    """

    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    weights: str | tuple[float, ...] = "uniform"
    apply_to: str = "both"
    global_pool: bool = False
    resize: str = "crop"
    interpolation: str = "nearest-exact"

    def __post_init__(self) -> None:
        _check_number("strength", self.strength, 0.0, MAX_STRENGTH)
        _check_number("start_percent", self.start_percent, 0.0, 1.0)
        _check_number("end_percent", self.end_percent, 0.0, 1.0)
        if self.start_percent > self.end_percent:
            raise InputError(
                f"start_percent {self.start_percent} is after end_percent {self.end_percent}; the control "
                "would never act. Make start_percent <= end_percent"
            )
        if isinstance(self.weights, str):
            check_choice("weights", self.weights, WEIGHT_MODES)
        else:
            try:
                values = tuple(float(w) for w in self.weights)
            except (TypeError, ValueError):
                raise InputError(
                    f"weights must be one of {WEIGHT_MODES} or a list of numbers; got {self.weights!r}"
                ) from None
            if not values or not all(math.isfinite(w) for w in values):
                raise InputError(f"weights must be a non-empty list of finite numbers; got {self.weights!r}")
            object.__setattr__(self, "weights", values)
        check_choice("apply_to", self.apply_to, APPLY_TO)
        check_choice("resize mode", self.resize, RESIZE_MODES)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        if not isinstance(self.global_pool, bool):
            raise InputError(f"global_pool must be True or False; got {self.global_pool!r}")

    @classmethod
    def from_mode(cls, mode: str, **overrides: object) -> "ControlSettings":
        """Settings for a named mode ("balanced", "prompt is more important", "ControlNet is more
        important", "guess mode", "CFG resolution weighting (paper)"; case-insensitive) plus any
        other field."""
        key = mode.strip().lower()
        if key not in MODES:
            raise InputError(f"unknown control mode {mode!r}; choose one of {', '.join(map(repr, MODES))}")
        weights, apply_to = MODES[key]
        return cls(**{"weights": weights, "apply_to": apply_to, **overrides})  # type: ignore[arg-type]


def residual_weights(
    weights: str | Sequence[float], n: int, name: str = "", levels: Sequence[int] | None = None,
    soft: Sequence[float] | None = None,
) -> list[float]:
    """One factor per output, i = 0 the first (highest-resolution) skip, i = n-1 the middle.

    soft: SOFT_BASE ** (n-1-i). For SD1/SD2 (n = 13) this is lllyasviel's 0.825 ** (12 - i). For
    SDXL (n = 10) peers differ: A1111 takes the first 10 of the 13 SD1 scales (middle 0.825**3), ACN
    uses base ** (n-1-i) (middle 1.0). We follow ACN: the rule keeps its meaning (middle at full
    strength, each shallower residual another x0.825) instead of depending on a list cut for
    another architecture, and it is the same formula for every n. A family that states its own
    soft factors (`soft`, the model's `soft_weights`) gets those: for T2I-Adapters A1111 and ACN
    use 0.25, 0.62, 0.825, 1.0, not the formula.
    diffusers: torch.logspace(-1, 0, n) (0.1 .. 1.0), as diffusers' ControlNetModel in guess mode.
    paper: 2 ** level_i, the ControlNet paper's "classifier-free guidance resolution weighting"
    (section 3.4): connection i gets w_i = 64 / h_i, h_i its side at 512 px (64, 32, 16, 8), i.e.
    1, 2, 4, 8 from the top level down, and the middle block the deepest level's value. `levels`
    (the model's `output_levels()`) says which level each output is at.
    """
    if weights == "uniform":
        return [1.0] * n
    if weights == "soft":
        if soft is not None and len(soft) == n:
            return [float(w) for w in soft]
        return [SOFT_BASE ** (n - 1 - i) for i in range(n)]
    if weights == "diffusers":
        return torch.logspace(-1, 0, n).tolist()
    if weights == "paper":
        if levels is None or len(levels) != n:
            raise InputError("the paper's resolution weighting needs the resolution level of every output")
        return [float(2 ** lvl) for lvl in levels]
    values = [float(w) for w in weights]
    if len(values) != n:
        name = f"this {name}" if name else "this control model"
        raise InputError(
            f"{len(values)} weights given but {name} has {n} outputs (a ControlNet: its skips + the middle; "
            "a ControlNet-LLLite: one per UNet block it patches); give one weight per output, the first skip "
            "(or block) first and the middle last"
        )
    return values


def default_global_pool(name: str) -> bool:
    """True for ControlNet 1.1 shuffle files (name ends in `_shuffle` or `_shuffle_fp16` before the
    extension), the rule ComfyUI's `load_controlnet` uses; case-insensitive here."""
    stem = os.path.splitext(os.path.basename(str(name)))[0].lower()
    return stem.endswith("_shuffle") or stem.endswith("_shuffle_fp16")


class Control:
    """A loaded control model + its hint images + settings (+ an optional mask and previous control).

    hint: (B, H, W, C) or (B, C, H, W) float in [0, 1], any size; mask: (B or 1, H, W) in [0, 1].
    """

    def __init__(
        self,
        net: ControlModel,
        hint: torch.Tensor,
        settings: ControlSettings | None = None,
        *,
        mask: torch.Tensor | None = None,
        previous: "Control | None" = None,
        hint_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.net = net
        # A family whose hint is a latent (`hint_space` "latent": Flux InstantX / Union) gets the
        # resized hint image through the host's VAE: `hint_encoder` (B, 3, H, W) in [0, 1] -> the
        # latent in the host's latent format.
        if getattr(net, "hint_space", "pixel") == "latent" and hint_encoder is None:
            raise InputError(
                f"the {net.family} ({_source(net)}) takes its hint as a latent: connect the VAE of your "
                "checkpoint to the apply node's vae input"
            )
        self.hint_encoder = hint_encoder if getattr(net, "hint_space", "pixel") == "latent" else None
        self.settings = settings if settings is not None else ControlSettings()
        try:
            self.hint = to_bchw(hint, net.hint_channels)
        except InputError as e:  # say which model the hint was for
            raise InputError(f"the hint for the {net.family} ({_source(net)}): {e}") from None
        self.mask = None if mask is None else _check_mask(mask)
        if self.settings.global_pool and not getattr(net, "supports_global_pool", True):
            raise InputError(
                f"global average pooling has no meaning for a {net.family} ({_source(net)}): it is the rule of "
                "ControlNet 1.1 shuffle models (turned on for files named *_shuffle, as in ComfyUI), and this "
                f"model's outputs are spatial maps it was never trained to pool; turn global_pool off (or rename "
                "a file whose name ends in _shuffle)"
            )
        levels = net.output_levels()
        self.weights = residual_weights(self.settings.weights, len(levels), f"{net.arch} {net.family}", levels,
                                        soft=getattr(net, "soft_weights", None))
        self.previous: Control | None = None
        self.sigma_range: tuple[float, float] | None = None  # (sigma_start, sigma_end), set by pre_run
        self._cache: dict[tuple, torch.Tensor] = {}  # hint embeddings and resized masks of this run
        if previous is not None:
            self.set_previous(previous)

    @property
    def arch(self) -> str:
        return self.net.arch

    def set_previous(self, previous: "Control | None") -> "Control":
        """Chain: this control's residuals are added to those of `previous` (and its chain)."""
        if previous is not None:
            if any(c is self for c in previous.chain()):
                raise InputError("chaining this control to itself would make a loop")
            ControlStack([self, previous])  # raises if the architectures differ
        self.previous = previous
        return self

    def chain(self) -> Iterator["Control"]:
        """This control and the ones it is chained to, newest first."""
        c: Control | None = self
        while c is not None:
            yield c
            c = c.previous

    def pre_run(self, percent_to_sigma: PercentToSigma, host_weights: HostWeights | None = None) -> None:
        """Start a sampling run for this control and its chain (see `host.py`)."""
        for c in self.chain():
            c.start_run(percent_to_sigma, host_weights)

    def start_run(self, percent_to_sigma: PercentToSigma, host_weights: HostWeights | None = None) -> None:
        """This control alone: fix the active sigma range, drop last run's cached hint embedding, and
        hand the host's weights to a model built from them (Control-LoRA)."""
        s = self.settings
        self.sigma_range = (float(percent_to_sigma(s.start_percent)), float(percent_to_sigma(s.end_percent)))
        self._cache.clear()
        bind = getattr(self.net, "bind_host", None)
        if bind is not None:
            bind(host_weights)

    def residuals(self, request: StepRequest) -> ResidualDict | None:
        """The UNet's control dict for this control and its chain, or None when none is active."""
        return ControlStack([self]).residuals(request)

    def is_active(self, sigma: float) -> bool:
        if self.sigma_range is None:
            raise ControlNetError(
                "the control has no sigma range yet; the host must call pre_run(percent_to_sigma) at the "
                "start of every sampling run"
            )
        sigma_start, sigma_end = self.sigma_range
        return self.settings.strength != 0 and sigma_end <= sigma <= sigma_start

    def _attention_term(self, fn: AttnFn, scale: float, rows: torch.Tensor | None, batch: int, chunks: int) -> AttnFn:
        """`fn` with this control's rows, pooling, scale and mask, for the host to call."""
        s = self.settings

        def term(h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
            if h.shape[0] != batch:
                raise InputError(
                    f"the host's attention activation has batch {h.shape[0]}, the model call {batch}; the "
                    f"{self.net.family} patch cannot tell which rows are which"
                )
            d = fn(h if rows is None else h[rows], grid)
            if s.global_pool:
                d = d.mean(dim=1, keepdim=True).expand_as(d)
            d = d * scale
            if rows is not None:
                d = _scatter(d, rows, batch)
            if self.mask is not None:  # (B, 1, th, tw) -> (B, th*tw, 1), the tokens' order
                d = d * self._mask_at(grid[0], grid[1], d.device, d.dtype, batch, chunks).flatten(2).transpose(1, 2)
            return d

        return term

    def _feature_term(self, fn: FeatureFn, scale: float, rows: torch.Tensor | None, batch: int, chunks: int) -> FeatureFn:
        """`fn` with this control's rows, pooling, scale and mask, for the host to call."""
        s = self.settings

        def term(h: torch.Tensor) -> torch.Tensor:
            if h.shape[0] != batch:
                raise InputError(
                    f"the host's feature has batch {h.shape[0]}, the model call {batch}; the {self.net.family} "
                    "cannot tell which rows are which"
                )
            d = fn(h if rows is None else h[rows])
            if s.global_pool:
                d = d.mean(dim=(2, 3), keepdim=True).expand_as(d)
            d = d * scale
            if rows is not None:
                d = _scatter(d, rows, batch)
            if self.mask is not None:
                d = d * self._mask_at(d.shape[-2], d.shape[-1], d.device, d.dtype, batch, chunks)
            return d

        return term

    def _finish(self, r: torch.Tensor, scale: float, rows: torch.Tensor | None, batch: int, chunks: int) -> torch.Tensor:
        s = self.settings
        if s.global_pool:
            r = r.mean(dim=(2, 3), keepdim=True).expand_as(r)
        if r.shape[0] not in (1, batch if rows is None else len(rows)):
            raise InputError(f"a {self.net.family} output has batch {r.shape[0]}, not {batch}")
        r = r * scale
        if r.shape[0] == 1 and (batch > 1 or rows is not None):  # step-independent outputs of one hint
            r = r.expand(batch if rows is None else len(rows), *r.shape[1:])
        if rows is not None:
            r = _scatter(r, rows, batch)
        if self.mask is not None:
            r = r * self._mask_at(r.shape[-2], r.shape[-1], r.device, r.dtype, batch, chunks)
        return r

    def hint_embedding(self, h: int, w: int, device: torch.device | str) -> Any:
        """The model's step-independent part (a ControlNet's hint encoder output) for a latent of
        h x w, computed once per run and kept per size/device/dtype until the next `pre_run`."""
        key = ("hint", h, w, str(device), self.net.dtype)
        if key not in self._cache:
            s = self.settings
            height, width = self.net.hint_size(h, w)
            hint = resize_hint(self.hint, height, width, s.resize, s.interpolation)
            # A few hints at a time: the encoder's first layers work at the hint's full size (SD1.5: 16
            # channels at 8x the latent, 1 GiB per activation for 64 hints at 512 px), so a big batch
            # would peak at several GiB at once. The outputs are concatenated: the same embedding.
            n = max(1, EMBED_CHUNK_PIXELS // (height * width))
            encode = self.hint_encoder or (lambda image: image)
            parts = [self.net.embed_hint(encode(hint[i : i + n]).to(device)) for i in range(0, hint.shape[0], n)]
            self._cache[key] = parts[0] if len(parts) == 1 else cat_tensors(parts)
        return self._cache[key]

    def _mask_at(self, h: int, w: int, device: torch.device, dtype: torch.dtype, batch: int, chunks: int) -> torch.Tensor:
        key = ("mask", h, w, str(device), dtype)
        if key not in self._cache:
            m = self.mask[:, None].to(device)
            if (h, w) != tuple(m.shape[-2:]):
                if h <= m.shape[-2] and w <= m.shape[-1]:
                    m = F.interpolate(m, size=(h, w), mode="area")
                else:
                    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            self._cache[key] = m.to(dtype)
        return tile_to_batch(self._cache[key], batch, chunks, what="mask")


class ControlStack:
    """Several controls evaluated in one call; their residuals add up. Chains are flattened (each
    control counted once), so a stack of chained controls is not evaluated twice.

    fuse: False (default): one pass per control, outputs summed = chaining the controls (ComfyUI's
    chain, for every family). True: controls that can share one pass run as one (module docstring,
    "Fused passes"; a Union's multi-condition pass), which for a Union is another result."""

    def __init__(self, controls: Sequence[Control], fuse: bool = False):
        self.fuse = bool(fuse)
        flat: list[Control] = []
        for top in controls:
            for c in reversed(list(top.chain())):  # oldest first, as ComfyUI's `prev + own`
                if not any(c is f for f in flat):
                    flat.append(c)
        self.controls = flat
        common = set.intersection(*(set(c.net.host_archs) for c in flat)) if flat else set()
        # a layout of None: a model that fits several UNets and is fixed by the host at pre_run (ControlNeXt)
        if len({_layout(c) for c in flat if c.net.host_layout is not None}) > 1 or (flat and not common):
            names = ", ".join(f"control {i + 1} is {_describe(c)}" for i, c in enumerate(flat))
            raise InputError(
                f"controls of different architectures cannot be combined ({names}); use control models "
                "made for the same base model"
            )

    @property
    def arch(self) -> str | None:
        return self.controls[0].arch if self.controls else None

    def pre_run(self, percent_to_sigma: PercentToSigma, host_weights: HostWeights | None = None) -> None:
        for c in self.controls:
            c.start_run(percent_to_sigma, host_weights)

    def residuals(self, request: StepRequest) -> ResidualDict | None:
        fast = stack_residuals(self, request)  # CUDA fast path (fast/); NotImplemented: plain path
        if fast is not NotImplemented:
            return fast
        sigma = float(request.sigma[0])
        total: Outputs | None = None
        active = [c for c in self.controls if c.is_active(sigma)]
        for group in (fusion_groups(active) if self.fuse else [[c] for c in active]):
            out = _group_outputs(group, request)
            if out is None:
                continue
            total = out if total is None else add_outputs(total, out)
        if total is None:
            return None
        return control_dict(total, indexed=getattr(self.controls[0].net, "host", None) is not None)


def fusion_groups(controls: Sequence[Control]) -> list[list[Control]]:
    """The controls split into the groups that run as one pass each (see "Fused passes"), in stack
    order: each control joins the first group it can be fused with."""
    groups: list[list[Control]] = []
    for c in controls:
        for g in groups:
            if _fusable(g[0], c):
                g.append(c)
                break
        else:
            groups.append([c])
    return groups


def _fusable(a: Control, b: Control) -> bool:
    ka, kb = getattr(a.net, "fusion_key", None), getattr(b.net, "fusion_key", None)
    if ka is None or kb is None or not (ka is kb or ka == kb):
        return False
    sa, sb = a.settings, b.settings
    return (sa.apply_to == sb.apply_to and sa.global_pool == sb.global_pool and a.weights == b.weights
            and _same_mask(a.mask, b.mask))


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def _group_outputs(group: Sequence[Control], request: StepRequest) -> Outputs | None:
    """The scaled outputs per UNet slot of one group of active controls (one control, or several
    fused into one pass: `fusion_groups`), or None when they do not act on this call. Rules 2-5 are
    the first control's (the group agrees on them)."""
    lead = group[0]
    x = request.x
    batch, chunks = x.shape[0], len(request.cond_or_uncond)
    rows = None
    if lead.settings.apply_to == "cond-only":
        rows = request.rows(COND)
        if len(rows) == 0:  # an uncond-only call: nothing to add
            return None
        if len(rows) == batch:
            rows = None
    embs = []
    for c in group:
        emb = map_tensors(lambda e: tile_to_batch(e, batch, chunks), c.hint_embedding(x.shape[-2], x.shape[-1], x.device))
        if rows is not None:
            emb = map_tensors(lambda e: _take(e, rows, batch), emb)
        embs.append(emb)
    t, context, y = request.timesteps, request.context, request.y
    if rows is not None:
        x, t = x[rows], t[rows]
        context = _take(context, rows, batch)
        y = None if y is None else _take(y, rows, batch)
    kw = {}
    if "guidance" in getattr(lead.net, "host_inputs", ()) and request.guidance is not None:
        g = torch.as_tensor(request.guidance).reshape(-1)
        kw["guidance"] = g if rows is None or g.shape[0] != batch else g[rows]
    if len(group) == 1:
        raw = lead.net.control_outputs(x, t, context, y, embs[0], **kw)
        strength = lead.settings.strength
    else:  # one pass; the model applies each control's strength
        raw = lead.net.fused_outputs(x, t, context, y, [(c.net, e, c.settings.strength) for c, e in zip(group, embs)])
        strength = 1.0
    scales = iter(lead.weights)
    out: Outputs = {}
    for slot in SLOTS:
        out[slot] = [None if r is None else lead._finish(r, strength * next(scales), rows, batch, chunks)
                     for r in raw.get(slot, [])]
    block_weight: dict[tuple, float] = {}  # attention patches: one weight per UNet block
    out[ATTENTION] = []
    for site, fn in raw.get(ATTENTION, []):
        if tuple(site.block) not in block_weight:
            block_weight[tuple(site.block)] = next(scales)
        out[ATTENTION].append((site, lead._attention_term(fn, strength * block_weight[tuple(site.block)], rows, batch, chunks)))
    feature_weight: dict[tuple, float] = {}  # feature additions: one weight per block
    out[FEATURE] = []
    for block, fn in raw.get(FEATURE, []):
        if tuple(block) not in feature_weight:
            feature_weight[tuple(block)] = next(scales)
        out[FEATURE].append((block, lead._feature_term(fn, strength * feature_weight[tuple(block)], rows, batch, chunks)))
    host = getattr(lead.net, "host", None)
    if host is not None:  # a DiT family: its per-block maps as the host's per-block token lists
        out = spread_blocks(out, host, lead.net.tiling)
    return out


def with_control_type(net: ControlModel, control_type: str | int | None, name: str | None = None) -> ControlModel:
    """The model to run for a control type: `net` itself for "auto" (or None); else the model of
    that type (`select_type`, ControlNet Union). A type for a model that has none is an error: the
    choice would silently do nothing."""
    if control_type is None or (isinstance(control_type, str) and control_type.strip().lower() == "auto"):
        return net
    select = getattr(net, "select_type", None)
    if select is None:
        what = f"{name!r} is a {net.family}" if name else f"this model is a {net.family}"
        raise InputError(
            f"control type {control_type!r} is only for ControlNet Union / ProMax models, but {what}, which "
            "takes one kind of hint; set control_type to 'auto'"
        )
    return select(control_type)


def add_outputs(a: Outputs, b: Outputs) -> Outputs:
    """Slot-wise, index-wise sum of two controls' outputs; None is a hole, a shorter list is padded.
    Attention patches and feature additions are kept in order (a's, then b's): the host applies them
    one after the other."""
    out: Outputs = {ATTENTION: [*a.get(ATTENTION, []), *b.get(ATTENTION, [])],
                    FEATURE: [*a.get(FEATURE, []), *b.get(FEATURE, [])]}
    for slot in SLOTS:
        x, y = list(a.get(slot, [])), list(b.get(slot, []))
        n = max(len(x), len(y))
        x += [None] * (n - len(x))
        y += [None] * (n - len(y))
        out[slot] = [q if p is None else p if q is None else p + q for p, q in zip(x, y)]
    return out


def cat_tensors(parts: Sequence[Any]) -> Any:
    """Parts of the same structure (a tensor, or a list/tuple/dict of them) concatenated along dim 0."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, (list, tuple)):
        return type(first)(cat_tensors([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: cat_tensors([p[k] for p in parts]) for k in first}
    return first


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """`fn` applied to every tensor of a tensor or a (nested) list/tuple/dict of them."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(fn, t) for t in tree)
    if isinstance(tree, Mapping):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    return tree


def _take(t: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """The selected rows of a per-row tensor; a batch-1 tensor broadcasts and stays as is."""
    return t[rows] if t.shape[0] == batch else t


def _scatter(t: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of `_take` for outputs: the selected rows' tensor placed in a batch of zeros."""
    full = t.new_zeros((batch, *t.shape[1:]))
    full[rows] = t
    return full


def _layout(c: Control) -> tuple:
    return tuple(c.net.host_layout)


def _source(net: ControlModel) -> str:
    name = getattr(net, "source_name", None)
    return f"{name!r}, {net.arch}" if name else net.arch


def _describe(c: Control) -> str:
    host = getattr(c.net, "host", None)
    if host is not None:
        return f"{c.net.arch} ({c.net.family} for a {host.name} transformer of width {c.net.host_layout[0]})"
    if c.net.host_layout is None:
        return f"{c.net.arch} ({c.net.family} for {' or '.join(c.net.host_archs)} UNets)"
    mc, mult, _ = c.net.host_layout
    return f"{c.net.arch} ({c.net.family} for a UNet of width {mc} x {list(mult)})"


def _check_number(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number from {lo:g} to {hi:g}; got {value!r}")
    if not lo <= value <= hi:
        raise InputError(f"{name} {value:g} is out of range; use a value from {lo:g} to {hi:g}")


def _check_mask(mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 3:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(
            f"the mask must be (batch, height, width) like ComfyUI's MASK; got {got}; use mask[None] for a "
            "single (height, width) mask"
        )
    if mask.shape[0] == 0 or mask.shape[1] == 0 or mask.shape[2] == 0:
        raise InputError(f"the mask is empty: shape {tuple(mask.shape)}")
    mask = mask.float()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise InputError("the mask must hold values from 0 to 1 (no NaN/Inf); rescale it")
    return mask
