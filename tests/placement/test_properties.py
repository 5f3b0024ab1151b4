"""Property tests: residency never bends, outcomes are one of three, the trace agrees with the decision."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from facefleet.domain import PRIORITIES, SENSITIVITIES
from facefleet.scheduler.placement import FALLBACK_RULESET, TaskSpec, World, load_ruleset, place
from facefleet.scheduler.placement.filters import FILTER_ORDER
from facefleet.scheduler.placement.model import OUTCOMES

PROJECTS = ["promo-a", "promo-b", "film-x", "news", "partner-1", "med"]
POOL_NAMES = ["onprem-a", "onprem-b", "aws-1", "aws-2", "azure-1", "cloud-local", "gpu-x"]
GLOBS = ["*", "onprem-*", "aws-*", "azure-*", "cloud-*", "gpu-?", "aws-1", "*-1"]

pool_strategy: st.SearchStrategy[dict[str, Any]] = st.builds(
    dict,
    name=st.sampled_from(POOL_NAMES),
    provider=st.sampled_from(["onprem", "aws", "azure", "local"]),
    trust_zone=st.sampled_from(["private", "cloud", "edge"]),
    free_slots=st.integers(0, 3),
    queue_wait_s=st.floats(0, 600),
    sec_per_frame=st.floats(0.0, 1.0),
    price_per_hour=st.floats(0, 3),
    spot=st.booleans(),
    can_provision=st.integers(0, 4),
    provision_s=st.floats(0, 300),
    healthy=st.booleans(),
    price_stale=st.booleans(),
)

rule_strategy = st.fixed_dictionaries(
    {
        "match": st.fixed_dictionaries(
            {},
            optional={
                "sensitivity": st.lists(st.sampled_from(SENSITIVITIES), min_size=1, unique=True),
                "priority": st.lists(st.sampled_from(PRIORITIES), min_size=1, unique=True),
                "project": st.lists(st.sampled_from(["promo-*", "film-*", "n*", "med", "partner-?"]), min_size=1),
            },
        ),
        "allow": st.lists(st.sampled_from(GLOBS), min_size=1, max_size=4),
    },
    optional={
        "deny": st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2),
        "prefer": st.sampled_from(["cost", "latency", "order"]),
        "max_spot_price_per_hour": st.floats(0, 3),
        "burst_when": st.fixed_dictionaries({"onprem_queue_wait_s_gt": st.floats(0, 300)}),
        "budget": st.sampled_from(["mkt", "ops", "missing"]),
        "allow_cloud_internal": st.booleans(),
        "trust_zones": st.lists(st.sampled_from(["private", "cloud", "edge"]), min_size=1, unique=True),
    },
)


@st.composite
def scenario(draw: Any) -> tuple[TaskSpec, Any, World]:
    rules = draw(st.lists(rule_strategy, min_size=1, max_size=6))
    for i, rule in enumerate(rules):
        rule["id"] = f"r{i}"
        if not rule["match"] and i < len(rules) - 1:  # a catch-all may only come last
            rule["match"] = {"priority": ["urgent"]}
    if rules[-1]["match"] and draw(st.booleans()):
        rules.append({"id": "default", "match": {}, "allow": ["onprem-*"]})
    ruleset = draw(st.sampled_from([load_ruleset({"rules": rules}, "generated.yaml"), FALLBACK_RULESET]))
    pools = draw(st.lists(pool_strategy, max_size=7, unique_by=lambda p: p["name"]))
    world = World.from_dict(
        {
            "pools": pools,
            "budgets": [
                {"name": "mkt", "monthly_cap_usd": draw(st.floats(0, 50)), "spent_usd": draw(st.floats(0, 50))},
                {"name": "ops", "monthly_cap_usd": 100, "spent_usd": 0},
            ],
            "locks": [{"project": p, "reason": "test"} for p in draw(st.lists(st.sampled_from(PROJECTS), max_size=3))],
        }
    )
    task = TaskSpec(
        id="t",
        project=draw(st.sampled_from(PROJECTS)),
        sensitivity=draw(st.sampled_from(SENSITIVITIES)),
        priority=draw(st.sampled_from(PRIORITIES)),
        sla_seconds=draw(st.sampled_from([0, 30, 300, 3000])),
        frames=draw(st.integers(1, 5000)),
    )
    return task, ruleset, world


@settings(max_examples=250, deadline=None)
@given(scenario())
def test_private_or_locked_never_leaves_private_zone(case: tuple[TaskSpec, Any, World]) -> None:
    task, ruleset, world = case
    decision = place(task, ruleset, world)
    if decision.outcome == "dispatch" and (task.sensitivity == "private" or task.project in world.locks):
        zone = {p.name: p.trust_zone for p in world.pools}[decision.pool]  # type: ignore[index]
        assert zone == "private", decision.reason
    if ruleset is FALLBACK_RULESET and decision.outcome == "dispatch":
        assert {p.name: p.trust_zone for p in world.pools}[decision.pool] == "private"  # type: ignore[index]


@settings(max_examples=250, deadline=None)
@given(scenario())
def test_outcome_and_trace_agree(case: tuple[TaskSpec, Any, World]) -> None:
    task, ruleset, world = case
    decision = place(task, ruleset, world)
    assert decision.outcome in OUTCOMES
    assert decision.reason
    if decision.rule is not None:
        assert [c.pool for c in decision.candidates] == [p.name for p in world.pools]
    for c in decision.candidates:
        if c.feasible:
            assert c.failed_filter is None and c.score is not None and c.estimate is not None
        else:
            assert c.failed_filter in FILTER_ORDER and c.detail and c.score is None
    feasible = [c for c in decision.candidates if c.feasible]
    if decision.outcome == "dispatch":
        chosen = next(c for c in decision.candidates if c.pool == decision.pool)
        assert chosen.feasible
        assert chosen.score == max(c.score for c in feasible)  # type: ignore[type-var]
        assert decision.estimate == chosen.estimate
    else:
        assert decision.pool is None and not feasible


@settings(max_examples=100, deadline=None)
@given(scenario())
def test_internal_needs_explicit_allow_cloud_internal(case: tuple[TaskSpec, Any, World]) -> None:
    task, ruleset, world = case
    decision = place(task, ruleset, world)
    if decision.outcome == "dispatch" and task.sensitivity == "internal":
        zone = {p.name: p.trust_zone for p in world.pools}[decision.pool]  # type: ignore[index]
        rule = next(r for r in ruleset.rules if r.id == decision.rule)
        assert zone == "private" or rule.allow_cloud_internal


@settings(max_examples=120, deadline=None)
@given(scenario())
def test_index_agrees_with_linear_first_match(case: tuple[TaskSpec, Any, World]) -> None:
    task, ruleset, world = case
    decision = place(task, ruleset, world)
    expected = next((r.id for r in ruleset.rules if r.matches(task)), None)
    assert decision.rule == expected
