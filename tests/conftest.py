"""Shared pytest setup: fixtures that start real components live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.prometheus",
]
