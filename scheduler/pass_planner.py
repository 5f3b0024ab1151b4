"""One dispatch pass over a world snapshot, without side effects: the live dispatcher and
`facefleet simulate` plan with this same code (as Armada runs its production scheduler inside its
simulator).

A pass takes the waiting tasks in queue order (priority with aging, `scheduler.queue`; the caller
supplies them in that order, lazily: the live side reads the store a page at a time, the simulator
sorts with `queue_order`) and, for each one:

1. admits it within its project's limit (`queue.admit`; admitted tasks count until the pass ends);
2. skips it when a task with the same placement inputs already waits for a slot in this pass
   (placement is pure and slots only shrink within a pass: it would wait too);
3. places it against the pass's World (the caller's placement function: live, the placer's decide
   with its explain trace, pool overlays and locks; simulate, the pure `place()`);
4. on a dispatch, applies the budget gate (on a paid pool the reservation is the run bound,
   `Estimate.reserve_usd`, and must fit under the cap) and takes a slot: a free one
   (`Planned.provision` false) or else a slot of an instance to provision from the pool's headroom
   (true; `slots_per_instance` tasks share one instance).

Later tasks of the pass see the slot taken, the budget charged and the project counted. The pass
ends when no slot is free or provisionable anywhere, after `PassRules.max_misses` tasks in a row
that did not launch, or after `PassRules.max_tasks` tasks.

`PassPlanner` yields the plan one entry at a time. Applying it is the caller's business: the
simulator launches each entry in its own world; the dispatcher reserves an agent, takes the ledger's
atomic reservation and launches. Only there, through I/O races, can the application deviate from
the plan (the agent registry has no slot left after all; the ledger refuses because spend moved
since the snapshot); the dispatcher then tells the planner (`not_launched`), and the rest of the
pass is planned against the corrected World.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from facefleet.scheduler import queue
from facefleet.scheduler.placement.engine import place
from facefleet.scheduler.placement.model import Decision, PoolState, RuleSet, TaskSpec, World

MAX_MISSES_PER_PASS = 16  # tasks in a row that did not launch before a pass ends
MAX_TASKS_PER_PASS = 256

# Filters whose failure does not change while a task waits: they only rule pools out.
_STANDING_FILTERS = frozenset({"residency", "lock", "rule_allow"})


@dataclass
class PassWorld:
    """The World as one pass changes it: slots taken, budgets charged, projects counted."""

    world: World
    limits: Mapping[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)  # project -> tasks placed/dispatched/running
    # pool -> untaken slots of the instance this pass last provisioned (slots_per_instance > 1); the
    # instance stays in `can_provision` until they are taken, so placement still sees the pool open.
    booting: dict[str, int] = field(default_factory=dict)

    def free_anywhere(self) -> int:
        """Slots free or provisionable across every pool."""
        return sum(pool.free_slots + pool.can_provision for pool in self.world.pools)

    def pool(self, name: str) -> PoolState | None:
        return next((pool for pool in self.world.pools if pool.name == name), None)

    def admit(self, project: str) -> bool:
        """One more task of `project` fits under its limit (and is counted)."""
        return queue.admit(project, self.in_flight, self.limits)

    def provisions(self, pool_name: str) -> bool:
        """A launch on `pool_name` now would need a new instance (no free slot, headroom left)."""
        pool = self.pool(pool_name)
        return pool is not None and pool.free_slots <= 0 and pool.can_provision > 0

    def take_slot(self, pool_name: str) -> None:
        """A launch on `pool_name`: a free slot, or else a slot of an instance to provision (of the
        one provisioned last while it has untaken slots, else of a new one from the headroom)."""
        pool = self.pool(pool_name)
        if pool is None:
            return
        if pool.free_slots > 0:
            self._replace_pool(pool_name, lambda p: replace(p, free_slots=p.free_slots - 1))
            return
        booting = self.booting.get(pool_name, 0) or max(1, pool.slots_per_instance)  # 0: a new instance
        self.booting[pool_name] = booting - 1
        if booting == 1:  # the instance's last slot: it leaves the headroom
            self._replace_pool(pool_name, lambda p: replace(p, can_provision=max(0, p.can_provision - 1)))

    def give_back_slot(self, pool_name: str) -> None:
        """A launch on a free slot that did not happen: the slot is free again."""
        self._replace_pool(pool_name, lambda p: replace(p, free_slots=p.free_slots + 1))

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
        """What the budget gate reserves for the launch: the run bound's cost on a paid pool, else 0."""
        pool = self.pool(decision.pool or "")
        if pool is None or pool.price_per_hour <= 0 or decision.estimate is None:
            return 0.0
        return max(0.0, decision.estimate.reserve_usd)

    def charge(self, budget: str | None, usd: float) -> None:
        """Count a reservation against `budget` for the rest of the pass (negative: give it back)."""
        account = self.world.budgets.get(budget or "")
        if account is not None and usd != 0:
            budgets = {**self.world.budgets, account.name: replace(account, spent_usd=account.spent_usd + usd)}
            self.world = replace(self.world, budgets=budgets)

    def _replace_pool(self, name: str, change: Callable[[PoolState], PoolState]) -> None:
        world = self.world  # built directly: `replace` costs as much as the rest of a launch's bookkeeping
        pools = tuple(change(pool) if pool.name == name else pool for pool in world.pools)
        self.world = World(pools, world.budgets, world.locks, world.notes)


