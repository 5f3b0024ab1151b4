"""The dispatcher's fast path: pipelined passes (commit and RPCs off the loop thread), the slot freed
at completion, and a launch's audit records committed with it before any RunTask leaves."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from facefleet.scheduler.audit_trail import AuditTrail
from facefleet.scheduler.capacity import AgentRegistry
from facefleet.scheduler.dispatcher import Dispatcher, DispatcherSettings
from facefleet.scheduler.placement import RuleSet
from facefleet.scheduler.placement.model import Decision, PoolState, World
from facefleet.scheduler.placement_gateway import PlacementResult, WorldSnapshot
from facefleet.scheduler.rules_source.base import ActiveConfig
from facefleet.scheduler.store import TaskStore
from facefleet.security.audit import AuditLog, query
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.scheduler.fake_agents import HollowAgent, wait_for
from tests.scheduler.test_dispatcher import FixedPlacer, register, submit

T = TypeVar("T")


class HeldStore(TaskStore):
    """A pass's commit (`write`) waits until `release` is set: a commit that is slow to become durable."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.release = threading.Event()
        self.commits_started = 0

    def write(self, op: Callable[[Any], T]) -> T:
        self.commits_started += 1
        assert self.release.wait(10), "test never released the held commit"
        return super().write(op)


def dispatched_count(store: TaskStore, task_id: str) -> int:
    return sum(1 for step in store.transitions_of(task_id) if step.to_state == "dispatched")


def test_pipelined_pass_leaves_uncommitted_tasks_out_and_counts_them_against_limits(tmp_path: Path) -> None:
    store = HeldStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "onprem-1", "onprem-a", "private", slots=10)
    dispatcher = Dispatcher(
        store,
        FixedPlacer("onprem-a", "private"),
        registry,
        DispatcherSettings(project_limits={"busy": 2}, warmup_s=0, backoff_initial_s=60),
    )
    busy = [submit(store, "busy", types_pb2.SENSITIVITY_PRIVATE) for _ in range(4)]
    try:
        assert dispatcher.dispatch_pass(time.time(), pipelined=True) == 2  # returns before the commit
        wait_for(lambda: store.commits_started == 1, 5, what="the pass's commit to start on a worker")
        assert all(store.get(task_id).state == "queued" for task_id in busy)  # not committed yet
        # The next pass must neither re-place the two uncommitted launches nor exceed the limit.
        assert dispatcher.dispatch_pass(time.time(), pipelined=True) == 0
        store.release.set()
        wait_for(lambda: sum(dispatched_count(store, t) for t in busy) == 2, 5, what="the held commit to land")
        assert all(dispatched_count(store, task_id) <= 1 for task_id in busy)
        assert store.commits_started == 1
    finally:
        store.release.set()
        dispatcher.stop()
        store.close()


def test_a_pass_that_cannot_commit_releases_its_slot_reservations(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "onprem-1", "onprem-a", "private", slots=2)

    def failing_commit(op: Any) -> Any:
        raise RuntimeError("disk full")

    store.write = failing_commit  # type: ignore[method-assign]
    dispatcher = Dispatcher(
        store, FixedPlacer("onprem-a", "private"), registry, DispatcherSettings(project_limits={}, warmup_s=0)
    )
    task_id = submit(store, "p", types_pb2.SENSITIVITY_PRIVATE)
    try:
        assert dispatcher.dispatch_pass(time.time(), pipelined=True) == 1
        agent = registry.get("onprem-1")
        wait_for(lambda: not registry.get("onprem-1").in_flight, 5, what="the reservation to be released")  # type: ignore[union-attr]
        assert agent is not None and store.get(task_id).state == "queued"
        assert registry.get("onprem-1").effective_free_slots == 2  # type: ignore[union-attr]
    finally:
        dispatcher.stop()
        store.close()


