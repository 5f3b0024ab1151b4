"""The contract every pipeline stage follows (FaceFusion-processor style) and the per-frame state.

A stage is a small object with a `name` and `process(state) -> state`. Stages hold loaded models and
options but no per-frame data, so one stage instance serves many frames concurrently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Face:
    bbox: np.ndarray  # x1, y1, x2, y2 in frame pixels
    kps: np.ndarray  # 5x2 landmarks: eyes, nose, mouth corners
    score: float
    embedding: np.ndarray | None = None  # L2-normalised when set
    landmarks: np.ndarray | None = None  # 68x2 dense landmarks (landmark engine)

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))


@dataclass
class SwapPatch:
    """One face being replaced: the aligned crop, its affine (frame → crop) and its blend mask."""

    face: Face
    matrix: np.ndarray  # 2x3 affine from frame to crop coordinates
    crop: np.ndarray  # BGR uint8, square
    mask: np.ndarray | None = None  # float32, same size as crop: 0..1 alpha, or a white box (below)
    mask_in_frame: bool = False  # the mask is a white box to threshold, erode and blur after warping


@dataclass
class FrameState:
    frame: np.ndarray  # BGR uint8; paste writes the result here
    source_embedding: np.ndarray | None = None
    faces: list[Face] = field(default_factory=list)
    selected: list[Face] = field(default_factory=list)
    patches: list[SwapPatch] = field(default_factory=list)
    swapped: list[Face] = field(default_factory=list)  # the faces this frame's output replaced
    faces_swapped: int = 0
    index: int = 0  # position in the video (0 for an image): lets a stage smooth over time
    id_similarities: list[float] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


class Stage(Protocol):
    name: str

    def process(self, state: FrameState) -> FrameState: ...
