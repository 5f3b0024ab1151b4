"""The simulator models what the live scheduler does near a binding cap, with the live code's own pieces:
learned run-time estimates (scheduler.run_estimates), the run turnaround from the ledger
(scheduler.history_workload), the spend enforcer's reservation growth (scheduler.spend_enforcement)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from facefleet.scheduler.placement import World, load_ruleset
from facefleet.scheduler.placement.filters import estimate
from facefleet.scheduler.placement.model import TaskSpec
from facefleet.scheduler.run_estimates import RunTimeBook
from facefleet.scheduler.simulate import COMPLETION_LAG_S, WorkloadError, simulate
from facefleet.scheduler.spend_enforcement import SpendEnforcer
from tests.cloud.test_cloud_budget_gate import NOW, record, result
from tests.cloud.test_spend_enforcement import make_gate

RULES = load_ruleset({"rules": [{"id": "paid", "match": {}, "allow": ["cloud-*"], "budget": "b"}]}, "sim")
WORLD = World.from_dict(
    {
        "pools": [
            {"name": "cloud-1", "provider": "aws", "trust_zone": "cloud", "free_slots": 1, "sec_per_frame": 1.0,
             "price_per_hour": 3.6, "run_margin": 1.5, "run_slack_s": 2.0},
        ],
        "budgets": [{"name": "b", "monthly_cap_usd": 100}],
    }
)  # fmt: skip
POOL = WORLD.pools[0]
TURNAROUND_S = 0.4


def one_by_one(frames: list[int], **extra: Any) -> dict[str, Any]:
    """Tasks far enough apart that each finishes before the next arrives."""
    tasks = [
        {"at": 100 * i, "id": f"t{i}", "project": "p", "sensitivity": "public", "priority": "normal", "frames": n}
        for i, n in enumerate(frames)
    ]
    return {"duration_s": 100 * len(frames), "tasks": tasks, "run_turnaround_s": {"cloud-1": TURNAROUND_S}, **extra}


def test_the_simulators_learned_estimate_is_the_live_books_for_the_same_completions(tmp_path: Path) -> None:
    frames = [2, 7, 1, 4, 3, 6]
    seeded = [1.3]  # a run before the replay window: 1.3 s a frame
    report = simulate(RULES, WORLD, one_by_one(frames, run_time_samples={"cloud-1": seeded}), spend_step_s=None)

    book = RunTimeBook(sa.create_engine(f"sqlite:///{tmp_path / 'book.db'}"))
    book.record("cloud-1", seeded[0], 1)
    for i, n in enumerate(frames):
        learned = book.learned("cloud-1")
        assert learned is not None
        overlaid = replace(POOL, sec_per_frame=max(POOL.sec_per_frame, learned))
        task = TaskSpec(id=f"t{i}", project="p", sensitivity="public", priority="normal", frames=n)
        assert report.reserved_usd[f"t{i}"] == pytest.approx(estimate(task, overlaid).reserve_usd, rel=1e-12)
        book.record("cloud-1", n * POOL.sec_per_frame + TURNAROUND_S, n)  # what the live budget gate bills
    # Billed like live: frames x sec_per_frame + the turnaround, from the reservation on.
    billed = sum(n * POOL.sec_per_frame + TURNAROUND_S for n in frames)
    assert report.cloud_cost_usd == pytest.approx(3.6 * billed / 3600.0)


@pytest.mark.parametrize(
    ("arrival", "cap"),
    [
        (0.0, 100.0),
        # Off the enforcer's step grid, under a cap that takes only what a step is short (4 steps do
        # not fit): what is short depends on when the step falls in the run, so a simulator stepping
        # on one grid for all runs ($0.0082) differs from the live enforcer stepping each run on its own.
        (0.3, 0.0085),
    ],
)
def test_reservations_grow_in_the_simulator_as_the_live_enforcer_grows_them(
    tmp_path: Path, arrival: float, cap: float
) -> None:
    frames, step_s, lead_s = 4, 0.5, 2.0
    tasks = [{"at": arrival, "id": "t0", "project": "p", "sensitivity": "public", "priority": "normal", "frames": 4}]
    world = replace(WORLD, budgets={"b": replace(WORLD.budgets["b"], monthly_cap_usd=cap)})
    workload = {"duration_s": 100, "tasks": tasks, "run_turnaround_s": {"cloud-1": TURNAROUND_S}}
    report = simulate(RULES, world, workload, spend_step_s=step_s, limit_lead_s=lead_s)

    task = TaskSpec(id="t0", project="p", sensitivity="public", priority="normal", frames=frames)
    first = estimate(task, POOL)
    clock = [NOW]
    gate = make_gate(tmp_path, clock, cap=cap)

    def progress_of(_task_id: str) -> tuple[int, int]:  # a frame a second, as the simulated run
        return min(frames, math.floor(clock[0] - NOW)), frames

    enforcer = SpendEnforcer(gate, lambda _t, _w: True, step_s=step_s, progress_of=progress_of, limit_lead_s=lead_s)
    assert gate.admit(record("t0"), result(first.reserve_usd, max_run_s=first.max_run_s), NOW) == ""
    ends = NOW + frames * POOL.sec_per_frame + TURNAROUND_S
    wait = step_s
    while clock[0] + wait < ends:  # the enforcer's own loop: wake when the next step is due
        clock[0] += wait
        wait = enforcer.steps_due(clock[0])
    live = gate.open_attempts()["t0"].reservation.estimate_usd
    assert live > first.reserve_usd  # the run outlived its limit minus the lead: it grew
    assert report.reserved_usd["t0"] == pytest.approx(live, rel=1e-9)


def test_a_binding_cap_limits_the_simulated_growth_like_the_ledger() -> None:
    cap = 0.0085  # the first reservation ($0.008) fits, a 4-step extension ($0.002) does not, $0.0005 does
    world = replace(WORLD, budgets={"b": replace(WORLD.budgets["b"], monthly_cap_usd=cap)})
    report = simulate(RULES, world, one_by_one([4]))
    assert report.reserved_usd["t0"] == pytest.approx(cap)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("run_turnaround_s", {"cloud-1": float("nan")}, "workload.run_turnaround_s.cloud-1: NaN"),
        ("run_turnaround_s", {"cloud-1": -1}, "workload.run_turnaround_s.cloud-1: must be >= 0"),
        ("run_turnaround_s", {"nowhere": 1}, "no pool named 'nowhere'"),
        ("run_turnaround_s", [1], "expected a mapping"),
        ("run_time_samples", {"cloud-1": [0.5, float("inf")]}, "workload.run_time_samples.cloud-1[1]: inf"),
        ("run_time_samples", {"cloud-1": 0.5}, "expected a list"),
    ],
)
def test_bad_model_fields_are_refused_naming_the_field(field: str, value: Any, says: str) -> None:
    with pytest.raises(WorkloadError) as refused:
        simulate(RULES, WORLD, {**one_by_one([1]), field: value})
    assert says in str(refused.value)


@pytest.mark.parametrize("limits", [{}, {"*": 1}])
def test_a_runs_end_frees_slot_and_room_at_once_and_its_project_count_with_the_commit(
    limits: dict[str, int],
) -> None:
    """Live, a run's end settles its budget attempt before its slot frees (one pass sees both); the
    project's count drops when the completion batcher commits, which wakes a pass under limits."""
    # Two slots, but the cap holds one run bound ($0.005) at a time: t1 waits for t0's settlement.
    world = replace(
        WORLD,
        pools=(replace(POOL, free_slots=2),),
        budgets={"b": replace(WORLD.budgets["b"], monthly_cap_usd=0.0085)},
    )
    tasks = [
        {"at": 0, "id": f"t{i}", "project": "p", "sensitivity": "public", "priority": "normal", "frames": 2}
        for i in range(2)
    ]
    workload = {**one_by_one([]), "duration_s": 10, "tasks": tasks, "project_limits": limits}
    report = simulate(RULES, world, workload, spend_step_s=None)
    end = 2 * POOL.sec_per_frame + TURNAROUND_S
    assert report.per_pool == {"cloud-1": 2}
    assert report.dispatched_at == pytest.approx({"t0": 0.0, "t1": end + (COMPLETION_LAG_S if limits else 0.0)})
