"""The quality gate: how much each output face looks like the source person, by a recognizer that
is independent of the swapper (dlib's ResNet, shipped in face-recognition-models), on every engine.

ID similarity = 1 - (Euclidean distance of the dlib descriptors of the output face and the source
face). dlib calls two faces the same person below distance 0.6, so similarity >= 0.4 means "same
person" to this recognizer; two different people typically score 0.2-0.35. The ONNX engine's own
ArcFace is not used: inswapper is trained against it, so it would grade its own homework.

A job's `min_id_similarity` makes the gate bite: the worst face of the output must reach it, or the
job fails with QUALITY_BELOW_THRESHOLD and a message with the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facefleet.agent.pipeline.dlib_faces import DlibFaces
from facefleet.agent.pipeline.errors import InputRejected, PipelineError
from facefleet.agent.pipeline.stage import FrameState

RECOGNIZER = "dlib ResNet v1 (face-recognition-models), 1 - descriptor distance"


class QualityBelowThreshold(PipelineError):
    """The output's identity similarity to the source is below the job's minimum."""

    reason_code = "QUALITY_BELOW_THRESHOLD"


@dataclass(frozen=True)
class QualityReport:
    id_similarity_mean: float | None  # None when no face was swapped
    id_similarity_min: float | None
    faces_swapped: int


def summarize(similarities: list[float], faces_swapped: int) -> QualityReport:
    if not similarities:
        return QualityReport(None, None, faces_swapped)
    return QualityReport(float(np.mean(similarities)), float(np.min(similarities)), faces_swapped)


def enforce(report: QualityReport, minimum: float | None) -> None:
    """Raise QualityBelowThreshold when `minimum` is set and the report does not reach it."""
    if minimum is None:
        return
    if report.id_similarity_min is None:
        raise QualityBelowThreshold(
            f"no face was swapped, so ID similarity could not reach the required {minimum:.2f} ({RECOGNIZER})"
        )
    if report.id_similarity_min < minimum:
        raise QualityBelowThreshold(
            f"ID similarity to the source: min {report.id_similarity_min:.3f}, mean "
            f"{report.id_similarity_mean:.3f} over {report.faces_swapped} face(s), below the required "
            f"{minimum:.2f} ({RECOGNIZER})"
        )


class IdentityJudge:
    """Scores faces against the source person with dlib's recognizer."""

    def __init__(self, faces: DlibFaces, source_bgr: np.ndarray, source_box: np.ndarray | None = None):
        """`source_box`: where the engine found the source face, used when dlib's detector finds none."""
        self.faces = faces
        rgb = faces.rgb(source_bgr)
        found = faces.find(rgb)
        box = found[0] if found else source_box
        if box is None:
            raise InputRejected("no face found in the source image; use a clear, frontal, well-lit face photo")
        self.source_descriptor = faces.descriptor(rgb, box)

    def similarity(self, frame_bgr: np.ndarray, box: np.ndarray) -> float:
        descriptor = self.faces.descriptor(self.faces.rgb(frame_bgr), box)
        return 1.0 - float(np.linalg.norm(descriptor - self.source_descriptor))


class QualityStage:
    name = "quality"

    def __init__(self, judge: IdentityJudge):
        self.judge = judge

    def process(self, state: FrameState) -> FrameState:
        state.id_similarities = [self.judge.similarity(state.frame, face.bbox) for face in state.swapped]
        return state
