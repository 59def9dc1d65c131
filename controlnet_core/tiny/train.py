"""Train the demo models: a tiny base diffusion model, then a Canny ControlNet on top of it.

    python -m comfyui_controlnet_core.controlnet_core.tiny.train base       --steps 20000 --batch 128 --out runs/demo
    python -m comfyui_controlnet_core.controlnet_core.tiny.train controlnet --steps 20000 --batch 128 --out runs/demo
    python -m comfyui_controlnet_core.controlnet_core.tiny.train plot --out docs/loss_curve.png runs/demo

`autoencoder` trains the tiny image autoencoder (`latent.py`: 128 px RGB <-> 4 x 16 x 16, SD's 8x
geometry). `base` trains the reference `UNet` (tiny config, `TINY`) and the `TextEncoder` jointly on the
training scenes in that latent space (`--data drawn`, the default: `drawn.training_scene`, 70 %
drawn-style scenes and 30 % classic filled ones; `--data procedural`: only the classic `data.py`
scenes the shipped models were trained on): epsilon prediction on
SD's discrete schedule, 10 % empty prompts (for classifier-free guidance), AdamW, an EMA of the
weights (the EMA is what is saved). `controlnet` follows the paper: the base UNet and text encoder
frozen, the ControlNet initialised as a copy of the base encoder + middle block with its zero convs
(and the hint encoder's last conv) at zero, the epsilon MSE through the frozen UNet, 50 % of
prompts replaced by the empty prompt, AdamW. Both use CUDA when present (`--device auto`), bf16
autocast there (`--amp`), and stop at `--steps` or `--minutes`, whichever comes first.

Outputs in `--out`: `autoencoder.safetensors` (autoencoder), `base_unet.safetensors` + `text_encoder.safetensors` (base) or
`controlnet_canny.safetensors` (ControlNet; the original ControlNet key layout via
`loader.save_controlnet`, so our loader and ComfyUI's load it), and `history_<mode>.json` (loss per
`--log-every` steps; for the ControlNet also the validation edge F1 every `--eval-every` steps, the
measure of "sudden convergence"; with `--data drawn` it is measured on user-style drawings of a seed
the fixed evaluation does not use). The fixed evaluation is `evaluate.py`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import latent
from ..config import SD15, ControlNetConfig
from .data import Batch, random_scene, validation_batch
from ..formats.files import read_safetensors, write_safetensors
from ..host import unet_control
from ..model import ControlNet
from ..schedule import DiscreteSchedule
from .sheet import contact_sheet
from .text import CONTEXT_DIM, TextEncoder
from ..unet import UNet

# The demo architecture: SD1.5's block structure at toy width, on 4-channel latents (16 x 16 for a
# 128 px image): widths 64/64/128 at 16/8/4 cells, attention at the two lower levels, 4.9 M
# parameters (ControlNet 2.4 M). 7 ControlNet residuals (6 skips + middle).
TINY = dataclasses.replace(
    SD15,
    model_channels=64,
    channel_mult=(1, 1, 2),
    num_res_blocks=1,
    transformer_depth=(0, 1, 1),
    transformer_depth_middle=1,
    context_dim=CONTEXT_DIM,
    num_heads=4,
    in_channels=latent.LATENT_CHANNELS,
    hint_block_channels=(16, 32, 64, 128),
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
AE_FILE, BASE_FILE, TEXT_FILE = "autoencoder.safetensors", "base_unet.safetensors", "text_encoder.safetensors"
CONTROLNET_FILE = "controlnet_canny.safetensors"
UNET_META_KEY = "controlnet_core.unet_config"


# ------------------------------------------------------------------------------------------------
# model files

def save_unet(unet: UNet, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """The base UNet with LDM key names (no `model.diffusion_model.` prefix) and its config in the metadata."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in unet.state_dict().items()}
    meta = {"format": "pt", UNET_META_KEY: json.dumps({**dataclasses.asdict(unet.config), "out_channels": unet.out_channels})}
    write_safetensors(sd, path, meta)


def load_unet(path: str | os.PathLike, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> UNet:
    sd, meta = read_safetensors(Path(path), cast=lambda t: t.to(dtype))
    meta = json.loads(meta[UNET_META_KEY])
    out_channels = meta.pop("out_channels")
    cfg = ControlNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()})
    unet = UNet(cfg, out_channels=out_channels, dtype=dtype)
    unet.load_state_dict(sd)
    return unet.to(device).eval()


