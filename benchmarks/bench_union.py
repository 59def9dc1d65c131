"""Per-step cost of several ControlNet Union types in one stack: the default (one pass per type)
against the multi-condition option (one pass for all types).

A full-size SDXL ControlNet Union ProMax (1.26 B parameters, random weights, fp32), two controls
(canny + depth hints, strengths 0.7 / 1.3) on a CFG batch, as our runtime evaluates them:

* default (Apply's `union_multi_condition` off): `ControlStack([canny, depth])` -> two passes, one
  type each, outputs summed: ComfyUI's SetUnionControlNetType -> Apply chain;
* multi-condition (`union_multi_condition` on): `ControlStack([canny, depth], fuse=True)` -> one
  network pass over both types (xinsir's multi-control inference, diffusers' ControlNetUnionModel).

Each row is the median of `--repeats` model calls after one warm-up call (the hint encoder runs
once per run, in the warm-up, as in sampling); the two kinds of call alternate. Prints a table and the machine, and writes
benchmarks/results/union_cpu.md (or `--out`).

    .venv/bin/python benchmarks/bench_union.py [--latent 32] [--batch 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from comfyui_controlnet_core.controlnet_core.config import SDXL
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings, ControlStack
from comfyui_controlnet_core.controlnet_core.host import StepRequest
from comfyui_controlnet_core.controlnet_core.union import UnionControlNet
from measure import machine

ROOT = Path(__file__).resolve().parents[1]


def describe() -> str:
    load = ""
    if hasattr(os, "getloadavg"):  # the machine may be shared: say how busy it was
        load = f", load average {os.getloadavg()[0]:.1f} at the start"
    return f"{machine()}{load}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def everything(p: float) -> float:
    return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1.0 - p))


def timed(fns, repeats: int) -> list[float]:
    """Median seconds per call of each function; calls alternate (a, b, a, b, ...) so that a change
    in the machine's load during the run hits both alike."""
    for fn in fns:
        fn()  # warm-up: the hint encoder runs here, once per run
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = a 256 px image)")
    ap.add_argument("--batch", type=int, default=2, help="model-call batch (2 = one image with CFG)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "union_cpu.md")
    args = ap.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    net = UnionControlNet(SDXL, num_types=8).eval()
    with torch.no_grad():  # the zero-initialised layers too, so nothing is trivially zero
        for p in net.parameters():
            if p.ndim == 4 and p.shape[-1] == 1:
                p.normal_(0.0, 0.02)
        net.spatial_ch_projs.weight.normal_(0.0, 0.02)
    build = time.perf_counter() - t0
    params = sum(p.numel() for p in net.parameters())

    b, s = args.batch, args.latent
    g = torch.Generator().manual_seed(1)
    hints = [torch.rand(1, 3, 8 * s, 8 * s, generator=g) for _ in range(2)]
    request = StepRequest(torch.randn(b, 4, s, s, generator=g), torch.full((b,), 5.0), torch.full((b,), 500.0),
                          torch.randn(b, 77, 2048, generator=g), torch.randn(b, 2816, generator=g),
                          (0, 1) if b % 2 == 0 else (0,))
    canny = Control(net.select_type("canny"), hints[0], ControlSettings(strength=0.7))
    depth = Control(net.select_type("depth"), hints[1], ControlSettings(strength=1.3))
    fused = ControlStack([canny, depth], fuse=True)
    default = ControlStack([canny, depth])
    for st in (fused, default):
        st.pre_run(everything)

    def run_fused():
        with torch.no_grad():
            fused.residuals(request)

    def run_default():
        with torch.no_grad():
            default.residuals(request)

    info = describe()
    fused_s, default_s = timed([run_fused, run_default], args.repeats)
    rows = [("union_multi_condition on: 1 pass, 2 types", fused_s),
            ("default (= ComfyUI's chain): 2 passes, 1 type each", default_s)]
    if hasattr(os, "getloadavg"):
        info += f"; load average {os.getloadavg()[0]:.1f} at the end"
    head = (f"ControlNet Union ProMax, SDXL full size ({params / 1e9:.2f} B parameters, fp32, random weights; built in "
            f"{build:.0f} s), latent {s}x{s} ({8 * s} px), batch {b}, canny 0.7 + depth 1.3; median of "
            f"{args.repeats} model calls after a warm-up")
    lines = ["| evaluation | seconds per model call | vs default |", "|---|---|---|"]
    base = rows[1][1]
    for name, sec in rows:
        lines.append(f"| {name} | {sec:.2f} | {sec / base:.2f}x |")
    saving = 1 - rows[0][1] / base
    text = "\n".join([
        "# ControlNet Union: one pass per type (default) vs one multi-condition pass (CPU)", "",
        f"Command: `.venv/bin/python benchmarks/bench_union.py --latent {s} --batch {b} --repeats {args.repeats}`", "",
        f"Machine: {info}", "", head, "", *lines, "",
        f"Per-step saving of the multi-condition pass: {saving:.0%} of the default's time (it gives another "
        "image: see the README's Union section).", "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
