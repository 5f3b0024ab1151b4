"""Container health probe: ask a facefleet gRPC server's standard health service if it is SERVING.

Used by the Dockerfiles' HEALTHCHECK (`python -m facefleet.healthcheck scheduler`). With only a
component name it reads the same settings the server reads (`facefleet.toml`, `FACEFLEET_*`), so the
probe dials the server's own listen port with the server's own TLS material. Exit 0 = serving,
1 = anything else (Docker treats every other code as reserved), with one line saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facefleet.config import Settings, TLSConfig, load_settings

DEFAULT_TIMEOUT_S = 3.0
WILDCARD_HOSTS = {"0.0.0.0", "[::]", "::", ""}


class Component(StrEnum):
    scheduler = "scheduler"
    agent = "agent"


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class HealthResult:
    serving: bool
    detail: str


def dial_target(listen: str) -> str:
    """The address a local probe dials for a server listening on `listen` (wildcards become loopback)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {listen!r} is not HOST:PORT; fix the listen setting")
    return f"{'127.0.0.1' if host in WILDCARD_HOSTS else host}:{port}"


def tls_files(tls: TLSConfig, component: str) -> TLSFiles:
    """Resolve CA, certificate and key the way the servers do: explicit paths, else `<dir>/...` defaults."""
    return TLSFiles(
        ca=tls.ca or tls.dir / "ca.pem",
        cert=tls.cert or tls.dir / f"{component}.pem",
        key=tls.key or tls.dir / f"{component}-key.pem",
    )


def channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    missing = [str(path) for path in (files.ca, files.cert, files.key) if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"TLS material not found: {', '.join(missing)}; mount the certificates or pass --insecure"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )


def check_health(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    service: str = "",
    server_name: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> HealthResult:
    """One grpc.health.v1 Check call; never raises for an unreachable or unhealthy server."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (
        grpc.secure_channel(target, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            name = code.name if code is not None else "UNKNOWN"
            return HealthResult(False, f"{target}: health check failed with {name}: {_details(error)}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    subject = f"service {service!r}" if service else "server"
    return HealthResult(reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {subject} {status}")


def _details(error: grpc.RpcError) -> str:
    return (error.details() if isinstance(error, grpc.Call) else None) or str(error)


def _listen_of(settings: Settings, component: Component) -> str:
    return settings.scheduler.listen if component is Component.scheduler else settings.agent.listen


def probe(
    component: Component = typer.Argument(..., help="Which server to probe: scheduler or agent."),
    address: str | None = typer.Option(None, "--address", help="HOST:PORT; default: the component's listen."),
    config: Path | None = typer.Option(None, "--config", help="facefleet.toml to read (default as servers)."),
    insecure: bool | None = typer.Option(
        None, "--insecure/--tls", help="Plaintext or mTLS; default: the tls.insecure setting."
    ),
    server_name: str | None = typer.Option(
        None, "--server-name", help="Name to verify in the server certificate (default: the dialled host)."
    ),
    service: str = typer.Option("", "--service", help="Health service name; empty = the whole server."),
    timeout_s: float = typer.Option(DEFAULT_TIMEOUT_S, "--timeout", help="Seconds before giving up."),
) -> None:
    """Exit 0 when the server reports SERVING, 1 otherwise."""
    try:
        settings = load_settings(config)
        target = dial_target(address or _listen_of(settings, component))
        plaintext = settings.tls.insecure if insecure is None else insecure
        credentials = None if plaintext else channel_credentials(tls_files(settings.tls, component.value))
    except (ValueError, OSError) as error:
        typer.echo(f"unhealthy: {error}", err=True)
        raise typer.Exit(1) from error
    result = check_health(target, credentials, service, server_name, timeout_s)
    typer.echo(("healthy: " if result.serving else "unhealthy: ") + result.detail, err=not result.serving)
    raise typer.Exit(0 if result.serving else 1)


def main() -> None:
    typer.run(probe)


if __name__ == "__main__":
    main()
