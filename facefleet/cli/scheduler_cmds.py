"""CLI commands: scheduler, submit, status, watch, cancel, tasks (placeholder until issue #4 lands)."""

from __future__ import annotations

import typer

from facefleet.cli.output import not_yet


def register(app: typer.Typer) -> None:
    @app.command("scheduler", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def scheduler_cmd() -> None:
        """(coming in issue #4)"""
        not_yet("scheduler", 4)

    @app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def submit_cmd() -> None:
        """(coming in issue #4)"""
        not_yet("submit", 4)

    @app.command("status", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def status_cmd() -> None:
        """(coming in issue #4)"""
        not_yet("status", 4)

    @app.command("watch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def watch_cmd() -> None:
        """(coming in issue #4)"""
        not_yet("watch", 4)

    @app.command("cancel", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def cancel_cmd() -> None:
        """(coming in issue #4)"""
        not_yet("cancel", 4)

    @app.command("tasks", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def tasks_cmd() -> None:
        """(coming in issue #4)"""
        not_yet("tasks", 4)
