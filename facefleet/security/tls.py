"""gRPC credentials from `[tls]` config: mTLS everywhere, plaintext only when asked for, loudly.

Files: `ca` (default `<dir>/ca.pem`), `cert`/`key` (default `<dir>/<name>.pem`, `<dir>/<name>-key.pem`
where name is the component or client identity, e.g. scheduler, agent, compliance).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import grpc
import structlog

from facefleet.config import TLSConfig

log = structlog.get_logger()
_warned: set[str] = set()
_warned_lock = threading.Lock()


class TLSMaterialError(FileNotFoundError):
    """A certificate or key file is missing or unreadable."""


def material_paths(tls: TLSConfig, name: str) -> tuple[Path, Path, Path]:
    """(ca, cert, key) paths for `name`; explicit `tls.cert`/`tls.key` win over the directory default."""
    ca = tls.ca or tls.dir / "ca.pem"
    cert = tls.cert or tls.dir / f"{name}.pem"
    key = tls.key or tls.dir / f"{name}-key.pem"
    return ca, cert, key


def _read(path: Path, what: str, name: str) -> bytes:
    try:
        return path.read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TLSMaterialError(
            f"{what} for {name!r} not readable at {path} ({reason}); run `facefleet certs init "
            f"--dir {path.parent}` for the demo CA, `facefleet certs issue {name} --role ROLE` for one more "
            "certificate, or set [tls] ca/cert/key to your own CA's files"
        ) from exc


def _load(tls: TLSConfig, name: str) -> tuple[bytes, bytes, bytes]:
    ca, cert, key = material_paths(tls, name)
    return _read(ca, "CA certificate", name), _read(cert, "certificate", name), _read(key, "private key", name)


def warn_insecure(where: str) -> None:
    """Log (structlog) and print to stderr, once per `where`, that this link is plaintext."""
    with _warned_lock:
        if where in _warned:
            return
        _warned.add(where)
    message = (
        f"INSECURE: {where} uses plaintext gRPC without authentication or roles. "
        "Local development only: anyone who can reach the port can do anything."
    )
    log.warning("insecure_transport", where=where, message=message)
    sys.stderr.write(f"WARNING: {message}\n")


def server_credentials(tls: TLSConfig, component: str) -> grpc.ServerCredentials:
    """mTLS server credentials: clients must present a certificate issued by our CA."""
    ca, cert, key = _load(tls, component)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def server_credentials_unless_insecure(tls: TLSConfig, component: str) -> grpc.ServerCredentials | None:
    """None (plaintext, warned) when `tls.insecure`, else `server_credentials`. Pass to build_server."""
    if tls.insecure:
        warn_insecure(f"{component} server")
        return None
    return server_credentials(tls, component)


def channel_credentials(tls: TLSConfig, identity: str) -> grpc.ChannelCredentials:
    """Client credentials presenting `<identity>.pem` and trusting only our CA."""
    ca, cert, key = _load(tls, identity)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def secure_channel(
    address: str,
    tls: TLSConfig,
    identity: str,
    insecure: bool | None = None,
    options: list[tuple[str, object]] | None = None,
) -> grpc.Channel:
    """An mTLS channel to `address` as `identity`; plaintext only when `insecure` (default: tls.insecure)."""
    if tls.insecure if insecure is None else insecure:
        warn_insecure(f"client {identity} -> {address}")
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(tls, identity), options=options)


def secure_aio_channel(address: str, tls: TLSConfig, identity: str) -> grpc.aio.Channel:
    """`secure_channel` for asyncio code (create it on the event loop that will use it)."""
    if tls.insecure:
        warn_insecure(f"client {identity} -> {address}")
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, channel_credentials(tls, identity))
