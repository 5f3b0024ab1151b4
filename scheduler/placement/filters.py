"""Feasibility filters, applied to every candidate pool in a fixed order; the first failure drops it.

Each filter is `(ctx, pool, estimate) -> None | detail`, where detail names the compared values
("price 1.40 > max 1.20"). Filters that need no estimate run first (`STATIC_FILTERS`, in order),
then the engine computes the pool's estimate, then `ESTIMATE_FILTERS`. `PERMANENT_FILTERS` are the
ones no change in load, price or time can lift: a task failing them everywhere is rejected.
"""

from __future__ import annotations

from collections.abc import Callable

from facefleet.domain import INTERNAL, PRIVATE_ZONE, residency_allows
from facefleet.scheduler.placement.model import Budget, Estimate, PoolState, TaskSpec, World
from facefleet.scheduler.placement.policy import CompiledRule


class FilterContext:
    """Everything the filters need about one decision, computed once."""

    __slots__ = ("_onprem_busy", "budget", "compiled", "lock_reason", "rule", "task", "world")

    def __init__(self, task: TaskSpec, compiled: CompiledRule, world: World) -> None:
        self.task = task
        self.compiled = compiled
        self.rule = compiled.rule
        self.world = world
        self.lock_reason = world.locks.get(task.project)
        self.budget: Budget | None = world.budgets.get(self.rule.budget) if self.rule.budget else None
        self._onprem_busy: tuple[bool, str] | None = None

    def onprem_busy(self) -> tuple[bool, str]:
        """(busy, explanation) for the rule's burst_when, over healthy private pools the rule allows."""
        if self._onprem_busy is None:
            burst = self.rule.burst_when
            assert burst is not None
            waits: list[float] = []
            free = 0
            for pool in self.world.pools:
                if (
                    pool.trust_zone == PRIVATE_ZONE
                    and pool.healthy
                    and self.compiled.allow_position(pool.name) >= 0
                    and not self.compiled.denied(pool.name)
                ):
                    waits.append(pool.queue_wait_s)
                    free += pool.free_slots
            min_wait = min(waits) if waits else float("inf")
            parts: list[str] = []
            busy = not waits
            if burst.onprem_queue_wait_s_gt is not None:
                over = min_wait > burst.onprem_queue_wait_s_gt
                busy = busy or over
                parts.append(
                    f"on-prem queue_wait {min_wait:g} s {'>' if over else '<='} {burst.onprem_queue_wait_s_gt:g} s"
                )
            if burst.onprem_free_slots_lt is not None:
                under = free < burst.onprem_free_slots_lt
                busy = busy or under
                parts.append(f"on-prem free_slots {free} {'<' if under else '>='} {burst.onprem_free_slots_lt}")
            if not waits:
                parts.append("no healthy on-prem pool allowed by the rule")
            self._onprem_busy = (busy, "; ".join(parts))
        return self._onprem_busy


Filter = Callable[[FilterContext, PoolState, Estimate | None], str | None]


def residency(ctx: FilterContext, pool: PoolState, _est: Estimate | None) -> str | None:
    sensitivity = ctx.task.sensitivity
    if not residency_allows(pool.trust_zone, sensitivity, project_locked=False):
        return f"sensitivity {sensitivity} requires trust_zone private; pool trust_zone is {pool.trust_zone}"
    if sensitivity == INTERNAL and pool.trust_zone != PRIVATE_ZONE and not ctx.rule.allow_cloud_internal:
        return (
            f"sensitivity internal may leave trust_zone private only when the rule sets "
            f"allow_cloud_internal: true (rule {ctx.rule.id} does not); pool trust_zone is {pool.trust_zone}"
        )
    return None


def lock(ctx: FilterContext, pool: PoolState, _est: Estimate | None) -> str | None:
    if ctx.lock_reason is not None and not residency_allows(pool.trust_zone, ctx.task.sensitivity, project_locked=True):
        return (
            f"project {ctx.task.project} is under a compliance lock ({ctx.lock_reason}); "
            f"pool trust_zone is {pool.trust_zone}, must be private"
        )
    return None


def rule_allow(ctx: FilterContext, pool: PoolState, _est: Estimate | None) -> str | None:
    if ctx.compiled.allow_position(pool.name) < 0:
        return f"pool name matches no allow glob {list(ctx.rule.allow)}"
    if ctx.compiled.denied(pool.name):
        return f"pool name matches a deny glob {list(ctx.rule.deny)}"
    if ctx.rule.trust_zones and pool.trust_zone not in ctx.rule.trust_zones:
        return f"trust_zone {pool.trust_zone} not in rule trust_zones {list(ctx.rule.trust_zones)}"
    return None


