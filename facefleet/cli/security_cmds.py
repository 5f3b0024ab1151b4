"""CLI commands: certs, lock, unlock, audit (placeholder until issue #7 lands)."""

from __future__ import annotations

import typer

from facefleet.cli.output import not_yet


def register(app: typer.Typer) -> None:
    @app.command("certs", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def certs_cmd() -> None:
        """(coming in issue #7)"""
        not_yet("certs", 7)

    @app.command("lock", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def lock_cmd() -> None:
        """(coming in issue #7)"""
        not_yet("lock", 7)

    @app.command("unlock", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def unlock_cmd() -> None:
        """(coming in issue #7)"""
        not_yet("unlock", 7)

    @app.command("audit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def audit_cmd() -> None:
        """(coming in issue #7)"""
        not_yet("audit", 7)
