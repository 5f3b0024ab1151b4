"""Scheduler.AgentSession end to end: a real scheduler, hollow agents that speak the session (or
only heartbeat and serve RunTask, as an agent of the previous release), and the pool's prefetch
as the agents' own records see it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from facefleet.scheduler.app import SchedulerApp
from facefleet.scheduler.store import Step
from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.scheduler.conftest import FAST_DISPATCH, make_settings
from tests.scheduler.fake_agents import wait_for
from tests.scheduler.test_scheduler_service import task, watch_until_terminal

TERMINAL = ("succeeded", "failed", "cancelled")


def submit_many(stub, count: int, sensitivity: int, frames: int = 1) -> list[str]:  # type: ignore[no-untyped-def]
    """`count` tasks in one SubmitTasks call: all queued at once, so a backlog is certain."""
    items = [scheduler_pb2.SubmitTaskRequest(task=task(sensitivity, frames=frames)) for _ in range(count)]
    results = stub.SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=items)).results
    assert all(result.HasField("submitted") for result in results)
    return [result.submitted.task_id for result in results]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_agent_never_holds_more_than_its_slots_plus_the_pools_prefetch(
    prefetch, start_scheduler, start_agent, client
) -> None:  # type: ignore[no-untyped-def]
    pools = [{"name": "onprem-a", "provider": "onprem", "trust_zone": "private", "prefetch": prefetch}]
    app = start_scheduler(pools=pools)
    agents = [
        start_agent(app.port, f"onprem-{i}", "onprem-a", "private", slots=2, frame_s=0.01, heartbeat_s=0.2)
        for i in range(2)
    ]
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 2, 5, what="both agents in session")
    ids = submit_many(stub, 30, types_pb2.SENSITIVITY_PRIVATE, frames=4)
    wait_for(lambda: all(app.store.get(i).state in TERMINAL for i in ids), 60, what="every task finished")
    assert all(app.store.get(i).state == "succeeded" for i in ids)
    ran = sum((agent.completed for agent in agents), start=type(agents[0].completed)())
    assert sorted(ran) == sorted(ids) and set(ran.values()) == {1}  # each ran once, from the agents' own counts
    # The agents' own records: never more assignments held (running + waiting) than slots + prefetch,
    # and with a backlog the prefetch is used.
    assert max(agent.most_held for agent in agents) == 2 + prefetch


def test_a_cancelled_prefetched_assignment_never_starts(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    """What a compliance lock relies on to recall prefetched cloud work: the cancel pushed on the
    session removes a waiting assignment before it starts."""
    app = start_scheduler(pools=[{"name": "cloud-b", "trust_zone": "cloud", "prefetch": 2}])
    cloud = start_agent(app.port, "cloud-1", "cloud-b", "cloud", slots=1, frame_s=0.05)
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent in session")
    ids = submit_many(stub, 3, types_pb2.SENSITIVITY_PUBLIC, frames=200)
    wait_for(lambda: len(cloud.busy()) == 3, 10, what="one running and two prefetched")
    waiting = [i for i in ids if cloud.executions[i] == 0]
    assert len(waiting) == 2
    for task_id in waiting:
        stub.CancelTask(scheduler_pb2.CancelTaskRequest(task_id=task_id, reason="recalled"))
    wait_for(lambda: len(cloud.busy()) == 1, 5, what="the waiting assignments dropped")
    assert all(cloud.executions[i] == 0 and i in cloud.cancel_requests for i in waiting)
    assert all(app.store.get(i).state == "cancelled" for i in waiting)


def test_an_agent_without_a_session_still_gets_work_over_runtask(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    legacy = start_agent(app.port, "onprem-old", "onprem-a", "private", slots=2, session=False)
    current = start_agent(app.port, "onprem-new", "onprem-a", "private", slots=2)
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 2, 5, what="both agents heartbeating")
    ids = submit_many(stub, 40, types_pb2.SENSITIVITY_PRIVATE)
    for task_id in ids:
        assert watch_until_terminal(stub, task_id)[-1].state == types_pb2.TASK_STATE_SUCCEEDED
    assert sum(legacy.completed.values()) > 0 and sum(current.completed.values()) > 0
    assert sum(legacy.completed.values()) + sum(current.completed.values()) == len(ids)
    assert app.registry.get("onprem-new").session and not app.registry.get("onprem-old").session  # type: ignore[union-attr]


def test_a_refused_assignment_goes_back_to_the_queue_or_fails_the_task(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    agent = start_agent(app.port, "onprem-1", "onprem-a", "private", slots=1)
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent in session")
    own = agent._refusal

    def refusal(request):  # type: ignore[no-untyped-def]
        if request.task.frames == 2:  # the task itself is refused: it fails
            return types_pb2.MODEL_VERIFICATION_FAILED, "model hash mismatch", False
        if request.attempt == 1:  # busy: back to the queue, then it runs
            return types_pb2.NO_CAPACITY, "busy for a moment", True
        return own(request)

    agent._refusal = refusal  # type: ignore[method-assign]
    retried = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PRIVATE)))
    assert watch_until_terminal(stub, retried.task_id)[-1].state == types_pb2.TASK_STATE_SUCCEEDED
    status = stub.GetTask(scheduler_pb2.GetTaskRequest(task_id=retried.task_id))
    assert any("refused: NO_CAPACITY: busy for a moment" in t.reason for t in status.transitions)
    assert agent.completed[retried.task_id] == 1
    failed = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PRIVATE, frames=2)))
    events = watch_until_terminal(stub, failed.task_id)
    assert events[-1].state == types_pb2.TASK_STATE_FAILED
    assert "agent onprem-1 refused: MODEL_VERIFICATION_FAILED: model hash mismatch" in events[-1].reason
    assert agent.executions[failed.task_id] == 0


def test_a_session_must_open_with_a_heartbeat(start_scheduler) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        replies = stub.AgentSession(iter([scheduler_pb2.AgentMessage()]), timeout=5)
        with pytest.raises(grpc.RpcError) as raised:
            list(replies)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first AgentSession message must carry the agent's heartbeat" in (raised.value.details() or "")


def test_a_raised_run_limit_is_pushed_on_the_session_at_once(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    """Spend enforcement extended a run's reservation: its new limit reaches a session agent now,
    not with its next heartbeat (every 5 s here), and goes on in every control while the run lasts."""
    app = start_scheduler(pools=[{"name": "onprem-a", "provider": "onprem", "trust_zone": "private"}])
    agent = start_agent(app.port, "onprem-1", "onprem-a", "private", slots=1, frame_s=0.05, heartbeat_s=5.0)
    stub = client(app.port)
    wait_for(lambda: len(app.registry.agents()) == 1, 10, what="agent in session")
    [task_id] = submit_many(stub, 1, types_pb2.SENSITIVITY_PRIVATE, frames=400)  # 20 s
    wait_for(lambda: agent.busy() == [task_id], 10, what="the run started")
    attempt = app.store.get(task_id).attempts
    app.dispatcher.raise_run_limit(task_id, attempt, 42.0)
    wait_for(lambda: agent.run_limits.get((task_id, attempt)) == 42.0, 1.5, what="the raised limit, pushed")
    assert app.registry.control("onprem-1").run_limits[0].max_run_s == 42.0  # and in every control after
    stub.CancelTask(scheduler_pb2.CancelTaskRequest(task_id=task_id, reason="test done"))


class CountingGate:
    """The lock gate's admission as the dispatcher sees it: how many launches hold it now."""

    def __init__(self) -> None:
        self.held = 0
        self._lock = threading.Lock()

    @contextmanager
    def admitting(self) -> Iterator[None]:
        with self._lock:
            self.held += 1
        try:
            yield
        finally:
            with self._lock:
                self.held -= 1

    def project_locked(self, project: str) -> bool:
        return False


