"""ControlNet cost per sampling step inside real ComfyUI (issue 15). Not a test.

    python benchmarks/bench_comfyui.py --comfyui /path/to/ComfyUI          # a CUDA GPU: the full table
    python benchmarks/bench_comfyui.py --comfyui /path/to/ComfyUI --cpu    # harness check, 64 px, SD1.5

Run it with ComfyUI's own Python (it imports ComfyUI); COMFYUI_PATH works instead of --comfyui.

Why in-process. The script imports the ComfyUI checkout and calls its node classes exactly as the
executor does (CheckpointLoaderSimple, CLIPTextEncode, ControlNetLoader, ControlNetApplyAdvanced,
our nodes loaded by ComfyUI's own `nodes.load_custom_node`, `comfy.sample.sample` = KSampler,
VAEDecode), so the sampler, model management, `--lowvram` budgets, fp8 storage and the cudaMallocAsync
allocator that ComfyUI's main.py sets up (its `cuda_malloc` module is imported first) are ComfyUI's.
Over HTTP every number would carry queueing, JSON and preview overhead, peak memory could not be
reset around the sampler alone, and our fast-path switches could not be flipped per row.

How it measures, per row (one sampling run, same seed for every row of a case):
  s/it      the sampler's own step callback (ComfyUI's `callback(i, ...)`, once per step) after a
            `torch.cuda.synchronize()`; s/it = median of the step intervals after `--warmup` steps
            (default 25 steps, 5 warm-up: the median of 20 intervals). ComfyUI's loop synchronises
            every step anyway (its sigma comparisons), so the extra sync changes nothing.
  s/image   a SAMPLER_SAMPLE wrapper (ComfyUI's wrapper API) brackets the whole sampling loop,
            after the models are loaded: warm-up, graph capture and all steps, / batch size.
  VRAM      after every model is unloaded and the cache emptied: torch's peak reserved and allocated
            bytes of the sampling call (`max_memory_reserved/allocated`), and the device's peak used
            memory seen by NVML, polled every 0.5 ms from a separate process (with cudaMallocAsync,
            CUDA graphs' memory lives outside torch's pool, so only the device count sees it).
  px diff   the decoded image (ComfyUI's VAEDecode, SaveImage's uint8 conversion) against the
            built-in path's (one control: ControlNetLoader + ControlNetApplyAdvanced; two: the
            built-in chain), max over pixels and channels, in 1/255.
Rows: no control; built-in; ours (defaults); ours with each fast feature off (the whole fast path,
graphs, the fresh copy), with the opt-in overlap on and with the graph warm-up on ComfyUI's stream
(`warm_on_side=False`, a memory option); two controls (built-in chain vs our stack).
Models: random weights of the real SD1.5 / SDXL architectures (checkpoint = UNet + VAE + text
encoders, ControlNets in the unprefixed LDM layout of the v1.1 files), built with ComfyUI's own
classes and saved with its own `process_*_for_saving` key conversions, so both loaders read them as
they read downloaded files. Nothing is downloaded.

Output: the table on stdout and benchmarks/results/bench_comfyui_<tag>.{md,json}, written after every
process (a run stopped by `--budget-s` or a timeout keeps what it measured).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from measure import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GIB = 1024**3

# ------------------------------------------------------------------------------------------------
# what runs

CASES = {
    "sd15-b1": {"arch": "sd15", "size": 512, "batch": 1},
    "sd15-b4": {"arch": "sd15", "size": 512, "batch": 4},
    "sdxl-b1": {"arch": "sdxl", "size": 1024, "batch": 1},
    "sd15-b1-64px": {"arch": "sd15", "size": 64, "batch": 1},  # the --cpu harness check
}
# name -> (which apply path, number of controls, fast-path options for the row)
VARIANTS: dict[str, tuple[str, int, dict]] = {
    "none": ("none", 0, {}),
    "built-in": ("builtin", 1, {}),
    "ours": ("ours", 1, {}),
    "ours, fast path off": ("ours", 1, {"enabled": False}),
    "ours, graphs off": ("ours", 1, {"graphs": False}),
    "ours, fresh copy off": ("ours", 1, {"fresh_outputs": False}),
    "ours, overlap on": ("ours", 1, {"overlap": True}),
    "ours, warm-up on host stream": ("ours", 1, {"warm_on_side": False}),
    "built-in x2": ("builtin", 2, {}),
    "ours x2": ("ours", 2, {}),
    "ours x2, fast path off": ("ours", 2, {"enabled": False}),
}
ALL = list(VARIANTS)
SHORT = ["none", "built-in", "ours", "ours, fast path off"]
MIN = ["none", "built-in", "ours"]
# (process, mode, case, variants). process "comfyui": the allocator ComfyUI's main.py picks
# (cudaMallocAsync on NVIDIA); "native": PyTorch's caching allocator (`--disable-cuda-malloc`).
# mode "lowvram": ComfyUI's LOW_VRAM state with a reserve that leaves `--lowvram-gib` for weights
# (what --lowvram does on a GPU of that size); "fp8": `--fp8_e4m3fn-unet` (UNet and ControlNet
# weights stored in fp8, computed in fp16).
PLANS: dict[str, list[tuple[str, str, str, list[str]]]] = {
    # in order of what matters most, so a run cut by --budget-s loses the least
    "gpu": [
        ("comfyui", "default", "sd15-b1", ALL),
        ("comfyui", "default", "sdxl-b1", ALL),
        ("comfyui", "lowvram", "sd15-b1", MIN),
        ("comfyui", "fp8", "sd15-b1", MIN),
        ("comfyui", "default", "sd15-b4", SHORT),
        ("comfyui", "fp8", "sdxl-b1", MIN),
        ("native", "default", "sd15-b1", [*MIN, "ours, graphs off", "ours, warm-up on host stream"]),
        ("native", "default", "sdxl-b1", [*MIN, "ours, graphs off", "ours, warm-up on host stream"]),
    ],
    "cpu": [
        ("comfyui", "default", "sd15-b1-64px", ALL),
        ("comfyui", "lowvram", "sd15-b1-64px", MIN),
        ("comfyui", "fp8", "sd15-b1-64px", MIN),
    ],
}
PROMPT, NEGATIVE, SEED, CFG = "a house by a lake, photo", "blurry, low quality", 7, 7.0

CKPT = {"sd15": "cncore_bench_sd15.safetensors", "sdxl": "cncore_bench_sdxl.safetensors"}
CNS = {a: [f"cncore_bench_{a}_controlnet_{i}.safetensors" for i in (0, 1)] for a in ("sd15", "sdxl")}

# ------------------------------------------------------------------------------------------------
# model files (child process "make"): ComfyUI's classes, random weights, ComfyUI's key conversions

UNET = {
    "sd15": dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False,
                 context_dim=768, num_heads=8, use_spatial_transformer=True, legacy=False, adm_in_channels=None),
    "sdxl": dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 channel_mult=[1, 2, 4], transformer_depth_middle=10, use_linear_in_transformer=True,
                 context_dim=2048, num_head_channels=64, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=2816, num_classes="sequential"),
}
VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
           num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def _randomize(module: Any, seed: int) -> Any:
    """Every weight random and well scaled (N(0, 1/fan_in); norm scales ~1; small biases), zero
    convs too, so the ControlNet visibly moves the image; generated where the module lives."""
    import math

    import torch

    dev = next(module.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g, device=dev) / math.sqrt(math.prod(p.shape[1:]))
            elif name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g, device=dev)
            else:
                v = 0.02 * torch.randn(p.shape, generator=g, device=dev)
            p.copy_(v)
    return module


def _half_cpu(sd: dict) -> dict:
    import torch

    return {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in sd.items()
            if isinstance(v, torch.Tensor)}


def make_models(comfy_path: str, out: Path, archs: list[str], device: str) -> None:
    """Write the checkpoints and two ControlNets per arch under out/models (skips existing files)."""
    sys.path.insert(0, comfy_path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.cldm.cldm import ControlNet
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init  # no init of its own: _randomize sets every weight
    ckpt_dir, cn_dir = out / "models" / "checkpoints", out / "models" / "controlnet"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    cn_dir.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        cfg = UNET[arch]
        ckpt = ckpt_dir / CKPT[arch]
        t0 = time.time()
        if not ckpt.exists():
            config = (comfy.supported_models.SD15 if arch == "sd15" else comfy.supported_models.SDXL)(
                {k: v for k, v in cfg.items() if k in ("context_dim", "adm_in_channels")})
            with torch.device(device):
                unet = _randomize(UNetModel(dtype=torch.float32, device=device, operations=ops, **cfg), 1)
            sd = _half_cpu(config.process_unet_state_dict_for_saving(unet.state_dict()))
            del unet
            with torch.device(device):
                vae = _randomize(AutoencoderKL(ddconfig=VAE, embed_dim=4), 2)
            with torch.no_grad():
                vae.decoder.conv_out.weight.mul_(0.2)  # decoded pixels mostly inside [0, 1]
            sd.update(_half_cpu(config.process_vae_state_dict_for_saving(vae.state_dict())))
            del vae
            clip_cls = comfy.sd1_clip.SD1ClipModel if arch == "sd15" else comfy.sdxl_clip.SDXLClipModel
            clip = _randomize(clip_cls(device=device, dtype=torch.float32), 3)
            sd.update(_half_cpu(config.process_clip_state_dict_for_saving(clip.state_dict())))
            del clip
            save_file(sd, str(ckpt))
            del sd
        for i, name in enumerate(CNS[arch]):
            path = cn_dir / name
            if path.exists():
                continue
            kw = {k: v for k, v in cfg.items() if k not in ("out_channels", "transformer_depth_output")}
            cn = _randomize(ControlNet(hint_channels=3, dtype=torch.float32, device=device, operations=ops, **kw), 4 + i)
            save_file(_half_cpu(cn.state_dict()), str(path))
            del cn
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"[make] {arch}: {time.time() - t0:.1f} s", flush=True)


def check_sdxl_layout(comfy_path: str) -> None:
    """What `make` writes for SDXL, built on the meta device (no memory, no file): ComfyUI must
    detect the SDXL UNet, find every text-encoder weight of SDXLClipModel and detect the ControlNet;
    our loader must detect an SDXL ControlNet. Lets a CPU machine check the SDXL writer."""
    sys.path.insert(0, comfy_path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch

    import comfy.model_detection
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.cldm.cldm import ControlNet
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg, ops = UNET["sdxl"], comfy.ops.disable_weight_init
    config = comfy.supported_models.SDXL({"context_dim": 2048, "adm_in_channels": 2816})
    with torch.device("meta"):
        sd = config.process_unet_state_dict_for_saving(
            UNetModel(dtype=torch.float16, device="meta", operations=ops, **cfg).state_dict())
        sd.update(config.process_vae_state_dict_for_saving(AutoencoderKL(ddconfig=VAE, embed_dim=4).state_dict()))
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
        sd.update(config.process_clip_state_dict_for_saving(clip.state_dict()))
        kw = {k: v for k, v in cfg.items() if k not in ("out_channels", "transformer_depth_output")}
        cn_sd = ControlNet(hint_channels=3, dtype=torch.float16, device="meta", operations=ops, **kw).state_dict()
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(detected).__name__ == "SDXL", type(detected)
    loaded = detected.process_clip_state_dict(dict(sd))
    # ComfyUI's own saving drops these (clip_l's unused projection, logit scales, position ids)
    want = {k for k in clip.state_dict() if not k.endswith(("position_ids", "logit_scale"))
            and k != "clip_l.transformer.text_projection.weight"}
    assert "clip_g.transformer.text_projection.weight" in want
    missing = sorted(want - set(loaded))
    assert not missing, missing[:5]
    cn_cfg = comfy.model_detection.model_config_from_unet(cn_sd, "", True)
    assert cn_cfg.unet_config["context_dim"] == 2048 and cn_cfg.unet_config["adm_in_channels"] == 2816
    sys.path.insert(0, str(_link_dir()))
    from comfyui_controlnet_core.controlnet_core.formats.detect import detect

    d = detect(list(cn_sd), "the SDXL ControlNet")
    print(f"[check] SDXL layout: ComfyUI detects {type(detected).__name__}, {len(want)} text-encoder weights all "
          f"found, ControlNet config context 2048 / adm 2816; our detector: {d.family} ({d.layout})")


def _link_dir() -> Path:
    """A folder where this checkout is importable as `comfyui_controlnet_core`."""
    d = Path(tempfile.gettempdir()) / "cncore_bench_pkg"
    d.mkdir(exist_ok=True)
    link = d / "comfyui_controlnet_core"
    if not link.exists():
        link.symlink_to(ROOT)
    return d


# ------------------------------------------------------------------------------------------------
# device memory seen by NVML, from another process (no GIL contention with the timed loop)

POLLER = r"""
import select, sys, pynvml
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(int(sys.argv[1]))
used = lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used
peak = used()
print("ready", flush=True)
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.0005)
    peak = max(peak, used())
    if ready:
        cmd = sys.stdin.readline().strip()
        if cmd == "reset":
            peak = used()
        elif cmd != "get":
            break
        print(peak, flush=True)
