"""Pose keypoints as data and as the picture the pose ControlNets were trained on (numpy + OpenCV).

Shared by `dwpose` and `openpose`. The drawing is Aux's / ControlNet's (`draw_bodypose`,
`draw_handpose`, `draw_facepose`): the same limb order, colours, 0.6x limb shade, ellipse sticks of
half-width 4 (x the xinsr scale), joint radii 4 / 4 / 3, hand edge colours from HSV; the
ControlNets learnt exactly these pictures, so every constant here matters.

The data is the OpenPose JSON layout Aux's POSE_KEYPOINT output uses (and ComfyUI pose editors
read): per frame `{"people": [{"pose_keypoints_2d": [x, y, c, ...] | None, "face_keypoints_2d",
"hand_left_keypoints_2d", "hand_right_keypoints_2d"}], "canvas_height": H, "canvas_width": W}`,
pixel coordinates of the input image, c = 1.0 for a found point and (0, 0, 0) for a missing one.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

from .._cv import cv2


class Keypoint(NamedTuple):
    x: float
    y: float
    score: float = 1.0
    id: int = -1


class Pose(NamedTuple):
    """One person: 18 body points (OpenPose order; None = not found), 21 per hand and 70 face points
    (None for a part not found at all)."""

    body: list[Optional[Keypoint]]
    left_hand: Optional[list[Optional[Keypoint]]] = None
    right_hand: Optional[list[Optional[Keypoint]]] = None
    face: Optional[list[Optional[Keypoint]]] = None


# OpenPose's 17 limbs over its 18 body points (1-based, as in the CMU tables) and the 18 colours.
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
         (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
              (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
_EPS = 0.01  # hand and face points at (<= 0.01, *) are "not found" placeholders in OpenPose files


def _hsv_colour(h: float) -> tuple[float, float, float]:
    """HSV (h, 1, 1) -> RGB x 255, matplotlib's `hsv_to_rgb` for full saturation and value."""
    h6 = h * 6.0
    i = int(math.floor(h6)) % 6
    f = h6 - math.floor(h6)
    rgb = ((1, f, 0), (1 - f, 1, 0), (0, 1, f), (0, 1 - f, 1), (f, 0, 1), (1, 0, 1 - f))[i]
    return tuple(float(c) * 255.0 for c in rgb)


_HAND_COLOURS = tuple(_hsv_colour(i / float(len(HAND_EDGES))) for i in range(len(HAND_EDGES)))


def _scale(canvas: np.ndarray, points: Sequence[Optional[Keypoint]]) -> tuple[float, float]:
    """(H, W) to multiply the points by: the canvas size when every found point is in [0, 1]
    (normalised coordinates, as pose editors may send), else 1 (pixels)."""
    found = [k for k in points if k is not None]
    if found and all(0 <= abs(k.x) <= 1 and 0 <= abs(k.y) <= 1 for k in found):
        return float(canvas.shape[0]), float(canvas.shape[1])
    return 1.0, 1.0


