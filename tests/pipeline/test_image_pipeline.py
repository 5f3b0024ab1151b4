"""The ONNX engine end to end on images, with tiny models through the production loading path."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefleet.agent.models.tiny import TinyModelSet, draw_synthetic_face
from facefleet.agent.pipeline.dlib_faces import dlib_faces
from facefleet.agent.pipeline.embed import cosine_similarity
from facefleet.agent.pipeline.errors import InputRejected
from facefleet.agent.pipeline.provenance import read_image_label
from facefleet.agent.pipeline.quality import IdentityJudge
from facefleet.agent.pipeline.runner import ProgressUpdate, SwapJob, SwapPipeline

from .conftest import SOURCE_LOOK, Scene, textured_background


@pytest.fixture(scope="module")
def pipeline(tiny_models: TinyModelSet) -> SwapPipeline:
    return SwapPipeline.load(tiny_models.models_dir)


def _job(tmp_path: Path, source: Path, target: Path, output: str = "out.png", **options: object) -> SwapJob:
    return SwapJob(
        task_id="t-img",
        source_path=source,
        target_path=target,
        output_path=tmp_path / output,
        checkpoint_dir=tmp_path / "ckpt",
        **options,
    )  # type: ignore[arg-type]


def _outside(box: tuple[int, int, int, int], shape: tuple[int, ...], margin: float) -> np.ndarray:
    x1, y1, x2, y2 = box
    mx, my = int((x2 - x1) * margin), int((y2 - y1) * margin)
    keep = np.ones(shape[:2], bool)
    keep[max(0, y1 - my) : y2 + my, max(0, x1 - mx) : x2 + mx] = False
    return keep


def test_onnx_engine_swaps_the_face_and_nothing_else(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    updates: list[ProgressUpdate] = []
    result = pipeline.run(_job(tmp_path, source_scene.path, target_scene.path), updates.append, threading.Event())
    assert result.engine == "onnx" and result.frames == 1 and result.quality.faces_swapped == 1
    out = cv2.imread(str(result.output_path))
    diff = np.abs(out.astype(int) - target_scene.image.astype(int)).sum(axis=2)
    x1, y1, x2, y2 = target_scene.face_box
    assert diff[y1:y2, x1:x2].mean() > 20  # the face region changed
    # the rest did not: the reference's paste mask covers the aligned crop's footprint, no more
    assert diff[_outside(target_scene.face_box, out.shape, 0.4)].max() == 0
    assert updates[-1].frames_done == 1 and updates[-1].stage == "done"
    assert set(result.stage_seconds) >= {"detect", "select", "align", "swap", "mask", "paste", "quality"}


def test_swap_moves_identity_and_quality_is_the_independent_recognizers(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    result = pipeline.run(_job(tmp_path, source_scene.path, target_scene.path), lambda u: None, threading.Event())
    engine = pipeline._loaded.engine
    recognizer, detector = engine.recognizer, engine.detector  # type: ignore[attr-defined]
    output = cv2.imread(str(result.output_path))
    source_face = detector.detect(source_scene.image)[0]
    source_embedding = recognizer.embed_face(source_scene.image, source_face)
    target_embedding = recognizer.embed_face(target_scene.image, detector.detect(target_scene.image)[0])
    output_face = detector.detect(output)[0]
    before = cosine_similarity(target_embedding, source_embedding)
    after = cosine_similarity(recognizer.embed_face(output, output_face), source_embedding)
    assert after > before + 0.1  # the (tiny) swapper moved the face towards the source identity
    # The reported figure is dlib's (independent of the swapper), measured on the output face.
    judge = IdentityJudge(dlib_faces(), source_scene.image, source_face.bbox)
    assert result.quality.id_similarity_mean == result.quality.id_similarity_min
    assert result.quality.id_similarity_mean == pytest.approx(judge.similarity(output, output_face.bbox), abs=0.02)


def test_output_is_labelled_ai_generated(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    for name in ("out.png", "out.jpg"):
        result = pipeline.run(
            _job(tmp_path, source_scene.path, target_scene.path, name), lambda u: None, threading.Event()
        )
        label = read_image_label(result.output_path)
        assert label is not None and label.startswith("AI-generated")
        assert result.sidecar_path is not None
        sidecar = json.loads(result.sidecar_path.read_text())
        assert sidecar["ai_generated"] is True and sidecar["engine"] == "onnx"
        assert {m["name"] for m in sidecar["models"]} >= {"inswapper_tiny", "det_tiny"}


def test_blend_zero_leaves_the_image_unchanged(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    result = pipeline.run(
        _job(tmp_path, source_scene.path, target_scene.path, blend=0.0), lambda u: None, threading.Event()
    )
    out = cv2.imread(str(result.output_path))
    assert np.abs(out.astype(int) - target_scene.image.astype(int)).max() <= 1


def _two_face_target(tmp_path: Path) -> tuple[Path, tuple[int, ...], tuple[int, ...]]:
    image = textured_background(180, 240, seed=5)  # detector letterboxes 240 → 160: faces drawn at 1.5x
    left = draw_synthetic_face(image, (60.0, 90.0), 1.5)
    right = draw_synthetic_face(image, (180.0, 90.0), 1.5, **SOURCE_LOOK)  # type: ignore[arg-type]
    path = tmp_path / "two.png"
    cv2.imwrite(str(path), image)
    return path, left, right


def _changed(out: np.ndarray, original: np.ndarray, box: tuple[int, ...]) -> float:
    x1, y1, x2, y2 = box
    return float(np.abs(out[y1:y2, x1:x2].astype(int) - original[y1:y2, x1:x2].astype(int)).sum(axis=2).mean())


def test_face_selectors_all_and_reference(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    target, left, right = _two_face_target(tmp_path)
    original = cv2.imread(str(target))
    result = pipeline.run(
        _job(tmp_path, target_scene.path, target, "all.png", face_selector="all"), lambda u: None, threading.Event()
    )
    assert result.quality.faces_swapped == 2
    # reference = the right-hand face's look: only that face is swapped.
    result = pipeline.run(
        _job(
            tmp_path,
            target_scene.path,
            target,
            "ref.png",
            face_selector="reference",
            reference_face_path=source_scene.path,
        ),
        lambda u: None,
        threading.Event(),
    )
    out = cv2.imread(str(result.output_path))
    assert result.quality.faces_swapped == 1
    assert _changed(out, original, right) > 10 and _changed(out, original, left) < 1
    # reference = the left-hand face's look: now only the left face changes.
    result = pipeline.run(
        _job(
            tmp_path,
            source_scene.path,
            target,
            "ref2.png",
            face_selector="reference",
            reference_face_path=target_scene.path,
        ),
        lambda u: None,
        threading.Event(),
    )
    out = cv2.imread(str(result.output_path))
    assert _changed(out, original, left) > 10 and _changed(out, original, right) < 1


def test_enhancer_stage_runs_when_requested(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    result = pipeline.run(
        _job(tmp_path, source_scene.path, target_scene.path, enhance=True), lambda u: None, threading.Event()
    )
    assert "enhance" in result.stage_seconds and result.quality.faces_swapped == 1


def test_corrupt_and_non_image_inputs_are_rejected_clearly(
    pipeline: SwapPipeline, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(target_scene.path.read_bytes()[:200])
    with pytest.raises(InputRejected, match=r"target image .*corrupt.png could not be decoded"):
        pipeline.run(_job(tmp_path, source_scene.path, corrupt), lambda u: None, threading.Event())
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InputRejected, match="not a supported image type"):
        pipeline.run(_job(tmp_path, text, target_scene.path), lambda u: None, threading.Event())
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 160, 3), 90, np.uint8))
    with pytest.raises(InputRejected, match="no face found in the source image"):
        pipeline.run(_job(tmp_path, blank, target_scene.path), lambda u: None, threading.Event())
    with pytest.raises(InputRejected, match="face_selector 'nobody'"):
        pipeline.run(
            _job(tmp_path, source_scene.path, target_scene.path, face_selector="nobody"),
            lambda u: None,
            threading.Event(),
        )


def test_scheduler_accepts_exactly_the_agent_masks_with_the_same_default() -> None:
    from facefleet.agent.pipeline.mask import DEFAULT_MASK, MaskKind
    from facefleet.scheduler.intake import MASKS

    assert set(MASKS) == set(MaskKind) and MASKS[0] == DEFAULT_MASK
