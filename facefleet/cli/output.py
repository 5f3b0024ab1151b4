"""Shared CLI output: rich tables for people, `--json` for machines, actionable errors."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def fail(message: str, hint: str = "", code: int = 1) -> NoReturn:
    """Print an error a person can act on and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}")
    if hint:
        err_console.print(f"[yellow]hint:[/] {hint}")
    raise typer.Exit(code)


def not_yet(command: str, issue: int) -> NoReturn:
    fail(f"`facefleet {command}` is not implemented yet (tracked in issue #{issue}).", code=2)
