"""ControlNet-LLLite (kohya-ss, SDXL): small networks that condition attention inputs on a hint.

It adds no residuals. Each module sits in front of one attention projection of the SDXL UNet
(`to_q/to_k/to_v` of self-attention, `to_q` of cross-attention, in input blocks 4, 5, 7, 8 and
the middle block) and changes what that projection reads (kohya's `LLLiteModule.forward`):

    cx   = conditioning1(hint * 2 - 1)                  once per run: the hint in [-1, 1], embedded
                                                         to the block's token grid (e channels)
    to_q(h)  ->  to_q(h + up(mid(cat(cx, down(h)))) * strength)

So it speaks `host.py`'s attention-input hook: `control_outputs` returns one deferred function per
module, the host calls it with the activation when it gets there, and `control.Control` applies
strength, weights, rows, masks and start/end to its term like to any residual. The file layout and
how depth, e (`cond_emb_dim`) and m (`mlp_dim`) are read from shapes: `formats/lllite.py`.

Odd latent sizes. A depth-d module embeds the (8h x 8w px) hint with convolutions of total stride
s = 8 * 2**(d-1) px, while the UNet's grid at that level is ceil(h / 2**(d-1)) tokens high (each
downsample rounds up). kohya never trains on such sizes (its buckets are multiples of 64 px). Our
rule: the hint is padded at the bottom and right by repeating its last row/column up to a multiple
of s, so every module's grid equals the UNet's; the hint is neither stretched nor shifted, and every
token whose pixels exist keeps exactly the embedding it has in a larger image. (ComfyUI-Advanced-
ControlNet instead resizes the hint up to the rounded size, which stretches it slightly.)
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, LoadError
from .formats import lllite as fmt
from .formats.detect import Detected
from .formats.lllite import ModuleSpec
from .formats.source import Source, StateDict, assign_weights
from .host import ATTENTION, AttnSite, HostWeights, Outputs
from .layers import DEFAULT_OPS, ComputeDtype


class LLLiteModule(nn.Module):
    """One kohya LLLite module (key names as in the file: `conditioning1.*`, `down.0`, `mid.0`, `up.0`)."""

    def __init__(self, spec: ModuleSpec, ops: Any, **kw: Any):
        super().__init__()
        e, m, d = spec.cond_emb_dim, spec.mlp_dim, spec.depth
        layers: list[nn.Module] = [ops.Conv2d(3, e // 2, 4, stride=4, **kw), nn.ReLU()]
        if d == 1:
            layers.append(ops.Conv2d(e // 2, e, 2, stride=2, **kw))
        elif d == 2:
            layers.append(ops.Conv2d(e // 2, e, 4, stride=4, **kw))
        else:
            layers += [ops.Conv2d(e // 2, e // 2, 4, stride=4, **kw), nn.ReLU(), ops.Conv2d(e // 2, e, 2, stride=2, **kw)]
        self.conditioning1 = nn.Sequential(*layers)
        self.down = nn.Sequential(ops.Linear(spec.in_dim, m, **kw), nn.ReLU())
        self.mid = nn.Sequential(ops.Linear(m + e, m, **kw), nn.ReLU())
        self.up = nn.Sequential(ops.Linear(m, spec.in_dim, **kw))
        self.stride = 8 * 2 ** (d - 1)  # hint pixels per token

    def embed(self, hint: torch.Tensor) -> torch.Tensor:
        """(B, e, th, tw) from a (B, 3, H, W) hint in [-1, 1]; odd sizes padded (module docstring)."""
        pad_h, pad_w = -hint.shape[-2] % self.stride, -hint.shape[-1] % self.stride
        if pad_h or pad_w:
            hint = F.pad(hint, (0, pad_w, 0, pad_h), mode="replicate")
        return self.conditioning1(hint)

    def term(self, cx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """up(mid(cat(cx, down(h)))): cx (1 or B, N, e) tokens, h (B, N, in)."""
        if cx.shape[0] != h.shape[0]:
            cx = cx.expand(h.shape[0], -1, -1)
        return self.up(self.mid(torch.cat([cx, self.down(h)], dim=-1)))


class ControlNetLLLite(ComputeDtype, nn.Module):
    """All modules of one LLLite file, registered under their file names (so the state dict keys are
    the file's); implements `control.ControlModel`."""

    family = "ControlNet-LLLite"
    hint_channels = 3
    arch = "sdxl"  # kohya's LLLite exists for SDXL only (sd-scripts `sdxl_train_control_net_lllite.py`)
    host_archs = ("sdxl",)
    context_dim = None  # reads no text and no `y`
    adm_channels = None
    fast_path_net = None

    def __init__(self, specs: Sequence[ModuleSpec], ops: Any = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not specs:
            raise InputError("a ControlNet-LLLite needs at least one module")
        ops = DEFAULT_OPS if ops is None else ops
        self.specs = list(specs)
        for spec in self.specs:
            self.add_module(spec.name, LLLiteModule(spec, ops, device=device, dtype=dtype))
        self.blocks = list(dict.fromkeys(s.site.block for s in self.specs))  # the UNet blocks, host order

    @property
    def storage_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def module(self, spec: ModuleSpec) -> LLLiteModule:
        return getattr(self, spec.name)

    @property
    def host_layout(self) -> tuple:
        """(model_channels, channel_mult, num_res_blocks) of the SDXL-shaped UNet it fits. The file
        shows the widths of levels 1 and 2; level 0 (no attention in SDXL) is taken as half of
        level 1, as in SDXL, and kohya's block numbering means 2 ResBlocks per level."""
        width = {s.level: s.in_dim for s in self.specs}
        sdxl = (1, 2, 4)
        mc = next(width[lvl] // sdxl[lvl] for lvl in sorted(width))
        return (mc, tuple(width.get(lvl, sdxl[lvl] * mc) // mc for lvl in range(3)), 2)

    def hint_size(self, h: int, w: int) -> tuple[int, int]:
        return 8 * h, 8 * w

    def embed_hint(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """Each module's hint embedding (B, e, th, tw), from a [0, 1] hint scaled to [-1, 1] as kohya
        trains (`train_util` normalises conditioning images with mean 0.5, std 0.5)."""
        x = hint.to(self.dtype) * 2.0 - 1.0  # stays on the latent's device (comfy ops cast weights to it)
        return [self.module(s).embed(x) for s in self.specs]

    def output_levels(self) -> list[int]:
        """One weighted output per patched UNet block (input 4, 5, 7, 8, middle): its level."""
        return [next(s.level for s in self.specs if s.site.block == b) for b in self.blocks]

    def control_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        y: torch.Tensor | None, embedding: Sequence[torch.Tensor]) -> Outputs:
        """The deferred terms, one per module: nothing runs until the host calls them."""
        return {ATTENTION: [(s.site, partial(self._term, s, cx)) for s, cx in zip(self.specs, embedding)]}

    def _term(self, spec: ModuleSpec, cx: torch.Tensor, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if h.shape[-1] != spec.in_dim:
            raise InputError(
                f"the ControlNet-LLLite module {spec.name} expects an attention input {spec.in_dim} wide, the UNet's is "
                f"{h.shape[-1]}; the LLLite was made for another base model: use one made for your SDXL checkpoint"
            )
        if tuple(cx.shape[-2:]) != tuple(grid) or h.shape[1] != grid[0] * grid[1]:
            raise InputError(
                f"the ControlNet-LLLite hint embedding of {spec.name} is {cx.shape[-2]}x{cx.shape[-1]} tokens but the "
                f"UNet's block has {grid[0]}x{grid[1]} ({h.shape[1]} tokens); the host's grid does not follow SDXL's "
                "(each level half the latent, rounded up)"
            )
        if cx.shape[0] not in (1, h.shape[0]):
            raise InputError(f"{cx.shape[0]} hint embeddings for {h.shape[0]} rows of the UNet's batch")
        tokens = cx.flatten(2).transpose(1, 2)  # (B, e, th, tw) -> (B, th*tw, e), the UNet's token order
        return self.module(spec).term(tokens, h.to(self.dtype)).to(h.dtype)

    def bind_host(self, host_weights: HostWeights | None) -> None:
        """Check, before the first step, that the host UNet has every patched projection at the width
        the modules expect (an LLLite for another UNet fails here in a sentence, not deep in a step)."""
        if host_weights is None:
            return
        sd = host_weights()
        for s in self.specs:
            key = ldm_key(s.site)
            w = sd.get(key)
            kind, number = s.site.block
            where = f"{kind} block {number}" if kind != "middle" else "the middle block"
            if w is None:
                raise InputError(
                    f"the ControlNet-LLLite patches {key[:-len('.weight')]}, which the model being sampled does not "
                    f"have (no transformer block {s.site.index} in {where}); it is made for SDXL UNets: use an SDXL "
                    "checkpoint"
                )
            if w.shape[-1] != s.in_dim:
                raise InputError(
                    f"the ControlNet-LLLite was made for a UNet whose attention in {where} is {s.in_dim} wide, but "
                    f"the model being sampled has {w.shape[-1]}; use an LLLite made for this checkpoint"
                )


def ldm_key(site: AttnSite) -> str:
    """The host UNet's weight a site feeds, LDM names (`input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`)."""
    kind, number = site.block
    block = "middle_block" if kind == "middle" else f"{kind}_blocks.{number}"
    return f"{block}.1.transformer_blocks.{site.index}.{site.attn}.to_{site.proj}.weight"


# ------------------------------------------------------------------------------------------------
# the family's entry points (`loader.FAMILY_LOADERS`)

def load(source: Source, device: Any, dtype: torch.dtype, ops: Any, config: Any) -> ControlNetLLLite:
    """kohya's layout (formats/lllite.py): each module's widths and depth read from its shapes."""
    if config is not None:
        raise LoadError(f"{source.name}: a config override is for ControlNets; an LLLite's shape is read from its file")
    specs = fmt.read_modules({k: tuple(v.shape) for k, v in source.sd.items()}, source.name)
    model = ControlNetLLLite(specs, ops=ops, device="meta", dtype=dtype)
    return assign_weights(model, source.sd, source.name, "a ControlNet-LLLite of these module shapes")


def arch(header: StateDict, found: Detected) -> str:
    fmt.read_modules({k: tuple(v.shape) for k, v in header.items()}, "header")  # refuses what we cannot run
    return ControlNetLLLite.arch
