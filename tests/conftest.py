"""Shared pytest setup: fixtures that start real components live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.prometheus",
]


def pytest_configure(config: object) -> None:
    """Logs go to whatever stderr is current, so captured-and-closed streams never break a test."""
    from facefleet.structured_logs import configure_logging

    configure_logging("info", "json")
