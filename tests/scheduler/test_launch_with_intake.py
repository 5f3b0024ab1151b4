"""Launch with intake: a submit that reaches an idle leading dispatcher is stored with its launch in
one durable commit (docs/operations.md). Checked from outside the dispatcher: what each commit made
durable (read on the writer's own connection as it commits), queue order against tasks already
waiting, idempotency keys, and submits offered when the dispatcher cannot take them after all."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from facefleet.scheduler.app import SchedulerApp
from facefleet.scheduler.capacity import AgentRegistry
from facefleet.scheduler.dispatcher import Dispatcher, DispatcherSettings
from facefleet.scheduler.group_commit import GroupCommitter
from facefleet.scheduler.store import Change, NewTask, Step, SubmitResult, TaskStore
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.scheduler.conftest import FAST_DISPATCH
from tests.scheduler.fake_agents import HollowAgent, wait_for
from tests.scheduler.test_dispatcher import FixedPlacer, register

PRIVATE = types_pb2.SENSITIVITY_PRIVATE


def make_task(priority: int = types_pb2.PRIORITY_NORMAL, project: str = "p") -> types_pb2.Task:
    return types_pb2.Task(
        project=project,
        sensitivity=PRIVATE,
        priority=priority,  # type: ignore[arg-type]
        frames=1,
        source_uri="file:///a.jpg",
        target_uri="file:///b.jpg",
    )


def durable_states(store: TaskStore) -> list[dict[str, str]]:
    """Every task's state as each commit of the store's writer makes it durable (read on the
    committing connection, in the commit itself)."""
    seen: list[dict[str, str]] = []

    def on_commit(conn: Any) -> None:
        cursor = conn.connection.driver_connection.cursor()
        seen.append(dict(cursor.execute("SELECT id, state FROM tasks").fetchall()))
        cursor.close()

    sa.event.listen(store.engine, "commit", on_commit)
    return seen


@pytest.mark.parametrize("launch_with_intake", [True, False])
def test_a_submit_to_an_idle_scheduler_is_durable_only_with_its_launch(
    launch_with_intake: bool,
    start_scheduler: Callable[..., SchedulerApp],
    start_agent: Callable[..., HollowAgent],
    client: Callable[[int], Any],
) -> None:
    # No periodic pass (idle_sleep_s): the dispatcher idles between the test's submits for sure.
    app = start_scheduler(dispatch=replace(FAST_DISPATCH, idle_sleep_s=30.0), launch_with_intake=launch_with_intake)
    commits = durable_states(app.store)
    agent = start_agent(app.port, "onprem-1", "onprem-a", "private")
    stub = client(app.port)
    wait_for(lambda: app.registry.get("onprem-1") is not None, 5, what="the agent's first heartbeat")
    # A first task, not counted: the dispatcher leads from its first pass on (the submit wakes it).
    first = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=make_task()), timeout=10).task_id
    wait_for(lambda: agent.completed[first] == 1, 10, what="the first task to run")
    ids: list[str] = []
    for _ in range(5):  # one at a time, each to an idle dispatcher
        time.sleep(0.2)
        ids.append(stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=make_task()), timeout=10).task_id)
        wait_for(lambda: agent.completed[ids[-1]] == 1, 10, what="the task to run")
    first_durable = {task_id: next(c[task_id] for c in commits if task_id in c) for task_id in ids}
    if launch_with_intake:  # never durable as queued: one commit stored it and sent it
        assert set(first_durable.values()) == {"dispatched"}, first_durable
    else:  # an intake commit, then a pass reads it back and commits the launch
        assert set(first_durable.values()) == {"queued"}, first_durable
    assert all(agent.executions[task_id] == 1 for task_id in ids)
    # Either way the store keeps the same task: every transition from `submitted` on, one attempt,
    # where it ran, and the placement decision that Explain shows.
    wait_for(lambda: {app.store.get(task_id).state for task_id in ids} == {"succeeded"}, 10, what="the outcomes")
    for task_id in ids:
        record = app.store.get(task_id)
        assert (record.state, record.pool, record.agent_id, record.attempts) == ("succeeded", "onprem-a", "onprem-1", 1)
        assert record.placement_decision() is not None and record.rule
        steps = [(step.from_state, step.to_state) for step in app.store.transitions_of(task_id)]
        assert steps[:3] == [("", "queued"), ("queued", "placed"), ("placed", "dispatched")], steps
        assert steps[-1] == ("running", "succeeded"), steps


class Offering:
    """A dispatcher that takes submits (`take_intake`), stepped by the test; submits from threads."""

    def __init__(self, tmp_path: Path, slots: int = 1, leading: bool = True, **settings: Any) -> None:
        self.store = TaskStore(f"sqlite:///{tmp_path}/d.db")
        self.committer = GroupCommitter(self.store)
        self.registry = AgentRegistry(heartbeat_timeout_s=30)
        self.leading = leading
        self.dispatcher = Dispatcher(
            self.store,
            FixedPlacer("onprem-a", "private"),
            self.registry,
            DispatcherSettings(project_limits={}, warmup_s=0, backoff_initial_s=60, **settings),
            is_leader=lambda: self.leading,
        )
        self.dispatcher.take_intake(self.committer)
        self.committer.on_inserted = self.dispatcher.queue_grew  # as the scheduler wires them
        self.dispatcher.step()  # leads (nothing to place yet)
        register(self.registry, "onprem-1", "onprem-a", "private", slots=slots)

    def offer(self, task: types_pb2.Task, key: str = "", idle: bool = True) -> Callable[[], SubmitResult]:
        """Submit on a thread while the dispatcher idles (or, `idle=False`, while a pass that began
        as this is called runs); returns a call that waits for the reply."""
        self.dispatcher._set_idle(idle)
        replies: list[SubmitResult] = []
        before = len(self.dispatcher._offered)
        thread = threading.Thread(
            target=lambda: replies.append(asyncio.run(self.committer.submit_async(NewTask(task, key), timeout=10)))
        )
        thread.start()
        wait_for(lambda: len(self.dispatcher._offered) > before, 5, what="the dispatcher to take the submit")

        def reply() -> SubmitResult:
            thread.join(10)
            return replies[0]

        return reply

    def dispatched(self, task_id: str) -> int:
        return sum(1 for step in self.store.transitions_of(task_id) if step.to_state == "dispatched")

    def __enter__(self) -> Offering:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.dispatcher.stop()
        self.committer.close()
        self.store.close()


def test_an_offered_submit_waits_behind_older_tasks_in_queue_order(tmp_path: Path) -> None:
    with Offering(tmp_path, slots=1) as world:
        older = world.committer.submit(NewTask(make_task(), "")).task_id  # queued before the offer
        reply = world.offer(make_task())
        assert world.dispatcher.step() == 1
        newer = reply()
        assert newer.created and world.store.get(newer.task_id).state == "queued"  # stored, it waits
        assert world.dispatched(older) == 1 and world.dispatched(newer.task_id) == 0


def test_a_submit_arriving_while_a_young_pass_runs_is_stored_with_the_next_passs_launch(tmp_path: Path) -> None:
    """A pass is running (begun just now): the submit waits for the next pass instead of an intake
    commit of its own, and is never durable as queued."""
    with Offering(tmp_path, slots=4, offer_while_busy_s=30.0) as world:
        commits = durable_states(world.store)
        reply = world.offer(make_task(), idle=False)
        assert world.dispatcher.step() == 1
        stored = reply()
        assert stored.created and world.dispatched(stored.task_id) == 1
        assert next(c[stored.task_id] for c in commits if stored.task_id in c) == "dispatched"


def test_a_submit_arriving_while_a_long_pass_runs_is_stored_at_once(tmp_path: Path) -> None:
    """The pass began longer than `offer_while_busy_s` ago: the intake stores the submit at once
    (answered with no pass run), and a later pass launches it from the queue."""
    with Offering(tmp_path, slots=4, offer_while_busy_s=0.05) as world:
        world.dispatcher._set_idle(False)
        time.sleep(0.1)  # the pass has run for longer than the bound
        stored = asyncio.run(world.committer.submit_async(NewTask(make_task(), ""), timeout=10))
        assert stored.created and world.store.get(stored.task_id).state == "queued"
        assert not world.dispatcher._offered
        assert world.dispatcher.step() == 1 and world.dispatched(stored.task_id) == 1


def queue_reads(store: TaskStore) -> list[float]:
    """Record each read of the store's runnable queue (its `now`)."""
    reads: list[float] = []
    runnable_ids = store.runnable_ids

    def counted(now: float, *args: Any) -> Any:
        reads.append(now)
        return runnable_ids(now, *args)

    store.runnable_ids = counted  # type: ignore[method-assign]
    return reads


