"""Spend enforcement steps and learned run-time estimates, against a real SQLite ledger."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from facefleet.domain import RUN_LIMIT, SUCCEEDED
from facefleet.scheduler.cloud.budget_gate import BudgetGate
from facefleet.scheduler.ledger import SpendLedger, month_of
from facefleet.scheduler.placement.model import Budget, PoolState
from facefleet.scheduler.run_estimates import RunTimeBook, percentile
from facefleet.scheduler.spend_enforcement import BUDGET_STOP, SpendEnforcer
from tests.cloud.test_cloud_budget_gate import NOW, budgets_utc, record, result

PRICE_PER_S = 0.001  # the PAID pool: $3.60/h


def make_gate(tmp_path: Path, clock: list[float], cap: float) -> BudgetGate:
    ledger = SpendLedger(sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}"))
    budgets = BudgetGate(ledger, clock=lambda: clock[0])
    budgets.observe_budgets("v1", {"burst": Budget("burst", cap)})
    return budgets


def test_reservation_grows_ahead_of_accrued_cost_then_the_run_is_stopped_at_the_cap(tmp_path: Path) -> None:
    clock = [NOW]
    budgets = make_gate(tmp_path, clock, cap=0.02)
    stops: list[tuple[str, str]] = []
    audited: list[tuple[str, dict[str, Any]]] = []

    def stop_run(task_id: str, why: str) -> bool:
        stops.append((task_id, why))
        return True

    enforcer = SpendEnforcer(budgets, stop_run, step_s=1.0, audit=lambda kind, fields: audited.append((kind, fields)))
    assert budgets.admit(record("t0"), result(0.010), NOW) == ""  # a 10 s estimate

    assert enforcer.tick(NOW + 5) == [] and budgets.open_attempts()["t0"].reservation.estimate_usd == 0.010
    assert enforcer.tick(NOW + 9) == []  # 9 s accrued + 2 s ahead > 10 s: grown by 4 steps
    assert abs(budgets.open_attempts()["t0"].reservation.estimate_usd - 0.014) < 1e-12
    assert abs(budgets.ledger.reserved("burst", month_of(budgets_utc(NOW))) - 0.014) < 1e-12

    assert budgets.admit(record("t1"), result(0.005), NOW + 9) == ""  # leaves $0.001 of the cap
    assert enforcer.tick(NOW + 12.5) == []  # each short by $0.0005: 4 steps do not fit, what is short does
    assert abs(budgets.open_attempts()["t0"].reservation.estimate_usd - 0.0145) < 1e-12
    assert abs(budgets.open_attempts()["t1"].reservation.estimate_usd - 0.0055) < 1e-12
    assert enforcer.tick(NOW + 13.5) == []  # no room, but each may still end within its reservation
    assert enforcer.tick(NOW + 14.5) == ["t0", "t1"]  # reservations used up and no room: stop, once each
    assert enforcer.tick(NOW + 15.5) == []
    assert [task_id for task_id, _why in stops] == ["t0", "t1"]
    why = stops[0][1]
    assert why.startswith(BUDGET_STOP) and "budget burst" in why and "aws-a" in why
    assert audited[0][0] == "budget_stop" and audited[0][1]["task_id"] == "t0"
    committed = budgets.ledger.spent("burst", month_of(budgets_utc(NOW))) + budgets.ledger.reserved(
        "burst", month_of(budgets_utc(NOW))
    )
    assert committed <= 0.02 + 1e-12  # reservations never pass the cap


def test_a_run_not_streaming_yet_is_tried_again_and_progress_shortens_the_horizon(tmp_path: Path) -> None:
    clock = [NOW]
    budgets = make_gate(tmp_path, clock, cap=0.010)
    progress: dict[str, tuple[int, int]] = {}
    answers = [False, True]
    enforcer = SpendEnforcer(budgets, lambda task_id, why: answers.pop(0), step_s=1.0, progress_of=progress.get)
    assert budgets.admit(record("t0"), result(0.010), NOW) == ""  # the whole cap
    progress["t0"] = (90, 100)  # 9 s for 90 frames: 1 s left, within the reservation
    assert enforcer.tick(NOW + 9) == []
    progress["t0"] = (50, 100)  # slower than it looked: 10 s left, no room
    assert enforcer.tick(NOW + 10) == []  # the dispatcher had no stream for it yet
    assert enforcer.tick(NOW + 10.5) == ["t0"]


def test_learned_run_time_is_a_high_percentile_never_below_the_configured_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}")
    book = RunTimeBook(engine, window=50)
    paid = PoolState(name="cloud-a", provider="aws", trust_zone="cloud", price_per_hour=7.2, sec_per_frame=0.5)
    free = PoolState(name="onprem-a", provider="onprem", trust_zone="private", sec_per_frame=0.1)
    assert book.overlay((paid, free), NOW) == (paid, free)  # nothing learned yet
    for i in range(100):
        book.record("cloud-a", billed_s=2.0 + (i % 20) / 10, frames=1)  # 2.0 .. 3.9 s
        book.record("onprem-a", billed_s=9.0, frames=1)
    book.record("cloud-a", billed_s=float("nan"), frames=1)  # ignored
    expected = percentile([2.0 + (i % 20) / 10 for i in range(50, 100)], 0.95)  # the last window only
    assert book.learned("cloud-a") == expected == 3.9
    learned_paid, same_free = book.overlay((paid, free), NOW)
    assert learned_paid.sec_per_frame == expected and same_free == free  # only paid pools: estimates are money
    slow_config = PoolState(name="cloud-a", provider="aws", trust_zone="cloud", price_per_hour=7.2, sec_per_frame=9.0)
    assert book.overlay((slow_config,), NOW) == (slow_config,)  # never below the configured value

    restarted = RunTimeBook(engine, window=50)
    assert restarted.learned("cloud-a") == expected
    with engine.connect() as conn:  # pruned to about two windows a pool
        assert conn.execute(sa.text("SELECT count(*) FROM run_time_samples WHERE pool='cloud-a'")).scalar_one() <= 100


def test_an_extension_raises_the_run_limit_ahead_of_the_agent_and_no_room_leaves_the_stop_to_it(
    tmp_path: Path,
) -> None:
    clock = [NOW]
    budgets = make_gate(tmp_path, clock, cap=0.014)
    stops: list[str] = []
    raised: list[tuple[str, int, float]] = []
    enforcer = SpendEnforcer(
        budgets,
        lambda task_id, why: stops.append(task_id) or True,
        step_s=1.0,
        raise_limit=lambda task_id, attempt, limit: raised.append((task_id, attempt, limit)),
        limit_lead_s=1.0,  # a raised limit reaches the agent within a heartbeat interval
    )
    # The run bound: 8 s limit + 2 s slack at $0.001/s.
    assert budgets.admit(record("t0"), result(0.010, max_run_s=8.0), NOW) == ""
    attempt = budgets.open_attempts()["t0"].attempt
    assert attempt == record("t0").attempts + 1 and budgets.run_limit_s("t0") == 8.0
    assert enforcer.tick(NOW + 4.5) == [] and raised == []  # 4.5 s + 2 ahead + 1 lead < 8 s
    assert enforcer.tick(NOW + 5.5) == []  # 8.5 s > 8 s: grown by 4 steps ($0.004 buys 4 s)
    assert raised == [("t0", attempt, 12.0)] and budgets.run_limit_s("t0") == 12.0
    assert abs(budgets.open_attempts()["t0"].reservation.estimate_usd - 0.014) < 1e-12
    # The cap is full: the limit stays; the agent stops the run at 12 s, within the reservation.
    assert enforcer.tick(NOW + 9.5) == [] and raised == [("t0", attempt, 12.0)] and stops == []
    # Backstop: an agent that did not stop is stopped once the whole reservation has accrued.
    assert enforcer.tick(NOW + 13.5) == [] and enforcer.tick(NOW + 14.5) == ["t0"] and stops == ["t0"]


def test_a_run_stopped_at_its_limit_teaches_the_estimate_a_lower_bound(tmp_path: Path) -> None:
    clock = [NOW]
    ledger = SpendLedger(sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}"))
    samples: list[tuple[str, float, int]] = []
    budgets = BudgetGate(ledger, clock=lambda: clock[0], on_completed_run=lambda *sample: samples.append(sample))
    budgets.observe_budgets("v1", {"burst": Budget("burst", 1.0)})
    for task_id in ("t-limit", "t-lost", "t-done"):
        assert budgets.admit(record(task_id), result(0.010, max_run_s=8.0), NOW) == ""
    clock[0] = NOW + 9.0
    budgets.on_requeued(record("t-limit"), RUN_LIMIT)  # billed 9 s for its one frame: at least 9 s a frame
    budgets.on_requeued(record("t-lost"), "agent_lost")  # says nothing about the run's time
    budgets.on_finished(replace(record("t-done", SUCCEEDED), finished_at=NOW + 6.0))
    assert samples == [("aws-a", 9.0, 1), ("aws-a", 6.0, 1)]


@settings(max_examples=25, deadline=None)
@given(limit=st.floats(0.1, 1000.0), slack=st.floats(0.0, 10.0), grows=st.lists(st.floats(1e-6, 0.5), max_size=6))
def test_extensions_keep_the_limit_inside_the_reservation(limit: float, slack: float, grows: list[float]) -> None:
    """Whatever extensions happen, price x (the run's limit + slack) stays within its reservation:
    the dollars added buy exactly the seconds the limit is raised by."""
    with tempfile.TemporaryDirectory() as directory:
        clock = [NOW]
        budgets = make_gate(Path(directory), clock, cap=1e6)
        reserved = PRICE_PER_S * (limit + slack)
        assert budgets.admit(record("t0"), result(reserved, max_run_s=limit), NOW) == ""
        for add in grows:
            assert budgets.extend("t0", add)
            attempt = budgets.open_attempts()["t0"]
            assert PRICE_PER_S * (attempt.max_run_s + slack) <= attempt.reservation.estimate_usd * (1 + 1e-9)
            assert attempt.max_run_s == pytest.approx(budgets.run_limit_s("t0"))


def test_each_run_is_stepped_on_its_own_grid_from_its_reservation(tmp_path: Path) -> None:
    """The enforcer's loop looks at a run every step of its own (admitted + k x step), not on one
    grid for all: a run reserved 0.3 s after another is looked at 0.3 s after it, every time."""
    clock = [NOW]
    budgets = make_gate(tmp_path, clock, cap=1.0)
    looked: list[tuple[str, float]] = []

    def progress_of(task_id: str) -> None:  # called once for each run a step looks at
        looked.append((task_id, round(clock[0] - NOW, 6)))

    enforcer = SpendEnforcer(budgets, lambda _t, _w: True, step_s=1.0, progress_of=progress_of)
    assert budgets.admit(record("a"), result(0.5), NOW) == ""
    assert budgets.admit(record("b"), result(0.5), NOW + 0.3) == ""
    waits = []
    for at in (0.5, 1.0, 1.3, 1.6, 2.0, 2.3):
        clock[0] = NOW + at
        waits.append(round(enforcer.steps_due(clock[0]), 6))
    assert looked == [("a", 1.0), ("b", 1.3), ("a", 2.0), ("b", 2.3)]
    assert waits == [0.5, 0.3, 0.7, 0.4, 0.3, 0.7]  # until the next run's own step
