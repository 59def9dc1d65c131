"""The dwpose method: its steps against hand-computed values, the whole method on random-weight
files in the real formats, bad input, and (with AUX_PATH pointing at a comfyui_controlnet_aux
checkout) the whole picture and keypoints against Aux's own DWPose code on onnxruntime."""

from __future__ import annotations

import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

import helpers_pose as H
from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors.nets import dwpose as D
from comfyui_controlnet_core.preprocessors.nets import pose_draw as PD


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """yolox_l.onnx + dw-ll_ucoco_384.onnx (random weights, narrow, real topology) in one folder."""
    folder = tmp_path_factory.mktemp("DWPose")
    H.export_onnx(H.random_yolox(), torch.rand(1, 3, 640, 640) * 255, folder / "yolox_l.onnx", "images", ["output"])
    H.export_onnx(H.randomize(H.RTMPose(0.25, 0.33), seed=2), torch.randn(1, 3, 384, 288),
                  folder / "dw-ll_ucoco_384.onnx", "input", ["simcc_x", "simcc_y"])
    return folder


def _image(seed=0, h=480, w=640, n=None):
    shape = (h, w, 3) if n is None else (n, h, w, 3)
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


# ----------------------------------------------------------------------------- steps, by hand


def test_person_boxes_decode_and_nms_by_hand():
    pred = np.zeros((8400, 85), np.float32)
    # cell (x=10, y=20) of the stride-8 grid (80 x 80): centre (10.5 * 8, 20.5 * 8) with offsets 0.5
    i = 20 * 80 + 10
    pred[i, :4] = [0.5, 0.5, math.log(4.0), math.log(8.0)]  # w = 4 * 8 = 32, h = 8 * 8 = 64
    pred[i, 4], pred[i, 5] = 0.9, 0.9  # score 0.81
    pred[i + 1, :4] = [0.5, 0.5, math.log(4.0), math.log(8.0)]  # one cell right: IoU 24/40 > 0.45
    pred[i + 1, 4], pred[i + 1, 5] = 0.8, 0.8
    j = 6400 + 5 * 40 + 30  # stride 16 grid (40 x 40), cell (30, 5): far away, score 0.25 < 0.3
    pred[j, :4] = [0.0, 0.0, 0.0, 0.0]
    pred[j, 4], pred[j, 5] = 0.5, 0.5
    pred[i + 2, 4], pred[i + 2, 6] = 0.99, 0.99  # another class: not a person
    boxes = D.person_boxes(pred, ratio=0.5)
    cx, cy = 10.5 * 8, 20.5 * 8
    want = np.array([[cx - 16, cy - 32, cx + 16, cy + 32]]) / 0.5
    np.testing.assert_allclose(boxes, want, rtol=1e-6)
    assert boxes.dtype == np.float64


def test_keypoint_back_projection_by_hand():
    # box 100..200 x 50..250: centre (150, 150), padded 1.25x -> 125 x 250, widened to 288:384 ->
    # 187.5 x 250. A SimCC peak at bin 288 (of 576) is crop x 144 = the centre; bin 0 the left edge.
    simcc_x = np.zeros((1, 133, 576), np.float32)
    simcc_y = np.zeros((1, 133, 768), np.float32)
    simcc_x[0, :, 288] = 0.9
    simcc_y[0, :, 384] = 0.8
    simcc_x[0, 1, :] = 0
    simcc_x[0, 1, 0] = 0.7
    locs, scores = D.simcc_decode(simcc_x, simcc_y)
    np.testing.assert_allclose(scores[0, :3], [0.8, 0.7, 0.8])
    _, centers, scales = D.crops(np.zeros((300, 300, 3), np.uint8), np.array([[100.0, 50.0, 200.0, 250.0]]))
    np.testing.assert_allclose(centers[0], [150, 150])
    np.testing.assert_allclose(scales[0], [187.5, 250])
    kp = locs[0] / np.array([288, 384]) * scales[0] + centers[0] - scales[0] / 2
    np.testing.assert_allclose(kp[0], [150, 150])
    np.testing.assert_allclose(kp[1], [150 - 93.75, 150])