def test_a_pass_for_an_offered_submit_reads_the_queue_only_when_it_may_have_changed(tmp_path: Path) -> None:
    """After a read that left nothing waiting, a pass for offered submits skips the queue read,
    unless the intake stored queued tasks or a change re-queued one since."""
    with Offering(tmp_path, slots=8, idle_sleep_s=30.0) as world:
        reads = queue_reads(world.store)
        world.dispatcher.step()  # the queue is empty (read now, or at set-up and held: `queue_read`)
        empty = len(reads)
        assert empty <= 1
        reply = world.offer(make_task())
        assert world.dispatcher.step() == 1 and len(reads) == empty  # no read
        launched = reply().task_id
        stored = world.committer.submit(NewTask(make_task(), "")).task_id  # the intake's own commit
        reply = world.offer(make_task())
        assert world.dispatcher.step() == 2 and len(reads) == empty + 1  # read: it launched the stored task too
        assert world.dispatched(stored) == 1
        reply()
        requeue = Change(launched, (Step("queued", "agent refused: no free slot"),), "dispatched")
        assert world.store.apply_changes([requeue], time.time()) == [True]
        reply = world.offer(make_task())
        assert world.dispatcher.step() == 2 and len(reads) == empty + 2  # read: it launched the re-queued task
        assert world.dispatched(launched) == 2
        reply()


