"""The fast path's switches: one global `FastOptions`, changed with `configure` or `override`.

The single off switch for debugging is the environment variable `CNCORE_FAST=0` (read at every
call, so it also works in a running process) or `configure(enabled=False)`. With either, every
control runs the plain eager code of `control.py`, bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_OFF = ("0", "false", "off", "no")


@dataclass
class FastOptions:
    """enabled:       master switch (also `CNCORE_FAST=0`);
    graphs:        capture the ControlNet forward (all controls of a stack) in a CUDA graph per
                   input shape and replay it; off: the same static-buffer code runs eagerly;
    overlap:       run the ControlNet on a side stream and hand the host a `"sync"` callable in the
                   residual dict, which the host must call before it consumes the first residual
                   (our `unet.UNet` does). Opt-in because a host that drops the key would race
                   (`CNCORE_FAST_OVERLAP=1` turns it on by default);
    parallel:      controls of one stack on separate streams (graph branches), summed at the end.
                   Off by default: on the H100 it gained nothing over one stream (the GPU is
                   already busy with the host on the overlap stream) and cost ~0.1 GiB;
    fresh_outputs: hand out a fresh copy of the residuals (one flat copy) instead of the graph's
                   static buffers, so a host may keep them past the next call;
    warmup_calls:  eager calls per input shape before the graph is captured (>= 1);
    warm_on_side:  run those warm-up calls on the side stream, where the capture happens (the
                   H100 measurements used this). Off: on the host's stream, sharing its cache;
                   PyTorch's native allocator keeps a stream's freed blocks for that stream, so a
                   side-stream warm-up keeps the ControlNet's activation memory reserved a second
                   time next to the graph's pool (not so with cudaMallocAsync, ComfyUI's default);
    max_graphs:    per-shape entries kept per stack (least recently used dropped first);
    min_free_mib:  a graph is captured only if this much device memory stays free beyond what it
                   needs; otherwise all graphs are dropped and controls run eagerly (logged once).
                   1024: about what ComfyUI keeps free for inference (`minimum_inference_memory`,
                   0.8 GiB + its 0.4 GiB reserve), so graphs never take the host's working memory;
    allow_cpu:     run the fast path's eager body off CUDA too (no graphs, no streams): for tests.
    """

    enabled: bool = True
    graphs: bool = True
    overlap: bool = False
    parallel: bool = False
    fresh_outputs: bool = True
    warmup_calls: int = 1
    warm_on_side: bool = True
    max_graphs: int = 4
    min_free_mib: int = 1024
    allow_cpu: bool = False


_OPTIONS = FastOptions(overlap=os.environ.get("CNCORE_FAST_OVERLAP", "0").lower() not in _OFF)


def get_options() -> FastOptions:
    """The live options object (do not keep it across `override` blocks)."""
    return _OPTIONS


def enabled() -> bool:
    """True unless switched off by `configure(enabled=False)` or `CNCORE_FAST=0`."""
    return _OPTIONS.enabled and os.environ.get("CNCORE_FAST", "1").strip().lower() not in _OFF


def configure(**changes: object) -> FastOptions:
    """Change options globally, e.g. `configure(overlap=True)`; returns a copy of the new options."""
    names = {f.name for f in dataclasses.fields(FastOptions)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown fast-path option(s) {unknown}; known: {sorted(names)}")
    for k, v in changes.items():
        if k in ("warmup_calls", "max_graphs", "min_free_mib"):
            low = 0 if k == "min_free_mib" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{k} must be an integer >= {low}; got {v!r}")
        elif not isinstance(v, bool):
            raise ValueError(f"{k} must be True or False; got {v!r}")
        setattr(_OPTIONS, k, v)
    return dataclasses.replace(_OPTIONS)


@contextmanager
def override(**changes: object) -> Iterator[FastOptions]:
    """`with override(graphs=False): ...` changes options inside the block only."""
    saved = dataclasses.replace(_OPTIONS)
    try:
        yield configure(**changes)
    finally:
        for f in dataclasses.fields(FastOptions):
            setattr(_OPTIONS, f.name, getattr(saved, f.name))
