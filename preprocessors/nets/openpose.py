"""OpenPose body (CMU's 18-keypoint, 6-stage PAF network) as Aux's OpenPose preprocessor runs it:
`body_pose_model.pth` (lllyasviel/Annotators), our torch network, Aux's pre/post-processing and its
drawing (nets/pose_draw.py, shared with dwpose); hands from `hand_pose_model.pth` (same repository,
found next to the body file or by name) and the face from `facenet.pth` (likewise).

Aux's recipe (open_pose/__init__.py, body.py), kept step for step because the openpose
ControlNets were trained on its pictures: the image (uint8 RGB) resized so its short side is
`resolution` (INTER_AREA down, INTER_CUBIC up) and edge-padded to a multiple of 64; the network
sees it in BGR, scaled by 0.5 x 368 / height (INTER_AREA down, LANCZOS4 up), padded with 128 to a
multiple of 8, as x / 256 - 0.5; its maps are upsampled x 8 (LANCZOS4), cropped and resized to the
padded image. Peaks: a 4-neighbour maximum of the sigma-3 Gaussian-smoothed heatmap above 0.1.
Limbs: 19 PAF connections scored on 10 samples, greedy by score, people merged from limbs; a person
with fewer than 4 parts or a mean score below 0.4 is dropped. Drawn on the padded canvas, then the
padding is cut off.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .._cv import cv2
from ..errors import PreprocessorError
from .files import find_weights, load_into, read_state_dict
from .host import Net
from .pose_draw import Keypoint, Pose, draw_poses, poses_to_json

BODY_FILES = ("body_pose_model.pth",)
HAND_FILES = ("hand_pose_model.pth",)
FACE_FILES = ("facenet.pth",)
SOURCE = "https://huggingface.co/lllyasviel/Annotators"

# (name, in, out, kernel) for convs, (name,) for the 2x2 max pools; the file's caffe layer names.
_VGG = [("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("pool1_stage1",), ("conv2_1", 64, 128, 3),
        ("conv2_2", 128, 128, 3), ("pool2_stage1",), ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3),
        ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3), ("pool3_stage1",), ("conv4_1", 256, 512, 3),
        ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3)]


def _stage1(branch: int, out: int) -> list:
    return [(f"conv5_{i}_CPM_L{branch}", 128, 128, 3) for i in (1, 2, 3)] + [
        (f"conv5_4_CPM_L{branch}", 128, 512, 1), (f"conv5_5_CPM_L{branch}", 512, out, 1)]


def _stage(t: int, branch: int, out: int) -> list:
    return ([(f"Mconv1_stage{t}_L{branch}", 185, 128, 7)]
            + [(f"Mconv{i}_stage{t}_L{branch}", 128, 128, 7) for i in (2, 3, 4, 5)]
            + [(f"Mconv6_stage{t}_L{branch}", 128, 128, 1), (f"Mconv7_stage{t}_L{branch}", 128, out, 1)])


# The last conv of each branch has no ReLU, except the heatmap branch of stage 6: the original
# table lists Mconv7_stage6_L1 twice and Mconv7_stage6_L2 never, so the released network ends in
# a ReLU there (its heatmaps are >= 0), and the file's weights were used that way ever since.
_NO_RELU = {"conv5_5_CPM_L1", "conv5_5_CPM_L2", *(f"Mconv7_stage{t}_L{b}" for t in range(2, 6) for b in (1, 2)),
            "Mconv7_stage6_L1", "conv6_2_CPM", *(f"Mconv7_stage{t}" for t in range(2, 7))}

# the hand network: VGG-19 to conv5_3_CPM, then 6 stages of 22 maps (21 joints + background)
_HAND_VGG = list(_VGG[:13]) + [
    ("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3), ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3),
    ("conv5_3_CPM", 512, 128, 3)]


def _layers(table: list) -> nn.Sequential:
    out = []
    for entry in table:
        if len(entry) == 1:
            out.append((entry[0], nn.MaxPool2d(2, 2)))
            continue
        name, cin, cout, k = entry
        out.append((name, nn.Conv2d(cin, cout, k, 1, k // 2)))
        if name not in _NO_RELU:
            out.append((f"relu_{name}", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(out))


class BodyNet(nn.Module):
    """CMU body pose network: (N, 3, H, W) BGR in [-0.5, 0.5) -> PAFs (N, 38, H/8, W/8), heatmaps
    (N, 19, H/8, W/8). Module names model0 / model{t}_{1,2} as in Aux; the file drops the first part."""

    def __init__(self):
        super().__init__()
        self.model0 = _layers(_VGG)
        self.model1_1, self.model1_2 = _layers(_stage1(1, 38)), _layers(_stage1(2, 19))
        for t in range(2, 7):
            setattr(self, f"model{t}_1", _layers(_stage(t, 1, 38)))
            setattr(self, f"model{t}_2", _layers(_stage(t, 2, 19)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.model0(x)
        paf, heat = self.model1_1(feat), self.model1_2(feat)
        for t in range(2, 7):
            y = torch.cat([paf, heat, feat], 1)
            paf, heat = getattr(self, f"model{t}_1")(y), getattr(self, f"model{t}_2")(y)
        return paf, heat


class HandNet(nn.Module):
    """CMU hand network: (N, 3, H, W) BGR in [-0.5, 0.5) -> (N, 22, H/8, W/8) maps."""

    def __init__(self):
        super().__init__()
        self.model1_0 = _layers(_HAND_VGG)
        self.model1_1 = _layers([("conv6_1_CPM", 128, 512, 1), ("conv6_2_CPM", 512, 22, 1)])
        for t in range(2, 7):
            setattr(self, f"model{t}", _layers(
                [(f"Mconv1_stage{t}", 150, 128, 7)] + [(f"Mconv{i}_stage{t}", 128, 128, 7) for i in (2, 3, 4, 5)]
                + [(f"Mconv6_stage{t}", 128, 128, 1), (f"Mconv7_stage{t}", 128, 22, 1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.model1_0(x)
        out = self.model1_1(feat)
        for t in range(2, 7):
            out = getattr(self, f"model{t}")(torch.cat([out, feat], 1))
        return out


class FaceNet(nn.Module):
    """OpenPose's face network: (N, 3, 384, 384) BGR in [-0.5, 0.5) -> the last stage's 71 maps at
    1/8 (70 points + background). Its file names the layers at the top level (conv1_1, Mconv7_stage6)."""

    _TABLE = [e for e in _HAND_VGG] + [("conv6_1_CPM", 128, 512, 1), ("conv6_2_CPM", 512, 71, 1)]

    def __init__(self):
        super().__init__()
        self.order: list[str] = []
        for e in self._TABLE:
            if len(e) == 1:
                self.order.append("pool")
                continue
            name, cin, cout, k = e
            self.add_module(name, nn.Conv2d(cin, cout, k, 1, k // 2))
            self.order.append(name)
        for t in range(2, 7):
            for i, (cin, cout, k) in enumerate([(199, 128, 7)] + [(128, 128, 7)] * 4 + [(128, 128, 1), (128, 71, 1)]):
                self.add_module(f"Mconv{i + 1}_stage{t}", nn.Conv2d(cin, cout, k, 1, k // 2))

    def _conv(self, name: str, h: torch.Tensor) -> torch.Tensor:
        h = getattr(self, name)(h)
        return h if name in _NO_RELU else torch.relu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for name in self.order:
            h = nn.functional.max_pool2d(h, 2, 2) if name == "pool" else self._conv(name, h)
            if name == "conv5_3_CPM":
                feat = h
        for t in range(2, 7):
            h = torch.cat([h, feat], 1)
            for i in range(1, 8):
                h = self._conv(f"Mconv{i}_stage{t}", h)
        return h


def _load_caffe(net: nn.Module, path: Path, what: str) -> nn.Module:
    """A CMU file (caffe layer names, without our first module-name part) into `net`."""
    sd = read_state_dict(path)
    if not isinstance(net, FaceNet) and not any(k.split(".", 1)[0].startswith("model") for k in sd):
        sd = {k: sd[k.split(".", 1)[1]] for k in net.state_dict() if k.split(".", 1)[1] in sd}
    load_into(net, sd, path=path, what=what)
    return net.eval()


_PARTS = {"hand": (HandNet, HAND_FILES, "detect_hand"), "face": (FaceNet, FACE_FILES, "detect_face")}


class OpenPose(nn.Module):
    """The body network and, when their files are there, the hand and face networks; `.to()` moves all."""

    def __init__(self, body: BodyNet, body_path: Path, hand: Optional[HandNet] = None, face: Optional[FaceNet] = None):
        super().__init__()
        self.body, self.hand, self.face = body, hand, face
        self.body_path = Path(body_path)

    def part(self, name: str) -> nn.Module:
        """The hand / face network, loaded on first use from its file (next to the body file, else
        found by name); a sentence when it is nowhere."""
        if getattr(self, name) is None:
            cls, files, widget = _PARTS[name]
            path = self.body_path.with_name(files[0])
            if not path.is_file():
                try:
                    path = find_weights(files, source=SOURCE)
                except PreprocessorError as e:
                    raise PreprocessorError(f"openpose {name}s need {files[0]}: {e}; or turn {widget} off") from None
            device = next(self.body.parameters()).device
            setattr(self, name, _load_caffe(cls(), path, f"the OpenPose {name} network ({files[0]})").to(device))
        return getattr(self, name)


def load(path: Path) -> OpenPose:
    """body_pose_model.pth (and hand_pose_model.pth / facenet.pth beside it, if there) -> OpenPose."""
    path = Path(path)
    model = OpenPose(_load_caffe(BodyNet(), path, "the OpenPose body network (body_pose_model.pth)"), path)
    for name in _PARTS:
        if path.with_name(_PARTS[name][1][0]).is_file():
            model.part(name)
    return model.eval()


# ----------------------------------------------------------------------------- Aux's recipe


def _resize_like_aux(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Aux's smart_resize: INTER_AREA when the size sum shrinks, else LANCZOS4; channel by channel
    for maps that are not 1 or 3 channels."""
    cv = cv2()
    ho, wo = x.shape[:2]
    interp = cv.INTER_AREA if float(h + w) / float(ho + wo) < 1 else cv.INTER_LANCZOS4
    if x.ndim == 2 or x.shape[2] in (1, 3):
        return cv.resize(x, (int(w), int(h)), interpolation=interp)
    return np.stack([cv.resize(x[:, :, i], (int(w), int(h)), interpolation=interp) for i in range(x.shape[2])], 2)


