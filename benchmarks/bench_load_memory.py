"""Peak memory while loading a full-size SD1.5 ControlNet, against the size of the file.

Writes a random full-size SD1.5 ControlNet (361M parameters) as fp32 and fp16, `.safetensors` and
`.pth`, to a temp dir; loads each in a fresh subprocess and reports the peak resident set
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) above the process's resident size just before the
load (torch's own import footprint is not the loader's doing). Target: peak <= ~2x the file size.

    .venv/bin/python benchmarks/bench_load_memory.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import RSS_NOW, machine

ROOT = Path(__file__).resolve().parents[1]

CHILD = RSS_NOW + r"""
import json, sys, time
import torch
from comfyui_controlnet_core.controlnet_core.loader import load_controlnet

path, dtype = sys.argv[1], sys.argv[2]
dtype = None if dtype == "file" else getattr(torch, dtype)
before = rss_now()
t0 = time.perf_counter()
cn = load_controlnet(path, dtype=dtype)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
with open("/proc/self/status") as f:  # VmHWM: the same high-water mark, as a cross-check
    hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
params = sum(p.numel() * p.element_size() for p in cn.parameters())
# Memory-mapped weights are read only when first used: touch every one, as the first step would.
with torch.no_grad():
    for p in cn.parameters():
        p.sum()
used_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "used_peak": used_peak, "hwm": hwm, "after": rss_now(), "seconds": dt,
                  "param_bytes": params, "torch": torch.__version__}))
"""


def write_files(folder: Path) -> list[Path]:
    import torch

    from comfyui_controlnet_core.controlnet_core.config import SD15
    from comfyui_controlnet_core.controlnet_core.loader import save_controlnet
    from comfyui_controlnet_core.controlnet_core.model import ControlNet

    net = ControlNet(SD15)
    with torch.no_grad():
        for p in net.parameters():  # random everywhere (the zero convs included)
            p.normal_(0, 0.02)
    paths = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        for ext in (".safetensors", ".pth"):
            path = folder / f"control_sd15_random_{tag}{ext}"
            save_controlnet(net, path, format="original-prefixed" if ext == ".pth" else "original", dtype=dtype)
            paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="write the files here and keep them")
    args = ap.parse_args()
    tmp = None
    if args.keep:
        folder = args.keep
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
    print("writing files ...", flush=True)
    # In a child: ru_maxrss survives fork+exec on Linux, so this process must stay small for the
    # measuring children to start from a clean high-water mark.
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
         f"import bench_load_memory as b, pathlib; print('\\n'.join(map(str, b.write_files(pathlib.Path({str(folder)!r})))))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    paths = [Path(line) for line in out.stdout.split()]
    print(f"machine: {machine()}, Python {platform.python_version()}\n")
    header = (f"{'file':36} {'load as':8} {'file MB':>8} {'before MB':>10} {'peak MB':>8} {'peak-before MB':>15} "
              f"{'ratio':>6} {'peak in use MB':>15} {'ratio':>6} {'seconds':>8}")
    print(header)
    print("-" * len(header))
    for path in paths:
        file_dtype = "fp16" if "fp16" in path.name else "fp32"
        for target in ("file", "float32") if file_dtype == "fp16" else ("file",):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), target], capture_output=True, text=True, check=True,
                cwd=ROOT,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            size = path.stat().st_size
            used = r["peak"] - r["before"]
            label = file_dtype if target == "file" else "fp32"
            torch_version = r["torch"]
            print(f"{path.name:36} {label:8} {size / 1e6:8.0f} {r['before'] / 1e6:10.0f} {r['peak'] / 1e6:8.0f} "
                  f"{used / 1e6:15.0f} {used / size:6.2f} {(r['used_peak'] - r['before']) / 1e6:15.0f} "
                  f"{(r['used_peak'] - r['before']) / size:6.2f} {r['seconds']:8.2f}")
    print(f"\ntorch {torch_version}; peak = ru_maxrss (VmHWM agrees); ratio = (peak - before) / file size;\n"
          "'in use' = after every weight was read once (memory-mapped pages count only once touched)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
