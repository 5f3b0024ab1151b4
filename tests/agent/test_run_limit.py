"""The hard run-time limit the agent enforces (RunTaskRequest.max_run_s, HeartbeatResponse.run_limits):
a real agent (gRPC server, run journal, heartbeat loop) with a slow fake pipeline."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefleet.agent.server import TaskRun
from facefleet.domain import RUN_LIMIT_REACHED
from facefleet.rpc_errors import reason_of
from facefleet.v1 import agent_pb2, scheduler_pb2, types_pb2
from tests.agent.conftest import FakePipeline
from tests.agent.test_agent_service import wait_until

FRAMES = 40
FRAME_S = 0.05  # the run needs 2 s


def test_a_run_stops_at_its_limit_cancelled_with_the_reason_journaled_and_the_checkpoint_kept(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(pipeline=FakePipeline(frames=FRAMES, frame_seconds=FRAME_S))
    started = time.monotonic()
    progress = env.run(env.task("t-limit", frames=FRAMES), attempt=1, max_run_s=0.5)
    took = time.monotonic() - started
    final = progress[-1]
    assert final.state == types_pb2.TASK_STATE_CANCELLED and final.error.reason == types_pb2.CANCELLED
    assert final.message.startswith(f"{RUN_LIMIT_REACHED}: the run used its whole 0.5 s limit"), final.message
    assert 0 < final.frames_done < FRAMES  # stopped midway, between frames
    assert 0.5 <= took < 0.5 + 1.0  # the limit, plus one frame and the stream's turnaround at most
    # The agent's own record: journaled as the run's outcome, reported in its inventory.
    journaled = env.handle.runtime.journal.latest("t-limit")
    assert journaled is not None and journaled.attempt == 1 and journaled.outcome is not None
    assert journaled.outcome.state == types_pb2.TASK_STATE_CANCELLED
    assert journaled.outcome.message == final.message
    assert (env.checkpoint_root / "t-limit" / "segment-0.mp4").exists()  # kept: a later attempt resumes
    assert env.handle.runtime.free_slots == 1


def test_a_limit_raised_by_the_heartbeat_reply_lets_the_run_finish(make_agent, fake_scheduler) -> None:  # type: ignore[no-untyped-def]
    scheduler, port = fake_scheduler
    env = make_agent(pipeline=FakePipeline(frames=FRAMES, frame_seconds=FRAME_S), scheduler_port=port)
    result: list[list[types_pb2.Progress]] = []
    task = env.task("t-raise", frames=FRAMES)
    runner = threading.Thread(target=lambda: result.append(env.run(task, attempt=2, max_run_s=1.0)))
    runner.start()
    assert wait_until(lambda: "t-raise" in env.handle.runtime.running_task_ids())
    # A stale attempt's limit is not this run's; the run's own one is raised (heartbeats every 0.2 s).
    scheduler.run_limits = [
        scheduler_pb2.RunLimit(task_id="t-raise", attempt=1, max_run_s=0.1),
        scheduler_pb2.RunLimit(task_id="t-raise", attempt=2, max_run_s=30.0),
    ]
    runner.join(30)
    final = result[0][-1]
    assert final.state == types_pb2.TASK_STATE_SUCCEEDED, final.message
    assert env.handle.runtime.journal.latest("t-raise").outcome.state == types_pb2.TASK_STATE_SUCCEEDED  # type: ignore[union-attr]


def test_a_limit_is_only_raised_never_lowered_nor_added(make_agent) -> None:  # type: ignore[no-untyped-def]
    pipeline = FakePipeline(frames=FRAMES, frame_seconds=FRAME_S)
    pipeline.gate.clear()  # hold the runs before their first frame
    env = make_agent(pipeline=pipeline, slots=2)
    runtime = env.handle.runtime
    result: list[list[types_pb2.Progress]] = []
    limited = threading.Thread(target=lambda: result.append(env.run(env.task("t-a"), attempt=1, max_run_s=5.0)))
    unlimited = threading.Thread(target=lambda: result.append(env.run(env.task("t-b"), attempt=1)))
    limited.start()
    unlimited.start()
    assert wait_until(lambda: len(runtime.running_task_ids()) == 2)
    assert not runtime.raise_run_limit("t-a", 1, 1.0)  # lower: ignored
    assert not runtime.raise_run_limit("t-a", 2, 9.0)  # another attempt: ignored
    assert not runtime.raise_run_limit("t-b", 1, 9.0)  # started without a limit: none is added
    assert not runtime.raise_run_limit("t-none", 1, 9.0)
    assert runtime.raise_run_limit("t-a", 1, 7.5)
    # A repeated RunTask of the running attempt re-attaches and may raise it too.
    reattached = threading.Thread(target=lambda: env.run(env.task("t-a"), attempt=1, max_run_s=8.0))
    reattached.start()
    assert wait_until(lambda: runtime._running["t-a"].max_run_s == 8.0)
    assert runtime._running["t-b"].max_run_s == 0
    for task_id in ("t-a", "t-b"):
        runtime.cancel(task_id, "test done")
    for thread in (limited, unlimited, reattached):
        thread.join(10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 1e12])
def test_a_limit_that_is_not_seconds_is_refused_as_invalid(make_agent, bad: float) -> None:  # type: ignore[no-untyped-def]
    env = make_agent()
    with pytest.raises(grpc.RpcError) as caught:
        env.run(env.task("t-bad"), max_run_s=bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert reason_of(caught.value) == "INVALID_TASK" and "max_run_s" in (caught.value.details() or "")  # type: ignore[attr-defined]
    assert env.run(env.task("t-good"), max_run_s=30.0)[-1].state == types_pb2.TASK_STATE_SUCCEEDED


@settings(max_examples=60, deadline=None)
@given(start=st.floats(0, 1e4), raises=st.lists(st.floats(-10, 1e4, allow_nan=False), max_size=8))
def test_the_enforced_limit_is_the_largest_sent_and_never_below_the_first(start: float, raises: list[float]) -> None:
    """Whatever the order of limits the scheduler sends, the agent enforces the largest (a reservation
    only grows), and a run started without a limit gets none."""
    run = TaskRun(task_id="t", attempt=1, started_at=time.monotonic() + 3600, max_run_s=start)  # timers never fire
    try:
        run.start_limit()
        for value in raises:
            run.raise_limit(value)
        expected = max([start, *raises]) if start > 0 else 0.0
        assert run.max_run_s == expected
    finally:
        run.end_limit()


def test_a_waiting_run_s_limit_counts_from_its_start_and_may_be_raised_while_it_waits(make_agent) -> None:  # type: ignore[no-untyped-def]
    pipeline = FakePipeline(frames=FRAMES, frame_seconds=FRAME_S)
    pipeline.gate.clear()  # the first run holds the only slot
    env = make_agent(pipeline=pipeline, slots=1, max_waiting=1)
    runtime = env.handle.runtime
    first = runtime.start_or_attach(agent_pb2.RunTaskRequest(task=env.task("t-first", frames=FRAMES), attempt=1))
    waiting = runtime.start_or_attach(
        agent_pb2.RunTaskRequest(task=env.task("t-wait", frames=FRAMES), attempt=1, max_run_s=0.3), may_wait=True
    )
    time.sleep(0.6)  # longer than its limit, but it has not started: nothing to stop
    assert waiting.latest.stage == "waiting" and not waiting.cancelled.is_set()
    assert runtime.raise_run_limit("t-wait", 1, 30.0)  # an extension reaches it while it waits
    runtime.cancel("t-first", "make room")
    pipeline.gate.set()
    assert wait_until(lambda: waiting.finished, 20)
    assert first.latest.state == types_pb2.TASK_STATE_CANCELLED
    assert waiting.latest.state == types_pb2.TASK_STATE_SUCCEEDED, waiting.latest.message
