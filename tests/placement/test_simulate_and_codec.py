"""Simulator (injected clock, deterministic) and the proto codec."""

from __future__ import annotations

from dataclasses import replace

import pytest

from facefleet.rpc_errors import TaskInputError
from facefleet.scheduler.placement import TaskSpec, World, load_ruleset, place
from facefleet.scheduler.placement.proto_codec import decision_from_proto, decision_to_proto, task_spec_from_proto
from facefleet.scheduler.simulate import SimClock, WorkloadError, parse_sweep, simulate, with_override
from facefleet.v1 import types_pb2

RULES = load_ruleset(
    {
        "rules": [
            {
                "id": "burst",
                "match": {"sensitivity": ["public"], "priority": ["urgent"]},
                "allow": ["onprem-*", "cloud-*"],
                "max_spot_price_per_hour": 4.0,
                "burst_when": {"onprem_free_slots_lt": 1},
                "budget": "b",
            },
            {"id": "default", "match": {}, "allow": ["onprem-*"]},
        ]
    },
    "sim",
)
WORLD = World.from_dict(
    {
        "pools": [
            {"name": "onprem-1", "provider": "onprem", "trust_zone": "private", "free_slots": 1, "sec_per_frame": 1.0},
            {
                "name": "cloud-1",
                "provider": "aws",
                "trust_zone": "cloud",
                "spot": True,
                "price_per_hour": 3.6,
                "can_provision": 2,
                "provision_s": 10,
                "sec_per_frame": 1.0,
            },
        ],
        "budgets": [{"name": "b", "monthly_cap_usd": 100}],
        "locks": [{"project": "locked", "reason": "audit"}],
    }
)
WORKLOAD = {
    "duration_s": 100,
    "tasks": [
        {"at": 0, "project": "p", "sensitivity": "public", "priority": "urgent", "frames": 50, "sla_seconds": 70},
        {"at": 1, "project": "p", "sensitivity": "public", "priority": "urgent", "frames": 50, "sla_seconds": 70},
        {"at": 2, "project": "m", "sensitivity": "private", "priority": "urgent", "frames": 10},
        {"at": 3, "project": "locked", "sensitivity": "public", "priority": "urgent", "frames": 10},
    ],
}


def test_simulation_bursts_keeps_private_home_and_uses_injected_clock() -> None:
    clock = SimClock()
    report = simulate(RULES, WORLD, WORKLOAD, clock=clock)
    # t0 takes the on-prem slot; t1 bursts (provision 10 + 50 s, at 3.6/h -> $0.06);
    # private and locked tasks wait for on-prem: 50 s, then 10 s each.
    assert report.per_pool == {"onprem-1": 3, "cloud-1": 1}
    assert report.cloud_cost_usd == pytest.approx(0.06)
    assert report.spend_by_budget == {"b": pytest.approx(0.06)}
    assert report.residency_violations == 0 and report.unfinished == 0 and report.sla_misses == 0
    assert clock.now == pytest.approx(70.0)  # no project limits: nothing waits for the completion's commit


def test_sweep_price_cap_turns_cloud_off_and_is_deterministic() -> None:
    name, values = parse_sweep("max_spot_price_per_hour=1:4:3")
    assert values == [1.0, 4.0]
    runs = {v: simulate(*with_override(RULES, WORLD, name, v), WORKLOAD) for v in values}
    assert runs[1.0].per_pool.get("cloud-1") is None and runs[1.0].cloud_cost_usd == 0
    assert runs[4.0].per_pool["cloud-1"] == 1
    assert simulate(RULES, WORLD, WORKLOAD).to_dict() == simulate(RULES, WORLD, WORKLOAD).to_dict()
    with pytest.raises(WorkloadError, match="choose one of"):
        parse_sweep("speed=1:2:1")


def test_proto_round_trip_and_task_validation() -> None:
    decision = place(TaskSpec("t", "p", "public", "urgent", frames=10), RULES, WORLD)
    back = decision_from_proto(decision_to_proto(decision))
    assert back.outcome == decision.outcome and back.pool == decision.pool and back.rule == decision.rule
    assert [(c.pool, c.feasible, c.failed_filter) for c in back.candidates] == [
        (c.pool, c.feasible, c.failed_filter) for c in decision.candidates
    ]
    spec = task_spec_from_proto(
        types_pb2.Task(id="x", project="p", sensitivity=types_pb2.SENSITIVITY_PRIVATE, frames=0)
    )
    assert (spec.sensitivity, spec.priority, spec.frames) == ("private", "normal", 1)
    with pytest.raises(TaskInputError) as caught:
        task_spec_from_proto(types_pb2.Task(id="x", project="p"))
    assert caught.value.field == "task.sensitivity"


def test_the_run_bound_survives_the_wire_and_explain_shows_it() -> None:
    """Finance reads the reservation and the agent's run limit from `explain`, also for a stored decision."""
    from rich.console import Console

    from facefleet.scheduler.placement.explain import render_decision

    pools = tuple(replace(p, free_slots=0) if p.name == "onprem-1" else p for p in WORLD.pools)
    busy = replace(WORLD, pools=pools)
    task = TaskSpec("t", "p", "public", "urgent", frames=10)
    decision = place(task, RULES, busy)
    assert decision.pool == "cloud-1" and decision.estimate is not None
    assert decision.estimate.reserve_usd > decision.estimate.cost_usd > 0 and decision.estimate.max_run_s > 0
    back = decision_from_proto(decision_to_proto(decision))
    assert back.estimate == decision.estimate
    assert [c.estimate for c in back.candidates] == [c.estimate for c in decision.candidates]
    console = Console(width=200, record=True)
    console.print(render_decision(task, back))
    text = console.export_text()
    assert f"reserves ${decision.estimate.reserve_usd:.6f}" in text
    assert f"run limit {decision.estimate.max_run_s:.1f} s" in text
    assert decision.estimate.to_dict()["reserve_usd"] == round(decision.estimate.reserve_usd, 6)
