"""The shipped demo models and the `demo` command: control works, measurably.

The controllability metric (docs/training.md): 8 procedural scenes (a fixed seed, not the training
stream), each sampled with the reference host at fixed noise with and without the Canny ControlNet;
the F1 of the outputs' Canny edges against the hint edges, with a 2 px tolerance, must be clearly
higher with control.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch

from comfyui_controlnet_core.controlnet_core.tiny import data, demo, latent, train
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings

STEPS, CFG_SCALE = 12, 3.0


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return demo.load_models()


@pytest.fixture(scope="module")
def scenes():
    return data.validation_batch(8, seed=2024)


def test_shipped_models_are_the_documented_architecture(models):
    assert models.controlnet.config == models.unet.config == train.TINY
    assert models.controlnet.source_format.startswith("original")
    assert models.controlnet.config.num_outputs == 7
    assert models.ae.latent_channels == train.TINY.in_channels == 4
    total = sum(f.stat().st_size for f in train.WEIGHTS_DIR.glob("*.safetensors"))
    assert total < 20 * 2**20


def test_control_clearly_improves_edge_f1(models, scenes):
    m = models
    hint = latent.hint_from_uint8(scenes.hints)
    without = train.sample_images(m.unet, m.text, m.ae, scenes.prompts, steps=STEPS, cfg=CFG_SCALE, seed=7)
    with_cn = train.sample_images(m.unet, m.text, m.ae, scenes.prompts, steps=STEPS, cfg=CFG_SCALE, seed=7,
                                  control=Control(m.controlnet, hint, ControlSettings(strength=1.0)))
    f1_without = float(np.mean(data.batch_edge_f1(without, scenes.hints, radius=2)))
    f1_with = float(np.mean(data.batch_edge_f1(with_cn, scenes.hints, radius=2)))
    print(f"edge F1 (2 px) without control {f1_without:.3f}, with control {f1_with:.3f}")
    # measured on the shipped weights: 0.087 without, 0.667 with control
    assert f1_with > 0.5
    assert f1_with > f1_without + 0.35


def test_strength_zero_equals_no_control_bitwise(models, scenes):
    m = models
    prompts = scenes.prompts[:2]
    hint = latent.hint_from_uint8(scenes.hints[:2])
    none = train.sample_images(m.unet, m.text, m.ae, prompts, steps=4, seed=3)
    zero = train.sample_images(m.unet, m.text, m.ae, prompts, steps=4, seed=3,
                               control=Control(m.controlnet, hint, ControlSettings(strength=0.0)))
    one = train.sample_images(m.unet, m.text, m.ae, prompts, steps=4, seed=3,
                              control=Control(m.controlnet, hint, ControlSettings(strength=1.0)))
    assert np.array_equal(none, zero)
    assert not np.array_equal(none, one)


def test_demo_command_writes_sheet_and_shows_progress(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--steps", "3", "--rows", "1"]) == 0
    err = capsys.readouterr()
    # pytest's capture is not a terminal: one progress line per run, no carriage-return frames
    assert "\r" not in err.err
    assert [line.split("s ", 1)[1] for line in err.err.splitlines()] == [
        "no control", "strength 0.5", "strength 1.0", "first half (end 0.5)", "two controls", "done"]
    assert "strength 1.0" in err.out
    files = {p.name for p in tmp_path.iterdir()}
    assert {"contact_sheet.png", "input.png", "hint.png", "no_control_seed0.png", "strength_0.5_seed0.png",
            "strength_1.0_seed0.png", "first_half_end_0.5_seed0.png", "two_controls_seed0.png"} <= files
    from PIL import Image

    with Image.open(tmp_path / "contact_sheet.png") as im:
        assert im.width > 8 * 256


def test_progress_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    bar = demo.Progress(4, width=8, stream=stream)
    for _ in range(4):
        bar.step()
    bar.close()
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 4 and frames[1].startswith("[####----]  50.0%") and frames[-1].endswith("\n")


def test_demo_takes_a_given_image(tmp_path):
    from PIL import Image

    img, _ = data.builtin_scene("triangle-line", size=200)
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "out"
    assert demo.main(["--hint", str(tmp_path / "in.png"), "--prompt", "a green triangle and an orange line",
                      "--out", str(out), "--steps", "2", "--rows", "1"]) == 0
    with Image.open(out / "hint.png") as h:
        assert h.size == (128, 128)


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "comfyui_controlnet_core", "demo", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--hint" in r.stdout
    r = subprocess.run([sys.executable, "-m", "comfyui_controlnet_core", "nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "demo" in r.stderr
    # importing the entry module adds nothing heavy beyond what the package import itself loads
    code = ("import sys, comfyui_controlnet_core; before = set(sys.modules); "
            "import comfyui_controlnet_core.__main__; "
            "new = set(sys.modules) - before; assert not {'torch', 'cv2', 'numpy'} & new, new")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