def test_the_lock_gates_admission_is_held_until_the_agent_answers(tmp_path, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    """A lock change waits for admissions decided on the old locks: the assignment is in flight
    from the scheduler's side only once the agent has said something about it."""
    gate = CountingGate()
    app = SchedulerApp(make_settings(tmp_path), dispatcher_settings=FAST_DISPATCH, admission=gate).start()
    try:
        agent = start_agent(app.port, "onprem-1", "onprem-a", "private", slots=1, frame_s=0.2)
        own = agent._assigned

        def answer_late(request, session):  # type: ignore[no-untyped-def]
            agent._loop.loop.call_later(0.5, own, request, session)  # type: ignore[union-attr]

        agent._assigned = answer_late  # type: ignore[method-assign]
        stub = client(app.port)
        wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent in session")
        reply = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PRIVATE, frames=3)))
        wait_for(lambda: app.store.get(reply.task_id).state == "dispatched", 5, what="the assignment sent")
        assert gate.held == 1  # sent, not yet answered
        wait_for(lambda: app.store.get(reply.task_id).state == "running", 5, what="the agent's RUNNING")
        wait_for(lambda: gate.held == 0, 2, what="the admission released")
        assert watch_until_terminal(stub, reply.task_id)[-1].state == types_pb2.TASK_STATE_SUCCEEDED
    finally:
        app.stop()


@pytest.mark.parametrize("session", [True, False], ids=["session", "runtask"])
def test_a_checkpoint_the_agent_cannot_read_reruns_from_frame_zero_on_either_protocol(  # type: ignore[no-untyped-def]
    start_scheduler, start_agent, client, session: bool
) -> None:
    """A task preempted on a pool whose checkpoint root this agent does not share: the agent refuses
    the checkpoint (a RunRefusal on its session, INVALID_ARGUMENT with `facefleet-field:
    checkpoint_uri` on a RunTask stream), and the task runs from frame 0 instead of failing."""
    app = start_scheduler()
    stub = client(app.port)
    task_id = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(frames=8))).task_id  # no agent yet
    store, now = app.store, time.time()
    steps = [Step("placed", "p", pool="cloud-b"), Step("dispatched", "d", agent_id="spot-9", count_attempt=True)]
    assert store.transition_chain(task_id, steps, now, expect_from="queued")
    elsewhere = types_pb2.Progress(checkpoint_frame=5, checkpoint_uri=f"file:///other-pool/ckpt/{task_id}")
    store.record_progress(task_id, "spot-9", elsewhere, now)
    assert store.transition(task_id, "preempted", "spot interruption", now, expect_agent="spot-9")
    assert store.transition(task_id, "queued", "resume after preemption", now, agent_id="")
    cloud = start_agent(app.port, "cloud-1", "cloud-b", "cloud", slots=1, session=session)
    assert watch_until_terminal(stub, task_id)[-1].state == types_pb2.TASK_STATE_SUCCEEDED
    assert cloud.resumed_from[task_id] == 0 and cloud.completed[task_id] == 1  # the agent's own records
    reasons = [t.reason for t in store.transitions_of(task_id)]
    assert any("checkpoint_uri" in r and "start from frame 0" in r for r in reasons), reasons