def _pad8(img: np.ndarray, value: int = 128) -> tuple[np.ndarray, int, int]:
    h, w = img.shape[:2]
    ph, pw = (-h) % 8, (-w) % 8
    out = np.concatenate([img, np.full((ph, w, img.shape[2]), value, img.dtype)], 0)
    out = np.concatenate([out, np.full((h + ph, pw, img.shape[2]), value, img.dtype)], 1)
    return out, ph, pw


def body_maps(net: nn.Module, bgr: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps (H, W, 19), PAFs (H, W, 38)) float64 at the image's size, as Aux's Body computes them."""
    h, w = bgr.shape[:2]
    scale = 0.5 * 368 / h
    small = _resize_like_aux(bgr, h * scale, w * scale)
    padded, ph, pw = _pad8(small)
    x = np.ascontiguousarray(np.float32(padded[None]).transpose(0, 3, 1, 2)) / 256 - 0.5
    with torch.inference_mode():
        paf, heat = net(torch.from_numpy(x).to(device))
    out = []
    for m in (heat, paf):
        m = m[0].float().cpu().numpy().transpose(1, 2, 0)
        m = _resize_like_aux(m, m.shape[0] * 8, m.shape[1] * 8)
        m = m[: padded.shape[0] - ph, : padded.shape[1] - pw]
        out.append(_resize_like_aux(m, h, w).astype(np.float64))
    return out[0], out[1]


def _smooth(x: np.ndarray) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(x, 3) (radius 12, mirrored edges) with OpenCV."""
    return cv2().GaussianBlur(x, (25, 25), 3, borderType=cv2().BORDER_REFLECT)


