"""5-point similarity alignment to the ArcFace template (insightface face_align.estimate_norm/norm_crop)."""

from __future__ import annotations

import cv2
import numpy as np

from facefleet.agent.pipeline.stage import FrameState, SwapPatch

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def estimate_norm(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """2x3 similarity transform taking the 5 landmarks onto the template scaled to `image_size`."""
    if image_size % 112 == 0:
        ratio, shift_x = image_size / 112.0, 0.0
    else:
        ratio, shift_x = image_size / 128.0, 8.0 * image_size / 128.0
    template = ARCFACE_TEMPLATE * ratio
    template[:, 0] += shift_x
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template, method=cv2.LMEDS)
    if matrix is None:  # degenerate landmarks (all equal): fall back to a pure translation
        matrix = np.array([[1, 0, template[2, 0] - landmarks[2, 0]], [0, 1, template[2, 1] - landmarks[2, 1]]])
    return matrix.astype(np.float32)


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    matrix = estimate_norm(landmarks, image_size)
    crop = cv2.warpAffine(image, matrix, (image_size, image_size), borderValue=0.0)
    return crop, matrix


class AlignStage:
    """Cut an aligned square crop for each selected face (128 for inswapper)."""

    name = "align"

    def __init__(self, crop_size: int = 128):
        self.crop_size = crop_size

    def process(self, state: FrameState) -> FrameState:
        state.patches = []
        for face in state.selected:
            crop, matrix = norm_crop(state.frame, face.kps, self.crop_size)
            state.patches.append(SwapPatch(face=face, matrix=matrix, crop=crop))
        return state
