"""Identity check: cosine similarity of each swapped face (re-embedded from the output) to the source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facefleet.agent.pipeline.embed import FaceRecognizer, cosine_similarity
from facefleet.agent.pipeline.stage import FrameState


@dataclass(frozen=True)
class QualityReport:
    id_similarity_mean: float | None  # None when no recognizer ran (classical engine without models)
    id_similarity_min: float | None
    faces_swapped: int


def summarize(similarities: list[float], faces_swapped: int) -> QualityReport:
    if not similarities:
        return QualityReport(None, None, faces_swapped)
    return QualityReport(float(np.mean(similarities)), float(np.min(similarities)), faces_swapped)


class QualityStage:
    name = "quality"

    def __init__(self, recognizer: FaceRecognizer, source_embedding: np.ndarray):
        self.recognizer = recognizer
        self.source_embedding = source_embedding

    def process(self, state: FrameState) -> FrameState:
        state.id_similarities = [
            cosine_similarity(self.recognizer.embed_face(state.frame, patch.face), self.source_embedding)
            for patch in state.patches
        ]
        return state