def find_peaks(heatmaps: np.ndarray, threshold: float = 0.1) -> list[list[tuple]]:
    """Per body part: (x, y, score, id) of every 4-neighbour maximum of the smoothed map above
    `threshold`, row-major order; ids count up over all parts; the score is the unsmoothed value."""
    peaks, counter = [], 0
    for part in range(18):
        raw = heatmaps[:, :, part]
        s = _smooth(raw)
        ok = s > threshold
        ok[1:, :] &= s[1:, :] >= s[:-1, :]
        ok[:-1, :] &= s[:-1, :] >= s[1:, :]
        ok[:, 1:] &= s[:, 1:] >= s[:, :-1]
        ok[:, :-1] &= s[:, :-1] >= s[:, 1:]
        # (off-map neighbours count as 0 in the original: always below a value > threshold > 0)
        ys, xs = np.nonzero(ok)
        peaks.append([(int(x), int(y), raw[y, x], counter + i) for i, (x, y) in enumerate(zip(xs, ys))])
        counter += len(xs)
    return peaks


# 19 limbs (1-based parts) and the PAF channels (x, y) of each, as in the CMU model
LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13], [13, 14],
         [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
PAF_CHANNELS = [[12, 13], [20, 21], [14, 15], [16, 17], [22, 23], [24, 25], [0, 1], [2, 3], [4, 5], [6, 7], [8, 9],
                [10, 11], [28, 29], [30, 31], [34, 35], [32, 33], [36, 37], [18, 19], [26, 27]]


def _limb_connections(paf: np.ndarray, cand_a: list, cand_b: list, image_h: int) -> np.ndarray:
    """Rows (id A, id B, score, index in A, index in B): the best-scoring pairs, each peak used once."""
    scored = []
    for i, a in enumerate(cand_a):
        for j, b in enumerate(cand_b):
            vec = np.subtract(b[:2], a[:2])
            norm = max(0.001, math.sqrt(vec[0] * vec[0] + vec[1] * vec[1]))
            vec = np.divide(vec, norm)
            xs = np.linspace(a[0], b[0], num=10)
            ys = np.linspace(a[1], b[1], num=10)
            rows = [int(round(y)) for y in ys]
            cols = [int(round(x)) for x in xs]
            along = paf[rows, cols, 0] * vec[0] + paf[rows, cols, 1] * vec[1]
            score = sum(along) / len(along) + min(0.5 * image_h / norm - 1, 0)
            if len(np.nonzero(along > 0.05)[0]) > 0.8 * len(along) and score > 0:
                scored.append((i, j, score))
    scored.sort(key=lambda c: c[2], reverse=True)  # stable: ties keep the (i, j) order
    out = np.zeros((0, 5))
    for i, j, s in scored:
        if i not in out[:, 3] and j not in out[:, 4]:
            out = np.vstack([out, [cand_a[i][3], cand_b[j][3], s, i, j]])
            if len(out) >= min(len(cand_a), len(cand_b)):
                break
    return out


def assemble(peaks: list[list[tuple]], paf: np.ndarray, image_h: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidates (n, 4): x, y, score, id; people (m, 20): 18 candidate ids or -1, total score,
    part count) by Aux's greedy limb merging."""
    candidates = np.array([p for part in peaks for p in part])
    people = -1 * np.ones((0, 20))
    for k, (pa, pb) in enumerate(LIMBS):
        ca, cb = peaks[pa - 1], peaks[pb - 1]
        if not ca or not cb:
            continue
        conn = _limb_connections(paf[:, :, PAF_CHANNELS[k]], ca, cb, image_h)
        ia, ib = pa - 1, pb - 1
        for row in conn:
            id_a, id_b, score = row[0], row[1], row[2]
            # people holding either end (the original fails on a third; the first two are used here)
            hits = [j for j in range(len(people)) if people[j][ia] == id_a or people[j][ib] == id_b][:2]
            if len(hits) == 1:
                p = people[hits[0]]
                if p[ib] != id_b:
                    p[ib] = id_b
                    p[-1] += 1
                    p[-2] += candidates[int(id_b), 2] + score
            elif len(hits) == 2:
                j1, j2 = hits
                shared = ((people[j1] >= 0).astype(int) + (people[j2] >= 0).astype(int))[:-2]
                if not (shared == 2).any():  # disjoint halves of one person: merge them
                    people[j1][:-2] += people[j2][:-2] + 1
                    people[j1][-2:] += people[j2][-2:]
                    people[j1][-2] += score
                    people = np.delete(people, j2, 0)
                else:
                    people[j1][ib] = id_b
                    people[j1][-1] += 1
                    people[j1][-2] += candidates[int(id_b), 2] + score
            elif k < 17:  # a limb of nobody yet: a new person (the two ear-shoulder limbs never start one)
                p = -1 * np.ones(20)
                p[ia], p[ib] = id_a, id_b
                p[-1] = 2
                p[-2] = candidates[int(id_a), 2] + candidates[int(id_b), 2] + score
                people = np.vstack([people, p])
    keep = [i for i in range(len(people)) if not (people[i][-1] < 4 or people[i][-2] / people[i][-1] < 0.4)]
    return candidates, people[keep]


def hand_boxes(body: list, h: int, w: int) -> list[tuple[int, int, int, bool]]:
    """(x, y, side, is_left) hand boxes from one person's shoulder, elbow and wrist (pixels): beyond
    the wrist by 0.33 x forearm, 1.5 x max(forearm, 0.9 x upper arm) wide, clipped to the image,
    at least 20 px (OpenPose's handDetector)."""
    out = []
    for (s, e, wr), is_left in (((5, 6, 7), True), ((2, 3, 4), False)):
        if body[s] is None or body[e] is None or body[wr] is None:
            continue
        (x1, y1), (x2, y2), (x3, y3) = (body[s].x, body[s].y), (body[e].x, body[e].y), (body[wr].x, body[wr].y)
        x, y = x3 + 0.33 * (x3 - x2), y3 + 0.33 * (y3 - y2)
        side = 1.5 * max(math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2), 0.9 * math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2))
        x, y = max(x - side / 2, 0), max(y - side / 2, 0)
        side = min(w - x if x + side > w else side, h - y if y + side > h else side)
        if side >= 20:
            out.append((int(x), int(y), int(side), is_left))
    return out