def test_crop_is_the_box_region():
    # a white square exactly in the padded box's centre ends up in the crop's centre
    img = np.zeros((400, 400, 3), np.uint8)
    img[190:210, 190:210] = 255
    patches, _, _ = D.crops(img, np.array([[150.0, 100.0, 250.0, 300.0]]))
    crop = patches[0] * D.STD + D.MEAN  # back to 0..255
    ys, xs = np.nonzero(crop[..., 0] > 127)
    assert abs(xs.mean() - 144) < 1 and abs(ys.mean() - 192) < 1


def test_openpose_mapping_by_hand():
    kp = np.zeros((1, 133, 2), np.float32)
    kp[0, :, 0] = np.arange(133)
    sc = np.full((1, 133), 0.9, np.float32)
    sc[0, 0] = 0.1  # the nose is not found
    (pose,) = D.to_openpose(kp, sc)
    assert pose.body[0] is None  # OpenPose 0 = nose = COCO 0
    assert pose.body[1].x == pytest.approx((5 + 6) / 2)  # the neck: mean of the shoulders
    assert [pose.body[k].x for k in (2, 5, 8, 11, 14, 15, 16, 17)] == [6, 5, 12, 11, 2, 1, 4, 3]
    assert pose.left_hand[0].x == 91 and pose.right_hand[0].x == 112 and len(pose.right_hand) == 21
    assert len(pose.face) == 70 and pose.face[0].x == 23 and pose.face[68] is pose.body[14]


def test_drawing_colours_and_sizes_by_hand():
    # neck (1) to right shoulder (2): limb 0, colour (255, 0, 0) x 0.6; the joints in full colour
    body = [None] * 18
    body[1], body[2] = PD.Keypoint(100, 100), PD.Keypoint(160, 100)
    hand = [None] * 21
    hand[0], hand[1] = PD.Keypoint(50, 200), PD.Keypoint(90, 200)
    face = [PD.Keypoint(150, 250)] + [None] * 69
    canvas = PD.draw_poses([PD.Pose(body, hand, None, face)], 300, 300)
    assert tuple(canvas[100, 130]) == (153, 0, 0)  # the stick's middle
    assert tuple(canvas[100, 100]) == COLORS_1 and tuple(canvas[100, 160]) == (255, 170, 0)
    assert tuple(canvas[104, 130]) != (0, 0, 0) and tuple(canvas[106, 130]) == (0, 0, 0)  # half-width 4
    assert tuple(canvas[200, 70]) == (255, 0, 0)  # hand edge 0: hsv(0) = red, 2 px line
    assert tuple(canvas[200, 50]) == (0, 0, 255)  # hand joints are blue
    assert tuple(canvas[250, 150]) == (255, 255, 255) and tuple(canvas[254, 150]) == (0, 0, 0)  # face: r 3
    off = PD.draw_poses([PD.Pose(body, hand, None, face)], 300, 300, body=False, hands=False)
    assert off[100].max() == 0 and off[200].max() == 0 and tuple(off[250, 150]) == (255, 255, 255)


COLORS_1 = (255, 85, 0)  # OpenPose colour of joint 1 (the neck)


def test_resize_to_resolution_like_aux():
    canvas = np.zeros((480, 640, 3), np.uint8)
    assert PD.to_resolution(canvas, 512).shape == (512, 683, 3)  # round(640 * 512 / 480) = 683
    assert PD.to_resolution(canvas, 240).shape == (240, 320, 3)


# ----------------------------------------------------------------------------- the whole method


