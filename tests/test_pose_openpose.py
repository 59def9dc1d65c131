"""The openpose method (body): our network against controlnet-aux 0.0.10's `bodypose_model` on a
random-weight file in the real layout (caffe names, plain dict), and the peak finding + limb
assembly against controlnet-aux's `Body.__call__` on the same synthetic network outputs (random
weights make its O(n^2) matching run for minutes: the maps here are two drawn skeletons)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors.nets import openpose as O
from helpers_annotators import cna

# two standing people (normalised x, y), OpenPose's 18 body points
PERSON = [(0.50, 0.15), (0.50, 0.25), (0.42, 0.25), (0.38, 0.40), (0.36, 0.55), (0.58, 0.25), (0.62, 0.40),
          (0.64, 0.55), (0.45, 0.55), (0.45, 0.72), (0.45, 0.90), (0.55, 0.55), (0.55, 0.72), (0.55, 0.90),
          (0.48, 0.13), (0.52, 0.13), (0.46, 0.14), (0.54, 0.14)]


def _people(n=2):
    out = []
    for i in range(n):
        dx = (i - (n - 1) / 2) * 0.45
        out.append([(0.5 + (x - 0.5) * 0.8 + dx, y) for x, y in PERSON])
    return out


def synthetic_maps(h: int, w: int, people) -> tuple[torch.Tensor, torch.Tensor]:
    """(PAFs (1, 38, h, w), heatmaps (1, 19, h, w)) at network resolution: a Gaussian blob (sigma 1
    cell) per joint, unit vectors along each limb within 1 cell of it."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    heat = np.zeros((19, h, w))
    paf = np.zeros((38, h, w))
    for person in people:
        pts = [(x * w, y * h) for x, y in person]
        for k, (px, py) in enumerate(pts):
            heat[k] = np.maximum(heat[k], np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 2.0))
        for (a, b), (cx, cy) in zip(O.LIMBS, O.PAF_CHANNELS):
            (ax, ay), (bx, by) = pts[a - 1], pts[b - 1]
            length = math.hypot(bx - ax, by - ay)
            ux, uy = (bx - ax) / length, (by - ay) / length
            t = (xx - ax) * ux + (yy - ay) * uy
            d = np.abs((xx - ax) * uy - (yy - ay) * ux)
            on = (t >= -1) & (t <= length + 1) & (d <= 1.0)
            paf[cx][on], paf[cy][on] = ux, uy
    return torch.from_numpy(paf[None]).float(), torch.from_numpy(heat[None]).float()


class MapsNet(torch.nn.Module):
    """A stand-in network that outputs the synthetic maps for whatever input size it gets."""

    def __init__(self, people):
        super().__init__()
        self.people = people
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return synthetic_maps(x.shape[2] // 8, x.shape[3] // 8, self.people)


def _real_layout(net: O.BodyNet) -> dict:
    """The state dict as body_pose_model.pth holds it: caffe layer names, no `model0.` part."""
    return {k.split(".", 1)[1]: v.clone() for k, v in net.state_dict().items()}


def _random_body(seed=0) -> O.BodyNet:
    net = O.BodyNet()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
    return net.eval()


def test_body_network_matches_controlnet_aux(tmp_path):
    model = cna("open_pose.model")
    path = tmp_path / "body_pose_model.pth"
    torch.save(_real_layout(_random_body()), path)
    ours = O.load(path).body
    ref = model.bodypose_model()
    ref.load_state_dict({k: torch.load(path)[k.split(".", 1)[1]] for k in ref.state_dict()})  # Aux's util.transfer
    ref.eval()
    x = torch.rand(1, 3, 184, 248) - 0.5
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x)):
            assert a.shape == b.shape
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-4
            assert b.std() > 0
    assert (ref(x)[1] >= 0).all()  # the heatmap branch ends in a ReLU (the original table's quirk)


def test_wrong_file_is_a_sentence(tmp_path):
    path = tmp_path / "body_pose_model.pth"
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(pp.PreprocessorError, match="OpenPose body network"):
        O.load(path)


@pytest.mark.parametrize("n_people", [1, 2, 3])
def test_peaks_and_limbs_match_controlnet_aux_body(n_people):
    pytest.importorskip("scipy")  # controlnet-aux's Body smooths with scipy's gaussian_filter
    cna("open_pose.util")  # first, as open_pose/__init__.py does (util and body import each other)
    body_mod = cna("open_pose.body")
    people = _people(n_people)
    net = MapsNet(people)
    rng = np.random.default_rng(n_people)
    bgr = rng.integers(0, 255, (384, 512, 3), dtype=np.uint8)
    ref = body_mod.Body.__new__(body_mod.Body)
    ref.model, ref.device = net, "cpu"
    want_cand, want_subset = ref(bgr)
    heat, paf = O.body_maps(net, bgr, torch.device("cpu"))
    cand, subset = O.assemble(O.find_peaks(heat), paf, bgr.shape[0])
    np.testing.assert_array_equal(cand, want_cand)
    np.testing.assert_array_equal(subset, want_subset)
    assert len(subset) == n_people and (subset[:, -1] >= 16).all()  # (3 people crowd: a wrist may go)
    # near where they were drawn (the maps are at 1/8 of a 0.48x image: a cell is ~17 px here)
    necks = sorted(cand[int(person[1]), 0] for person in subset)
    assert np.allclose(necks, sorted(q[1][0] * 512 for q in people), atol=0.04 * 512)


