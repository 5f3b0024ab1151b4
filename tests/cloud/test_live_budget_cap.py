"""The hard cap in the live scheduler under a parallel burst (invariant 3), checked the way finance would.

A real `facefleet scheduler run` process, an on-prem agent (2 slots) and a real cloud-zone agent
(`serve_agent`: run journal, hard run-time limits; 4 slots, spot, $7.20/h) whose pipeline takes
0.4 s a frame while its heartbeats say 0.05 s (the estimate is wrong, as in issue #16's
measurement: the cap was passed twentyfold). The cap is made binding with `facefleet budget set`;
40 ten-frame public urgent tasks plus private and locked ones arrive from 8 threads. Spend is read
from the live ledger rows, runs from the agents' own records (the cloud agent's run journal).

What is checked (docs/finance.md): every cloud run billed at most its reservation (price x (its
hard run-time limit, raised with every extension, + slack)), so spend <= cap; and the same with
spend enforcement off, where the agent's limit alone stops runs that outgrow their bound.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from facefleet.agent.server import AgentHandle, serve_agent
from facefleet.cli import app
from facefleet.config import AgentConfig
from facefleet.domain import RUN_LIMIT_REACHED
from facefleet.scheduler.ledger import budget_reservations, cloud_spend
from facefleet.scheduler.spend_enforcement import MONEY_STOPS
from facefleet.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.agent.conftest import FakePipeline, write_image
from tests.cloud.burst_policy import cloud_pool_toml, write_burst_policy
from tests.scheduler.fake_agents import HollowAgent, wait_for
from tests.scheduler.scheduler_process import SchedulerProcess

pytestmark = pytest.mark.slow

PRICE = 7.20  # USD per hour: $0.002 per second
CAP = 0.04  # about 20 cloud-seconds: binding for a burst that would take 100
FRAMES = 10
FRAME_S = 0.4  # the cloud agent's real pace: 4 s a task
SAID_FRAME_S = 0.05  # what it heartbeats (and the pool's configured value): 0.5 s a task
CLOUD_SLOTS = 4


@dataclass
class CloudAgent:
    """A real agent in the cloud trust zone; what it ran comes from its own run journal."""

    handle: AgentHandle
    raised: list[tuple[str, int, float]]  # limits raised on this agent (spend enforcement extended)

    def runs(self) -> Counter[str]:
        return Counter(run.task_id for run in self.handle.runtime.journal.all_runs())

    def completed(self) -> Counter[str]:
        return Counter(run.task_id for run in self.handle.runtime.journal.all_runs() if run.succeeded)

    def stopped_at_limit(self) -> list[str]:
        return [
            run.task_id
            for run in self.handle.runtime.journal.all_runs()
            if run.outcome is not None and run.outcome.message.startswith(RUN_LIMIT_REACHED)
        ]


def start_cloud_agent(scheduler_address: str, tmp_path: Path, data: Path) -> CloudAgent:
    config = AgentConfig(
        listen="127.0.0.1:0",
        pool="cloud-spot",
        trust_zone="cloud",
        provider="aws",
        instance_id="i-spot-1",
        slots=CLOUD_SLOTS,
        work_dir=tmp_path / "cloud-agent",
        checkpoint_root=tmp_path / "checkpoints",
        allowed_roots=[data],
        metrics_port=0,
        heartbeat_interval_s=1.0,
        models_dir=tmp_path / "models",
    )
    handle = serve_agent(
        config,
        None,
        scheduler_channel_factory=lambda: grpc.insecure_channel(scheduler_address),
        pipeline=FakePipeline(frames=FRAMES, frame_seconds=FRAME_S),
    )
    runtime = handle.runtime
    own_request = runtime.heartbeat_request

    def misreported() -> scheduler_pb2.HeartbeatRequest:  # heartbeats a speed it does not have
        request = own_request()
        request.sec_per_frame = SAID_FRAME_S
        return request

    runtime.heartbeat_request = misreported  # type: ignore[method-assign]
    raised: list[tuple[str, int, float]] = []
    own_raise = runtime.raise_run_limit

    def noted_raise(task_id: str, attempt: int, max_run_s: float) -> bool:
        applied = own_raise(task_id, attempt, max_run_s)
        if applied:
            raised.append((task_id, attempt, max_run_s))
        return applied

    runtime.raise_run_limit = noted_raise  # type: ignore[method-assign]
    return CloudAgent(handle, raised)


@pytest.fixture(params=[True, False], ids=["enforcement-on", "enforcement-off"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[SchedulerProcess, HollowAgent, CloudAgent]]:
    locks = "locks:\n  - {project: vault, reason: legal hold, by: compliance}\n"
    policy = write_burst_policy(tmp_path / "policy", cap=100, locks=locks)
    toml = cloud_pool_toml("cloud-spot", PRICE, sec_per_frame=SAID_FRAME_S)
    if not request.param:  # no extensions, no backstop: the agent's limit alone
        toml += "\n[cloud]\nspend_enforcement = false\n"
    (tmp_path / "facefleet.toml").write_text(toml)
    # Raised limits reach the agents with their heartbeat replies: every second.
    scheduler = SchedulerProcess(
        f"sqlite:///{tmp_path / 'store.db'}", policy, tmp_path / "scheduler.log",
        extra_env={"FACEFLEET_AGENT__HEARTBEAT_INTERVAL_S": "1"},
    ).start()  # fmt: skip
    onprem = HollowAgent(scheduler.address, "onprem-1", "onprem-a", "private", slots=2, frame_s=0.03).start()
    data = tmp_path / "data"
    cloud = start_cloud_agent(scheduler.address, tmp_path, data)
    try:
        yield scheduler, onprem, cloud
    finally:
        onprem.kill()
        cloud.handle.stop(0)
        scheduler.stop()


def test_parallel_burst_bills_each_cloud_run_within_its_reservation_so_spend_stays_within_the_cap(
    stack: tuple[SchedulerProcess, HollowAgent, CloudAgent], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    scheduler, onprem, cloud = stack
    enforcement: bool = request.node.callspec.params["stack"]
    data = tmp_path / "data"
    source, target = write_image(data / "face.png", 1), write_image(data / "photo.png", 2)
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
                    frames=FRAMES,
                    source_uri=source.as_uri(),
                    target_uri=target.as_uri(),
                    output_uri=(data / "out" / f"{thread}-{i}.png").as_uri(),
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

        wait_for(lambda: all(state(t) == types_pb2.TASK_STATE_SUCCEEDED for t in kinds), 150, interval=0.5,
                 what="every task to succeed")  # fmt: skip
        runs, completed = cloud.runs(), cloud.completed()
        stopped = [t for t in kinds if runs[t] > completed[t]]
        if stopped:  # explain says why a run left the cloud
            explained = stub.Explain(scheduler_pb2.ExplainRequest(task_id=stopped[0]), timeout=10)
            assert any(note.startswith(MONEY_STOPS) for note in explained.notes), explained

    engine = sa.create_engine(scheduler.store_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(cloud_spend)).mappings().all()
        open_reservations = conn.execute(sa.select(budget_reservations)).all()
    spent = sum(row["usd"] for row in rows)
    worst = max((row["usd"] - row["estimate_usd"] for row in rows), default=0.0)
    print(f"\nlive ledger: ${spent:.6f} (cap ${CAP}); {len(rows)} cloud attempts, {len(stopped)} stopped "
          f"({len(cloud.stopped_at_limit())} by the agent at their limit), {sum(completed.values())} completed "
          f"on cloud; closest run to its reservation: ${worst:+.6f}; {len(cloud.raised)} limits raised")  # fmt: skip
    # The run bound: each cloud run billed (reservation -> recorded end) at most its reservation,
    # price x (its limit, as raised, + slack); reservations never pass the cap, so neither does spend.
    over = [(row["task_id"], row["usd"], row["estimate_usd"]) for row in rows if row["usd"] > row["estimate_usd"]]
    assert not over, f"cloud runs billed beyond their reservation: {over}"
    assert spent <= CAP + 1e-9, f"live spend ${spent:.6f} passed cap ${CAP}"
    # Extensions raised the runs' limits on the agent itself (its control), and only with enforcement.
    assert bool(cloud.raised) == enforcement, cloud.raised
    # The cap was binding: cloud work happened, and not all of the burst fitted.
    assert rows and sum(1 for t in kinds if runs[t]) < 40
    # Invariant 1, from the cloud agent's own records.
    assert not [t for t in kinds if kinds[t] != "public" and runs[t]]
    # Every cloud run settled exactly once; nothing else was charged; no reservation left open.
    settled: Counter[str] = Counter()
    for row in rows:
        settled[row["task_id"]] += 1
        assert (row["budget"], row["pool"], row["usd_per_hour"]) == ("burst", "cloud-spot", PRICE)
    assert settled == runs
    assert open_reservations == []
    # Each task ran to completion once, counted from the agents' own records.
    assert all(onprem.completed[t] + completed[t] == 1 for t in kinds)
