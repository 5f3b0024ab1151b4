"""Lock enforcement against a task that moved on between the in-flight read and the stop."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from facefleet.domain import DISPATCHED, PLACED, QUEUED, RUNNING
from facefleet.scheduler.lock_enforcement import LockEnforcer, LockGate
from facefleet.scheduler.store import NewTask, TaskStore
from facefleet.v1 import types_pb2


class Cancels:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def cancel_on_agent(self, task_id: str, agent_id: str, reason: str) -> bool:
        self.sent.append(task_id)
        return True


def test_a_task_requeued_meanwhile_is_left_alone_and_enforcement_goes_on(tmp_path: Path) -> None:
    """The stop is aimed at the agent that held the run. If the task went back to the queue in the
    meantime (reconciliation, a lost agent), the stop must not crash enforcement — at scheduler
    start that would stop the start — and must not cancel anything."""
    store = TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")
    task = types_pb2.Task(project="film-x", sensitivity=types_pb2.SENSITIVITY_PUBLIC, source_uri="file:///a")
    task_id = store.insert_batch([NewTask(task, "k1")], now=1.0)[0].task_id
    for state, agent in ((PLACED, None), (DISPATCHED, "cloud-1"), (RUNNING, None)):
        assert store.transition(task_id, state, "test", 2.0, pool="aws", agent_id=agent)
    running = store.get(task_id)
    assert store.transition(task_id, QUEUED, "reconciled: agent lost", 3.0)  # keeps the last agent id
    rules = SimpleNamespace(current=lambda: SimpleNamespace(locks={"film-x": "talent contract"}))
    cancels = Cancels()
    enforcer = LockEnforcer(
        store, rules, LockGate(rules), cancels, SimpleNamespace(get=lambda _id: None), lambda: {"aws": "cloud"}
    )
    enforcer._stop_and_rerun(running, "project locked")  # the record as enforcement read it: running
    assert store.get(task_id).state == QUEUED and cancels.sent == []
    store.close()
