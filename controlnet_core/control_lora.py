"""Control-LoRA (Stability AI): a ControlNet whose encoder is the base model's own weights plus
low-rank deltas; the hint encoder, zero convs, norms and biases are stored whole
(`formats/control_lora.py` describes the file).

The file alone is not a network: its encoder exists only together with a base model. So a
`ControlLoRA` is made in two steps:

* load: the file's tensors (low-rank factors and the layers stored whole) as parameters, so a
  host's memory manager moves them like any model's (SDXL rank 128: ~0.4 GB in fp16);
* `bind_host(host_weights)`, at the start of every sampling run (`Control.pre_run` passes the host
  UNet's state dict as it is at that moment, the user's LoRAs already patched in): checks that the
  base model fits (an SD1.5 Control-LoRA on an SDXL model is refused here, before the first step)
  and merges every delta ONCE into a plain `model.ControlNet`, `W = W_base + up @ down`. Each step
  then runs that ControlNet: a Control-LoRA step costs what a full ControlNet step costs. (ComfyUI
  keeps the factors and recomputes `W + up @ down` in every layer of every forward.)

Memory: the merged copy is one full ControlNet's weights (SD1.5: 361 M parameters, 0.72 GB in
fp16; SDXL: 1.25 G, 2.5 GB in fp16), less the tensors the file stores whole, which it shares with
the file. `bound_bytes` is that size, for a host's memory planning; `unbind_host()` frees it.
The copy is built on the device the file's weights sit on (where the host's memory manager put
them) in their dtype (the host's choice), and follows the latent to another device if needed.

When it is rebuilt: `bind_host` reads a cheap fingerprint of the base-model weights it uses — per
tensor its shape, dtype, device, storage address, in-place version counter (inference tensors,
which ComfyUI's are, have none) and the sum of at most 256 evenly spaced elements (no full pass
over the weights) — and merges again only when that changed (another LoRA patched into the model, another checkpoint). Anything else keeps the copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .config import ControlNetConfig
from .errors import ControlNetError, InputError, LoadError
from .formats import control_lora as fmt
from .formats.controlnet import infer_config
from .formats.detect import Detected
from .formats.source import Source
from .host import HostWeights, Outputs
from .layers import ComputeDtype
from .model import ConfigMembers, ControlNet

# The parts of a UNet a ControlNet copies: what a Control-LoRA reads from its base model.
_ENCODER_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
_PROBES = 256  # elements sampled per tensor for the fingerprint
_FAMILY = {"sd15": "SD1.x", "sd21": "SD2.x", "sdxl": "SDXL"}


def _slot(key: str) -> str:
    """A state-dict key as a parameter name (parameter names cannot hold dots)."""
    return key.replace(".", "/")


@dataclass
class _Bound:
    net: ControlNet
    fingerprint: tuple


class ControlLoRA(ConfigMembers, ComputeDtype, nn.Module):
    """A Control-LoRA; implements `control.ControlModel` (see the module docstring)."""

    family = "Control-LoRA"

    def __init__(self, config: ControlNetConfig, full: dict[str, torch.Tensor], lowrank: dict[str, fmt.LowRank],
                 ops: Any = None, dtype: torch.dtype | None = None, name: str = "Control-LoRA",
                 dense: dict[str, torch.Tensor] | None = None):
        """`dense`: `fmt.dense_shapes(full, lowrank, name)` when the caller already has it (the loader
        infers the config from it)."""
        super().__init__()
        self.config = config
        self.source_name = name
        self._ops = ops
        skeleton = ControlNet(config, ops=ops, device="meta", dtype=dtype)  # shapes only
        self._shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        if dense is None:
            dense = fmt.dense_shapes(full, lowrank, name)
        _check_file(self._shapes, dense, name, config)
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.full = nn.ParameterDict({_slot(k): frozen(t) for k, t in full.items()})
        self.up = nn.ParameterDict({_slot(m): frozen(lr.up) for m, lr in lowrank.items()})
        self.down = nn.ParameterDict({_slot(m): frozen(lr.down) for m, lr in lowrank.items()})
        self._full_keys = frozenset(full)
        self._lowrank = frozenset(lowrank)
        # read from the base model: every weight the file does not store whole
        self._host_keys = tuple(k for k in self._shapes if k not in self._full_keys)
        # allocated by a merge (the rest is shared with the file's tensors)
        self._built_keys = tuple(k for k in self._shapes if k not in self._full_keys or _module(k) in self._lowrank)
        self._bound: _Bound | None = None

    # ---- what the file says ---------------------------------------------------------------

    @property
    def ranks(self) -> list[int]:
        """The ranks of its low-rank layers, largest first (Stability's files: [128] or [256], less
        where a layer is narrower than the rank)."""
        return sorted({int(self.down[_slot(m)].shape[0]) for m in self._lowrank}, reverse=True)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The file's tensors' dtype. The merged ControlNet is built in the compute dtype (`dtype`), as
        ComfyUI builds its own Control-LoRA's network in the dtype it computes in."""
        return next(iter(self.parameters())).dtype

    @property
    def device(self) -> torch.device:
        """Where the file's weights sit; the accelerator if a host loaded any of them there."""
        devices = {p.device for p in self.parameters()}
        gpu = sorted((d for d in devices if d.type != "cpu"), key=str)
        return gpu[0] if gpu else torch.device("cpu")

    @property
    def bound_bytes(self) -> int:
        """Bytes a merge allocates at most: the merged copy, less what it shares with the file (base-model
        weights the file leaves as they are are shared too when their device and dtype already fit)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        # stored in another dtype than the merged net computes in: what the file stores whole is copied too
        keys = self._built_keys if self.storage_dtype == self.dtype else self._shapes
        return itemsize * sum(math.prod(self._shapes[k]) for k in keys)

    @property
    def bound_net(self) -> ControlNet | None:
        """The merged ControlNet of the current base model (None before `bind_host`)."""
        return None if self._bound is None else self._bound.net

    @property
    def fast_path_net(self) -> ControlNet | None:
        """What the CUDA runner (fast/) runs: the merged ControlNet, a plain `model.ControlNet`. A new
        merge is a new net, so the runner drops the graphs of the old one (they replay its addresses)."""
        return self.bound_net

    # ---- the base model -------------------------------------------------------------------

    def bind_host(self, host_weights: HostWeights | None) -> None:
        """Build (or keep) the merged ControlNet for the base model whose weights `host_weights()`
        returns (LDM names, LoRAs applied). Raises a sentence when they do not fit."""
        if host_weights is None:
            raise InputError(
                f"{self.source_name}: a Control-LoRA is built from the base model's own weights, but the sampler "
                "passed none at the start of the run; sample through a host that hands its UNet's weights to "
                "pre_run (ComfyUI's samplers, or controlnet_core.sampler.sample)"
            )
        host = host_weights()
        with torch.no_grad():
            base = {k: host.get(k) for k in self._host_keys}  # read once: a host may compute them on access
            self._check_host(base, host)
            fingerprint = _fingerprint(list(base.values()))
            if self._bound is not None and self._bound.fingerprint == fingerprint:
                return
            self._bound = None  # free the old copy first: never two merged copies at once
            self._bound = _Bound(self._merge(base), fingerprint)

    def unbind_host(self) -> None:
        """Free the merged copy (a host calls this when its run ends; the next run merges again)."""
        self._bound = None

    def _merge(self, host: dict[str, torch.Tensor]) -> ControlNet:
        """The ControlNet of `self._host_keys` read from the base model + the file."""
        device, dtype = self.device, self.dtype
        sd: dict[str, torch.Tensor] = {}
        for k in self._shapes:
            base = self.full[_slot(k)] if k in self._full_keys else host[k]
            module = _module(k)
            if module in self._lowrank:
                w = fmt.LowRank(self.up[_slot(module)], self.down[_slot(module)]).delta(device)  # fp32
                w += base.detach().to(device=device, dtype=torch.float32)
                sd[k] = w.to(dtype)
            else:  # a layer stored whole, or one the file leaves to the base model: shared, not copied
                sd[k] = base.detach().to(device=device, dtype=dtype)
        net = ControlNet(self.config, ops=self._ops, device="meta", dtype=dtype)
        net.load_state_dict(sd, strict=True, assign=True)
        return net.requires_grad_(False).eval()

    def _check_host(self, base: dict[str, torch.Tensor | None], host: Mapping[str, torch.Tensor]) -> None:
        """`base`: what we read of the host (None: missing); `host`: all of it, for its key names."""
        problems = []
        for k, t in base.items():
            if t is None:
                problems.append(f"it needs {k}, which the model lacks")
            elif tuple(t.shape) != self._shapes[k]:
                problems.append(f"{k} is {tuple(t.shape)} in the model but {self._shapes[k]} here")
        problems += [f"the model has {k}, which this Control-LoRA lacks" for k in host
                     if k.startswith(_ENCODER_PREFIXES) and k.endswith((".weight", ".bias")) and k not in self._shapes]
        if not problems:
            return
        cfg = self.config
        made_for = f"{_FAMILY[cfg.arch]} models (text width {cfg.context_dim})"
        host_arch, ctx = _host_arch(host)
        if host_arch != cfg.arch or ctx != cfg.context_dim:
            raise InputError(
                f"{self.source_name}: this Control-LoRA is made for {made_for}, but the model being sampled is "
                f"{_FAMILY[host_arch]} (text width {ctx}); load a Control-LoRA made for that model"
            )
        raise InputError(
            f"{self.source_name}: this Control-LoRA is made for {made_for} of another UNet layout than the model "
            f"being sampled ({problems[0]}; {len(problems)} difference(s)); load a Control-LoRA made for this "
            "checkpoint"
        )

    # ---- running ----------------------------------------------------------------------------

    def _net(self, device: torch.device) -> ControlNet:
        if self._bound is None:
            raise ControlNetError(
                f"{self.source_name}: the Control-LoRA has not been built from a base model yet; the host must "
                "call pre_run with the base model's weights (host_weights) before the first step"
            )
        net = self._bound.net
        if net.device != device:  # the host computes where our weights are not (e.g. ComfyUI --novram)
            net.to(device)
        return net

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        return self._net(hint.device).embed_hint(hint)

    def control_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        y: torch.Tensor | None, embedding: torch.Tensor) -> Outputs:
        return self._net(x.device).control_outputs(x, timesteps, context, y, embedding)


def _module(key: str) -> str | None:
    return key[: -len(".weight")] if key.endswith(".weight") else None


def _host_arch(host: Mapping[str, torch.Tensor]) -> tuple[str, int | None]:
    """(base model family, text width) of a UNet state dict, by the rule of `ControlNetConfig.arch`:
    an SDXL `y` embedding -> sdxl, linear transformer projections -> sd21, else sd15."""
    ctx = proj = None
    for k in host:
        if ctx is None and k.endswith("attn2.to_k.weight"):
            ctx = int(host[k].shape[1])
        if proj is None and k.endswith(".proj_in.weight"):
            proj = host[k].ndim
    if "label_emb.0.0.weight" in host:
        return "sdxl", ctx
    return ("sd21" if proj == 2 else "sd15"), ctx


def _fingerprint(tensors: list[torch.Tensor]) -> tuple:
    """Cheap identity of a list of tensors (see the module docstring): one small reduction per
    tensor and one device sync per device, no pass over all the data."""
    described, probes = [], {}
    for t in tensors:
        flat = t.detach().reshape(-1)
        version = None if t.is_inference() else t._version  # inference tensors (ComfyUI's) keep no counter
        described.append((tuple(t.shape), t.dtype, str(t.device), t.data_ptr(), version))
        step = max(1, flat.numel() // _PROBES)
        probes.setdefault(str(t.device), []).append(flat[::step][:_PROBES].float().sum())
    sums = tuple((d, tuple(torch.stack(v).tolist())) for d, v in sorted(probes.items()))
    return tuple(described), sums


def _check_file(want: dict[str, tuple], got: dict[str, torch.Tensor], name: str, cfg: ControlNetConfig) -> None:
    """Every layer of the file (low-rank ones by their full weight's shape) against the ControlNet
    its shapes describe."""
    extra = sorted(k for k in got if k not in want)
    if extra:
        raise LoadError(
            f"{name}: {len(extra)} layer(s) fit no part of a ControlNet (e.g. {', '.join(extra[:3])}); the file is "
            "a Control-LoRA variant we do not support or it is damaged"
        )
    for k, t in got.items():
        if tuple(t.shape) != want[k]:
            raise LoadError(
                f"{name}: layer {k} is {tuple(t.shape)} (its low-rank factors included) but a {cfg.arch} ControlNet "
                f"of the shapes the file describes needs {want[k]}; the ranks or shapes fit no base-model layer, "
                "so the file is damaged or not a Control-LoRA"
            )


# ------------------------------------------------------------------------------------------
# the family's entry points (`loader.FAMILY_LOADERS`)

def _config(sd: dict[str, torch.Tensor], name: str) -> tuple[ControlNetConfig, dict, dict, dict]:
    """(config, tensors stored whole, low-rank layers, every weight's shape as meta tensors)."""
    full, lowrank = fmt.split(sd, name)
    dense = fmt.dense_shapes(full, lowrank, name)
    return infer_config(dense, name=name), full, lowrank, dense


def load(source: Source, device: Any, dtype: torch.dtype, ops: Any, config: ControlNetConfig | None) -> ControlLoRA:
    """A `Source` holding a Control-LoRA -> the model (not yet bound to a base model).
    `config` overrides the architecture read from the shapes (still checked against them)."""
    cfg, full, lowrank, dense = _config(source.sd, source.name)
    model = ControlLoRA(config or cfg, full, lowrank, ops=ops, dtype=dtype, name=source.name, dense=dense).eval()
    # ComfyUI keeps a Control-LoRA's file tensors as the file stores them (its `control_weights`) and
    # builds only the merged network in the dtype it computes in: the loader reads tensors stored
    # narrower than `dtype` as they are (`keeps_file_dtype`), and `dtype` is the merge's dtype
    model.compute_dtype = dtype
    return model


def arch(header: dict[str, torch.Tensor], found: Detected) -> str:
    """The base model family from the header's shapes alone."""
    return _config(header, "header")[0].arch
