"""The edge and line-art networks (HED, PiDiNet, lineart, lineart_anime, TEED, AnyLine; the other
network annotators are in bench_annotators.py), ours vs controlnet-aux ("Aux"), on the same image and
the same weights: seconds per warm call and peak resident memory, at 512x512 and 1024x1024, CPU.

Every (implementation, method, size) runs in its own fresh process (so the peak resident size is
that method's alone): import, build the network from the file, one warm-up call, then the median of
`--repeats` calls. Both sides get the image at its working size (resolution = the image's side), so
neither resizes; torch, OpenMP and OpenCV use `--threads` threads. The weights are random, saved in
the real files' layouts (the time and memory of a network do not depend on its values).

Aux side: controlnet-aux 0.0.10's detectors (the `annotators` test extra), or with `--aux-path` a
comfyui_controlnet_aux checkout's own (`src/custom_controlnet_aux`); AnyLine is Aux's node recipe
(its TEED and lineart-standard detectors, scikit-image's remove_small_objects, the screen blend),
scribble_pidinet its node's second stroke pass. Ours: `preprocessors.run(method, ...)`.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_annotators_edges.py [--sizes 512 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import RSS_NOW, machine

ROOT = Path(__file__).resolve().parents[1]

# method -> (weights file, the Aux detector family, its call keywords)
METHODS = {
    "softedge_hed": ("ControlNetHED.pth", "hed", {"safe": True}),
    "scribble_hed": ("ControlNetHED.pth", "hed", {"safe": True, "scribble": True}),
    "softedge_pidinet": ("table5_pidinet.pth", "pidi", {"safe": True}),
    "scribble_pidinet": ("table5_pidinet.pth", "pidi", {"safe": True, "scribble": True}),
    "lineart_realistic": ("sk_model.pth", "lineart", {}),
    "lineart_anime": ("netG.pth", "lineart_anime", {}),
    "softedge_teed": ("MTEED.pth", "teed", {"safe_steps": 2}),
    "anyline": ("MTEED.pth", "anyline", {}),
}
OUR_PARAMS = {"softedge_hed": {"safe": True}, "scribble_hed": {"safe": True}, "softedge_pidinet": {"safe": True},
              "scribble_pidinet": {"safe": True}, "softedge_teed": {"safe_steps": 2}}

CHILD = RSS_NOW + r"""
import json, os, statistics, sys, time, warnings
warnings.simplefilter("ignore")
args = json.loads(sys.argv[1])
import numpy as np, torch, cv2
torch.set_num_threads(args["threads"]); cv2.setNumThreads(args["threads"])
sys.path.insert(0, args["bench_dir"])
from bench_annotators_edges import scene, aux_detector, our_call
img = scene(args["size"], args["size"])
call = our_call(args) if args["impl"] == "ours" else aux_detector(args)  # imports; the weights load lazily
base = rss_now()
t0 = time.perf_counter()
call(img)  # loads the weights, builds the network, warms up
first = time.perf_counter() - t0
ts = []
for _ in range(args["repeats"]):
    t = time.perf_counter(); call(img); ts.append(time.perf_counter() - t)
