"""A paid run's budget room frees with its slot, and each attempt settles once (docs/finance.md).

A real in-process scheduler with the cloud parts wired as production wires them (`build_cloud`),
a cloud-zone hollow agent (session and, as an agent of the previous release, RunTask streams).
When the dispatcher frees the agent slot of a run that ended, the budget gate must already have
settled that run: a pass that sees the slot free sees the room too (what the simulator assumes,
scheduler/simulate.py). Finance's view: one ledger row per cloud run, no reservation left open.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from facefleet.config import CloudConfig, PolicyConfig, PoolConfig, SchedulerConfig, Settings
from facefleet.scheduler.app import SchedulerApp
from facefleet.scheduler.cloud.wiring import build_cloud, ledger_engine
from facefleet.scheduler.ledger import budget_reservations, cloud_spend
from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.cloud.burst_policy import write_burst_policy
from tests.scheduler.conftest import FAST_DISPATCH
from tests.scheduler.fake_agents import HollowAgent, wait_for
from tests.scheduler.test_scheduler_service import task

TASKS = 12


@pytest.fixture
def paid_scheduler(tmp_path: Path) -> Iterator[SchedulerApp]:
    settings = Settings(
        scheduler=SchedulerConfig(
            listen="127.0.0.1:0",
            store_url=f"sqlite:///{tmp_path}/scheduler.db",
            metrics_port=-1,
            heartbeat_timeout_s=1.5,
            lost_grace_s=1.0,
            pools=[
                PoolConfig(
                    name="cloud-spot",
                    provider="aws",
                    trust_zone="cloud",
                    price_per_hour=7.2,
                    spot=True,
                    sec_per_frame=0.02,
                )
            ],
        ),
        policy=PolicyConfig(dir=write_burst_policy(tmp_path / "policy", 100.0)),
        cloud=CloudConfig(),
    )
    parts = build_cloud(settings, ledger_engine(settings.scheduler.store_url))
    app = SchedulerApp(settings, dispatcher_settings=FAST_DISPATCH, cloud=parts).start()
    yield app
    app.stop()


@pytest.mark.parametrize("session", [True, False])
def test_a_paid_runs_slot_frees_only_once_its_budget_attempt_is_settled(paid_scheduler, session) -> None:  # type: ignore[no-untyped-def]
    app = paid_scheduler
    budgets = app.cloud.budgets
    slot_freed_with_attempt_open: list[str] = []
    note_finished = app.dispatcher.agents.note_finished

    def checking_note_finished(agent_id: str, task_id: str) -> None:  # the slot frees here
        if task_id in budgets.open_attempts():
            slot_freed_with_attempt_open.append(task_id)
        note_finished(agent_id, task_id)

    app.dispatcher.agents.note_finished = checking_note_finished  # type: ignore[method-assign]
    agent = HollowAgent(f"127.0.0.1:{app.port}", "spot-1", "cloud-spot", "cloud", slots=2, frame_s=0.02,
                        session=session).start()  # fmt: skip
    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        wait_for(lambda: len(app.registry.agents()) == 1, 5, what="the cloud agent registered")
        ids = [
            stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task(types_pb2.SENSITIVITY_PUBLIC, frames=3))).task_id
            for _ in range(TASKS)
        ]
        wait_for(lambda: all(app.store.get(i).state == "succeeded" for i in ids), 30, what="every task succeeded")
        wait_for(lambda: not budgets.open_attempts(), 5, what="every attempt settled")
    finally:
        channel.close()
        agent.kill()
    assert sorted(agent.completed) == sorted(ids)  # the agent's own record: each ran, on the cloud pool
    assert slot_freed_with_attempt_open == []
    engine = sa.create_engine(app.settings.scheduler.store_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(cloud_spend.c.task_id, cloud_spend.c.outcome)).all()
        assert conn.execute(sa.select(sa.func.count()).select_from(budget_reservations)).scalar_one() == 0
    assert sorted(row.task_id for row in rows) == sorted(ids)  # settled once each
    assert {row.outcome for row in rows} == {"completed"}