def test_a_launch_that_does_not_commit_leaves_no_audit_record(tmp_path: Path) -> None:
    """The pass's records are staged in the transaction that commits its launches: when that commit
    fails, neither the store nor the log holds a record of the launch, and nothing was sent (the
    slot is free again). The next pass that launches it records it then."""
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "onprem-1", "onprem-a", "private", slots=2)
    trail = AuditTrail(AuditLog(tmp_path / "audit.jsonl"), registry)
    trail.store = store
    real_write = store.write
    staged_then_failed: list[bool] = []

    def failing_commit(op: Callable[[Any], T]) -> T:
        def op_then_fail(conn: Any) -> T:
            op(conn)  # applies the launch and stages its records in this transaction ...
            staged_then_failed.append(True)
            raise RuntimeError("disk full")  # ... which then rolls back

        return real_write(op_then_fail)

    store.write = failing_commit  # type: ignore[method-assign]
    dispatcher = Dispatcher(
        store,
        FixedPlacer("onprem-a", "private"),
        registry,
        DispatcherSettings(project_limits={}, warmup_s=0),
        listeners=[trail],
        audit=trail,
        records=trail,
    )
    task_id = submit(store, "p", types_pb2.SENSITIVITY_PRIVATE)
    try:
        assert dispatcher.dispatch_pass(time.time(), pipelined=True) == 1  # the commit runs on a worker
        wait_for(lambda: registry.get("onprem-1").effective_free_slots == 2, 5, what="the slot")  # type: ignore[union-attr]
        trail.flush()
        assert staged_then_failed == [True]
        assert store.staged_records() == []
        assert not (tmp_path / "audit.jsonl").exists() or query(tmp_path / "audit.jsonl") == []
        assert store.get(task_id).state == "queued"
    finally:
        dispatcher.stop()
        trail.close()
        store.close()


class Recorder:
    """Listener + audit hook + pass records that note the order of events, whether the launch's
    records were in the store when the RPC began, and whether the slot was free at completion."""

    def __init__(self, registry: AgentRegistry, agent_id: str, store: TaskStore) -> None:
        self.registry = registry
        self.agent_id = agent_id
        self.store = store
        self.events: list[str] = []
        self.free_at_finish: list[int] = []

    def launch_records(self, task: Any, decision: Any) -> list[Any]:
        self.events.append("launch_records")
        return [("dispatch", "scheduler", {"task": task.id, "agent": task.agent_id})]

    def staged(self, row_id: str, records: Any) -> None:
        self.events.append("staged")

    def write_leftovers(self, staged_before: float | None = None) -> int:
        self.events.append(f"leftovers before {staged_before}")
        return 0

    def on_dispatched(self, task: Any, decision: Any) -> None:
        self.events.append("dispatched")

    def on_finished(self, task: Any) -> None:
        record = self.registry.get(self.agent_id)
        assert record is not None
        self.free_at_finish.append(record.free_slots - len(record.in_flight))
        self.events.append("finished")

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.events.append(event)


def test_launch_records_are_committed_before_the_rpc_and_the_slot_is_free_before_listeners_run(
    tmp_path: Path,
) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    agent = HollowAgent("127.0.0.1:9", "onprem-1", "onprem-a", "private", slots=1, heartbeat_s=60, session=False)
    agent.start()
    registry.record_heartbeat(
        scheduler_pb2.HeartbeatRequest(
            agent_id="onprem-1",
            address=agent.address,
            pool="onprem-a",
            trust_zone="private",
            provider="onprem",
            total_slots=1,
            free_slots=1,
            healthy=True,
        ),
        time.time(),
    )
    recorder = Recorder(registry, "onprem-1", store)
    staged_at_rpc: list[list[Any]] = []

    def channel_for(address: str) -> grpc.aio.Channel:
        recorder.events.append("rpc")
        staged_at_rpc.append([records for _row, records in store.staged_records()])  # read from the database
        return grpc.aio.insecure_channel(address)

    dispatcher = Dispatcher(
        store,
        FixedPlacer("onprem-a", "private"),
        registry,
        DispatcherSettings(project_limits={}, warmup_s=0),
        listeners=[recorder],
        audit=recorder,
        records=recorder,
        channel_for=channel_for,
    )
    task_id = submit(store, "p", types_pb2.SENSITIVITY_PRIVATE)
    try:
        assert dispatcher.dispatch_pass(time.time(), pipelined=True) == 1
        wait_for(lambda: store.get(task_id).state == "succeeded", 10, what="the hollow agent to finish the task")
        wait_for(lambda: "finished" in recorder.events, 5, what="the completion listener")
        # made inside the commit, and in the database when the channel was opened (the RunTask
        # call starts on the loop, so `staged`, handed on after the send, may come first)
        assert recorder.events[:2] == ["launch_records", "dispatched"]
        assert sorted(recorder.events[2:4]) == ["rpc", "staged"]
        assert staged_at_rpc == [[[("dispatch", "scheduler", {"task": task_id, "agent": "onprem-1"})]]]
        assert recorder.free_at_finish == [1]  # the slot was already free when the listeners ran
    finally:
        dispatcher.stop()
        agent.kill()
        store.close()


