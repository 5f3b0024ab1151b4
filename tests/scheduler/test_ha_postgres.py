"""Two scheduler replicas (real processes) on one real PostgreSQL: one leads, the other takes over
when the leader is killed, and no task is dispatched twice (outside the at-least-once window of
tasks in flight at the kill, which the agents' idempotency absorbs)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from facefleet.domain import IN_FLIGHT, TERMINAL
from facefleet.scheduler.store import TaskStore, tasks, transitions
from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.scheduler.conftest import write_policy
from tests.scheduler.fake_agents import HollowAgent, wait_for
from tests.scheduler.scheduler_process import SchedulerProcess

TASKS = 400


def submit_many(address: str, count: int, prefix: str) -> list[str]:
    ids = []
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for i in range(count):
            task = types_pb2.Task(
                project="ha",
                sensitivity=types_pb2.SENSITIVITY_PRIVATE,
                frames=3,
                source_uri="file:///data/face.jpg",
                target_uri=f"file:///data/{prefix}{i}.jpg",
            )
            ids.append(stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task), timeout=10).task_id)
    return ids


@pytest.mark.slow
@pytest.mark.postgres
def test_leader_killed_hands_over_without_double_dispatch(postgres_url: str, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy")
    first = SchedulerProcess(postgres_url, policy, tmp_path / "first.log").start()
    time.sleep(1.0)  # let the first replica take the advisory lock
    second = SchedulerProcess(postgres_url, policy, tmp_path / "second.log").start()
    addresses = f"{first.address},{second.address}"
    agents = [
        HollowAgent(addresses, f"onprem-{i}", "onprem-a", "private", slots=8, frame_s=0.02, heartbeat_s=0.3).start()
        for i in range(2)
    ]
    reader = TaskStore(postgres_url)
    try:
        ids = submit_many(second.address, TASKS // 2, "a")  # any replica accepts submits
        wait_for(lambda: reader.count_by_state().get("succeeded", 0) >= 50, 60, what="the leader to run some tasks")
        first.kill9()
        with reader._reader.connect() as conn:
            at_kill = {row.id: row.state for row in conn.execute(sa.select(tasks.c.id, tasks.c.state))}
        in_flight_at_kill = {task_id for task_id, state in at_kill.items() if state in IN_FLIGHT}
        ids += submit_many(second.address, TASKS // 2, "b")  # after the kill: only the survivor can run these

        def all_done() -> bool:
            counts = reader.count_by_state()
            return sum(counts.get(state, 0) for state in TERMINAL) == len(ids)

        wait_for(all_done, 120, interval=0.5, what="the surviving replica to finish every task")
        with reader._reader.connect() as conn:
            final = {row.id: row.state for row in conn.execute(sa.select(tasks.c.id, tasks.c.state))}
            rows = list(conn.execute(sa.select(transitions.c.task_id, transitions.c.to_state, transitions.c.reason)))
        assert set(final) == set(ids) and set(final.values()) == {"succeeded"}
        dispatches = Counter(row.task_id for row in rows if row.to_state == "dispatched")
        completions = Counter(row.task_id for row in rows if row.to_state in TERMINAL)
        assert all(count == 1 for count in completions.values())
        twice = {task_id for task_id, count in dispatches.items() if count > 1}
        assert twice <= in_flight_at_kill, "a task not in flight at the kill was dispatched twice"
        # Counted from the agents: the survivor asked them what they held before re-queuing, so
        # no task ran to completion twice, not even one in flight at the kill.
        completed: Counter[str] = Counter()
        for agent in agents:
            completed.update(agent.completed)
        assert set(completed) == set(ids)
        assert {task_id for task_id, count in completed.items() if count > 1} == set()
    finally:
        reader.close()
        for agent in agents:
            agent.kill()
        second.stop()
        first.stop()
