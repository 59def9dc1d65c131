"""Peak memory of the hint path for big hints: one 4096x4096 hint, and 64 hints at 512x512.

Each case runs in a fresh subprocess: a ComfyUI-style IMAGE (float32, channels last) goes into a
`Control` of a ControlNet whose hint encoder is SD1.5's (16, 32, 96, 256 channels at 8x the latent:
the part whose memory grows with the hint) and whose UNet part is tiny (its memory is the host's
batch planning, not the hint's), then one sampling step at a 64x64 latent (512 px) with cond and
uncond. Reported: the peak resident set (`ru_maxrss`) above the resident size just before the IMAGE
is made, and the IMAGE's own size, in MiB.

    .venv/bin/python benchmarks/bench_hint_memory.py [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from measure import RSS_NOW, machine

ROOT = Path(__file__).resolve().parents[1]

CHILD = RSS_NOW + r"""
import dataclasses, json, sys
import torch
from comfyui_controlnet_core.controlnet_core import SD15, Control, ControlNet, StepRequest

batch, side, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
cfg = dataclasses.replace(SD15, model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 1), context_dim=64)
net = ControlNet(cfg).eval()
torch.nn.init.normal_(net.input_hint_block[-1].weight, std=0.01)
x = torch.randn(2 * batch, 4, 64, 64)
before = rss_now()
image = torch.rand(batch, side, side, 3)            # what ComfyUI hands the Apply node
c = Control(net, image)
c.pre_run(lambda p: 1e9 if p <= 0 else 0.0)
req = StepRequest(x, torch.full((2 * batch,), 5.0), torch.full((2 * batch,), 500.0), torch.randn(2 * batch, 77, 64),
                  None, (0, 1))
with torch.no_grad():
    out = c.residuals(req)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_mib": (peak - before) / 2**20, "image_mib": image.numel() * 4 / 2**20,
                  "torch": torch.__version__}))
"""

CASES = [("one 4096x4096 hint", 1, 4096), ("64 hints at 512x512", 64, 512), ("8 hints at 512x512", 8, 512)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"# hint memory, {machine()}, {args.threads} torch threads; peak RSS above the start, MiB")
    print("| case | IMAGE | peak above start |")
    print("|---|---|---|")
    for name, batch, side in CASES:
        r = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(side), str(args.threads)],
                           capture_output=True, text=True, cwd=ROOT.parent, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {name} | {res['image_mib']:.0f} | {res['peak_mib']:.0f} |", flush=True)
    print(f"torch {res['torch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
