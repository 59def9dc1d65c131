"""Peak memory while loading a full-size SD1.5 ControlNet, against the size of the file; with
`--comfyui`, the resident memory of a loaded ControlNet, Union and Control-LoRA inside a real
ComfyUI, ours against ComfyUI's own loader.

Default mode: writes a random full-size SD1.5 ControlNet (361M parameters) as fp32 and fp16,
`.safetensors` and `.pth`, to a temp dir; loads each in a fresh subprocess and reports the peak
resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) above the process's resident size just
before the load (torch's own import footprint is not the loader's doing). Target: peak <= ~2x the
file size.

`--comfyui PATH` (with `--python`, ComfyUI's interpreter): writes fp16 files of the real shapes with
random weights (an SD1.5 ControlNet in the v1.1 layout, an SDXL ControlNet Union ProMax in xinsir's
diffusers layout, an SD1.5 Control-LoRA of rank 128 in Stability's layout); then, for each file,
ComfyUI's flags (default `--cpu`, and `--cpu --fp16-unet`) and each loader (ComfyUI's
`ControlNetLoader`, ours `CNCore_LoadControlNet`), a fresh ComfyUI process (its nodes and our pack
loaded first, so both start from the same footprint) loads the file, reads every weight once
(memory-mapped pages count only once touched, as at the first step) and reports its resident
size above the start, the bytes of the tensors the loaded object holds, and their dtypes.
Target: ours <= the built-in loader in every row. Writes a table (`--out`, default
benchmarks/results/load_memory_comfyui_cpu.md).

    .venv/bin/python benchmarks/bench_load_memory.py [--keep DIR]
    .venv/bin/python benchmarks/bench_load_memory.py --comfyui $COMFYUI_PATH --python $COMFYUI_PYTHON
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


# Runs in ComfyUI's interpreter: argv = ComfyUI path, pack root, model folder, file, "builtin"|"ours", flags.
COMFY_CHILD = RSS_NOW + r"""
import asyncio, gc, json, logging, sys
comfy_path, root, folder, name, who, flags = sys.argv[1:7]
sys.path.insert(0, comfy_path)
logging.disable(logging.WARNING)
import comfy.cli_args
args = comfy.cli_args.args
args.cpu = True
args.fp16_unet = "--fp16-unet" in flags.split()
import torch
import folder_paths
import nodes
folder_paths.add_model_folder_path("controlnet", folder, is_default=True)
if not asyncio.run(nodes.load_custom_node(root)):
    raise SystemExit("ComfyUI could not load the pack")
gc.collect()
before = rss_now()
if who == "builtin":
    obj = nodes.ControlNetLoader().load_controlnet(name)[0]
    model = getattr(obj, "control_model", None)
    tensors = list(obj.control_weights.values()) if model is None else [*model.parameters(), *model.buffers()]
    compute = getattr(obj, "manual_cast_dtype", None)
else:
    obj = nodes.NODE_CLASS_MAPPINGS["CNCore_LoadControlNet"]().load(name)[0]
    net = obj.handle.net
    tensors = [*net.parameters(), *net.buffers()]
    compute = net.dtype
with torch.no_grad():
    for t in tensors:  # every page read once, as the first step would
        t.float().sum() if t.numel() else None
seen, held, dtypes = set(), 0, set()
for t in tensors:
    if t.numel() and t.data_ptr() not in seen:
        seen.add(t.data_ptr())
        held += t.numel() * t.element_size()
        dtypes.add(str(t.dtype).removeprefix("torch."))
gc.collect()
print(json.dumps({"rss": rss_now() - before, "held": held, "dtypes": sorted(dtypes),
                  "compute": None if compute is None else str(compute).removeprefix("torch."),
                  "torch": torch.__version__}))