def hand_points(net: nn.Module, crop: np.ndarray, device: torch.device) -> np.ndarray:
    """21 (x, y) joint positions in a BGR hand crop ((0, 0) = not found), as Aux's Hand: 4 scales
    averaged at 128 x 128, then per joint the argmax inside the heaviest blob of the smoothed map."""
    cv = cv2()
    hr, wr = crop.shape[:2]
    blurred = cv.GaussianBlur(crop, (0, 0), 0.8)
    avg = np.zeros((128, 128, 22))
    for scale in (0.5 * 368, 1.0 * 368, 1.5 * 368, 2.0 * 368):
        padded, ph, pw = _pad8(_resize_like_aux(blurred, scale, scale))
        x = np.ascontiguousarray(np.float32(padded[None]).transpose(0, 3, 1, 2)) / 256 - 0.5
        with torch.inference_mode():
            m = net(torch.from_numpy(x).to(device))[0].float().cpu().numpy().transpose(1, 2, 0)
        m = _resize_like_aux(m, m.shape[0] * 8, m.shape[1] * 8)[: padded.shape[0] - ph, : padded.shape[1] - pw]
        avg += _resize_like_aux(m, 128, 128) / 4
    out = []
    for part in range(21):
        raw = avg[:, :, part]
        mask = (_smooth(raw) > 0.05).astype(np.uint8)
        if not mask.any():
            out.append([0, 0])
            continue
        n, labels = cv.connectedComponents(mask, connectivity=8)  # skimage's label, connectivity 2
        best = 1 + int(np.argmax([raw[labels == i].sum() for i in range(1, n)]))
        raw = np.where(labels == best, raw, 0)
        row = int(raw.max(1).argmax())
        col = int(raw[row].argmax())
        out.append([int(float(col) * float(wr) / 128.0), int(float(row) * float(hr) / 128.0)])
    return np.array(out)