def stick_scale(h: int, w: int, xinsr: bool) -> int:
    """Limb half-width factor: 1, or xinsir's SDXL openpose ControlNet's scaling by canvas size."""
    side = max(h, w)
    return (1 if side < 500 else min(2 + side // 1000, 7)) if xinsr else 1


def draw_body(canvas: np.ndarray, points: Sequence[Optional[Keypoint]], xinsr: bool = False) -> np.ndarray:
    cv = cv2()
    H, W = _scale(canvas, points)
    width = 4 * stick_scale(canvas.shape[0], canvas.shape[1], xinsr)
    for (a, b), colour in zip(LIMBS, COLORS):
        k1, k2 = points[a - 1], points[b - 1]
        if k1 is None or k2 is None:
            continue
        ys = np.array([k1.x, k2.x]) * W  # (these names follow the original: X holds rows)
        xs = np.array([k1.y, k2.y]) * H
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
        poly = cv.ellipse2Poly((int(np.mean(ys)), int(np.mean(xs))), (int(length / 2), width), int(angle), 0, 360, 1)
        cv.fillConvexPoly(canvas, poly, [int(float(c) * 0.6) for c in colour])
    for k, colour in zip(points, COLORS):
        if k is not None:
            cv.circle(canvas, (int(k.x * W), int(k.y * H)), 4, colour, thickness=-1)
    return canvas


def draw_hand(canvas: np.ndarray, points: Optional[Sequence[Optional[Keypoint]]]) -> np.ndarray:
    if not points:
        return canvas
    cv = cv2()
    H, W = _scale(canvas, points)
    for (a, b), colour in zip(HAND_EDGES, _HAND_COLOURS):
        k1, k2 = points[a], points[b]
        if k1 is None or k2 is None:
            continue
        x1, y1, x2, y2 = int(k1.x * W), int(k1.y * H), int(k2.x * W), int(k2.y * H)
        if x1 > _EPS and y1 > _EPS and x2 > _EPS and y2 > _EPS:
            cv.line(canvas, (x1, y1), (x2, y2), colour, thickness=2)
    for k in points:
        if k is not None:
            x, y = int(k.x * W), int(k.y * H)
            if x > _EPS and y > _EPS:
                cv.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    return canvas


def draw_face(canvas: np.ndarray, points: Optional[Sequence[Optional[Keypoint]]]) -> np.ndarray:
    if not points:
        return canvas
    cv = cv2()
    H, W = _scale(canvas, points)
    for k in points:
        if k is not None:
            x, y = int(k.x * W), int(k.y * H)
            if x > _EPS and y > _EPS:
                cv.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)
    return canvas


def draw_poses(poses: Sequence[Pose], h: int, w: int, body: bool = True, hands: bool = True, face: bool = True,
               xinsr: bool = False) -> np.ndarray:
    """All poses on a black (h, w, 3) uint8 RGB canvas, person by person (body, hands, face)."""
    canvas = np.zeros((h, w, 3), np.uint8)
    for p in poses:
        if body:
            draw_body(canvas, p.body, xinsr)
        if hands:
            draw_hand(canvas, p.left_hand)
            draw_hand(canvas, p.right_hand)
        if face:
            draw_face(canvas, p.face)
    return canvas


def _flat(points: Optional[Sequence[Optional[Keypoint]]]) -> Optional[list[float]]:
    if not points:
        return None
    out: list[float] = []
    for k in points:
        out += [float(k.x), float(k.y), 1.0] if k is not None else [0.0, 0.0, 0.0]
    return out


def poses_to_json(poses: Sequence[Pose], h: int, w: int, body: bool = True, hands: bool = True,
                  face: bool = True) -> dict:
    """One frame's poses in the OpenPose JSON layout (parts switched off are left out, as Aux does:
    a body that is off is 18 missing points, hands / face that are off are None)."""
    return {
        "people": [
            {
                "pose_keypoints_2d": _flat(p.body if body else [None] * 18),
                "face_keypoints_2d": _flat(p.face) if face else None,
                "hand_left_keypoints_2d": _flat(p.left_hand) if hands else None,
                "hand_right_keypoints_2d": _flat(p.right_hand) if hands else None,
            }
            for p in poses
        ],
        "canvas_height": int(h),
        "canvas_width": int(w),
    }


def to_resolution(canvas: np.ndarray, resolution: int) -> np.ndarray:
    """Aux's `resize_image_with_pad(canvas, resolution)` then `remove_pad`: the short side scaled to
    `resolution` (sizes rounded half-to-even as numpy does), INTER_AREA when shrinking or keeping the
    size, INTER_CUBIC when growing. The edge padding Aux adds is cut off again, so it is left out."""
    h, w = canvas.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = int(np.round(float(h) * k)), int(np.round(float(w) * k))
    cv = cv2()
    out = cv.resize(canvas, (tw, th), interpolation=cv.INTER_CUBIC if k > 1 else cv.INTER_AREA)
    return out.reshape(th, tw, -1)
