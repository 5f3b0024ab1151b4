"""The agent's gRPC service against real servers on 127.0.0.1, with a fake swap pipeline."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest
import requests

from facefleet.agent import metrics
from facefleet.rpc_errors import reason_of
from facefleet.v1 import agent_pb2, types_pb2
from tests.agent.conftest import FakePipeline, FakePipelineError

SUCCEEDED = types_pb2.TASK_STATE_SUCCEEDED


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(call)  # type: ignore[call-overload]
    return caught.value


def wait_until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_run_task_streams_progress_to_succeeded(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent()
    task = env.task("t-ok", frames=6)
    progress = env.run(task)
    assert progress[0].state == types_pb2.TASK_STATE_RUNNING
    assert [p.frames_done for p in progress if p.stage == "swap"] == sorted(
        p.frames_done for p in progress if p.stage == "swap"
    )
    final = progress[-1]
    assert final.state == SUCCEEDED, final
    assert final.frames_done == final.frames_total == 6
    assert final.engine == "classical"
    assert final.quality.faces_swapped == 1 and final.quality.id_similarity_mean == pytest.approx(0.8)
    assert final.checkpoint_uri == (env.checkpoint_root / "t-ok").resolve().as_uri() + "/"
    output = env.data / "out" / "t-ok.png"
    assert output.read_bytes() == Path(task.target_uri.removeprefix("file://")).read_bytes()
    # temp files and the (no longer needed) checkpoint are gone, whatever happened
    assert list((env.work_dir / "tasks").iterdir()) == []
    assert not (env.checkpoint_root / "t-ok").exists()
    assert env.pipeline.jobs[0].face_selector == "largest" and env.pipeline.jobs[0].blend == 1.0


def test_repeated_run_task_reattaches_and_replays_without_running_twice(make_agent) -> None:  # type: ignore[no-untyped-def]
    pipeline = FakePipeline(frames=4)
    pipeline.gate.clear()
    env = make_agent(pipeline=pipeline)
    task = env.task("t-dup")
    before = metrics.TASKS.labels(pool="onprem-test", outcome="succeeded")._value.get()
    streams: list[list[types_pb2.Progress]] = []

    def consume() -> None:
        streams.append(env.run(task))

    first = threading.Thread(target=consume)
    first.start()
    assert pipeline.started.wait(10)
    second = threading.Thread(target=consume)  # the dispatcher retries while the run is in flight
    second.start()
    time.sleep(0.3)
    pipeline.gate.set()
    first.join(10)
    second.join(10)
    assert [s[-1].state for s in streams] == [SUCCEEDED, SUCCEEDED]
    replay = env.run(task)  # after completion: the final progress only
    assert len(replay) == 1 and replay[0] == streams[0][-1]
    assert env.run(task, attempt=5)[-1] == streams[0][-1]  # success is final, even for a later attempt
    assert pipeline.calls == ["t-dup"]
    assert metrics.TASKS.labels(pool="onprem-test", outcome="succeeded")._value.get() == before + 1


def test_full_agent_answers_resource_exhausted_no_capacity(make_agent) -> None:  # type: ignore[no-untyped-def]
    pipeline = FakePipeline()
    pipeline.gate.clear()
    env = make_agent(pipeline=pipeline, slots=1)
    holder = threading.Thread(target=env.run, args=(env.task("t-busy"),))
    holder.start()
    assert pipeline.started.wait(10)
    error = rpc_error(env.stub.RunTask(agent_pb2.RunTaskRequest(task=env.task("t-extra"))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(error) == "NO_CAPACITY"
    assert "1 of 1 slots busy" in str(error.details())
    assert env.handle.runtime.describe().free_slots == 0
    pipeline.gate.set()
    holder.join(10)
    assert env.run(env.task("t-extra"))[-1].state == SUCCEEDED


@pytest.mark.parametrize(
    ("overrides", "locked", "expected"),
    [
        ({"sensitivity": types_pb2.SENSITIVITY_PRIVATE}, False, "sensitivity is private"),
        (
            {"sensitivity": types_pb2.SENSITIVITY_PUBLIC, "project": "film-x"},
            True,
            "'film-x' is under a compliance lock",
        ),
    ],
)
def test_cloud_agent_refuses_private_and_locked_work_and_keeps_serving(make_agent, overrides, locked, expected) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(trust_zone="cloud", pool="aws-spot", provider="aws")
    before = metrics.REFUSALS.labels(reason="RESIDENCY_VIOLATION")._value.get()
    request = agent_pb2.RunTaskRequest(task=env.task("t-private", **overrides), project_locked=locked)
    error = rpc_error(env.stub.RunTask(request))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == "RESIDENCY_VIOLATION"
    assert expected in str(error.details()) and "private trust zone" in str(error.details())
    assert env.pipeline.calls == []
    assert metrics.REFUSALS.labels(reason="RESIDENCY_VIOLATION")._value.get() == before + 1
    assert env.run(env.task("t-public"))[-1].state == SUCCEEDED  # still serving


def test_private_agent_runs_private_and_locked_work(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(trust_zone="private")
    task = env.task("t-priv", sensitivity=types_pb2.SENSITIVITY_PRIVATE)
    assert env.run(task, project_locked=True)[-1].state == SUCCEEDED


def test_inputs_outside_allowed_roots_are_rejected(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = make_agent()
    outside = tmp_path / "secret.png"
    outside.write_bytes((env.data / "../data").resolve().joinpath("x").as_posix().encode())  # any bytes
    (env.data / "escape.png").symlink_to(outside)
    cases = {
        "task.source_uri": f"file://{env.data}/../secret.png",
        "task.target_uri": (env.data / "escape.png").as_uri(),
    }
    for field, uri in cases.items():
        key = field.split(".")[-1]
        error = rpc_error(env.stub.RunTask(agent_pb2.RunTaskRequest(task=env.task("t-bad", **{key: uri}))))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(error) == "INPUT_REJECTED"
        assert field in str(error.details()) and str(env.data.resolve()) in str(error.details())
        assert "outside the agent's allowed roots" in str(error.details())
    error = rpc_error(
        env.stub.RunTask(agent_pb2.RunTaskRequest(task=env.task("t-bad", output_uri="file:///etc/out.png")))
    )
    assert reason_of(error) == "INPUT_REJECTED" and "task.output_uri" in str(error.details())
    assert env.pipeline.calls == []
    assert env.run(env.task("t-fine"))[-1].state == SUCCEEDED


def test_non_media_input_and_oversized_input_rejected(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(max_input_bytes=4096)
    text = env.data / "notes.png"
    text.write_text("this is not an image")
    error = rpc_error(env.stub.RunTask(agent_pb2.RunTaskRequest(task=env.task("t-txt", target_uri=text.as_uri()))))
    assert reason_of(error) == "INPUT_REJECTED" and "not an image or video" in str(error.details())
    big = env.data / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(5000))
    error = rpc_error(env.stub.RunTask(agent_pb2.RunTaskRequest(task=env.task("t-big", source_uri=big.as_uri()))))
    assert reason_of(error) == "INPUT_REJECTED" and "over the agent's limit of 4096 bytes" in str(error.details())


def test_cancel_task_stops_a_running_task(make_agent) -> None:  # type: ignore[no-untyped-def]
    pipeline = FakePipeline()
    pipeline.gate.clear()
    env = make_agent(pipeline=pipeline)
    result: list[list[types_pb2.Progress]] = []
    runner = threading.Thread(target=lambda: result.append(env.run(env.task("t-cancel"))))
    runner.start()
    assert pipeline.started.wait(10)
    reply = env.stub.CancelTask(agent_pb2.AgentCancelRequest(task_id="t-cancel", reason="user asked"))
    assert reply.was_running
    runner.join(10)
    final = result[0][-1]
    assert final.state == types_pb2.TASK_STATE_CANCELLED
    assert final.error.reason == types_pb2.CANCELLED and final.message == "user asked"
    assert env.handle.runtime.free_slots == 1
    assert not env.stub.CancelTask(agent_pb2.AgentCancelRequest(task_id="t-cancel")).was_running
    with pytest.raises(grpc.RpcError) as caught:
        env.stub.CancelTask(agent_pb2.AgentCancelRequest())
    assert reason_of(caught.value) == "INVALID_TASK"
    # a later attempt of a cancelled task runs again (the scheduler re-dispatched it)
    pipeline.gate.set()
    assert env.run(env.task("t-cancel"), attempt=1)[-1].state == SUCCEEDED


def test_preemption_notice_stops_runs_as_preempted_and_keeps_the_checkpoint(make_agent) -> None:  # type: ignore[no-untyped-def]
    pipeline = FakePipeline(frames=200, frame_seconds=0.02)
    env = make_agent(pipeline=pipeline)
    result: list[list[types_pb2.Progress]] = []
    runner = threading.Thread(target=lambda: result.append(env.run(env.task("t-spot", frames=200))))
    runner.start()
    assert wait_until(lambda: (env.checkpoint_root / "t-spot" / "segment-0.mp4").exists())
    assert env.handle.runtime.notice_preemption() == ["t-spot"]
    runner.join(10)
    final = result[0][-1]
    assert final.state == types_pb2.TASK_STATE_PREEMPTED and final.error.reason == types_pb2.PREEMPTED
    assert (env.checkpoint_root / "t-spot" / "segment-0.mp4").exists()
    error = rpc_error(env.stub.RunTask(agent_pb2.RunTaskRequest(task=env.task("t-new"))))
    assert reason_of(error) == "NO_CAPACITY" and "preempting" in str(error.details())


def test_resume_uses_the_shared_checkpoint_root(make_agent) -> None:  # type: ignore[no-untyped-def]
    first = make_agent(name="a1")
    second = make_agent(name="a2")  # same checkpoint root: the pool's shared directory
    checkpoint = (first.checkpoint_root / "t-move").resolve()
    progress = second.run(second.task("t-move", frames=6), resume_from_frame=4, checkpoint_uri=checkpoint.as_uri())
    assert progress[-1].state == SUCCEEDED
    job = second.pipeline.jobs[0]
    assert job.resume_from_frame == 4 and Path(job.checkpoint_dir) == checkpoint
    assert [p.frames_done for p in progress if p.stage == "swap"] == [5, 6]
    error = rpc_error(
        second.stub.RunTask(
            agent_pb2.RunTaskRequest(task=second.task("t-elsewhere"), checkpoint_uri="file:///tmp/somewhere-else/")
        )
    )
    assert reason_of(error) == "INPUT_REJECTED" and "checkpoint root" in str(error.details())


def test_pipeline_errors_become_failed_progress_and_agent_keeps_serving(make_agent) -> None:  # type: ignore[no-untyped-def]
    pipeline = FakePipeline(fail_with=FakePipelineError("target video is truncated at frame 3", "INPUT_REJECTED"))
    env = make_agent(pipeline=pipeline)
    final = env.run(env.task("t-trunc"))[-1]
    assert final.state == types_pb2.TASK_STATE_FAILED
    assert final.error.reason == types_pb2.INPUT_REJECTED and "truncated" in final.error.message
    pipeline.fail_with = ZeroDivisionError("boom")
    final = env.run(env.task("t-bug"))[-1]
    assert final.state == types_pb2.TASK_STATE_FAILED and final.error.reason == types_pb2.INTERNAL
    assert "ZeroDivisionError" in final.error.message
    assert list((env.work_dir / "tasks").iterdir()) == []
    pipeline.fail_with = None
    assert env.run(env.task("t-after"))[-1].state == SUCCEEDED


def test_missing_task_id_is_invalid(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent()
    error = rpc_error(env.stub.RunTask(agent_pb2.RunTaskRequest(task=env.task(""))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(error) == "INVALID_TASK"


def test_describe_reports_providers_models_and_engine(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(slots=2, pool="onprem-a", region="eu-1", agent_id="gpu-node-7")
    reply = env.stub.Describe(agent_pb2.DescribeRequest())
    assert reply.agent_id == "gpu-node-7" and reply.pool == "onprem-a" and reply.region == "eu-1"
    assert reply.trust_zone == "private" and reply.engine == "classical"
    assert list(reply.execution_providers) == ["CPUExecutionProvider"]
    assert [(m.name, m.role, m.verified, m.error) for m in reply.models] == [
        ("scrfd", "detector", True, ""),
        ("swap", "swapper", False, "missing"),
    ]
    assert reply.total_slots == 2 and reply.free_slots == 2
    assert reply.gpu == "none" and reply.version


def test_metrics_endpoint_serves_agent_gauges(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(pool="metrics-pool", slots=3)
    env.run(env.task("t-metrics", frames=6))
    body = requests.get(f"http://127.0.0.1:{env.handle.metrics_port}/metrics", timeout=5).text
    assert 'facefleet_agent_slots_free{pool="metrics-pool"} 3.0' in body
    assert 'facefleet_agent_slots_busy{pool="metrics-pool"} 0.0' in body
    assert 'facefleet_agent_frames_total{engine="classical",pool="metrics-pool"} 6.0' in body
    assert 'facefleet_agent_tasks_total{outcome="succeeded",pool="metrics-pool"} 1.0' in body
    assert 'facefleet_agent_frames_per_second{pool="metrics-pool"}' in body
    assert 'facefleet_agent_stage_seconds_count{stage="swap"}' in body


def test_health_service_reports_serving(make_agent) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    env = make_agent()
    with grpc.insecure_channel(f"127.0.0.1:{env.handle.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="facefleet.v1.Agent"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cancel_that_overtakes_its_run_task_keeps_the_task_from_starting(make_agent) -> None:  # type: ignore[no-untyped-def]
    """CancelTask and RunTask travel on separate calls; when the cancel arrives first the task must
    not start afterwards (a lock's stop-and-rerun would otherwise leave it running in the cloud)."""
    pipeline = FakePipeline()
    env = make_agent(pipeline=pipeline, slots=2)
    reply = env.stub.CancelTask(agent_pb2.AgentCancelRequest(task_id="t-late", reason="project locked"))
    assert reply.was_running is False
    error = rpc_error(env.stub.RunTask(agent_pb2.RunTaskRequest(task=env.task("t-late"))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the scheduler re-queues it
    assert reason_of(error) == "CANCELLED"
    assert "before it started" in str(error.details())
    assert "t-late" not in {job.task_id for job in getattr(pipeline, "jobs", [])}
    # Other tasks are unaffected, and the agent keeps serving.
    assert env.run(env.task("t-other"))[-1].state == SUCCEEDED