@dataclass(frozen=True)
class Waiting:
    """A queued task as the planner sees it; `handle` is the caller's own (live: the stored record)."""

    task: TaskSpec
    priority: int  # scheduler.queue's integer priority (LOW=1 .. URGENT=4)
    submitted_at: float
    handle: Any = None


def queue_order(waiting: Iterable[Waiting], aging_s: float = queue.DEFAULT_AGING_S) -> list[Waiting]:
    """`waiting` in queue order: the store's `runnable` order (order key, then id), in memory."""
    return sorted(waiting, key=lambda w: (queue.order_key(w.priority, w.submitted_at, aging_s), w.task.id))


class Placed(Protocol):
    """What a placement function returns: at least the pure Decision (live: a PlacementResult)."""

    @property
    def decision(self) -> Decision: ...


P = TypeVar("P", bound=Placed)
PlaceFn = Callable[[Waiting, World], P]


@dataclass(frozen=True)
class PurePlacement:
    """`place()`'s Decision as a `Placed` (the simulator's placement)."""

    decision: Decision


def pure_placement(ruleset: RuleSet) -> Callable[[Waiting, World], PurePlacement]:
    """The simulator's placement function: `place()` over the pass's World."""
    return lambda waiting, world: PurePlacement(place(waiting.task, ruleset, world))


class Action(Enum):
    LAUNCH = "launch"  # dispatch now on `pool` (slot taken, reservation charged)
    KEEP = "keep"  # stays queued; the decision (and `refusal`, if the budget gate said no) is worth recording
    REJECT = "reject"  # no pool may ever run it: the task fails with the decision's reason
    NOTHING = "nothing"  # stays queued, nothing new to record (waits for a slot; skipped)


@dataclass(frozen=True)
class Planned(Generic[P]):
    waiting: Waiting
    action: Action
    placed: P | None  # None when the task was not placed (a task with the same inputs waits already)
    reserved_usd: float = 0.0
    refusal: str = ""  # the budget gate's reason when placement chose a pool but the gate said no
    provision: bool = False  # LAUNCH on an instance still to be provisioned (no free slot on the pool)

    @property
    def launch(self) -> bool:
        return self.action is Action.LAUNCH

    @property
    def decision(self) -> Decision:
        assert self.placed is not None, "this entry was not placed"
        return self.placed.decision

    @property
    def pool(self) -> str | None:
        return self.placed.decision.pool if self.launch and self.placed is not None else None


@dataclass(frozen=True)
class PassRules:
    """The pass's pure rules besides placement, identical live and simulated."""

    max_misses: int = MAX_MISSES_PER_PASS
    max_tasks: int = MAX_TASKS_PER_PASS
    # A new leader's capacity knows only agents that heartbeated since: a `reject` ("no known pool
    # may run this") is not final yet and the task is left alone. The simulator never warms up.
    warmup: bool = False


