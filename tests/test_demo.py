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

from comfyui_controlnet_core.controlnet_core.tiny import data, demo, latent, sheet, train
from comfyui_controlnet_core.controlnet_core.tiny import text as tiny_text
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


def test_demo_command_writes_sheet_and_shows_progress(tmp_path, capsys, monkeypatch):
    from PIL import Image

    laid_out = {}

    def recording_sheet(columns, path, title="", scale=2):
        laid_out.update(sheet.contact_sheet(columns, path, title, scale))
        return laid_out

    monkeypatch.setattr(demo, "contact_sheet", recording_sheet)
    assert demo.main(["--out", str(tmp_path), "--steps", "3", "--rows", "1"]) == 0
    err = capsys.readouterr()
    # pytest's capture is not a terminal: one progress line per run, no carriage-return frames
    assert "\r" not in err.err
    assert [line.split("s ", 1)[1] for line in err.err.splitlines()] == [
        "no control", "strength 0.5", "strength 1.0", "first half (end 0.5)", "two controls", "done"]
    settings = {"no control": "no_control", "strength 0.5": "strength_0.5", "strength 1.0": "strength_1.0",
                "first half (end 0.5)": "first_half_end_0.5", "two controls": "two_controls"}
    files = {p.name for p in tmp_path.iterdir()}
    assert {"contact_sheet.png", "input.png", "hint.png", "hint2.png"} | {f"{s}_seed0.png" for s in settings.values()} <= files
    hint = np.asarray(Image.open(tmp_path / "hint.png"))
    both = np.maximum(hint, np.asarray(Image.open(tmp_path / "hint2.png")))
    with Image.open(tmp_path / "contact_sheet.png") as im:
        sheet_px = np.asarray(im.convert("RGB"))
    for name, slug in settings.items():
        out = np.asarray(Image.open(tmp_path / f"{slug}_seed0.png"))
        # the sheet shows the saved image (at 2x) under its label ...
        x, y, w, h = laid_out[name][0]
        tile = np.asarray(Image.fromarray(out).resize((w, h), Image.Resampling.LANCZOS))
        assert np.array_equal(sheet_px[y:y + h, x:x + w], tile), name
        # ... and the printed edge F1 is that image's against its hint (both hints for two controls)
        f1 = data.batch_edge_f1(out[None], (both if name == "two controls" else hint)[None])[0]
        assert f"{name:<22} edge F1 vs hint: {f1:.2f}" in err.out


def _ink_height(img: np.ndarray) -> int:
    rows = np.where((img < 128).any(axis=(1, 2)))[0]
    return int(rows.max() - rows.min() + 1) if rows.size else 0


def test_contact_sheet_text_is_sized_to_the_tiles(tmp_path):
    from PIL import Image

    heights = {}
    for scale in (1, 3):
        tiles = np.full((1, 128, 128, 3), 255, np.uint8)  # white tiles: only text is dark
        boxes = sheet.contact_sheet([("no control", tiles, ["edge F1 0.50"])], tmp_path / f"s{scale}.png", scale=scale)
        x, y, w, h = boxes["no control"][0]
        with Image.open(tmp_path / f"s{scale}.png") as im:
            px = np.asarray(im.convert("RGB"))
        heights[scale] = (_ink_height(px[:y, x:x + w]), _ink_height(px[y + h:, x:x + w]))
        # PIL's old bitmap font was 7 px of ink whatever the tile: 1/18 of a 128 px tile, 1/55 at 384
        assert min(heights[scale]) >= w / 25, (scale, heights[scale])
    assert heights[3][0] >= 2.5 * heights[1][0] and heights[3][1] >= 2.5 * heights[1][1]