"""


class DevicePeak:
    def __init__(self, index: int = 0):
        self.proc = None
        try:
            import pynvml  # noqa: F401
        except ImportError:
            return
        self.proc = subprocess.Popen([sys.executable, "-c", POLLER, str(index)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc = None

    def _ask(self, cmd: str) -> int | None:
        if self.proc is None:
            return None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def reset(self) -> int | None:
        return self._ask("reset")

    def peak(self) -> int | None:
        return self._ask("get")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------
# the harness (child process "run"): ComfyUI in this process

class Harness:
    def __init__(self, comfy_path: str, work: Path, cpu: bool, process: str):
        if "torch" in sys.modules:
            raise RuntimeError("torch was imported before ComfyUI's allocator set-up")
        sys.path.insert(0, comfy_path)
        import comfy.cli_args

        self.args = comfy.cli_args.args
        self.args.cpu = cpu
        self.args.disable_cuda_malloc = process == "native"
        if process == "native":
            os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        import cuda_malloc  # noqa: F401  ComfyUI's main.py: cudaMallocAsync unless disabled
        import asyncio

        import torch

        import comfy.model_management
        import comfy.patcher_extension
        import comfy.sample
        import folder_paths
        import nodes

        self.torch, self.mm, self.nodes, self.sample = torch, comfy.model_management, nodes, comfy.sample
        self.pe = comfy.patcher_extension
        self.cuda = torch.cuda.is_available() and not cpu
        for kind in ("checkpoints", "controlnet"):
            folder_paths.add_model_folder_path(kind, str(work / "models" / kind), is_default=True)
        module_name = str(ROOT).replace(".", "_x_")
        if not asyncio.run(nodes.load_custom_node(str(ROOT))):
            raise RuntimeError("ComfyUI could not load the pack (see the log above)")
        self.fast = sys.modules[module_name + ".controlnet_core.fast"]
        self.node = nodes.NODE_CLASS_MAPPINGS
        self.poller = DevicePeak(torch.cuda.current_device()) if self.cuda else None

    # ---- memory ---------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_memory(self) -> None:
        import gc

        self.mm.unload_all_models()
        self.fast.release()
        gc.collect()
        self.mm.soft_empty_cache(True)
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    # ---- a case: checkpoint, prompts, latent, hints, ControlNets ----------------------------
    def setup_case(self, case: str) -> dict:
        spec = CASES[case]
        torch, n = self.torch, self.nodes
        model, clip, vae = n.CheckpointLoaderSimple().load_checkpoint(CKPT[spec["arch"]])[:3]
        pos = n.CLIPTextEncode().encode(clip, PROMPT)[0]
        neg = n.CLIPTextEncode().encode(clip, NEGATIVE)[0]
        latent = n.EmptyLatentImage().generate(spec["size"], spec["size"], spec["batch"])[0]
        return {
            "spec": spec, "model": model, "vae": vae, "pos": pos, "neg": neg, "latent": latent,
            "hints": [hint_image(torch, spec["size"], s) for s in (0, 1)],
            "builtin": [n.ControlNetLoader().load_controlnet(f)[0] for f in CNS[spec["arch"]]],
            "ours": [self.node["CNCore_LoadControlNet"]().load(f)[0] for f in CNS[spec["arch"]]],
            "images": {},
        }

    def conditioning(self, ctx: dict, variant: str) -> tuple[Any, Any]:
        kind, count, _ = VARIANTS[variant]
        pos, neg = ctx["pos"], ctx["neg"]
        if kind == "builtin":
            for i in range(count):
                pos, neg = self.nodes.ControlNetApplyAdvanced().apply_controlnet(
                    pos, neg, ctx["builtin"][i], ctx["hints"][i], 1.0, 0.0, 1.0)
        elif kind == "ours":
            stack = None
            if count == 2:
                stack = self.node["CNCore_CombineControls"]().combine(ctx["ours"][1], ctx["hints"][1], 1.0, 0.0, 1.0)[0]
            pos, neg = self.node["CNCore_ApplyControlNet"]().apply(
                pos, neg, ctx["ours"][0], ctx["hints"][0], 1.0, 0.0, 1.0, control_stack=stack)
        return pos, neg

    # ---- one row ----------------------------------------------------------------------------
    def run_row(self, ctx: dict, variant: str, mode: str, steps: int, warmup: int, lowvram_gib: float) -> dict:
        import numpy as np

        torch = self.torch
        kind, count, opts = VARIANTS[variant]
        pos, neg = self.conditioning(ctx, variant)
        self.reset_memory()
        if mode == "lowvram" and self.cuda:
            free = self.mm.get_free_memory(self.mm.get_torch_device())
            self.mm.EXTRA_RESERVED_VRAM = max(0, int(free - lowvram_gib * GIB))
        model = ctx["model"].clone()
        marks: dict[str, float] = {}

        def around_sampling(executor, *a, **k):  # ComfyUI's SAMPLER_SAMPLE wrapper: models loaded
            self.sync()
            marks["start"] = time.perf_counter()
            out = executor(*a, **k)
            self.sync()
            marks["end"] = time.perf_counter()
            return out

        model.add_wrapper_with_key(self.pe.WrappersMP.SAMPLER_SAMPLE, "cncore_bench", around_sampling)
        ticks: list[float] = []

        def on_step(i, x0, x, total):  # ComfyUI's step callback (what the preview uses)
            self.sync()
            ticks.append(time.perf_counter())

        latent = self.sample.fix_empty_latent_channels(model, ctx["latent"]["samples"])
        noise = self.sample.prepare_noise(latent, SEED, None)
        stats0 = dict(self.fast.STATS)
        base_device = None
        if self.cuda:
            _try(torch.cuda.reset_peak_memory_stats)
            base_device = self.poller.reset() if self.poller else None
        with self.fast.override(**opts):
            samples = self.sample.sample(model, noise, steps, CFG, "euler", "normal", pos, neg, latent,
                                         callback=on_step, disable_pbar=True, seed=SEED)
        row: dict[str, Any] = {"variant": variant, "controls": count, "mode": mode}
        if self.cuda:
            self.sync()
            row.update(peak_reserved=_try(torch.cuda.max_memory_reserved), peak_allocated=_try(torch.cuda.max_memory_allocated),
                       device_peak=self.poller.peak() if self.poller else None, device_base=base_device)
            row["loaded"] = self.loaded_fractions(ctx, kind, count)
        intervals = [b - a for a, b in zip(ticks, ticks[1:])][max(0, warmup - 1):]
        row.update(
            steps=steps, warmup=warmup, step_intervals=intervals,
            s_per_it=statistics.median(intervals) if intervals else None,
            sample_s=marks["end"] - marks["start"], s_per_image=(marks["end"] - marks["start"]) / ctx["spec"]["batch"],
            fast_stats={k: v - stats0.get(k, 0) for k, v in self.fast.STATS.items() if v != stats0.get(k, 0)},
        )
        if mode == "lowvram":
            self.mm.EXTRA_RESERVED_VRAM = self._reserve
        image = self.nodes.VAEDecode().decode(ctx["vae"], {"samples": samples})[0]
        pixels = np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)  # as SaveImage
        row["nan"] = bool(torch.isnan(image).any())
        ctx["images"][variant] = pixels
        return row

    def loaded_fractions(self, ctx: dict, kind: str, count: int) -> dict:
        """How much of each model ComfyUI had on the GPU during the run (lowvram offloads the rest)."""
        def frac(p) -> float:
            return round(p.loaded_size() / max(1, p.model_size()), 3)

        out = {"unet": frac(ctx["model"])}
        if kind == "builtin":
            out["controlnets"] = [frac(c.control_model_wrapped) for c in ctx["builtin"][:count]]
        elif kind == "ours":
            out["controlnets"] = [frac(c.handle.patcher) for c in ctx["ours"][:count]]
        return out

    def run_case(self, mode: str, case: str, variants: list[str], steps: int, warmup: int, lowvram_gib: float,
                 deadline: float, done: list[dict], out_json: Path) -> list[dict]:
        t0 = time.time()
        try:
            ctx = self.setup_case(case)
            self.run_row(ctx, "built-in", mode, min(3, steps), 0, lowvram_gib)  # warms kernels and caches
        except Exception as e:  # noqa: BLE001 - a case that cannot start is reported, not fatal
            traceback.print_exc()
            return [{"case": case, "mode": mode, "variant": v, "error": f"setup: {type(e).__name__}: {e}"[:500]}
                    for v in variants]
        case_rows: list[dict] = []
        where = {"case": case, "size": ctx["spec"]["size"], "batch": ctx["spec"]["batch"], "arch": ctx["spec"]["arch"]}
        for v in variants:
            if time.time() > deadline:
                case_rows.append({**where, "variant": v, "mode": mode, "skipped": "time budget"})
                continue
            try:
                case_rows.append({**where, **self.run_row(ctx, v, mode, steps, warmup, lowvram_gib)})
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: the row says so
                traceback.print_exc()
                self.reset_memory()
                case_rows.append({**where, "variant": v, "mode": mode, "error": f"{type(e).__name__}: {e}"[:500]})
            print(_row_line(case, case_rows[-1]), flush=True)
            _dump(out_json, done + case_rows)  # a stopped run keeps every finished row
        _compare_images(ctx["images"], case_rows)
        print(f"[{mode} {case}] {time.time() - t0:.0f} s", flush=True)
        return case_rows

    def run(self, entries: list, steps: int, warmup: int, lowvram_gib: float, deadline: float, out_json: Path) -> None:
        rows: list[dict] = []
        self._reserve = self.mm.EXTRA_RESERVED_VRAM
        vram_state = self.mm.vram_state
        for mode, case, variants in entries:
            if time.time() > deadline:
                rows += [{"case": case, "mode": mode, "variant": v, "skipped": "time budget"} for v in variants]
                _dump(out_json, rows)
                continue
            if mode == "lowvram" and self.cuda:
                self.mm.vram_state = self.mm.VRAMState.LOW_VRAM
            self.args.fp8_e4m3fn_unet = mode == "fp8"
            try:
                with self.torch.inference_mode():  # as ComfyUI's executor runs every node
                    rows += self.run_case(mode, case, variants, steps, warmup, lowvram_gib, deadline, rows, out_json)
            finally:
                self.reset_memory()
                self.mm.vram_state = vram_state
                self.args.fp8_e4m3fn_unet = False
            _dump(out_json, rows)
        if self.poller:
            self.poller.close()


def _try(fn: Any) -> Any:
    """torch's memory counters; None where this allocator backend does not keep one."""
    try:
        return fn()
    except RuntimeError:
        return None