def face_box(body: list, h: int, w: int) -> Optional[tuple[int, int, int]]:
    """(x, y, side) of the face box from the nose, eyes and ears (pixels), as Aux's faceDetect
    (including its clipping against x + side, not x + 2 side); None if too small (< 20 px)."""
    head, others = body[0], [(body[i], f) for i, f in ((14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5))]
    if head is None or all(k is None for k, _ in others):
        return None
    side = 0.0
    for k, factor in others:
        if k is not None:
            side = max(side, max(abs(head.x - k.x), abs(head.y - k.y)) * factor)
    x, y = max(head.x - side, 0), max(head.y - side, 0)
    side = min(w - x if x + side > w else side * 2, h - y if y + side > h else side * 2)
    return (int(x), int(y), int(side)) if side >= 20 else None


def face_points(net: nn.Module, crop: np.ndarray, device: torch.device) -> np.ndarray:
    """(x, y) per face map with a value > 0.05 (its argmax), in crop pixels; maps with none are left
    out (so fewer than 71 rows), as Aux's Face does."""
    h, w = crop.shape[:2]
    x = torch.from_numpy(_resize_like_aux(crop, 384, 384)).permute(2, 0, 1) / 256.0 - 0.5
    with torch.inference_mode():
        maps = net(x[None].to(device))
        maps = torch.nn.functional.interpolate(maps, (h, w), mode="bilinear", align_corners=True)[0].cpu().numpy()
    out = []
    for m in maps:
        if (m > 0.05).any():
            row, col = np.unravel_index(int(np.argmax(m)), m.shape)  # the first maximum, row-major
            out.append([col, row])
    return np.array(out)


