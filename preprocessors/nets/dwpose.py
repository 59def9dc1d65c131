"""DWPose: YOLOX-L person boxes, then RTMPose-L whole-body keypoints (133 COCO-WholeBody points)
in each box, mapped to OpenPose's 18 body + 2 x 21 hand + 70 face points and drawn as Aux does.

Files (the user's; nothing is downloaded): `dw-ll_ucoco_384.onnx` (the pose model) and
`yolox_l.onnx` (the person detector), both from the Hugging Face repository yzd-v/DWPose. They run
through our ONNX interpreter (`onnx_graph.py`) on whichever device the module is moved to, so there
is no onnxruntime and no CPU fallback. The pose model may also be Aux's default TorchScript file
`dw-ll_ucoco_384_bs5.torchscript.pt` (hr16/DWPose-TorchScript-BatchSize5): its tensors are read
without running it (torchscript.py) into our RTMPose modules (rtmpose.py), by mmpose's module names.

The pipeline follows Aux (comfyui_controlnet_aux `dwpose/`) step for step, because the pose
ControlNets were trained on its pictures: detection and keypoints on the image at its own size
(uint8 RGB), letterbox 640 x 640 (fill 114, INTER_LINEAR), YOLOX decode (strides 8/16/32), NMS IoU
0.45 over boxes scoring > 0.1, people scoring > 0.3; per box a 1.25x padded, 288:384 crop by
warpAffine, ImageNet normalisation, SimCC argmax decode (score = the lower of the x and y maxima);
neck = mean of the shoulders; points scoring < 0.3 are dropped. The picture is drawn at the input
size and then resized to `resolution` (short side), so strokes are as thin as Aux's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .._cv import cv2
from ..errors import PreprocessorError
from .files import find_weights, load_into
from .host import Net
from .onnx_graph import OnnxGraph, load_onnx
from .pose_draw import Keypoint, Pose, draw_poses, poses_to_json, to_resolution

POSE_FILES = ("dw-ll_ucoco_384.onnx", "dw-ll_ucoco_384_bs5.torchscript.pt")
TORCHSCRIPT_SOURCE = "https://huggingface.co/hr16/DWPose-TorchScript-BatchSize5"
DETECTOR_FILES = ("yolox_l.onnx",)
SOURCE = "https://huggingface.co/yzd-v/DWPose"
WEIGHTS_DOC = (
    f"dw-ll_ucoco_384.onnx (pose) and yolox_l.onnx (person boxes) from {SOURCE}"
)

DETECT_SIZE = (640, 640)
POSE_SIZE = (288, 384)  # (w, h) of the crop the pose model takes ("384" in the file name)
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
SCORE_MIN = 0.3  # a keypoint below this is "not found"; also the person-box threshold


# ----------------------------------------------------------------------------- detector (YOLOX)


def letterbox(img: np.ndarray, size: tuple[int, int] = DETECT_SIZE) -> tuple[np.ndarray, float]:
    """The image scaled to fit `size` (top-left, grey 114 around) as (1, 3, h, w) float32 0-255, and
    the scale. Sizes truncate (`int(h * r)`), as YOLOX's demo code does."""
    r = min(size[0] / img.shape[0], size[1] / img.shape[1])
    h, w = max(1, int(img.shape[0] * r)), max(1, int(img.shape[1] * r))  # (1: a 8 x 16384 strip)
    out = np.full((size[0], size[1], 3), 114, np.uint8)
    out[:h, :w] = cv2().resize(img, (w, h), interpolation=cv2().INTER_LINEAR).reshape(h, w, 3)
    return np.ascontiguousarray(out.transpose(2, 0, 1)[None], dtype=np.float32), r