def test_a_task_queued_behind_the_dispatchers_back_waits_at_most_the_idle_sleep(tmp_path: Path) -> None:
    """Another replica's intake (or a backoff that ends) tells this dispatcher nothing: a pass for
    offered submits reads the queue again once `idle_sleep_s` has passed since its last read."""
    with Offering(tmp_path, slots=8, idle_sleep_s=0.3) as world:
        reads = queue_reads(world.store)
        world.dispatcher.step()
        empty = len(reads)
        elsewhere = world.store.insert_batch([NewTask(make_task(), "")], time.time())[0].task_id
        reply = world.offer(make_task())
        assert world.dispatcher.step() == 1 and len(reads) == empty  # within the bound: not read
        reply()
        time.sleep(0.35)
        reply = world.offer(make_task())
        assert world.dispatcher.step() == 2 and len(reads) == empty + 1
        assert world.dispatched(elsewhere) == 1
        reply()


def test_an_urgent_offered_submit_goes_before_an_older_low_priority_task(tmp_path: Path) -> None:
    with Offering(tmp_path, slots=1) as world:
        older = world.committer.submit(NewTask(make_task(types_pb2.PRIORITY_LOW), "")).task_id
        reply = world.offer(make_task(types_pb2.PRIORITY_URGENT))
        assert world.dispatcher.step() == 1
        urgent = reply().task_id
        assert world.dispatched(urgent) == 1 and world.dispatched(older) == 0


def test_an_offered_submit_with_a_known_key_answers_the_stored_task_and_launches_nothing(tmp_path: Path) -> None:
    with Offering(tmp_path, slots=4) as world:
        first = world.offer(make_task(), key="k-1")
        world.dispatcher.step()
        stored = first()
        assert stored.created and world.dispatched(stored.task_id) == 1
        again = world.offer(make_task(), key="k-1")
        world.dispatcher.step()
        repeated = again()
        assert (repeated.task_id, repeated.created) == (stored.task_id, False)
        assert world.dispatched(stored.task_id) == 1
        assert world.store.count_by_state() == {"dispatched": 1}  # no second task, no second launch
        # the launch planned for the repeat's unused id gave its slot back
        agent = world.registry.get("onprem-1")
        assert agent is not None and set(agent.in_flight) <= {stored.task_id}


