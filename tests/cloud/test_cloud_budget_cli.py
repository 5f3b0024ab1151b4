"""`facefleet budget` commands against a real SQLite store and a real gRPC Admin endpoint."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from facefleet.cli import app
from facefleet.cli.budget_cmds import parse_since
from facefleet.grpc_server import build_server
from facefleet.rpc_errors import abort
from facefleet.scheduler.history_workload import HistoricTask, historic_tasks, history_workload
from facefleet.scheduler.ledger import BudgetAccount, SpendLedger, Usage
from facefleet.scheduler.store import NewTask, TaskStore
from facefleet.v1 import admin_pb2, admin_pb2_grpc, types_pb2

runner = CliRunner()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'facefleet.db'}"
    ledger = SpendLedger(sa.create_engine(url))
    now = datetime.now(UTC)
    ledger.upsert_accounts([BudgetAccount("marketing", 100.0, 50.0), BudgetAccount("research", 40.0, 80.0)], now)
    for i, (project, pool, price, seconds) in enumerate(
        [("promo", "aws-gpu", 0.42, 36000), ("promo", "azure-t4", 0.16, 18000), ("trailer", "aws-gpu", 0.42, 180000)]
    ):
        ledger.record(Usage(f"t{i}", project, "burst", pool, "marketing", "aws", f"i-{i}", seconds, price, now))
    return url


def test_parse_since() -> None:
    now = datetime(2026, 11, 21, tzinfo=UTC)
    assert parse_since("30d", now) == now - timedelta(days=30)
    assert parse_since("12h", now) == now - timedelta(hours=12)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="30d"):
        parse_since("last month", now)


def test_show_json_reports_spend_cap_breakdown_and_forecast(store_url: str) -> None:
    result = runner.invoke(app, ["budget", "show", "--store", store_url, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    accounts = {a["budget"]: a for a in data["accounts"]}
    marketing = accounts["marketing"]
    assert marketing["spent_usd"] == pytest.approx(4.2 + 0.8 + 21.0)
    assert marketing["monthly_cap_usd"] == 100.0
    assert marketing["by_project"] == pytest.approx({"promo": 5.0, "trailer": 21.0})
    assert marketing["by_pool"] == pytest.approx({"aws-gpu": 25.2, "azure-t4": 0.8})
    assert marketing["forecast_month_end_usd"] >= marketing["spent_usd"]
    assert marketing["alert"] is False
    assert accounts["research"]["spent_usd"] == 0.0


def test_show_table_and_missing_store(store_url: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["budget", "show", "--store", store_url])
    assert result.exit_code == 0 and "marketing" in result.output and "$26.00" in result.output
    missing = runner.invoke(app, ["budget", "show", "--store", f"sqlite:///{tmp_path / 'nope.db'}"])
    assert missing.exit_code == 1
    assert "no store at" in missing.output and "--store" in missing.output


def test_report_csv_and_json(store_url: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["budget", "report", "--since", "1d", "--format", "csv", "--store", store_url])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["task_id"] for r in rows] == ["t0", "t1", "t2"]
    assert float(rows[2]["usd"]) == pytest.approx(21.0) and rows[2]["project"] == "trailer"

    out = tmp_path / "report.json"
    result = runner.invoke(app, ["budget", "report", "--format", "json", "--store", store_url, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["total_usd"] == pytest.approx(26.0)

    bad = runner.invoke(app, ["budget", "report", "--format", "xml", "--store", store_url])
    assert bad.exit_code == 1 and "csv or --format json" in bad.output


class RecordingAdmin(admin_pb2_grpc.AdminServicer):
    def __init__(self) -> None:
        self.requests: list[admin_pb2.SetBudgetRequest] = []

    def SetBudget(self, request: admin_pb2.SetBudgetRequest, context: grpc.ServicerContext) -> admin_pb2.Budget:
        if request.name == "forbidden":
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                types_pb2.PERMISSION_DENIED_ROLE,
                "caller lacks the finance role",
                "",
            )
        self.requests.append(request)
        return admin_pb2.Budget(name=request.name, monthly_cap_usd=request.monthly_cap_usd,
                                alert_pct=request.alert_pct, spent_usd=12.5)  # fmt: skip


@pytest.fixture
def admin() -> Iterator[tuple[RecordingAdmin, str]]:
    servicer = RecordingAdmin()
    server = build_server(
        "127.0.0.1:0",
        [("facefleet.v1.Admin", lambda s: admin_pb2_grpc.add_AdminServicer_to_server(servicer, s))],
        None,
        [],
    )
    yield servicer, f"127.0.0.1:{server.port}"
    server.stop()


def test_set_calls_admin_setbudget(admin: tuple[RecordingAdmin, str]) -> None:
    servicer, address = admin
    args = ["budget", "set", "marketing", "--monthly-cap", "250", "--alert-pct", "75", "--reason", "FIN-42",
            "--scheduler", address, "--insecure", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    [request] = servicer.requests
    assert (request.name, request.monthly_cap_usd, request.alert_pct, request.reason) == (
        "marketing",
        250,
        75,
        "FIN-42",
    )
    json_text = result.stdout[result.stdout.index("{\n") :]  # a structlog warning may precede it
    assert json.loads(json_text)["spent_usd"] == 12.5

    denied = runner.invoke(app, ["budget", "set", "forbidden", "--monthly-cap", "1", "--reason", "x",
                                 "--scheduler", address, "--insecure"])  # fmt: skip
    assert denied.exit_code == 1
    assert "PERMISSION_DENIED" in denied.output and "finance role" in denied.output

    invalid = runner.invoke(app, ["budget", "set", "m", "--monthly-cap", "-5", "--reason", "x", "--insecure"])
    assert invalid.exit_code == 1 and "--monthly-cap" in invalid.output


def test_history_workload_from_store_and_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'history.db'}"
    store = TaskStore(url)
    ledger = SpendLedger(sa.create_engine(url))
    t0 = datetime(2026, 10, 1, tzinfo=UTC)
    for i, (offset, sensitivity, priority, frames) in enumerate(
        [(60, types_pb2.SENSITIVITY_PUBLIC, types_pb2.PRIORITY_URGENT, 300),
         (120, types_pb2.SENSITIVITY_PRIVATE, types_pb2.PRIORITY_HIGH, 1),
         (-3600, types_pb2.SENSITIVITY_PUBLIC, types_pb2.PRIORITY_LOW, 5)]  # before the window
    ):  # fmt: skip
        task = types_pb2.Task(
            project=f"p{i}", sensitivity=sensitivity, priority=priority, frames=frames, sla_seconds=900
        )
        store.insert_batch([NewTask(task, f"k{i}")], (t0 + timedelta(seconds=offset)).timestamp())
    for end, price in ((1000, 0.42), (2000, 0.42), (5000, 1.10)):
        ledger.record(
            Usage("t", "p0", "burst", "aws-gpu", "marketing", "aws", "i-1", 500, price, t0 + timedelta(seconds=end))
        )

    tasks = list(historic_tasks(store, t0, t0 + timedelta(days=1)))
    store.close()
    assert [(t.project, t.sensitivity, t.priority, t.frames) for t in tasks] == [
        ("p0", "public", "urgent", 300),
        ("p1", "private", "high", 1),
    ]
    workload = history_workload(ledger, t0, t0 + timedelta(days=1), tasks, known_pools={"aws-gpu"})
    assert workload["duration_s"] == 86400
    assert [(a["at"], a["sensitivity"], a["sla_seconds"]) for a in workload["tasks"]] == [
        (60.0, "public", 900.0),
        (120.0, "private", 900.0),
    ]
    assert workload["price_traces"] == {"aws-gpu": [[500.0, 0.42], [4500.0, 1.10]]}
    assert history_workload(ledger, t0, t0 + timedelta(days=1), tasks, known_pools=set())["price_traces"] == {}
    with pytest.raises(ValueError, match="empty"):
        history_workload(ledger, t0, t0, [])

    # The workload is one the simulator accepts.
    from facefleet.scheduler.simulate import generate_arrivals

    arrivals = generate_arrivals(yaml.safe_load(yaml.safe_dump(workload)))
    assert [a.task.priority for a in arrivals] == ["urgent", "high"]


def test_history_cli_writes_a_workload(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    store = TaskStore(url)
    store.insert_batch([NewTask(types_pb2.Task(project="p", frames=10), "k")], datetime.now(UTC).timestamp() - 60)
    store.close()
    out = tmp_path / "workload.yaml"
    result = runner.invoke(app, ["budget", "history", "--since", "1d", "--store", url, "-o", str(out)])
    assert result.exit_code == 0, result.output
    workload: dict[str, Any] = yaml.safe_load(out.read_text())
    assert len(workload["tasks"]) == 1 and workload["tasks"][0]["frames"] == 10


def test_historic_task_defaults() -> None:
    t = HistoricTask("x", datetime.now(UTC), "p", "public", "normal")
    assert t.frames == 1 and t.sla_seconds == 0.0


def test_history_carries_the_ledgers_run_turnaround_and_earlier_run_time_samples(tmp_path: Path) -> None:
    """`budget history`: per paid pool, the median of billed seconds - frames x the configured
    sec_per_frame over completed runs, and the learned samples recorded before the window."""
    from facefleet.scheduler.run_estimates import RunTimeBook

    url = f"sqlite:///{tmp_path / 'h.db'}"
    now = datetime.now(UTC)
    RunTimeBook(sa.create_engine(url), clock=lambda: now.timestamp() - 7200).record("aws-gpu", 5.0, 2)  # before
    RunTimeBook(sa.create_engine(url), clock=lambda: now.timestamp() - 60).record("aws-gpu", 9.0, 1)  # inside
    store = TaskStore(url)
    frames = [4, 2, 6, 3]
    for i, n in enumerate(frames):
        store.insert_batch([NewTask(types_pb2.Task(project="p", frames=n), f"k{i}")], now.timestamp() - 600 + i)
    ids = [record.id for record in store.list_tasks(limit=10)[0]]
    store.close()
    by_frames = dict(zip(frames, ids, strict=True))
    ledger = SpendLedger(sa.create_engine(url))
    # sec_per_frame 0.5: turnarounds 0.3, 0.1, 0.7 (completed) and a preempted run that says nothing.
    runs = ((4, 2.3, "completed"), (2, 1.1, "completed"), (6, 3.7, "completed"), (3, 9.0, "preempted"))
    for n, billed, outcome in runs:
        ended = now - timedelta(seconds=300)
        ledger.record(Usage(by_frames[n], "p", "burst", "aws-gpu", "m", "aws", "i-1", billed, 3.6, ended, outcome))
    config = tmp_path / "facefleet.toml"
    config.write_text('[[scheduler.pools]]\nname = "aws-gpu"\nprovider = "aws"\nsec_per_frame = 0.5\n')
    out = tmp_path / "workload.yaml"
    result = runner.invoke(app, ["budget", "history", "--since", "1h", "--store", url, "--config", str(config),
                                 "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    workload: dict[str, Any] = yaml.safe_load(out.read_text())
    assert workload["run_turnaround_s"] == {"aws-gpu": pytest.approx(0.3)}
    assert workload["run_time_samples"] == {"aws-gpu": [2.5]}
