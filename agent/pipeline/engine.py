"""Assemble the stage chain: the ONNX engine from verified models, else the landmark (no-weights) engine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from facefleet.agent.models.manifest import ModelRole
from facefleet.agent.models.sessions import create_session
from facefleet.agent.models.verify import ModelStatus, VerifiedModel, verify_manifest
from facefleet.agent.pipeline.align import AlignStage
from facefleet.agent.pipeline.detect import DetectStage, FaceDetector
from facefleet.agent.pipeline.dlib_faces import dlib_faces
from facefleet.agent.pipeline.embed import EmbedStage, FaceRecognizer
from facefleet.agent.pipeline.enhance import EnhanceStage, FaceEnhancer
from facefleet.agent.pipeline.errors import InputRejected, ModelVerificationFailed
from facefleet.agent.pipeline.landmark_swap import (
    LandmarkDetectStage,
    LandmarkFaceDetector,
    LandmarkSmoother,
    LandmarkSwapStage,
)
from facefleet.agent.pipeline.mask import DEFAULT_MASK, MaskKind, MaskStage
from facefleet.agent.pipeline.paste import PasteStage
from facefleet.agent.pipeline.quality import IdentityJudge, QualityStage
from facefleet.agent.pipeline.select import FaceSelector, SelectStage
from facefleet.agent.pipeline.stage import Face, FrameState, Stage
from facefleet.agent.pipeline.swap import FaceSwapper, SwapStage

ONNX_ENGINE = "onnx"
LANDMARK_ENGINE = "landmark"
REQUIRED_ROLES = (ModelRole.DETECTOR, ModelRole.RECOGNIZER, ModelRole.SWAPPER)


@dataclass(frozen=True)
class StageOptions:
    face_selector: FaceSelector = FaceSelector.LARGEST
    blend: float = 1.0
    mask: MaskKind = DEFAULT_MASK
    enhance: bool = False


class StageChain:
    """The stages for one job, bound to its source face; `process` runs them on one frame."""

    def __init__(self, stages: list[Stage], source_embedding: np.ndarray | None):
        self.stages = stages
        self.source_embedding = source_embedding

    def start_at(self, index: int) -> None:
        """A video (re)starts at frame `index`: stages that keep time order reset to it."""
        for stage in self.stages:
            start_at = getattr(stage, "start_at", None)
            if start_at is not None:
                start_at(index)

    def process(self, frame: np.ndarray, index: int = 0) -> FrameState:
        state = FrameState(frame=frame, source_embedding=self.source_embedding, index=index)
        for stage in self.stages:
            started = time.perf_counter()
            state = stage.process(state)
            state.stage_seconds[stage.name] = state.stage_seconds.get(stage.name, 0.0) + (time.perf_counter() - started)
        return state


class Engine(Protocol):
    name: str
    note: str

    def prepare(self, source: np.ndarray, options: StageOptions, reference: np.ndarray | None) -> StageChain: ...


def _largest(faces: list[Face], what: str) -> Face:
    if not faces:
        raise InputRejected(f"no face found in the {what}; use a clear, frontal, well-lit face photo")
    return max(faces, key=lambda f: f.area)


class OnnxEngine:
    name = ONNX_ENGINE
    note = "ONNX engine (detector + ArcFace + inswapper-style swapper): the production path"

    def __init__(
        self, detector: FaceDetector, recognizer: FaceRecognizer, swapper: FaceSwapper, enhancer: FaceEnhancer | None
    ):
        self.detector = detector
        self.recognizer = recognizer
        self.swapper = swapper
        self.enhancer = enhancer

    def prepare(self, source: np.ndarray, options: StageOptions, reference: np.ndarray | None) -> StageChain:
        source_face = _largest(self.detector.detect(source), "source image")
        source_embedding = self.recognizer.embed_face(source, source_face)
        stages: list[Stage] = [DetectStage(self.detector)]
        reference_embedding = None
        if options.face_selector == FaceSelector.REFERENCE:
            if reference is None:
                raise InputRejected("face_selector 'reference' needs a reference face image")
            reference_face = _largest(self.detector.detect(reference), "reference face image")
            reference_embedding = self.recognizer.embed_face(reference, reference_face)
            stages.append(EmbedStage(self.recognizer))
        stages += [
            SelectStage(options.face_selector, reference_embedding),
            AlignStage(self.swapper.crop_size),
            SwapStage(self.swapper, source_embedding),
        ]
        if options.enhance:
            if self.enhancer is None:
                raise InputRejected(
                    "enhance was requested but no verified enhancer model is installed; "
                    "add one to models/manifest.toml or drop --enhance"
                )
            stages.append(EnhanceStage(self.enhancer))
        judge = IdentityJudge(dlib_faces(), source, source_face.bbox)
        stages += [MaskStage(options.mask), PasteStage(options.blend), QualityStage(judge)]
        return StageChain(stages, source_embedding)


class LandmarkEngine:
    name = LANDMARK_ENGINE

    def __init__(self, note: str):
        self.note = note

    def prepare(self, source: np.ndarray, options: StageOptions, reference: np.ndarray | None) -> StageChain:
        if options.face_selector == FaceSelector.REFERENCE:
            raise InputRejected(
                "face_selector 'reference' needs the ONNX engine (a recognizer model); "
                "use 'largest' or 'all' with the landmark engine"
            )
        faces = dlib_faces()
        detector = LandmarkFaceDetector(faces)
        source_face = _largest(detector.detect(source), "source image")
        stages: list[Stage] = [
            LandmarkDetectStage(detector, LandmarkSmoother()),
            SelectStage(options.face_selector),
            LandmarkSwapStage(source, source_face, options.blend),
            QualityStage(IdentityJudge(faces, source, source_face.bbox)),
        ]
        return StageChain(stages, None)


@dataclass
class LoadedEngine:
    engine: Engine
    statuses: list[ModelStatus]
    verified: dict[ModelRole, VerifiedModel]


def load_engine(models_dir: Path, providers: list[str], intra_op_threads: int = 0) -> LoadedEngine:
    """Verify every manifest entry (any failure is fatal: never run next to a tampered file) and
    build the ONNX engine when a detector, recognizer and swapper verified, else the landmark one.
    `intra_op_threads` caps each session's CPU threads (0: onnxruntime's default, all cores)."""
    check = verify_manifest(models_dir)
    statuses, verified = check.statuses, check.verified
    if check.failures:
        error = ModelVerificationFailed("; ".join(check.failures))
        error.statuses = statuses  # type: ignore[attr-defined]
        raise error
    missing = [role.value for role in REQUIRED_ROLES if role not in verified]
    if missing:
        note = (
            f"landmark engine (dlib 68 landmarks + piecewise-affine warp + colour transfer + seamless clone): "
            f"no verified {', '.join(missing)} model in {models_dir}. The ONNX engine is the production path: "
            "drop inswapper_128.onnx, det_10g.onnx and w600k_r50.onnx there and list them in manifest.toml."
        )
        return LoadedEngine(LandmarkEngine(note), statuses, verified)
    sessions = {role: create_session(model, providers, intra_op_threads) for role, model in verified.items()}
    enhancer = FaceEnhancer(sessions[ModelRole.ENHANCER]) if ModelRole.ENHANCER in sessions else None
    engine = OnnxEngine(
        FaceDetector(sessions[ModelRole.DETECTOR]),
        FaceRecognizer(sessions[ModelRole.RECOGNIZER]),
        FaceSwapper(sessions[ModelRole.SWAPPER], verified[ModelRole.SWAPPER]),
        enhancer,
    )
    return LoadedEngine(engine, statuses, verified)
