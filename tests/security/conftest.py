"""Fixtures for the security tests: a demo PKI, an audit log, a fake rule source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from facefleet.config import TLSConfig
from facefleet.security import certs
from facefleet.security.audit import AuditLog


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.init_demo_pki(directory)
    return directory


@pytest.fixture(scope="session")
def other_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA: its certificates must be refused by servers of the first."""
    directory = tmp_path_factory.mktemp("other-pki")
    certs.init_demo_pki(directory)
    return directory


@pytest.fixture
def tls(pki_dir: Path) -> TLSConfig:
    return TLSConfig(dir=pki_dir)


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl")


@dataclass
class Snapshot:
    locks: dict[str, str] = field(default_factory=dict)
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)
    version: str = "v1"


class FakeRuleSource:
    """In-memory stand-in with RuleSource's admin surface (set_lock, remove_lock, set_budget, ...)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self.fail_next: Exception | None = None

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    def set_lock(self, project: str, reason: str, by: str) -> None:
        self._maybe_fail()
        self.snapshot.locks[project] = reason

    def remove_lock(self, project: str) -> None:
        self._maybe_fail()
        self.snapshot.locks.pop(project, None)

    def set_budget(self, name: str, monthly_cap_usd: float, alert_pct: float) -> None:
        self._maybe_fail()
        self.snapshot.budgets[name] = {"monthly_cap_usd": monthly_cap_usd, "alert_pct": alert_pct}

    def current(self) -> Snapshot:
        return self.snapshot

    def reload(self) -> Any:
        self._maybe_fail()
        return None


@pytest.fixture
def rule_source() -> FakeRuleSource:
    return FakeRuleSource()
