"""Speed and memory of the network annotators: ours against the reference implementation, on the same
image and the same weights, warm calls (the network built and one call made before timing: Aux
re-reads nothing between calls either), seconds per image at 512x512 and 1024x1024, and the peak
resident memory of a fresh process that loads the file and makes those calls.

References: controlnet-aux 0.0.10's modules with comfyui_controlnet_aux's recipe around them
(`tests/test_annotator_*.py` `aux_recipe`) for M-LSD and NormalBAE; for Depth Anything (not in
controlnet-aux) transformers' DepthAnythingForDepthEstimation with the same weights and Aux's recipe.
Weights are random, of the real architectures (Depth Anything: ViT-S, `--da-depth` blocks).
Needs the `annotators` test extra.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_annotators.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import RSS_NOW, machine  # noqa: E402

METHODS = ("depth_anything_v2", "normal_bae", "mlsd")
SIZES = (512, 1024)
FILES = {"depth_anything_v2": "depth_anything_v2_vits.pth", "normal_bae": "scannet.pt",
         "mlsd": "mlsd_large_512_fp32.pth"}


def write_weights(folder: Path, da_depth: int) -> None:
    import torch

    import test_annotator_depth_anything as tda
    import test_annotator_mlsd as tml
    import test_annotator_normal_bae as tnb

    torch.save(tda.random_release_state_dict(depth=da_depth), folder / FILES["depth_anything_v2"])
    torch.save({"model": tnb.random_state_dict()}, folder / FILES["normal_bae"])
    torch.save(tml.random_state_dict(), folder / FILES["mlsd"])


CHILD = RSS_NOW + r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[5] + "/tests")
import numpy as np, torch
impl, method, folder, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
from test_annotator_depth_anything import test_image
base = rss_now()
if impl == "ours":
    from comfyui_controlnet_core import preprocessors as pp
    from comfyui_controlnet_core.preprocessors.nets import files
    files.set_roots_provider(lambda: [folder])
    kw = {"depth_model": "v2_vits"} if method == "depth_anything_v2" else {}
    def call(rgb):
        return pp.run(method, rgb, resolution=min(rgb.shape[:2]), **kw)
else:
    if method == "depth_anything_v2":
        import test_annotator_depth_anything as t
        from transformers.models.dinov2 import modeling_dinov2
        modeling_dinov2.Dinov2Embeddings.interpolate_pos_encoding = t.authors_pos_embed
        sd = torch.load(folder + "/depth_anything_v2_vits.pth")
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("pretrained.blocks."))
        net = t.hf_model(sd, depth=depth, version=2 if depth == 12 else 1)
        call = lambda rgb: t.aux_recipe(rgb, net)
    elif method == "normal_bae":
        import test_annotator_normal_bae as t
        net = t.reference_net(torch.load(folder + "/scannet.pt")["model"])
        call = lambda rgb: t.aux_recipe(rgb, net)
    else:
        import test_annotator_mlsd as t
        net = t.reference_net(torch.load(folder + "/mlsd_large_512_fp32.pth"))
        call = lambda rgb: t.aux_recipe(rgb, net, 0.1, 0.1)
out = {}
for size in (512, 1024):
    rgb = test_image(size, size, seed=size)
    with torch.inference_mode():
        call(rgb)  # warm: the network built, first-call costs paid
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter(); call(rgb); times.append(time.perf_counter() - t0)
    out[size] = sorted(times)[len(times) // 2]
out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["base_mib"] = base / 2**20
print(json.dumps(out))
"""


def child(impl: str, method: str, folder: Path, repeats: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, impl, method, str(folder), str(repeats), str(ROOT)],
                       capture_output=True, text=True, timeout=3600, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{impl} {method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--da-depth", type=int, default=12, help="Depth Anything ViT-S blocks (12 = the real ViT-S)")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_weights(folder, args.da_depth)
        for method in METHODS:
            for impl in ("ours", "reference"):
                r = child(impl, method, folder, args.repeats)
                rows.append({"method": method, "impl": impl, **{f"s_{k}": v for k, v in r.items() if k.isdigit()},
                             "peak_mib": r["peak_mib"]})
                print(f"{method:18s} {impl:9s} 512: {r['512']:.3f} s  1024: {r['1024']:.3f} s  "
                      f"peak {r['peak_mib']:.0f} MiB", file=sys.stderr)
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    print(f"Machine: {machine()}; torch threads: {threads}; warm calls, median of {args.repeats}\n")
    print("| method | implementation | s / 512² | s / 1024² | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    names = {"ours": "CNCore", "reference": "reference (see below)"}
    for r in rows:
        print(f"| {r['method']} | {names[r['impl']]} | {r['s_512']:.3f} | {r['s_1024']:.3f} | {r['peak_mib']:.0f} |")
    print("\nreference: depth_anything_v2 = transformers DepthAnythingForDepthEstimation + Aux's recipe "
          "(controlnet-aux has no Depth Anything); normal_bae, mlsd = controlnet-aux 0.0.10 modules + Aux's recipe.")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "threads": threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
