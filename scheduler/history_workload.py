"""Recorded history -> a `facefleet simulate` workload, so finance can replay last month.

Arrivals come from the task store (every task, on-prem and cloud: a sweep must see the whole
load); price traces come from the spend ledger (the price each cloud pool actually charged, in
time order). Times are seconds since `since`. Feed the result to `scheduler.simulate.simulate` or
write it as YAML for `facefleet simulate --workload ... --sweep max_spot_price_per_hour=...`.

So that a replay reserves and bills what the live scheduler did, the workload also carries, per
pool, the run turnaround the history shows (`run_turnaround_s`: the median over completed runs of
their time - frames x the pool's sec_per_frame: dispatch and report latency; on a paid pool the
ledger's billed seconds, from the reservation on, on a free pool the store's dispatched -> succeeded
transitions, `completed_runs`) and the learned run-time samples recorded before the window (`run_time_samples`,
scheduler.run_estimates), from which the simulator's estimates start.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from facefleet.domain import DEFAULT_PRIORITY, DISPATCHED, SUCCEEDED, priority_from_proto, sensitivity_from_proto
from facefleet.scheduler.ledger import SpendLedger
from facefleet.scheduler.store import transitions


@dataclass(frozen=True)
class HistoricTask:
    id: str
    submitted_at: datetime
    project: str
    sensitivity: str  # public | internal | private
    priority: str  # low | normal | high | urgent
    frames: int = 1
    sla_seconds: float = 0.0


class TaskPages(Protocol):
    """What `scheduler.store.TaskStore` offers: tasks in submission order, paged."""

    def list_tasks(
        self, project: str = "", state: str = "", pool: str = "", limit: int = 100, page_token: str = ""
    ) -> tuple[list[Any], str]: ...


def historic_tasks(store: TaskPages, since: datetime, until: datetime | None = None) -> Iterator[HistoricTask]:
    """Every task submitted in [since, until) from the task store, decoded from its stored proto."""

    low, high = since.timestamp(), until.timestamp() if until else float("inf")
    token = ""
    while True:
        page, token = store.list_tasks(limit=500, page_token=token)
        for record in page:
            if not low <= record.submitted_at < high:
                continue
            task = record.task()
            yield HistoricTask(
                id=record.id,
                submitted_at=datetime.fromtimestamp(record.submitted_at, UTC),
                project=record.project,
                sensitivity=sensitivity_from_proto(task.sensitivity),
                priority=priority_from_proto(task.priority) or DEFAULT_PRIORITY,
                frames=max(1, int(task.frames)),
                sla_seconds=float(task.sla_seconds),
            )
        if not token:
            return


def completed_runs(engine: Engine, since: datetime, until: datetime) -> dict[str, tuple[str, float]]:
    """Task id -> (pool, seconds from its last dispatch to its success) for runs that succeeded in the window."""
    query = (
        sa.select(transitions.c.task_id, transitions.c.to_state, transitions.c.at, transitions.c.pool)
        .where(transitions.c.to_state.in_((DISPATCHED, SUCCEEDED)), transitions.c.at >= since.timestamp())
        .where(transitions.c.at < until.timestamp())
        .order_by(transitions.c.seq)
    )
    dispatched: dict[str, tuple[str, float]] = {}
    runs: dict[str, tuple[str, float]] = {}
    with engine.connect() as conn:
        for row in conn.execute(query):
            if row.to_state == DISPATCHED:
                dispatched[row.task_id] = (row.pool, row.at)
            elif row.task_id in dispatched:
                pool, at = dispatched[row.task_id]
                runs[row.task_id] = (pool, row.at - at)
    return runs


def history_workload(
    ledger: SpendLedger,
    since: datetime,
    until: datetime,
    tasks: Iterable[HistoricTask] = (),
    known_pools: Collection[str] | None = None,
    sec_per_frame: Mapping[str, float] | None = None,
    run_time_samples: Mapping[str, list[float]] | None = None,
    runs: Mapping[str, tuple[str, float]] | None = None,
) -> dict[str, Any]:
    """A workload mapping in `scheduler.simulate`'s format (duration_s, tasks, price_traces, and
    run_turnaround_s for the pools whose `sec_per_frame` is given: from the ledger for paid pools, else
    from `runs` (`completed_runs`); run_time_samples as passed)."""
    if until <= since:
        raise ValueError(f"history window is empty: since {since.isoformat()} is not before until {until.isoformat()}")
    tasks = list(tasks)
    frames = {t.id: t.frames for t in tasks}
    arrivals = [
        {
            "at": round((t.submitted_at - since).total_seconds(), 3),
            "id": t.id,
            "project": t.project,
            "sensitivity": t.sensitivity,
            "priority": t.priority,
            "frames": t.frames,
            "sla_seconds": t.sla_seconds,
        }
        for t in tasks
        if since <= t.submitted_at < until
    ]
    arrivals.sort(key=lambda a: (a["at"], a["id"]))
    traces: dict[str, list[list[float]]] = {}
    turnarounds: dict[str, list[float]] = {}
    free_turnarounds: dict[str, list[float]] = {}
    for row in ledger.records(since, until):
        pool = str(row["pool"])
        if known_pools is not None and pool not in known_pools:
            continue
        frame_s = (sec_per_frame or {}).get(pool)
        if frame_s is not None and row["outcome"] == "completed" and row["task_id"] in frames:
            billed = float(row["instance_seconds"]) - frames[row["task_id"]] * frame_s
            turnarounds.setdefault(pool, []).append(max(0.0, billed))
        started = row["ended_at"] - since
        at = max(0.0, round(started.total_seconds() - float(row["instance_seconds"]), 3))
        trace = traces.setdefault(pool, [])
        trace.append([at, float(row["usd_per_hour"])])
    for task_id, (pool, ran_s) in (runs or {}).items():  # free pools: the ledger has no rows of theirs
        frame_s = (sec_per_frame or {}).get(pool)
        if frame_s is not None and task_id in frames and pool not in turnarounds and pool not in traces:
            free_turnarounds.setdefault(pool, []).append(max(0.0, ran_s - frames[task_id] * frame_s))
    turnarounds.update(free_turnarounds)
    for pool, trace in traces.items():
        trace.sort()
        deduplicated = [point for i, point in enumerate(trace) if i == 0 or point[1] != trace[i - 1][1]]
        traces[pool] = deduplicated
    return {
        "duration_s": round((until - since).total_seconds(), 3),
        "seed": 0,
        "tasks": arrivals,
        "price_traces": dict(sorted(traces.items())),
        "run_turnaround_s": {pool: round(statistics.median(s), 3) for pool, s in sorted(turnarounds.items())},
        "run_time_samples": {pool: list(samples) for pool, samples in sorted((run_time_samples or {}).items())},
    }
