"""Side-by-side cost of a ControlNet per sampling step (issue 6). Not a test.

One run, one GPU: the host UNet alone; + our ControlNet (plain, each fast-path feature on, all
on); + diffusers' ControlNetModel as the reference; 1 and 2 controls; SD1.5 at batch 2 and 8
(512 px -> 64x64 latent), SDXL at batch 2 (1024 px -> 128x128). Random weights of the real
architectures, fp16. Per variant:

  gpu_ms   GPU time of one step: the whole step (control + UNet) captured in a CUDA graph, median
           of replays timed with CUDA events (no launch gaps: the GPU's own work, streams overlapping
           where the variant forks them; our graph feature cannot nest, so `graphs` only shows in wall);
  wall_ms  wall time of one step in an eager host loop (eager UNet + the control, as ComfyUI runs),
           median over blocks of steps, synchronised at block ends;
  vram_gib peak memory a run with only this variant's models resident needs (weights + peak
           reserved memory of the loop, other models' weights subtracted);
  err      ||r - r_plain|| / ||r_plain|| of the residuals against our plain path (fp16).

    python benchmarks/bench_step.py                          # CUDA, full sizes, writes results/
    python benchmarks/bench_step.py --device cpu --tiny      # smoke run anywhere

Results: benchmarks/results/bench_step_<tag>.json and .png (the chart only if matplotlib is there).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import comfyui_controlnet_core  # noqa: F401
except ImportError:  # run from a checkout: make the folder importable under its package name
    import tempfile

    link_dir = Path(tempfile.mkdtemp(prefix="cncore_"))
    (link_dir / "comfyui_controlnet_core").symlink_to(ROOT)
    sys.path.insert(0, str(link_dir))

from comfyui_controlnet_core.controlnet_core import fast  # noqa: E402
from comfyui_controlnet_core.controlnet_core.config import SD15, SDXL  # noqa: E402
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings, ControlStack  # noqa: E402
from comfyui_controlnet_core.controlnet_core.host import StepRequest, unet_control  # noqa: E402
from comfyui_controlnet_core.controlnet_core.model import ControlNet  # noqa: E402
from comfyui_controlnet_core.controlnet_core.unet import UNet  # noqa: E402

GIB = 1024**3


def everything(p: float) -> float:
    return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1.0 - p))


@dataclasses.dataclass
class Case:
    name: str
    cfg: object
    batch: int
    latent: int


def cases(tiny: bool) -> list[Case]:
    if tiny:
        t15 = dataclasses.replace(SD15, model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=64,
                                  hint_block_channels=(16, 16, 32, 32))
        txl = dataclasses.replace(SDXL, model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2),
                                  transformer_depth_middle=2, context_dim=128, hint_block_channels=(16, 16, 32, 32))
        return [Case("sd15-b2", t15, 2, 8), Case("sd15-b8", t15, 8, 8), Case("sdxl-b2", txl, 2, 8)]
    return [Case("sd15-b2", SD15, 2, 64), Case("sd15-b8", SD15, 8, 64), Case("sdxl-b2", SDXL, 2, 128)]


# ------------------------------------------------------------------------------------------------
# models and inputs


def our_controlnet(cfg, device, dtype, seed) -> ControlNet:
    torch.manual_seed(seed)
    with torch.device(device):
        net = ControlNet(cfg, dtype=dtype)
    with torch.no_grad():  # the zero convs random too, so the residuals are not trivially 0
        for z in [*(z[0] for z in net.zero_convs), net.middle_block_out[0], net.input_hint_block[-1]]:
            z.weight.normal_(0, 0.02)
            z.bias.normal_(0, 0.02)
    return net.eval()


def diffusers_controlnet(cfg, device, dtype, seed):
    from diffusers import ControlNetModel

    from comfyui_controlnet_core.controlnet_core.formats.diffusers import to_diffusers_config

    conf = {k: v for k, v in to_diffusers_config(cfg).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    with torch.device(device):
        m = ControlNetModel(**conf)
    return m.to(device, dtype).eval()


def nbytes(*modules) -> int:
    return sum(fast.weight_bytes(m) for m in modules)


class Inputs:
    def __init__(self, case: Case, device, dtype):
        cfg, b, h = case.cfg, case.batch, case.latent
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(b, 4, h, h, generator=g).to(device, dtype)
        self.t = torch.full((b,), 501.0, device=device)
        self.sigma = torch.full((b,), 3.0)  # on the CPU, as the reference sampler keeps it
        self.ctx = torch.randn(b, 77, cfg.context_dim, generator=g).to(device, dtype)
        self.y = None if cfg.adm_in_channels is None else torch.randn(b, cfg.adm_in_channels, generator=g).to(device, dtype)
        self.hints = [torch.rand(1, 3, 8 * h, 8 * h, generator=g).to(device) for _ in range(2)]
        self.cond_or_uncond = (0, 1)
        if self.y is not None:
            self.text_embeds = self.y[:, :1280].contiguous()
            self.time_ids = torch.tensor([[1024.0, 1024.0, 0, 0, 1024.0, 1024.0]] * b, device=device, dtype=dtype)

    def request(self, x) -> StepRequest:
        return StepRequest(x, self.sigma, self.t, self.ctx, self.y, self.cond_or_uncond)


# ------------------------------------------------------------------------------------------------
# variants: each returns control_fn(x) -> residual dict or None, the models it uses, fast options


def make_variants(n_controls: int, with_diffusers: bool, cuda: bool) -> list[tuple[str, dict]]:
    """Plain, each feature alone on top of plain, and all on. "all-on" = graphs + overlap +
    channels_last where it pays (`fast.channels_last_pays`); parallel streams stay off (they gained
    nothing in run 1 and cost memory); "cl-flipped" is all-on with channels_last the other way."""
    v: list[tuple[str, dict]] = []
    if with_diffusers:
        v.append(("diffusers", {"kind": "diffusers"}))
    v.append(("ours-nohintcache", {"kind": "nocache"}))
    v.append(("ours-plain", {"kind": "plain"}))
    if cuda:
        v.append(("+graphs", {"kind": "fast", "opts": dict(graphs=True, overlap=False, parallel=False)}))
        v.append(("+overlap", {"kind": "fast", "opts": dict(graphs=False, overlap=True, parallel=False)}))
        if n_controls > 1:
            v.append(("+parallel", {"kind": "fast", "opts": dict(graphs=False, overlap=False, parallel=True)}))
    v.append(("+channels_last", {"kind": "plain", "channels_last": True}))
    if n_controls == 1 and fast.fp8_supported():
        v.append(("+fp8", {"kind": "plain", "fp8": True}))
    if cuda:
        allon = dict(graphs=True, overlap=True, parallel=False)
        v.append(("all-on", {"kind": "fast", "opts": allon, "channels_last": "auto"}))
        v.append(("all-on,cl-flipped", {"kind": "fast", "opts": allon, "channels_last": "flip"}))
        if n_controls > 1:
            v.append(("all-on+parallel", {"kind": "fast", "opts": dict(allon, parallel=True), "channels_last": "auto"}))
        if n_controls == 1:
            v.append(("all-on,static-out", {"kind": "fast", "opts": dict(allon, fresh_outputs=False),
                                            "channels_last": "auto"}))
            if fast.fp8_supported():
                v.append(("all-on+fp8", {"kind": "fast", "opts": allon, "fp8": True, "channels_last": "auto"}))
    return v


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x = torch.cat([t.double().flatten() for t in a])
    y = torch.cat([t.double().flatten() for t in b])
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


def flat_res(d) -> list[torch.Tensor]:
    return [*d["output"], *d["middle"]]


# ------------------------------------------------------------------------------------------------
# timing


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def wall_blocks(step, base_step, cuda: bool, steps: int, blocks: int) -> tuple[float, float]:
    """Wall ms/step of `step` and its ratio to `base_step` (the UNet alone), measured in
    alternating blocks so that drifts of the host hit both alike; GC paused while timing."""
    import gc

    def block(fn) -> float:
        sync(cuda)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(cuda)
        return (time.perf_counter() - t0) * 1e3 / steps

    gc.collect()
    gc.disable()
    try:
        mine, ratios = [], []
        for _ in range(blocks):
            b = block(base_step) if base_step is not None else None
            m = block(step)
            mine.append(m)
            if b is not None:
                ratios.append(m / b)
    finally:
        gc.enable()
    return statistics.median(mine), (statistics.median(ratios) if ratios else 1.0)


def gpu_time(step, reps: int) -> float:
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        step()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------


def run_case(case: Case, args, device, dtype, cuda: bool) -> list[dict]:
    print(f"\n== {case.name}: {case.cfg.arch} batch {case.batch}, latent {case.latent}x{case.latent} ==", flush=True)
    rows: list[dict] = []
    inp = Inputs(case, device, dtype)
    with torch.device(device):
        torch.manual_seed(1)
        unet = UNet(case.cfg, dtype=dtype).eval()
    nets = [our_controlnet(case.cfg, device, dtype, seed=10 + i) for i in range(2)]
    dnets = []
    if args.diffusers:
        try:
            dnets = [diffusers_controlnet(case.cfg, device, dtype, seed=20 + i) for i in range(2)]
        except Exception as exc:  # diffusers missing: say so, go on
            print(f"  (no diffusers reference: {exc})")
    x = inp.x

    def unet_step():
        return unet(x, inp.t, inp.ctx, inp.y, control=None)

    def measure(name: str, n: int, control_fn, used: list, err: float | None) -> dict:
        def step():
            res = control_fn(x) if control_fn is not None else None
            return unet(x, inp.t, inp.ctx, inp.y, control=res)

        with torch.no_grad():
            for _ in range(3):  # warm-up: eager call, graph capture, first replay
                step()
            mem = {"cn_weights_gib": nbytes(*used) / GIB}
            if cuda:
                sync(cuda)
                torch.cuda.empty_cache()
                others = torch.cuda.memory_allocated() - nbytes(unet, *used)
                torch.cuda.reset_peak_memory_stats()
                for _ in range(2):
                    step()
                sync(cuda)
                mem["vram_gib"] = (torch.cuda.max_memory_reserved() - others) / GIB
                mem["vram_alloc_gib"] = (torch.cuda.max_memory_allocated() - others) / GIB
            w, wr = wall_blocks(step, unet_step if control_fn is not None else None, cuda, args.steps, args.blocks)
            g = None
            if cuda:
                # a fresh fast-path entry for the capture shape is not needed: the loop made it
                g = gpu_time(step, args.reps)
                torch.cuda.empty_cache()
        row = {"case": case.name, "controls": n, "variant": name, "wall_ms": w, "wall_ratio": wr, "gpu_ms": g, **mem,
               "err": err}
        rows.append(row)
        gs = f"{g:7.2f}" if g is not None else "   -   "
        vs = f"{mem['vram_gib']:6.2f}" if "vram_gib" in mem else "  -   "
        es = f"{err:.1e}" if err is not None else "-"
        print(f"  {n} {name:20s} gpu {gs} ms  wall {w:7.2f} ms  vram {vs} GiB  err {es}", flush=True)
        return row

    base = measure("unet", 0, None, [], None)

    for n in (1, 2):
        stack_nets = nets[:n]
        controls = [Control(net, inp.hints[i], ControlSettings(strength=1.0 - 0.25 * i)) for i, net in enumerate(stack_nets)]
        stack = ControlStack(controls)
        stack.pre_run(everything)
        with torch.no_grad(), fast.override(enabled=False):
            ref = [r.clone() for r in flat_res(stack.residuals(inp.request(x)))]
        for name, spec in make_variants(n, bool(dnets), cuda):
            fast.release()
            kind = spec["kind"]
            used_nets = list(stack_nets)
            cl = spec.get("channels_last", False)
            if cl == "flip":
                cl = not fast.channels_last_pays(stack_nets[0])
            if spec.get("fp8"):
                used_nets = [fast.prepare(copy.deepcopy(nt), fp8=True, channels_last=cl) for nt in stack_nets]
            elif cl:
                used_nets = [fast.prepare(nt, channels_last=cl) for nt in stack_nets]
            ctrls = [Control(nt, inp.hints[i], ControlSettings(strength=1.0 - 0.25 * i)) for i, nt in enumerate(used_nets)]
            st = ControlStack(ctrls)
            st.pre_run(everything)
            opts = dict(enabled=kind == "fast", **spec.get("opts", {}))
            if kind == "diffusers":
                dn = dnets[:n]
                hints_b = [h.expand(case.batch, -1, -1, -1) for h in inp.hints]
                kw = {}
                if inp.y is not None:
                    kw["added_cond_kwargs"] = {"text_embeds": inp.text_embeds, "time_ids": inp.time_ids}

                def control_fn(xx, dn=dn, hints_b=hints_b, kw=kw):
                    total = None
                    for i, m in enumerate(dn):
                        down, mid = m(xx, inp.t, encoder_hidden_states=inp.ctx, controlnet_cond=hints_b[i].to(dtype),
                                      conditioning_scale=1.0 - 0.25 * i, return_dict=False, **kw)
                        out = [*down, mid]
                        total = out if total is None else [a + b for a, b in zip(total, out)]
                    return unet_control(total[:-1], total[-1])

                used = dn
            elif kind == "nocache":
                def control_fn(xx, st=st):
                    total = None
                    for i, c in enumerate(st.controls):
                        down, mid = c.net(xx, c.hint.to(xx.device).expand(xx.shape[0], -1, -1, -1), inp.t, inp.ctx, inp.y)
                        out = [r * (1.0 - 0.25 * i) for r in [*down, mid]]
                        total = out if total is None else [a + b for a, b in zip(total, out)]
                    return unet_control(total[:-1], total[-1])

                used = used_nets
            else:
                def control_fn(xx, st=st):
                    return st.residuals(inp.request(xx))

                used = used_nets
            fast.STATS.clear()
            try:
                with fast.override(**opts):
                    row = _measure_variant(kind, control_fn, x, ref, measure, name, n, used)
            except Exception as exc:  # one broken variant must not lose the others
                import traceback

                traceback.print_exc()
                row = {"case": case.name, "controls": n, "variant": name, "wall_ms": float("nan"), "wall_ratio": None,
                       "gpu_ms": None, "err": None, "error": f"{type(exc).__name__}: {exc}"}
                rows.append(row)
                if cuda:
                    torch.cuda.synchronize()
            row["fast_stats"] = dict(fast.STATS)
            row["gpu_ratio"] = row["gpu_ms"] / base["gpu_ms"] if row["gpu_ms"] and base["gpu_ms"] else None
            if not spec.get("fp8"):
                for nt in stack_nets:
                    nt.to(memory_format=torch.contiguous_format)
            del used_nets, ctrls, st
            fast.release()
            if cuda:
                torch.cuda.empty_cache()
    base["gpu_ratio"] = 1.0 if base["gpu_ms"] else None
    del unet, nets, dnets
    if cuda:
        torch.cuda.empty_cache()
    return rows


def _measure_variant(kind, control_fn, x, ref, measure, name, n, used) -> dict:
    err = None
    if kind != "diffusers":
        with torch.no_grad():
            got = None
            for _ in range(3):  # eager, capture + replay, replay
                d = control_fn(x)
                if "sync" in d:
                    d.pop("sync")()
                got = flat_res(d)
            err = rel(got, ref)
    return measure(name, n, control_fn, used, err)


def machine(cuda: bool) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / GIB, 1), sm_count=p.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


TARGETS = [  # (description, case, controls, variant, metric, limit)
    ("GPU, 1 control, SD1.5 b2 <= x1.30", "sd15-b2", 1, "all-on", "gpu_ratio", 1.30),
    ("GPU, 1 control, SDXL b2 <= x1.44", "sdxl-b2", 1, "all-on", "gpu_ratio", 1.44),
    ("GPU, 2 controls, SD1.5 b2 <= x1.65", "sd15-b2", 2, "all-on", "gpu_ratio", 1.65),
    ("wall, 1 control, SD1.5 b2 <= x1.15", "sd15-b2", 1, "all-on", "wall_ratio", 1.15),
]


def check_targets(rows: list[dict]) -> list[dict]:
    def get(case, n, variant):
        return next((r for r in rows if r["case"] == case and r["controls"] == n and r["variant"] == variant), None)

    out = []
    for desc, case, n, variant, metric, limit in TARGETS:
        r = get(case, n, variant)
        if r is None or r.get(metric) is None:
            continue
        out.append({"target": desc, "variant": variant, "value": round(r[metric], 3), "met": r[metric] <= limit})
    for case in ("sd15-b2", "sd15-b8", "sdxl-b2"):
        d = get(case, 1, "diffusers")
        for variant in ("all-on", "all-on,static-out", "all-on+fp8"):
            o = get(case, 1, variant)
            if d and o and "vram_gib" in d and "vram_gib" in o:
                out.append({"target": f"VRAM, 1 control, {case}: {variant} <= diffusers (GiB over)", "variant": variant,
                            "value": round(o["vram_gib"] - d["vram_gib"], 3), "met": o["vram_gib"] <= d["vram_gib"] + 0.01})
        p, f = get(case, 1, "ours-plain"), get(case, 1, "+fp8")
        if p and f:
            out.append({"target": f"fp8 weights, {case}: about half of fp16 (ratio)", "variant": "+fp8",
                        "value": round(f["cn_weights_gib"] / p["cn_weights_gib"], 3),
                        "met": f["cn_weights_gib"] <= 0.55 * p["cn_weights_gib"]})
    return out


def chart(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)")
        return False
    groups = sorted({(r["case"], r["controls"]) for r in rows if r["controls"] > 0})
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 2.6 * len(groups)), squeeze=False)
    for ax, (case, n) in zip(axes[:, 0], groups):
        rs = [r for r in rows if r["case"] == case and r["controls"] == n]
        names = [r["variant"] for r in rs]
        idx = range(len(rs))
        if any(r.get("gpu_ratio") for r in rs):
            ax.bar([i - 0.2 for i in idx], [r.get("gpu_ratio") or 0 for r in rs], 0.4, label="GPU time / UNet")
        ax.bar([i + 0.2 for i in idx], [r.get("wall_ratio") or 0 for r in rs], 0.4, label="wall time / UNet")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(idx))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_title(f"{case}, {n} control(s)", fontsize=9)
        ax.set_ylabel("x UNet alone")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny widths and 8x8 latents (smoke test)")
    ap.add_argument("--cases", default="sd15-b2,sd15-b8,sdxl-b2")
    ap.add_argument("--steps", type=int, default=10, help="steps per wall-time block")
    ap.add_argument("--blocks", type=int, default=4, help="alternating UNet/variant blocks for wall time")
    ap.add_argument("--reps", type=int, default=10, help="graph replays for GPU time")
    ap.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    if cuda:
        torch.backends.cudnn.benchmark = False
    wanted = args.cases.split(",")
    rows = []
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in cases(args.tiny):
        if case.name in wanted:
            rows += run_case(case, args, device, dtype, cuda)
            (out / "bench_step_partial.json").write_text(json.dumps(rows, indent=1))  # survives a timeout
    targets = check_targets(rows) if cuda and not args.tiny else []
    info = machine(cuda)
    tag = args.tag or (("tiny_" if args.tiny else "") + (info.get("gpu", "cpu").split()[-1].lower() if cuda else "cpu"))
    (out / "bench_step_partial.json").unlink(missing_ok=True)
    result = {"machine": info, "dtype": str(dtype), "tiny": args.tiny, "seconds": round(time.time() - t0, 1),
              "rows": rows, "targets": targets}
    (out / f"bench_step_{tag}.json").write_text(json.dumps(result, indent=1))
    png = chart(rows, out / f"bench_step_{tag}.png")
    print(f"\nmachine: {info.get('gpu', info['cpu'])}, torch {info['torch']}, diffusers {info['diffusers']}")
    print(f"{'case':8s} {'n':>1s} {'variant':18s} {'gpu ms':>8s} {'x':>6s} {'wall ms':>8s} {'x':>6s} {'VRAM GiB':>8s} {'err':>8s}")
    for r in rows:
        g = f"{r['gpu_ms']:8.2f} {r['gpu_ratio']:6.2f}" if r.get("gpu_ms") else f"{'-':>8s} {'-':>6s}"
        v = f"{r['vram_gib']:8.2f}" if "vram_gib" in r else f"{'-':>8s}"
        e = f"{r['err']:8.1e}" if r.get("err") is not None else f"{'-':>8s}"
        wr = f"{r['wall_ratio']:6.2f}" if r.get("wall_ratio") is not None else f"{'-':>6s}"
        print(f"{r['case']:8s} {r['controls']:1d} {r['variant']:20s} {g} {r['wall_ms']:8.2f} {wr} {v} {e}"
              + (f"  ERROR {r['error']}" if r.get("error") else ""))
    for t in targets:
        print(f"target: {t['target']:45s} {t['variant']:10s} {t['value']:7.3f}  {'MET' if t['met'] else 'NOT MET'}")
    print(f"wrote {out / f'bench_step_{tag}.json'}" + (f" and .png" if png else ""))


if __name__ == "__main__":
    main()