def test_method_on_real_format_files(files):
    img = _image()
    data = []
    out = pp.run("dwpose", img, resolution=512, weights_path=files / "dw-ll_ucoco_384.onnx", data_out=data)
    assert out.shape == (1, 480, 640, 3) and out.dtype == np.float32
    (frame,) = data
    assert frame["canvas_height"] == 480 and frame["canvas_width"] == 640
    assert len(frame["people"]) >= 2  # the random detector finds a few "people"
    person = frame["people"][0]
    assert len(person["pose_keypoints_2d"]) == 18 * 3
    assert out.max() > 0.5  # something was drawn
    # the picture is the keypoints drawn at the input size, resized to 512 and back
    model = D.load(files / "dw-ll_ucoco_384.onnx")
    poses = model.detect(D.to_uint8(img))
    canvas = PD.draw_poses(poses, 480, 640)
    small = PD.to_resolution(canvas, 512).astype(np.float32) / 255
    from comfyui_controlnet_core.preprocessors.image import resize

    np.testing.assert_array_equal(out, resize(small[None], 480, 640, grow="linear"))


def test_batch_equals_frames_and_toggles(files):
    imgs = _image(n=2, h=200, w=160)
    w = files / "dw-ll_ucoco_384.onnx"
    data = []
    both = pp.run("dwpose", imgs, resolution=256, weights_path=w, data_out=data)
    one = pp.run("dwpose", imgs[1], resolution=256, weights_path=w)
    np.testing.assert_array_equal(both[1], one[0])
    assert len(data) == 2
    data_off = []
    pp.run("dwpose", imgs[:1], resolution=256, weights_path=w, detect_body=False, detect_hand=False,
           detect_face=False, data_out=data_off)
    person = data_off[0]["people"][0]
    assert person["pose_keypoints_2d"] == [0.0] * 54
    assert person["hand_left_keypoints_2d"] is None and person["face_keypoints_2d"] is None


def test_no_person_is_a_black_hint(files, tmp_path):
    # a detector that scores nothing above the threshold: no boxes, a black picture, no people
    model = H.random_yolox()
    with torch.no_grad():
        for conv in model.head.obj_preds:
            conv.bias.fill_(-30.0)
    (tmp_path / "dw-ll_ucoco_384.onnx").write_bytes((files / "dw-ll_ucoco_384.onnx").read_bytes())
    H.export_onnx(model, torch.rand(1, 3, 640, 640) * 255, tmp_path / "yolox_l.onnx", "images", ["output"])
    data = []
    out = pp.run("dwpose", _image(), resolution=512, weights_path=tmp_path / "dw-ll_ucoco_384.onnx", data_out=data)
    assert out.max() == 0 and data[0]["people"] == []


@pytest.mark.parametrize("h, w", [(8, 8), (8, 2000), (1500, 1200), (4096, 4096)])
def test_odd_sizes(files, h, w):
    out = pp.run("dwpose", _image(h=h, w=w), resolution=64, weights_path=files / "dw-ll_ucoco_384.onnx")
    assert out.shape == (1, h, w, 3) and np.isfinite(out).all()


def test_tiny_image_and_big_batch(files):
    w = files / "dw-ll_ucoco_384.onnx"
    with pytest.raises(pp.PreprocessorError, match="too small: 4x4 pixels"):
        pp.run("dwpose", _image(h=4, w=4), weights_path=w)
    data = []
    out = pp.run("dwpose", _image(n=8, h=96, w=128), resolution=96, weights_path=w, data_out=data)
    assert out.shape == (8, 96, 128, 3) and len(data) == 8


def test_missing_detector_and_wrong_files_are_sentences(files, tmp_path):
    lone = tmp_path / "dw-ll_ucoco_384.onnx"
    lone.write_bytes((files / "dw-ll_ucoco_384.onnx").read_bytes())
    with pytest.raises(pp.PreprocessorError, match="needs the person detector yolox_l.onnx.*not found.*huggingface.co/yzd-v/DWPose"):
        pp.run("dwpose", _image(), weights_path=lone)
    # the two files swapped: the "pose model" is the detector
    swap = tmp_path / "swap"
    swap.mkdir()
    (swap / "dw-ll_ucoco_384.onnx").write_bytes((files / "yolox_l.onnx").read_bytes())
    (swap / "yolox_l.onnx").write_bytes((files / "yolox_l.onnx").read_bytes())
    with pytest.raises(pp.PreprocessorError, match="not a DWPose whole-body model"):
        pp.run("dwpose", _image(), weights_path=swap / "dw-ll_ucoco_384.onnx")


