"""The pass planner the dispatcher and the simulator share: queue order with aging, project limits,
the budget gate and slot accounting, over one World snapshot."""

from __future__ import annotations

from facefleet.scheduler.pass_planner import PassWorld, Waiting, plan_pass
from facefleet.scheduler.placement import TaskSpec, World, load_ruleset
from facefleet.scheduler.placement.model import Budget, PoolState
from facefleet.scheduler.simulate import simulate
from tests.cloud.burst_policy import BURST_RULES

RULES = load_ruleset(BURST_RULES, "rules.yaml")
ONPREM = PoolState(name="onprem-a", provider="onprem", trust_zone="private", free_slots=1, sec_per_frame=1.0)
CLOUD = PoolState(
    name="cloud-a", provider="aws", trust_zone="cloud", free_slots=3, sec_per_frame=1.0, price_per_hour=36.0
)  # fmt: skip  ($0.01 per second)


def world(cap: float) -> World:
    return World(pools=(ONPREM, CLOUD), budgets={"burst": Budget("burst", cap)}, locks={})


def task(n: int, project: str = "p", sensitivity: str = "public", frames: int = 10) -> TaskSpec:
    return TaskSpec(id=f"t{n}", project=project, sensitivity=sensitivity, priority="normal", frames=frames)


def test_queue_order_ages_low_priority_ahead_of_later_urgent_work() -> None:
    waiting = [Waiting(task(1), 4, submitted_at=1000.0), Waiting(task(2), 1, submitted_at=700.0)]
    plan = plan_pass(waiting, RULES, PassWorld(world(10.0)), aging_s=60.0)
    # t2 (LOW) waited 300 s = 5 levels: it goes first and takes the free on-prem slot.
    assert [(p.waiting.task.id, p.decision.pool) for p in plan] == [("t2", "onprem-a"), ("t1", "cloud-a")]


def test_slots_budget_and_project_limits_are_counted_within_the_pass() -> None:
    state = PassWorld(world(cap=0.25), limits={"q": 1})
    waiting = [Waiting(task(n), 2, float(n)) for n in range(5)] + [Waiting(task(9, project="q"), 2, 9.0),
                                                                   Waiting(task(10, project="q"), 2, 10.0)]  # fmt: skip
    plan = plan_pass(waiting, RULES, state)
    launched = [(p.waiting.task.id, p.decision.pool) for p in plan if p.launch]
    # One on-prem slot; $0.10 per 10-frame cloud run: two fit under $0.25, the third not.
    assert launched == [("t0", "onprem-a"), ("t1", "cloud-a"), ("t2", "cloud-a")]
    assert [p.waiting.task.id for p in plan if not p.launch][:1] == ["t3"]
    assert state.world.budgets["burst"].spent_usd == 0.2
    assert {p.name: p.free_slots for p in state.world.pools} == {"onprem-a": 0, "cloud-a": 1}
    assert "t10" not in {p.waiting.task.id for p in plan}  # project q's limit: t9 was admitted, t10 not


def test_the_simulator_runs_the_same_pass_and_settles_reservations() -> None:
    workload = {
        "duration_s": 10,
        "project_limits": {"*": 3},
        "tasks": [{"at": 0, "id": f"t{n}", "project": "p", "sensitivity": "public", "priority": "normal",
                   "frames": 10} for n in range(6)],
    }  # fmt: skip
    report = simulate(RULES, world(cap=0.25), workload)
    # At t=0: three in flight at most (limit), two of them on cloud within the cap; the rest follow on-prem.
    assert report.per_pool == {"onprem-a": 4, "cloud-a": 2}
    assert round(report.cloud_cost_usd, 6) == 0.2 and report.unfinished == 0
    assert set(report.assignments) == {f"t{n}" for n in range(6)}
