"""CLI commands: budget (placeholder until issue #6 lands)."""

from __future__ import annotations

import typer

from facefleet.cli.output import not_yet


def register(app: typer.Typer) -> None:
    @app.command("budget", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def budget_cmd() -> None:
        """(coming in issue #6)"""
        not_yet("budget", 6)