# ----------------------------------------------------------------------------- the nodes


def test_pose_keypoints_node_gives_picture_and_openpose_json(files, monkeypatch):
    import json

    from comfyui_controlnet_core.nodes.node_defs import NODE_CLASS_MAPPINGS
    from comfyui_controlnet_core.preprocessors.nets import files as nets_files

    monkeypatch.setattr(nets_files, "search_roots", lambda: [files])  # the node finds the files by name
    cls = NODE_CLASS_MAPPINGS["CNCore_PoseKeypoints"]
    spec = cls.INPUT_TYPES()["required"]
    assert list(spec)[:4] == ["image", "method", "resolution", "pixel_perfect"]
    assert spec["method"][0][0] == "dwpose" and "low_threshold" not in spec  # only the pose widgets
    assert cls.RETURN_TYPES == ("IMAGE", "POSE_KEYPOINT")
    image = torch.from_numpy(_image(n=2, h=120, w=160))
    params = {k: pp.PARAMS[[p.name for p in pp.PARAMS].index(k)].default for k in spec if k not in
              ("image", "method", "resolution", "pixel_perfect")}
    out = cls().run(image, "dwpose", 128, False, **params)
    hint, data = out["result"]
    assert hint.shape == (2, 120, 160, 3) and len(data) == 2
    assert json.loads(out["ui"]["openpose_json"][0]) == data
    assert out["ui"]["cncore_weights"] == [str(files / "dw-ll_ucoco_384.onnx")]
    # the Preprocessor node makes the same picture
    pre = NODE_CLASS_MAPPINGS["CNCore_Preprocessor"]()
    all_params = {p.name: p.default for p in pp.PARAMS}
    res = pre.run(image, "dwpose", 128, False, **all_params)
    assert torch.equal(res["result"][0], hint)
    ref = pp.run("dwpose", image.numpy(), resolution=128, weights_path=files / "dw-ll_ucoco_384.onnx")
    np.testing.assert_array_equal(hint.numpy(), ref)


def test_missing_pose_file_names_file_source_and_folder(tmp_path, monkeypatch):
    from comfyui_controlnet_core.nodes.node_defs import NODE_CLASS_MAPPINGS
    from comfyui_controlnet_core.preprocessors.nets import files as nets_files

    monkeypatch.setattr(nets_files, "search_roots", lambda: [tmp_path])
    cls = NODE_CLASS_MAPPINGS["CNCore_PoseKeypoints"]
    with pytest.raises(pp.PreprocessorError, match=r"dw-ll_ucoco_384.onnx or .*torchscript.pt was not found.*yzd-v/DWPose.*put it in"):
        cls().run(torch.zeros(1, 64, 64, 3), "dwpose", 512, False, detect_body=True, detect_hand=True,
                  detect_face=True, scale_stick_for_xinsr_cn=False)


# ----------------------------------------------------------------------------- against Aux itself


