"""Per-step cost of ControlNeXt against no control and a classic ControlNet, on the CPU. Not a test.

Random weights of the real architectures (our reference UNet at the SD1.5 / SDXL configs, a
ControlNeXt module in the released layout, a classic ControlNet of the host's config). One step =
the control's work + one UNet forward on a CFG batch of 2 with one hint, through the host protocol
(`Control.residuals` + `UNet.forward`), the hint embedding precomputed (once per run in a sampler).
Ways:
* no control: the UNet alone;
* ControlNeXt: the module once for both CFG rows (our de-duplication) + the UNet with the addition;
* ControlNeXt, both rows: the whole module (stem included) on the doubled batch every step, as the
  reference pipelines run it;
* ControlNet: the classic ControlNet of the same base + the UNet with its residuals.
Steps are measured interleaved (one of each per round; medians reported), so a shared machine's
load shifts all alike. Beside them, the FLOP ratio of one step at the size the paper's claim is
about (SD1.5 512 px, SDXL 1024 px), counted by `torch.utils.flop_counter` on meta tensors.

    .venv/bin/python benchmarks/bench_controlnext.py --arch sd15 --size 32 [--rounds 5]
    .venv/bin/python benchmarks/bench_controlnext.py --arch sdxl --size 32   # needs ~16 GB of RAM (fp32)

Writes (appends a section to) benchmarks/results/controlnext_cpu.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from measure import machine  # noqa: E402

from comfyui_controlnet_core.controlnet_core.config import SD15, SDXL  # noqa: E402
from comfyui_controlnet_core.controlnet_core.control import Control  # noqa: E402
from comfyui_controlnet_core.controlnet_core.controlnext import ControlNeXt, cross_normalize  # noqa: E402
from comfyui_controlnet_core.controlnet_core.formats.controlnext import SD15_V1, STEM, ModuleSpec  # noqa: E402
from comfyui_controlnet_core.controlnet_core.host import FEATURE, StepRequest  # noqa: E402
from comfyui_controlnet_core.controlnet_core.model import ControlNet  # noqa: E402
from comfyui_controlnet_core.controlnet_core.unet import UNet  # noqa: E402

CLAIM_SIZE = {"sd15": 64, "sdxl": 128}  # latent side at 512 px / 1024 px


def everything(p: float) -> float:
    return 1e9 if p <= 0 else 0.0 if p >= 1 else 1.0


def random_(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if "norm" in name or "layers.0" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return net.requires_grad_(False).eval()


def module_for(arch: str, device=None) -> ControlNeXt:
    spec = ModuleSpec(STEM, 320) if arch == "sdxl" else ModuleSpec(SD15_V1, 1280)
    return ControlNeXt(spec, device=device)


def inputs(cfg, size: int, device=None):
    g = torch.Generator().manual_seed(3) if device is None else None
    rnd = (lambda *s: torch.randn(*s, generator=g)) if device is None else (lambda *s: torch.empty(*s, device=device))
    x = rnd(2, 4, size, size)
    hint = torch.rand(1, 3, 8 * size, 8 * size, generator=g) if device is None else torch.empty(1, 3, 8 * size, 8 * size, device=device)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = rnd(2, 77, cfg.context_dim)
    y = None if cfg.adm_in_channels is None else rnd(2, cfg.adm_in_channels)
    return x, hint, t, ctx, y


def flops(arch: str) -> dict[str, float]:
    """GFLOP of one step at the claim's size (meta tensors: nothing is allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = SD15 if arch == "sd15" else SDXL
    size = CLAIM_SIZE[arch]
    with torch.device("meta"):
        unet, cnx, cn = UNet(cfg), module_for(arch), ControlNet(cfg)
    x, hint, t, ctx, y = inputs(cfg, size, device="meta")
    out = {}
    with torch.no_grad():
        for name, fn in {
            "unet (batch 2)": lambda: unet(x, t, ctx, y),
            "ControlNeXt module, once": lambda: cnx.control_map(cnx.embed_hint(hint), t[:1]),
            "ControlNeXt module, both rows": lambda: cnx.control_map(cnx.embed_hint(hint.expand(2, -1, -1, -1)), t),
            "ControlNet (batch 2)": lambda: cn.control_outputs(x, t, ctx, y, cn.embed_hint(hint)),
        }.items():
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[name] = counter.get_total_flops() / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "controlnext_cpu.md")
    ap.add_argument("--flops-only", action="store_true", help="count FLOPs only (meta tensors, no RAM, no timing)")
    ap.add_argument("--no-controlnet", action="store_true", help="time without the classic ControlNet (SDXL's is 5 GB)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = SD15 if args.arch == "sd15" else SDXL
    fl = flops(args.arch)
    print(f"FLOPs at {8 * CLAIM_SIZE[args.arch]} px: " + ", ".join(f"{k} {v:.1f} G" for k, v in fl.items()), flush=True)
    if args.flops_only:
        u = fl["unet (batch 2)"]
        px = 8 * CLAIM_SIZE[args.arch]
        text = "\n".join([
            f"## {'SDXL' if args.arch == 'sdxl' else 'SD1.5'} host: FLOP ratios only (one step at {px} px, CFG batch 2)",
            "",
            f"`.venv/bin/python benchmarks/bench_controlnext.py --arch {args.arch} --flops-only` (meta tensors; not timed here)",
            "",
            f"| way | GFLOP | FLOP ratio vs no control |",
            "|---|---|---|",
            f"| no control | {u:.1f} | x1.000 |",
            f"| ControlNeXt (module once per step) | {u + fl['ControlNeXt module, once']:.1f} | "
            f"x{(u + fl['ControlNeXt module, once']) / u:.3f} |",
            f"| ControlNeXt (module on both CFG rows) | {u + fl['ControlNeXt module, both rows']:.1f} | "
            f"x{(u + fl['ControlNeXt module, both rows']) / u:.3f} |",
            f"| ControlNet | {u + fl['ControlNet (batch 2)']:.1f} | x{(u + fl['ControlNet (batch 2)']) / u:.3f} |",
            "",
        ])
        print(text)
        old = args.out.read_text() if args.out.exists() else "# ControlNeXt per-step cost on the CPU\n\n"
        args.out.write_text(old + ("\n" if not old.endswith("\n\n") else "") + text)
        return

    print(f"building random {args.arch} models ...", flush=True)
    unet = random_(UNet(cfg), 1)
    cnx = random_(module_for(args.arch), 2)
    cn = None if args.no_controlnet else random_(ControlNet(cfg), 3)
    x, hint, t, ctx, y = inputs(cfg, args.size)
    req = StepRequest(x, torch.full((2,), 5.0), t, ctx, y, (0, 1))
    c_cnx = Control(cnx, hint)
    c_cnx.pre_run(everything, unet.state_dict)
    c_cn = None
    if cn is not None:
        c_cn = Control(cn, hint)
        c_cn.pre_run(everything, unet.state_dict)
    hint2 = hint.expand(2, -1, -1, -1).contiguous()

    def cnx_both_rows():  # the whole module on the doubled batch, every step (the reference pipelines)
        c = cnx.control_map(cnx.embed_hint(hint2), t)
        scale = 1.0 if cnx.scale is None else cnx.scale
        return {FEATURE: {cnx.variant.block: [lambda h: cross_normalize(h, c, cnx.variant.pool_first) * scale]}}

    runs = {
        "no control": lambda: unet(x, t, ctx, y),
        "ControlNeXt (module once per step)": lambda: unet(x, t, ctx, y, control=c_cnx.residuals(req)),
        "ControlNeXt (module on both CFG rows)": lambda: unet(x, t, ctx, y, control=cnx_both_rows()),
        "ControlNet": lambda: unet(x, t, ctx, y, control=c_cn.residuals(req)),
    }
    if c_cn is None:
        del runs["ControlNet"]
    with torch.no_grad():
        a = runs["ControlNeXt (module once per step)"]()
        b = runs["ControlNeXt (module on both CFG rows)"]()
        agree = ((a - b).norm() / b.norm()).item()
        for run in runs.values():  # warm-up (and the hint embeddings of the run)
            run()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(args.rounds):
            for k, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["no control"]
    u = fl["unet (batch 2)"]
    flop_ratio = {
        "no control": 1.0,
        "ControlNeXt (module once per step)": (u + fl["ControlNeXt module, once"]) / u,
        "ControlNeXt (module on both CFG rows)": (u + fl["ControlNeXt module, both rows"]) / u,
        "ControlNet": (u + fl["ControlNet (batch 2)"]) / u,
    }
    target = {"sdxl": 1.10, "sd15": 1.25}[args.arch]
    ours = med["ControlNeXt (module once per step)"] / base
    lines = [
        f"## {args.arch.upper() if args.arch == 'sdxl' else 'SD1.5'} host, ControlNeXt "
        f"{'SDXL' if args.arch == 'sdxl' else 'SD1.5-v1'} module, latent {args.size}x{args.size} ({8 * args.size} px)",
        "",
        f"`.venv/bin/python benchmarks/bench_controlnext.py --arch {args.arch} --size {args.size} --rounds {args.rounds}`",
        "",
        f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32",
        f"one step = the control + one UNet forward, CFG batch 2, one hint; median of {args.rounds} interleaved rounds; "
        f"FLOPs counted at {8 * CLAIM_SIZE[args.arch]} px",
        "",
        f"| way | s / step (wall) | vs no control | FLOP ratio at {8 * CLAIM_SIZE[args.arch]} px |",
        "|---|---|---|---|",
    ]
    for k in flop_ratio:
        if k in runs:
            lines.append(f"| {k} | {med[k]:.3f} | x{med[k] / base:.3f} | x{flop_ratio[k]:.3f} |")
        else:
            lines.append(f"| {k} | not timed (--no-controlnet) | | x{flop_ratio[k]:.3f} |")
    lines += [
        "",
        f"* GFLOP at {8 * CLAIM_SIZE[args.arch]} px: UNet (batch 2) {u:.1f}; module once {fl['ControlNeXt module, once']:.1f}, "
        f"on both rows {fl['ControlNeXt module, both rows']:.1f}; ControlNet (batch 2) {fl['ControlNet (batch 2)']:.1f}",
        f"* module once vs both rows agree: relative difference {agree:.1e}",
        f"* target: ControlNeXt <= x{target:.2f} of no control (wall): **{'met' if ours <= target else 'not met'}** (x{ours:.3f})",
        "",
        "raw seconds per round: " + "; ".join(f"{k}: " + ", ".join(f"{v:.2f}" for v in times[k]) for k in runs),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    header = "# ControlNeXt per-step cost on the CPU\n\n"
    old = args.out.read_text() if args.out.exists() else header
    args.out.write_text(old + ("\n" if not old.endswith("\n\n") else "") + text)


if __name__ == "__main__":
    main()
