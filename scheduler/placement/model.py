"""Placement data types: tasks, pools, budgets, the world snapshot, rules and decisions.

Frozen dataclasses with slots: `place()` is a hot path, so no validation runs here; inputs are
validated once where they enter (policy loading, `World.from_dict`, the proto codec).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from facefleet.domain import DEFAULT_PRIORITY, DEFAULT_SENSITIVITY, PRIORITIES, SENSITIVITIES
from facefleet.money import PERCENT, RUN_MARGIN, SECONDS, USD, USD_PER_HOUR

PREFERENCES = ("cost", "latency", "order")

MAX_FRAMES = 10_000_000  # about four days of 30 fps video

Outcome = Literal["dispatch", "queue", "reject"]
OUTCOMES: tuple[Outcome, ...] = ("dispatch", "queue", "reject")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    id: str
    project: str
    sensitivity: str  # public | internal | private
    priority: str  # low | normal | high | urgent
    sla_seconds: float = 0  # 0 = no SLA
    frames: int = 1  # 1 for an image

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "task") -> TaskSpec:
        """Build a task from a YAML/JSON mapping; ValueError names the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping with id, project, sensitivity, priority")
        unknown = set(data) - {"id", "project", "sensitivity", "priority", "sla_seconds", "frames"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        sensitivity = str(data.get("sensitivity", DEFAULT_SENSITIVITY))
        priority = str(data.get("priority", DEFAULT_PRIORITY))
        if sensitivity not in SENSITIVITIES:
            raise ValueError(f"{where}.sensitivity: {sensitivity!r} is not one of {list(SENSITIVITIES)}")
        if priority not in PRIORITIES:
            raise ValueError(f"{where}.priority: {priority!r} is not one of {list(PRIORITIES)}")
        sla = SECONDS.check(data.get("sla_seconds", 0) or 0, f"{where}.sla_seconds")
        frames = data.get("frames", 1) or 1
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
            raise ValueError(f"{where}.frames: expected an integer in [1, {MAX_FRAMES}], got {frames!r}")
        return cls(
            id=str(data.get("id", "task")),
            project=str(data.get("project", "")),
            sensitivity=sensitivity,
            priority=priority,
            sla_seconds=sla,
            frames=frames,
        )


@dataclass(frozen=True, slots=True)
class PoolState:
    name: str
    provider: str
    trust_zone: str  # "private" (on-prem) or anything else (e.g. "cloud")
    region: str = ""
    gpu: str = ""
    free_slots: int = 0
    queue_wait_s: float = 0.0
    sec_per_frame: float = 0.05
    price_per_hour: float = 0.0
    spot: bool = False
    instance_type: str = ""
    can_provision: int = 0  # instances that could still be started
    slots_per_instance: int = 1  # slots each of them adds (live cloud pools; world files: always 1)
    provision_s: float = 0.0  # time for a new instance to become ready
    healthy: bool = True
    price_stale: bool = False
    # The run bound on a paid pool (filters.estimate): the agent stops a run at run_margin x its
    # estimated run time; the reservation adds run_slack_s for dispatch and stop latency.
    run_margin: float = 1.5
    run_slack_s: float = 2.0


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    monthly_cap_usd: float
    spent_usd: float = 0.0
    alert_pct: float = 80.0

    @property
    def remaining_usd(self) -> float:
        return self.monthly_cap_usd - self.spent_usd


# World files describe pools whose instances hold one task each (the simulator's model).
_POOL_FIELDS = {f for f in PoolState.__dataclass_fields__} - {"slots_per_instance"}  # type: ignore[attr-defined]


_POOL_QUANTITIES = {
    "queue_wait_s": (SECONDS, 0.0),
    "sec_per_frame": (SECONDS, 0.05),
    "price_per_hour": (USD_PER_HOUR, 0.0),
    "provision_s": (SECONDS, 0.0),
    "run_margin": (RUN_MARGIN, 1.5),
    "run_slack_s": (SECONDS, 2.0),
}


@dataclass(frozen=True, slots=True)
class World:
    """What placement sees at one instant (live: heartbeats, Prometheus, prices, ledger, locks)."""

    pools: tuple[PoolState, ...]
    budgets: Mapping[str, Budget]
    locks: Mapping[str, str]  # project -> reason
    notes: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "world") -> World:
        """Parse the snapshot shape documented in docs/policy.md; ValueError names the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping with pools, budgets, locks")
        unknown = set(data) - {"pools", "budgets", "locks", "notes"}
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {sorted(unknown)}; expected pools, budgets, locks, notes")
        pools: list[PoolState] = []
        for i, raw in enumerate(data.get("pools") or []):
            at = f"{where}.pools[{i}]"
            if not isinstance(raw, Mapping):
                raise ValueError(f"{at}: expected a mapping")
            bad = set(raw) - _POOL_FIELDS
            if bad:
                raise ValueError(f"{at}: unknown field(s) {sorted(bad)}; known: {sorted(_POOL_FIELDS)}")
            for required in ("name", "provider", "trust_zone"):
                if not raw.get(required):
                    raise ValueError(f"{at}.{required}: required")
            kwargs: dict[str, Any] = {"name": str(raw["name"]), "provider": str(raw["provider"])}
            kwargs["trust_zone"] = str(raw["trust_zone"])
            for key in ("region", "gpu", "instance_type"):
                kwargs[key] = str(raw.get(key, ""))
            for key in ("free_slots", "can_provision"):
                value = raw.get(key, 0)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{at}.{key}: expected an integer >= 0, got {value!r}")
                kwargs[key] = value
            for key, (quantity, default) in _POOL_QUANTITIES.items():
                kwargs[key] = quantity.check(raw.get(key, default), f"{at}.{key}")
            for key, flag_default in (("spot", False), ("healthy", True), ("price_stale", False)):
                flag = raw.get(key, flag_default)
                if not isinstance(flag, bool):
                    raise ValueError(f"{at}.{key}: expected true or false, got {flag!r}")
                kwargs[key] = flag
            pools.append(PoolState(**kwargs))
        names = [p.name for p in pools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{where}.pools: duplicate pool name(s) {duplicates}")
        budgets: dict[str, Budget] = {}
        for i, raw in enumerate(data.get("budgets") or []):
            at = f"{where}.budgets[{i}]"
            if not isinstance(raw, Mapping) or not raw.get("name"):
                raise ValueError(f"{at}: expected a mapping with name and monthly_cap_usd")
            budgets[str(raw["name"])] = Budget(
                name=str(raw["name"]),
                monthly_cap_usd=USD.check(raw.get("monthly_cap_usd"), f"{at}.monthly_cap_usd"),
                spent_usd=USD.check(raw.get("spent_usd", 0.0), f"{at}.spent_usd"),
                alert_pct=PERCENT.check(raw.get("alert_pct", 80.0), f"{at}.alert_pct"),
            )
        locks: dict[str, str] = {}
        for i, raw in enumerate(data.get("locks") or []):
            if not isinstance(raw, Mapping) or not raw.get("project"):
                raise ValueError(f"{where}.locks[{i}]: expected a mapping with project and reason")
            locks[str(raw["project"])] = str(raw.get("reason", ""))
        return cls(
            pools=tuple(pools),
            budgets=budgets,
            locks=locks,
            notes=tuple(str(n) for n in data.get("notes") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "pools": [{k: getattr(p, k) for k in PoolState.__dataclass_fields__} for p in self.pools],  # type: ignore[attr-defined]
            "budgets": [
                {
                    "name": b.name,
                    "monthly_cap_usd": b.monthly_cap_usd,
                    "spent_usd": b.spent_usd,
                    "alert_pct": b.alert_pct,
                }
                for b in self.budgets.values()
            ],
            "locks": [{"project": p, "reason": r} for p, r in self.locks.items()],
            "notes": list(self.notes),
        }


@dataclass(frozen=True, slots=True)
class BurstWhen:
    """Cloud pools are candidates only when on-prem is this busy (any condition set suffices)."""

    onprem_queue_wait_s_gt: float | None = None
    onprem_free_slots_lt: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    allow: tuple[str, ...]
    deny: tuple[str, ...] = ()
    match_sensitivity: tuple[str, ...] = ()  # empty = any
    match_priority: tuple[str, ...] = ()  # empty = any
    match_project: tuple[str, ...] = ()  # globs; empty = any
    prefer: str = "cost"
    weights: tuple[float, float, float] = (0.0, 0.0, 0.0)  # cost, latency, order; zeros = from prefer
    max_spot_price_per_hour: float | None = None
    burst_when: BurstWhen | None = None
    budget: str | None = None
    allow_cloud_internal: bool = False
    trust_zones: tuple[str, ...] = ()  # empty = any zone residency permits
    description: str = ""

    def matches(self, task: TaskSpec) -> bool:
        """Slow reference matcher (the engine uses the compiled index in RuleSet)."""
        from fnmatch import fnmatchcase

        return (
            (not self.match_sensitivity or task.sensitivity in self.match_sensitivity)
            and (not self.match_priority or task.priority in self.match_priority)
            and (not self.match_project or any(fnmatchcase(task.project, g) for g in self.match_project))
        )


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    version: str  # content hash of the canonical rule documents
    source: str = ""
    # Compiled lookup structures built by scheduler.placement.policy; not part of equality.
    index: Any = field(default=None, compare=False, repr=False)


class Estimate(NamedTuple):  # NamedTuple: built hundreds of times per decision, cheaply
    cost_usd: float  # expected: price x (provision + run time); what scoring compares
    completion_s: float
    reserve_usd: float = 0.0  # the upper bound the budget reserves (paid pools; filters.estimate)
    max_run_s: float = 0.0  # the hard run-time limit the agent enforces (0 = none: a free pool)

    def to_dict(self) -> dict[str, float]:
        out = {"cost_usd": round(self.cost_usd, 6), "completion_s": round(self.completion_s, 3)}
        if self.reserve_usd > 0:  # a paid pool: the bound the budget reserves and the agent enforces
            out["reserve_usd"] = round(self.reserve_usd, 6)
            out["max_run_s"] = round(self.max_run_s, 3)
        return out


class CandidateTrace(NamedTuple):  # NamedTuple: one per pool per decision
    pool: str
    feasible: bool
    failed_filter: str | None  # None when feasible
    detail: str  # compared values, e.g. "price 1.40 > max 1.20"
    score: float | None  # None when infeasible; higher is better
    estimate: Estimate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "feasible": self.feasible,
            "failed_filter": self.failed_filter,
            "detail": self.detail,
            "score": None if self.score is None else round(self.score, 6),
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    pool: str | None
    rule: str | None
    reason: str
    candidates: tuple[CandidateTrace, ...]
    estimate: Estimate | None
    notes: tuple[str, ...] = ()
    budget: str | None = None  # budget account charged (the rule's `budget`) when dispatched
    rules_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "pool": self.pool,
            "rule": self.rule,
            "reason": self.reason,
            "candidates": [c.to_dict() for c in self.candidates],
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "budget": self.budget,
            "rules_version": self.rules_version,
            "notes": list(self.notes),
        }


GLOB_CHARS = re.compile(r"[*?\[]")
