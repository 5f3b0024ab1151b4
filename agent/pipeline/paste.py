"""Paste swapped crops back: inverse affine warp of crop and mask, blended with a ratio.

Only the face's region of the frame is touched: the warped crop's bounding box, widened by the
inswapper mask's blur reach so that its erosion and blur see the same zeros they would over the
whole frame (the result equals insightface's full-frame paste-back). Blending is
`alpha·face + (1 - alpha)·frame` in float32, truncated to uint8, as the reference does.
"""

from __future__ import annotations

import cv2
import numpy as np

from facefleet.agent.pipeline.mask import frame_mask
from facefleet.agent.pipeline.stage import FrameState, SwapPatch


def paste_patch(frame: np.ndarray, patch: SwapPatch, blend: float) -> None:
    """Blend one patch into `frame` in place, touching only the patch's region."""
    if patch.mask is None:
        raise ValueError("paste needs a mask: run the mask stage before paste")
    height, width = frame.shape[:2]
    size = patch.crop.shape[0]
    inverse = cv2.invertAffineTransform(patch.matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
    x1, y1 = np.floor(corners.min(axis=0)).astype(int)
    x2, y2 = np.ceil(corners.max(axis=0)).astype(int)
    if patch.mask_in_frame:  # room for a zero ring around the box wider than the blur's reach
        reach = int(np.sqrt(max(1, (x2 - x1) * (y2 - y1)))) // 10 + 12
        x1, y1, x2, y2 = x1 - reach, y1 - reach, x2 + reach, y2 + reach
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
    if x2 <= x1 or y2 <= y1:
        return
    shifted = inverse.copy()
    shifted[:, 2] -= (x1, y1)
    region = (x2 - x1, y2 - y1)
    warped = cv2.warpAffine(patch.crop, shifted, region, borderValue=0.0)
    alpha = cv2.warpAffine(patch.mask, shifted, region, borderValue=0.0)
    alpha = frame_mask(alpha) if patch.mask_in_frame else np.clip(alpha, 0.0, 1.0)
    if blend != 1.0:
        alpha = alpha * np.float32(blend)
    alpha = alpha.astype(np.float32)[:, :, None]
    roi = frame[y1:y2, x1:x2].astype(np.float32)
    frame[y1:y2, x1:x2] = (alpha * warped.astype(np.float32) + (1 - alpha) * roi).astype(np.uint8)


class PasteStage:
    name = "paste"

    def __init__(self, blend: float):
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must be between 0 and 1, got {blend}")
        self.blend = blend

    def process(self, state: FrameState) -> FrameState:
        for patch in state.patches:
            paste_patch(state.frame, patch, self.blend)
        state.swapped = [patch.face for patch in state.patches]
        state.faces_swapped = len(state.swapped)
        return state
