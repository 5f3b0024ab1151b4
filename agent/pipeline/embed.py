"""Face embeddings with an ArcFace-style recognizer (aligned 112x112 RGB → 512-d, L2-normalised)."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort

from facefleet.agent.pipeline.align import norm_crop
from facefleet.agent.pipeline.stage import Face, FrameState


class FaceRecognizer:
    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.input_size = int(session.get_inputs()[0].shape[2])

    def blob(self, aligned_bgr: np.ndarray) -> np.ndarray:
        return cv2.dnn.blobFromImage(
            aligned_bgr, 1.0 / 127.5, (self.input_size, self.input_size), (127.5, 127.5, 127.5), swapRB=True
        )

    def embed_crop(self, aligned_bgr: np.ndarray) -> np.ndarray:
        vector = self.session.run(None, {self.input_name: self.blob(aligned_bgr)})[0].reshape(-1)
        return normalize(vector)

    def embed_face(self, image: np.ndarray, face: Face) -> np.ndarray:
        crop, _ = norm_crop(image, face.kps, self.input_size)
        return self.embed_crop(crop)


def normalize(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(normalize(a), normalize(b)))


class EmbedStage:
    """Embed every detected face (needed for reference selection)."""

    name = "embed"

    def __init__(self, recognizer: FaceRecognizer):
        self.recognizer = recognizer

    def process(self, state: FrameState) -> FrameState:
        for face in state.faces:
            face.embedding = self.recognizer.embed_face(state.frame, face)
        return state