def hint_image(torch: Any, size: int, seed: int) -> Any:
    """A hint like an edge map: white lines, rectangles and a circle on black, (1, H, W, 3) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    w = max(1, size // 128)
    for _ in range(6):
        x0, y0, x1, y1 = (torch.rand(4, generator=g) * size).long().tolist()
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        box = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        inner = (xx >= x0 + w) & (xx <= x1 - w) & (yy >= y0 + w) & (yy <= y1 - w)
        img[box & ~inner] = 1.0
    cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([size, size, size / 3])).tolist()
    d = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
    img[(d - r).abs() <= w] = 1.0
    return img[None, :, :, None].expand(1, size, size, 3).contiguous()


def _compare_images(images: dict, rows: list[dict]) -> None:
    import numpy as np

    for r in rows:
        if r["variant"] not in images:
            continue
        ref = "built-in x2" if VARIANTS[r["variant"]][1] == 2 else "built-in"
        if ref in images:
            a, b = images[r["variant"]].astype(np.int16), images[ref].astype(np.int16)
            r["px_diff_vs"] = ref
            r["max_px_diff"] = int(np.abs(a - b).max())


def _dump(path: Path, rows: list) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(path)


def _row_line(case: str, r: dict) -> str:
    if "error" in r or "skipped" in r:
        return f"  {case:13s} {r['variant']:24s} {r.get('error') or r.get('skipped')}"
    mem = f"  reserved {r['peak_reserved'] / GIB:.2f} GiB" if r.get("peak_reserved") is not None else ""
    return (f"  {case:13s} {r['variant']:24s} {r['s_per_it']:.4f} s/it  {r['s_per_image']:.2f} s/image{mem}"
            f"  fast {r['fast_stats']}")


# ------------------------------------------------------------------------------------------------
# environment

def environment(comfy_path: str, cpu: bool) -> dict:
    """Versions (runs in the parent with ComfyUI's Python; CUDA is queried in a short child)."""
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "cpu": _cpu_name(), "date": datetime.date.today().isoformat()}
    spec = {}
    try:
        text = (Path(comfy_path) / "comfyui_version.py").read_text()
        env["comfyui_version"] = text.split("=")[-1].strip().strip("\"'")
    except OSError:
        env["comfyui_version"] = "unknown"
    env["comfyui_commit"] = _git(comfy_path) or _read(Path(comfy_path) / "COMFYUI_COMMIT") or "unknown"
    env["pack_commit"] = _git(str(ROOT)) or _read(ROOT / ".gpu" / "PACK_COMMIT") or "unknown"
    probe = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version() if c else None, "
             "'gpu': torch.cuda.get_device_name(0) if c else None, 'gpu_mem_gib': round("
             "torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None}))")
    try:
        spec = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                         timeout=120).stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, IndexError, json.JSONDecodeError):
        pass
    env.update(spec)
    if not cpu:
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    return env