"""

COMFY_FILES = {
    "controlnet": "control_v11p_sd15_canny_fp16.safetensors",
    "union": "diffusion_pytorch_model_promax.safetensors",
    "control-lora": "control_lora_rank128_v11p_sd15_canny_fp16.safetensors",
}


def write_comfyui_files(folder: Path) -> None:
    """The three fp16 files of `COMFY_FILES` (random weights of the real shapes)."""
    import math

    import safetensors.torch
    import torch

    from comfyui_controlnet_core.controlnet_core.config import SD15
    from comfyui_controlnet_core.controlnet_core.loader import save_controlnet
    from comfyui_controlnet_core.controlnet_core.model import ControlNet

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def rand(shape):
        return (torch.randn(shape, generator=g) / math.sqrt(max(1, math.prod(shape[1:])))).half()

    net = ControlNet(SD15)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(rand(p.shape))
    save_controlnet(net, folder / COMFY_FILES["controlnet"], format="original", dtype=torch.float16)
    sys.path.insert(0, str(ROOT / "tests"))
    import helpers_control_lora as H

    host = {k: v for k, v in net.state_dict().items()}
    H.save(H.make_file_sd(SD15, host, rank=128, seed=1), folder / COMFY_FILES["control-lora"], dtype=torch.float16)
    del net, host
    import diffusers

    with torch.device("meta"):  # xinsir's ProMax: diffusers' class, 8 types; only the key names and shapes
        dm = diffusers.ControlNetUnionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            conditioning_embedding_out_channels=(16, 32, 96, 256), num_control_type=8)
    sd = {k: rand(tuple(v.shape)) for k, v in dm.state_dict().items()}
    safetensors.torch.save_file(sd, str(folder / COMFY_FILES["union"]), metadata={"format": "pt"})


def main_comfyui(comfy_path: str, python: str, out: Path, keep: Path | None) -> None:
    tmp = None if keep else tempfile.TemporaryDirectory()
    folder = keep or Path(tmp.name)
    if not all((folder / f).exists() for f in COMFY_FILES.values()):
        print("writing files ...", flush=True)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
                        f"import bench_load_memory as b, pathlib; b.write_comfyui_files(pathlib.Path({str(folder)!r}))"],
                       check=True, cwd=ROOT)
    rows = []
    torch_version = "?"
    for kind, name in COMFY_FILES.items():
        size = (folder / name).stat().st_size
        for flags in ("", "--fp16-unet"):
            got = {}
            for who in ("builtin", "ours"):
                res = subprocess.run([python, "-c", COMFY_CHILD, comfy_path, str(ROOT), str(folder), name, who, flags],
                                     capture_output=True, text=True, cwd=comfy_path)
                if res.returncode != 0:
                    raise SystemExit(f"{kind} {who} {flags}: failed\n{res.stderr[-3000:]}")
                got[who] = json.loads(res.stdout.strip().splitlines()[-1])
                torch_version = got[who]["torch"]
            b, o = got["builtin"], got["ours"]
            rows.append(f"| {kind} | {size / 2**20:.0f} | `--cpu {flags}`".rstrip() + " | "
                        f"{b['rss'] / 2**20:.0f} | {o['rss'] / 2**20:.0f} | {o['rss'] / max(b['rss'], 1):.2f} | "
                        f"{b['held'] / 2**20:.0f} | {o['held'] / 2**20:.0f} | "
                        f"{'/'.join(b['dtypes'])} → {b['compute'] or 'same'} | {'/'.join(o['dtypes'])} → {o['compute']} |")
            print(rows[-1], flush=True)
    text = "\n".join([
        "# Resident memory of a loaded control model in ComfyUI: ours vs the built-in loader (CPU)", "",
        f"Command: `.venv/bin/python benchmarks/bench_load_memory.py --comfyui $COMFYUI_PATH --python $COMFYUI_PYTHON`", "",
        f"Machine: {machine()}; ComfyUI's torch {torch_version}", "",
        "fp16 files, random weights of the real shapes. Resident = the process's resident size after the load and "
        "after every weight was read once, above the size before the load (ComfyUI's nodes and our pack already "
        "imported in both); held = bytes of the tensors the loaded object keeps; dtypes: stored → computed in.", "",
        "| model | file MiB | ComfyUI flags | built-in resident MiB | ours resident MiB | ours / built-in | "
        "built-in held MiB | ours held MiB | built-in dtypes | ours dtypes |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows, "",
    ])
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if tmp is not None:
        tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="write the files here and keep them")
    ap.add_argument("--comfyui", help="a ComfyUI checkout: measure ours against its loader (see the docstring)")
    ap.add_argument("--python", default=sys.executable, help="ComfyUI's interpreter (with --comfyui)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_memory_comfyui_cpu.md")
    args = ap.parse_args()
    if args.comfyui:
        main_comfyui(args.comfyui, args.python, args.out, args.keep)
        return
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