def test_a_submit_offered_to_a_dispatcher_that_lost_the_lead_is_stored_queued(tmp_path: Path) -> None:
    with Offering(tmp_path, slots=4) as world:
        reply = world.offer(make_task())
        world.leading = False
        assert world.dispatcher.step() == 0
        result = reply()
        assert result.created and world.store.get(result.task_id).state == "queued"


def test_submits_offered_when_the_dispatcher_stops_are_stored(tmp_path: Path) -> None:
    with Offering(tmp_path, slots=4) as world:
        replies = [world.offer(make_task()) for _ in range(3)]
        world.dispatcher.stop()  # before any pass took them
        results = [reply() for reply in replies]
        assert all(r.created for r in results)
        assert {world.store.get(r.task_id).state for r in results} == {"queued"}


def launch_offered(world: Offering) -> tuple[str, Callable[[], None], list[int]]:
    """`insert_with` of the offered submits as the dispatcher calls it: its result, `answer`, and
    the thread its `then` ran on."""
    ran_on: list[int] = []

    def then(conn: Any, applied: list[bool | Exception]) -> str:
        ran_on.append(threading.get_ident())
        return "launched"

    result, answer = world.committer.insert_with(world.dispatcher._take_offered(), time.time(), [], then)
    assert result == "launched"
    return result, answer, ran_on


def test_an_idle_writer_lets_the_dispatcher_commit_and_answer_after_its_launches(tmp_path: Path) -> None:
    """The writer idles: the launch commits on the dispatcher's own thread (no hand-off), and the
    submitter is answered only when the dispatcher says so (after it sent the launches)."""
    with Offering(tmp_path, slots=4) as world:
        reply = world.offer(make_task())
        _result, answer, ran_on = launch_offered(world)
        assert ran_on == [threading.get_ident()]
        submitter = threading.Thread(target=reply)
        submitter.start()
        submitter.join(0.3)
        assert submitter.is_alive()  # stored and durable, but not answered yet
        answer()
        stored = reply()
        assert stored.created and world.store.get(stored.task_id).state == "queued"


def test_background_work_waits_for_the_dispatch_path_to_go_quiet_within_a_bound(tmp_path: Path) -> None:
    """`wait_quiet` (recording completions waits on it): at once while the loop idles; while a pass
    runs, until the loop idles again, or `completion_give_way_s` at the most."""
    with Offering(tmp_path, slots=4) as world:
        dispatcher = world.dispatcher
        dispatcher._set_idle(True)
        started = time.monotonic()
        dispatcher.wait_quiet()
        assert time.monotonic() - started < 0.01
        dispatcher.settings = replace(dispatcher.settings, completion_give_way_s=30.0)
        dispatcher._set_idle(False)  # a pass runs
        waiter = threading.Thread(target=dispatcher.wait_quiet)
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # it waits for the pass
        dispatcher._set_idle(True)
        waiter.join(5)
        assert not waiter.is_alive()
        dispatcher.settings = replace(dispatcher.settings, completion_give_way_s=0.1)
        dispatcher._set_idle(False)
        started = time.monotonic()
        dispatcher.wait_quiet()  # a pass that does not end: the bound
        assert 0.09 <= time.monotonic() - started < 5


def test_a_write_from_a_thread_commits_on_that_thread_while_the_writer_idles(tmp_path: Path) -> None:
    """No hand-off to the writer and back (two thread switches) when the writer has nothing to do;
    while it is busy, the write waits for its next batch on the writer's thread."""
    with Offering(tmp_path, slots=4) as world:
        assert world.committer.run(lambda conn: threading.get_ident()) == threading.get_ident()
        busy = threading.Thread(target=lambda: world.committer.run(lambda conn: time.sleep(0.5)))
        busy.start()
        time.sleep(0.1)  # that write holds the writer now
        ran_on = world.committer.run(lambda conn: threading.get_ident())
        assert ran_on not in (threading.get_ident(), busy.ident)  # queued: the writer's own thread ran it
        busy.join()


def test_a_busy_writer_commits_a_launch_with_intake_and_answers_it_itself(tmp_path: Path) -> None:
    with Offering(tmp_path, slots=4) as world:
        reply = world.offer(make_task())
        busy = threading.Thread(target=lambda: world.committer.run(lambda conn: time.sleep(0.5)))
        busy.start()
        time.sleep(0.1)  # the writer is in that batch now
        _result, _answer, ran_on = launch_offered(world)
        assert ran_on and ran_on[0] != threading.get_ident()  # on the writer's thread
        assert reply().created  # answered by the writer, without `_answer()`
        busy.join()


