"""dlib's face models, as shipped in the `face-recognition-models` package (no download at run time).

- frontal face detector: HOG + linear SVM built into dlib itself (no file).
- `shape_predictor_5_face_landmarks.dat`: eye corners and nose base; feeds the recognizer.
- `shape_predictor_68_face_landmarks.dat`: jaw, brows, eyes, nose, mouth; the landmark engine's
  dense geometry (see docs/pipeline.md for its training-data licence).
- `dlib_face_recognition_resnet_model_v1.dat`: 128-d face descriptors; two photos of one person are
  within Euclidean distance 0.6 (99.38 % on LFW). The quality gate's independent recognizer.

dlib's detector and network keep scratch buffers, so a thread borrows its own pair from a pool (at
most one pair per concurrent caller is ever loaded); the shape predictors are read-only and shared.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facefleet.agent.pipeline.errors import PipelineError

MODELS_PACKAGE = "face_recognition_models"
SAME_PERSON_DISTANCE = 0.6  # dlib's own threshold for its ResNet descriptors
# HOG detection scores: frontal faces score about 1-1.6, look-alike textures (a mission patch on the
# astronaut's suit) 0.05-0.17; dlib's default keeps everything above 0.
MIN_FACE_SCORE = 0.3


def models_dir() -> Path:
    """The folder of .dat files inside the installed face-recognition-models package.

    Found without importing the package (its __init__ needs pkg_resources, gone from new setuptools)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise PipelineError(
            "the face-recognition-models package is not installed; "
            "reinstall facefleet (pip install facefleet) to get its dlib models"
        )
    return Path(locations[0]) / "models"


class DlibFaces:
    """Detection, landmarks and descriptors with dlib; safe to call from many threads."""

    def __init__(self) -> None:
        import dlib

        self._dlib = dlib
        folder = models_dir()
        self._recognizer_path = str(folder / "dlib_face_recognition_resnet_model_v1.dat")
        self.shape5 = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self._shape68_path = str(folder / "shape_predictor_68_face_landmarks.dat")
        self._shape68_lock = threading.Lock()
        self._shape68: Any = None
        self._idle: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()

    @contextmanager
    def _models(self) -> Iterator[tuple[Any, Any]]:
        """A (detector, recognizer) pair no other thread is using: taken from the pool, or loaded
        (about 1 s) when every pair is busy, and put back after use."""
        try:
            models = self._idle.get_nowait()
        except queue.Empty:
            detector = self._dlib.get_frontal_face_detector()
            models = (detector, self._dlib.face_recognition_model_v1(self._recognizer_path))
        try:
            yield models
        finally:
            self._idle.put(models)

    @property
    def shape68(self) -> Any:
        with self._shape68_lock:  # 100 MB: loaded only when the landmark engine runs
            if self._shape68 is None:
                self._shape68 = self._dlib.shape_predictor(self._shape68_path)
            return self._shape68

    @staticmethod
    def rgb(image_bgr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))

    def detect(self, rgb: np.ndarray, upsample: int = 0) -> list[np.ndarray]:
        """Face boxes (x1, y1, x2, y2), largest first. `upsample` 1 finds faces down to ~40 px."""
        with self._models() as (detector, _):
            found, scores, _ = detector.run(rgb, upsample, 0.0)
        boxes = [
            np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32)
            for r, score in zip(found, scores, strict=True)
            if score >= MIN_FACE_SCORE
        ]
        return sorted(boxes, key=lambda b: -float((b[2] - b[0]) * (b[3] - b[1])))

    def find(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Faces at native scale (≥ ~80 px, 35 ms on 512²); when none, frames up to 1080 px on the short
        side are searched again at 2x (≥ ~40 px, about 8x the time)."""
        found = self.detect(rgb, 0)
        if not found and min(rgb.shape[:2]) <= 1080:
            found = self.detect(rgb, 1)
        return found

    def _rect(self, box: np.ndarray) -> Any:
        x1, y1, x2, y2 = (round(float(v)) for v in box[:4])
        return self._dlib.rectangle(x1, y1, x2, y2)

    def landmarks68(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        shape = self.shape68(rgb, self._rect(box))
        return np.array([[p.x, p.y] for p in shape.parts()], np.float32)

    def descriptor(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The 128-d ResNet descriptor of the face in `box` (aligned by the 5-point predictor)."""
        shape = self.shape5(rgb, self._rect(box))
        with self._models() as (_, recognizer):
            return np.asarray(recognizer.compute_face_descriptor(rgb, shape), np.float32)


@cache
def dlib_faces() -> DlibFaces:
    """One per process: the shape predictors are large and read-only."""
    return DlibFaces()