def _grids(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for s in (8, 16, 32):
        xv, yv = np.meshgrid(np.arange(size[1] // s), np.arange(size[0] // s))
        g = np.stack((xv, yv), 2).reshape(1, -1, 2)
        grids.append(g)
        strides.append(np.full((*g.shape[:2], 1), s))
    return np.concatenate(grids, 1), np.concatenate(strides, 1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy NMS, highest score first, with the +1 pixel area convention of YOLOX's numpy code."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(overlap <= iou)[0] + 1]
    return keep


def person_boxes(pred: np.ndarray, ratio: float, size: tuple[int, int] = DETECT_SIZE) -> np.ndarray:
    """YOLOX raw output (8400, 85) -> person boxes (n, 4) x1 y1 x2 y2 in image pixels, best first.

    Class-wise NMS keeps classes apart, so running it for class 0 alone gives Aux's person boxes."""
    pred = pred.copy()
    grids, strides = _grids(size)
    pred[:, :2] = (pred[:, :2] + grids[0]) * strides[0]
    pred[:, 2:4] = np.exp(pred[:, 2:4]) * strides[0]
    scores = pred[:, 4] * pred[:, 5]  # objectness x "person"
    boxes = np.ones_like(pred[:, :4])
    boxes[:, 0] = pred[:, 0] - pred[:, 2] / 2.0
    boxes[:, 1] = pred[:, 1] - pred[:, 3] / 2.0
    boxes[:, 2] = pred[:, 0] + pred[:, 2] / 2.0
    boxes[:, 3] = pred[:, 1] + pred[:, 3] / 2.0
    boxes /= ratio
    valid = (scores > 0.1) & np.isfinite(boxes).all(1)  # (a box of inf size: a broken file, not a person)
    if not valid.any():
        return np.zeros((0, 4), np.float64)
    boxes, scores = boxes[valid], scores[valid]
    keep = nms(boxes, scores, 0.45)
    boxes, scores = boxes[keep], scores[keep]
    # float64 from here, as in YOLOX's code (its detections are concatenated with float64 class ids)
    return boxes[scores > SCORE_MIN].astype(np.float64)


# ----------------------------------------------------------------------------- pose (RTMPose)


def _warp_matrix(center: np.ndarray, scale: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """mmpose's get_warp_matrix without rotation: the box (center, scale) onto a w x h crop."""
    dst_w, dst_h = size
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = center
    src[1] = center + np.array([0.0, scale[0] * -0.5])
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + np.array([0.0, dst_w * -0.5])
    for pts in (src, dst):  # the third point: a - b turned 90 degrees about b
        d = pts[0] - pts[1]
        pts[2] = pts[1] + np.r_[-d[1], d[0]]
    return cv2().getAffineTransform(np.float32(src), np.float32(dst))


def crops(img: np.ndarray, boxes: np.ndarray, size: tuple[int, int] = POSE_SIZE):
    """Per box: the normalised (h, w, 3) crop, its center and (aspect-fixed) scale."""
    out, centers, scales = [], [], []
    w, h = size
    for x0, y0, x1, y1 in boxes:
        center = np.array([x0 + x1, y0 + y1]) * 0.5
        scale = np.array([x1 - x0, y1 - y0]) * 1.25
        bw, bh = scale
        scale = np.array([bw, bw / (w / h)]) if bw > bh * (w / h) else np.array([bh * (w / h), bh])
        crop = cv2().warpAffine(img, _warp_matrix(center, scale, size), (int(w), int(h)), flags=cv2().INTER_LINEAR)
        out.append((crop - MEAN) / STD)
        centers.append(center)
        scales.append(scale)
    return out, centers, scales


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray, split: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, Wx), (N, K, Wy) -> locations (N, K, 2) in crop pixels and scores (N, K): the argmax on
    each axis, the score the lower of the two maxima; points with score <= 0 at -1."""
    n, k, _ = simcc_x.shape
    sx, sy = simcc_x.reshape(n * k, -1), simcc_y.reshape(n * k, -1)
    locs = np.stack((np.argmax(sx, 1), np.argmax(sy, 1)), -1).astype(np.float32)
    vals = np.minimum(np.amax(sx, 1), np.amax(sy, 1))
    locs[vals <= 0.0] = -1
    return locs.reshape(n, k, 2) / split, vals.reshape(n, k)


# mmpose COCO-WholeBody order -> OpenPose body order, after the neck is inserted at 17
_MMPOSE = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
_OPENPOSE = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]


def to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> list[Pose]:
    """133 whole-body points per person -> OpenPose body 18, hands 21 + 21, face 68 + the 2 eyes."""
    info = np.concatenate((keypoints, scores[..., None]), axis=-1)
    neck = np.mean(info[:, [5, 6]], axis=1)
    neck[:, 2:4] = np.logical_and(info[:, 5, 2:4] > SCORE_MIN, info[:, 6, 2:4] > SCORE_MIN).astype(int)
    info = np.insert(info, 17, neck, axis=1)
    info[:, _OPENPOSE] = info[:, _MMPOSE]

    def part(rows: np.ndarray) -> Optional[list[Optional[Keypoint]]]:
        # (|x|, |y| < 1e6: a broken file's absurd boxes give points no picture can hold)
        pts = [Keypoint(x, y, s, i) if s >= SCORE_MIN and abs(x) < 1e6 and abs(y) < 1e6 else None
               for i, (x, y, s) in enumerate(rows)]
        return None if all(p is None for p in pts) else pts

    poses = []
    for person in info:
        body = part(person[:18]) or [None] * 18
        face = part(person[24:92])
        if face is not None:  # OpenPose's face has 70 points: DWPose's 68 + the two eyes
            face += [body[14], body[15]]
        poses.append(Pose(body, part(person[92:113]), part(person[113:134]), face))
    return poses


# ----------------------------------------------------------------------------- the model


class DWPose(torch.nn.Module):
    """The two graphs; `.to(device)` moves both. `detect(image uint8 RGB) -> [Pose]`."""

    def __init__(self, pose: torch.nn.Module, detector: Optional[OnnxGraph], pose_size: tuple[int, int] = POSE_SIZE):
        super().__init__()
        self.pose = pose
        self.detector = detector
        self.pose_size = pose_size

    def _device(self) -> torch.device:
        for b in self.pose.parameters():
            return b.device
        return torch.device("cpu")

    def _run(self, graph: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
        dtype = next(iter(graph.parameters()), torch.empty(0)).dtype
        t = torch.from_numpy(x).to(self._device(), dtype)
        with torch.inference_mode():
            return [o.float().cpu().numpy() for o in graph(t)]

    def boxes(self, img: np.ndarray) -> np.ndarray:
        if self.detector is None:  # no detector: the whole image is one person's box
            return np.array([[0, 0, img.shape[1], img.shape[0]]], np.float64)
        x, ratio = letterbox(img)
        (pred,) = self._run(self.detector, x)
        if pred.ndim != 3 or pred.shape[-1] < 6:
            raise PreprocessorError(
                f"{self.detector.source} gives output of shape {pred.shape}, not YOLOX's (1, 8400, 85); use yolox_l.onnx"
            )
        return person_boxes(pred[0], ratio)

    def detect(self, img: np.ndarray) -> list[Pose]:
        boxes = self.boxes(img)
        if len(boxes) == 0:
            return []
        patches, centers, scales = crops(img, boxes, self.pose_size)
        batch = np.stack(patches, 0).transpose(0, 3, 1, 2).astype(np.float32)
        outs = self._run(self.pose, batch)
        if len(outs) != 2 or outs[0].ndim != 3 or outs[0].shape[1] != 133:
            raise PreprocessorError(
                f"{getattr(self.pose, 'source', 'the pose model')} is not a DWPose whole-body model (outputs {[o.shape for o in outs]}, expected "
                "simcc_x (N, 133, 576) and simcc_y (N, 133, 768)); use dw-ll_ucoco_384.onnx"
            )
        locs, scores = simcc_decode(*outs)
        size = np.array(self.pose_size)
        keypoints = np.stack([locs[i] / size * scales[i] + centers[i] - scales[i] / 2 for i in range(len(boxes))])
        return to_openpose(keypoints, scores)


def _input_size(name: str) -> tuple[int, int]:
    """The crop size from the file name, as Aux guesses it ("384" -> 288 x 384, "256" -> 256 x 256)."""
    if "384" in name:
        return (288, 384)
    if "256" in name:
        return (256, 256)
    return (192, 256)


def load(pose_path: Path, detector_path: Optional[Path] = None) -> DWPose:
    """The DWPose model from its two files. The detector: `detector_path`, else yolox_l.onnx next to
    the pose file (Aux keeps both in ckpts/yzd-v/DWPose), else wherever `find_weights` finds it."""
    pose_path = Path(pose_path)
    if pose_path.suffix != ".onnx" and not pose_path.name.endswith(".torchscript.pt"):
        raise PreprocessorError(
            f"{pose_path.name} is neither an .onnx nor a .torchscript.pt file; put {POSE_FILES[0]} from {SOURCE} "
            f"in {pose_path.parent}"
        )
    if detector_path is None:
        detector_path = pose_path.with_name(DETECTOR_FILES[0])
        if not detector_path.is_file():
            try:
                detector_path = find_weights(DETECTOR_FILES, source=SOURCE)
            except PreprocessorError as e:
                raise PreprocessorError(
                    f"dwpose needs the person detector {DETECTOR_FILES[0]} besides {pose_path.name}: {e}; "
                    f"the folder of {pose_path.name} ({pose_path.parent}) is a good place"
                ) from None
    if Path(detector_path).suffix != ".onnx":
        raise PreprocessorError(
            f"dwpose reads the .onnx files ({POSE_FILES[0]}, {DETECTOR_FILES[0]} from {SOURCE}); "
            f"got {pose_path.name} and {Path(detector_path).name}"
        )
    size = _input_size(pose_path.name)
    pose = load_onnx(pose_path) if pose_path.suffix == ".onnx" else _torchscript_pose(pose_path, size)
    return DWPose(pose, load_onnx(detector_path), size).eval()


def _torchscript_pose(path: Path, size: tuple[int, int]) -> torch.nn.Module:
    """An RTMPose TorchScript archive's tensors in our RTMPose (widths and depth from the shapes)."""
    from .rtmpose import RTMPose
    from .torchscript import read_state_dict

    sd = read_state_dict(path)
    stem, blocks = sd.get("backbone.stem.0.conv.weight"), {k.split(".")[4] for k in sd if k.startswith("backbone.stage1.1.blocks.")}
    if stem is None or not blocks:
        raise PreprocessorError(
            f"{path.name} holds no RTMPose network by mmpose's names (e.g. backbone.stem.0.conv.weight); use "
            f"{POSE_FILES[0]} from {SOURCE}"
        )
    net = RTMPose(widen=2 * stem.shape[0] / 64, deepen=len(blocks) / 3, input_size=size)
    own = net.state_dict()
    load_into(net, {k: v for k, v in sd.items() if k in own or not k.startswith(("data_preprocessor.",))},
              path=path, what="DWPose (RTMPose) TorchScript")
    net.source = path.name
    return net.eval()


def method(frame: np.ndarray, *, model: DWPose | Net, resolution: int, detect_body: bool, detect_hand: bool,
           detect_face: bool, scale_stick_for_xinsr_cn: bool) -> tuple[np.ndarray, dict]:
    """The registry's `dwpose` method (its parameter names are the node's widgets)."""
    return dwpose_frame(frame, model=model, resolution=resolution, body=detect_body, hands=detect_hand,
                        face=detect_face, xinsr_sticks=scale_stick_for_xinsr_cn)


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """A float [0, 1] frame as Aux gets it: `image * 255` truncated to uint8."""
    return (frame * np.float32(255.0)).astype(np.uint8)


def dwpose_frame(frame: np.ndarray, *, model: DWPose | Net, resolution: int, body: bool = True,
                 hands: bool = True, face: bool = True, xinsr_sticks: bool = False) -> tuple[np.ndarray, dict]:
    """One float RGB frame (H, W, 3) -> (the pose picture at `resolution` as float [0, 1], its
    OpenPose JSON at the frame's size)."""
    if isinstance(model, Net):
        model.device()  # the host puts it where it runs now (ComfyUI: GPU when there is one)
        model = model.module
    img = to_uint8(frame)
    h, w = img.shape[:2]
    poses = model.detect(img)
    canvas = draw_poses(poses, h, w, body=body, hands=hands, face=face, xinsr=xinsr_sticks)
    picture = to_resolution(canvas, resolution)
    return picture.astype(np.float32) / np.float32(255.0), poses_to_json(poses, h, w, body, hands, face)

