"""Every service starts as a real gRPC server on 127.0.0.1 with health checking and reflection."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from facefleet.grpc_server import SERVICE_NAMES, LoopThread, build_aio_server, build_server
from facefleet.v1 import admin_pb2_grpc, agent_pb2_grpc, scheduler_pb2_grpc

REGISTRATIONS = {
    "Scheduler": lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(
        scheduler_pb2_grpc.SchedulerServicer(), s
    ),
    "Agent": lambda s: agent_pb2_grpc.add_AgentServicer_to_server(agent_pb2_grpc.AgentServicer(), s),
    "Admin": lambda s: admin_pb2_grpc.add_AdminServicer_to_server(admin_pb2_grpc.AdminServicer(), s),
}


def _reflected_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    first = next(iter(responses))
    return {s.name for s in first.list_services_response.service}


@pytest.mark.parametrize("on_loop", [False, True], ids=["threads", "grpc.aio"])
@pytest.mark.parametrize("service", sorted(REGISTRATIONS))
def test_health_and_reflection(service: str, on_loop: bool) -> None:
    full_name = SERVICE_NAMES[service]
    loop = LoopThread("test-loop") if on_loop else None
    registrations = [(full_name, REGISTRATIONS[service])]
    handle: Any = (
        build_aio_server(loop, "127.0.0.1:0", registrations, credentials=None)
        if loop
        else build_server("127.0.0.1:0", registrations, credentials=None)
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=full_name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert full_name in _reflected_services(channel)
            with pytest.raises(grpc.RpcError) as unknown:
                health.Check(health_pb2.HealthCheckRequest(service="facefleet.v1.Nope"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        handle.set_serving(False)
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=full_name), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        handle.stop(grace=None)
        if loop is not None:
            loop.stop()


def test_bind_failure_is_a_clear_error() -> None:
    first = build_server("127.0.0.1:0", [], credentials=None)
    try:
        with pytest.raises(OSError, match="in use"):
            build_server(f"127.0.0.1:{first.port}", [], credentials=None)
    finally:
        first.stop(grace=None)


def test_aio_server_bind_failure_is_a_clear_error_and_the_loop_refuses_to_wait_on_itself() -> None:
    loop = LoopThread("test-loop")
    first = build_aio_server(loop, "127.0.0.1:0", [], credentials=None)
    try:
        with pytest.raises(OSError, match="in use"):
            build_aio_server(loop, f"127.0.0.1:{first.port}", [], credentials=None)

        async def waits_on_itself() -> None:
            loop.run(asyncio.sleep(0), timeout=1)

        with pytest.raises(RuntimeError, match="its own loop"):
            loop.run(waits_on_itself(), timeout=5)
    finally:
        first.stop(grace=None)
        loop.stop()
    assert not loop.thread.is_alive()