def test_bad_hint_gets_one_sentence_and_no_output_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a picture\n")
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (tmp_path / "folder").mkdir()
    cases = {"missing.png": "no such file", "folder": "is a folder", "notes.txt": "is not an image",
             "cut.png": "is not an image"}
    for name, words in cases.items():
        out = tmp_path / f"out_{name}"
        assert demo.main(["--hint", str(tmp_path / name), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --hint '{tmp_path / name}'") and words in err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not out.exists()
    out = tmp_path / "out_hint2"
    img, _ = data.builtin_scene("star")
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "ok.png")
    assert demo.main(["--hint", str(tmp_path / "ok.png"), "--hint2", str(tmp_path / "notes.txt"), "--out", str(out)]) == 2
    assert "--hint2" in capsys.readouterr().err and not out.exists()


def test_module_entry_point_answers_a_bad_hint_in_one_sentence(tmp_path):
    (tmp_path / "readme.txt").write_text("hello\n")
    r = subprocess.run([sys.executable, "-m", "comfyui_controlnet_core", "demo", "--hint", str(tmp_path / "readme.txt"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "is not an image" in r.stderr
    assert not (tmp_path / "o").exists()


def test_help_lists_every_default_the_hint_pipeline_and_the_vocabulary(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = [a for a in demo._parser()._actions if a.option_strings != ["-h", "--help"]]
    assert len(options) == 10
    for action in options:
        assert "default" in action.help, action.option_strings
    for words in ("centre-cropped", "128x128 px", "Canny", "double edge"):
        assert words in text
    # the words the shipped encoder was trained with (its file's metadata), not this version's full list
    shipped = tiny_text.TextEncoder.load(str(train.WEIGHTS_DIR / train.TEXT_FILE)).vocab
    known = [w for w in shipped if not w.startswith("<")]
    listed = lambda w: f" {w}," in text or f" {w};" in text or f" {w}." in text  # noqa: E731
    assert "Vocabulary" in text and all(listed(w) for w in known)
    assert not any(listed(w) for w in tiny_text.VOCAB if w not in shipped)  # e.g. words added since


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


def test_demo_takes_a_given_image_cropped_resized_and_through_canny(tmp_path):
    """A 384x256 picture: its centre 256x256 (a white square outline, 4 px, on black) is kept and halved to
    128 px; red bars in the cut-off margins must not appear. The hint is Canny of that: each side of the
    white line is an edge, so the outline becomes a double edge. The second control's hint is the same
    picture's Canny after a 2 px blur at thresholds 50/100, never the built-in star."""
    import cv2
    from PIL import Image

    pic = np.zeros((256, 384, 3), np.uint8)
    pic[:, :40] = pic[:, -40:] = (220, 30, 30)         # margins: cut off by the centre crop
    pic[64:192, 128:256] = 255                          # crop coordinates 64..192 -> 32..96 at 128 px
    pic[72:184, 136:248] = 0                            # leaves a white ring 8 px wide (4 px at 128 px)
    Image.fromarray(pic).save(tmp_path / "in.png")
    out = tmp_path / "out"
    assert demo.main(["--hint", str(tmp_path / "in.png"), "--prompt", "a green square",
                      "--out", str(out), "--steps", "1", "--rows", "1"]) == 0
    image = np.asarray(Image.open(out / "input.png"))
    assert image.shape == (128, 128, 3)
    assert not ((image[..., 0] > 100) & (image[..., 1] < 60)).any()  # no red: the margins were cropped away
    assert image[34, 64].min() > 200 and image[64, 64].max() < 30   # ring at 32..36, dark inside
    hint = np.asarray(Image.open(out / "hint.png"))[..., 0] > 0
    row = np.flatnonzero(hint[64])                                  # a scan line through the middle
    runs = np.split(row, np.flatnonzero(np.diff(row) > 1) + 1)
    centres = [float(r.mean()) for r in runs]
    # two edges per side of the ring: its outer border (x = 32, 96) and its inner border (x = 36, 92)
    assert len(runs) == 4 and np.allclose(centres, [32, 36, 92, 96], atol=1.5), centres
    # the second hint: cv2 by hand on the picture the demo saw
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    want2 = cv2.Canny(cv2.GaussianBlur(gray, (0, 0), 2.0), 50, 100) > 0
    got2 = np.asarray(Image.open(out / "hint2.png"))[..., 0] > 0
    assert np.array_equal(got2, want2) and got2.any()
    near_ring = cv2.dilate((image[..., 0] > 127).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert not (got2 & ~near_ring).any()  # nothing of the built-in star (top right) in it


def test_demo_second_hint_can_be_given(tmp_path):
    from PIL import Image

    first, _ = data.builtin_scene("triangle-line")
    second, _ = data.builtin_scene("star")
    Image.fromarray(first).save(tmp_path / "a.png")
    Image.fromarray(second).save(tmp_path / "b.png")
    out = tmp_path / "out"
    assert demo.main(["--hint", str(tmp_path / "a.png"), "--hint2", str(tmp_path / "b.png"), "--out", str(out),
                      "--steps", "1", "--rows", "1"]) == 0
    got = np.asarray(Image.open(out / "hint2.png"))
    assert np.array_equal(got, data.hint_of(second)) and got.any()


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
