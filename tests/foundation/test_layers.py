"""Process boundaries the layering promises, checked in a fresh interpreter the way a process starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCHEDULER_ONLY = {"facefleet_audit_records", "facefleet_permission_denied", "facefleet_dispatch_latency_seconds"}


def _registered_families(*modules: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}: importlib.import_module(name)\n"
        "from prometheus_client import REGISTRY\n"
        "print(json.dumps(sorted(m.name for m in REGISTRY.collect())))\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.startswith('facefleet.scheduler'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    families, scheduler_modules = (json.loads(line) for line in out.stdout.splitlines()[-2:])
    assert scheduler_modules == [], f"the agent process imported {scheduler_modules}"
    return set(families)


def test_an_agent_process_registers_no_scheduler_metrics() -> None:
    families = _registered_families("facefleet.agent.assembly", "facefleet.security.audit", "facefleet.security.roles")
    assert any(f.startswith("facefleet_agent_") for f in families)
    assert not families & SCHEDULER_ONLY


@pytest.mark.parametrize("module", ["scheduler", "agent", "policies"])
def test_one_import_root(module: str) -> None:
    """`facefleet.scheduler` and `facefleet.agent` are the code; the top-level names are not imported."""
    out = subprocess.run(
        [sys.executable, "-c", "import facefleet.cli, facefleet.demo, sys; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert f"'{module}'" not in out.stdout and not any(
        name.startswith(f"'{module}.") for name in out.stdout.strip("[]\n").split(", ")
    )