def _aux_dwpose():
    """Aux's dwpose modules (comfyui_controlnet_aux at $AUX_PATH), imported without its package
    __init__ (which needs scipy, scikit-image, torchvision for OpenPose): the pre/post code, the
    keypoint formatting and the drawing are Aux's own files, run as they are."""
    import importlib.util
    import sys
    import types

    root = os.environ.get("AUX_PATH")
    if not root:
        pytest.skip("AUX_PATH (a comfyui_controlnet_aux checkout) is not set")
    pytest.importorskip("matplotlib")  # Aux's drawing takes its hand colours from matplotlib
    src = os.path.join(root, "src")
    if src not in sys.path:
        sys.path.insert(0, src)  # custom_controlnet_aux/__init__.py is empty; .util needs torch + hf_hub
    pkg_dir = os.path.join(src, "custom_controlnet_aux", "dwpose")
    name = "aux_dwpose_under_test"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [pkg_dir]
        sys.modules[name] = pkg
        types_mod = importlib.import_module(f"{name}.types")
        body = types.ModuleType(f"{name}.body")  # util imports Keypoint/BodyResult from .body (OpenPose's)
        body.Keypoint, body.BodyResult = types_mod.Keypoint, types_mod.BodyResult
        sys.modules[f"{name}.body"] = body
    wholebody = importlib.import_module(f"{name}.wholebody")
    util = importlib.import_module(f"{name}.util")
    from custom_controlnet_aux.util import HWC3, resize_image_with_pad

    def detect(det_session, pose_session, img_u8, resolution, include_body=True, include_hand=True,
               include_face=True, xinsr=False):
        # DwposeDetector.__call__ (dwpose/__init__.py) with the onnxruntime sessions Wholebody makes
        wb = wholebody.Wholebody()
        wb.det, wb.pose, wb.det_filename, wb.pose_filename = det_session, pose_session, "yolox_l.onnx", "dw-ll_ucoco_384.onnx"
        wb.pose_input_size = (288, 384)
        image, _ = resize_image_with_pad(img_u8, 0, "INTER_CUBIC")
        poses = wholebody.Wholebody.format_result(wb(image.copy()))
        canvas = np.zeros(shape=(image.shape[0], image.shape[1], 3), dtype=np.uint8)
        for pose in poses:  # draw_poses
            if include_body:
                canvas = util.draw_bodypose(canvas, pose.body.keypoints, xinsr)
            if include_hand:
                canvas = util.draw_handpose(canvas, pose.left_hand)
                canvas = util.draw_handpose(canvas, pose.right_hand)
            if include_face:
                canvas = util.draw_facepose(canvas, pose.face)
        canvas, remove_pad = resize_image_with_pad(canvas, resolution, "INTER_CUBIC")
        return HWC3(remove_pad(canvas)), poses

    return detect


