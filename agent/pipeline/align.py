"""5-point similarity alignment to the ArcFace template, as insightface's `face_align.estimate_norm`.

The fit is the least-squares similarity (Umeyama 1991, what `skimage.transform.SimilarityTransform`
estimates): every landmark counts, so a smiling mouth moves the crop smoothly instead of being dropped
as an outlier by a robust fit. Crops of 112·k use the template scaled by k; crops of 128·k (inswapper)
use it scaled by 128·k/128 and shifted right by 8·k, exactly as the reference does.
"""

from __future__ import annotations

import cv2
import numpy as np

from facefleet.agent.pipeline.stage import FrameState, SwapPatch

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def umeyama_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """3x3 (float64) least-squares similarity (rotation, uniform scale, translation) taking `source`
    onto `target`: Umeyama's closed form as skimage computes it, in the inputs' precision (float32
    landmarks give the reference's float32 fit to the last bit). NaNs when all points coincide."""
    src = np.asarray(source)
    dst = np.asarray(target)
    dim = src.shape[1]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    covariance = dst_demean.T @ src_demean / src.shape[0]
    signs = np.ones(dim)
    if np.linalg.det(covariance) < 0:
        signs[-1] = -1
    transform = np.eye(dim + 1)
    u, singular, vt = np.linalg.svd(covariance)
    rank = np.count_nonzero(singular > singular.max() * max(covariance.shape) * np.finfo(float).eps)
    if rank == 0:
        return np.full((dim + 1, dim + 1), np.nan)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            transform[:dim, :dim] = u @ vt
        else:
            flipped = signs.copy()
            flipped[-1] = -1
            transform[:dim, :dim] = u @ np.diag(flipped) @ vt
    else:
        transform[:dim, :dim] = u @ np.diag(signs) @ vt
    scale = 1.0 / src_demean.var(axis=0).sum() * (singular @ signs)
    transform[:dim, dim] = dst_mean - scale * (transform[:dim, :dim] @ src_mean.T)
    transform[:dim, :dim] *= scale
    return transform


def template_for(image_size: int) -> np.ndarray:
    """The ArcFace template placed in an `image_size` crop (112·k or 128·k)."""
    if image_size % 112 == 0:
        ratio, shift_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        shift_x = 8.0 * ratio
    else:
        raise ValueError(f"crop size {image_size} is neither a multiple of 112 nor of 128")
    template = ARCFACE_TEMPLATE * ratio
    template[:, 0] += shift_x
    return template


def estimate_norm(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """2x3 (float64) least-squares similarity taking the 5 landmarks onto the template for `image_size`."""
    template = template_for(image_size)
    matrix = umeyama_similarity(landmarks, template)[:2]
    if not np.isfinite(matrix).all():  # degenerate landmarks (all equal): a pure translation
        matrix = np.array([[1.0, 0.0, template[2, 0] - landmarks[2, 0]], [0.0, 1.0, template[2, 1] - landmarks[2, 1]]])
    return matrix


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
