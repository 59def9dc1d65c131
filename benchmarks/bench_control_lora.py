"""Per-step cost of a Control-LoRA: merged once (ours) vs a full ControlNet vs a per-forward recompute.

Random weights of the real SD1.5 shapes: a base-model encoder (the UNet's, as a Control-LoRA sees
it), a full ControlNet of the same architecture, and an SD1.5 Control-LoRA of rank 128 in
Stability's layout (low-rank factors on the layers diffusers' conversion lists; hint encoder, zero
convs, norms and biases stored whole), loaded by our loader. Three ways to run one step (one
ControlNet forward on a CFG batch of 2):

* full ControlNet: `model.ControlNet` with its own weights;
* Control-LoRA, ours: `bind_host` merges `W + up @ down` once, each step runs the merged ControlNet;
* Control-LoRA, recomputed per forward: ComfyUI's way (`ControlLoraOps`: every Linear/Conv2d
  computes `weight + up @ down` in its forward), implemented here on our layers for comparison.

Steps are measured interleaved (one of each per round; the median of the rounds is reported), so a
shared machine's load shifts all three alike. Also reported: the merge time (first bind, and a
re-bind with the base model unchanged, which only reads the fingerprint), and memory: the file's
tensors, the merged copy (`bound_bytes`) and a full ControlNet.

    .venv/bin/python benchmarks/bench_control_lora.py [--size 32] [--rounds 5] [--rank 128]

Writes benchmarks/results/control_lora_cpu.md.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from measure import machine  # noqa: E402

from comfyui_controlnet_core.controlnet_core.config import SD15  # noqa: E402
from comfyui_controlnet_core.controlnet_core.loader import load_controlnet  # noqa: E402
from comfyui_controlnet_core.controlnet_core.model import ControlNet  # noqa: E402

ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
LOWRANK = re.compile(  # LDM names of the layers diffusers' Control-LoRA conversion treats as low-rank
    r"(^input_blocks\.0\.0$|^time_embed\.[02]$|^label_emb\.0\.[02]$|\.op$|\.in_layers\.2$|\.out_layers\.3$"
    r"|\.emb_layers\.1$|\.skip_connection$|\.proj_in$|\.proj_out$|\.attn[12]\.to_[qkv]$|\.attn[12]\.to_out\.0$"
    r"|\.ff\.net\.0\.proj$|\.ff\.net\.2$)"
)


# ---- ComfyUI's way: the delta recomputed in every forward (comfy/controlnet.py ControlLoraOps) ----

class _Recompute:
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None

    def merged_weight(self) -> torch.Tensor:
        if self.up is None:
            return self.weight
        return self.weight + (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.weight.shape)


class RecomputeLinear(_Recompute, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)


class RecomputeConv2d(_Recompute, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.merged_weight(), self.bias)


RECOMPUTE_OPS = SimpleNamespace(Linear=RecomputeLinear, Conv2d=RecomputeConv2d, GroupNorm=nn.GroupNorm,
                                LayerNorm=nn.LayerNorm)


def recompute_net(cfg, host: dict, file_sd: dict) -> ControlNet:
    net = ControlNet(cfg, ops=RECOMPUTE_OPS, device="meta")
    sd = {k: file_sd.get(k, host.get(k)) for k in net.state_dict()}
    net.load_state_dict(sd, assign=True)
    modules = dict(net.named_modules())
    for key, t in file_sd.items():
        if key.endswith((".up", ".down")):
            module, _, part = key.rpartition(".")
            setattr(modules[module], part, t)
    return net.requires_grad_(False).eval()


# ---- fixtures ----------------------------------------------------------------------------

def random_(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if "norm" in name or "layers.0" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return net.requires_grad_(False).eval()


def control_lora_sd(cfg, host: dict, rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, p in ControlNet(cfg, device="meta").state_dict().items():
        module, _, kind = key.rpartition(".")
        if module.startswith(ENCODER) and LOWRANK.search(module) and kind == "weight":
            out, fan_in = p.shape[0], math.prod(p.shape[1:])
            r = min(rank, out, fan_in)
            up = torch.randn(out, r, generator=g) / math.sqrt(r)
            sd[module + ".up"] = up if p.ndim == 2 else up[:, :, None, None]
            sd[module + ".down"] = 0.1 * torch.randn(r, *p.shape[1:], generator=g) / math.sqrt(fan_in)
        elif module.startswith(ENCODER) and LOWRANK.search(module):
            sd[key] = host[key].clone()
        elif p.ndim >= 2:
            sd[key] = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
        else:
            sd[key] = (1.0 if "norm" in key or "layers.0" in key else 0.0) + 0.1 * torch.randn(p.shape, generator=g)
    sd["lora_controlnet"] = torch.tensor([])
    return sd


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px, 64 = 512 px)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "control_lora_cpu.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SD15
    print("building random SD1.5-size models ...", flush=True)
    full = random_(ControlNet(cfg), 1)  # also the base model: a UNet encoder has exactly these names
    host = {k: v for k, v in full.state_dict().items() if k.startswith(ENCODER)}
    file_sd = control_lora_sd(cfg, host, args.rank, 2)
    clora = load_controlnet(file_sd, name=f"control_lora_rank{args.rank}_sd15")
    t0 = time.perf_counter()
    clora.bind_host(lambda: host)
    merge_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    clora.bind_host(lambda: host)  # unchanged base model: fingerprint only
    rebind_s = time.perf_counter() - t0
    recompute = recompute_net(cfg, host, file_sd)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, args.size, args.size, generator=g)
    hint = torch.rand(1, 3, 8 * args.size, 8 * args.size, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    with torch.no_grad():
        emb = {"full": full.embed_hint(hint), "ours": clora.embed_hint(hint), "recompute": recompute.embed_hint(hint)}
        runs = {
            "full": lambda: full.control_outputs(x, t, ctx, None, emb["full"]),
            "ours": lambda: clora.control_outputs(x, t, ctx, None, emb["ours"]),
            "recompute": lambda: recompute.control_outputs(x, t, ctx, None, emb["recompute"]),
        }
        a, b = runs["ours"](), runs["recompute"]()
        agree = max(((p - q).norm() / q.norm()).item() for p, q in zip(a["output"] + a["middle"], b["output"] + b["middle"]))
        for run in runs.values():  # warm-up
            run()
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(args.rounds):
            for k, run in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                run()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["ours"] / med["full"]
    file_b = nbytes(clora.parameters())
    rows = [
        ("full ControlNet", "full", nbytes(full.parameters())),
        ("Control-LoRA, merged once (ours)", "ours", file_b + clora.bound_bytes),
        ("Control-LoRA, recomputed per forward (ComfyUI's way)", "recompute", file_b),
    ]
    lines = [
        f"# Control-LoRA per-step cost on the CPU (SD1.5 size, rank {args.rank})",
        "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/bench_control_lora.py', *sys.argv[1:]])}`",
        "",
        f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32",
        f"one step = one ControlNet forward, CFG batch 2, latent {args.size}x{args.size} ({8 * args.size} px), "
        f"hint embedding precomputed; median of {args.rounds} interleaved rounds",
        "",
        "| way | s / step (wall) | vs full ControlNet | CPU s / step | vs full ControlNet | weights held during sampling |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {med[k]:.3f} | x{med[k] / med['full']:.3f} | {mcpu[k]:.3f} | x{mcpu[k] / mcpu['full']:.3f} "
          f"| {b / 2**20:.0f} MiB |" for name, k, b in rows],
        "",
        f"* merge (`bind_host`, first run): {merge_s:.2f} s; again with the base model unchanged (fingerprint "
        f"only): {rebind_s * 1000:.0f} ms",
        f"* memory: the file's tensors {file_b / 2**20:.0f} MiB; the merged copy (`bound_bytes`) "
        f"{clora.bound_bytes / 2**20:.0f} MiB, built once per run beside them; a full ControlNet "
        f"{nbytes(full.parameters()) / 2**20:.0f} MiB (the recompute holds only the file, plus one layer's "
        "delta at a time)",
        f"* the two Control-LoRA ways agree: worst relative difference {agree:.1e}",
        f"* target: ours within +-10 % of a full ControlNet step (wall): **{'met' if abs(ratio - 1) <= 0.10 else 'not met'}** "
        f"(x{ratio:.3f})",
        "",
        "raw seconds per round: " + "; ".join(f"{k}: {', '.join(f'{s:.2f}' for s in v)}" for k, v in times.items()),
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
