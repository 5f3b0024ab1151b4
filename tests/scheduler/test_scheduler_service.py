"""End to end over gRPC on 127.0.0.1: a real scheduler, real placement and rules, hollow agents."""

from __future__ import annotations

import time

import grpc
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facefleet.rpc_errors import FIELD_KEY, reason_of
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.scheduler.fake_agents import wait_for

TERMINAL = {types_pb2.TASK_STATE_SUCCEEDED, types_pb2.TASK_STATE_FAILED, types_pb2.TASK_STATE_CANCELLED}


def task(sensitivity: int = types_pb2.SENSITIVITY_PUBLIC, frames: int = 1, project: str = "demo") -> types_pb2.Task:
    return types_pb2.Task(
        project=project,
        sensitivity=sensitivity,  # type: ignore[arg-type]
        priority=types_pb2.PRIORITY_NORMAL,
        frames=frames,
        source_uri="file:///data/face.jpg",
        target_uri="file:///data/clip.mp4",
    )


def watch_until_terminal(stub, task_id: str) -> list[scheduler_pb2.TaskEvent]:  # type: ignore[no-untyped-def]
    return list(stub.WatchTask(scheduler_pb2.WatchTaskRequest(task_id=task_id), timeout=30))


def test_task_runs_on_the_pool_placement_chose_and_watch_ends_succeeded(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    onprem = start_agent(app.port, "onprem-1", "onprem-a", "private")
    cloud = start_agent(app.port, "cloud-1", "cloud-b", "cloud")
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 2, 5, what="both agents heartbeating")

    public = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PUBLIC)))
    private = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PRIVATE)))
    assert public.created and public.state == types_pb2.TASK_STATE_QUEUED

    for reply, agent, pool, rule in (
        (public, cloud, "cloud-b", "public-cloud"),
        (private, onprem, "onprem-a", "private-onprem"),
    ):
        events = watch_until_terminal(stub, reply.task_id)
        assert events[-1].state == types_pb2.TASK_STATE_SUCCEEDED
        states = [e.state for e in events if not e.HasField("progress")]
        assert states[:3] == [types_pb2.TASK_STATE_QUEUED, types_pb2.TASK_STATE_PLACED, types_pb2.TASK_STATE_DISPATCHED]
        status = stub.GetTask(scheduler_pb2.GetTaskRequest(task_id=reply.task_id))
        assert (status.pool, status.rule, status.agent_id) == (pool, rule, agent.agent_id)
        assert agent.executions[reply.task_id] == 1
        explained = stub.Explain(scheduler_pb2.ExplainRequest(task_id=reply.task_id))
        assert explained.pool == pool and explained.outcome == types_pb2.PlacementDecision.DISPATCH
        assert {c.pool for c in explained.candidates} >= {"onprem-a", "cloud-b"}
    assert onprem.executions[public.task_id] == 0 and cloud.executions[private.task_id] == 0

    dry = stub.Explain(scheduler_pb2.ExplainRequest(task=task(types_pb2.SENSITIVITY_PRIVATE)))
    assert dry.pool == "onprem-a"
    metrics_text = requests.get(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5).text
    assert 'facefleet_placements_total{outcome="dispatch",pool="cloud-b",rule="public-cloud"}' in metrics_text
    assert "facefleet_leader 1.0" in metrics_text


def test_explain_answers_live_for_a_queued_task_the_full_cluster_never_evaluated(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()  # no agent: no free slot anywhere, so no pass evaluates the task
    stub = client(app.port)
    reply = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PRIVATE)))
    time.sleep(0.3)  # several dispatcher passes
    assert app.store.get(reply.task_id).placement is None
    explained = stub.Explain(scheduler_pb2.ExplainRequest(task_id=reply.task_id))
    assert explained.outcome != types_pb2.PlacementDecision.DISPATCH and explained.reason
    assert explained.rule == "private-onprem"  # the rule that will place it once a slot frees