# VmHWM, this process's own high-water mark: ru_maxrss would include the parent's size at the fork
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({"s": statistics.median(ts), "first_s": first, "base": base, "peak": peak}))
"""


def scene(h: int, w: int, seed: int = 0):
    """A deterministic uint8 RGB picture with lines, shapes, a gradient and noise."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([150 + 60 * np.sin(xx / 23.0), 140 + 50 * np.cos(yy / 17.0), 120 + 0.3 * (xx - yy)], -1)
    img = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    for _ in range(12):
        p = tuple(int(v) for v in rng.integers(0, [w, h]))
        q = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.line(img, p, q, (20, 20, 30), int(rng.integers(1, 4)))
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 5, (230, 200, 40), -1)
    cv2.rectangle(img, (w // 2, h // 5), (w * 5 // 6, h * 3 // 5), (40, 90, 200), -1)
    return np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


def write_weights(folder: Path) -> None:
    """Random weights in the real files' layouts (our modules have the files' key names)."""
    import torch

    from comfyui_controlnet_core.preprocessors.nets import hed, lineart, lineart_anime, pidinet, teed

    torch.manual_seed(0)
    sd = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
    torch.save({k: v.half() for k, v in sd(hed.HEDNet()).items()}, folder / "ControlNetHED.pth")
    # PiDiNet's file holds the difference-conv kernels (3x3), which the converted net replaces by 5x5 for rd
    pidi = sd(pidinet.PiDiNet())
    for key, op in pidinet._difference_kernels().items():
        pidi[key] = torch.randn(pidi[key].shape[0], pidi[key].shape[1], 3, 3) * 0.1
    torch.save({"state_dict": {"module." + k: v for k, v in pidi.items()}}, folder / "table5_pidinet.pth")
    torch.save(sd(lineart.LineartGenerator()), folder / "sk_model.pth")
    torch.save(sd(lineart_anime.AnimeUNet()), folder / "netG.pth")
    torch.save(sd(teed.TEEDNet()), folder / "MTEED.pth")


def our_call(args: dict):
    import importlib

    from comfyui_controlnet_core import preprocessors as pp

    method, path = args["method"], Path(args["dir"]) / METHODS[args["method"]][0]
    net_module = {"hed": "hed", "pidi": "pidinet", "lineart": "lineart", "lineart_anime": "lineart_anime",
                  "teed": "teed", "anyline": "teed"}[METHODS[method][1]]
    importlib.import_module(f"comfyui_controlnet_core.preprocessors.nets.{net_module}")  # the weights load lazily
    params = OUR_PARAMS.get(method, {})
    return lambda img: pp.run(method, img, resolution=args["size"], weights_path=path, **params)


def aux_detector(args: dict):
    import importlib

    import numpy as np

    method, d, size = args["method"], args["dir"], args["size"]
    file, family, kw = METHODS[method]
    if args.get("aux_path"):  # comfyui_controlnet_aux's own detectors
        sys.path.insert(0, str(Path(args["aux_path"]) / "src"))
        mod = lambda s: importlib.import_module(f"custom_controlnet_aux.{s}")  # noqa: E731
        names = {"hed": "HEDdetector", "pidi": "PidiNetDetector", "lineart": "LineartDetector",
                 "lineart_anime": "LineartAnimeDetector", "teed": "TEDDetector"}
        extra = {}
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers_annotators import cna as mod

        names = {"hed": "HEDdetector", "pidi": "PidiNetDetector", "lineart": "LineartDetector",
                 "lineart_anime": "LineartAnimeDetector", "teed": "TEEDdetector"}
        extra = {"image_resolution": size}

    def load(fam: str, fname: str):
        cls = getattr(mod(fam), names[fam])
        if fam == "lineart":
            return cls.from_pretrained(d, filename=fname, coarse_filename=fname)
        if fam == "teed":
            # Aux's own looks in <dir>/<subfolder>/<file>, its default subfolder being "Annotators"
            sub = {"subfolder": ""} if args.get("aux_path") else {}
            return cls.from_pretrained(d, filename=fname, **sub)
        return cls.from_pretrained(d, filename=fname)

    built: dict = {}  # the detectors are built at the first call (the imports happen now)

    def detector(fam: str):
        if fam not in built:
            built[fam] = load(fam, file)
        return built[fam]

    if family != "anyline":
        mod(family)
        ekw = {} if family == "teed" else extra

        def call(img):
            out = detector(family)(img, detect_resolution=size, output_type="np", **ekw, **kw)
            if method == "scribble_pidinet":  # the Aux node's second stroke pass
                import cv2

                out = mod("util").nms(out, 127, 3.0)
                out = cv2.GaussianBlur(out, (0, 0), 3.0)
                out[out > 4] = 255
                out[out < 255] = 0
            return out
        return call

    from skimage import morphology

    mod("teed")
    std = mod("lineart_standard").LineartStandardDetector()

    def anyline(img):  # Aux's AnyLineArtPreprocessor_aux with its defaults
        m = detector("teed")(img, detect_resolution=size, safe_steps=2, output_type="np").astype(np.float32) / 255.0
        line = std(img, guassian_sigma=2, intensity_threshold=3, detect_resolution=size,
                   output_type="np").astype(np.float32) / 255.0
        mask = line[:, :, 0]
        mask = np.where((mask >= 0) & (mask <= 1), mask, 0)
        mask = np.expand_dims(mask, 2).repeat(3, axis=2)
        top = mask * morphology.remove_small_objects(mask.astype(bool), min_size=36, connectivity=1)
        b = top.astype(bool)
        return m * (~b) + (1 - (1 - top) * (1 - m)) * b
    return anyline


def run_child(args: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args["threads"]), MKL_NUM_THREADS=str(args["threads"]))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                       cwd=str(ROOT))
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--aux-path", default=None, help="a comfyui_controlnet_aux checkout (default: controlnet-aux 0.0.10)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as d:
        write_weights(Path(d))
        for method in args.methods:
            for size in args.sizes:
                row = {"method": method, "size": size}
                for impl in ("ours", "aux"):
                    res = run_child({"impl": impl, "method": method, "size": size, "repeats": args.repeats,
                                     "threads": args.threads, "dir": d, "aux_path": args.aux_path,
                                     "bench_dir": str(Path(__file__).resolve().parent)})
                    row[impl] = res
                rows.append(row)
                print(_line(row), file=sys.stderr, flush=True)  # progress
    ref = f"comfyui_controlnet_aux @ {args.aux_path}" if args.aux_path else "controlnet-aux 0.0.10"
    print(f"# network annotators, ours vs {ref}: CPU, {args.threads} threads, warm calls (median of "
          f"{args.repeats}), one fresh process per cell; peak = that process's peak resident size (VmHWM), model+run = peak minus the size after the imports")
    print(f"# machine: {machine()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    print("| method | size | ours s | Aux s | ours peak MiB | Aux peak MiB | ours model+run MiB | Aux model+run MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_line(row))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "reference": ref, "rows": rows}, indent=2))


def _line(row: dict) -> str:
    o, a = row["ours"], row["aux"]

    def cell(r, key):
        if "error" in r:
            return "error: " + r["error"][:60]
        if key == "s":
            return f"{r['s']:.3f}"
        if key == "peak":
            return f"{r['peak'] / 2**20:.0f}"
        return f"{(r['peak'] - r['base']) / 2**20:.0f}"

    return (f"| {row['method']} | {row['size']}² | {cell(o, 's')} | {cell(a, 's')} | {cell(o, 'peak')} | "
            f"{cell(a, 'peak')} | {cell(o, 'delta')} | {cell(a, 'delta')} |")


if __name__ == "__main__":
    main()
