"""Build gRPC servers the same way everywhere: health checking, reflection, TLS or (loudly) plaintext."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facefleet.rpc_errors import abort
from facefleet.v1 import admin_pb2, agent_pb2, scheduler_pb2, types_pb2

SERVICE_NAMES = {
    "Scheduler": scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
    "Agent": agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name,
    "Admin": admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
}

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
T = TypeVar("T")


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

    def wait(self) -> None:
        self.server.wait_for_termination()


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
        options=_SERVER_OPTIONS,
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
    port = _bind(server, address, credentials)
    server.start()
    handle = ServerHandle(server=server, port=port, health=health_servicer, services=names)
    handle.set_serving(True)
    return handle


def _bind(server: Any, address: str, credentials: grpc.ServerCredentials | None) -> int:
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
    return int(port)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (Linux, macOS), else asyncio's own.

    A call from another thread (`call_soon_threadsafe`: an assignment the dispatcher sends, a
    submit's answer) reaches uvloop's loop ~0.2 ms sooner here (an eventfd wake and a loop written
    in C), and every RPC costs the loop less CPU; grpc.aio runs on any asyncio loop."""
    try:
        import uvloop
    except ImportError:  # Windows: no uvloop
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """An asyncio event loop on its own daemon thread, for grpc.aio servers and channels.

    `run` and `call_soon` may be called from any thread but the loop's own (`run` there would wait
    for itself: it raises instead)."""

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run `coroutine` on the loop and wait for its result."""
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError(f"{self.thread.name}: run() called on its own loop; it would wait for itself")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(callback, *args)

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)


class AioServices:
    """What a service registration sees of a grpc.aio server: every method is served through its
    service's generic handler. grpc.aio keeps one pending request future per *registered* method
    and waits on all of them (asyncio.wait) for every incoming call: with the ~20 methods of the
    scheduler, that wait cost more than the SubmitTask handler itself."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Generated `add_*_to_server` calls this after `add_generic_rpc_handlers`: nothing to add."""


@dataclass
class AioServerHandle:
    """A grpc.aio server on a LoopThread, driven from ordinary threads (same surface as ServerHandle)."""

    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer
    loop: LoopThread
    services: list[str] = field(default_factory=list)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

        async def apply() -> None:
            for name in [*self.services, ""]:
                await self.health.set(name, status)

        self.loop.run(apply(), timeout=10)

    def stop(self, grace: float | None = 1.0) -> None:
        if not self.loop.thread.is_alive():
            return
        self.set_serving(False)
        self.loop.run(self.server.stop(grace), timeout=(grace or 0) + 10)

    def wait(self) -> None:
        self.loop.run(self.server.wait_for_termination(), timeout=None)


def build_aio_server(
    loop: LoopThread,
    address: str,
    registrations: Iterable[tuple[str, Callable[[AioServices], Any]]],
    credentials: grpc.ServerCredentials | None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_workers: int = 32,
) -> AioServerHandle:
    """Like build_server, but a grpc.aio server on `loop`: coroutine handlers run on the loop with no
    thread hand-off; plain (sync) handlers run on a pool of `max_workers` threads, as before."""

    async def build() -> AioServerHandle:
        server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            interceptors=list(interceptors),
            options=_SERVER_OPTIONS,
        )
        services = AioServices(server)
        names = []
        for service_name, add in registrations:
            add(services)
            names.append(service_name)
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # no stubs for .aio
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, services)  # type: ignore[arg-type]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        port = _bind(server, address, credentials)
        await server.start()
        return AioServerHandle(server=server, port=port, health=health_servicer, loop=loop, services=names)

    handle = loop.run(build(), timeout=30)
    handle.set_serving(True)
    return handle


# ---- tolerant decoding: bytes that are no message get INVALID_ARGUMENT, not UNKNOWN/INTERNAL --------


@dataclass(frozen=True)
class Decoded:
    """A request as it came off the wire: parsed, or why it could not be."""

    message: Any
    size: int
    error: str = ""


def tolerant_decoder(message_class: Any) -> Callable[[bytes], Decoded]:
    """A request deserializer that never raises: gRPC answers a raising one with a bare INTERNAL
    (sync servers) or UNKNOWN (grpc.aio) and logs a traceback."""

    def decode(raw: bytes) -> Decoded:
        try:
            return Decoded(message_class.FromString(raw), len(raw))
        except DecodeError as error:
            return Decoded(None, len(raw), str(error) or "corrupt wire format")

    return decode


def corrupt_request(decoded: Decoded, method: str) -> tuple[int, str, str]:
    """The (reason, message, field) a handler aborts with for bytes that are no message."""
    message = (
        f"{method}: the request bytes are not a valid protobuf message ({decoded.error}); "
        "send a message built from the facefleet.v1 contract"
    )
    return types_pb2.INVALID_TASK, message, "request"


def refuse_corrupt(decoded: Decoded, method: str, context: grpc.ServicerContext) -> None:
    if decoded.error:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, *corrupt_request(decoded, method))


def add_tolerant_service(servicer: Any, service: ServiceDescriptor, server: grpc.Server | AioServices) -> None:
    """Like a generated `add_*Servicer_to_server` for plain (thread-pool) handlers, with tolerant
    decoding: every method of `service` is served by `servicer`'s method of the same name."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        decode = tolerant_decoder(message_factory.GetMessageClass(method.input_type))
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream_method(behaviour, method.name), request_deserializer=decode, response_serializer=serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary_method(behaviour, method.name), request_deserializer=decode, response_serializer=serialize
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[union-attr]


def _unary_method(behaviour: Callable[[Any, grpc.ServicerContext], Any], name: str) -> Callable[..., Any]:
    def handle(decoded: Decoded, context: grpc.ServicerContext) -> Any:
        refuse_corrupt(decoded, name, context)
        return behaviour(decoded.message, context)

    return handle


def _stream_method(behaviour: Callable[[Any, grpc.ServicerContext], Iterable[Any]], name: str) -> Callable[..., Any]:
    def handle(decoded: Decoded, context: grpc.ServicerContext) -> Iterable[Any]:
        refuse_corrupt(decoded, name, context)
        yield from behaviour(decoded.message, context)

    return handle
