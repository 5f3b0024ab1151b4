"""The no-weights landmark engine on real photographs: Grace Hopper (source) onto the astronaut.

Checked the way a user would: `facefleet swap` with an empty models directory, then dlib's ResNet
recognizer (independent of the swap: the engine uses dlib's landmarks, not its recognizer) on the
files it wrote, and a byte comparison outside the face mask.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog
from skimage import data as skimage_data
from typer.testing import CliRunner

from facefleet.agent.pipeline.dlib_faces import SAME_PERSON_DISTANCE, dlib_faces
from facefleet.agent.pipeline.landmark_swap import (
    LandmarkFaceDetector,
    LandmarkSmoother,
    eye_distance,
    face_mask,
)
from facefleet.agent.pipeline.runner import SwapJob, SwapPipeline
from facefleet.agent.pipeline.stage import Face
from facefleet.cli import app
from tests.fixtures.components import require_component

ASSETS = Path(__file__).resolve().parents[2] / "facefleet" / "demo_assets"


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    yield
    structlog.reset_defaults()


@pytest.fixture()
def photos(tmp_path: Path) -> tuple[Path, Path]:
    target = tmp_path / "astronaut.png"
    cv2.imwrite(str(target), cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR))
    return ASSETS / "grace_hopper.jpg", target


def _distance(image: np.ndarray, other: np.ndarray) -> float:
    faces = dlib_faces()
    descriptors = []
    for picture in (image, other):
        rgb = faces.rgb(picture)
        descriptors.append(faces.descriptor(rgb, faces.find(rgb)[0]))
    return float(np.linalg.norm(descriptors[0] - descriptors[1]))


def test_swap_without_weights_moves_identity_keeps_background_and_reports_it(
    photos: tuple[Path, Path], tmp_path: Path
) -> None:
    source_path, target_path = photos
    output = tmp_path / "swapped.png"
    (tmp_path / "models").mkdir()
    run = CliRunner().invoke(
        app,
        ["swap", "-s", str(source_path), "-t", str(target_path), "-o", str(output),
         "--models", str(tmp_path / "models"), "--json"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert report["engine"] == "landmark" and report["faces_swapped"] == 1
    source, target, swapped = (cv2.imread(str(p)) for p in (source_path, target_path, output))

    before, after = _distance(target, source), _distance(swapped, source)
    assert before > SAME_PERSON_DISTANCE  # two different people to start with
    assert after < before - 0.1  # the output moved well towards the source person
    assert report["id_similarity_mean"] == pytest.approx(1 - after, abs=0.03)  # and it says so itself

    target_face = LandmarkFaceDetector(dlib_faces()).detect(target)[0]
    mask = face_mask(target_face.landmarks, target.shape)  # type: ignore[arg-type]
    changed = np.abs(swapped.astype(int) - target.astype(int)).max(axis=2) > 0
    assert changed[mask > 0].mean() > 0.5  # the face was replaced...
    assert not changed[mask == 0].any()  # ...and not one pixel outside the face mask changed


def test_quality_gate_fails_the_swap_with_its_figures(photos: tuple[Path, Path], tmp_path: Path) -> None:
    source_path, target_path = photos
    run = CliRunner().invoke(
        app,
        ["swap", "-s", str(source_path), "-t", str(target_path), "-o", str(tmp_path / "out.png"),
         "--models", str(tmp_path / "none"), "--min-id-similarity", "0.9"],
    )  # fmt: skip
    assert run.exit_code == 1
    assert "QUALITY_BELOW_THRESHOLD: ID similarity to the source: min 0." in run.output
    assert "below the required 0.90" in run.output and "hint:" in run.output and "Traceback" not in run.output


def _still_head_frames(count: int) -> list[np.ndarray]:
    """A still head with per-frame sensor noise (the astronaut, noise sigma 6)."""
    rng = np.random.default_rng(11)
    still = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR).astype(np.float32)
    return [np.clip(still + rng.normal(0, 6, still.shape), 0, 255).astype(np.uint8) for _ in range(count)]


def landmark_jitter(landmarks: list[np.ndarray]) -> float:
    """Mean frame-to-frame landmark movement, as a fraction of the eye distance."""
    steps = [np.linalg.norm(b - a, axis=1).mean() / eye_distance(a) for a, b in pairwise(landmarks)]
    return float(np.mean(steps))


def test_smoothing_damps_jitter_on_a_still_head_and_follows_real_motion() -> None:
    detector = LandmarkFaceDetector(dlib_faces())
    raw = [detector.detect(frame)[0] for frame in _still_head_frames(10)]
    smoother = LandmarkSmoother()
    smoothed = []
    for index, face in enumerate(raw):
        copy = Face(face.bbox, face.kps.copy(), face.score, landmarks=face.landmarks.copy())  # type: ignore[union-attr]
        smoother.smooth(index, [copy])
        smoothed.append(copy.landmarks)
    raw_jitter = landmark_jitter([f.landmarks for f in raw])  # type: ignore[misc]
    assert raw_jitter > 0.002  # the noise really moves dlib's landmarks
    assert landmark_jitter(smoothed) < 0.5 * raw_jitter  # type: ignore[arg-type]

    jump = 0.3 * eye_distance(smoothed[-1])  # type: ignore[arg-type]
    moved = Face(raw[0].bbox, raw[0].kps, 1.0, landmarks=smoothed[-1] + jump)  # type: ignore[operator]
    expected = moved.landmarks.copy()  # type: ignore[union-attr]
    smoother.smooth(len(raw), [moved])
    np.testing.assert_allclose(moved.landmarks, expected)  # a real move is followed at once, no lag


@pytest.mark.slow
def test_still_head_video_through_the_landmark_engine(photos: tuple[Path, Path], tmp_path: Path) -> None:
    """Frames run concurrently, landmarks are smoothed in order; every frame is swapped and scored."""
    ffmpeg = shutil.which("ffmpeg")
    require_component(ffmpeg is not None, "ffmpeg binary", "apt-get install ffmpeg")
    source_path, target_path = photos
    clip = tmp_path / "still.mp4"
    subprocess.run(
        [str(ffmpeg), "-v", "error", "-loop", "1", "-i", str(target_path), "-vf", "noise=alls=12:allf=t",
         "-frames:v", "10", "-r", "24", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip)],
        check=True,
    )  # fmt: skip
    pipeline = SwapPipeline.load(tmp_path / "no-models", workers=2)
    job = SwapJob("still", source_path, clip, tmp_path / "out.mp4", tmp_path / "ckpt", checkpoint_every_frames=4)
    result = pipeline.run(job, lambda update: None, threading.Event())
    assert result.engine == "landmark" and result.frames == 10 and result.quality.faces_swapped == 10
    assert result.quality.id_similarity_min is not None and result.quality.id_similarity_mean is not None
    assert result.quality.id_similarity_mean > 1 - SAME_PERSON_DISTANCE - 0.1
