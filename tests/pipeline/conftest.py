"""Fixtures: tiny ONNX models with the real insightface signatures, synthetic faces, a short video."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefleet.agent.models.tiny import TinyModelSet, draw_synthetic_face, write_tiny_models
from tests.fixtures.components import require_component

FFMPEG = shutil.which("ffmpeg")
VIDEO_SIZE = (160, 120)
VIDEO_FRAMES = 36
VIDEO_FACE_CENTER = (70.0, 58.0)
SOURCE_LOOK = {"skin_rgb": (228.0, 172.0, 124.0), "eye_rgb": (30, 60, 200), "mouth_rgb": (200, 20, 60)}

requires_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg binary not installed (apt-get install ffmpeg)")


@dataclass(frozen=True)
class Scene:
    path: Path
    image: np.ndarray
    face_box: tuple[int, int, int, int]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModelSet:
    return write_tiny_models(tmp_path_factory.mktemp("models"), seed=7)


@pytest.fixture()
def models_copy(tiny_models: TinyModelSet, tmp_path: Path) -> Path:
    """A private copy of the tiny models a test may tamper with."""
    target = tmp_path / "models"
    shutil.copytree(tiny_models.models_dir, target)
    return target


def textured_background(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 120, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    return cv2.resize(base, (width, height), interpolation=cv2.INTER_NEAREST)


@pytest.fixture()
def target_scene(tmp_path: Path) -> Scene:
    image = textured_background(120, 160, seed=3)
    box = draw_synthetic_face(image, (70.0, 55.0))
    path = tmp_path / "target.png"
    cv2.imwrite(str(path), image)
    return Scene(path, image, box)


@pytest.fixture()
def source_scene(tmp_path: Path) -> Scene:
    image = np.full((120, 160, 3), 200, np.uint8)
    box = draw_synthetic_face(image, (80.0, 60.0), **SOURCE_LOOK)  # type: ignore[arg-type]
    path = tmp_path / "source.png"
    cv2.imwrite(str(path), image)
    return Scene(path, image, box)


def face_overlay_png(path: Path) -> tuple[int, int, int, int]:
    """An RGBA face (transparent outside it) for ffmpeg's overlay filter; returns its box in the frame."""
    size = 80
    layer = np.zeros((size, size, 3), np.uint8)
    draw_synthetic_face(layer, (size / 2, size / 2))
    alpha = np.zeros((size, size), np.uint8)
    cv2.ellipse(alpha, (size // 2, size // 2), (22, 28), 0, 0, 360, 255, -1)
    cv2.imwrite(str(path), np.dstack([layer, alpha]))
    ox, oy = int(VIDEO_FACE_CENTER[0] - size / 2), int(VIDEO_FACE_CENTER[1] - size / 2)
    return ox + 40 - 22, oy + 40 - 28, ox + 40 + 22, oy + 40 + 28


@dataclass(frozen=True)
class GeneratedVideo:
    path: Path
    frames: int
    face_box: tuple[int, int, int, int]


def make_test_video(directory: Path, frames: int = VIDEO_FRAMES) -> GeneratedVideo:
    """testsrc background + a static synthetic face + a sine audio track, 160x120 at 24 fps."""
    assert FFMPEG is not None
    overlay = directory / "face.png"
    box = face_overlay_png(overlay)
    path = directory / "target.mp4"
    duration = frames / 24
    ox, oy = int(VIDEO_FACE_CENTER[0] - 40), int(VIDEO_FACE_CENTER[1] - 40)
    subprocess.run(
        [
            FFMPEG,
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"testsrc=size={VIDEO_SIZE[0]}x{VIDEO_SIZE[1]}:rate=24",
            "-i",
            str(overlay),
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=440:duration={duration}",
            "-filter_complex",
            f"[0:v][1:v]overlay={ox}:{oy}[v]",
            "-map",
            "[v]",
            "-map",
            "2:a",
            "-frames:v",
            str(frames),
            "-c:v",
            "libx264",
            "-crf",
            "12",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            str(path),
        ],
        check=True,
    )
    return GeneratedVideo(path, frames, box)


@pytest.fixture()
def test_video(tmp_path: Path) -> GeneratedVideo:
    require_component(FFMPEG is not None, "ffmpeg binary", "apt-get install ffmpeg")
    return make_test_video(tmp_path)
