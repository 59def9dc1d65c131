"""The demo: the shipped tiny models show ControlNet working, on the CPU, in seconds.

    python -m comfyui_controlnet_core demo [--hint IMAGE [--hint2 IMAGE]] [--prompt TEXT] [--out DIR] ...

A built-in (or given) image is centre-cropped, resized to 128 px and goes through the Canny
preprocessor; the shipped base model samples the prompt with the reference host
(`sampler.sample`, Euler + CFG) under five settings:

    no control | strength 0.5 | strength 1.0 | first half only (end_percent 0.5) | two controls

("two controls": the Canny ControlNet on the hint plus the same ControlNet on a second hint, combined
with `ControlStack`, each at strength 0.75. The second hint is made from the user's own picture (its
blurred Canny, or `--hint2`), or, for the built-in picture, a second built-in one.) Each setting is
written as a PNG, and all of them, labelled, with the edge F1 of each output against the hint, into
`contact_sheet.png`. Every input is checked before anything is written; a bad one is answered in
one sentence with exit code 2.

The models (`weights/`) were trained by `train.py` on the procedural shapes of `data.py`; images are
128 x 128, the latent is the tiny autoencoder's 4 x 16 x 16 (`latent.py`), so the hint is at 8x the
latent size as for SD's ControlNets. See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import latent
from ..control import Control, ControlSettings, ControlStack
from .data import BUILTIN_SCENES, CANNY_HIGH, CANNY_LOW, IMAGE_SIZE, batch_edge_f1, builtin_scene, hint_of, prompt_for
from ..loader import load_controlnet
from .sheet import contact_sheet
from .text import TextEncoder
from .train import AE_FILE, BASE_FILE, CONTROLNET_FILE, TEXT_FILE, WEIGHTS_DIR, load_unet

DEFAULT_SCENE, SECOND_SCENE = "circle-square", "star"
# The second control of "two controls" for a user's --hint (without --hint2): the same picture's
# coarse outline, i.e. its Canny after a blur, at lower thresholds (a blurred edge is weaker).
SECOND_HINT_BLUR, SECOND_HINT_THRESHOLDS = 2.0, (50, 100)
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


def run_settings(models: DemoModels, hint: np.ndarray, prompt: str, *, second_hint: np.ndarray, seeds: list[int],
                 steps: int, cfg: float = DEFAULT_CFG, progress: Progress | None = None,
                 combined_prompt: str | None = None) -> dict[str, np.ndarray]:
    """Every demo setting -> uint8 images (len(seeds), H, W, 3), from uint8 (H, W, 3) hints."""
    cn = models.controlnet
    first, second = latent.hint_from_uint8(hint[None]), latent.hint_from_uint8(second_hint[None])
    settings = {
        "no control": None,
        "strength 0.5": Control(cn, first, ControlSettings(strength=0.5)),
        "strength 1.0": Control(cn, first, ControlSettings(strength=1.0)),
        "first half (end 0.5)": Control(cn, first, ControlSettings(strength=1.0, end_percent=0.5)),
        "two controls": ControlStack([Control(cn, first, ControlSettings(strength=COMBINED_STRENGTH)),
                                      Control(cn, second, ControlSettings(strength=COMBINED_STRENGTH))]),
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


class DemoInputError(Exception):
    """A demo option that cannot be used: the message is one sentence for the terminal."""


def read_image_option(option: str, path: str) -> np.ndarray:
    """`load_image(path)`, or a DemoInputError that names the option, the file and what to give instead."""
    p = Path(path)
    if not p.exists():
        raise DemoInputError(f"{option} {path!r}: no such file; give the path of an image file (PNG, JPEG, ...)")
    if p.is_dir():
        raise DemoInputError(f"{option} {path!r} is a folder; give one image file (PNG, JPEG, ...) inside it")
    try:
        return load_image(p)
    except Exception as e:  # PIL: UnidentifiedImageError, truncated data, decompression bombs, ...
        raise DemoInputError(
            f"{option} {path!r} is not an image this demo can read ({type(e).__name__}); give a PNG or JPEG "
            "picture, e.g. white lines drawn on black"
        ) from None


def second_hint_of(image: np.ndarray) -> np.ndarray:
    """The demo's second hint for a user image: Canny of the image after a Gaussian blur of
    SECOND_HINT_BLUR px, at SECOND_HINT_THRESHOLDS: the coarse outline of the same picture."""
    from ...preprocessors import canny

    return canny(image, *SECOND_HINT_THRESHOLDS, blur=SECOND_HINT_BLUR)


def vocabulary(weights: str | Path | None = None, vocab: Sequence[str] | None = None) -> str:
    """The words the text encoder in `weights` (default: the shipped one) was trained with, read from
    its file's metadata without loading it (or `vocab`, a loaded encoder's `.vocab`), and the accepted
    aliases (`text.py`)."""
    from . import text
    from ..formats.files import read_header

    if vocab is None:
        vocab = text.VOCAB
        try:
            meta = read_header(Path(weights or WEIGHTS_DIR) / TEXT_FILE)[1]
            vocab = tuple(json.loads(meta[TextEncoder.META_KEY])["vocab"])
        except Exception:  # no or an unreadable encoder: the loader says so when the demo runs
            pass
    known = [w for w in vocab if not w.startswith("<")]
    aliases = {a: w for a, w in getattr(text, "ALIASES", {}).items() if w in vocab}
    out = ", ".join(known)
    if aliases:
        out += "; also " + ", ".join(f"{a} (= {w})" for a, w in sorted(aliases.items()))
    return out


def _parser() -> argparse.ArgumentParser:
    import textwrap

    size = IMAGE_SIZE
    paragraphs = [
        "Sample the shipped tiny text-to-image model with and without its Canny ControlNet, on the CPU, in "
        "seconds. Five settings (columns): no control, strength 0.5, strength 1.0, the first half of the steps "
        f"only, and two controls combined (strength {COMBINED_STRENGTH:g} each). Writes each image, the hints and "
        "contact_sheet.png (every output labelled with its edge F1 against the hint).",
        f"The hint: the --hint image is centre-cropped to a square, resized to {size}x{size} px (the tiny model's "
        f"only size) and passed through Canny edge detection (thresholds {CANNY_LOW}/{CANNY_HIGH}), as the "
        "ControlNet was trained. Canny marks where brightness changes, so a white outline drawn on black becomes "
        "a double edge (both sides of the line); a filled shape gives its single outline.",
        "\"two controls\" adds a second hint: with --hint, the --hint2 image, or else the same image's Canny "
        f"after a {SECOND_HINT_BLUR:g} px blur at thresholds {SECOND_HINT_THRESHOLDS[0]}/{SECOND_HINT_THRESHOLDS[1]} "
        "(its coarse outline); without --hint, a second built-in picture (a yellow star).",
    ]
    description = "\n\n".join(textwrap.fill(t, 100) for t in paragraphs)
    epilog = textwrap.fill(
        "Vocabulary of the tiny text encoder (other words are ignored, with a note): " + vocabulary() + ".", 100
    ) + "\n\nExample: python -m comfyui_controlnet_core demo --hint my_drawing.png --prompt \"a red star\"\n"

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def __init__(self, prog: str) -> None:
            super().__init__(prog, max_help_position=26, width=100)

    p = argparse.ArgumentParser(prog="python -m comfyui_controlnet_core demo", description=description,
                                epilog=epilog, formatter_class=Formatter)
    p.add_argument("--hint", metavar="IMAGE", default=None,
                   help=f"an image file whose Canny edges are the hint (centre-cropped, resized to {size} px); "
                        "default: a built-in picture of a red circle and a blue square")
    p.add_argument("--hint2", metavar="IMAGE", default=None,
                   help="with --hint: the image of the second control in \"two controls\"; default: the --hint "
                        "image's blurred Canny (see above)")
    p.add_argument("--prompt", metavar="TEXT", default=None,
                   help="text prompt (see the vocabulary below); default: the built-in picture's caption, or \"\" "
                        "(no prompt) with --hint")
    p.add_argument("--out", metavar="DIR", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--steps", metavar="N", type=int, default=20, help="sampling steps, Euler (default: 20)")
    p.add_argument("--seed", metavar="S", type=int, default=0,
                   help="first seed; each setting is sampled for --rows seeds from S on (default: 0)")
    p.add_argument("--rows", metavar="N", type=int, default=2, help="seeds per setting, rows of the sheet (default: 2)")
    p.add_argument("--cfg", metavar="SCALE", type=float, default=DEFAULT_CFG,
                   help=f"classifier-free guidance scale (default: {DEFAULT_CFG:g})")
    p.add_argument("--weights", metavar="DIR", default=None,
                   help="folder with the four model files (default: the shipped ones, controlnet_core/tiny/weights)")
    p.add_argument("--threads", metavar="N", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, usually the number of cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.steps < 1 or args.rows < 1:
        p.error("--steps and --rows must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.hint2 is not None and args.hint is None:
        p.error("--hint2 goes with --hint (without --hint the demo uses its two built-in pictures)")
    try:
        return _run(args)
    except DemoInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    t0 = time.time()
    # Every input is read before anything is written: a bad --hint leaves no empty output folder.
    if args.hint is not None:
        image = read_image_option("--hint", args.hint)
        second = read_image_option("--hint2", args.hint2) if args.hint2 is not None else None
        second_hint = hint_of(second) if second is not None else second_hint_of(image)
        prompt = args.prompt if args.prompt is not None else ""
        combined = None
    else:
        image, scene_prompt = builtin_scene(DEFAULT_SCENE)
        second, _ = builtin_scene(SECOND_SCENE)
        second_hint = hint_of(second)
        prompt = args.prompt if args.prompt is not None else scene_prompt
        bg, shapes = BUILTIN_SCENES[DEFAULT_SCENE]
        combined = None if args.prompt is not None else prompt_for([*shapes, *BUILTIN_SCENES[SECOND_SCENE][1]], bg)
    try:
        models = load_models(args.weights)
    except FileNotFoundError as e:
        raise DemoInputError(str(e)) from None
    unknown = models.text.unknown_words(prompt)  # the words *this* encoder was trained with
    if unknown:
        print(f"note: words outside the demo vocabulary are ignored: {', '.join(sorted(set(unknown)))} "
              f"(known: {vocabulary(vocab=models.text.vocab)})", file=sys.stderr)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoInputError(f"--out {args.out!r}: cannot make the output folder ({e.strerror or e}); "
                             "give a folder you can write to") from None
    if args.threads:
        torch.set_num_threads(args.threads)

    seeds = list(range(args.seed, args.seed + args.rows))
    hint = hint_of(image)
    progress = Progress(5 * args.steps)
    results = run_settings(models, hint, prompt, second_hint=second_hint, seeds=seeds, steps=args.steps,
                           cfg=args.cfg, progress=progress, combined_prompt=combined)
    progress.label = "done"
    progress.step(0)
    progress.close()

    both = np.maximum(hint, second_hint)
    from PIL import Image

    Image.fromarray(image).save(out / "input.png")
    Image.fromarray(hint).save(out / "hint.png")
    Image.fromarray(second_hint).save(out / "hint2.png")
    columns: list[tuple[str, np.ndarray, list[str] | None]] = [
        ("input", image[None], None), ("canny hint", hint[None], None)]
    print(f"prompt: {prompt!r}" + (f" (two controls: {combined!r})" if combined else ""))
    for name, imgs in results.items():
        ref = np.repeat((both if name == "two controls" else hint)[None], len(imgs), 0)
        f1 = batch_edge_f1(imgs, ref)
        for seed, im in zip(seeds, imgs):
            Image.fromarray(im).save(out / f"{_slug(name)}_seed{seed}.png")
        columns.append((name, imgs, [f"edge F1 {v:.2f}" for v in f1]))
        print(f"  {name:<22} edge F1 vs hint: " + ", ".join(f"{v:.2f}" for v in f1))
    columns.append(("both hints (two controls)", both[None], None))
    title = f"prompt: {prompt!r}   steps {args.steps}, cfg {args.cfg:g}, seeds {seeds[0]}..{seeds[-1]}"
    contact_sheet(columns, out / "contact_sheet.png", title)
    print(f"wrote {len(results) * len(seeds) + 3} images and {out / 'contact_sheet.png'} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
