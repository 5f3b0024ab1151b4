"""Blend masks in crop space: a feathered box or a feathered ellipse."""

from __future__ import annotations

from enum import StrEnum

import cv2
import numpy as np

from facefleet.agent.pipeline.stage import FrameState


class MaskKind(StrEnum):
    BOX = "box"
    ELLIPSE = "ellipse"


def build_mask(kind: MaskKind, size: int, feather: float = 0.08) -> np.ndarray:
    """float32 size x size in 0..1; `feather` is the soft edge as a fraction of the crop size."""
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
        return state
