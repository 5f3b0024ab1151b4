"""CLI commands: explain, policy, simulate (placeholder until issue #3 lands)."""

from __future__ import annotations

import typer

from facefleet.cli.output import not_yet


def register(app: typer.Typer) -> None:
    @app.command("explain", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def explain_cmd() -> None:
        """(coming in issue #3)"""
        not_yet("explain", 3)

    @app.command("policy", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def policy_cmd() -> None:
        """(coming in issue #3)"""
        not_yet("policy", 3)

    @app.command("simulate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def simulate_cmd() -> None:
        """(coming in issue #3)"""
        not_yet("simulate", 3)
