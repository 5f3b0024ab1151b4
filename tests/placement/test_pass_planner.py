"""The pass planner the dispatcher and the simulator share: queue order with aging, project limits,
the waits-for-a-slot memo, misses in a row, the budget gate and slot accounting, over one World
snapshot, without side effects."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefleet.domain import PRIVATE_ZONE, residency_allows
from facefleet.scheduler.pass_planner import (
    Action,
    PassPlanner,
    PassRules,
    PassWorld,
    PurePlacement,
    Waiting,
    placement_inputs,
    plan_pass,
    pure_placement,
    queue_order,
)
from facefleet.scheduler.placement import TaskSpec, World, load_ruleset
from facefleet.scheduler.placement.model import Budget, PoolState
from facefleet.scheduler.simulate import simulate
from tests.cloud.burst_policy import BURST_RULES

RULES = load_ruleset(BURST_RULES, "rules.yaml")
PLACE = pure_placement(RULES)
ONPREM = PoolState(name="onprem-a", provider="onprem", trust_zone="private", free_slots=1, sec_per_frame=1.0)
CLOUD = PoolState(
    name="cloud-a", provider="aws", trust_zone="cloud", free_slots=3, sec_per_frame=1.0, price_per_hour=36.0
)  # fmt: skip  ($0.01 per second)


def world(cap: float, *pools: PoolState) -> World:
    return World(pools=pools or (ONPREM, CLOUD), budgets={"burst": Budget("burst", cap)}, locks={})


def task(n: int, project: str = "p", sensitivity: str = "public", frames: int = 10, sla: float = 0.0) -> TaskSpec:
    return TaskSpec(
        id=f"t{n}", project=project, sensitivity=sensitivity, priority="normal", frames=frames, sla_seconds=sla
    )


def entries(plan: list, action: Action | None = None) -> list[tuple[str, str | None]]:  # type: ignore[type-arg]
    return [(p.waiting.task.id, p.pool) for p in plan if action is None or p.action is action]


def test_queue_order_ages_low_priority_ahead_of_later_urgent_work() -> None:
    waiting = [Waiting(task(1), 4, submitted_at=1000.0), Waiting(task(2), 1, submitted_at=700.0)]
    plan = plan_pass(queue_order(waiting, aging_s=60.0), PLACE, PassWorld(world(10.0)))
    # t2 (LOW) waited 300 s = 5 levels: it goes first and takes the free on-prem slot.
    assert entries(plan) == [("t2", "onprem-a"), ("t1", "cloud-a")]
    # With a priority level worth days of waiting, the urgent one goes first.
    assert [w.task.id for w in queue_order(waiting, aging_s=1e6)] == ["t1", "t2"]


def test_slots_budget_and_project_limits_are_counted_within_the_pass() -> None:
    state = PassWorld(world(cap=0.35), limits={"q": 1})
    waiting = [Waiting(task(n), 2, float(n)) for n in range(5)] + [Waiting(task(9, project="q"), 2, 9.0),
                                                                   Waiting(task(10, project="q"), 2, 10.0)]  # fmt: skip
    plan = plan_pass(waiting, PLACE, state)
    # One on-prem slot; a 10-frame cloud run reserves its run bound, $0.01/s x (10 s x margin 1.5 +
    # slack 2 s) = $0.17: two fit under $0.35, the third not.
    assert entries(plan, Action.LAUNCH) == [("t0", "onprem-a"), ("t1", "cloud-a"), ("t2", "cloud-a")]
    kept = [p for p in plan if p.action is Action.KEEP]
    assert kept[0].waiting.task.id == "t3" and "budget x1" in kept[0].decision.reason  # placement saw the charge
    assert [p.reserved_usd for p in plan if p.launch] == pytest.approx([0.0, 0.17, 0.17])
    assert state.world.budgets["burst"].spent_usd == pytest.approx(0.34)
    assert {p.name: p.free_slots for p in state.world.pools} == {"onprem-a": 0, "cloud-a": 1}
    assert "t10" not in {p.waiting.task.id for p in plan}  # project q's limit: t9 was admitted, t10 not


def test_tasks_that_wait_for_the_same_slot_are_placed_once() -> None:
    calls: list[str] = []

    def counted(waiting: Waiting, pass_world: World) -> PurePlacement:
        calls.append(waiting.task.id)
        return PLACE(waiting, pass_world)

    full_onprem = replace(ONPREM, free_slots=0)
    waiting = [Waiting(task(n, "films", "private"), 2, float(n)) for n in range(5)]
    waiting += [Waiting(task(7, "ads", "private"), 2, 7.0), Waiting(task(8, "promo"), 2, 8.0)]
    plan = plan_pass(waiting, counted, PassWorld(world(10.0, full_onprem, CLOUD)))
    assert calls == ["t0", "t7", "t8"]  # t1..t4 have t0's placement inputs: they wait as it does
    assert [p.action for p in plan] == [Action.NOTHING] * 6 + [Action.LAUNCH]
    assert plan[0].placed is not None and plan[1].placed is None  # t0 placed, t1 skipped
    assert entries(plan, Action.LAUNCH) == [("t8", "cloud-a")]


def test_a_pass_ends_after_max_misses_in_a_row_or_when_nothing_is_free() -> None:
    pulled: list[str] = []

    def queue(waiting: list[Waiting]) -> Iterator[Waiting]:
        for item in waiting:  # the live side reads the store lazily: count what the pass asked for
            pulled.append(item.task.id)
            yield item

    blocked = [Waiting(task(n, f"p{n}", "private"), 2, float(n)) for n in range(4)]  # on-prem full
    ready = Waiting(task(9), 2, 9.0)
    full_onprem = replace(ONPREM, free_slots=0)
    plan = plan_pass(queue([*blocked, ready]), PLACE, PassWorld(world(10.0, full_onprem, CLOUD)), PassRules(3))
    assert entries(plan, Action.LAUNCH) == [] and pulled == ["t0", "t1", "t2"]
    pulled.clear()
    plan = plan_pass(queue([*blocked, ready]), PLACE, PassWorld(world(10.0, full_onprem, CLOUD)), PassRules(5))
    assert entries(plan, Action.LAUNCH) == [("t9", "cloud-a")]
    # Every slot taken: the pass stops without reading the rest of the queue.
    pulled.clear()
    one_slot = world(10.0, ONPREM)
    plan = plan_pass(queue([Waiting(task(n), 2, float(n)) for n in range(5)]), PLACE, PassWorld(one_slot))
    assert entries(plan) == [("t0", "onprem-a")] and pulled == ["t0"]


def test_rejects_are_left_alone_during_warmup() -> None:
    hopeless = Waiting(task(1, frames=100, sla=1.0), 2, 1.0)  # no pool can do 100 frames in 1 s
    assert [p.action for p in plan_pass([hopeless], PLACE, PassWorld(world(10.0)))] == [Action.REJECT]
    warm = plan_pass([hopeless], PLACE, PassWorld(world(10.0)), PassRules(warmup=True))
    assert [p.action for p in warm] == [Action.NOTHING]


def test_a_launch_that_deviates_is_taken_back_and_the_rest_replanned() -> None:
    """The live side found no agent slot on cloud-a (an I/O race): the reservation goes back, the
    pool has no free slot for the rest of the pass, and the next task is planned against that."""
    cloud = replace(CLOUD, can_provision=1)
    state = PassWorld(world(10.0, replace(ONPREM, free_slots=0), cloud))
    planner = PassPlanner([Waiting(task(n), 2, float(n)) for n in range(3)], PLACE, state, PassRules())
    plan = []
    for planned in planner:
        plan.append(planned)
        if planned.waiting.task.id == "t0":
            planner.not_launched(planned, pool_full=True)
    # t1 goes on an instance to provision; then nothing is free anywhere and t2 is not read.
    assert [(p.waiting.task.id, p.action, p.provision) for p in plan] == [
        ("t0", Action.LAUNCH, False),
        ("t1", Action.LAUNCH, True),
    ]
    assert state.world.budgets["burst"].spent_usd == pytest.approx(0.17)  # t1's reservation (run bound) only
    assert state.pool("cloud-a") == replace(cloud, free_slots=0, can_provision=0)


def test_instances_with_several_slots_take_that_many_tasks_each() -> None:
    cloud = replace(CLOUD, free_slots=0, can_provision=2, slots_per_instance=3, provision_s=30.0)
    state = PassWorld(world(100.0, replace(ONPREM, free_slots=0), cloud))
    plan = plan_pass([Waiting(task(n), 2, float(n)) for n in range(9)], PLACE, state)
    # Two instances to provision, three slots each: six tasks; then nothing is free anywhere.
    assert [(p.pool, p.provision) for p in plan] == [("cloud-a", True)] * 6
    assert all(p.decision.estimate is not None and p.decision.estimate.completion_s >= 30.0 for p in plan)
    assert state.pool("cloud-a") == replace(cloud, can_provision=0)
    with pytest.raises(ValueError, match="slots_per_instance"):  # the simulator's pools hold one task each
        World.from_dict({"pools": [{"name": "c", "provider": "aws", "trust_zone": "cloud", "slots_per_instance": 2}]})


def test_the_simulator_runs_the_same_pass_and_settles_reservations() -> None:
    workload = {
        "duration_s": 10,
        "project_limits": {"*": 3},
        "tasks": [{"at": 0, "id": f"t{n}", "project": "p", "sensitivity": "public", "priority": "normal",
                   "frames": 10} for n in range(6)],
    }  # fmt: skip
    report = simulate(RULES, world(cap=0.35), workload)
    # At t=0: three in flight at most (limit), two of them on cloud within the cap (each reserves its
    # run bound, $0.17, and is billed $0.10); the rest follow on-prem.
    assert report.per_pool == {"onprem-a": 4, "cloud-a": 2}
    assert round(report.cloud_cost_usd, 6) == 0.2 and report.unfinished == 0
    assert set(report.assignments) == {f"t{n}" for n in range(6)}


pools = st.lists(
    st.tuples(
        st.booleans(), st.integers(0, 3), st.integers(0, 2), st.sampled_from([0.0, 3.6, 36.0]), st.integers(1, 3)
    ),
    min_size=1,
    max_size=4,
)
tasks = st.lists(
    st.tuples(
        st.sampled_from(["public", "private"]),
        st.sampled_from(["a", "b", "locked"]),
        st.integers(1, 4),
        st.integers(1, 60),
        st.floats(0, 600),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(pools, tasks, st.floats(0, 2), st.floats(0, 1), st.integers(0, 3), st.integers(1, 20))
def test_a_plan_never_launches_beyond_capacity_or_cap_and_never_private_work_on_cloud(
    raw_pools: list[tuple[bool, int, int, float, int]],
    raw_tasks: list[tuple[str, str, int, int, float]],
    cap: float,
    spent_share: float,
    limit: int,
    max_misses: int,
) -> None:
    pool_states = tuple(
        PoolState(name=f"onprem-{i}", provider="onprem", trust_zone=PRIVATE_ZONE, free_slots=free, sec_per_frame=0.5)
        if private
        else PoolState(
            name=f"cloud-{i}",
            provider="aws",
            trust_zone="cloud",
            free_slots=free,
            can_provision=boot,
            slots_per_instance=slots,
            price_per_hour=price,
            sec_per_frame=0.5,
            provision_s=30.0,
        )
        for i, (private, free, boot, price, slots) in enumerate(raw_pools)
    )
    spent = cap * spent_share
    snapshot = World(pools=pool_states, budgets={"burst": Budget("burst", cap, spent)}, locks={"locked": "audit"})
    waiting = [
        Waiting(TaskSpec(f"t{n}", project, sensitivity, "normal", frames), priority, at)
        for n, (sensitivity, project, priority, frames, at) in enumerate(raw_tasks)
    ]
    limits = {"*": limit} if limit else {}
    plan = plan_pass(queue_order(waiting), PLACE, PassWorld(snapshot, limits), PassRules(max_misses))

    launched = [p for p in plan if p.launch]
    by_pool = {pool.name: pool for pool in pool_states}
    for pool in pool_states:
        on_pool = [p for p in launched if p.pool == pool.name]
        provisionable = pool.can_provision * pool.slots_per_instance
        assert len(on_pool) <= pool.free_slots + provisionable
        assert sum(p.provision for p in on_pool) <= provisionable
        assert all(not p.provision for p in on_pool[: pool.free_slots])  # free slots first
    assert spent + sum(p.reserved_usd for p in launched) <= cap + 1e-9
    for p in launched:
        assert p.pool is not None
        spec = p.waiting.task
        assert residency_allows(by_pool[p.pool].trust_zone, spec.sensitivity, spec.project in snapshot.locks)
    if limits:
        for project in {w.task.project for w in waiting}:
            assert sum(1 for p in launched if p.waiting.task.project == project) <= limit
    # Queue order is kept: the plan lists tasks in the order they were given.
    order = [w.task.id for w in queue_order(waiting)]
    assert [p.waiting.task.id for p in plan] == [i for i in order if i in {p.waiting.task.id for p in plan}]


def test_a_pass_says_whether_it_stopped_at_its_size_limit() -> None:
    """`cut_short` (the dispatcher runs the next pass at once only then): true when the pass
    considered `max_tasks` tasks with slots still free, false when the queue or the slots ran out."""
    many = replace(CLOUD, free_slots=10)

    def cut_short(queued: int, max_tasks: int, *pools: PoolState) -> bool:
        planner = PassPlanner(
            [Waiting(task(n), 2, float(n)) for n in range(queued)], PLACE, PassWorld(world(100.0, *pools)),
            PassRules(max_tasks=max_tasks),
        )  # fmt: skip
        list(planner)
        return planner.cut_short

    assert cut_short(5, 2, many)  # two considered, three left with slots free
    assert not cut_short(2, 5, many)  # the queue ran out
    assert not cut_short(5, 5, replace(CLOUD, free_slots=1))  # the slots ran out


def test_placement_inputs_tell_apart_tasks_that_differ_in_anything_but_their_id() -> None:
    """The waits-for-a-slot memo keys on `placement_inputs`: a field it left out would let a task
    with other inputs be skipped as if it had to wait too."""
    base = TaskSpec(id="a", project="p", sensitivity="public", priority="normal", sla_seconds=10.0, frames=2)
    assert placement_inputs(replace(base, id="b")) == placement_inputs(base)
    changed = {"project": "q", "sensitivity": "private", "priority": "urgent", "sla_seconds": 20.0, "frames": 3}
    assert set(changed) == {f.name for f in fields(TaskSpec)} - {"id"}  # a new field must be added here and there
    for name, value in changed.items():
        assert placement_inputs(replace(base, **{name: value})) != placement_inputs(base), name