def test_a_leader_writes_leftover_audit_records_first_and_then_those_a_failed_write_left(tmp_path: Path) -> None:
    """At leadership every staged row nobody writes goes to the log; after that, every
    `leftover_records_s`, the rows staged at least that long ago (a failed log write's: younger
    ones may still be on their way from a commit to the writer)."""
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    recorder = Recorder(registry, "onprem-1", store)
    now = [1000.0]
    dispatcher = Dispatcher(
        store,
        FixedPlacer("onprem-a", "private"),
        registry,
        DispatcherSettings(project_limits={}, warmup_s=0, leftover_records_s=60.0),
        records=recorder,
        clock=lambda: now[0],
    )
    try:
        dispatcher.step()  # gains leadership
        now[0] += 59.0
        dispatcher.step()
        now[0] += 1.0
        dispatcher.step()
        now[0] += 30.0
        dispatcher.step()
        assert [e for e in recorder.events if e.startswith("leftovers")] == [
            "leftovers before None",
            "leftovers before 1000.0",
        ]
    finally:
        dispatcher.stop()
        store.close()


class FirstFreePlacer(FixedPlacer):
    """Picks the first pool (by name) that the world shows with a free slot; queues otherwise."""

    def __init__(self, pools: dict[str, int]) -> None:
        super().__init__("", "private")
        self.pools = pools

    def world(self, now: float) -> WorldSnapshot:
        pools = tuple(
            PoolState(name=name, provider="onprem", trust_zone="private", free_slots=free)
            for name, free in sorted(self.pools.items())
        )
        return WorldSnapshot(ActiveConfig(RuleSet(rules=(), version="")), World(pools=pools, budgets={}, locks={}))

    def decide(self, task: types_pb2.Task, now: float, snapshot: Any = None, spec: Any = None) -> PlacementResult:
        _active, world = snapshot or self.world(now)
        pool = next((p.name for p in world.pools if p.free_slots > 0), "")
        self.pool = pool
        result = super().decide(task, now, snapshot, spec)
        if pool:
            return result
        decision = Decision("queue", None, "first-free", "every pool full", (), None)
        return replace(
            result, outcome="queue", pool="", reason="every pool full", decision=decision, summary=decision.to_dict()
        )


def test_a_pass_accounts_for_the_slots_it_takes_so_later_tasks_go_to_other_pools(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "a-1", "pool-a", "private", slots=1)
    register(registry, "b-1", "pool-b", "private", slots=2)
    dispatcher = Dispatcher(
        store,
        FirstFreePlacer({"pool-a": 1, "pool-b": 2}),
        registry,
        DispatcherSettings(project_limits={}, warmup_s=0, backoff_initial_s=60),
    )
    ids = [submit(store, "p", types_pb2.SENSITIVITY_PRIVATE) for _ in range(4)]
    try:
        assert dispatcher.dispatch_pass(time.time()) == 3  # one pass: a gets 1, b gets 2, the 4th waits
        pools = [step.pool for t in ids for step in store.transitions_of(t) if step.to_state == "dispatched"]
        assert sorted(pools) == ["pool-a", "pool-b", "pool-b"]
        # Every slot is taken after the third launch: the pass stops there instead of evaluating
        # the rest of the queue again (Explain answers with a live decision for such a task).
        assert store.get(ids[3]).state == "queued" and store.get(ids[3]).placement is None
    finally:
        dispatcher.stop()
        store.close()