def _git(path: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip() or None
    except OSError:
        return None


def _cpu_name() -> str:
    name = cpu_name()
    return (platform.processor() or "unknown") if name is None else f"{name} x{os.cpu_count()}"


# ------------------------------------------------------------------------------------------------
# report

def _gib(v: Any) -> str:
    return "-" if v is None else f"{v / GIB:.2f}"


def report(env: dict, config: dict, rows: list[dict], cpu: bool, command: str) -> str:
    ok = [r for r in rows if r.get("s_per_it") is not None]
    none_of = {(r["process"], r["mode"], r["case"]): r for r in ok if r["variant"] == "none"}
    for r in ok:
        base = none_of.get((r["process"], r["mode"], r["case"]))
        r["x_none"] = None if base is None else r["s_per_it"] / base["s_per_it"]
    lines = []
    if cpu:
        lines += [
            "# bench_comfyui: harness check on a CPU (not a speed claim)", "",
            "**This is a check that the harness runs end to end inside real ComfyUI, on a CPU, at 64x64 px "
            "with a few steps. It is not a measurement of the fast path**: off CUDA the fast path steps aside, "
            "so every 'ours' row runs the same plain code, there are no CUDA graphs, streams or VRAM "
            "columns, and the times are CPU times of a 2-core machine shared with other jobs. What it "
            "does show: ComfyUI loads the random-weight checkpoint and ControlNets written with its own "
            "classes, every row (built-in, ours, each switch, two controls, the lowvram and fp8 modes) "
            "samples and decodes, and the image differences against the built-in path.", "",
        ]
    else:
        lines += [f"# bench_comfyui on {env.get('gpu')}", ""]
    lines += [
        f"Run: `{command}`", "",
        f"ComfyUI {env.get('comfyui_version')} (`{env.get('comfyui_commit')}`), pack `{env.get('pack_commit')}`, "
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, driver {env.get('driver', '-')}, "
        f"Python {env.get('python')}, {env.get('gpu') or 'no GPU'}"
        f"{' (' + str(env.get('gpu_mem_gib')) + ' GiB)' if env.get('gpu_mem_gib') else ''}, CPU {env.get('cpu')}; "
        f"{env.get('date')}.", "",
        f"Each row: one sampling run, Euler, `normal` schedule, CFG {CFG} (cond and uncond batched), "
        f"{config['steps']} steps, s/it = median of the {config['steps'] - max(config['warmup'], 1)} step intervals "
        f"after {config['warmup']} warm-up steps; s/image = the whole sampling loop (models loaded) / batch; "
        "VRAM = peak of the sampling call after all models were unloaded: torch reserved / allocated, and the "
        "device's used memory by NVML (includes the CUDA context and CUDA graph memory); px diff = max "
        "|image - built-in image| in 1/255 (two controls: against the built-in chain). `fast` = the fast "
        "path's counters in the row (capture/replay/eager/fallback). Process `comfyui` = the allocator "
        "ComfyUI's main.py sets (cudaMallocAsync on NVIDIA), `native` = PyTorch's caching allocator "
        "(`--disable-cuda-malloc`). Random weights of the real architectures, fp16 unless the mode says fp8.", "",
    ]
    order = {k: i for i, k in enumerate(VARIANTS)}
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r.get("process"), r.get("mode"), r.get("case")), []).append(r)
    for (process, mode, case), rs in groups.items():
        spec = CASES.get(case, {})
        lines += [f"## {case}: {spec.get('size')}² batch {spec.get('batch')}, mode {mode}, process {process}", ""]
        lines += ["| variant | s/it | × none | s/image | peak reserved GiB | peak allocated GiB | device peak GiB "
                  "| max px diff | ControlNet on GPU | fast |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: order.get(r["variant"], 99)):
            if r.get("s_per_it") is None:
                lines.append(f"| {r['variant']} | {r.get('error') or r.get('skipped') or 'no data'} |||||||||")
                continue
            loaded = r.get("loaded", {}).get("controlnets")
            fs = r.get("fast_stats") or {}
            x = "-" if r.get("x_none") is None else f"{r['x_none']:.3f}"
            lines.append(
                f"| {r['variant']} | {r['s_per_it']:.4f} | {x} "
                f"| {r['s_per_image']:.3f} | {_gib(r.get('peak_reserved'))} | {_gib(r.get('peak_allocated'))} "
                f"| {_gib(r.get('device_peak'))} | {r.get('max_px_diff', '-')}{'' if not r.get('nan') else ' (NaN)'} "
                f"| {'-' if not loaded else ', '.join(f'{x:.0%}' for x in loaded)} "
                f"| {' '.join(f'{k} {v}' for k, v in sorted(fs.items())) or '-'} |")
        lines.append("")
    if not cpu:
        lines += targets(ok)
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, read off this run's rows (process comfyui, mode default)."""
    def get(case: str, variant: str, mode: str = "default") -> dict | None:
        return next((r for r in rows if r["process"] == "comfyui" and r["mode"] == mode and r["case"] == case
                     and r["variant"] == variant), None)

    out = ["## Targets (issue 15), from this run", "", "| target | ours | built-in | met? |", "|---|---|---|---|"]
    for case, variant, ref, limit in (("sd15-b1", "ours", "built-in", 1.15), ("sdxl-b1", "ours", "built-in", 1.30),
                                      ("sd15-b1", "ours x2", "built-in x2", 1.30)):
        o, b = get(case, variant), get(case, ref)
        if o is None or o.get("x_none") is None:
            out.append(f"| wall/step {case} {variant} ≤ ×{limit} | not measured | | |")
            continue
        bt = "-" if b is None or b.get("x_none") is None else f"×{b['x_none']:.3f}"
        out.append(f"| wall/step {case} {variant} ≤ ×{limit} | ×{o['x_none']:.3f} | {bt} | "
                   f"{'yes' if o['x_none'] <= limit else 'no'} |")
    pairs = []  # (our row at the defaults, the built-in row of the same process, mode, case, count)
    for r in rows:
        kind, count, opts = VARIANTS.get(r["variant"], ("", 0, {}))
        if kind == "ours" and not opts:
            ref = "built-in x2" if count == 2 else "built-in"
            b = next((x for x in rows if (x["process"], x["mode"], x["case"], x["variant"])
                      == (r["process"], r["mode"], r["case"], ref)), None)
            if b is not None:
                pairs.append((r, b))
    for key, label in (("device_peak", "device peak (NVML)"), ("peak_reserved", "torch peak reserved")):
        d = [(r[key] - b[key], r) for r, b in pairs if r.get(key) is not None and b.get(key) is not None]
        if d:
            worst, r = max(d, key=lambda t: t[0])
            out.append(f"| peak VRAM ≤ built-in in every row, {label} | worst {worst / GIB:+.2f} GiB ({r['process']} "
                       f"{r['mode']} {r['case']} {r['variant']}); over in {sum(x > 0 for x, _ in d)} of {len(d)} rows "
                       f"| | {'yes' if worst <= 0 else 'no'} |")
    diffs = [r for r, _ in pairs if r["mode"] == "default" and r.get("max_px_diff") is not None]
    if diffs:
        worst_px = max(diffs, key=lambda r: r["max_px_diff"])
        out.append(f"| max pixel diff vs built-in ≤ 2/255 (fp16) | {worst_px['max_px_diff']}/255 ({worst_px['case']} "
                   f"{worst_px['variant']}) | | {'yes' if worst_px['max_px_diff'] <= 2 else 'no'} |")
    return out + [""]


# ------------------------------------------------------------------------------------------------
# main (parent): make models, run one process per allocator, write the report

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (or COMFYUI_PATH)")
    ap.add_argument("--cpu", action="store_true", help="harness check on the CPU: 64 px, SD1.5, few steps")
    ap.add_argument("--plan", choices=sorted(PLANS), help="default: cpu with --cpu, else gpu")
    ap.add_argument("--steps", type=int, help="steps per row (default 25; --cpu 4)")
    ap.add_argument("--warmup", type=int, help="steps left out of s/it (default 5; --cpu 1)")
    ap.add_argument("--lowvram-gib", type=float, default=2.5, help="VRAM left for weights in the lowvram mode")
    ap.add_argument("--work", help="folder for the model files (kept); default: a temporary folder, deleted")
    ap.add_argument("--out", default=str(RESULTS), help="where the .md/.json go")
    ap.add_argument("--tag", help="file name tag (default: cpu, or the GPU name)")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting new cases after this many seconds")
    ap.add_argument("--check-sdxl-layout", action="store_true", help="only check the SDXL writer on the meta device")
    ap.add_argument("--_child", choices=["make", "run"], help=argparse.SUPPRESS)
    ap.add_argument("--_process", default="comfyui", help=argparse.SUPPRESS)
    ap.add_argument("--_archs", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_deadline", type=float, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.comfyui:
        ap.error("give the ComfyUI checkout with --comfyui PATH or COMFYUI_PATH")
    a.comfyui = str(Path(a.comfyui).resolve())
    plan = PLANS[a.plan or ("cpu" if a.cpu else "gpu")]
    steps = a.steps or (4 if a.cpu else 25)
    warmup = a.warmup if a.warmup is not None else (1 if a.cpu else 5)
    if a.check_sdxl_layout:
        check_sdxl_layout(a.comfyui)
        return 0
    if a._child == "make":
        make_models(a.comfyui, Path(a.work), a._archs.split(","), "cpu" if a.cpu else "cuda")
        return 0
    if a._child == "run":
        entries = [(m, c, v) for p, m, c, v in plan if p == a._process]
        h = Harness(a.comfyui, Path(a.work), a.cpu, a._process)
        h.run(entries, steps, warmup, a.lowvram_gib, a._deadline or float("inf"), Path(a.work) / f"rows_{a._process}.json")
        return 0

    start = time.time()
    deadline = start + a.budget_s if a.budget_s else 0
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="cncore_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--comfyui", a.comfyui, "--work", str(work),
          "--steps", str(steps), "--warmup", str(warmup), "--lowvram-gib", str(a.lowvram_gib)]
    me += ["--cpu"] if a.cpu else []
    me += ["--plan", a.plan] if a.plan else []
    shown = [x if x != a.comfyui and not x.startswith(str(Path(a.comfyui))) else "$COMFYUI_PATH"
             for x in (argv if argv is not None else sys.argv[1:])]
    command = "python benchmarks/bench_comfyui.py " + " ".join(shown)
    env = environment(a.comfyui, a.cpu)
    tag = a.tag or ("cpu" if a.cpu else "".join(ch if ch.isalnum() else "_" for ch in (env.get("gpu") or "gpu")).lower())
    config = {"steps": steps, "warmup": warmup, "lowvram_gib": a.lowvram_gib, "plan": plan, "work": str(work)}
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stopped: list[int] = []

    def stop(signum: int, _frame: Any) -> None:  # `timeout` (SIGTERM): end the child, keep its rows
        stopped.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        archs = sorted({CASES[c]["arch"] for _, _, c, _ in plan})
        if _child([*me, "--_child", "make", "--_archs", ",".join(archs)]) != 0:
            raise RuntimeError("writing the model files failed")
        for process in dict.fromkeys(p for p, *_ in plan):
            if deadline and time.time() > deadline:  # not worth starting ComfyUI for skipped rows
                _dump(work / f"rows_{process}.json", [{"case": c, "mode": m, "variant": v, "skipped": "time budget"}
                                                     for p, m, c, vs in plan if p == process for v in vs])
                rc = 0
            else:
                rc = _child([*me, "--_child", "run", "--_process", process, "--_deadline", str(deadline)])
            rows = []
            for p in dict.fromkeys(q for q, *_ in plan):
                f = work / f"rows_{p}.json"
                if f.exists():
                    rows += [{**r, "process": p} for r in json.loads(f.read_text())]
            if rc != 0:
                rows.append({"process": process, "mode": "-", "case": "-", "variant": "-",
                             "error": f"the {process} process exited with {rc}" + (" (stopped)" if stopped else "")})
            _write(out_dir, tag, env, config, rows, a.cpu, command)
            if stopped:
                break
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.time() - start:.0f} s")
    return 0


def _child(cmd: list[str]) -> int:
    """Run a child process; if this process is stopped meanwhile, stop the child first."""
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        return proc.wait()


def _write(out_dir: Path, tag: str, env: dict, config: dict, rows: list[dict], cpu: bool, command: str) -> None:
    md = report(env, config, rows, cpu, command)
    (out_dir / f"bench_comfyui_{tag}.md").write_text(md)
    (out_dir / f"bench_comfyui_{tag}.json").write_text(json.dumps(
        {"environment": env, "config": config, "rows": rows}, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    sys.exit(main())
