"""The demo: the shipped tiny models show ControlNet working, on the CPU, in seconds.

    python -m comfyui_controlnet_core demo [--hint IMAGE] [--prompt TEXT] [--out DIR] [--steps N] [--seed S]

A built-in (or given) image goes through the Canny preprocessor; the shipped base model samples the
prompt with the reference host (`sampler.sample`, Euler + CFG) under five settings:

    no control | strength 0.5 | strength 1.0 | first half only (end_percent 0.5) | two controls

("two controls": the Canny ControlNet on the image plus the same ControlNet on a second built-in
image, combined with `ControlStack`, each at strength 0.75). Each setting is written as a PNG, and all of them, labelled,
with the edge F1 of each output against the hint, into `contact_sheet.png`.

The models (`weights/`) were trained by `train.py` on the procedural shapes of `data.py`; images are
128 x 128, the latent is the tiny autoencoder's 4 x 16 x 16 (`latent.py`), so the hint is at 8x the
latent size as for SD's ControlNets. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import latent
from ..control import Control, ControlSettings, ControlStack
from .data import IMAGE_SIZE, batch_edge_f1, builtin_scene, hint_of, prompt_for, BUILTIN_SCENES
from ..loader import load_controlnet
from .sheet import contact_sheet
from .text import TextEncoder, unknown_words, VOCAB
from .train import AE_FILE, BASE_FILE, CONTROLNET_FILE, TEXT_FILE, WEIGHTS_DIR, load_unet

DEFAULT_SCENE, SECOND_SCENE = "circle-square", "star"
DEFAULT_CFG = 3.0
# Two controls add their residuals; at full strength each, the sum overshoots what the ControlNet was
# trained to add, so the combined column runs both at 0.75 (as users lower strengths when stacking).
COMBINED_STRENGTH = 0.75


@dataclass
class DemoModels:
    ae: Any
    unet: Any
    text: TextEncoder
    controlnet: Any


def load_models(weights: str | Path | None = None, device: str | torch.device = "cpu") -> DemoModels:
    """The shipped autoencoder, base UNet, text encoder and Canny ControlNet (float32 on `device`)."""
    folder = Path(weights) if weights is not None else WEIGHTS_DIR
    missing = [f for f in (AE_FILE, BASE_FILE, TEXT_FILE, CONTROLNET_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo model files {', '.join(missing)} are missing in {folder}; reinstall the package or train them "
            "with `python -m comfyui_controlnet_core.controlnet_core.tiny.train base|controlnet` (see docs/training.md)"
        )
    ae = latent.TinyAutoencoder.load(str(folder / AE_FILE), device)
    unet = load_unet(folder / BASE_FILE, device)
    text = TextEncoder.load(str(folder / TEXT_FILE), device)
    cn = load_controlnet(str(folder / CONTROLNET_FILE), device=device, dtype=torch.float32)
    return DemoModels(ae, unet, text, cn)


def load_image(path: str | Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """Any image file -> uint8 RGB (size, size, 3): centre-cropped to a square, then resized."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8).copy()


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, width: int = 30, stream: Any = None):
        self.total, self.width, self.done = max(1, total), width, 0
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.time()
        self.label = ""
        self._last_label: str | None = None

    def step(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        frac = self.done / self.total
        if not self._tty():
            # A log file or CI gets one line per run, not hundreds of carriage-return frames.
            if self.label != self._last_label:
                self._last_label = self.label
                self.stream.write(f"{frac * 100:5.1f}% {time.time() - self.t0:5.1f}s {self.label}\n")
                self.stream.flush()
            return
        bar = "#" * round(frac * self.width) + "-" * (self.width - round(frac * self.width))
        self.stream.write(f"\r[{bar}] {frac * 100:5.1f}% {time.time() - self.t0:5.1f}s {self.label:<28}")
        self.stream.flush()

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def close(self) -> None:
        if self._tty():
            self.stream.write("\n")
            self.stream.flush()


@torch.no_grad()
def generate(models: DemoModels, prompt: str, *, control: Any = None, seeds: list[int], steps: int,
             cfg: float = DEFAULT_CFG, progress: Progress | None = None) -> np.ndarray:
    """uint8 (len(seeds), 128, 128, 3): one sample per seed (noise from `torch.Generator(seed)`)."""
    from ..sampler import sample

    device = next(models.unet.parameters()).device
    noise = torch.cat([
        torch.randn((1, models.unet.config.in_channels, IMAGE_SIZE // 8, IMAGE_SIZE // 8),
                    generator=torch.Generator().manual_seed(s))
        for s in seeds
    ]).to(device)
    ctx = models.text.encode([prompt])
    unc = models.text.encode([""])
    cb = (lambda i, n: progress.step()) if progress is not None else None
    lat = sample(models.unet, noise, ctx, unc, steps=steps, cfg=cfg, control=control, callback=cb)
    return latent.to_uint8(models.ae.decode(lat))


def run_settings(models: DemoModels, image: np.ndarray, prompt: str, *, second: np.ndarray, seeds: list[int],
                 steps: int, cfg: float = DEFAULT_CFG, progress: Progress | None = None,
                 combined_prompt: str | None = None) -> dict[str, np.ndarray]:
    """Every demo setting -> uint8 images (len(seeds), H, W, 3)."""
    cn = models.controlnet
    hint = latent.hint_from_uint8(hint_of(image)[None])
    hint2 = latent.hint_from_uint8(hint_of(second)[None])
    settings = {
        "no control": None,
        "strength 0.5": Control(cn, hint, ControlSettings(strength=0.5)),
        "strength 1.0": Control(cn, hint, ControlSettings(strength=1.0)),
        "first half (end 0.5)": Control(cn, hint, ControlSettings(strength=1.0, end_percent=0.5)),
        "two controls": ControlStack([Control(cn, hint, ControlSettings(strength=COMBINED_STRENGTH)),
                                      Control(cn, hint2, ControlSettings(strength=COMBINED_STRENGTH))]),
    }
    out = {}
    for name, control in settings.items():
        if progress is not None:
            progress.label = name
        p = combined_prompt if (name == "two controls" and combined_prompt) else prompt
        out[name] = generate(models, p, control=control, seeds=seeds, steps=steps, cfg=cfg, progress=progress)
    return out


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "." else "_" for ch in name).strip("_").replace("__", "_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfyui_controlnet_core demo",
                                description="Sample the shipped tiny models with and without Canny control.")
    p.add_argument("--hint", default=None, help="an image file (its Canny edges are the hint); default: built-in shapes")
    p.add_argument("--prompt", default=None, help="text prompt; words outside the tiny vocabulary are ignored")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--seed", type=int, default=0, help="first seed; each setting is sampled for --rows seeds")
    p.add_argument("--rows", type=int, default=2, help="seeds per setting (rows of the contact sheet)")
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"classifier-free guidance scale (default {DEFAULT_CFG})")
    p.add_argument("--weights", default=None, help="folder with the model files (default: the shipped ones)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rows < 1:
        p.error("--steps and --rows must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.hint is not None:
        image = load_image(args.hint)
        prompt = args.prompt if args.prompt is not None else ""
        combined = None
    else:
        image, scene_prompt = builtin_scene(DEFAULT_SCENE)
        prompt = args.prompt if args.prompt is not None else scene_prompt
        bg, shapes = BUILTIN_SCENES[DEFAULT_SCENE]
        combined = None if args.prompt is not None else prompt_for([*shapes, *BUILTIN_SCENES[SECOND_SCENE][1]], bg)
    second, _ = builtin_scene(SECOND_SCENE)
    unknown = unknown_words(prompt)
    if unknown:
        print(f"note: words outside the demo vocabulary are ignored: {', '.join(sorted(set(unknown)))} "
              f"(known: {', '.join(VOCAB[2:])})", file=sys.stderr)

    models = load_models(args.weights)
    seeds = list(range(args.seed, args.seed + args.rows))
    progress = Progress(5 * args.steps)
    results = run_settings(models, image, prompt, second=second, seeds=seeds, steps=args.steps, cfg=args.cfg,
                           progress=progress, combined_prompt=combined)
    progress.label = "done"
    progress.step(0)
    progress.close()

    hint, second_hint = hint_of(image), hint_of(second)
    hint2 = np.maximum(hint, second_hint)
    from PIL import Image

    Image.fromarray(image).save(out / "input.png")
    Image.fromarray(hint).save(out / "hint.png")
    Image.fromarray(second_hint).save(out / "hint2.png")
    columns: list[tuple[str, np.ndarray, list[str] | None]] = [
        ("input", image[None], None), ("canny hint", hint[None], None)]
    print(f"prompt: {prompt!r}" + (f" (two controls: {combined!r})" if combined else ""))
    for name, imgs in results.items():
        ref = np.repeat((hint2 if name == "two controls" else hint)[None], len(imgs), 0)
        f1 = batch_edge_f1(imgs, ref)
        for seed, im in zip(seeds, imgs):
            Image.fromarray(im).save(out / f"{_slug(name)}_seed{seed}.png")
        columns.append((name, imgs, [f"edge F1 {v:.2f}" for v in f1]))
        print(f"  {name:<22} edge F1 vs hint: " + ", ".join(f"{v:.2f}" for v in f1))
    columns.append(("2nd hint (combined)", hint2[None], None))
    title = f"prompt: {prompt!r}   steps {args.steps}, cfg {args.cfg}, seeds {seeds[0]}..{seeds[-1]}"
    contact_sheet(columns, out / "contact_sheet.png", title)
    print(f"wrote {len(results) * len(seeds) + 3} images and {out / 'contact_sheet.png'} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
