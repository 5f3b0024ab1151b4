"""CLI: `facefleet console serve | token` — the web console and its sign-in tokens (issue #20)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from facefleet.cli.output import JSON_OPTION, console, fail, print_json

CONFIG_OPTION = typer.Option(None, "--config", help="facefleet.toml to read (the scheduler's).")


def _settings(config: Path | None) -> Any:
    from facefleet.config import load_settings

    try:
        return load_settings(config)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error), hint="fix the config file or the FACEFLEET_* environment variables")


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        fail(f"console address {listen!r} is not host:port", hint="e.g. --listen 127.0.0.1:8470")
    return host.strip("[]"), int(port)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The web console for finance, compliance and operators.", no_args_is_help=True)
    app.add_typer(group, name="console")

    @group.command("serve")
    def serve_cmd(
        config: Path | None = CONFIG_OPTION,
        listen: str | None = typer.Option(None, "--listen", help="host:port (default: [console] listen)."),
    ) -> None:
        """Serve the console; it calls the scheduler's gRPC API as each signed-in person (mTLS)."""
        import uvicorn

        from facefleet.console.app import create_app
        from facefleet.security.certs import CertificateError
        from facefleet.structured_logs import configure_logging

        settings = _settings(config)
        if listen:
            settings = settings.model_copy(update={"console": settings.console.model_copy(update={"listen": listen})})
        host, port = _split_listen(settings.console.listen)
        configure_logging(settings.log_level, settings.log_format)
        try:
            web = create_app(settings)
        except (CertificateError, OSError) as error:
            fail(str(error), hint="the console issues per-person client certificates from the CA in [tls] dir: "
                 "run `facefleet certs init` (or point --config at the scheduler's config)")  # fmt: skip
        console.print(
            f"console: http://{settings.console.listen}/ (scheduler {settings.scheduler.listen}); "
            "sign in with the address `facefleet console token --role ROLE` prints"
        )
        uvicorn.run(web, host=host, port=port, log_level="warning", access_log=False)

    @group.command("token")
    def token_cmd(
        role: list[str] = typer.Option(..., "--role", help="Role to sign in with (repeat for several)."),
        subject: str = typer.Option("", "--subject", help="Who signs in (default: your user name); the audit's actor."),
        ttl: float = typer.Option(0, "--ttl", help="Seconds the token is valid (default: [console] token_ttl_s)."),
        config: Path | None = CONFIG_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Mint a short-lived, signed sign-in token and print the console address that carries it."""
        from facefleet.console.tokens import TokenError, default_subject, sign_in_url

        settings = _settings(config)
        if ttl < 0:
            fail(f"--ttl {ttl:g} must be positive")
        try:
            url, expires = sign_in_url(settings, role, subject or default_subject(), ttl or None)
        except TokenError as error:
            fail(str(error), hint="e.g. facefleet console token --role finance")
        except OSError as error:
            fail(f"cannot read or create the console secret: {error}", hint="check [console] secret_file / [tls] dir")
        if as_json:
            print_json({"url": url, "token": url.split("token=", 1)[1], "expires_at": expires})
        else:
            console.print(url, soft_wrap=True, markup=False, highlight=False)