def test_idempotent_submit_list_and_filters(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    stub = client(app.port)
    first = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(), idempotency_key="order-17"))
    again = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(), idempotency_key="order-17"))
    assert (again.task_id, again.created) == (first.task_id, False)
    for _ in range(3):
        stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(project="other")))
    page = stub.ListTasks(scheduler_pb2.ListTasksRequest(project="other", limit=2))
    rest = stub.ListTasks(scheduler_pb2.ListTasksRequest(project="other", limit=2, page_token=page.next_page_token))
    assert len(page.tasks) == 2 and len(rest.tasks) == 1 and not rest.next_page_token
    queued = stub.ListTasks(scheduler_pb2.ListTasksRequest(state=types_pb2.TASK_STATE_QUEUED))
    assert len(queued.tasks) == 4  # no agents: everything waits


def test_agent_killed_mid_task_resumes_on_another_agent_from_its_checkpoint(
    start_scheduler, start_agent, client
) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    first = start_agent(app.port, "onprem-1", "onprem-a", "private", slots=1, frame_s=0.05, checkpoint_every=5)
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent heartbeat")
    reply = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PRIVATE, frames=40)))
    wait_for(lambda: app.store.get(reply.task_id).checkpoint_frame >= 10, 10, what="a checkpoint at frame 10")
    cloud = start_agent(app.port, "cloud-1", "cloud-b", "cloud", slots=1, frame_s=0.01)  # not allowed: private
    second = start_agent(app.port, "onprem-2", "onprem-a", "private", slots=1, frame_s=0.01, checkpoint_every=5)
    first.kill()
    events = watch_until_terminal(stub, reply.task_id)
    assert events[-1].state == types_pb2.TASK_STATE_SUCCEEDED
    status = stub.GetTask(scheduler_pb2.GetTaskRequest(task_id=reply.task_id))
    assert status.agent_id == "onprem-2" and status.attempts == 2
    assert second.resumed_from[reply.task_id] >= 10  # resumed, not restarted
    assert cloud.executions[reply.task_id] == 0
    assert any(t.to_state == types_pb2.TASK_STATE_QUEUED and "onprem-1" in t.reason for t in status.transitions)


def test_cancel_reaches_the_running_agent(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    agent = start_agent(app.port, "onprem-1", "onprem-a", "private", slots=1, frame_s=0.05)
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent heartbeat")
    reply = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PRIVATE, frames=1000)))
    wait_for(lambda: app.store.get(reply.task_id).state == "running", 10, what="task running")
    cancelled = stub.CancelTask(scheduler_pb2.CancelTaskRequest(task_id=reply.task_id, reason="wrong clip"))
    assert cancelled.state == types_pb2.TASK_STATE_CANCELLED
    wait_for(lambda: not agent.busy(), 5, what="agent stops the cancelled task")
    assert reply.task_id in agent.cancel_requests
    assert agent.completed[reply.task_id] == 0
    events = watch_until_terminal(stub, reply.task_id)
    assert events[-1].state == types_pb2.TASK_STATE_CANCELLED


def test_a_run_the_agent_stops_on_its_own_is_not_the_end_of_the_task(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    """An agent's CANCELLED for a task nobody cancelled (a fencing cancel that reached a later attempt,
    an agent shutting down) stops that run only: the task goes back to the queue and still finishes."""
    app = start_scheduler()
    agent = start_agent(app.port, "onprem-1", "onprem-a", "private", slots=1, frame_s=0.05)
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent heartbeat")
    reply = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PRIVATE, frames=20)))
    wait_for(lambda: app.store.get(reply.task_id).state == "running", 10, what="task running")
    assert agent._cancel(reply.task_id)  # as a heartbeat-carried cancel for this task id would
    events = watch_until_terminal(stub, reply.task_id)
    assert events[-1].state == types_pb2.TASK_STATE_SUCCEEDED
    assert agent.completed[reply.task_id] == 1 and agent.executions[reply.task_id] == 2
    assert app.store.get(reply.task_id).attempts == 2


