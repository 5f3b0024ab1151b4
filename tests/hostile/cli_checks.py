"""How a hostile-input test runs a CLI command and decides that it ended cleanly."""

from __future__ import annotations

from collections.abc import Sequence

from typer.testing import CliRunner, Result

from facefleet.cli import app
from facefleet.cli.error_boundary import INTERNAL_ERROR
from facefleet.cli.output import console

runner = CliRunner()


def run_cli(args: Sequence[str], stdin: str | bytes | None = None, width: int = 400) -> Result:
    """Run `facefleet ARGS` in-process; tables are `width` columns wide, so cells do not wrap."""
    narrow = console.width
    console.width = width
    try:
        return runner.invoke(app, list(args), input=stdin, catch_exceptions=True)
    finally:
        console.width = narrow


def assert_clean(result: Result, args: Sequence[str] = ()) -> None:
    """A correct result (exit 0) or a clear error: exit 1 (2 for usage) with an `error:` line and a
    `hint:`, never a traceback, never the boundary's internal-error report."""
    shown = f"facefleet {' '.join(map(repr, args))}\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{shown}\nraised {result.exception!r}") from result.exception
    assert "Traceback" not in result.output, shown
    assert INTERNAL_ERROR not in result.output, shown
    assert result.exit_code in (0, 1, 2), shown
    if result.exit_code != 0 and "error:" in result.output:
        assert "hint:" in result.output or "Usage" in result.output or "INVALID" in result.output, shown
