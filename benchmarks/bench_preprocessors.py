"""Speed of every preprocessor: one 512x512 frame and a batch of 16, per-frame milliseconds; and the
import time of the `preprocessors` package, measured in fresh subprocesses.

The input is a deterministic synthetic 512x512 RGB picture (gradients, shapes, lines, noise), so the
edge and line methods have real work to do. Each method runs at resolution 512 (no resampling for a
512x512 input) with its default parameters; times are the median of several runs after a warm-up.

    .venv/bin/python benchmarks/bench_preprocessors.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "preprocessors"

# Load the package on its own (not through the pack's root __init__, which imports the node layer).
IMPORT_CHILD = r"""
import importlib.util, json, sys, time
t0 = time.perf_counter()
import numpy
t1 = time.perf_counter()
spec = importlib.util.spec_from_file_location("pp", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
P = importlib.util.module_from_spec(spec); sys.modules["pp"] = P; spec.loader.exec_module(P)
t2 = time.perf_counter()
loaded_cv2 = "cv2" in sys.modules
P.run("invert", numpy.zeros((16, 16, 3), numpy.uint8))  # no OpenCV needed
from pp._cv import cv2; cv2()                            # the lazy OpenCV import on first use
t3 = time.perf_counter()
print(json.dumps({"numpy": t1 - t0, "package": t2 - t1, "cv2_first_use": t3 - t2,
                  "cv2_at_import": loaded_cv2, "torch": "torch" in sys.modules}))
"""


def load_package():
    """The preprocessors package loaded by path on its own (no pack root, no install needed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocessors", PKG / "__init__.py",
                                                  submodule_search_locations=[str(PKG)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocessors"] = module
    spec.loader.exec_module(module)
    return module


def test_image(h: int = 512, w: int = 512, seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w, y / h, 0.5 + 0.4 * np.sin((x + y) / 40)], -1) * 180 + 30
    img = img.astype(np.uint8)
    for _ in range(25):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        p = tuple(int(v) for v in rng.integers(0, 512, 2))
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.circle(img, p, int(rng.integers(10, 80)), c, -1, cv2.LINE_AA)
        elif kind == 1:
            q = tuple(int(v) for v in rng.integers(0, 512, 2))
            cv2.rectangle(img, p, q, c, -1)
        else:
            q = tuple(int(v) for v in rng.integers(0, 512, 2))
            cv2.line(img, p, q, c, int(rng.integers(1, 6)), cv2.LINE_AA)
    noise = rng.normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (first-use imports, allocator)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def import_times(runs: int = 5) -> dict:
    rows = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", IMPORT_CHILD, str(PKG)], capture_output=True, text=True,
                           check=True)
        rows.append(json.loads(r.stdout))
    out = {k: statistics.median(r[k] for r in rows) for k in ("numpy", "package", "cv2_first_use")}
    out["cv2_at_import"] = any(r["cv2_at_import"] for r in rows)
    out["torch"] = any(r["torch"] for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    import cv2

    P = load_package()

    frame = test_image()
    batch = np.stack([test_image(seed=i) for i in range(args.batch)])
    mask1 = np.zeros((512, 512), np.float32)
    mask1[128:384, 160:400] = 1.0
    results = []
    for name in P.list_methods():
        kw = {"resolution": 512}
        if P.get_method(name).needs_mask:
            kw["mask"] = mask1
        single = timed(lambda: P.run(name, frame, **kw), args.repeats)
        many = timed(lambda: P.run(name, batch, **kw), max(1, args.repeats // 2))
        results.append({"method": name, "single_ms": single * 1e3, "batch_ms_per_frame": many * 1e3 / args.batch,
                        "feeds": P.get_method(name).feeds.split(",")[0]})
    imp = import_times()

    try:
        cores = f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable"
    except AttributeError:
        cores = f"{os.cpu_count()} logical"
    machine = {
        "cpu": cpu_model(), "cores": cores, "cv2_threads": cv2.getNumThreads(),
        "python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
        "platform": platform.platform(),
    }
    print(f"# preprocessors benchmark: 512x512 RGB uint8, resolution 512, default parameters, median of "
          f"{args.repeats} (single) / {max(1, args.repeats // 2)} (batch of {args.batch}) runs")
    print(f"# machine: {machine['cpu']}; {machine['cores']} cores; OpenCV threads {machine['cv2_threads']}")
    print(f"# versions: Python {machine['python']}, numpy {machine['numpy']}, OpenCV {machine['opencv']}; "
          f"{machine['platform']}")
    print()
    print(f"| {'method':<11} | {'1 frame ms':>10} | {f'batch {args.batch} ms/frame':>17} | feeds")
    print(f"|{'-' * 13}|{'-' * 12}|{'-' * 19}|{'-' * 30}")
    for r in results:
        print(f"| {r['method']:<11} | {r['single_ms']:>10.2f} | {r['batch_ms_per_frame']:>17.2f} | {r['feeds']}")
    print()
    print(f"import (fresh process, median of 5): numpy {imp['numpy'] * 1e3:.1f} ms; preprocessors package "
          f"{imp['package'] * 1e3:.1f} ms on top (OpenCV imported at package import: {imp['cv2_at_import']}, "
          f"torch: {imp['torch']}); lazy OpenCV import at first use {imp['cv2_first_use'] * 1e3:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "methods": results, "import_s": imp}, indent=2))


if __name__ == "__main__":
    main()
