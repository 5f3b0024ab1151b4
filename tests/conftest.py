"""Shared pytest setup: fixtures that start real components live in tests/fixtures/."""

import os

import pytest

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.prometheus",
]


def pytest_configure(config: object) -> None:
    """Logs go to whatever stderr is current, so captured-and-closed streams never break a test."""
    from facefleet.structured_logs import configure_logging

    configure_logging("info", "json")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under FACEFLEET_STRICT_SKIPS=1 (scripts/test, hence CI) a skipped test fails the run.

    Tests skip only when a real component (ffmpeg, prometheus, postgresql) is missing; the test
    command installs them all, so a skip there means a test silently proved nothing.
    """
    if os.environ.get("FACEFLEET_STRICT_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        for report in skipped:
            reporter.write_line(f"skipped under FACEFLEET_STRICT_SKIPS=1: {report.nodeid} {report.longrepr}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
