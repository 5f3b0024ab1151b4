"""The live edge around pure placement: build the World from capacity, rules, budgets and locks,
call `place()`, and translate the Decision into what the store and the wire need.

`place` stays a pure function; everything with a clock or I/O (capacity snapshot, rule source,
budget ledger, cloud prices and provisioning headroom) is read here, once per snapshot:

- `pool_overlay(pools, now)` rewrites/adds cloud pools (price feed, `can_provision`);
- `spent_for(budget)` is the ledger's committed spend this month (spent + open reservations);
- `on_budgets(version, budgets)` hears every rule-set version once (the ledger records the caps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from facefleet.domain import PRIVATE, PRIVATE_ZONE, residency_allows, sensitivity_from_proto
from facefleet.scheduler.capacity import CapacitySnapshot
from facefleet.scheduler.placement import place
from facefleet.scheduler.placement.model import Budget, Decision, PoolState, RuleSet, TaskSpec, World
from facefleet.scheduler.placement.proto_codec import decision_to_proto, task_spec_from_proto
from facefleet.scheduler.rules_source.base import ActiveConfig
from facefleet.v1 import types_pb2


class CapacitySource(Protocol):
    def snapshot(self, now: float) -> CapacitySnapshot: ...


class RulesSource(Protocol):
    def current(self) -> ActiveConfig: ...


class WorldSnapshot(NamedTuple):
    """What one dispatch pass places against: the active rules and the world built from capacity."""

    active: ActiveConfig
    world: World


PlaceFn = Callable[[TaskSpec, RuleSet, World], Decision]
PoolOverlay = Callable[[tuple[PoolState, ...], float], tuple[PoolState, ...]]
BudgetsObserver = Callable[[str, Mapping[str, Budget]], None]


class Placer(Protocol):
    def world(self, now: float) -> WorldSnapshot: ...
    def decide(
        self, task: types_pb2.Task, now: float, snapshot: WorldSnapshot | None = None, spec: TaskSpec | None = None
    ) -> PlacementResult: ...


@dataclass(frozen=True)
class PlacementResult:
    outcome: str  # dispatch | queue | reject
    pool: str
    rule: str
    reason: str
    summary: dict[str, Any]
    proto: types_pb2.PlacementDecision
    pool_trust_zone: str  # of the chosen pool as capacity saw it; "" when none chosen
    project_locked: bool
    decision: Decision
    pool_state: PoolState | None = None  # the chosen pool as placement saw it (price, provider)


class LivePlacement:
    def __init__(
        self,
        rules: RulesSource,
        capacity: CapacitySource,
        spent_for: Callable[[str], float] | None = None,
        place_fn: PlaceFn | None = None,
        pool_overlay: PoolOverlay | None = None,
        on_budgets: BudgetsObserver | None = None,
    ) -> None:
        self._place: PlaceFn = place_fn or place
        self._rules = rules
        self._capacity = capacity
        self._spent_for = spent_for
        self._pool_overlay = pool_overlay
        self._on_budgets = on_budgets
        self._budgets_seen: str | None = None

    def locks(self) -> Mapping[str, str]:
        return dict(self._rules.current().locks or {})

    def world(self, now: float) -> WorldSnapshot:
        active = self._rules.current()
        snapshot = self._capacity.snapshot(now)
        budgets: dict[str, Budget] = dict(active.budgets or {})
        version = active.version
        if self._on_budgets is not None and version != self._budgets_seen:
            self._on_budgets(version, budgets)
            self._budgets_seen = version
        if self._spent_for is not None:
            budgets = {name: replace(b, spent_usd=self._spent_for(name)) for name, b in budgets.items()}
        notes = tuple(snapshot.notes) + tuple(f"rules: {error}" for error in (active.errors or ()))
        pools = tuple(snapshot.pools)
        if self._pool_overlay is not None:
            pools = self._pool_overlay(pools, now)
        world = World(pools=pools, budgets=budgets, locks=dict(active.locks or {}), notes=notes)
        return WorldSnapshot(active, world)

    def decide(
        self, task: types_pb2.Task, now: float, snapshot: WorldSnapshot | None = None, spec: TaskSpec | None = None
    ) -> PlacementResult:
        """Place `task` against `snapshot` (from `world(now)`, shared by a dispatch pass) or a fresh
        one; `spec`: the task's `task_spec_from_proto`, when the caller has it already."""
        active, world = snapshot or self.world(now)
        decision = self._place(spec or task_spec_from_proto(task), active.ruleset, world)
        chosen = next((pool for pool in world.pools if pool.name == decision.pool), None) if decision.pool else None
        return PlacementResult(
            outcome=decision.outcome,
            pool=decision.pool or "",
            rule=decision.rule or "",
            reason=decision.reason,
            summary=decision.to_dict(),
            proto=decision_to_proto(decision),
            pool_trust_zone=chosen.trust_zone if chosen is not None else "",
            project_locked=task.project in world.locks,
            decision=decision,
            pool_state=chosen,
        )


def residency_violation(task: types_pb2.Task, pool: PoolState | None, trust_zone: str, locked: bool) -> str:
    """The invariant, checked again right before the RPC: "" when fine, else why not."""
    zone = pool.trust_zone if pool is not None else trust_zone
    sensitivity = sensitivity_from_proto(task.sensitivity)
    if residency_allows(zone, sensitivity, locked):
        return ""
    what = "private task" if sensitivity == PRIVATE else "task of a locked project"
    return f"{what} {task.id} placed on pool with trust_zone {zone or 'unknown'!r}; only {PRIVATE_ZONE!r} is allowed"
