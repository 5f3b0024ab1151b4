"""The `facefleet` command lists its groups; config loads from TOML and environment, validated."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from facefleet.cli import app
from facefleet.config import load_settings

GROUPS = [
    "scheduler", "agent", "submit", "status", "watch", "cancel", "tasks", "explain",
    "policy", "simulate", "budget", "lock", "audit", "up",
]  # fmt: skip


def test_help_lists_every_group() -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for group in GROUPS:
        assert f" {group} " in result.output, f"`facefleet {group}` missing from --help"


def test_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.scheduler.store_url.startswith("sqlite:///")
    assert settings.policy.source == "file"
    assert settings.scheduler.prometheus_url is None


def test_toml_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "facefleet.toml"
    config.write_text('[scheduler]\nlisten = "127.0.0.1:6000"\n[agent]\npool = "onprem-b"\n')
    monkeypatch.setenv("FACEFLEET_AGENT__POOL", "onprem-c")
    settings = load_settings(config)
    assert settings.scheduler.listen == "127.0.0.1:6000"
    assert settings.agent.pool == "onprem-c"  # environment wins over the file


def test_unknown_keys_and_bad_values_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "facefleet.toml"
    config.write_text('[agent]\ntrust_zone = "moon"\n')
    with pytest.raises(ValidationError, match="trust_zone"):
        load_settings(config)
    config.write_text("[scheduler]\nlisen = 1\n")
    with pytest.raises(ValidationError, match="lisen"):
        load_settings(config)


def test_missing_config_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="create it"):
        load_settings(tmp_path / "absent.toml")
