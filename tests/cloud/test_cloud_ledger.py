"""SpendLedger: attribution, reservations under a hard cap (threads + hypothesis), alerts, forecast."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.pool import StaticPool
from structlog.testing import capture_logs

from facefleet.scheduler.ledger import BudgetAccount, SpendLedger, Usage, linear_forecast, month_of
from facefleet.scheduler.metrics import BUDGET_ALERT, BUDGET_SPENT

NOW = datetime(2026, 11, 16, tzinfo=UTC)  # 15 of 30 days elapsed


def memory_ledger() -> SpendLedger:
    return SpendLedger(sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}))


def usage(
    task: str,
    usd_per_hour: float,
    seconds: float,
    *,
    budget: str = "marketing",
    project: str = "promo",
    pool: str = "aws-gpu",
    at: datetime = NOW,
    outcome: str = "completed",
) -> Usage:
    return Usage(task, project, "burst-public", pool, budget, "aws", f"i-{task}", seconds, usd_per_hour, at, outcome)


def test_spend_is_attributed_and_grouped(tmp_path: Path) -> None:
    ledger = SpendLedger(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    ledger.record(usage("t1", 0.36, 3600))  # $0.36
    ledger.record(usage("t2", 0.72, 1800, project="trailer"))  # $0.36
    ledger.record(usage("t3", 1.20, 900, pool="azure-t4"))  # $0.30
    ledger.record(usage("t4", 1.00, 3600, at=NOW - timedelta(days=30)))  # October: not this month
    ledger.record(usage("t5", 2.00, 3600, budget="research", project="lab"))

    month = month_of(NOW)
    assert month == "2026-11"
    assert ledger.spent("marketing", month) == pytest.approx(1.02)
    assert ledger.spent("marketing", "2026-10") == pytest.approx(1.00)
    assert ledger.by_project(month, budget="marketing") == pytest.approx({"promo": 0.66, "trailer": 0.36})
    assert ledger.by_pool(month) == pytest.approx({"aws-gpu": 2.72, "azure-t4": 0.30})
    assert ledger.by_budget(month) == pytest.approx({"marketing": 1.02, "research": 2.0})
    assert BUDGET_SPENT.labels(budget="research")._value.get() == pytest.approx(2.0)
    rows = ledger.records(NOW - timedelta(days=1))
    assert [r["task_id"] for r in rows] == ["t1", "t2", "t3", "t5"]
    assert rows[0]["instance_seconds"] == 3600 and rows[0]["rule"] == "burst-public"


def test_forecast_is_linear_on_month_to_date() -> None:
    assert linear_forecast(15.0, "2026-11", NOW) == pytest.approx(30.0)
    assert linear_forecast(15.0, "2026-11", datetime(2026, 12, 2, tzinfo=UTC)) == 15.0  # month over
    assert linear_forecast(0.0, "2026-02", datetime(2026, 2, 8, tzinfo=UTC)) == 0.0
    ledger = memory_ledger()
    ledger.record(usage("t1", 10.0, 3600))
    assert ledger.forecast_month_end("marketing", NOW) == pytest.approx(20.0)


def test_burst_larger_than_budget_reserves_exactly_the_affordable_tasks(tmp_path: Path) -> None:
    ledger = SpendLedger(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}", connect_args={"timeout": 30}))
    account = BudgetAccount("marketing", monthly_cap_usd=10.0, alert_pct=80)
    ledger.record(usage("earlier", 4.0, 3600), account)  # $4 spent already: $6 remain
    barrier = threading.Barrier(8)

    def place(i: int) -> bool:
        if i < 8:
            barrier.wait()
        return ledger.reserve(account, f"burst-{i}", 0.5, NOW) is not None

    with ThreadPoolExecutor(max_workers=8) as pool:
        granted = list(pool.map(place, range(30)))

    assert sum(granted) == 12  # $6 / $0.50
    assert ledger.reserved("marketing", "2026-11") == pytest.approx(6.0)
    assert ledger.reserve(account, "one-more", 0.01, NOW) is None
    # A finished task frees what it did not spend.
    first = ledger.open_reservations()[0]
    ledger.settle(first, usage(first.task_id, 0.36, 2500), account)  # $0.25 of $0.50
    assert ledger.reserve(account, "fits-now", 0.25, NOW) is not None
    assert ledger.reserve(account, "does-not", 0.01, NOW) is None
    # Released reservations (dispatch failed) give their estimate back.
    ledger.release(ledger.open_reservations()[0])
    assert ledger.reserve(account, "after-release", 0.5, NOW) is not None


def test_negative_estimate_is_rejected_with_the_task_named() -> None:
    with pytest.raises(ValueError, match="task t9"):
        memory_ledger().reserve(BudgetAccount("m", 10), "t9", -1.0, NOW)


def test_alert_fires_once_at_the_alert_percentage() -> None:
    ledger = memory_ledger()
    account = BudgetAccount("marketing", monthly_cap_usd=100.0, alert_pct=50)
    with capture_logs() as logs:
        ledger.record(usage("t1", 40.0, 3600), account)
        assert BUDGET_ALERT.labels(budget="marketing")._value.get() == 0
        ledger.record(usage("t2", 10.0, 3600), account)  # exactly 50 %
        ledger.record(usage("t3", 10.0, 3600), account)
    alerts = [e for e in logs if e["event"] == "budget_alert"]
    assert len(alerts) == 1
    assert alerts[0]["budget"] == "marketing" and alerts[0]["pct_used"] == 50.0
    assert BUDGET_ALERT.labels(budget="marketing")._value.get() == 1


def test_accounts_and_status() -> None:
    ledger = memory_ledger()
    ledger.upsert_accounts([BudgetAccount("marketing", 100.0, 80), BudgetAccount("research", 50.0, 90)], NOW)
    ledger.upsert_accounts([BudgetAccount("marketing", 120.0, 75)], NOW)
    ledger.record(usage("t1", 30.0, 3600))
    ledger.record(usage("t2", 1.0, 3600, budget="unlisted"))
    ledger.reserve(BudgetAccount("research", 50.0, 90), "t3", 5.0, NOW)
    status = {s.name: s for s in ledger.status(NOW)}
    assert set(status) == {"marketing", "research", "unlisted"}
    assert status["marketing"].monthly_cap_usd == 120.0 and status["marketing"].alert_pct == 75
    assert status["marketing"].forecast_usd == pytest.approx(60.0)
    assert status["research"].remaining_usd == pytest.approx(45.0)
    assert status["unlisted"].monthly_cap_usd is None and status["unlisted"].remaining_usd is None


operations = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "reserve", "settle", "release"]),
        st.floats(min_value=0.01, max_value=5.0, allow_nan=False),
        st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(cap=st.floats(min_value=0.0, max_value=40.0, allow_nan=False), ops=operations)
def test_property_cap_never_exceeded_by_more_than_one_estimate(cap: float, ops: list[tuple[str, float, float]]) -> None:
    ledger = memory_ledger()
    account = BudgetAccount("b", cap, 80)
    largest_estimate = 0.0
    for i, (op, estimate, fraction) in enumerate(ops):
        open_now = ledger.open_reservations()
        if op == "reserve":
            granted = ledger.reserve(account, f"t{i}", estimate, NOW)
            largest_estimate = max(largest_estimate, estimate)
            if granted is None:
                assert ledger.spent("b", "2026-11") + ledger.reserved("b", "2026-11") + estimate > cap
        elif open_now and op == "settle":
            held = open_now[0]
            # Actual cost is at most the estimate (estimates are upper bounds): price x seconds.
            ledger.settle(held, usage(held.task_id, 3600.0, held.estimate_usd * fraction, budget="b"), account)
        elif open_now:
            ledger.release(open_now[0])
        spent = ledger.spent("b", "2026-11")
        assert spent + ledger.reserved("b", "2026-11") <= cap + 1e-9
        assert spent <= cap + largest_estimate + 1e-9
