"""One ControlNet evaluation inside real ComfyUI, ComfyUI's built-in control object against ours,
on the CPU. Not a test.

    flock /tmp/comfyui.lock $COMFYUI_VENV/bin/python benchmarks/bench_control_call.py --comfyui /path/to/ComfyUI

Why. `bench_comfyui.py --cpu` times whole sampling steps on a shared machine; this times ONE call of
`get_control` (what ComfyUI's sampler makes once per model call), in-process, on the same weights
and the same x / t / cond for both objects, so the difference can be pinned to the network forward
or to the work around it. Both objects load the same random-weight SD1.5 ControlNet file (written
with ComfyUI's own `comfy.cldm.cldm.ControlNet`, saved in fp16 like the downloaded files), each with
its own loader node (ControlNetLoader; CNCore_LoadControlNet), and are applied with their apply
nodes to the same hint; `pre_run` gets a stand-in model with SD1.5's config and model sampling.

Rows, per latent size (batch 2: cond + uncond, as CFG batches them):
  built-in get_control / ours get_control   the whole call, as the sampler makes it;
  built-in network forward                  `control_model(x, hint, t, context)`: ComfyUI runs the
                                            hint encoder inside it on every call;
  ours network forward                      `control_outputs(...)` with the cached hint embedding;
  ours hint encoder                         what we compute once per run instead (not per call);
  around the network                        get_control with the network replaced by a stub that
                                            returns its precomputed outputs: the hint resize and
                                            cache look-up, casts, scaling, the residual dicts.
How: calls interleaved (built-in, ours, ... per round), `--reps` rounds after one warm-up call each,
median and min per row. With `--threads 1` (default) the clock is the calling thread's CPU time
(`time.thread_time`): time slices taken by other jobs on a shared machine are not counted. With more
threads it is wall-clock time (`perf_counter`). `rel err` = ||ours - built-in|| / ||built-in|| over
all residuals of one call (fp32).

Output: the table on stdout and a markdown section written to `--out` (or appended with --append).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
CN_FILE = "cncore_call_sd15_controlnet.safetensors"


def write_controlnet(folder: Path) -> None:
    """A random-weight SD1.5 ControlNet with ComfyUI's class (bench_comfyui's weights and config)."""
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    from bench_comfyui import UNET, _half_cpu, _randomize
    from comfy.cldm.cldm import ControlNet

    path = folder / CN_FILE
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    kw = {k: v for k, v in UNET["sd15"].items() if k not in ("out_channels", "transformer_depth_output")}
    cn = _randomize(ControlNet(hint_channels=3, dtype=torch.float32, device="cpu",
                               operations=comfy.ops.disable_weight_init, **kw), 4)
    save_file(_half_cpu(cn.state_dict()), str(path))


class StandInModel:
    """What `pre_run` reads of a ComfyUI BaseModel: the SD1.5 config and its model sampling."""

    def __init__(self) -> None:
        import comfy.model_base
        import comfy.supported_models

        self.model_config = comfy.supported_models.SD15({"context_dim": 768, "adm_in_channels": None})
        self.model_sampling = comfy.model_base.model_sampling(self.model_config, comfy.model_base.ModelType.EPS)
        self.diffusion_model = None


def rel_err(a: dict, b: dict) -> float:
    pa = [t for k in ("input", "middle", "output") for t in (a.get(k) or []) if t is not None]
    pb = [t for k in ("input", "middle", "output") for t in (b.get(k) or []) if t is not None]
    assert len(pa) == len(pb), (len(pa), len(pb))
    num = sum(float((x - y).norm() ** 2) for x, y in zip(pa, pb)) ** 0.5
    den = sum(float(y.norm() ** 2) for y in pb) ** 0.5
    return num / den


def measure(comfy_path: str, work: Path, latents: list[int], reps: int, threads: int) -> tuple[list[dict], dict]:
    sys.path.insert(0, comfy_path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch

    import comfy.ldm.modules.diffusionmodules.util as U
    import folder_paths
    import nodes

    torch.set_num_threads(threads)
    clock: Callable[[], float] = time.thread_time if threads == 1 else time.perf_counter
    write_controlnet(work / "controlnet")
    folder_paths.add_model_folder_path("controlnet", str(work / "controlnet"), is_default=True)
    if not asyncio.run(nodes.load_custom_node(str(ROOT))):
        raise RuntimeError("ComfyUI could not load the pack (see the log above)")
    ours_nodes = nodes.NODE_CLASS_MAPPINGS
    builtin = nodes.ControlNetLoader().load_controlnet(CN_FILE)[0]
    ours = ours_nodes["CNCore_LoadControlNet"]().load(CN_FILE)[0]
    bm, net = builtin.control_model, ours.handle.net
    info = {
        "builtin_dtype": str(next(bm.parameters()).dtype), "builtin_manual_cast": str(builtin.manual_cast_dtype),
        "ours_dtype": str(net.dtype), "threads": torch.get_num_threads(), "clock": clock.__name__,
        "torch": torch.__version__,
    }
    model = StandInModel()
    ms = model.model_sampling
    g = torch.Generator().manual_seed(0)
    rows = []
    for lat in latents:
        hint = torch.rand(1, 8 * lat, 8 * lat, 3, generator=g)  # a ComfyUI IMAGE
        pos = [[torch.randn(1, 77, 768, generator=g), {}]]
        neg = [[torch.randn(1, 77, 768, generator=g), {}]]
        cb = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, builtin, hint, 1.0, 0.0, 1.0)[0][0][1]["control"]
        co = ours_nodes["CNCore_ApplyControlNet"]().apply(pos, neg, ours, hint, 1.0, 0.0, 1.0)[0][0][1]["control"]
        for c in (cb, co):
            c.pre_run(model, ms.percent_to_sigma)
        x = torch.randn(2, 4, lat, lat, generator=g)
        t = torch.full((2,), float(ms.percent_to_sigma(0.3)))
        cond = {"c_crossattn": torch.cat([pos[0][0], neg[0][0]])}
        x_in, ts, ctx = ms.calculate_input(t, x), ms.timestep(t).float(), cond["c_crossattn"]

        with torch.no_grad():
            err = rel_err(co.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]}),
                          cb.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]}))
            control = co._cncore_stack.controls[0]
            embedding = control.hint_embedding(lat, lat, x.device)
            ours_hint = control.hint
            cases: dict[str, Callable[[], Any]] = {
                "built-in get_control": lambda: cb.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]}),
                "ours get_control": lambda: co.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]}),
                "built-in network forward": lambda: bm(x=x_in, hint=cb.cond_hint, timesteps=ts, context=ctx),
                "ours network forward": lambda: net.control_outputs(x_in, ts, ctx, None, embedding),
                "built-in hint encoder (in every call)": lambda: bm.input_hint_block(
                    cb.cond_hint, bm.time_embed(U.timestep_embedding(ts, bm.model_channels).to(bm.dtype)), ctx),
                "ours hint encoder (once per run)": lambda: net.embed_hint(ours_hint),
            }
            # the work around the network alone: each object's network replaced by one returning
            # its precomputed outputs (instance attributes shadow the methods; removed below)
            out_b = bm(x=x_in, hint=cb.cond_hint, timesteps=ts, context=ctx)
            out_o = net.control_outputs(x_in, ts, ctx, None, embedding)
            stub_b, stub_o = (lambda *a, **k: out_b), (lambda *a, **k: out_o)

            def around(obj: Any, name: str, stub: Any, call: Callable[[], Any]) -> Callable[[], Any]:
                def run() -> Any:
                    setattr(obj, name, stub)
                    try:
                        return call()
                    finally:
                        delattr(obj, name)
                return run

            cases["built-in around the network"] = around(bm, "forward", stub_b, cases["built-in get_control"])
            cases["ours around the network"] = around(net, "control_outputs", stub_o, cases["ours get_control"])
            for f in cases.values():  # warm-up
                f()
            times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(reps):
                for name, f in cases.items():
                    t0 = clock()
                    f()
                    times[name].append(clock() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        mins = {k: min(v) for k, v in times.items()}
        for k in cases:
            rows.append({"latent": lat, "row": k, "median_ms": 1000 * med[k], "min_ms": 1000 * mins[k], "err": None})
        rows.append({"latent": lat, "row": "ours / built-in, get_control", "ratio": med["ours get_control"] / med["built-in get_control"],
                     "err": err})
        for c in (cb, co):
            c.cleanup()
    return rows, info


def table(rows: list[dict]) -> str:
    out = ["| latent (px) | row | median ms | min ms |", "|---|---|---|---|"]
    for r in rows:
        size = f"{r['latent']}x{r['latent']} ({8 * r['latent']})"
        if "ratio" in r:
            out.append(f"| {size} | **{r['row']}** | **x{r['ratio']:.3f}** | rel err {r['err']:.1e} |")
        else:
            mn = "-" if r["min_ms"] is None else f"{r['min_ms']:.1f}"
            out.append(f"| {size} | {r['row']} | {r['median_ms']:.1f} | {mn} |")
    return "\n".join(out)


def machine_line(comfy_path: str, info: dict) -> str:
    from bench_comfyui import _git
    from measure import machine

    def git(path: str) -> str:
        return _git(path) or "unknown"

    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (f"{machine()}; torch {info['torch']}, {info['threads']} thread(s), clock `{info['clock']}`; "
            f"ComfyUI `{git(comfy_path)}`, pack `{git(str(ROOT))}`{' + local changes' if dirty else ''}; "
            f"weights: built-in {info['builtin_dtype']} (manual cast {info['builtin_manual_cast']}), "
            f"ours {info['ours_dtype']}; {datetime.date.today().isoformat()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout (or COMFYUI_PATH)")
    p.add_argument("--latents", type=int, nargs="+", default=[8, 32], help="latent sides (8 = 64 px)")
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds per latent size")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: thread CPU time; more: wall time)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cncore_call_work"), help="model folder")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "control_call_cpu.md"))
    p.add_argument("--append", action="store_true", help="append a section to --out instead of replacing it")
    p.add_argument("--title", default="get_control, built-in vs ours", help="the section's heading")
    a = p.parse_args(argv)
    if not a.comfyui:
        p.error("give --comfyui or set COMFYUI_PATH")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    rows, info = measure(a.comfyui, Path(a.work), a.latents, a.reps, a.threads)
    command = shlex.join(["python", "benchmarks/bench_control_call.py", *(argv if argv is not None else sys.argv[1:])])
    text = (f"## {a.title}\n\n{machine_line(a.comfyui, info)}\n\nRun: `{command}` (median of {a.reps} "
            f"interleaved rounds, SD1.5 ControlNet, batch 2, fp32)\n\n{table(rows)}\n")
    print(text)
    out = Path(a.out)
    if a.append and out.exists():
        out.write_text(out.read_text().rstrip("\n") + "\n\n" + text)
    else:
        out.write_text("# One ControlNet call in real ComfyUI on the CPU: built-in vs ours\n\n"
                       "Made by `benchmarks/bench_control_call.py` (see its docstring for what each row is).\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