@pytest.mark.parametrize("case", ["480x640@512", "700x500@768 xinsr", "300x1000@512 body only"])
def test_whole_method_equals_aux_dwpose(files, case):
    ort = pytest.importorskip("onnxruntime")
    detect = _aux_dwpose()
    size, rest = case.split("@")
    h, w = map(int, size.split("x"))
    resolution = int(rest.split()[0])
    xinsr, body_only = "xinsr" in case, "body only" in case
    frame = _image(seed=h, h=h, w=w)
    sessions = [ort.InferenceSession(str(files / f), providers=["CPUExecutionProvider"])
                for f in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")]
    img = (frame * 255.0).astype(np.uint8)  # common_annotator_call: np.asarray(image * 255., uint8)
    want, aux_poses = detect(*sessions, img, resolution, include_hand=not body_only, include_face=not body_only,
                             xinsr=xinsr)
    model = D.load(files / "dw-ll_ucoco_384.onnx")
    ours, data = D.dwpose_frame(frame, model=model, resolution=resolution, hands=not body_only,
                                face=not body_only, xinsr_sticks=xinsr)
    ours_u8 = np.round(ours * 255).astype(np.uint8)
    assert ours_u8.shape == want.shape
    assert len(aux_poses) == len(data["people"]) >= 1
    # keypoints: same points found, same places (our graph differs from onnxruntime by ~1e-6)
    for a, b in zip(aux_poses, model.detect(img)):
        for pa, pb in zip(a.body.keypoints, b.body):
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert abs(pa.x - pb.x) < 1e-2 and abs(pa.y - pb.y) < 1e-2
    differ = np.any(ours_u8 != want, axis=-1)
    print(f"{case}: {len(aux_poses)} people, {differ.sum()} of {differ.size} pixels differ from Aux")
    assert differ.mean() <= 1e-3, f"{differ.sum()} pixels differ"  # a stick end on a rounding edge at most
    assert want.max() > 0


def test_pose_workflow_uses_dwpose_and_an_openpose_controlnet():
    import json
    from pathlib import Path

    api = json.loads((Path(__file__).parents[1] / "workflows" / "api" / "Pose - DWPose (SD1.5).json").read_text())
    pose = [n for n in api.values() if n["class_type"] == "CNCore_PoseKeypoints"]
    assert pose and pose[0]["inputs"]["method"] == "dwpose"
    loader = [n for n in api.values() if n["class_type"] == "CNCore_LoadControlNet"][0]
    assert "openpose" in loader["inputs"]["control_net_name"]
    apply = [n for n in api.values() if n["class_type"] == "CNCore_ApplyControlNet"][0]
    assert apply["inputs"]["image"][0] == [k for k, n in api.items() if n is pose[0]][0]


def test_damaged_torchscript_file_is_a_sentence(files, tmp_path):
    ts = tmp_path / "dw-ll_ucoco_384_bs5.torchscript.pt"
    ts.write_bytes(b"PK\x03\x04 a zip")
    (tmp_path / "yolox_l.onnx").write_bytes((files / "yolox_l.onnx").read_bytes())
    with pytest.raises(pp.PreprocessorError, match="not a readable TorchScript weights archive.*fetch it again"):
        pp.run("dwpose", _image(), weights_path=ts)


def _traced(folder, seed=5):
    """A random RTMPose traced and saved as Aux's TorchScript pose file (batch 5, as hr16's)."""
    import warnings

    net = H.randomize(H.RTMPose(0.25, 0.33), seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.randn(5, 3, 384, 288))
    path = folder / "dw-ll_ucoco_384_bs5.torchscript.pt"
    traced.save(str(path))
    return net, path


def test_torchscript_reader_equals_torch_jit_load(tmp_path):
    import warnings

    from comfyui_controlnet_core.preprocessors.nets import torchscript

    net, path = _traced(tmp_path)
    sd = torchscript.read_state_dict(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit = torch.jit.load(str(path))  # the reference: torch's own loader (it runs the archive's code)
    ref = jit.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    model = D._torchscript_pose(path, (288, 384))
    x = torch.randn(5, 3, 384, 288)  # the trace's batch: a traced graph keeps its reshape sizes
    with torch.no_grad():
        for a, b in zip(model(x), jit(x)):
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-4


def test_torchscript_pose_file_gives_the_onnx_files_picture(files, tmp_path):
    # the same random RTMPose as TorchScript and as ONNX: the same picture (a batch of 3 crops, not 5)
    net, ts = _traced(tmp_path, seed=6)
    (tmp_path / "yolox_l.onnx").write_bytes((files / "yolox_l.onnx").read_bytes())
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    H.export_onnx(net, torch.randn(1, 3, 384, 288), onnx_dir / "dw-ll_ucoco_384.onnx", "input", ["simcc_x", "simcc_y"])
    (onnx_dir / "yolox_l.onnx").write_bytes((files / "yolox_l.onnx").read_bytes())
    img = _image(seed=3)
    a = pp.run("dwpose", img, resolution=512, weights_path=ts)
    b = pp.run("dwpose", img, resolution=512, weights_path=onnx_dir / "dw-ll_ucoco_384.onnx")
    assert (np.abs(a - b) > 1 / 255).mean() <= 1e-3 and a.max() > 0.5


def test_torchscript_of_another_network_is_a_sentence(tmp_path, files):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)).save(str(tmp_path / "x.torchscript.pt"))
    (tmp_path / "yolox_l.onnx").write_bytes((files / "yolox_l.onnx").read_bytes())
    with pytest.raises(pp.PreprocessorError, match="holds no RTMPose network"):
        pp.run("dwpose", _image(), weights_path=tmp_path / "x.torchscript.pt")
