"""CLI commands: agent, swap (placeholder until issue #5 lands)."""

from __future__ import annotations

import typer

from facefleet.cli.output import not_yet


def register(app: typer.Typer) -> None:
    @app.command("agent", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def agent_cmd() -> None:
        """(coming in issue #5)"""
        not_yet("agent", 5)

    @app.command("swap", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def swap_cmd() -> None:
        """(coming in issue #5)"""
        not_yet("swap", 5)