def health(_ctx: FilterContext, pool: PoolState, _est: Estimate | None) -> str | None:
    return None if pool.healthy else "pool is unhealthy (no live agents or failing health checks)"


def capacity(_ctx: FilterContext, pool: PoolState, _est: Estimate | None) -> str | None:
    if pool.free_slots > 0 or pool.can_provision > 0:
        return None
    return "free_slots 0 and can_provision 0"


def spot_price(ctx: FilterContext, pool: PoolState, _est: Estimate | None) -> str | None:
    limit = ctx.rule.max_spot_price_per_hour
    if limit is None or not pool.spot:
        return None
    if pool.price_stale:
        return f"spot price feed is stale; cannot confirm price <= max {limit:.2f}/h"
    if pool.price_per_hour > limit:
        return f"spot price {pool.price_per_hour:.2f}/h > max {limit:.2f}/h"
    return None


def budget(ctx: FilterContext, _pool: PoolState, est: Estimate | None) -> str | None:
    assert est is not None
    if est.reserve_usd <= 0:
        return None
    name = ctx.rule.budget
    if name is None:
        return f"reservation ${est.reserve_usd:.6f} but rule {ctx.rule.id} names no budget account"
    account = ctx.budget
    if account is None:
        return f"budget account {name} is not defined (add it to budgets)"
    remaining = account.remaining_usd
    if est.reserve_usd > remaining:
        return f"reservation ${est.reserve_usd:.6f} (run bound) > remaining ${remaining:.4f} of budget {name}"
    return None


def sla(ctx: FilterContext, pool: PoolState, est: Estimate | None) -> str | None:
    assert est is not None
    limit = ctx.task.sla_seconds
    if limit <= 0 or est.completion_s <= limit:
        return None
    provision = pool.provision_s if pool.free_slots <= 0 else 0.0
    run = ctx.task.frames * pool.sec_per_frame
    return (
        f"wait {pool.queue_wait_s:g} + provision {provision:g} + run {run:g} = {est.completion_s:g} s > sla {limit:g} s"
    )


def burst_when(ctx: FilterContext, pool: PoolState, _est: Estimate | None) -> str | None:
    if ctx.rule.burst_when is None or pool.trust_zone == PRIVATE_ZONE:
        return None
    busy, why = ctx.onprem_busy()
    return None if busy else f"on-prem not busy enough to burst: {why}"


STATIC_FILTERS: tuple[tuple[str, Filter], ...] = (
    ("residency", residency),
    ("lock", lock),
    ("rule_allow", rule_allow),
    ("health", health),
    ("capacity", capacity),
    ("spot_price", spot_price),
)
ESTIMATE_FILTERS: tuple[tuple[str, Filter], ...] = (
    ("budget", budget),
    ("sla", sla),
    ("burst_when", burst_when),
)
FILTER_ORDER: tuple[str, ...] = tuple(name for name, _ in STATIC_FILTERS + ESTIMATE_FILTERS)
PERMANENT_FILTERS = frozenset({"residency", "lock", "rule_allow"})


def estimate(task: TaskSpec, pool: PoolState) -> Estimate:
    """Cost and completion time on `pool`: wait + provision (when no free slot) + frames x sec_per_frame;
    on a paid pool also the run bound: what the budget reserves and the limit the agent enforces."""
    run_s = task.frames * pool.sec_per_frame
    provision_s = pool.provision_s if pool.free_slots <= 0 else 0.0
    price_per_s = pool.price_per_hour / 3600.0
    max_run_s = run_bound_s(task, pool) if price_per_s > 0 else 0.0
    return Estimate(
        cost_usd=price_per_s * (run_s + provision_s),
        completion_s=pool.queue_wait_s + provision_s + run_s,
        reserve_usd=price_per_s * (provision_s + max_run_s + pool.run_slack_s) if price_per_s > 0 else 0.0,
        max_run_s=max_run_s,
    )


def run_bound_s(task: TaskSpec, pool: PoolState) -> float:
    """The run bound: the hard limit (seconds from the agent's start) of a run of `task` on `pool`.

    `run_margin` x the estimated run time (frames x the pool's sec_per_frame, which the live
    scheduler raises to the p95 of billed seconds per frame, scheduler.run_estimates), capped by the
    task's SLA (a run past its SLA is not worth paying for) but never below the estimated run time.
    The reservation is price x (provision + this bound + `run_slack_s`), the slack covering what the
    agent's clock does not see (dispatch before the agent starts, the stop and its report after)."""
    run_s = task.frames * pool.sec_per_frame
    bound = run_s * pool.run_margin
    if task.sla_seconds > 0:
        bound = max(run_s, min(bound, task.sla_seconds))
    return bound
