"""Blend masks for pasting a swapped crop back.

- `inswapper` (default): insightface inswapper's `paste_back` mask, built in frame space — the crop's
  white box warped into the frame, thresholded, eroded by max(size/10, 10) px and Gaussian-blurred
  with a (2·max(size/20, 5) + 1) kernel, size being the warped box's geometric-mean side. Outputs
  match insightface's own paste-back (the parity test checks it).
- `box`, `ellipse`: a feathered box or ellipse in crop space (softer edge, more of the crop kept).
"""

from __future__ import annotations

from enum import StrEnum

import cv2
import numpy as np

from facefleet.agent.pipeline.stage import FrameState


class MaskKind(StrEnum):
    INSWAPPER = "inswapper"
    BOX = "box"
    ELLIPSE = "ellipse"


DEFAULT_MASK = MaskKind.INSWAPPER
WHITE = 255.0  # the reference warps a 255-valued box and thresholds it at 20


def build_mask(kind: MaskKind, size: int, feather: float = 0.08) -> np.ndarray:
    """float32 size x size in crop space: 0..1 alpha, or for `inswapper` the 255-valued box that
    `frame_mask` erodes and blurs after it is warped into the frame."""
    if kind == MaskKind.INSWAPPER:
        return np.full((size, size), WHITE, np.float32)
    edge = max(1, round(size * feather))
    mask = np.zeros((size, size), np.float32)
    if kind == MaskKind.BOX:
        mask[edge : size - edge, edge : size - edge] = 1.0
    else:
        center = (size // 2, int(size * 0.52))
        axes = (int(size * 0.40) - edge // 2, int(size * 0.48) - edge // 2)
        cv2.ellipse(mask, center, axes, 0, 0, 360, 1.0, -1)
    blur = edge * 2 + 1
    return cv2.GaussianBlur(mask, (blur, blur), 0)


def erosion_and_blur(warped_box: np.ndarray) -> tuple[int, int]:
    """The reference's erosion kernel side and blur half-size for a warped white box."""
    rows, cols = np.where(warped_box == WHITE)
    if rows.size == 0:
        return 10, 5
    side = int(np.sqrt((rows.max() - rows.min()) * (cols.max() - cols.min())))
    return max(side // 10, 10), max(side // 20, 5)


def frame_mask(warped_box: np.ndarray) -> np.ndarray:
    """insightface's paste-back alpha (0..1) from the crop's white box warped into the frame."""
    mask = warped_box.copy()
    mask[mask > 20] = WHITE
    erosion, blur = erosion_and_blur(mask)
    mask = cv2.erode(mask, np.ones((erosion, erosion), np.uint8), iterations=1)
    mask = cv2.GaussianBlur(mask, (2 * blur + 1, 2 * blur + 1), 0)
    return mask / WHITE


class MaskStage:
    name = "mask"

    def __init__(self, kind: MaskKind, feather: float = 0.08):
        self.kind = kind
        self.feather = feather
        self._cache: dict[int, np.ndarray] = {}

    def process(self, state: FrameState) -> FrameState:
        for patch in state.patches:
            size = patch.crop.shape[0]
            if size not in self._cache:
                self._cache[size] = build_mask(self.kind, size, self.feather)
            patch.mask = self._cache[size]
            patch.mask_in_frame = self.kind == MaskKind.INSWAPPER
        return state