def test_a_completion_starts_the_next_waiting_task_without_waiting_for_the_idle_pass(
    start_scheduler: Callable[..., SchedulerApp],
    start_agent: Callable[..., HollowAgent],
    client: Callable[[int], Any],
) -> None:
    """Freed slots wake the dispatcher only while tasks wait (a pass after each completion found
    nothing to do at low load): with tasks queued behind a one-slot agent, each completion must
    start the next at once, not at the next periodic pass (30 s here)."""
    app = start_scheduler(dispatch=replace(FAST_DISPATCH, idle_sleep_s=30.0))
    agent = start_agent(app.port, "onprem-1", "onprem-a", "private", slots=1, frame_s=0.05)
    stub = client(app.port)
    wait_for(lambda: app.registry.get("onprem-1") is not None, 5, what="the agent's first heartbeat")
    first = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=make_task()), timeout=10).task_id
    wait_for(lambda: agent.completed[first] == 1, 10, what="the first task to run")  # leading, queue empty
    ids = [stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=make_task()), timeout=10).task_id for _ in range(4)]
    began = time.monotonic()
    wait_for(lambda: all(agent.completed[task_id] == 1 for task_id in ids), 10, what="the queued tasks to run")
    assert time.monotonic() - began < 5


def test_a_pass_wakes_the_servers_loop_once_for_its_assignment_and_its_answer(
    start_scheduler: Callable[..., SchedulerApp],
    start_agent: Callable[..., HollowAgent],
    client: Callable[[int], Any],
) -> None:
    """Each wake-up of the gRPC loop from the dispatcher thread costs the path a GIL hand-off: a
    submit launched with its intake sends the agent's assignment and the submitter's answer in one."""
    app = start_scheduler(dispatch=replace(FAST_DISPATCH, idle_sleep_s=30.0))
    agent = start_agent(app.port, "onprem-1", "onprem-a", "private")
    stub = client(app.port)
    wait_for(lambda: app.registry.get("onprem-1") is not None, 5, what="the agent's first heartbeat")
    first = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=make_task()), timeout=10).task_id
    wait_for(lambda: agent.completed[first] == 1, 10, what="the first task to run")  # leading
    loop: Any = app._loop.loop
    post = loop.call_soon_threadsafe
    wakes: list[str] = []

    def counted(callback: Any, *args: Any) -> Any:
        if threading.current_thread().name == "dispatcher":
            wakes.append(getattr(callback, "__qualname__", repr(callback)))
        return post(callback, *args)

    loop.call_soon_threadsafe = counted
    try:
        time.sleep(0.3)  # the first task's completion is written: the writer idles, the pass commits
        task_id = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=make_task()), timeout=10).task_id
        wait_for(lambda: agent.completed[task_id] == 1, 10, what="the task to run")
    finally:
        loop.call_soon_threadsafe = post
    assert len(wakes) == 1, wakes


def test_a_freed_slot_does_not_keep_a_standby_dispatcher_looping(tmp_path: Path) -> None:
    """A standby (or a loop whose passes fail) hears completions too: a freed slot must cost it at
    most one extra step, never a loop that skips its idle wait."""
    steps: list[float] = []
    with Offering(tmp_path, slots=1, leading=False) as world:
        step = world.dispatcher.step

        def counted(pipelined: bool = False) -> int:
            steps.append(time.monotonic())
            return step(pipelined)

        world.dispatcher.step = counted  # type: ignore[method-assign]
        world.dispatcher.settings = replace(world.dispatcher.settings, idle_sleep_s=30.0)
        world.dispatcher.start()
        wait_for(lambda: len(steps) >= 1, 5, what="the loop's first step")
        world.dispatcher._slot_freed = True  # as a completion on this replica's session leaves it
        world.dispatcher.wake()
        time.sleep(0.5)
        assert len(steps) <= 3, f"{len(steps)} steps in 0.5 s with a 30 s idle wait"
