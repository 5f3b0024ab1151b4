"""Residency refusal as a property, pipeline reason mapping, NVML gauges, and the `agent describe` CLI."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from facefleet.agent import metrics
from facefleet.agent.gpu_stats import GpuProbe
from facefleet.agent.server import AgentIdentity, reason_from_error, residency_refusal
from facefleet.cli import app
from facefleet.v1 import agent_pb2, types_pb2


@given(
    zone=st.sampled_from(["private", "cloud"]),
    sensitivity=st.sampled_from(list(types_pb2.Sensitivity.values())),
    locked=st.booleans(),
    project=st.text(max_size=12),
)
def test_residency_refusal_iff_cloud_and_private_or_locked(
    zone: str, sensitivity: int, locked: bool, project: str
) -> None:
    identity = AgentIdentity("a1", "pool", zone, "aws", "us", "127.0.0.1:1")
    request = agent_pb2.RunTaskRequest(
        task=types_pb2.Task(id="t", project=project, sensitivity=sensitivity),  # type: ignore[arg-type]
        project_locked=locked,
    )
    # an unset sensitivity counts as private (facefleet.domain.DEFAULT_SENSITIVITY)
    needs_private = sensitivity in (types_pb2.SENSITIVITY_PRIVATE, types_pb2.SENSITIVITY_UNSPECIFIED) or locked
    refusal = residency_refusal(identity, request)
    assert (refusal is not None) == (zone == "cloud" and needs_private)
    if refusal is not None:
        assert "task t refused by agent a1" in refusal and "private trust zone" in refusal


def test_reason_from_error_understands_names_ints_and_enums() -> None:
    import enum

    class Named(Exception):
        reason_code: Any = "MODEL_VERIFICATION_FAILED"

    class Mirror(enum.Enum):
        PROVIDER_UNAVAILABLE = "x"

    assert reason_from_error(Named()) == types_pb2.MODEL_VERIFICATION_FAILED
    error = Named()
    error.reason_code = types_pb2.INPUT_REJECTED
    assert reason_from_error(error) == types_pb2.INPUT_REJECTED
    error.reason_code = Mirror.PROVIDER_UNAVAILABLE
    assert reason_from_error(error) == types_pb2.PROVIDER_UNAVAILABLE
    error.reason_code = "NOT_A_REASON"
    assert reason_from_error(error) == types_pb2.INTERNAL
    assert reason_from_error(ValueError("x")) == types_pb2.INTERNAL


def test_gpu_probe_without_nvml_reports_none() -> None:
    probe = GpuProbe()  # this host has no NVIDIA driver
    if probe.available:  # on a GPU host the real values must be sane instead
        name, memory_mb = probe.describe()
        assert name != "none" and memory_mb > 0
        assert all(0.0 <= s.utilization_ratio <= 1.0 for s in probe.publish())
    else:
        assert probe.describe() == ("none", 0) and probe.publish() == []
        assert probe.unavailable_reason


def test_gpu_probe_publishes_nvml_readings(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 1  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=37, memory=10)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        used=5 * 1024**3, total=80 * 1024**3, free=75 * 1024**3
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = GpuProbe()
    assert probe.available
    assert probe.describe() == ("NVIDIA H100 80GB HBM3", 80 * 1024)
    probe.publish()
    label = "0:NVIDIA H100 80GB HBM3"
    assert metrics.GPU_UTILIZATION.labels(gpu=label)._value.get() == 0.37
    assert metrics.GPU_MEMORY_USED.labels(gpu=label)._value.get() == 5 * 1024**3


def test_cli_agent_describe_json_and_table(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(pool="onprem-cli", agent_id="node-cli")
    runner = CliRunner()
    result = runner.invoke(app, ["agent", "describe", f"127.0.0.1:{env.handle.port}", "--insecure", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["agent_id"] == "node-cli" and data["pool"] == "onprem-cli" and data["engine"] == "classical"
    assert data["models"][1]["verified"] is False and data["free_slots"] == 1
    result = runner.invoke(app, ["agent", "describe", f"127.0.0.1:{env.handle.port}", "--insecure"])
    assert result.exit_code == 0 and "onprem-cli" in result.stdout and "scrfd" in result.stdout


def test_cli_agent_describe_unreachable_is_actionable() -> None:
    result = CliRunner().invoke(app, ["agent", "describe", "127.0.0.1:1", "--insecure"])
    assert result.exit_code == 1
    assert "Describe on 127.0.0.1:1 failed: UNAVAILABLE" in result.output and "hint" in result.output


def test_cli_agent_run_serves_until_sigterm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import re
    import signal
    import subprocess
    import time

    import grpc

    from facefleet.v1 import agent_pb2_grpc

    (tmp_path / "models").mkdir()
    command = [
        str(Path(sys.executable).parent / "facefleet"), "agent", "run", "--pool", "onprem-cli", "--trust-zone",
        "private", "--scheduler", "127.0.0.1:1", "--models", str(tmp_path / "models"), "--listen", "127.0.0.1:0",
        "--metrics-port", "0", "--allowed-root", str(tmp_path), "--work-dir", str(tmp_path / "work"),
        "--checkpoint-root", str(tmp_path / "ck"), "--insecure",
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "300"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"on port (\d+)", line)
        assert match, line + (process.stderr.read() if process.poll() is not None and process.stderr else "")
        with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            reply = agent_pb2_grpc.AgentStub(channel).Describe(agent_pb2.DescribeRequest(), timeout=10)
        assert reply.pool == "onprem-cli" and reply.trust_zone == "private" and reply.engine
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            time.sleep(0.1)


def test_cli_agent_run_rejects_bad_flags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    base = ["agent", "run", "--pool", "p", "--scheduler", "127.0.0.1:1", "--insecure"]
    result = runner.invoke(app, [*base, "--trust-zone", "moon", "--models", str(tmp_path)])
    assert result.exit_code == 1 and "--trust-zone must be private or cloud" in result.output
    result = runner.invoke(app, [*base, "--trust-zone", "cloud", "--models", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "models directory" in result.output
