"""The hard cap in the live scheduler under a parallel burst (invariant 3), checked the way finance would.

A real `facefleet scheduler run` process, an on-prem agent (2 slots) and a cloud-zone agent (4
slots, spot, $7.20/h) that says a frame takes 0.5 s but really takes 2.5 s (the estimate is wrong,
as in issue #16's measurement: the cap was passed twentyfold). The cap is made binding with
`facefleet budget set`; 40 one-frame public urgent tasks plus private and locked ones arrive from 8
threads. Spend is read from the live ledger rows, runs from the agents' own records.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from facefleet.cli import app
from facefleet.scheduler.ledger import budget_reservations, cloud_spend
from facefleet.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.cloud.burst_policy import cloud_pool_toml, write_burst_policy
from tests.scheduler.fake_agents import HollowAgent, wait_for
from tests.scheduler.scheduler_process import SchedulerProcess

pytestmark = pytest.mark.slow

PRICE = 7.20  # USD per hour: $0.002 per second
CAP = 0.0065
STEP_S = 0.5  # cloud.spend_accrual_s (the default)
STOP_S = 0.5  # allowance for a stopped run to end: CancelTask round trip and the CANCELLED report
CLOUD_SLOTS = 4
BOUND = CLOUD_SLOTS * PRICE / 3600 * (STEP_S + STOP_S)  # docs/finance.md: one step + stop time per running task


class MisreportingAgent(HollowAgent):
    """Heartbeats a speed it does not have (the configured 0.5 s per frame)."""

    def heartbeat_request(self) -> scheduler_pb2.HeartbeatRequest:
        request = super().heartbeat_request()
        request.sec_per_frame = 0.5
        request.instance_id = "i-spot-1" if self.trust_zone != "private" else ""
        return request


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[SchedulerProcess, HollowAgent, HollowAgent]]:
    locks = "locks:\n  - {project: vault, reason: legal hold, by: compliance}\n"
    policy = write_burst_policy(tmp_path / "policy", cap=100, locks=locks)
    (tmp_path / "facefleet.toml").write_text(cloud_pool_toml("cloud-spot", PRICE, sec_per_frame=0.5))
    scheduler = SchedulerProcess(f"sqlite:///{tmp_path / 'store.db'}", policy, tmp_path / "scheduler.log").start()
    onprem = HollowAgent(scheduler.address, "onprem-1", "onprem-a", "private", slots=2, frame_s=0.3).start()
    cloud = MisreportingAgent(scheduler.address, "spot-1", "cloud-spot", "cloud", slots=CLOUD_SLOTS, frame_s=2.5)
    cloud.start()
    try:
        yield scheduler, onprem, cloud
    finally:
        onprem.kill()
        cloud.kill()
        scheduler.stop()


def test_parallel_burst_stays_within_cap_plus_the_stated_bound(
    stack: tuple[SchedulerProcess, HollowAgent, HollowAgent], tmp_path: Path
) -> None:
    scheduler, onprem, cloud = stack
    args = ["budget", "set", "burst", "--monthly-cap", str(CAP), "--reason", "FIN-16 binding cap",
            "--scheduler", scheduler.address, "--insecure"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with grpc.insecure_channel(scheduler.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        listed = admin.ListBudgets(admin_pb2.ListBudgetsRequest(), timeout=10).budgets
        assert [(b.name, b.monthly_cap_usd) for b in listed] == [("burst", CAP)]
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        kinds: dict[str, str] = {}
        lock = threading.Lock()

        def submit(thread: int) -> None:
            for i in range(6):
                kind = "public" if i < 5 else ("private" if thread % 2 else "locked")
                task = types_pb2.Task(
                    project="vault" if kind == "locked" else "promo",
                    sensitivity=types_pb2.SENSITIVITY_PRIVATE if kind == "private" else types_pb2.SENSITIVITY_PUBLIC,
                    priority=types_pb2.PRIORITY_URGENT,
                    frames=1,
                    source_uri="file:///data/face.jpg",
                    target_uri="file:///data/photo.jpg",
                )
                reply = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task), timeout=30)
                with lock:
                    kinds[reply.task_id] = kind

        threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(kinds) == 48 and list(kinds.values()).count("public") == 40

        def state(task_id: str) -> int:
            return stub.GetTask(scheduler_pb2.GetTaskRequest(task_id=task_id), timeout=10).state

        wait_for(lambda: all(state(t) == types_pb2.TASK_STATE_SUCCEEDED for t in kinds), 120, interval=0.5,
                 what="every task to succeed")  # fmt: skip
        stopped = [t for t in kinds if cloud.executions[t] and not cloud.completed[t]]
        if stopped:  # explain says why a run left the cloud
            explained = stub.Explain(scheduler_pb2.ExplainRequest(task_id=stopped[0]), timeout=10)
            assert any(note.startswith("budget stop: run on cloud-spot") for note in explained.notes), explained

    engine = sa.create_engine(scheduler.store_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(cloud_spend)).mappings().all()
        open_reservations = conn.execute(sa.select(budget_reservations)).all()
    spent = sum(row["usd"] for row in rows)
    print(f"\nlive ledger: ${spent:.6f} (cap ${CAP}, bound ${BOUND:.4f}); {len(rows)} cloud attempts, "
          f"{len(stopped)} stopped at the cap, {sum(cloud.completed.values())} completed on cloud")  # fmt: skip
    assert spent <= CAP + BOUND, f"live spend ${spent:.6f} passed cap ${CAP} + bound ${BOUND:.6f}"
    # The cap was binding: cloud work happened, and not all of the burst fitted.
    assert rows and sum(1 for t in kinds if cloud.executions[t]) < 40
    # Invariant 1, from the cloud agent's own records.
    assert not [t for t in kinds if kinds[t] != "public" and cloud.executions[t]]
    # Every cloud run settled exactly once; nothing else was charged; no reservation left open.
    settled: dict[str, int] = {}
    for row in rows:
        settled[row["task_id"]] = settled.get(row["task_id"], 0) + 1
        assert (row["budget"], row["pool"], row["usd_per_hour"]) == ("burst", "cloud-spot", PRICE)
    assert settled == {t: n for t, n in cloud.executions.items() if n}
    assert open_reservations == []
    # Each task ran to completion once, counted from the agents' own records.
    assert all(onprem.completed[t] + cloud.completed[t] == 1 for t in kinds)
