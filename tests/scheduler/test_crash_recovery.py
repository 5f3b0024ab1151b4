"""kill -9 of a real `facefleet scheduler run` process in the middle of a 2,000+ task burst.

Every accepted task (an id came back) must reach a terminal state after a restart, and its
completion must be recorded exactly once. Clients retry a failed submit with the same
idempotency key, so a task committed just before the crash whose reply was lost is not duplicated.
"""

from __future__ import annotations

import threading
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

BURST = 2400
CLIENTS = 12


@pytest.mark.slow
def test_kill_9_mid_burst_loses_nothing_and_completes_each_task_once(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/scheduler.db"
    scheduler = SchedulerProcess(store_url, write_policy(tmp_path / "policy"), tmp_path / "scheduler.log").start()
    agents = [
        HollowAgent(scheduler.address, "onprem-1", "onprem-a", "private", slots=16, heartbeat_s=0.3).start(),
        HollowAgent(scheduler.address, "onprem-2", "onprem-a", "private", slots=16, heartbeat_s=0.3).start(),
        HollowAgent(scheduler.address, "cloud-1", "cloud-b", "cloud", slots=16, heartbeat_s=0.3).start(),
    ]
    accepted: dict[str, str] = {}  # idempotency key -> task id
    lock = threading.Lock()
    done_submitting = threading.Event()

    def client(n: int) -> None:
        channel = grpc.insecure_channel(scheduler.address)
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for i in range(BURST // CLIENTS):
            key = f"c{n}-{i}"
            task = types_pb2.Task(
                project=f"crash-{n % 3}",
                sensitivity=(types_pb2.SENSITIVITY_PRIVATE, types_pb2.SENSITIVITY_PUBLIC)[i % 2],
                priority=1 + i % 4,  # type: ignore[arg-type]
                frames=1,
                source_uri="file:///data/face.jpg",
                target_uri=f"file:///data/{key}.jpg",
            )
            while True:  # retry through the outage with the same key
                try:
                    reply = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task, idempotency_key=key), timeout=5)
                    with lock:
                        assert accepted.setdefault(key, reply.task_id) == reply.task_id
                    break
                except grpc.RpcError as error:
                    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
                    time.sleep(0.1)
        channel.close()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(accepted) >= 700, 120, what="700 accepted submits before the kill")
    scheduler.kill9()
    accepted_at_kill = dict(accepted)

    reader = TaskStore(store_url)
    with reader._reader.connect() as conn:
        stored_at_kill = {row.id: row.state for row in conn.execute(sa.select(tasks.c.id, tasks.c.state))}
    # Durable before the id was returned: every id a client holds is in the database.
    assert set(accepted_at_kill.values()) <= set(stored_at_kill)
    in_flight_at_kill = {task_id for task_id, state in stored_at_kill.items() if state in IN_FLIGHT}
    assert any(state in TERMINAL for state in stored_at_kill.values()), "the kill came before any work was done"

    scheduler.start()  # same port, same store
    for thread in threads:
        thread.join(timeout=180)
    done_submitting.set()
    assert len(accepted) == BURST // CLIENTS * CLIENTS >= 2000

    def all_terminal() -> bool:
        with reader._reader.connect() as conn:
            open_count = conn.execute(
                sa.select(sa.func.count()).select_from(tasks).where(tasks.c.state.not_in(TERMINAL))
            ).scalar()
        return open_count == 0

    wait_for(all_terminal, 240, interval=0.5, what="every accepted task to finish after the restart")
    scheduler.stop()
    for agent in agents:
        agent.kill()

    with reader._reader.connect() as conn:
        final = {row.id: row.state for row in conn.execute(sa.select(tasks.c.id, tasks.c.state))}
        completions = Counter(
            row.task_id
            for row in conn.execute(sa.select(transitions.c.task_id).where(transitions.c.to_state.in_(TERMINAL)))
        )
    reader.close()
    assert len(final) == len(accepted), "a retried submit created a duplicate task"
    assert set(final) == set(accepted.values())
    assert all(state == "succeeded" for state in final.values()), Counter(final.values())
    assert all(count == 1 for count in completions.values()) and len(completions) == len(final)
    # Exactly once, counted from the agents: the new leader asked them what they held (their
    # inventories) before re-queuing anything, so not even a task in flight at the kill ran twice.
    ran: Counter[str] = Counter()
    for agent in agents:
        ran.update(agent.completed)
    assert {task_id for task_id, count in ran.items() if count > 1} == set(), in_flight_at_kill
    assert set(ran) == set(final)