def detect(model: OpenPose | BodyNet, rgb: np.ndarray, device: torch.device, hands: bool = False,
           face: bool = False) -> list[Pose]:
    """People's keypoints in an RGB uint8 image, normalised to [0, 1] by its size (as Aux)."""
    body_net = model.body if isinstance(model, OpenPose) else model
    bgr = rgb[:, :, ::-1].copy()
    h, w = bgr.shape[:2]
    heat, paf = body_maps(body_net, bgr, device)
    candidates, people = assemble(find_peaks(heat), paf, h)
    poses = []
    for person in people:
        pix = [Keypoint(candidates[i][0], candidates[i][1]) if i != -1 else None for i in person[:18].astype(int)]
        found = {True: None, False: None}
        if hands:
            for x, y, side, is_left in hand_boxes(pix, h, w):
                pts = hand_points(model.part("hand"), bgr[y : y + side, x : x + side], device)
                found[is_left] = _to_image(pts, x, y, h, w)
        face_pts = None
        box = face_box(pix, h, w) if face else None
        if box is not None:
            x, y, side = box
            face_pts = _to_image(face_points(model.part("face"), bgr[y : y + side, x : x + side], device), x, y, h, w)
        body = [Keypoint(k.x / float(w), k.y / float(h)) if k is not None else None for k in pix]
        poses.append(Pose(body, found[True], found[False], face_pts))
    return poses


def _to_image(pts: np.ndarray, x: int, y: int, h: int, w: int) -> Optional[list[Keypoint]]:
    """Crop points to normalised image coordinates; (0, 0) "not found" points become negative (drawn
    nowhere), as in Aux."""
    pts = pts.astype(np.float32)
    if pts.ndim != 2 or pts.shape[1] != 2:
        return None
    px = np.where(pts[:, 0] < 1e-6, -1, pts[:, 0] + x) / float(w)
    py = np.where(pts[:, 1] < 1e-6, -1, pts[:, 1] + y) / float(h)
    return [Keypoint(a, b) for a, b in zip(px, py)]


def _aux_resize(img: np.ndarray, resolution: int) -> tuple[np.ndarray, int, int]:
    """Aux's resize_image_with_pad: short side to `resolution`, then edge padding to a multiple of 64.
    Returns the padded image and the unpadded size."""
    cv = cv2()
    h, w = img.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = int(np.round(float(h) * k)), int(np.round(float(w) * k))
    small = cv.resize(img, (tw, th), interpolation=cv.INTER_CUBIC if k > 1 else cv.INTER_AREA).reshape(th, tw, -1)
    ph, pw = -(-th // 64) * 64 - th, -(-tw // 64) * 64 - tw
    return np.pad(small, [[0, ph], [0, pw], [0, 0]], mode="edge"), th, tw


def openpose_frame(frame: np.ndarray, *, model: OpenPose | Net, resolution: int, body: bool = True,
                   hands: bool = False, face: bool = False, xinsr_sticks: bool = False) -> tuple[np.ndarray, dict]:
    """One float RGB frame -> (the pose picture at `resolution` (short side) as float [0, 1], its
    OpenPose JSON with coordinates normalised to [0, 1], as Aux's OpenPose node outputs it)."""
    if isinstance(model, Net):
        device = model.device()
        model = model.module
    else:
        device = next(model.parameters()).device
    img = (frame * np.float32(255.0)).astype(np.uint8)
    padded, th, tw = _aux_resize(img, resolution)
    poses = detect(model, padded, device, hands=hands, face=face)
    canvas = draw_poses(poses, padded.shape[0], padded.shape[1], body=body, hands=hands, face=face, xinsr=xinsr_sticks)
    picture = canvas[:th, :tw]
    return picture.astype(np.float32) / np.float32(255.0), poses_to_json(poses, th, tw, body, hands, face)


def method(frame: np.ndarray, *, model: OpenPose | Net, resolution: int, detect_body: bool, detect_hand: bool,
           detect_face: bool, scale_stick_for_xinsr_cn: bool) -> tuple[np.ndarray, dict]:
    """The registry's `openpose` method (body, hands, face)."""
    return openpose_frame(frame, model=model, resolution=resolution, body=detect_body, hands=detect_hand,
                          face=detect_face, xinsr_sticks=scale_stick_for_xinsr_cn)