def test_method_end_to_end(tmp_path, monkeypatch):
    # the network on a random file, its maps replaced by two skeletons: the whole method draws them
    path = tmp_path / "body_pose_model.pth"
    torch.save(_real_layout(_random_body(1)), path)
    people = _people(2)
    monkeypatch.setattr(O.BodyNet, "forward", lambda self, x: synthetic_maps(x.shape[2] // 8, x.shape[3] // 8, people))
    frame = np.random.default_rng(0).uniform(0, 1, (300, 400, 3)).astype(np.float32)
    data = []
    out = pp.run("openpose", frame, resolution=256, weights_path=path, data_out=data, detect_hand=False, detect_face=False)
    assert out.shape == (1, 300, 400, 3) and out.max() > 0.5
    (frame_data,) = data
    assert (frame_data["canvas_height"], frame_data["canvas_width"]) == (256, 341)  # Aux: the detect size
    assert len(frame_data["people"]) == 2
    kp = np.array(frame_data["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    assert (kp[:, 2] == 1).all() and (kp[:, :2] <= 1).all()  # normalised, as Aux's OpenPose JSON
    # the picture is Aux's drawing at the padded detect size, cut to 256 x 341 and resized back
    picture, _ = O.openpose_frame(frame, model=O.load(path), resolution=256)
    assert picture.shape == (256, 341, 3)
    off = pp.run("openpose", frame, resolution=256, weights_path=path, detect_body=False, detect_hand=False, detect_face=False)
    assert off.max() == 0


# ----------------------------------------------------------------------------- hands


def _random(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
    return net.eval()


def test_hand_network_matches_controlnet_aux(tmp_path):
    model = cna("open_pose.model")
    torch.save(_real_layout(_random_body()), tmp_path / "body_pose_model.pth")
    torch.save({k.split(".", 1)[1]: v for k, v in _random(O.HandNet(), 3).state_dict().items()},
               tmp_path / "hand_pose_model.pth")
    ours = O.load(tmp_path / "body_pose_model.pth").hand  # found beside the body file
    assert ours is not None
    ref = model.handpose_model()
    sd = torch.load(tmp_path / "hand_pose_model.pth")
    ref.load_state_dict({k: sd[k.split(".", 1)[1]] for k in ref.state_dict()})
    x = torch.rand(1, 3, 184, 184) - 0.5
    with torch.no_grad():
        a, b = ours(x), ref.eval()(x)
    assert a.shape == b.shape == (1, 22, 23, 23) and b.std() > 0
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-4


class HandMaps(torch.nn.Module):
    """Hand maps with a blob per joint along a fan, wherever the crop is."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # controlnet-aux reads the device from it

    def forward(self, x):
        h, w = x.shape[2] // 8, x.shape[3] // 8
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        maps = np.zeros((22, h, w))
        for j in range(21):
            a = -0.8 + 1.6 * (j // 4) / 5
            r = 0.1 + 0.09 * (j % 4) if j else 0.0
            cx, cy = w * (0.5 + r * math.sin(a)), h * (0.8 - r * math.cos(a) * 1.5)
            maps[j] = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.03 * w) ** 2))
        maps[7] += 0.6 * np.exp(-((xx - 0.1 * w) ** 2 + (yy - 0.1 * h) ** 2) / 4.0)  # a weaker second blob
        return torch.from_numpy(maps[None]).float()


@pytest.mark.parametrize("side", [64, 150])
def test_hand_points_match_controlnet_aux_hand(side):
    pytest.importorskip("skimage")  # controlnet-aux's Hand labels blobs with scikit-image
    pytest.importorskip("scipy")
    cna("open_pose.util")
    hand_mod = cna("open_pose.hand")
    crop = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    ref = hand_mod.Hand.__new__(hand_mod.Hand)
    ref.model, ref.device = HandMaps(), "cpu"
    want = ref(crop)
    got = O.hand_points(HandMaps(), crop, torch.device("cpu"))
    np.testing.assert_array_equal(got, want)
    assert (got > 0).all()


def test_hand_boxes_by_hand():
    body = [None] * 18
    body[5], body[6], body[7] = O.Keypoint(100, 100), O.Keypoint(100, 160), O.Keypoint(100, 200)  # left arm down
    (box,) = O.hand_boxes(body, 400, 400)
    # wrist + 0.33 x forearm (40 px) = (100, 213.2); side 1.5 x max(40, 0.9 x 60) = 81
    assert box == (int(100 - 40.5), int(213.2 - 40.5), 81, True)
    body[2], body[3], body[4] = O.Keypoint(10, 10), O.Keypoint(12, 12), O.Keypoint(14, 14)  # too small: < 20 px
    assert O.hand_boxes(body, 400, 400) == [box]


def test_hands_missing_file_is_a_sentence(tmp_path, monkeypatch):
    from comfyui_controlnet_core.preprocessors.nets import files as nets_files

    monkeypatch.setattr(nets_files, "search_roots", lambda: [tmp_path])
    torch.save(_real_layout(_random_body()), tmp_path / "body_pose_model.pth")
    model = O.load(tmp_path / "body_pose_model.pth")
    with pytest.raises(pp.PreprocessorError, match="hand_pose_model.pth.*lllyasviel/Annotators.*detect_hand off"):
        model.part("hand")


def test_method_with_hands(tmp_path, monkeypatch):
    torch.save(_real_layout(_random_body(1)), tmp_path / "body_pose_model.pth")
    torch.save({k.split(".", 1)[1]: v for k, v in O.HandNet().state_dict().items()}, tmp_path / "hand_pose_model.pth")
    people = _people(1)
    monkeypatch.setattr(O.BodyNet, "forward", lambda self, x: synthetic_maps(x.shape[2] // 8, x.shape[3] // 8, people))
    monkeypatch.setattr(O.HandNet, "forward", lambda self, x: HandMaps.forward(self, x))
    frame = np.random.default_rng(1).uniform(0, 1, (512, 512, 3)).astype(np.float32)
    data = []
    with_hands = pp.run("openpose", frame, resolution=512, weights_path=tmp_path / "body_pose_model.pth",
                        data_out=data, detect_face=False)
    person = data[0]["people"][0]
    assert len(person["hand_left_keypoints_2d"]) == len(person["hand_right_keypoints_2d"]) == 63
    body_only = pp.run("openpose", frame, resolution=512, weights_path=tmp_path / "body_pose_model.pth",
                       detect_hand=False, detect_face=False)
    blue = (with_hands[0] == [0, 0, 1]).all(-1).sum()  # hand joints are blue (and one body joint)
    assert blue > (body_only[0] == [0, 0, 1]).all(-1).sum() + 200


# ----------------------------------------------------------------------------- face


def _cna_face(monkeypatch):
    """controlnet-aux's open_pose/face.py; it imports torchvision's ToTensor/ToPILImage at the top
    (unused by the code compared here), and torchvision does not install beside CPU torch: a stand-in."""
    import sys
    import types

    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.SimpleNamespace(ToTensor=object, ToPILImage=object)
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.transforms", tv.transforms)
    cna("open_pose.util")
    return cna("open_pose.face")


def test_face_network_matches_controlnet_aux(tmp_path, monkeypatch):
    face = _cna_face(monkeypatch)
    torch.save(_random(O.FaceNet(), 4).state_dict(), tmp_path / "facenet.pth")  # top-level names, as released
    torch.save(_real_layout(_random_body()), tmp_path / "body_pose_model.pth")
    ours = O.load(tmp_path / "body_pose_model.pth").face
    ref = face.FaceNet()
    ref.load_state_dict(torch.load(tmp_path / "facenet.pth"))
    x = torch.rand(1, 3, 384, 384) - 0.5
    with torch.no_grad():
        a, b = ours(x), ref.eval()(x)[-1]
    assert a.shape == b.shape == (1, 71, 48, 48) and b.std() > 0
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-4


class FaceMaps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        maps = np.zeros((71, 48, 48))
        for j in range(69):  # 2 maps stay empty: they are left out
            maps[j, 5 + (j * 7) % 38, 5 + (j * 11) % 38] = 0.5 + j / 200
        return [torch.from_numpy(maps[None]).float()]


@pytest.mark.parametrize("side", [40, 133])
def test_face_points_match_controlnet_aux_face(side, monkeypatch):
    face = _cna_face(monkeypatch)
    crop = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    ref = face.Face.__new__(face.Face)
    ref.model, ref.device = FaceMaps(), "cpu"
    want = ref.compute_peaks_from_heatmaps(ref(crop))
    monkeypatch.setattr(FaceMaps, "__call__", lambda self, x: FaceMaps.forward(self, x)[-1])
    got = O.face_points(FaceMaps(), crop, torch.device("cpu"))
    np.testing.assert_array_equal(got, want)
    assert got.shape == (69, 2)


def test_face_box_by_hand():
    body = [None] * 18
    body[0], body[14], body[16] = O.Keypoint(200, 100), O.Keypoint(190, 95), O.Keypoint(170, 100)
    # side = max(10 x 3, 30 x 1.5) = 45; box at (155, 55), 90 wide (Aux doubles it unless clipped)
    assert O.face_box(body, 400, 400) == (155, 55, 90)
    assert O.face_box(body, 400, 180) == (155, 55, 25)  # clipped at the right edge: 180 - 155
    body[14] = body[16] = None
    assert O.face_box(body, 400, 400) is None
