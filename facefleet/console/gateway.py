"""The console's only way to the scheduler: gRPC with a client certificate for the signed-in person.

The console holds the local CA (as `facefleet certs issue` does) and issues each person a short-lived
client certificate: CN `console:<subject>`, their roles as role URIs. RoleGate on the scheduler then
decides exactly as for the CLI, and the Admin service audits each act under that name.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from facefleet.config import Settings
from facefleet.console.tokens import Person
from facefleet.rpc_errors import reason_of
from facefleet.security import certs
from facefleet.security.tls import material_paths
from facefleet.v1 import admin_pb2_grpc, scheduler_pb2_grpc

CERT_DAYS = 1
CHANNEL_MAX_AGE_S = 12 * 3600  # re-issue well before the 1-day certificate ends
CALL_TIMEOUT_S = 10.0
HTTP_STATUS = {
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
}


@dataclass
class CallFailed(Exception):
    """A scheduler call that did not succeed, as the page shows it."""

    status: int  # HTTP status for the page
    message: str

    def __str__(self) -> str:
        return self.message


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.address = settings.scheduler.listen
        self.insecure = settings.tls.insecure
        self._ca: certs.CertificateAuthority | None = None
        self._root = b""
        if not self.insecure:
            ca_path, _, _ = material_paths(settings.tls, "console")
            self._ca = certs.load_ca(settings.tls.dir, settings.tls.ca)
            self._root = ca_path.read_bytes()
        self._channels: dict[tuple[str, frozenset[str]], tuple[grpc.Channel, float]] = {}
        self._lock = threading.Lock()

    def _credentials(self, person: Person) -> grpc.ChannelCredentials:
        assert self._ca is not None
        cert, key = certs.issue(self._ca, person.certificate_name, roles=sorted(person.roles), days=CERT_DAYS)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return grpc.ssl_channel_credentials(
            root_certificates=self._root,
            private_key=key_pem,
            certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
        )

    def channel(self, person: Person) -> grpc.Channel:
        key = (person.subject, person.roles)
        now = time.monotonic()
        with self._lock:
            cached = self._channels.get(key)
            if cached is not None and now - cached[1] < CHANNEL_MAX_AGE_S:
                return cached[0]
            if cached is not None:
                cached[0].close()
            channel = (
                grpc.insecure_channel(self.address)
                if self.insecure
                else grpc.secure_channel(self.address, self._credentials(person))
            )
            self._channels[key] = (channel, now)
            return channel

    def scheduler(self, person: Person, method: str, request: Any) -> Any:
        return self._call(scheduler_pb2_grpc.SchedulerStub(self.channel(person)), method, request)

    def admin(self, person: Person, method: str, request: Any) -> Any:
        return self._call(admin_pb2_grpc.AdminStub(self.channel(person)), method, request)

    def _call(self, stub: Any, method: str, request: Any) -> Any:
        try:
            return getattr(stub, method)(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            reason = reason_of(error)
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"the scheduler at {self.address} is not reachable or not ready ({details})"
            status = HTTP_STATUS.get(code, 502) if code is not None else 502
            label = f"{code.name if code else 'error'}{f' ({reason})' if reason else ''}"
            raise CallFailed(status, f"{method} failed: {label}: {details}") from None

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
