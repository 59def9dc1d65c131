"""Flux ControlNet in ComfyUI on the CPU: ours against ComfyUI's built-in path, per control call and
in memory while loading.

Writes a full-width Flux Union ControlNet (24 heads of 128, T5 4096, CLIP 768, 10 modes; 1 double +
1 single block, 546 M parameters: the real per-block cost, fewer blocks than the 3.3 B Union-Pro) in
diffusers' layout as bf16 and as float8_e4m3fn, with diffusers' class (this venv). Each row runs in
a fresh process of ComfyUI's interpreter (`--comfyui`, `--python`) with `--cpu`: it loads the file
with ComfyUI's `comfy.controlnet.load_controlnet` (built-in) or our pack's `load_control` (ours; the
pack loaded by ComfyUI's own `load_custom_node`), records the peak resident size above the size
before the load (ru_maxrss; the weights touched once, as the first step would). A third process per
file loads both and times `get_control` (hint encoded once by a fixed stand-in VAE, union mode 2,
CFG batch 2, 32x32 latent = 256 image tokens, 8 text tokens) over `--repeats` calls, the two paths
alternated so that other load on a shared machine hits both alike.

    .venv/bin/python benchmarks/bench_flux.py --comfyui /path/to/ComfyUI --python /path/to/comfyui-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import RSS_NOW, machine

ROOT = Path(__file__).resolve().parents[1]

CHILD = RSS_NOW + r"""
import asyncio, json, os, sys, time, torch
comfy_path, pack, path, which, repeats = sys.argv[1:6]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes, folder_paths
assert asyncio.run(nodes.load_custom_node(pack))
import comfy.controlnet, comfy.latent_formats, comfy.model_sampling
from types import SimpleNamespace
adapter = sys.modules[pack.replace(".", "_x_") + ".nodes.adapter"]
folder_paths.add_model_folder_path("controlnet", os.path.dirname(path))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

class MS(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
    pass
ms = MS(None)
model = SimpleNamespace(model_sampling=ms, latent_format=comfy.latent_formats.Flux(), diffusion_model=None,
                        model_config=SimpleNamespace(unet_config={"image_model": "flux"}))

class FakeVAE:
    proj = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))
    def spacial_compression_encode(self):
        return 8
    def encode(self, pixels):
        return torch.einsum("oc,bchw->bohw", self.proj, torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1) * 2 - 1, 8))

def load(which):
    if which == "builtin":
        obj = comfy.controlnet.load_controlnet(path)
        obj.set_extra_arg("control_type", [2])
        return obj, obj.control_model
    obj = adapter.load_control(os.path.basename(path))
    obj.extra_args = {"control_type": [2]}
    return obj, obj.handle.net

if which != "both":  # the load alone, in a fresh process
    before = rss_now()
    t0 = time.perf_counter()
    obj, net = load(which)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        for p in net.parameters():
            p.float().sum()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = {}
    for t in [*net.parameters(), *net.buffers()]:
        held[str(t.dtype)] = held.get(str(t.dtype), 0) + t.numel() * t.element_size()
    print(json.dumps({"load_s": load_s, "peak": peak, "stored": sum(held.values()), "dtype": max(held, key=held.get),
                      "torch": torch.__version__}))
    raise SystemExit(0)

# both paths in one process, calls alternated, so that other load on the machine hits both alike
g = torch.Generator().manual_seed(0)
hint = torch.rand(1, 3, 256, 256, generator=g)
x = torch.randn(2, 16, 32, 32, generator=g)
cond = {"c_crossattn": torch.randn(2, 8, 4096, generator=g), "y": torch.randn(2, 768, generator=g),
        "guidance": torch.full((2,), 3.5)}
sigma = torch.full((2,), 0.5)
controls = {}
for w in ("builtin", "ours"):
    obj, _ = load(w)
    c = obj.copy().set_cond_hint(hint, 0.8, (0.0, 1.0), vae=FakeVAE())
    c.pre_run(model, ms.percent_to_sigma)
    controls[w] = c
times = {w: [] for w in controls}
with torch.no_grad():
    for w, c in controls.items():
        c.get_control(x, sigma, cond, 2, {"cond_or_uncond": [0, 1]})  # warm-up (and the hint's one encode)
    for _ in range(int(repeats)):
        for w, c in controls.items():
            t1 = time.perf_counter()
            c.get_control(x, sigma, cond, 2, {"cond_or_uncond": [0, 1]})
            times[w].append(time.perf_counter() - t1)
print(json.dumps({w: sorted(v)[len(v) // 2] for w, v in times.items()}))
"""

MAKE = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from diffusers import FluxControlNetModel
from helpers_flux import randomize_
from safetensors.torch import save_file
cn = randomize_(FluxControlNetModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                    guidance_embeds=True, axes_dims_rope=[16, 56, 56], num_mode=10), 2)
sd = cn.state_dict()
folder = sys.argv[1]
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, folder + "/flux-union-1-1-bf16.safetensors")
save_file({k: v.to(torch.float8_e4m3fn).contiguous() for k, v in sd.items()}, folder + "/flux-union-1-1-fp8.safetensors")
print(sum(v.numel() for v in sd.values()))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    ap.add_argument("--python", required=True, help="ComfyUI's interpreter")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        params = int(subprocess.run([sys.executable, "-c", MAKE, tmp, str(ROOT / "tests")], check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
        rows = []
        calls = {}
        for tag in ("bf16", "fp8"):
            path = Path(tmp) / f"flux-union-1-1-{tag}.safetensors"
            for which in ("builtin", "ours", "both"):
                out = subprocess.run([args.python, "-c", CHILD, args.comfyui, str(ROOT), str(path), which,
                                      str(args.repeats)], capture_output=True, text=True, cwd=tmp)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(out.returncode)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if which == "both":
                    calls[tag] = r
                else:
                    rows.append((tag, path.stat().st_size, which, r))
    print(f"machine: {machine()}; torch {rows[0][3]['torch']}; Flux Union ControlNet, full width, 1 + 1 blocks, "
          f"{params / 1e6:.0f} M parameters; get_control at a 32x32 latent, CFG batch 2, median of {args.repeats} "
          "(the two paths alternated in one process)")
    print()
    print("| file | path | weights held as | weights in memory | load peak above start | load s | control call s |")
    print("|---|---|---|---|---|---|---|")
    for tag, size, which, r in rows:
        print(f"| {tag} ({size / 2**20:.0f} MiB) | {which} | {r['dtype'].removeprefix('torch.')} | "
              f"{r['stored'] / 2**20:.0f} MiB | {r['peak'] / 2**20:.0f} MiB | {r['load_s']:.1f} | {calls[tag][which]:.2f} |")

if __name__ == "__main__":
    main()