def controlnet_from_unet(unet: UNet) -> ControlNet:
    """A ControlNet of the UNet's config whose encoder + middle block (and time embedding) are copies of
    the UNet's; zero convs and the hint encoder's last conv stay at zero."""
    cn = ControlNet(unet.config, device=next(unet.parameters()).device)
    missing, unexpected = cn.load_state_dict(unet.state_dict(), strict=False)
    copied = set(cn.state_dict()) - set(missing)
    assert copied and all(not k.startswith(("zero_convs", "middle_block_out", "input_hint_block")) for k in copied)
    assert all(k.startswith(("zero_convs", "middle_block_out", "input_hint_block")) for k in missing), missing
    cn.zero_init()
    return cn


# ------------------------------------------------------------------------------------------------
# training pieces

def pick_device(name: str) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


class Diffusion:
    """Forward noising on SD's discrete schedule and the epsilon-prediction loss."""

    def __init__(self, device: torch.device):
        self.alphas_cumprod = DiscreteSchedule().alphas_cumprod.to(device)

    def noisy(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = x0.shape[0]
        t = torch.randint(0, len(self.alphas_cumprod), (b,), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        a = self.alphas_cumprod[t].view(b, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def drop_prompts(tokens: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace a fraction `p` of the prompts by the empty prompt (all `<pad>`)."""
    keep = torch.rand(tokens.shape[0], device=tokens.device, generator=generator) >= p
    return tokens * keep[:, None]


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up so early copies are not stale
        src = [p for p in module.parameters()]
        dst = [p for p in self.shadow.parameters()]
        torch._foreach_lerp_(dst, src, 1 - d)


DATA_CHOICES = ("drawn", "procedural")
VALIDATION_SEED = 4321  # drawn validation drawings (not the evaluation's seed)


def scene_function(data: str):
    """The scene maker of a `--data` choice (a module-level function: loader workers pickle it)."""
    from .drawn import training_scene

    return {"drawn": training_scene, "procedural": random_scene}[data]


def validation_set(data: str, n: int) -> Batch:
    """The ControlNet's validation images: `n` user-style drawings (drawn) or classic scenes."""
    if data == "procedural":
        return validation_batch(n)
    from .evaluate import drawn_eval_set

    items = drawn_eval_set(VALIDATION_SEED)
    order = [i for k in range(8) for i in range(k, len(items), 8)][:n]  # every group, in turn
    scenes = [items[i][1] for i in order]
    from .data import hint_of

    return Batch(np.stack([s.image for s in scenes]), np.stack([hint_of(s.image) for s in scenes]),
                 [s.prompt for s in scenes])


def make_loader(seed: int, batch: int, device: torch.device, workers: int | None = None, data: str = "drawn"):
    from .data import ShapeStream

    if workers is None:
        workers = 0 if device.type == "cpu" else max(1, min(12, (os.cpu_count() or 2) - 2))
    stream = ShapeStream(seed, batch, scene=scene_function(data))
    if workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=4, persistent_workers=True,
    )
    return iter(loader)


@torch.no_grad()
def to_model_inputs(batch: dict[str, torch.Tensor], device: torch.device, ae: latent.TinyAutoencoder
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images/hints -> (latents, hints in [0,1] BCHW, tokens) on `device`."""
    images = batch["images"].to(device, non_blocking=True)
    hints = batch["hints"].to(device, non_blocking=True)
    x0 = ae.encode(latent.from_uint8(images)).float()
    return x0, latent.hint_from_uint8(hints), batch["tokens"].to(device, non_blocking=True)


def base_loss(unet: UNet, text: TextEncoder, diffusion: Diffusion, x0: torch.Tensor, tokens: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    xt, t, eps = diffusion.noisy(x0, generator)
    pred = unet(xt, t, text(tokens))
    return F.mse_loss(pred.float(), eps)


def controlnet_loss(cn: ControlNet, unet: UNet, context: torch.Tensor, diffusion: Diffusion, x0: torch.Tensor,
                    hint: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    xt, t, eps = diffusion.noisy(x0, generator)
    down, mid = cn(xt, hint, t, context)
    pred = unet(xt, t, context, control=unet_control(down, mid))
    return F.mse_loss(pred.float(), eps)


# ------------------------------------------------------------------------------------------------
# evaluation: sample the validation prompts with and without control, score edge F1

@torch.no_grad()
def sample_images(unet: UNet, text: TextEncoder, ae: latent.TinyAutoencoder, prompts: list[str], *, control: Any = None,
                  steps: int = 12, cfg: float = 3.0, seed: int = 0, callback: Any = None) -> np.ndarray:
    """uint8 (B, 128, 128, 3) images for `prompts` with the reference sampler (fixed noise per seed)."""
    from ..sampler import sample

    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), unet.config.in_channels, 16, 16), generator=g).to(device)
    ctx = text.encode(prompts)
    unc = text.encode([""])
    lat = sample(unet, noise, ctx, unc, steps=steps, cfg=cfg, control=control, callback=callback)
    return latent.to_uint8(ae.decode(lat))


@torch.no_grad()
def validation_f1(unet: UNet, text: TextEncoder, ae: latent.TinyAutoencoder, cn: ControlNet | None, val, *, steps: int = 12, cfg: float = 3.0,
                  seed: int = 0, strength: float = 1.0) -> tuple[float, np.ndarray]:
    """Mean edge F1 (2 px) of samples for the validation prompts against their hints, and the images."""
    from ..control import Control, ControlSettings
    from .data import batch_edge_f1

    device = next(unet.parameters()).device
    control = None
    if cn is not None:
        was_training = cn.training
        cn.eval()
        control = Control(cn, latent.hint_from_uint8(val.hints).to(device), ControlSettings(strength=strength))
    images = sample_images(unet, text, ae, val.prompts, control=control, steps=steps, cfg=cfg, seed=seed)
    if cn is not None and was_training:
        cn.train()
    return float(np.mean(batch_edge_f1(images, val.hints))), images


# ------------------------------------------------------------------------------------------------
# the two training modes

def _log(msg: str) -> None:
    print(msg, flush=True)


def _optimizer(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)


def _lr_at(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / max(1, warmup))


def _fit(name: str, args: argparse.Namespace, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
         history: dict, loss_fn: Any, on_step: Any = None, t0: float | None = None) -> int:
    """The loop the three stages share: linear lr warm-up, `loss_fn()` (which draws its own batch
    and autocasts what it wants to), a clipped optimiser step, the mean loss logged every
    `--log-every` steps; `on_step(step)` runs after each step (EMA, evaluation, checkpoints). Stops
    at `--steps` or `--minutes`, whichever comes first; returns the number of steps taken."""
    t0 = time.time() if t0 is None else t0
    step, acc, n_acc = 0, 0.0, 0
    while step < args.steps and (time.time() - t0) < args.minutes * 60:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.lr, args.warmup)
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc += loss.detach()
        n_acc += 1
        if step % args.log_every == 0 or step == args.steps:
            mean = float(acc) / n_acc
            history["loss"].append({"step": step, "loss": mean, "time": round(time.time() - t0, 2)})
            _log(f"{name} step {step} loss {mean:.4f} ({step / (time.time() - t0):.1f} it/s)")
            acc, n_acc = 0.0, 0
        if on_step is not None:
            on_step(step)
    history["steps"], history["seconds"] = step, round(time.time() - t0, 1)
    return step


def _start(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """What every stage does first: pick the device, seed torch, make the output folder."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return device, out


def train_autoencoder(args: argparse.Namespace) -> dict:
    """The image autoencoder: L1 + MSE reconstruction, noise on the (tanh-bounded) latent; then the
    scale that brings the latents to unit std is measured and stored with the weights."""
    device, out = _start(args)
    ae = latent.TinyAutoencoder().to(device).train()
    opt = _optimizer(ae.parameters(), args.lr, args.weight_decay, device)
    loader = make_loader(args.seed + 2, args.batch, device, args.workers, args.data)
    amp = args.amp and device.type == "cuda"
    _log(f"autoencoder: {sum(p.numel() for p in ae.parameters()) / 1e6:.2f} M params, device {device}, "
         f"batch {args.batch}, amp {amp}, data {args.data}")
    history: dict[str, Any] = {"mode": "autoencoder", "args": vars(args), "loss": []}
    def loss_fn() -> torch.Tensor:
        x = latent.from_uint8(next(loader)["images"].to(device, non_blocking=True))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            z = ae.encode_raw(x)
            rec = ae.decode_raw(z + args.latent_noise * torch.randn_like(z)).float()
            return F.l1_loss(rec, x) + F.mse_loss(rec, x)

    params = list(ae.parameters())
    step = _fit("autoencoder", args, params, opt, history, loss_fn)
    ae.eval()
    val = validation_batch(64, seed=99, scene=scene_function(args.data))
    with torch.no_grad():
        z = ae.encode_raw(latent.from_uint8(torch.from_numpy(val.images).to(device)))
        ae.scale.fill_(1.0 / float(z.float().std()))
        rec = latent.to_uint8(ae.decode(ae.encode(latent.from_uint8(torch.from_numpy(val.images).to(device)))))
    from .data import batch_edge_f1

    history["scale"] = float(ae.scale)
    history["reconstruction_edge_f1"] = float(np.mean(batch_edge_f1(rec, val.hints)))
    history["reconstruction_mse"] = float(((rec.astype(np.float32) - val.images) / 127.5).__pow__(2).mean())
    ae.save(str(out / AE_FILE), torch.float16 if args.fp16 else None)
    _write_json(out / "history_autoencoder.json", history)
    contact_sheet([("data", val.images[:8], None), ("decoded", rec[:8], None)], out / "autoencoder_reconstructions.png",
                  scale=1)
    _log(f"autoencoder: {step} steps in {history['seconds']} s, scale {history['scale']:.3f}, reconstruction "
         f"edge F1 {history['reconstruction_edge_f1']:.3f}, mse {history['reconstruction_mse']:.4f} -> {out}")
    return history


def train_base(args: argparse.Namespace) -> dict:
    device, out = _start(args)
    ae = latent.TinyAutoencoder.load(str((Path(args.base) if args.base else out) / AE_FILE), device).requires_grad_(False)
    unet = UNet(TINY).to(device).train()
    text = TextEncoder().to(device).train()
    params = [*unet.parameters(), *text.parameters()]
    opt = _optimizer(params, args.lr, args.weight_decay, device)
    ema_unet, ema_text = EMA(unet, args.ema), EMA(text, args.ema)
    diffusion = Diffusion(device)
    loader = make_loader(args.seed, args.batch, device, args.workers, args.data)
    amp = args.amp and device.type == "cuda"
    n_params = sum(p.numel() for p in unet.parameters())
    _log(f"base: UNet {n_params / 1e6:.2f} M params, text encoder {sum(p.numel() for p in text.parameters()) / 1e6:.3f} M, "
         f"device {device}, batch {args.batch}, amp {amp}, data {args.data}")
    history: dict[str, Any] = {"mode": "base", "args": vars(args), "loss": []}

    def save() -> None:
        save_unet(ema_unet.shadow, out / BASE_FILE, torch.float16 if args.fp16 else None)
        ema_text.shadow.save(str(out / TEXT_FILE), torch.float16 if args.fp16 else None)
        _write_json(out / "history_base.json", history)
        if (Path(args.base) if args.base else out) != out:
            ae.save(str(out / AE_FILE), torch.float16 if args.fp16 else None)

    def loss_fn() -> torch.Tensor:
        x0, _, tokens = to_model_inputs(next(loader), device, ae)
        tokens = drop_prompts(tokens, args.drop_prompt)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return base_loss(unet, text, diffusion, x0, tokens)

    def on_step(step: int) -> None:
        ema_unet.update(unet, step - 1)
        ema_text.update(text, step - 1)
        if args.save_every and step % args.save_every == 0:
            save()

    step = _fit("base", args, params, opt, history, loss_fn, on_step)
    save()
    val = validation_batch(args.val_size, scene=scene_function(args.data))
    _, images = validation_f1(ema_unet.shadow, ema_text.shadow, ae, None, val, steps=args.eval_steps, cfg=args.cfg)
    contact_sheet([("data", val.images, None), ("samples", images, None)], out / "base_samples.png", scale=1)
    _log(f"base: {step} steps in {history['seconds']} s -> {out}")
    return history


def train_controlnet(args: argparse.Namespace) -> dict:
    from ..loader import save_controlnet

    device, out = _start(args)
    base_dir = Path(args.base) if args.base else out
    ae = latent.TinyAutoencoder.load(str(base_dir / AE_FILE), device).requires_grad_(False)
    unet = load_unet(base_dir / BASE_FILE, device).requires_grad_(False).eval()
    text = TextEncoder.load(str(base_dir / TEXT_FILE), device).requires_grad_(False).eval()
    cn = controlnet_from_unet(unet).to(device).train()
    opt = _optimizer(cn.parameters(), args.lr, args.weight_decay, device)
    diffusion = Diffusion(device)
    loader = make_loader(args.seed + 1, args.batch, device, args.workers, args.data)
    amp = args.amp and device.type == "cuda"
    val = validation_set(args.data, args.val_size)
    _log(f"controlnet: {sum(p.numel() for p in cn.parameters()) / 1e6:.2f} M params, device {device}, "
         f"batch {args.batch}, amp {amp}, data {args.data}")
    history: dict[str, Any] = {"mode": "controlnet", "args": vars(args), "loss": [], "f1": []}
    strip: list[np.ndarray] = []

    def evaluate(step: int) -> None:
        te = time.time()
        f1, images = validation_f1(unet, text, ae, cn, val, steps=args.eval_steps, cfg=args.cfg)
        history["f1"].append({"step": step, "f1": f1, "time": round(time.time() - t0, 2)})
        strip.append(images[: args.strip_images])
        _log(f"controlnet step {step} validation edge F1 {f1:.3f} ({time.time() - te:.1f} s)")

    def save() -> None:
        save_controlnet(cn, out / CONTROLNET_FILE, dtype=torch.float16 if args.fp16 else None)
        _write_json(out / "history_controlnet.json", history)

    t0 = time.time()
    with torch.no_grad():
        empty = text.encode([""])
    if args.eval_every:
        evaluate(0)  # zero convs: exactly the base model, i.e. the "without control" score

    def loss_fn() -> torch.Tensor:
        x0, hint, tokens = to_model_inputs(next(loader), device, ae)
        with torch.no_grad():
            context = text(tokens)
            drop = torch.rand(tokens.shape[0], device=device) < args.drop_prompt
            context = torch.where(drop[:, None, None], empty.expand_as(context), context)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return controlnet_loss(cn, unet, context, diffusion, x0, hint)

    def on_step(step: int) -> None:
        if args.eval_every and step % args.eval_every == 0:
            evaluate(step)
        if args.save_every and step % args.save_every == 0:
            save()

    step = _fit("controlnet", args, list(cn.parameters()), opt, history, loss_fn, on_step, t0=t0)
    if args.eval_every and (not history["f1"] or history["f1"][-1]["step"] != step):
        evaluate(step)
    history["sudden_convergence_step"] = sudden_convergence_step(history["f1"])
    save()
    if strip:
        contact_sheet([(f"step {e['step']}", imgs, None) for imgs, e in zip(strip, history["f1"])],
                      out / "convergence.png", scale=1)
    _log(f"controlnet: {step} steps in {history['seconds']} s -> {out}; "
         f"sudden convergence at step {history['sudden_convergence_step']}")
    return history


def sudden_convergence_step(f1: list[dict]) -> int | None:
    """The first evaluated step whose validation F1 has covered half of the way from the start
    (no control) to the best value reached, provided the rise is substantial (> 0.15)."""
    if len(f1) < 2:
        return None
    start, best = f1[0]["f1"], max(e["f1"] for e in f1)
    if best - start < 0.15:
        return None
    return next(e["step"] for e in f1 if e["f1"] >= start + 0.5 * (best - start))


# ------------------------------------------------------------------------------------------------
# outputs: JSON, the convergence strip, the loss-curve plot (Pillow only)

def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def plot_histories(base: dict | None, control: dict | None, path: str | os.PathLike, autoencoder: dict | None = None) -> None:
    """One PNG, three panels: autoencoder loss; base and ControlNet eps MSE (log scales); the
    ControlNet's validation edge F1 against its training step, with the sudden-convergence step."""
    from PIL import Image, ImageDraw

    W, H, pad = 1500, 380, 56
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pw = (W - 4 * pad) // 3
    ph = H - 2 * pad

    def panel(i: int, title: str, curves: list[tuple[str, list[tuple[float, float]], tuple]], log: bool,
              y_range: tuple[float, float] | None = None) -> Any:
        x0 = pad + i * (pw + pad)
        d.rectangle([x0, pad, x0 + pw, H - pad], outline="black")
        d.text((x0, pad - 30), title, fill="black")
        pts = [p for _, c, _ in curves for p in c if not log or p[1] > 0]
        if not pts:
            return None
        smax = max(1.0, max(s for s, _ in pts))
        f = (lambda v: math.log10(v)) if log else (lambda v: v)
        lo, hi = y_range if y_range else (f(min(v for _, v in pts)), f(max(v for _, v in pts)))
        hi = max(hi, lo + 1e-3)

        def xy(s: float, v: float) -> tuple[float, float]:
            return (x0 + s / smax * pw, H - pad - (f(v) - lo) / (hi - lo) * ph)

        for k, (name, c, col) in enumerate(curves):
            c = [p for p in c if not log or p[1] > 0]
            if len(c) > 1:
                d.line([xy(*p) for p in c], fill=col, width=2)
            if not log:
                for p in c:
                    x, y = xy(*p)
                    d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=col)
            d.text((x0 + pw - 150, pad + 6 + 14 * k), name, fill=col)
        for v in (lo, (lo + hi) / 2, hi):
            val = 10 ** v if log else v
            d.text((x0 - 44, H - pad - (v - lo) / (hi - lo) * ph - 6), f"{val:.3f}" if log else f"{val:.1f}", fill="black")
        d.text((x0, H - pad + 4), "0", fill="black")
        d.text((x0 + pw - 40, H - pad + 4), f"{int(smax)}", fill="black")
        d.text((x0 + pw // 2 - 20, H - pad + 18), "step", fill="black")
        return xy

    if autoencoder:
        panel(0, "autoencoder loss (L1 + MSE, log scale)",
              [("autoencoder", [(e["step"], e["loss"]) for e in autoencoder["loss"]], (40, 150, 60))], True)
    curves = []
    if base:
        curves.append(("base UNet", [(e["step"], e["loss"]) for e in base["loss"]], (40, 90, 200)))
    if control:
        curves.append(("ControlNet", [(e["step"], e["loss"]) for e in control["loss"]], (210, 60, 40)))
    panel(1, "diffusion loss (eps MSE, log scale)", curves, True)
    if control and control.get("f1"):
        xy = panel(2, "ControlNet validation edge F1 (2 px), sampled", [
            ("edge F1", [(e["step"], e["f1"]) for e in control["f1"]], (210, 60, 40))], False, (0.0, 1.0))
        sc = control.get("sudden_convergence_step")
        if sc is not None and xy is not None:
            x, _ = xy(sc, 0.0)
            d.line([(x, pad), (x, H - pad)], fill=(150, 150, 150), width=1)
            d.text((x + 4, pad + 24), f"sudden convergence ~ step {sc}", fill=(90, 90, 90))
    img.save(path)


# ------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m comfyui_controlnet_core.controlnet_core.tiny.train",
                                description="Train the tiny demo base model or its Canny ControlNet.")
    p.add_argument("mode", choices=("autoencoder", "base", "controlnet", "plot"))
    p.add_argument("inputs", nargs="*", help="plot: run folders holding history_*.json")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--minutes", type=float, default=float("inf"), help="stop after this much wall time")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="runs/demo", help="output folder (plot: the PNG path)")
    p.add_argument("--base", default=None, help="folder with the earlier stages' files (default --out)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", choices=DATA_CHOICES, default="drawn",
                   help="training scenes: drawn (drawn-style + classic mix, default) or procedural (classic only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="default 3e-4 (base), 1e-4 (controlnet)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--latent-noise", type=float, default=0.05, help="autoencoder: noise std on the latent")
    p.add_argument("--ema", type=float, default=0.999, help="base: EMA decay of the saved weights")
    p.add_argument("--drop-prompt", type=float, default=None, help="default 0.1 (base), 0.5 (controlnet)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False, help="store weights as fp16")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: 0 on CPU)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250, help="controlnet: validation F1 every N steps (0: off)")
    p.add_argument("--eval-steps", type=int, default=12, help="sampler steps of the validation samples")
    p.add_argument("--cfg", type=float, default=3.0, help="CFG scale of the validation samples")
    p.add_argument("--val-size", type=int, default=8)
    p.add_argument("--strip-images", type=int, default=2)
    args = p.parse_intermixed_args(argv)
    if args.lr is None:
        args.lr = {"autoencoder": 1e-3, "base": 3e-4}.get(args.mode, 1e-4)
    if args.drop_prompt is None:
        args.drop_prompt = 0.1 if args.mode == "base" else 0.5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "autoencoder":
        train_autoencoder(args)
    elif args.mode == "base":
        train_base(args)
    elif args.mode == "controlnet":
        train_controlnet(args)
    else:
        hists: dict[str, dict] = {}
        for folder in args.inputs or ["."]:
            for mode in ("autoencoder", "base", "controlnet"):
                f = Path(folder) / f"history_{mode}.json"
                if f.exists():
                    hists[mode] = json.loads(f.read_text())
        if not hists:
            print(f"no history_*.json in {args.inputs}", file=sys.stderr)
            return 1
        plot_histories(hists.get("base"), hists.get("controlnet"), args.out, hists.get("autoencoder"))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
