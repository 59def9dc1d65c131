"""The host protocol: how a sampler asks the controls for residuals, one model call at a time.

A host (ComfyUI through `nodes/adapter.py`, or our reference sampler) does two things:

1. once per sampling run, before the first step: `source.pre_run(percent_to_sigma)`, where
   `percent_to_sigma(p)` maps a fraction of the schedule to a sigma of the host's noise schedule
   (ComfyUI: `model.model_sampling.percent_to_sigma`, p <= 0 -> a huge sigma, p >= 1 -> 0). This
   fixes each control's active sigma range and drops per-run caches (the hint embedding);
2. on every model call: `source.residuals(StepRequest(...))`, which returns
   `{"input": [...], "middle": [mid], "output": down}` or None when no control is active.

The dict is in the order ComfyUI's UNet consumes it: each encoder block pops `input` from the END
and adds it to its output (which is also the skip it keeps: T2I-Adapter features go here, None for
blocks that get nothing); `middle` is popped and added after the middle block; each decoder block
pops `output` from the END, so `down[-1]` (deepest skip) is used first. The lists are consumed, so
every call returns fresh lists.

Families build their answer as `Outputs`: the same three slots with every list in *encoder* order
(input block 0 first, the first skip first); `control_dict` turns that into the consumable dict.

Attention-input patches, the one hook next to residuals (`ATTENTION`; ControlNet-LLLite uses it).
Some families do not add to a block's output but to the INPUT of an attention projection inside it:
the host computes `to_q(h + term(h))` instead of `to_q(h)`. Such a family answers, in
`Outputs["attention"]`, a list of `(AttnSite, fn)` in the order the host meets the sites, where

    AttnSite(block, index, attn, proj)  block: ("input", i) | ("middle", 0) | ("output", i), the
                                        UNet block as ComfyUI names it (`transformer_options["block"]`);
                                        index: the transformer block inside that block's
                                        SpatialTransformer (ComfyUI's `block_index`); attn: "attn1"
                                        (self-attention: proj "q", "k" or "v") or "attn2" (cross-
                                        attention: only "q", the other two read the text);
    fn(h, grid) -> term                 h: (B, N, C) what the projection is about to read, N = th*tw
                                        tokens of the block's grid `grid = (th, tw)`; term: same shape.

The functions are deferred: the family computes nothing until the host runs that attention. In the
dict, `control_dict` groups them per site: `{"attention": {site: [fn, ...]}}` (the key is absent when
no control patches anything). At a site the host applies the list in order, each to what the
previous one left: `h = h + fn(h, grid)` (so two LLLites compose as ComfyUI's `attn1_patch` list and
kohya's nested wrappers do), then runs the projection. A site the host lacks must not be skipped
in silence: the reference UNet refuses it, and LLLite checks the host's weights at `pre_run`.
The reference UNet (`unet.py`) implements the hook; ComfyUI's adapter registers the same functions
as `attn1_patch` / `attn2_patch` for one model call (`nodes/control_object.py`).

Feature additions, the hook for families that add at ONE point of the UNet a term that depends on
the host's own activation there (`FEATURE`; ControlNeXt's cross normalisation needs the feature's
mean and std). Such a family answers, in `Outputs["feature"]`, a list of `(block, fn)` where

    block: ("input", i)   after input block i, AFTER its skip was kept: the term reaches the next
                          block but not the skip the decoder reads (ComfyUI's
                          `input_block_patch_after_skip` at `transformer_options["block"] == ("input", i)`);
           ("middle", 0)  after the middle block and its `middle` residual, before the decoder
                          (ComfyUI: `output_block_patch` at ("output", 0), on its first argument);
    fn(h) -> term         h: (B, C, h, w) the feature there (residuals of that point already added);
                          term: the same shape.

Deferred like attention patches. In the dict, `control_dict` groups them per block:
`{"feature": {block: [fn, ...]}}` (absent when none); the host applies the list in order, out of
place, each to what the previous one left: `h = h + fn(h)`. A block the host lacks is an error.

`pre_run` may also get `host_weights`, a callable returning the host UNet's state dict with LDM
key names (`input_blocks.*`, ...) as it is now, LoRAs applied: families made of the host's own
weights (Control-LoRA) are built from it at the start of every run.

`source` is a `control.Control` or `control.ControlStack` (anything with `pre_run` and `residuals`).

DiT hosts (Flux, Chroma). A transformer host has no encoder/decoder: it adds residuals to its image
tokens after each block, reading them by INDEX (`control["input"][i]` after double block i,
`control["output"][i]` after single block i, on the leading image tokens, `img[:, :n] += add`), so
the lists are not reversed. What differs between hosts is data, `DiTHost` (block counts per slot),
and a family's tiling rule (`BlockMap`): a ControlNet with n < N blocks covers the host's N blocks
either consecutively (`s[i // ceil(N/n)]`: ComfyUI's and diffusers' rule for latent-input nets) or
cyclically (`s[i % n]`: XLabs). A DiT family answers one (B, C, th, tw) map per own block in
encoder order (masks and pooling work on the token grid); `spread_blocks` turns each map into the
(B, th*tw, C) tokens once and repeats the same tensor where the rule repeats it, so a repeated
output is scaled once (ComfyUI's `control_merge` scales shared repeats once, in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import torch

from .errors import InputError

PercentToSigma = Callable[[float], float]
ResidualDict = dict[str, Any]  # "input"/"middle"/"output": lists of tensors; "attention": {site: [fn]}
Outputs = dict[str, list]  # slot -> tensors (or None holes) in encoder order; see the module docstring
HostWeights = Callable[[], Mapping[str, torch.Tensor]]

SLOTS = ("input", "output", "middle")  # also the order in which outputs are counted for weights
ATTENTION = "attention"  # the attention-input patch slot; counted after SLOTS, one weight per UNet block
FEATURE = "feature"  # the feature-addition slot; counted after ATTENTION, one weight per block
ATTN_PROJECTIONS = {"attn1": ("q", "k", "v"), "attn2": ("q",)}

AttnFn = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]  # (h (B, N, C), grid (th, tw)) -> term
FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # h (B, C, h, w) -> term of the same shape
FEATURE_KINDS = ("input", "middle")  # where a feature addition can act (see the module docstring)


class AttnSite(NamedTuple):
    """Where an attention-input patch acts (see the module docstring)."""

    block: tuple[str, int]  # ("input", 4), ("middle", 0), ("output", 2)
    index: int              # transformer block inside the block (ComfyUI's block_index)
    attn: str               # "attn1" | "attn2"
    proj: str               # "q" | "k" | "v"

    def check(self) -> "AttnSite":
        kind, number = self.block
        if (kind not in ("input", "middle", "output") or self.index < 0 or number < 0
                or self.proj not in ATTN_PROJECTIONS.get(self.attn, ())):
            raise InputError(
                f"{self} is no attention-input site: blocks are input/middle/output, attn1 takes q, k, v and "
                "attn2 only q"
            )
        return self

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond markers


@dataclass(frozen=True)
class StepRequest:
    """One model call of the host.

    x:         the noisy latent as the UNet sees it (B, 4, h, w), already scaled by the host
               (ComfyUI's `calculate_input`: x / sqrt(sigma^2 + 1) for eps/v models);
    sigma:     (B,) the sampler's sigma; every row shares it (only sigma[0] is read, as ComfyUI);
    timesteps: (B,) the same step on the model's 0..999 scale;
    context:   (B, L, D) text context; y: (B, adm) SDXL vector or None;
    cond_or_uncond: one entry per equal chunk of the batch, 0 = cond (positive), 1 = uncond
               (negative), in batch order (ComfyUI's `transformer_options["cond_or_uncond"]`);
    guidance:  (B,) or None: the guidance value a guidance-distilled DiT (Flux dev) reads.
    """

    x: torch.Tensor
    sigma: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor | None = None
    cond_or_uncond: tuple[int, ...] = (COND,)
    guidance: torch.Tensor | None = None  # (B,) Flux dev's distilled guidance; None for other hosts

    def __post_init__(self) -> None:
        object.__setattr__(self, "cond_or_uncond", tuple(int(c) for c in self.cond_or_uncond))
        batch = self.x.shape[0] if self.x.ndim else 0
        chunks = len(self.cond_or_uncond)
        if self.x.ndim != 4:
            raise InputError(f"the latent must be (batch, channels, h, w); got {tuple(self.x.shape)}")
        if chunks == 0 or batch % chunks:
            raise InputError(
                f"cond_or_uncond lists {chunks} chunk(s) but the batch has {batch} rows; give one 0/1 "
                "entry per equal-size chunk of the batch"
            )
        if any(c not in (COND, UNCOND) for c in self.cond_or_uncond):
            raise InputError(f"cond_or_uncond entries must be 0 (cond) or 1 (uncond); got {self.cond_or_uncond}")
        sigma = torch.as_tensor(self.sigma)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        object.__setattr__(self, "sigma", sigma)
        timesteps = torch.as_tensor(self.timesteps)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        object.__setattr__(self, "timesteps", timesteps)

    @property
    def chunk_size(self) -> int:
        return self.x.shape[0] // len(self.cond_or_uncond)

    def rows(self, kind: int) -> torch.Tensor:
        """Batch indices of the chunks marked `kind` (COND or UNCOND)."""
        n = self.chunk_size
        idx = [i * n + j for i, c in enumerate(self.cond_or_uncond) if c == kind for j in range(n)]
        return torch.tensor(idx, dtype=torch.long, device=self.x.device)


class ControlSource(Protocol):
    def pre_run(self, percent_to_sigma: PercentToSigma, host_weights: HostWeights | None = None) -> None: ...

    def residuals(self, request: StepRequest) -> ResidualDict | None: ...


@dataclass(frozen=True)
class DiTHost:
    """A transformer host's layout: how many blocks read each control slot (module docstring)."""

    name: str                          # "Flux.1"
    blocks: tuple[tuple[str, int], ...]  # (slot, host blocks reading it)
    models: tuple[str, ...]            # the host model kinds it covers (ComfyUI's `image_model`)


FLUX_HOST = DiTHost("Flux.1", (("input", 19), ("output", 38)), ("flux", "chroma"))
TILINGS = ("consecutive", "cyclic")


@dataclass(frozen=True)
class BlockMap:
    """Which of a ControlNet's n outputs each of the host's N blocks gets."""

    n: int
    host_blocks: int
    rule: str  # TILINGS

    def index(self, i: int) -> int:
        if self.rule == "cyclic":
            return i % self.n
        return i // -(-self.host_blocks // self.n)

    def sources(self) -> list[int]:
        """The output index per host block, for the host blocks that get one."""
        if self.n == 0:
            return []
        return [j for j in (self.index(i) for i in range(self.host_blocks)) if j < self.n]


def spread_blocks(outputs: Outputs, host: DiTHost, rule: str) -> Outputs:
    """A DiT family's per-block maps (B, C, th, tw) as the host's per-block token lists."""
    out: Outputs = {k: v for k, v in outputs.items() if k not in dict(host.blocks)}
    for slot, count in host.blocks:
        maps = outputs.get(slot, [])
        tokens = [None if m is None else m.flatten(2).transpose(1, 2) for m in maps]
        out[slot] = [tokens[j] for j in BlockMap(len(tokens), count, rule).sources()]
    return out


def control_dict(outputs: Outputs, indexed: bool = False) -> ResidualDict:
    """The dict ComfyUI's UNet consumes, with fresh lists (the UNet pops them empty): `input` is
    reversed (popped from the end, block 0 first); `output` stays in encoder order (popped from the
    end by the decoder, deepest first); attention-input patches grouped per site, in order.
    `indexed` (DiT hosts, which read the lists by block index): `input` stays in block order."""
    out: ResidualDict = {
        "input": list(outputs.get("input", []) if indexed else reversed(outputs.get("input", []))),
        "middle": list(outputs.get("middle", [])),
        "output": list(outputs.get("output", [])),
    }
    patches: dict[AttnSite, list[AttnFn]] = {}
    for site, fn in outputs.get(ATTENTION, ()):
        patches.setdefault(site, []).append(fn)
    if patches:
        out[ATTENTION] = patches
    features: dict[tuple[str, int], list[FeatureFn]] = {}
    for block, fn in outputs.get(FEATURE, ()):
        features.setdefault(check_feature_block(block), []).append(fn)
    if features:
        out[FEATURE] = features
    return out


def check_feature_block(block: Any) -> tuple[str, int]:
    """A feature-addition block as a tuple, or a sentence saying why it is none."""
    try:
        kind, number = block
        number = int(number)
    except (TypeError, ValueError):
        raise InputError(f"{block!r} is no UNet block; a feature addition acts at ('input', i) or ('middle', 0)") from None
    if kind not in FEATURE_KINDS or number < 0 or (kind == "middle" and number != 0):
        raise InputError(f"{block!r} is no feature-addition point; use ('input', i) or ('middle', 0)")
    return (kind, number)


def apply_features(fns: list[FeatureFn] | None, h: torch.Tensor) -> torch.Tensor:
    """What a host does at one feature point: each addition, out of place, on what the previous left."""
    for fn in fns or ():
        h = h + fn(h)
    return h


def apply_attention(patches: list[AttnFn], h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """What a host does at one site: each patch adds its term to what the previous one left."""
    for fn in patches:
        h = h + fn(h, grid)
    return h


def unet_control(down: list[torch.Tensor], mid: torch.Tensor) -> ResidualDict:
    """`control_dict` of a ControlNet's residuals."""
    return control_dict({"output": down, "middle": [mid]})


def as_sampler_hook(
    source: ControlSource, percent_to_sigma: PercentToSigma, host_weights: HostWeights | None = None
) -> Callable[..., ResidualDict | None]:
    """Start a sampling run on `source` and return the `control_fn` the reference sampler calls:
    `control_fn(x_in, sigma, timesteps, context, y, cond_or_uncond) -> dict | None`.

    Call once per run: it runs `pre_run`, which resets the run's caches.
    """
    source.pre_run(percent_to_sigma, host_weights)

    def control_fn(
        x_in: torch.Tensor, sigma: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
        y: torch.Tensor | None, cond_or_uncond: Any,
    ) -> ResidualDict | None:
        return source.residuals(StepRequest(x_in, sigma, timesteps, context, y, tuple(cond_or_uncond)))

    return control_fn
