"""The no-weights engine: OpenCV Haar detection + LAB colour transfer + Poisson seamless clone.

Used when no verified swapper is installed so a first-time user still gets a real, visible swap. It
moves the source face's appearance onto the target face; it does not preserve identity the way the
ONNX engine (inswapper) does, which is the production path.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from facefleet.agent.pipeline.stage import Face, FrameState

HAAR_FILE = "haarcascade_frontalface_default.xml"


class HaarFaceDetector:
    """Frontal-face Haar cascade; one classifier per thread (CascadeClassifier is not thread-safe)."""

    def __init__(self, min_size: int = 24):
        self.path = cv2.data.haarcascades + HAAR_FILE  # type: ignore[attr-defined]
        self.min_size = min_size
        self._local = threading.local()
        if self._classifier().empty():
            raise RuntimeError(
                f"OpenCV Haar cascade {self.path} could not be loaded; reinstall opencv-python-headless 4.x"
            )

    def _classifier(self) -> cv2.CascadeClassifier:
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            classifier = cv2.CascadeClassifier(self.path)
            self._local.classifier = classifier
        return classifier

    def detect(self, image: np.ndarray) -> list[Face]:
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        found = self._classifier().detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(self.min_size, self.min_size)
        )
        faces = []
        for x, y, w, h in found:
            box = np.array([x, y, x + w, y + h], np.float32)
            # Haar gives no landmarks: approximate the five points from the box (eyes, nose, mouth).
            rel = np.array([[0.3, 0.38], [0.7, 0.38], [0.5, 0.58], [0.35, 0.78], [0.65, 0.78]], np.float32)
            kps = np.stack([x + rel[:, 0] * w, y + rel[:, 1] * h], axis=-1).astype(np.float32)
            faces.append(Face(bbox=box, kps=kps, score=1.0))
        return faces


class ClassicalDetectStage:
    name = "detect"

    def __init__(self, detector: HaarFaceDetector):
        self.detector = detector

    def process(self, state: FrameState) -> FrameState:
        state.faces = self.detector.detect(state.frame)
        return state


def color_transfer(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Give `source` the LAB mean/std of `target` (Reinhard et al.)."""
    src = cv2.cvtColor(source, cv2.COLOR_BGR2LAB).astype(np.float32)
    tgt = cv2.cvtColor(target, cv2.COLOR_BGR2LAB).astype(np.float32)
    src_mean, src_std = src.reshape(-1, 3).mean(0), src.reshape(-1, 3).std(0) + 1e-6
    tgt_mean, tgt_std = tgt.reshape(-1, 3).mean(0), tgt.reshape(-1, 3).std(0)
    out = (src - src_mean) / src_std * tgt_std + tgt_mean
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2BGR)


def source_face_crop(image: np.ndarray, face: Face) -> np.ndarray:
    x1, y1, x2, y2 = face.bbox.astype(int)
    return image[max(0, y1) : y2, max(0, x1) : x2].copy()


class ClassicalSwapStage:
    """Colour-matched source face cloned into each selected target face (swap + mask + paste)."""

    name = "swap"

    def __init__(self, source_face: np.ndarray, blend: float):
        if source_face.size == 0:
            raise ValueError("empty source face crop")
        self.source_face = source_face
        self.blend = blend

    def process(self, state: FrameState) -> FrameState:
        frame = state.frame
        height, width = frame.shape[:2]
        swapped = 0
        for face in state.selected:
            x1, y1, x2, y2 = face.bbox.astype(int)
            x1, y1, x2, y2 = max(1, x1), max(1, y1), min(width - 1, x2), min(height - 1, y2)
            w, h = x2 - x1, y2 - y1
            if w < 8 or h < 8:
                continue
            target_region = frame[y1:y2, x1:x2]
            patch = color_transfer(cv2.resize(self.source_face, (w, h), interpolation=cv2.INTER_AREA), target_region)
            mask = np.zeros((h, w), np.uint8)
            cv2.ellipse(mask, (w // 2, h // 2), (max(1, int(w * 0.42)), max(1, int(h * 0.48))), 0, 0, 360, 255, -1)
            cloned = cv2.seamlessClone(patch, frame, mask, (x1 + w // 2, y1 + h // 2), cv2.NORMAL_CLONE)
            if self.blend < 1.0:
                cloned = cv2.addWeighted(cloned, self.blend, frame, 1.0 - self.blend, 0)
            frame[:] = cloned
            swapped += 1
        state.faces_swapped = swapped
        return state
