"""`facefleet swap`: headless local run through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from facefleet.agent.models.tiny import TinyModelSet
from facefleet.cli import app

from .conftest import Scene


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    """The CLI points structlog at CliRunner's stderr, which closes after the call."""
    yield
    structlog.reset_defaults()


def test_swap_cli_reports_engine_frames_and_similarity(
    tiny_models: TinyModelSet, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    output = tmp_path / "cli.png"
    result = CliRunner().invoke(
        app,
        [
            "swap",
            "--source",
            str(source_scene.path),
            "--target",
            str(target_scene.path),
            "--output",
            str(output),
            "--models",
            str(tiny_models.models_dir),
            "--mask",
            "box",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["engine"] == "onnx" and report["frames"] == 1 and report["faces_swapped"] == 1
    assert 0.0 < report["id_similarity_mean"] <= 1.0 and output.exists()  # dlib recognizer, 1 - distance


def test_swap_cli_missing_provider_exits_non_zero_with_the_fix(
    tiny_models: TinyModelSet, tmp_path: Path, source_scene: Scene, target_scene: Scene
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "swap",
            "--source",
            str(source_scene.path),
            "--target",
            str(target_scene.path),
            "--output",
            str(tmp_path / "x.png"),
            "--models",
            str(tiny_models.models_dir),
            "--provider",
            "cuda",
        ],
    )
    assert result.exit_code == 1
    assert "PROVIDER_UNAVAILABLE" in result.output and "facefleet[gpu]" in result.output