class PassPlanner(Generic[P]):
    """One pass's plan, produced lazily: iterate it for `Planned` entries in queue order.

    Each entry is planned against the World as the entries before it left it, so an application
    that deviates (`not_launched`) before asking for the next entry has the rest re-planned."""

    def __init__(self, waiting: Iterable[Waiting], place_fn: PlaceFn[P], state: PassWorld, rules: PassRules) -> None:
        self.state = state
        self.rules = rules
        self._waiting = waiting
        self._place = place_fn
        self._waits_for_a_slot: set[tuple[object, ...]] = set()  # placement inputs known to wait in this pass
        self._misses = 0
        self._misses_before_launch = 0
        self.cut_short = False  # the pass stopped at `max_tasks`: more of the queue may launch now

    def __iter__(self) -> Iterator[Planned[P]]:
        state, rules = self.state, self.rules
        waiting = iter(self._waiting)
        for _considered in range(rules.max_tasks):
            if self._misses >= rules.max_misses or state.free_anywhere() <= 0:
                return  # checked before reading on: the live side reads the queue lazily
            item = next(waiting, None)
            if item is None:
                return
            if not state.admit(item.task.project):
                continue  # over its project's limit: not a miss (the task could not have gone anywhere)
            planned = self._plan(item)
            if planned.launch:
                self._misses_before_launch, self._misses = self._misses, 0
            else:
                self._misses += 1
            yield planned
        else:
            self.cut_short = True  # considered `max_tasks` with slots still free

    def not_launched(self, planned: Planned[P], pool_full: bool = False) -> None:
        """The application could not launch `planned` (an I/O race): its reservation and slot go
        back (the slot stays taken when `pool_full`: no agent slot is left on the pool at all), and
        it counts as a miss. Call before asking for the next entry."""
        assert planned.launch and planned.placed is not None
        pool = planned.placed.decision.pool or ""
        self.state.charge(planned.placed.decision.budget, -planned.reserved_usd)
        if pool_full:
            self.state.fill(pool)
        elif not planned.provision:
            self.state.give_back_slot(pool)
        self._misses = self._misses_before_launch + 1

    def _plan(self, item: Waiting) -> Planned[P]:
        if self._waits_for_a_slot and placement_inputs(item.task) in self._waits_for_a_slot:
            return Planned(item, Action.NOTHING, None)
        placed = self._place(item, self.state.world)
        decision = placed.decision
        if decision.outcome == "reject":
            return Planned(item, Action.NOTHING if self.rules.warmup else Action.REJECT, placed)
        if decision.outcome != "dispatch" or decision.pool is None:
            if waits_for_a_slot_only(decision):
                self._waits_for_a_slot.add(placement_inputs(item.task))  # the same inputs wait the same
                return Planned(item, Action.NOTHING, placed)  # nothing to explain beyond "busy"
            return Planned(item, Action.KEEP, placed)
        refusal = self.state.budget_refusal(decision)
        if refusal:
            return Planned(item, Action.KEEP, placed, refusal=refusal)
        amount = self.state.reservation(decision)
        provision = self.state.provisions(decision.pool)
        self.state.charge(decision.budget, amount)
        self.state.take_slot(decision.pool)
        return Planned(item, Action.LAUNCH, placed, reserved_usd=amount, provision=provision)


def plan_pass(
    waiting: Iterable[Waiting], place_fn: PlaceFn[P], state: PassWorld, rules: PassRules | None = None
) -> list[Planned[P]]:
    """The whole plan of one pass as a list: the simulator's form (it applies every entry as
    planned, having no I/O races); the dispatcher iterates `PassPlanner` to feed races back."""
    return list(PassPlanner(waiting, place_fn, state, rules or PassRules()))


def placement_inputs(task: TaskSpec) -> tuple[object, ...]:
    """What placement reads of a task: every field but its id."""
    return (task.project, task.sensitivity, task.priority, task.sla_seconds, task.frames)


def waits_for_a_slot_only(decision: Decision) -> bool:
    """The task would run now but for a free slot: every pool the rule allows failed only the
    capacity filter. Recording (and auditing) such a decision for every task that waits behind a
    full pool cost more than the placement itself."""
    if decision.outcome != "queue":
        return False
    failed = {c.failed_filter for c in decision.candidates if not c.feasible}
    return "capacity" in failed and failed <= _STANDING_FILTERS | {"capacity"}
