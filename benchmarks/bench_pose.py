"""DWPose speed and memory: our torch interpreter of the ONNX graphs vs onnxruntime and cv2.dnn, the
two CPU backends of Aux's DWPose (Aux takes cv2.dnn unless onnxruntime has a GPU provider).

Files: full-size random-weight exports of the two networks (tests/helpers_pose.py: YOLOX-L and
RTMPose-L at width/depth 1.0, the real files' topology, opset 11), or the real files with
`--files DIR` (dw-ll_ucoco_384.onnx + yolox_l.onnx). Each backend runs in its own child process
(peak resident size is per process), with the same thread count, on the same image:

* detector: one YOLOX forward at 640 x 640;
* pose xN: one RTMPose forward on N person crops (1 and 5);
* dwpose: the whole method on one 768 x 512 frame (boxes, crops, keypoints, drawing) — both
  backends go through the same pre/post code, so this column differs only by the networks;
* peak_mib: the child's peak resident size (VmHWM) above its size after importing torch.

Times: median of --repeats runs after one warm-up. With random weights the detector finds some
number of "people"; it is printed, and is the same for both backends (the same graph).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_pose.py [--threads 2] [--repeats 3] [--files DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import measure

ROOT = Path(__file__).resolve().parents[1]

CHILD = measure.RSS_NOW + r"""
import json, statistics, sys, time
import numpy as np, torch
backend, folder, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
from comfyui_controlnet_core.preprocessors.nets import dwpose as D
from comfyui_controlnet_core.preprocessors.nets.onnx_graph import load_onnx
base = rss_now()
t0 = time.perf_counter()
if backend == "ours":
    det, pose = load_onnx(folder + "/yolox_l.onnx"), load_onnx(folder + "/dw-ll_ucoco_384.onnx")
    def run(graph, x):
        with torch.inference_mode():
            return [o.numpy() for o in graph(torch.from_numpy(x))]
elif backend == "cv2.dnn":  # Aux's CPU path when onnxruntime has no GPU provider: one crop at a time
    import cv2
    cv2.setNumThreads(threads)
    class Graph:
        def __init__(self, path, outputs):
            self.net, self.outputs = cv2.dnn.readNetFromONNX(path), outputs
            self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            self.source, self.float_dtype = path, torch.float32
        def __call__(self, x):
            outs = []
            for i in range(x.shape[0]):
                self.net.setInput(np.ascontiguousarray(x[i : i + 1].numpy()))
                outs.append(self.net.forward(self.outputs))
            return tuple(torch.from_numpy(np.concatenate([o[k] for o in outs])) for k in range(len(self.outputs)))
        def parameters(self):
            return iter(())
    det = Graph(folder + "/yolox_l.onnx", ["output"])
    pose = Graph(folder + "/dw-ll_ucoco_384.onnx", ["simcc_x", "simcc_y"])
    def run(graph, x):
        return [o.numpy() for o in graph(torch.from_numpy(x))]
else:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    class Graph:  # an onnxruntime session with OnnxGraph's call, so DWPose can hold it
        def __init__(self, path):
            self.sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            self.source, self.float_dtype = path, torch.float32
        def __call__(self, x):
            return tuple(torch.from_numpy(o) for o in self.sess.run(None, {self.sess.get_inputs()[0].name: x.numpy()}))
        def parameters(self):
            return iter(())
    det, pose = Graph(folder + "/yolox_l.onnx"), Graph(folder + "/dw-ll_ucoco_384.onnx")
    def run(graph, x):
        return [o.numpy() for o in graph(torch.from_numpy(x))]
load_s = time.perf_counter() - t0
model = D.DWPose(pose, det)
rng = np.random.default_rng(0)
frame = rng.uniform(0, 1, (512, 768, 3)).astype(np.float32)

def timed(fn):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

out = {"load_s": load_s}
x640 = rng.uniform(0, 255, (1, 3, 640, 640)).astype(np.float32)
out["detector_s"] = timed(lambda: run(det, x640))
for n in (1, 5):
    crops = rng.standard_normal((n, 3, 384, 288)).astype(np.float32)
    out[f"pose_x{n}_s"] = timed(lambda: run(pose, crops))
data = []
out["dwpose_s"] = timed(lambda: data.append(D.dwpose_frame(frame, model=model, resolution=512)[1]))
out["people"] = len(data[-1]["people"])
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across exec (the parent built the files)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
out["peak_mib"] = (hwm - base) / 2**20
print(json.dumps(out))
"""


def export(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    import helpers_pose as H

    H.export_onnx(H.random_yolox(width=1.0, depth=1.0), torch.rand(1, 3, 640, 640) * 255, folder / "yolox_l.onnx",
                  "images", ["output"])
    H.export_onnx(H.randomize(H.RTMPose(1.0, 1.0), seed=2), torch.randn(1, 3, 384, 288),
                  folder / "dw-ll_ucoco_384.onnx", "input", ["simcc_x", "simcc_y"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--files", help="folder with the real dw-ll_ucoco_384.onnx and yolox_l.onnx")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.files) if args.files else Path(tmp)
        if not args.files:
            export(folder)
        sizes = {f: (folder / f).stat().st_size / 2**20 for f in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")}
        rows = {}
        env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"}
        for backend in ("ours", "onnxruntime", "cv2.dnn"):
            r = subprocess.run([sys.executable, "-c", CHILD, backend, str(folder), str(args.threads), str(args.repeats)],
                               capture_output=True, text=True, env=env, cwd=ROOT.parent)
            if r.returncode:
                print(f"{backend} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            rows[backend] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"machine: {measure.machine()}; {args.threads} threads; torch CPU; "
          f"files: {'real' if args.files else 'random weights, full size'} "
          f"(yolox_l.onnx {sizes['yolox_l.onnx']:.0f} MiB, dw-ll_ucoco_384.onnx {sizes['dw-ll_ucoco_384.onnx']:.0f} MiB)")
    cols = ("load_s", "detector_s", "pose_x1_s", "pose_x5_s", "dwpose_s", "people", "peak_mib")
    print("| backend | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c.endswith("_s") else f"{row[c]:.0f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
