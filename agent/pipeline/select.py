"""Which detected faces get swapped: all | largest | reference.

`reference` swaps the one face most similar to a reference face, and only when that similarity is at
least the threshold (so a video swaps one person and leaves frames without them untouched).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from facefleet.agent.pipeline.embed import cosine_similarity
from facefleet.agent.pipeline.stage import FrameState


class FaceSelector(StrEnum):
    ALL = "all"
    LARGEST = "largest"
    REFERENCE = "reference"


class SelectStage:
    name = "select"

    def __init__(
        self, mode: FaceSelector, reference_embedding: np.ndarray | None = None, similarity_threshold: float = 0.5
    ):
        if mode == FaceSelector.REFERENCE and reference_embedding is None:
            raise ValueError("face selector 'reference' needs a reference face embedding")
        self.mode = mode
        self.reference_embedding = reference_embedding
        self.similarity_threshold = similarity_threshold

    def process(self, state: FrameState) -> FrameState:
        if not state.faces:
            state.selected = []
        elif self.mode == FaceSelector.ALL:
            state.selected = list(state.faces)
        elif self.mode == FaceSelector.LARGEST:
            state.selected = [max(state.faces, key=lambda f: f.area)]
        else:
            assert self.reference_embedding is not None
            reference = self.reference_embedding
            scored = [
                (cosine_similarity(face.embedding, reference), index)
                for index, face in enumerate(state.faces)
                if face.embedding is not None
            ]
            best = max(scored, default=None)
            state.selected = [state.faces[best[1]]] if best and best[0] >= self.similarity_threshold else []
        return state
