"""Heartbeats reach a (fake) scheduler over real gRPC; the agent obeys drain and cancel replies."""

from __future__ import annotations

import socket
import threading

import grpc

from facefleet.grpc_server import SERVICE_NAMES, build_server
from facefleet.rpc_errors import reason_of
from facefleet.v1 import agent_pb2, scheduler_pb2_grpc, types_pb2
from tests.agent.conftest import FakePipeline, FakeScheduler


def test_heartbeats_carry_identity_and_capacity(make_agent, fake_scheduler) -> None:  # type: ignore[no-untyped-def]
    scheduler, port = fake_scheduler
    pipeline = FakePipeline()
    pipeline.gate.clear()
    env = make_agent(
        pipeline=pipeline,
        scheduler_port=port,
        slots=2,
        pool="aws-spot",
        trust_zone="cloud",
        provider="aws",
        region="us-east-1",
        instance_id="i-0abc",
    )
    assert scheduler.wait_for(lambda beats: len(beats) >= 1)
    first = scheduler.heartbeats[0]
    assert first.agent_id == env.handle.runtime.identity.agent_id
    assert first.address == f"127.0.0.1:{env.handle.port}"
    assert (first.pool, first.trust_zone, first.provider, first.region) == ("aws-spot", "cloud", "aws", "us-east-1")
    assert first.instance_id == "i-0abc" and first.gpu == "none" and first.healthy
    assert (first.total_slots, first.free_slots) == (2, 2)
    assert list(first.execution_providers) == ["CPUExecutionProvider"]
    runner = threading.Thread(target=env.run, args=(env.task("t-hb", frames=6),))
    runner.start()
    assert scheduler.wait_for(lambda beats: list(beats[-1].running_task_ids) == ["t-hb"])
    assert scheduler.heartbeats[-1].free_slots == 1
    pipeline.gate.set()
    runner.join(10)
    assert scheduler.wait_for(lambda beats: beats[-1].sec_per_frame > 0 and not beats[-1].running_task_ids)
    assert abs(scheduler.heartbeats[-1].sec_per_frame - 0.01) < 0.05


def test_drain_reply_stops_new_work_and_cancel_reply_stops_a_task(make_agent, fake_scheduler) -> None:  # type: ignore[no-untyped-def]
    scheduler, port = fake_scheduler
    pipeline = FakePipeline()
    pipeline.gate.clear()
    env = make_agent(pipeline=pipeline, scheduler_port=port, slots=2)
    results: list[list[types_pb2.Progress]] = []
    runner = threading.Thread(target=lambda: results.append(env.run(env.task("t-locked"))))
    runner.start()
    assert pipeline.started.wait(10)
    scheduler.drain = True
    scheduler.cancel_task_ids = ["t-locked", "t-unknown"]
    runner.join(10)
    assert results[0][-1].state == types_pb2.TASK_STATE_CANCELLED
    assert "scheduler" in results[0][-1].error.message
    assert scheduler.wait_for(lambda beats: beats[-1].free_slots == 0 and env.handle.runtime.draining)
    try:
        env.run(env.task("t-new"))
        raise AssertionError("a draining agent accepted a task")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(error) == "NO_CAPACITY" and "draining" in str(error.details())
    scheduler.drain = False
    assert scheduler.wait_for(lambda beats: beats[-1].free_slots == 2)
    pipeline.gate.set()
    assert env.run(env.task("t-new"))[-1].state == types_pb2.TASK_STATE_SUCCEEDED


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_heartbeat_survives_a_scheduler_that_is_down_then_comes_up(make_agent) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    env = make_agent(scheduler_port=port)
    heartbeat = env.handle.session
    assert heartbeat is not None

    def failed_a_few_times() -> bool:
        return heartbeat.failures >= 2

    import time

    deadline = time.monotonic() + 10
    while not failed_a_few_times() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failed_a_few_times() and heartbeat.sent == 0
    # the agent keeps serving meanwhile
    assert env.stub.Describe(agent_pb2.DescribeRequest()).pool == "onprem-test"
    scheduler = FakeScheduler()
    server = build_server(
        f"127.0.0.1:{port}",
        [(SERVICE_NAMES["Scheduler"], lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, s))],
        None,
    )
    try:
        assert scheduler.wait_for(lambda beats: len(beats) >= 2, timeout=20)
    finally:
        server.stop(0)
