"""The drawn-style training data, the fixed drawn evaluation set, the colour score and edge F1.

Generators are checked for determinism and for the properties the data promises (pen widths,
objects cut by the border, captions that name what was drawn, shapes that are what they are called,
lines that survive Canny, textures that do not). The metrics are checked against hand-computed
values on crafted images, never against the models' outputs. A smoke run trains the base and the
ControlNet for a couple of steps on the drawn data and evaluates the result through the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import cv2
import numpy as np
import pytest

from comfyui_controlnet_core.controlnet_core.tiny import data, drawn, evaluate, train
from comfyui_controlnet_core.controlnet_core.tiny.text import MAX_TOKENS, UNK, VOCAB, TextEncoder, tokenize, words


def scenes(n: int, seed: int = 0) -> list[drawn.Scene]:
    rng = np.random.default_rng(seed)
    return [drawn.drawn_scene(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def many() -> list[drawn.Scene]:
    return scenes(300)


# ------------------------------------------------------------------------------------------------
# the generators


def test_drawn_scenes_are_deterministic_for_a_seed():
    a, b, c = scenes(12, 5), scenes(12, 5), scenes(12, 6)
    assert all(np.array_equal(x.image, y.image) and x.prompt == y.prompt for x, y in zip(a, b))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))
    r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(10):
        (i1, p1), (i2, p2) = drawn.training_scene(r1), drawn.training_scene(r2)
        assert np.array_equal(i1, i2) and p1 == p2

    assert evaluate.set_digest(evaluate.drawn_eval_set()) == evaluate.set_digest(evaluate.drawn_eval_set())
    assert evaluate.set_digest(evaluate.drawn_eval_set()) != evaluate.set_digest(evaluate.drawn_eval_set(1))


def test_the_classic_procedural_set_is_unchanged():
    # The procedural held-out set must stay the one the shipped models were measured on: the classic
    # generator draws only its five kinds even though the vocabulary grew.
    rng = np.random.default_rng(11)
    prompts = [data.random_scene(rng)[1] for _ in range(200)]
    kinds = {w for p in prompts for w in words(p)} & set(drawn.DRAWN_SHAPES)
    assert kinds == set(data.PROCEDURAL_SHAPES)


def test_captions_name_each_object_colour_and_kind_in_drawing_order(many):
    pair = re.compile(r"a (\w+) (\w+)")
    for s in many:
        objects_part = s.prompt.split(" on a ")[0]
        assert [m.groups() for m in pair.finditer(objects_part)] == [(o.colour, o.kind) for o in s.objects]
        if " on a " in s.prompt:
            assert s.prompt.endswith(f" on a {s.background} background")
        assert len(words(s.prompt)) <= MAX_TOKENS
        assert len({o.colour for o in s.objects}) == len(s.objects)  # one colour per object
        assert len({o.kind for o in s.objects}) == len(s.objects)
    assert (tokenize([s.prompt for s in many]) != VOCAB.index(UNK)).all()
    # the background phrase is left out in some captions (people often do not name it), and a
    # 4-object caption has no room for it in 16 words
    assert 0.1 < np.mean([" on a " not in s.prompt for s in many]) < 0.45
    assert all(" on a " not in s.prompt for s in many if len(s.objects) == 4)


def test_the_drawn_pixels_have_the_caption_colour(many):
    for s in many[:60]:
        for o in s.objects:
            region = o.region(margin=0)
            near = np.linalg.norm(s.image.astype(float) - data.RGB[o.colour], axis=-1) < 40
            assert (near & region).sum() >= 3, (s.prompt, o.kind, o.style, o.width)


def test_variety_widths_styles_counts_backgrounds_gaps(many):
    objs = [o for s in many for o in s.objects]
    assert {o.width for o in objs if o.style != "filled"} == {1, 2, 3, 4}
    assert {o.style for o in objs} == {"filled", "outline", "stroke"}
    assert all(o.style == "stroke" for o in objs if o.kind in drawn.OPEN_SHAPES)
    assert all(o.width == 0 for o in objs if o.style == "filled")
    assert {len(s.objects) for s in many} == {1, 2, 3, 4}
    assert {o.kind for o in objs} == set(drawn.DRAWN_SHAPES)
    assert any(not o.closed and o.kind not in drawn.OPEN_SHAPES for o in objs)  # outlines left open
    bgs = {s.background for s in many}
    assert {"black", "white", "gray", "gradient"} <= bgs and bgs & set(data.RGB) - {"black", "white", "gray"}
    # textured backgrounds: plain-captioned images whose corners are not all one colour
    assert any(len({tuple(s.image[y, x]) for y, x in [(0, 0), (0, 127), (127, 0), (127, 127), (64, 0)]}) > 1
               for s in many if s.background != "gradient")


def test_objects_cross_the_border_sometimes(many):
    def crosses(o: drawn.Drawn) -> bool:
        p = np.concatenate(o.paths)
        return bool((p.min() < 0) or (p.max() > data.IMAGE_SIZE - 1))

    objs = [o for s in many for o in s.objects]
    frac = np.mean([crosses(o) for o in objs])
    assert 0.03 < frac < 0.4, frac
    # and the image shows it: object colour on the image's edge rows/columns
    touching = 0
    for s in many:
        border = np.concatenate([s.image[0], s.image[-1], s.image[:, 0], s.image[:, -1]]).astype(float)
        touching += any((np.linalg.norm(border - data.RGB[o.colour], axis=-1) < 40).any()
                        for o in s.objects if crosses(o))
    assert touching >= 10


def test_pen_width_is_the_drawn_line_thickness():
    # A clean axis-aligned square outline drawn white on black: the anti-aliased coverage summed
    # across one side of the square (a row through its middle, left side) is the pen width.
    rng = np.random.default_rng(0)
    for width in drawn.PEN_WIDTHS:
        paths, closed = drawn.shape_paths("square", 64.3, 64.0, 30.0, math.pi / 4, rng)
        obj = drawn.Drawn("square", "white", "outline", width, tuple(paths), closed)
        img = np.zeros((128, 128, 3), np.uint8)
        obj.draw(img)
        row = img[64, :64, 0].astype(float) / 245.0  # white is 245
        assert abs(row.sum() - width) <= 0.6, (width, row.sum())


@pytest.mark.parametrize("kind,corners", [("triangle", 3), ("square", 4), ("house", 5), ("star", 10), ("rectangle", 4)])
def test_shapes_are_what_their_word_says(kind, corners):
    rng = np.random.default_rng(1)
    paths, closed = drawn.shape_paths(kind, 64, 64, 34, 0.3, rng)
    assert closed
    img = np.zeros((128, 128, 3), np.uint8)
    drawn.Drawn(kind, "white", "filled", 0, tuple(paths), True).draw(img)
    contours, _ = cv2.findContours((img[..., 0] > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    assert len(contours) == 1
    approx = cv2.approxPolyDP(contours[0], 0.02 * cv2.arcLength(contours[0], True), True)
    assert len(approx) == corners
    if kind == "rectangle":
        (_, _), (w, h), _ = cv2.minAreaRect(contours[0])
        assert max(w, h) / min(w, h) >= 2.0  # a bar, not a square


def test_circle_is_round_and_open_kinds_are_strokes():
    rng = np.random.default_rng(2)
    paths, closed = drawn.shape_paths("circle", 64, 64, 30, 0.0, rng)
    img = np.zeros((128, 128), np.uint8)
    cv2.fillPoly(img, [np.round(paths[0]).astype(np.int32)], 1)
    contours, _ = cv2.findContours(img, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    area, perimeter = cv2.contourArea(contours[0]), cv2.arcLength(contours[0], True)
    assert 4 * math.pi * area / perimeter**2 > 0.85
    for kind in drawn.OPEN_SHAPES:
        assert drawn.shape_paths(kind, 64, 64, 30, 0.5, rng)[1] is False


def test_every_object_leaves_edges_in_the_hint(many):
    for s in many[:100]:
        hint = data.hint_of(s.image)[..., 0] > 0
        for o in s.objects:
            assert (hint & o.region(margin=2)).sum() >= 4, (s.prompt, o.kind, o.style, o.width)


def test_textures_have_no_canny_edges():
    rng = np.random.default_rng(9)
    for _ in range(30):
        base = rng.integers(0, 256, 3).astype(np.float32)
        t = drawn.texture(base, rng)
        assert t.astype(float).std(axis=(0, 1)).max() > 1.5  # it is textured
        assert (data.hint_of(t)[..., 0] > 0).mean() < 0.002


def test_wobble_stays_near_the_clean_path():
    rng = np.random.default_rng(4)
    paths, _ = drawn.shape_paths("square", 64, 64, 30, 0.2, rng)
    clean = drawn.densify(paths[0], True)
    wobbly = drawn.wobble(paths[0], True, 2.0, rng)
    assert wobbly.shape == clean.shape
    d = np.linalg.norm(wobbly - clean, axis=1)
    assert 0.5 < d.max() <= 2.0 * 1.3 + 1e-6  # amplitude x (1 + 0.3 jitter) at most


def test_drawn_eval_set_is_what_its_docstring_says():
    items = evaluate.drawn_eval_set()
    groups = [g for g, _ in items]
    assert groups == [g for g in evaluate.GROUPS for _ in range(8)]
    assert [o.kind for o in items[0][1].objects] == ["star"]
    assert [o.kind for o in items[1][1].objects] == ["house"]
    assert [o.kind for o in items[2][1].objects] == ["triangle"]
    assert sorted(o.kind for o in items[16][1].objects) == ["circle", "rectangle"]
    for g, s in items:
        n = len(s.objects)
        assert {"outline": (1, 1), "strokes": (1, 2), "multi": (2, 3), "busy": (3, 4)}[g][0] <= n
        assert n <= {"outline": 1, "strokes": 2, "multi": 3, "busy": 4}[g]
        if g == "strokes":
            assert all(o.kind in drawn.OPEN_SHAPES for o in s.objects)
        # a pen drawing: white lines on black, nothing else
        assert set(np.unique(s.image.reshape(-1, 3), axis=0)[:, 0]) <= set(range(256))
        assert (s.image[..., 0] == s.image[..., 1]).all() and (s.image[..., 1] == s.image[..., 2]).all()
        assert len({o.colour for o in s.objects}) == n
        pair = re.compile(r"a (\w+) (\w+)")
        assert [m.groups() for m in pair.finditer(s.prompt.split(" on a ")[0])] == [(o.colour, o.kind) for o in s.objects]
        regions = [o.region() for o in s.objects]
        for i in range(n):  # objects of one drawing are apart, so each region has one colour
            for j in range(i + 1, n):
                assert (regions[i] & regions[j]).sum() < 0.05 * min(regions[i].sum(), regions[j].sum())


# ------------------------------------------------------------------------------------------------
# the metrics, against hand-computed values


def test_hue_of_palette_colours_by_hand():
    assert evaluate.hue_degrees((255, 0, 0)) == 0
    assert evaluate.hue_degrees((0, 255, 0)) == 120
    assert evaluate.hue_degrees((0, 0, 255)) == 240
    assert evaluate.hue_degrees((255, 255, 0)) == 60
    assert evaluate.hue_degrees((255, 0, 255)) == 300
    # orange (250, 140, 20): max R, 60 * (G - B) / (max - min) = 60 * 120 / 230
    assert evaluate.hue_degrees(data.RGB["orange"]) == pytest.approx(60 * 120 / 230)
    # blue (30, 60, 230): max B, 60 * (4 + (R - G) / (max - min)) = 60 * (4 - 30 / 200) = 231
    assert evaluate.hue_degrees(data.RGB["blue"]) == pytest.approx(231)
    assert evaluate.hue_degrees((100, 100, 100)) == 0


def test_colour_word_is_the_nearest_palette_hue_on_the_circle():
    assert evaluate.colour_word(350) == "red" and evaluate.colour_word(10) == "red"
    assert evaluate.colour_word(31) == "orange"
    assert evaluate.colour_word(60) == "yellow"
    assert evaluate.colour_word(120) == "green"
    assert evaluate.colour_word(200) == "cyan"   # cyan 183.2 is 16.8 away, blue 231 is 31 away
    assert evaluate.colour_word(210) == "blue"   # 26.8 vs 21
    assert evaluate.colour_word(280) == "purple"
    assert evaluate.colour_word(310) == "magenta"
    # the documented ranges: red wraps around 0; magenta|red at (306.7 + 360) / 2 = 333.3
    assert evaluate.HUE_RANGES["red"] == (333, 16) and evaluate.HUE_RANGES["blue"] == (207, 255)


def disc(r: int = 20) -> np.ndarray:
    m = np.zeros((64, 64), np.uint8)
    cv2.circle(m, (32, 32), r, 1, -1)
    return m > 0


def test_region_colour_by_hand():
    region = disc()
    img = np.zeros((64, 64, 3), np.uint8)
    img[region] = (220, 30, 30)
    assert evaluate.region_colour(img, region) == "red"
    img[region] = (30, 60, 230)
    assert evaluate.region_colour(img, region) == "blue"
    # hues 350 and 10 half and half: the circular mean is 0 (red); a plain mean would be 180 (cyan)
    img[:] = 0
    ys, xs = np.nonzero(region)
    left = xs < 32
    img[ys[left], xs[left]] = (255, 0, 43)     # hue 360 - 60 * 43 / 255 = 349.9
    img[ys[~left], xs[~left]] = (255, 43, 0)   # hue 60 * 43 / 255 = 10.1
    assert evaluate.region_colour(img, region) == "red"
    # grey pixels do not count; too few coloured pixels -> no colour
    img[region] = (128, 128, 128)
    assert evaluate.region_colour(img, region) is None
    n_needed = max(evaluate.MIN_PIXELS, math.ceil(evaluate.MIN_FRACTION * region.sum()))
    idx = np.flatnonzero(region.ravel())
    flat = img.reshape(-1, 3)
    flat[idx[: n_needed - 1]] = (30, 180, 40)
    assert evaluate.region_colour(img, region) is None
    flat[idx[n_needed - 1]] = (30, 180, 40)
    assert evaluate.region_colour(img, region) == "green"
    # dark pixels (value < 0.3) do not count even when saturated
    img[region] = (60, 0, 0)
    assert evaluate.region_colour(img, region) is None


def test_background_pixels_do_not_count():
    # a purple background, an orange disc of radius 12 inside the drawn circle's region (radius 20):
    # 3/4 of the region is purple. Hand-computed: without the background rule the circular mean of
    # 0.64 x 278.6 deg (purple) and 0.36 x 31.3 deg (orange) is about 308 deg (magenta); with it,
    # only the orange pixels count.
    img = np.zeros((64, 64, 3), np.uint8)
    img[:] = data.RGB["purple"]
    cv2.circle(img, (32, 32), 12, data.RGB["orange"], -1)
    region = disc(20)
    assert evaluate.region_colour(img, region) == "magenta"
    bg = evaluate.background_colour(img, [region])
    assert np.allclose(bg, data.RGB["purple"])
    assert evaluate.region_colour(img, region, bg) == "orange"


def test_colour_score_counts_objects_by_hand():
    # two drawings: a red-asked circle painted red and a blue-asked square painted green (1 of 2),
    # and a yellow-asked star painted yellow (1 of 1): 2 of 3 objects
    rng = np.random.default_rng(0)

    def obj(kind: str, colour: str, cx: float) -> drawn.Drawn:
        paths, closed = drawn.shape_paths(kind, cx, 64, 18, 0.0, rng)
        return drawn.Drawn(kind, colour, "outline", 2, tuple(paths), closed)

    s1 = drawn.Scene(np.zeros((128, 128, 3), np.uint8), "", [obj("circle", "red", 32), obj("square", "blue", 96)], "")
    s2 = drawn.Scene(np.zeros((128, 128, 3), np.uint8), "", [obj("star", "yellow", 64)], "")
    out1 = np.full((128, 128, 3), 128, np.uint8)
    out1[s1.objects[0].region()] = data.RGB["red"]
    out1[s1.objects[1].region()] = data.RGB["green"]
    out2 = np.full((128, 128, 3), 128, np.uint8)
    out2[s2.objects[0].region()] = data.RGB["yellow"]
    assert evaluate.object_colours(out1, s1) == [("red", "red"), ("blue", "green")]
    assert evaluate.colour_score(np.stack([out1, out2]), [s1, s2]) == pytest.approx(2 / 3)


def test_edge_f1_by_hand_on_drawn_style_edges():
    # a 2 px pen line's Canny is a double edge; a generated filled shape gives one edge between them
    target = np.zeros((32, 32), bool)
    target[10, 5:25] = target[13, 5:25] = True
    single = np.zeros_like(target)
    single[12, 5:25] = True
    assert data.edge_f1(single, target, radius=2) == 1.0  # rows 10 and 13 are within 2 px of row 12
    far = np.zeros_like(target)
    far[16, 5:25] = True                                  # 3 px from row 13: nothing matches
    assert data.edge_f1(far, target, radius=2) == 0.0
    half = np.zeros_like(target)
    half[10, 5:15] = True                                 # precision 1, recall 10 / 40
    assert data.edge_f1(half, target, radius=0) == pytest.approx(2 * 1 * 0.25 / 1.25)


def test_targets_check():
    rep = {"drawn": {"edge_f1_with_control": 0.72, "edge_f1_without_control": 0.17, "colour_score_with_control": 0.81},
           "procedural": {"edge_f1_with_control": 0.70}}
    assert all(evaluate.check_targets(rep).values())
    rep["drawn"]["edge_f1_without_control"] = 0.19  # 0.72 < 4 x 0.19
    assert list(evaluate.check_targets(rep).values()) == [True, False, True, True]
    rep["drawn"]["edge_f1_with_control"] = rep["drawn"]["edge_f1_without_control"] = 0.0  # 0 >= 4 x 0 is no win
    assert list(evaluate.check_targets(rep).values()) == [False, False, True, True]


# ------------------------------------------------------------------------------------------------
# vocabulary: new words, and the shipped (shorter-vocabulary) encoder still loads


def test_vocabulary_grew_at_its_end_and_old_encoders_load(tmp_path):
    shipped = TextEncoder.load(str(train.WEIGHTS_DIR / train.TEXT_FILE))
    n_old = len(shipped.vocab)
    assert shipped.vocab == VOCAB[:n_old] and n_old < len(VOCAB)
    assert {"house", "rectangle", "scribble"} <= set(VOCAB[n_old:])
    ids = shipped.tokenize("a red house")[0, :3].tolist()
    assert ids == [VOCAB.index("a"), VOCAB.index("red"), VOCAB.index(UNK)]
    assert shipped.unknown_words("a red house and a blue bar") == ["house", "rectangle"]
    full = TextEncoder()
    assert full.tokenize("a red house")[0, 2] == VOCAB.index("house")
    assert tokenize("a blue bar")[0, 2] == VOCAB.index("rectangle")  # alias
    full.save(str(tmp_path / "t.safetensors"))
    assert TextEncoder.load(str(tmp_path / "t.safetensors")).vocab == VOCAB
    # a file whose words are not the start of ours is refused with a sentence
    from comfyui_controlnet_core.controlnet_core.formats.files import read_safetensors, write_safetensors

    sd, meta = read_safetensors(tmp_path / "t.safetensors")
    m = json.loads(meta[TextEncoder.META_KEY])
    m["vocab"] = ["<pad>", "<unk>", "zebra"]
    sd["token_embedding.weight"] = sd["token_embedding.weight"][:3]
    write_safetensors(sd, tmp_path / "bad.safetensors", {**meta, TextEncoder.META_KEY: json.dumps(m)})
    with pytest.raises(ValueError, match="another vocabulary"):
        TextEncoder.load(str(tmp_path / "bad.safetensors"))


# ------------------------------------------------------------------------------------------------
# the pipeline on the drawn data, in seconds


def test_smoke_train_drawn_data_then_evaluate(tmp_path, monkeypatch, capsys):
    small = dataclasses.replace(train.TINY, model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 1),
                                hint_block_channels=(16, 16, 32, 32))
    monkeypatch.setattr(train, "TINY", small)
    common = ["--out", str(tmp_path), "--batch", "2", "--steps", "2", "--device", "cpu", "--log-every", "1",
              "--val-size", "2", "--eval-steps", "1", "--data", "drawn"]
    loader = train.make_loader(0, 3, train.pick_device("cpu"), 0, "drawn")
    b = next(loader)
    assert b["images"].shape == (3, 128, 128, 3) and b["tokens"].shape == (3, MAX_TOKENS)
    assert train.validation_set("drawn", 4).hints.shape == (4, 128, 128, 3)
    shutil.copy(train.WEIGHTS_DIR / train.AE_FILE, tmp_path / train.AE_FILE)  # the autoencoder stage: test_train.py
    assert train.main(["base", *common]) == 0
    assert train.main(["controlnet", *common, "--eval-every", "2"]) == 0
    hist = json.loads((tmp_path / "history_controlnet.json").read_text())
    assert hist["args"]["data"] == "drawn" and [e["step"] for e in hist["f1"]] == [0, 2]
    assert evaluate.main(["--weights", str(tmp_path), "--limit", "2", "--steps", "1", "--out", str(tmp_path / "ev")]) == 0
    rep = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert rep["drawn"]["images"] == 2 and rep["procedural"]["images"] == 2
    assert 0 <= rep["drawn"]["colour_score_with_control"] <= 1
    assert set(rep["targets"]) == set(evaluate.check_targets(rep))
    assert "drawn hints (2 images" in capsys.readouterr().out
