"""BudgetGate: reservation at dispatch, settle on finish / re-queue, release on withdraw; drain votes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from facefleet.agent.heartbeat import DrainVotes
from facefleet.domain import DISPATCHED, PREEMPTED, SUCCEEDED
from facefleet.scheduler.cloud.budget_gate import BudgetGate
from facefleet.scheduler.ledger import SpendLedger, month_of
from facefleet.scheduler.placement.model import Budget, Decision, Estimate, PoolState
from facefleet.scheduler.placement_gateway import PlacementResult
from facefleet.scheduler.store import TaskRecord
from facefleet.v1 import scheduler_pb2, types_pb2

NOW = 1_790_000_000.0
PAID = PoolState(name="aws-a", provider="aws", trust_zone="cloud", price_per_hour=3.6)


def record(task_id: str, state: str = DISPATCHED, agent_id: str | None = None) -> TaskRecord:
    return TaskRecord(task_id, None, "promo", "public", 3, state, "aws-a", "burst", agent_id, 1, 0, "", None, None,
                      b"", NOW, NOW, 0.0, None, "")  # fmt: skip


def result(
    cost: float, pool: PoolState | None = PAID, budget: str | None = "burst", max_run_s: float = 0.0
) -> PlacementResult:
    """A placement on `pool` whose run bound reserves `cost` (and limits the run to `max_run_s`)."""
    estimate = Estimate(cost, 10.0, reserve_usd=cost, max_run_s=max_run_s)
    decision = Decision("dispatch", pool.name if pool else None, "burst", "ok", (), estimate, budget=budget)
    return PlacementResult("dispatch", decision.pool or "", "burst", "ok", {}, types_pb2.PlacementDecision(),
                           "cloud", False, decision, pool)  # fmt: skip


def gate(tmp_path: Path, clock: list[float]) -> BudgetGate:
    ledger = SpendLedger(sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}"))
    budgets = BudgetGate(ledger, clock=lambda: clock[0], instance_of={"spot-1": "i-1"}.get)  # type: ignore[arg-type]
    budgets.observe_budgets("v1", {"burst": Budget("burst", 1.0, alert_pct=50)})
    return budgets


def test_reservations_fit_under_the_cap_and_settle_or_release(tmp_path: Path) -> None:
    clock = [NOW]
    budgets = gate(tmp_path, clock)
    month = month_of(budgets_utc(NOW))
    assert budgets.ledger.accounts()["burst"].monthly_cap_usd == 1.0  # recorded on the rules load
    assert [budgets.admit(record(f"t{i}"), result(0.3), NOW) for i in range(3)] == ["", "", ""]
    refusal = budgets.admit(record("t3"), result(0.3), NOW)
    assert "budget burst" in refusal and "cap" in refusal
    assert abs(budgets.committed("burst") - 0.9) < 1e-9

    budgets.withdraw("t2")  # never launched: the room comes back
    assert abs(budgets.ledger.reserved("burst", month) - 0.6) < 1e-9

    budgets.on_dispatched(record("t0", agent_id="spot-1"), result(0.3))
    clock[0] = NOW + 100  # 100 s at $3.6/h = $0.10
    budgets.on_finished(replace(record("t0", SUCCEEDED, "spot-1"), finished_at=NOW + 100))
    clock[0] = NOW + 50
    budgets.on_requeued(record("t1", PREEMPTED, "spot-1"), "preempted")
    rows = {r["task_id"]: r for r in budgets.ledger.records(budgets_utc(NOW - 1))}
    assert abs(rows["t0"]["usd"] - 0.1) < 1e-9 and rows["t0"]["outcome"] == "completed"
    assert rows["t0"]["instance_id"] == "i-1" and rows["t0"]["estimate_usd"] == 0.3
    assert rows["t1"]["outcome"] == "preempted" and abs(rows["t1"]["usd"] - 0.05) < 1e-9
    assert budgets.ledger.open_reservations() == [] and budgets.open_attempts() == {}


def test_free_pools_reserve_nothing_and_unknown_budgets_are_refused(tmp_path: Path) -> None:
    budgets = gate(tmp_path, [NOW])
    onprem = PoolState(name="onprem-a", provider="onprem", trust_zone="private")
    assert budgets.admit(record("free"), result(0.0, onprem, None), NOW) == ""
    assert "not in the rules store" in budgets.admit(record("x"), result(0.2, budget="nope"), NOW)
    assert budgets.ledger.open_reservations() == []


def test_a_new_leader_releases_reservations_left_by_the_previous_one(tmp_path: Path) -> None:
    first = gate(tmp_path, [NOW])
    assert first.admit(record("old"), result(0.9), NOW) == ""
    second = BudgetGate(first.ledger, clock=lambda: NOW)
    second.observe_budgets("v1", {"burst": Budget("burst", 1.0)})
    assert second.admit(record("new"), result(0.9), NOW) == ""  # "old" was released, not counted twice
    assert [r.task_id for r in first.ledger.open_reservations()] == ["new"]


def test_a_run_end_settles_its_own_attempt_once(tmp_path: Path) -> None:
    """`on_run_ended` (the agent reported the end, before the store records it) settles that attempt:
    an earlier attempt's late end leaves the open one alone, and the later `on_finished` or a repeated
    end (an agent's inventory) settle nothing more."""
    clock = [NOW]
    budgets = gate(tmp_path, clock)
    assert budgets.admit(record("t0"), result(0.3), NOW) == ""  # attempt 2 (record() has 1 counted)
    ended = replace(record("t0", SUCCEEDED, "spot-1"), attempts=2, finished_at=NOW + 100)
    budgets.on_run_ended(replace(ended, attempts=1))  # a superseded run's end: not this reservation
    assert list(budgets.open_attempts()) == ["t0"]
    budgets.on_run_ended(ended)
    assert budgets.open_attempts() == {} and budgets.ledger.open_reservations() == []
    assert abs(budgets.committed("burst") - 0.1) < 1e-9  # 100 s at $3.6/h: the room is back at once
    clock[0] = NOW + 200
    budgets.on_finished(replace(ended, finished_at=NOW + 200))  # the store recorded the completion
    budgets.on_run_ended(ended)  # the same outcome again
    rows = budgets.ledger.records(budgets_utc(NOW - 1))
    assert [(r["task_id"], r["outcome"], round(r["usd"], 9)) for r in rows] == [("t0", "completed", 0.1)]


def test_a_committed_read_that_raced_a_settlement_is_not_kept(tmp_path: Path) -> None:
    """Placement reads spend + reserved through a short cache; a settlement landing while a read is
    in flight must not leave the stale total cached (the pass after the run's end would not see the
    room it freed)."""
    budgets = gate(tmp_path, [NOW])
    assert budgets.admit(record("t0"), result(0.3), NOW) == ""
    spent = budgets.ledger.spent
    raced: list[bool] = []

    def spent_then_settled(budget: str, month: str) -> float:
        usd = spent(budget, month)  # read before the settlement ...
        if not raced:
            raced.append(True)  # ... which lands before the read's total is cached
            budgets.on_run_ended(replace(record("t0", SUCCEEDED, "spot-1"), attempts=2, finished_at=NOW + 10))
        return usd

    budgets.ledger.spent = spent_then_settled  # type: ignore[method-assign]
    assert budgets.committed("burst") == pytest.approx(0.0)  # spent 0 + reserved 0 (settled meanwhile)
    assert budgets.committed("burst") == pytest.approx(0.01)  # the settled run, not a stale cached total


def budgets_utc(seconds: float) -> Any:
    from facefleet.scheduler.cloud.budget_gate import utc

    return utc(seconds)


class Source:
    def __init__(self) -> None:
        self.draining = False

    def heartbeat_request(self) -> scheduler_pb2.HeartbeatRequest:
        return scheduler_pb2.HeartbeatRequest(agent_id="a")

    def set_draining(self, draining: bool) -> None:
        self.draining = draining

    def cancel(self, task_id: str, reason: str) -> bool:
        return False


def test_agent_drains_while_any_scheduler_replica_says_so() -> None:
    source = Source()
    votes = DrainVotes(source, 2)
    first, second = votes.voter(0), votes.voter(1)
    first.set_draining(True)
    second.set_draining(False)  # the other replica does not know about the drain
    assert source.draining
    first.set_draining(False)
    assert not source.draining
