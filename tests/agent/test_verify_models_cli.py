"""`facefleet agent verify-models`: the Kubernetes init container's check of the models volume."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from facefleet.agent.models.tiny import write_tiny_models
from facefleet.cli import app

runner = CliRunner()


def _text(output: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(output.split())


def test_verified_models_pass_and_a_tampered_file_fails_the_start(tmp_path: Path) -> None:
    write_tiny_models(tmp_path, enhancer=False)
    result = runner.invoke(app, ["agent", "verify-models", "--models", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    statuses = json.loads(result.stdout)
    assert {status["role"] for status in statuses} == {"detector", "recognizer", "swapper"}
    assert all(status["verified"] for status in statuses)

    swapper = next(path for path in tmp_path.glob("*.onnx") if "swap" in path.name)
    data = bytearray(swapper.read_bytes())
    data[-1] ^= 0xFF
    swapper.write_bytes(bytes(data))
    result = runner.invoke(app, ["agent", "verify-models", "--models", str(tmp_path)])
    assert result.exit_code == 1
    assert "error: 1 of 3 models failed verification" in _text(result.output)
    assert "sha256 mismatch" in _text(result.output) and "hint:" in result.output


def test_missing_models_directory_is_one_error_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["agent", "verify-models", "--models", str(tmp_path / "absent")])
    assert result.exit_code == 1
    assert "error: models directory" in _text(result.output) and "Traceback" not in result.output


def test_unparsable_manifest_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "manifest.toml").write_text("[[model]\n")
    result = runner.invoke(app, ["agent", "verify-models", "--models", str(tmp_path)])
    assert result.exit_code == 1
    assert "not valid TOML" in _text(result.output) and "Traceback" not in result.output
