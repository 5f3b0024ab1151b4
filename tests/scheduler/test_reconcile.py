"""A new leader settles the runs a previous leader left in flight from the agents' inventories
(their run journals, reported in heartbeats): a finished run's outcome is recorded without running
it again, a run its agent does not hold is re-queued only after an inventory built under the new
term says so (or the agent is declared lost), and an outcome of a superseded run is a duplicate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from facefleet.scheduler import metrics
from facefleet.scheduler.capacity import AgentRegistry
from facefleet.scheduler.dispatcher import Dispatcher, DispatcherSettings
from facefleet.scheduler.store import Step, TaskStore
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.scheduler.test_dispatcher import FixedPlacer, submit


def heartbeat(
    registry: AgentRegistry, agent_id: str, runs: list[types_pb2.RunReport], term: int
) -> scheduler_pb2.HeartbeatResponse:
    return registry.record_heartbeat(
        scheduler_pb2.HeartbeatRequest(
            agent_id=agent_id,
            address="127.0.0.1:9",
            pool="onprem-a",
            trust_zone="private",
            provider="onprem",
            total_slots=4,
            free_slots=0,  # nothing new is sent: only reconciliation is under test
            healthy=True,
            runs=runs,
            known_leader_term=term,
        ),
        time.time(),
    )


def left_in_flight(store: TaskStore, agent_id: str) -> str:
    """A task a previous leader dispatched to `agent_id` (attempt 1) that the agent started."""
    task_id = submit(store, "films", types_pb2.SENSITIVITY_PRIVATE)
    now = time.time()
    steps = [Step("placed", "placed"), Step("dispatched", "sent", agent_id=agent_id, count_attempt=True)]
    assert store.transition_chain(task_id, steps, now, expect_from="queued")
    assert store.transition(task_id, "running", "started", now)
    return task_id


def new_leader(store: TaskStore, registry: AgentRegistry, audits: list[Any], **settings: Any) -> Dispatcher:
    return Dispatcher(
        store,
        FixedPlacer("onprem-a", "private"),
        registry,
        DispatcherSettings(project_limits={}, warmup_s=0, lost_grace_s=0.2, backoff_initial_s=60, **settings),
        audit=lambda kind, fields: audits.append((kind, fields)),
    )


def test_new_leader_records_outcomes_agents_report_and_requeues_only_what_no_agent_holds(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/r.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    audits: list[Any] = []
    finished = left_in_flight(store, "agent-a")
    running = left_in_flight(store, "agent-a")
    forgotten = left_in_flight(store, "agent-a")
    dispatcher = new_leader(store, registry, audits)
    try:
        dispatcher.step()  # leads: a new term; nothing is re-queued before agent-a has reported
        term = dispatcher.term
        assert term > 0 and registry.leader_term == term
        assert {store.get(t).state for t in (finished, running, forgotten)} == {"running"}
        done = types_pb2.RunReport(
            task_id=finished,
            attempt=1,
            leader_term=term - 1,
            finished=True,
            outcome=types_pb2.Progress(task_id=finished, state=types_pb2.TASK_STATE_SUCCEEDED, output_uri="file:///o"),
        )
        going = types_pb2.RunReport(task_id=running, attempt=1, leader_term=term - 1)
        # An inventory built before the agent knew the new term does not count for reconciliation.
        reply = heartbeat(registry, "agent-a", [done, going], term - 1)
        assert reply.leader_term == term
        dispatcher.step()
        assert store.get(forgotten).state == "running"
        for _ in range(2):
            heartbeat(registry, "agent-a", [done, going], term)
            dispatcher.step()
        dispatcher._completions.drain()
        assert store.get(finished).state == "succeeded"
        assert store.get(forgotten).state == "queued"
        assert "does not hold the run" in store.get(forgotten).last_reason
        assert store.get(running).state == "running"  # re-attached (same attempt), not re-queued
        assert store.get(running).attempts == 1
        # The recorded outcome is acknowledged: the agent may stop reporting it.
        acked = heartbeat(registry, "agent-a", [done, going], term).acknowledged
        assert [(ref.task_id, ref.attempt) for ref in acked] == [(finished, 1)]
        assert not [kind for kind, _fields in audits if kind == "duplicate_outcome"]
    finally:
        dispatcher.stop()
        store.close()


def test_an_outcome_of_a_superseded_run_is_a_duplicate_not_a_second_completion(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    audits: list[Any] = []
    task_id = left_in_flight(store, "agent-b")
    dispatcher = new_leader(store, registry, audits)
    before = metrics.DUPLICATE_OUTCOMES.labels(state="succeeded")._value.get()
    try:
        dispatcher.step()
        term = dispatcher.term
        # agent-a ran attempt 0 long ago (superseded: the task is on agent-b now) and reports success.
        stale = types_pb2.RunReport(
            task_id=task_id,
            attempt=0,
            finished=True,
            outcome=types_pb2.Progress(task_id=task_id, state=types_pb2.TASK_STATE_SUCCEEDED),
        )
        heartbeat(registry, "agent-a", [stale], term)
        dispatcher.step()
        dispatcher._completions.drain()
        assert store.get(task_id).state == "running"  # not completed by the stale outcome
        assert metrics.DUPLICATE_OUTCOMES.labels(state="succeeded")._value.get() == before + 1
        assert [fields["task_id"] for kind, fields in audits if kind == "duplicate_outcome"] == [task_id]
        acked = heartbeat(registry, "agent-a", [stale], term).acknowledged
        assert [(ref.task_id, ref.attempt) for ref in acked] == [(task_id, 0)]
    finally:
        dispatcher.stop()
        store.close()


def test_a_run_on_an_agent_that_never_reports_is_requeued_after_the_inventory_wait(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/w.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    task_id = left_in_flight(store, "agent-gone")
    dispatcher = new_leader(store, registry, [], inventory_wait_s=0.3)
    try:
        dispatcher.step()
        assert store.get(task_id).state == "running"
        time.sleep(0.35)
        dispatcher.step()
        assert store.get(task_id).state in ("queued", "dispatched")
        assert any("does not hold the run" in t.reason for t in store.transitions_of(task_id))
    finally:
        dispatcher.stop()
        store.close()


def test_each_leadership_raises_the_durable_term(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/t.db")
    first = store.next_leader_term("lock", 1.0)
    assert store.next_leader_term("lock", 1.0) == first + 1
    assert store.next_leader_term("lock", 2_000_000_000.0) == 2_000_000_000_000  # never below the clock
    store.close()
    assert TaskStore(f"sqlite:///{tmp_path}/t.db").next_leader_term("lock", 1.0) == 2_000_000_000_001
