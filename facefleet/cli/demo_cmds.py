"""CLI commands: up (placeholder until issue #8 lands)."""

from __future__ import annotations

import typer

from facefleet.cli.output import not_yet


def register(app: typer.Typer) -> None:
    @app.command("up", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def up_cmd() -> None:
        """(coming in issue #8)"""
        not_yet("up", 8)