def test_locked_project_and_private_work_never_leave_the_private_zone(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    start_agent(app.port, "cloud-1", "cloud-b", "cloud")
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent heartbeat")
    locked = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(project="locked-proj")))
    private = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PRIVATE)))
    time.sleep(1.0)
    for task_id in (locked.task_id, private.task_id):
        record = app.store.get(task_id)
        assert record.state in ("queued", "failed") and record.agent_id is None


def error_of(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_bad_requests_get_clear_statuses_and_the_server_keeps_serving(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    stub = client(app.port)
    bad = task()
    bad.target_uri = "file:///data/../../etc/shadow"
    error = error_of(lambda: stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=bad)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "task.target_uri" in error.details()
    assert reason_of(error) == "INVALID_TASK"
    assert (FIELD_KEY, "task.target_uri") in tuple(error.trailing_metadata())
    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    raw_call = channel.unary_unary(
        "/facefleet.v1.Scheduler/SubmitTask",
        request_serializer=lambda b: b,
        response_deserializer=scheduler_pb2.SubmitTaskResponse.FromString,
    )

    def raw_submit(raw: bytes) -> scheduler_pb2.SubmitTaskResponse:
        return raw_call(raw, timeout=5)

    padding = b"\xfa\x06" + bytes([0x80, 0xB0, 0x04]) + b"x" * 71680  # field 111, 70 KiB, length-delimited
    oversized = scheduler_pb2.SubmitTaskRequest(task=task()).SerializeToString() + padding
    error = error_of(lambda: raw_submit(oversized))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 65536" in error.details()
    error = error_of(lambda: stub.GetTask(scheduler_pb2.GetTaskRequest(task_id="does-not-exist")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and reason_of(error) == "UNKNOWN_TASK"
    error = error_of(lambda: stub.WatchTask(scheduler_pb2.WatchTaskRequest(task_id="nope")).next())
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = error_of(lambda: stub.CancelTask(scheduler_pb2.CancelTaskRequest(task_id="")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = error_of(lambda: stub.ListTasks(scheduler_pb2.ListTasksRequest(page_token="!!")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in error.details()
    error = error_of(lambda: stub.ListTasks(scheduler_pb2.ListTasksRequest(state=42)))  # type: ignore[arg-type]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = error_of(lambda: stub.Heartbeat(scheduler_pb2.HeartbeatRequest(agent_id="")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = error_of(lambda: stub.Explain(scheduler_pb2.ExplainRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task())).created  # still serving

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        data=st.binary(max_size=512), project=st.text(max_size=70), uri=st.text(max_size=60), enum=st.integers(-3, 12)
    )
    def fuzz(data: bytes, project: str, uri: str, enum: int) -> None:
        candidate = task(project="fuzz")
        candidate.project = project
        candidate.source_uri = uri
        candidate.priority = enum  # type: ignore[assignment]
        raw = scheduler_pb2.SubmitTaskRequest(task=candidate).SerializeToString() + data
        try:
            reply = raw_submit(raw)
            assert reply.task_id
        except grpc.RpcError as rpc_error:
            assert rpc_error.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc_error.details()
            assert rpc_error.details()

    fuzz()
    channel.close()
    assert (
        stub.GetTask(
            scheduler_pb2.GetTaskRequest(task_id=stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task())).task_id)
        ).state
        == types_pb2.TASK_STATE_QUEUED
    )


def test_unplaceable_task_fails_with_the_reason_after_warmup(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    start_agent(app.port, "onprem-1", "onprem-a", "private")
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent heartbeat")
    reply = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PUBLIC)))
    events = watch_until_terminal(stub, reply.task_id)  # public work may only use cloud-*: none exists
    assert events[-1].state == types_pb2.TASK_STATE_FAILED
    assert "rejected by placement" in events[-1].reason and "public-cloud" in events[-1].reason
