"""The CUDA fast path for ControlNet inference; a no-op off CUDA.

    from controlnet_core import fast
    fast.prepare(net, dtype=torch.float16)          # fp16/bf16 compute; fp8=True, channels_last=True
    fast.configure(overlap=True)                    # host calls control["sync"]() (our unet.UNet does)
    stack.residuals(request)                        # uses the fast path automatically on CUDA
    fast.on_read(d)                                 # for a host that never calls "sync" (ComfyUI)
    fast.release(stack_or_net)                      # drop its graphs (after a run, on unload)

`ControlStack.residuals` (and so `Control.residuals`) delegates here; `NotImplemented` sends it
back to the plain eager code. Off switch: `CNCORE_FAST=0` or `fast.configure(enabled=False)`.
See `runner.py` for how graphs, static buffers, streams and the in-place sum work.
"""

from .options import FastOptions, configure, enabled, get_options, override
from .overlap import SyncOnRead, on_read
from .prepare import Fp8Conv2d, Fp8Linear, channels_last_pays, fp8_supported, prepare, store_fp8, weight_bytes
from .runner import STATS, release, stack_residuals

__all__ = [
    "FastOptions", "configure", "enabled", "get_options", "override",
    "Fp8Conv2d", "Fp8Linear", "channels_last_pays", "fp8_supported", "prepare", "store_fp8", "weight_bytes",
    "STATS", "release", "stack_residuals", "SyncOnRead", "on_read",
]
