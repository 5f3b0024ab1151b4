"""Build gRPC servers the same way everywhere: health checking, reflection, TLS or (loudly) plaintext."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facefleet.v1 import admin_pb2, agent_pb2, scheduler_pb2

SERVICE_NAMES = {
    "Scheduler": scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
    "Agent": agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name,
    "Admin": admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
}

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class ServerHandle:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    services: list[str] = field(default_factory=list)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in [*self.services, ""]:
            self.health.set(name, status)

    def stop(self, grace: float | None = 1.0) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()


def build_server(
    address: str,
    registrations: Iterable[tuple[str, Callable[[grpc.Server], Any]]],
    credentials: grpc.ServerCredentials | None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_workers: int = 32,
) -> ServerHandle:
    """Create and start a server on `address` (port 0 picks a free one).

    `registrations` pairs a full service name with a function that adds its servicer.
    `credentials=None` means plaintext: only for `--insecure` local development.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    names = []
    for service_name, add in registrations:
        add(server)
        names.append(service_name)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as error:  # grpc reports bind failures as RuntimeError
        port = 0
        cause: Exception | None = error
    else:
        cause = None
    if port == 0:
        raise OSError(
            f"could not bind gRPC server to {address}: the port is in use or the address is not local; "
            "pick another --listen address (port 0 picks a free one)"
        ) from cause
    server.start()
    handle = ServerHandle(server=server, port=port, health=health_servicer, services=names)
    handle.set_serving(True)
    return handle
