"""Preparing a ControlNet for fast inference: compute dtype, fp8 weight storage, channels_last.

`prepare(net, dtype=torch.float16, fp8=False, channels_last=False)` changes the module in place and
returns it. These are choices about the model, not per call, so they live here rather than in the
runner (which works with whatever module it is given, on any of these forms).

Weights stored in a smaller dtype than they compute in (ComfyUI's manual cast, `load_controlnet(...,
compute_dtype=)`) are run as they are: the casting layers widen each weight as they run, inside
the CUDA graph too. The fast path keeps no widened copy of its own: it would double the weights'
memory, which is what storing them small is for, to save casts that cost a fraction of a step
only on GPUs that cannot compute in the storage dtype (where ComfyUI's own ControlNet casts the
same way); `prepare(net, dtype=...)` converts the weights themselves where a caller wants that.

fp8 storage keeps every Linear/Conv2d weight (except the small time/label embeddings) as
float8_e4m3fn with one fp32 scale per tensor (amax / 448) and upcasts it to the compute dtype
when the layer runs: weight memory about halves against fp16, at the price of e4m3's 3 mantissa
bits (about 2 % relative error of the residuals; a lossy option for small GPUs). The prepared
module is for inference only: its state_dict holds `weight_fp8` / `weight_scale`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0
# Kept in the compute dtype: tiny, and `ControlNet.dtype` reads `time_embed[0].weight`.
_KEEP = ("time_embed", "label_emb")


def fp8_supported() -> bool:
    return FP8 is not None


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w32 = w.detach().float()
    exact = w32.to(FP8)
    if torch.equal(exact.float(), w32):  # already e4m3 values (an fp8 file): stored as they are, scale 1
        return exact, torch.ones((), dtype=torch.float32, device=w32.device)
    scale = (w32.abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (w32 / scale).to(FP8), scale


class _Fp8Weight(nn.Module):
    """Holds `weight_fp8` + `weight_scale`; `.weight` is the upcast weight (computed on access)."""

    compute_dtype: torch.dtype

    def _store(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        q, scale = _quantize(w)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.compute_dtype = w.dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.weight_fp8.to(self.compute_dtype) * self.weight_scale  # 0-dim fp32: stays compute dtype

    def _apply(self, fn: Any, recurse: bool = True) -> "_Fp8Weight":
        # `.half()` / `.to(dtype)` must not turn the fp8 payload into fp16: keep it, follow the
        # compute dtype from the bias (or a probe) instead.
        q, s = self.weight_fp8, self.weight_scale
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=q.device))
        super()._apply(fn, recurse)
        self.weight_fp8 = q.to(device=probe.device, memory_format=_format_of(fn, q))
        self.weight_scale = s.to(probe.device, torch.float32)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self


def _format_of(fn: Any, q: torch.Tensor) -> torch.memory_format:
    """channels_last is kept if `fn` asks for it (probed on a 4-d fp32 tensor)."""
    if q.ndim != 4:
        return torch.contiguous_format
    probe = fn(torch.empty(1, 2, 2, 2))
    if probe.is_contiguous(memory_format=torch.channels_last) and not probe.is_contiguous():
        return torch.channels_last
    return torch.preserve_format


class Fp8Linear(_Fp8Weight):
    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._store(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Fp8Conv2d(_Fp8Weight):
    def __init__(self, layer: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self._store(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def store_fp8(net: nn.Module) -> nn.Module:
    """Replace the Linear/Conv2d layers of `net` (not its time/label embeddings) by fp8-storage
    layers, in place. Returns `net`."""
    if FP8 is None:
        raise RuntimeError("this PyTorch has no float8_e4m3fn; fp8 weight storage needs torch >= 2.1")
    for name, parent in list(net.named_modules()):
        if name.split(".")[0] in _KEEP:
            continue
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full.split(".")[0] in _KEEP:
                continue
            if not _plain_layer(child):
                continue
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, Fp8Linear(child))
            elif isinstance(child, nn.Conv2d) and child.padding_mode == "zeros" and isinstance(child.padding, tuple):
                setattr(parent, child_name, Fp8Conv2d(child))
    return net


def _plain_layer(m: nn.Module) -> bool:
    """A Linear/Conv2d whose math is the plain layer's: the torch class itself, or a subclass that
    only changes how weights are cast or initialised (a host's layer classes, e.g. ComfyUI's
    `comfy.ops`), i.e. one with no parameters but weight/bias and no sub-modules. A subclass with
    more (a LoRA layer's up/down) is left alone."""
    if type(m) in (nn.Linear, nn.Conv2d):
        return True
    own = {n for n, _ in m.named_parameters(recurse=False)}
    return isinstance(m, (nn.Linear, nn.Conv2d)) and own <= {"weight", "bias"} and not any(True for _ in m.children())


def weight_bytes(net: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])


def channels_last_pays(net: nn.Module) -> bool:
    """Where the benchmark (H100, fp16, GPU time of a step) showed channels_last to pay: SD1.x/SD2.x
    widths (SD1.5 batch 2: -6 % of the ControlNet step, batch 8: -2 %); not SDXL (+0.6 %)."""
    cfg = getattr(net, "config", None)
    return cfg is not None and getattr(cfg, "adm_in_channels", None) is None


def prepare(net: nn.Module, *, dtype: torch.dtype | None = None, fp8: bool = False,
            channels_last: bool | str = False) -> nn.Module:
    """Make `net` ready for the fast path, in place: cast to `dtype` (fp16/bf16 compute), then
    optionally store weights in fp8 and/or put conv weights in channels_last. Returns `net`.

    channels_last: True, False, or "auto" (`channels_last_pays`: only where the benchmark
    `benchmarks/bench_step.py` showed a gain). It changes the layout of the convs' weights and
    activations, never the values beyond rounding; residuals still come out contiguous.
    """
    if channels_last not in (True, False, "auto"):
        raise ValueError(f"channels_last must be True, False or 'auto'; got {channels_last!r}")
    if dtype is not None:
        net.to(dtype)
        if hasattr(net, "compute_dtype"):  # weights and compute now in `dtype` (layers.ComputeDtype)
            net.compute_dtype = dtype
    if fp8:
        store_fp8(net)
    if channels_last == "auto":
        channels_last = channels_last_pays(net)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net.eval()