class ProjectPlacer(FirstFreePlacer):
    """Project "go" runs on pool-a while it has a slot; every other project waits (e.g. its budget)."""

    def decide(self, task: types_pb2.Task, now: float, snapshot: Any = None, spec: Any = None) -> PlacementResult:
        result = super().decide(task, now, snapshot, spec)
        if task.project == "go":
            return result
        decision = Decision("queue", None, "budgeted", "budget exhausted", (), None)
        return replace(
            result, outcome="queue", pool="", reason="budget exhausted", decision=decision, summary=decision.to_dict()
        )


@pytest.mark.parametrize(("max_misses", "launched"), [(16, 1), (4, 0)])
def test_a_pass_reads_past_waiting_tasks_to_a_free_slot_up_to_its_miss_budget(
    tmp_path: Path, max_misses: int, launched: int
) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "a-1", "pool-a", "private", slots=1)
    settings = DispatcherSettings(project_limits={}, warmup_s=0, max_misses_per_pass=max_misses)
    dispatcher = Dispatcher(store, ProjectPlacer({"pool-a": 1}), registry, settings)
    waiting = [submit(store, "over-budget", types_pb2.SENSITIVITY_PRIVATE) for _ in range(6)]
    ready = submit(store, "go", types_pb2.SENSITIVITY_PRIVATE)  # 7th in queue order
    try:
        # One free slot: the pass reads the queue a few rows at a time, on past the six waiting tasks.
        assert dispatcher.dispatch_pass(time.time()) == launched
        assert any(step.to_state == "dispatched" for step in store.transitions_of(ready)) == bool(launched)
        decided = [t for t in waiting if (store.get(t).placement or {}).get("reason") == "budget exhausted"]
        assert len(decided) == min(6, max_misses)  # each waiting task evaluated once, its reason kept
    finally:
        dispatcher.stop()
        store.close()


class LockedAtRpcTime:
    """A lock gate whose project lock lands between the pass and the RPC."""

    def __init__(self) -> None:
        self.admissions = 0

    @contextlib.contextmanager
    def admitting(self) -> Iterator[None]:
        self.admissions += 1
        yield

    def project_locked(self, project: str) -> bool:
        return True


def test_a_lock_that_lands_between_the_pass_and_the_rpc_sends_the_task_back_to_placement(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "c-1", "cloud-b", "cloud")
    audits: list[tuple[str, dict[str, Any]]] = []
    gate = LockedAtRpcTime()
    dispatcher = Dispatcher(
        store,
        FixedPlacer("cloud-b", "cloud"),
        registry,
        DispatcherSettings(project_limits={}, warmup_s=0, backoff_initial_s=60),
        audit=lambda event, fields: audits.append((event, fields)),
        admission=gate,
    )
    task_id = submit(store, "p", types_pb2.SENSITIVITY_PUBLIC)
    try:
        assert dispatcher.dispatch_pass(time.time()) == 1  # placed on the cloud pool: not locked then
        wait_for(lambda: store.get(task_id).state == "queued", 5, what="the task back in the queue")
        assert store.get(task_id).last_reason.startswith("re-placing: task of a locked project")
        assert [fields["task_id"] for event, fields in audits if event == "residency_refused"] == [task_id]
        assert gate.admissions == 1
        wait_for(lambda: not registry.get("c-1").in_flight, 5, what="the slot released")  # type: ignore[union-attr]
    finally:
        dispatcher.stop()
        store.close()
