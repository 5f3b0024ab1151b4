"""One dispatch pass over a world snapshot, without side effects: the live dispatcher and
`facefleet simulate` plan with this same code (as Armada runs its production scheduler inside its
simulator).

A pass walks the waiting tasks in queue order (priority with aging, `scheduler.queue`), admits
each within its project's limit, places it against the pass's World (the pure `place()`), and when
placement dispatches it to a pool, applies the budget gate (on a paid pool the reservation is the
estimate, and must fit under the cap) and takes a slot (a free one, else a provisionable
instance). Later tasks of the same pass see the slot taken, the budget spent
and the project count raised. `PassWorld` is that evolving state; `plan_pass` is the whole pass for
the simulator; the dispatcher drives `PassWorld` step by step because between the plan and its
launch it must also reserve an agent and the ledger (I/O the simulator does not have).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from facefleet.scheduler import queue
from facefleet.scheduler.placement.engine import place
from facefleet.scheduler.placement.model import Decision, PoolState, RuleSet, TaskSpec, World

PlaceFn = Callable[[TaskSpec, Any, World], Decision]


@dataclass
class PassWorld:
    """The World as one pass changes it: slots taken, budgets charged, projects counted."""

    world: World
    limits: Mapping[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)  # project -> tasks placed/dispatched/running

    def free_anywhere(self) -> int:
        """Slots free or provisionable across every pool."""
        return sum(pool.free_slots + pool.can_provision for pool in self.world.pools)

    def pool(self, name: str) -> PoolState | None:
        return next((pool for pool in self.world.pools if pool.name == name), None)

    def admit(self, project: str) -> bool:
        """One more task of `project` fits under its limit (and is counted)."""
        return queue.admit(project, self.in_flight, self.limits)

    def take_slot(self, pool_name: str) -> None:
        """A launch on `pool_name`: a free slot, or else one instance of its provisioning headroom."""
        self._replace_pool(
            pool_name,
            lambda p: (
                replace(p, free_slots=p.free_slots - 1)
                if p.free_slots > 0
                else replace(p, can_provision=max(0, p.can_provision - 1))
            ),
        )

    def fill(self, pool_name: str) -> None:
        """No agent slot is left on `pool_name` (the dispatcher found none to reserve)."""
        self._replace_pool(pool_name, lambda p: replace(p, free_slots=0))

    def budget_refusal(self, decision: Decision) -> str:
        """The budget gate: "" when the launch's reservation fits, else why not."""
        amount = self.reservation(decision)
        if amount <= 0:
            return ""
        account = self.world.budgets.get(decision.budget or "")
        if account is None:
            return f"budget account {decision.budget or '(none)'} is not in the rules store"
        if account.spent_usd + amount > account.monthly_cap_usd:
            return f"budget {account.name}: estimate ${amount:.4f} does not fit under the cap"
        return ""

    def reservation(self, decision: Decision) -> float:
        """What the budget gate reserves for the launch: the estimate on a paid pool, else 0."""
        pool = self.pool(decision.pool or "")
        if pool is None or pool.price_per_hour <= 0 or decision.estimate is None:
            return 0.0
        return max(0.0, decision.estimate.cost_usd)

    def charge(self, budget: str | None, usd: float) -> None:
        """Count a reservation against `budget` for the rest of the pass."""
        account = self.world.budgets.get(budget or "")
        if account is not None and usd > 0:
            budgets = {**self.world.budgets, account.name: replace(account, spent_usd=account.spent_usd + usd)}
            self.world = replace(self.world, budgets=budgets)

    def _replace_pool(self, name: str, change: Callable[[PoolState], PoolState]) -> None:
        pools = tuple(change(pool) if pool.name == name else pool for pool in self.world.pools)
        self.world = replace(self.world, pools=pools)


@dataclass(frozen=True)
class Waiting:
    """A queued task as the planner sees it."""

    task: TaskSpec
    priority: int  # scheduler.queue's integer priority (LOW=1 .. URGENT=4)
    submitted_at: float


@dataclass(frozen=True)
class Planned:
    waiting: Waiting
    decision: Decision
    launch: bool  # dispatch now (slot taken, reservation charged)
    reserved_usd: float = 0.0
    refusal: str = ""  # the budget gate's reason when placement chose a pool but the gate said no


def plan_pass(
    waiting: Iterable[Waiting],
    ruleset: RuleSet,
    state: PassWorld,
    aging_s: float = queue.DEFAULT_AGING_S,
    place_fn: PlaceFn = place,
) -> list[Planned]:
    """Plan one pass: every waiting task in queue order until no slot is left anywhere."""
    ordered = sorted(
        waiting, key=lambda w: (queue.order_key(w.priority, w.submitted_at, aging_s), w.submitted_at, w.task.id)
    )
    plan: list[Planned] = []
    for item in ordered:
        if state.free_anywhere() <= 0:
            break
        if not state.admit(item.task.project):
            continue
        decision = place_fn(item.task, ruleset, state.world)
        # (A task admitted but not launched still counts for its project until the pass ends, as live.)
        if decision.outcome != "dispatch" or decision.pool is None:
            plan.append(Planned(item, decision, launch=False))
            continue
        refusal = state.budget_refusal(decision)
        if refusal:
            plan.append(Planned(item, decision, launch=False, refusal=refusal))
            continue
        amount = state.reservation(decision)
        state.charge(decision.budget, amount)
        state.take_slot(decision.pool)
        plan.append(Planned(item, decision, launch=True, reserved_usd=amount))
    return plan
