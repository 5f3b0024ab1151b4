"""Discrete-event simulation of placement over a workload, with an injected clock (Armada-style).

Every scheduling pass is `scheduler.pass_planner.plan_pass`, the planner the live dispatcher runs
(queue order with aging, project limits, the waits-for-a-slot memo, misses in a row, the budget
gate's reservations, slot accounting; the same `PassRules`), over world snapshots built from the
simulator's own state (free slots, in-flight work, provisioned instances, spend, spot price traces),
placing with the pure `place()`. The plan is applied as planned: the simulator has none of the live
side's I/O races (an agent slot gone, the ledger refusing). Like live, a paid pool's estimates (and
so its run bound and reservations) use `max(configured, learned)` seconds per frame, learned by
`scheduler.run_estimates.LearnedRunTimes` from the simulated completions in order (seeded from the
workload's `run_time_samples`), and a run holds its slot and is billed from its reservation to its
end: frames x sec_per_frame + the pool's `run_turnaround_s` (dispatch and report latency, which
`facefleet budget history` derives from the ledger). Every `spend_step_s` of its own (from its
reservation) an open paid run's reservation grows as the live spend enforcer grows it
(scheduler.spend_enforcement: keep the run's limit ahead of it, under the cap). A run's end frees
its slot and settles its budget attempt together, as live. What it does not model: run times that vary, spend
enforcement stops and failures; passes run at events (arrivals, finishes, price changes),
live ones continuously. bench/replay_accuracy.py measures how close a replay of a live run comes
(docs/finance.md). Deterministic for a given workload seed.

Workload YAML:
    duration_s: 3600          # arrivals stop here; the run continues until the queue drains
    seed: 7
    streams:                  # Poisson arrivals
      - {project: promo-x, sensitivity: public, priority: urgent, per_hour: 40,
         frames: [200, 3000], sla_seconds: 900}
    tasks:                    # and/or explicit arrivals
      - {at: 10, project: med, sensitivity: private, priority: high, frames: 100}
    price_traces: {aws-use1-g5: [[0, 0.42], [1200, 1.10]]}
    project_limits: {"*": 8}  # optional: tasks of a project in flight at once, as [scheduler] project_limits
    run_turnaround_s: {aws-use1-g5: 0.4}    # optional: seconds a run holds its slot and bills beyond its frames
    run_time_samples: {aws-use1-g5: [0.61]} # optional: billed s/frame of earlier runs (the learned estimate's start)
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from facefleet.domain import PRIORITIES, PRIVATE_ZONE, residency_allows
from facefleet.money import SECONDS, SWEEP_POINTS_MAX, USD, USD_PER_HOUR, AmountError, Quantity
from facefleet.scheduler.cloud.budget_gate import raised_limit_s
from facefleet.scheduler.dispatcher import DispatcherSettings
from facefleet.scheduler.pass_planner import (
    Action,
    PassRules,
    PassWorld,
    Planned,
    PurePlacement,
    Waiting,
    plan_pass,
    pure_placement,
    queue_order,
)
from facefleet.scheduler.placement.model import Budget, PoolState, RuleSet, TaskSpec, World
from facefleet.scheduler.placement.policy import RuleIndex
from facefleet.scheduler.queue import DEFAULT_AGING_S
from facefleet.scheduler.run_estimates import LearnedRunTimes, billed_sec_per_frame
from facefleet.scheduler.spend_enforcement import extension_tries_usd, limit_shortfall_usd, run_ahead_s

SWEPT = {"max_spot_price_per_hour": USD_PER_HOUR, "monthly_cap_usd": USD, "onprem_queue_wait_s_gt": SECONDS}
SWEEPABLE = tuple(SWEPT)
ARRIVALS_PER_HOUR = Quantity("tasks/h", 1e6)
MAX_ARRIVALS = 1_000_000  # per stream
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES, start=1)}  # scheduler.queue's integers
DRAIN_FACTOR = 20  # stop draining after duration x this, reporting what is left as unfinished
# Live, a run's ending frees its slot and settles its budget attempt together (the dispatcher
# settles before it frees the slot, then passes), but the project counts drop when the completion
# batcher commits, after its linger; under project limits that commit wakes a pass.
COMPLETION_LAG_S = DispatcherSettings.completion_linger_limited_s


class SimClock:
    """The simulator's only notion of time; advanced by the event loop, never by the wall clock."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def advance_to(self, t: float) -> None:
        if t < self.now:
            raise ValueError(f"clock cannot go back from {self.now} to {t}")
        self.now = t


@dataclass
class Arrival:
    at: float
    task: TaskSpec


@dataclass
class SimReport:
    tasks: int = 0
    dispatched: int = 0
    rejected: int = 0
    unfinished: int = 0
    per_pool: dict[str, int] = field(default_factory=dict)
    cloud_cost_usd: float = 0.0
    spend_by_budget: dict[str, float] = field(default_factory=dict)
    sla_misses: int = 0
    residency_violations: int = 0
    completion_mean_s: float = 0.0
    completion_p95_s: float = 0.0
    end_time_s: float = 0.0
    assignments: dict[str, str] = field(default_factory=dict)  # task id -> pool it was dispatched to
    reserved_usd: dict[str, float] = field(default_factory=dict)  # task id -> the budget gate's reservation
    dispatched_at: dict[str, float] = field(default_factory=dict)  # task id -> simulated time of its launch

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "dispatched": self.dispatched,
            "rejected": self.rejected,
            "unfinished": self.unfinished,
            "per_pool": dict(sorted(self.per_pool.items())),
            "cloud_cost_usd": round(self.cloud_cost_usd, 4),
            "spend_by_budget": {k: round(v, 4) for k, v in sorted(self.spend_by_budget.items())},
            "sla_misses": self.sla_misses,
            "residency_violations": self.residency_violations,
            "completion_mean_s": round(self.completion_mean_s, 2),
            "completion_p95_s": round(self.completion_p95_s, 2),
            "end_time_s": round(self.end_time_s, 2),
        }


class WorkloadError(ValueError):
    """The workload document is malformed; the message names the field."""


def generate_arrivals(workload: Mapping[str, Any]) -> list[Arrival]:
    if not isinstance(workload, Mapping):
        raise WorkloadError("workload: expected a mapping with duration_s and streams and/or tasks")
    rng = random.Random(workload.get("seed", 0))
    duration = _checked(SECONDS, workload.get("duration_s", 3600), "workload.duration_s")
    arrivals: list[Arrival] = []
    counter = itertools.count(1)
    for i, stream in enumerate(workload.get("streams") or []):
        where = f"workload.streams[{i}]"
        try:
            per_hour = ARRIVALS_PER_HOUR.check(stream["per_hour"], f"{where}.per_hour")
            low, high = (stream.get("frames") or [1, 1])[:2]
            template = {k: stream[k] for k in ("project", "sensitivity", "priority", "sla_seconds") if k in stream}
            TaskSpec.from_dict({**template, "frames": low}, where=where)
            TaskSpec.from_dict({**template, "frames": high}, where=where)
            if per_hour * duration / 3600.0 > MAX_ARRIVALS:
                raise ValueError(f"about {per_hour * duration / 3600.0:.0f} arrivals; the limit is {MAX_ARRIVALS}")
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkloadError(
                f"{where}: {exc} (need project, sensitivity, priority, per_hour, frames: [min, max])"
            ) from None
        t = 0.0
        while per_hour > 0:
            t += rng.expovariate(per_hour / 3600.0)
            if t >= duration:
                break
            frames = rng.randint(int(low), int(high))
            task = TaskSpec.from_dict({**template, "id": f"t{next(counter)}", "frames": frames}, where=where)
            arrivals.append(Arrival(t, task))
    for i, raw in enumerate(workload.get("tasks") or []):
        where = f"workload.tasks[{i}]"
        if not isinstance(raw, Mapping) or "at" not in raw:
            raise WorkloadError(f"{where}: expected a mapping with at and the task fields")
        data = {k: v for k, v in raw.items() if k != "at"}
        data.setdefault("id", f"t{next(counter)}")
        try:
            arrival = Arrival(SECONDS.check(raw["at"], f"{where}.at"), TaskSpec.from_dict(data, where=where))
        except ValueError as exc:
            raise WorkloadError(str(exc)) from None
        arrivals.append(arrival)
    arrivals.sort(key=lambda a: a.at)
    return arrivals


def _checked(quantity: Quantity, value: Any, where: str) -> float:
    try:
        return quantity.check(value, where)
    except AmountError as exc:
        raise WorkloadError(str(exc)) from None


def _price_points(pool: str, trace: Any) -> list[tuple[float, float]]:
    """`[[at, usd_per_hour], ...]` of one pool, each value checked."""
    where = f"workload.price_traces.{pool}"
    if not isinstance(trace, list):
        raise WorkloadError(f"{where}: expected a list of [at_seconds, usd_per_hour] pairs")
    points = []
    for i, point in enumerate(trace):
        if not isinstance(point, list | tuple) or len(point) != 2:
            raise WorkloadError(f"{where}[{i}]: expected [at_seconds, usd_per_hour], got {point!r}")
        at = _checked(SECONDS, point[0], f"{where}[{i}][0]")
        points.append((at, _checked(USD_PER_HOUR, point[1], f"{where}[{i}][1]")))
    return points


def _per_pool(workload: Mapping[str, Any], key: str, pools: Mapping[str, Any]) -> dict[str, Any]:
    raw = workload.get(key) or {}
    if not isinstance(raw, Mapping):
        raise WorkloadError(f"workload.{key}: expected a mapping of pool name to values")
    unknown = sorted(set(map(str, raw)) - set(pools))
    if unknown:
        raise WorkloadError(f"workload.{key}: no pool named {unknown[0]!r} in the world")
    return {str(name): value for name, value in raw.items()}


def _turnarounds(workload: Mapping[str, Any], pools: Mapping[str, Any]) -> dict[str, float]:
    raw = _per_pool(workload, "run_turnaround_s", pools)
    return {name: _checked(SECONDS, value, f"workload.run_turnaround_s.{name}") for name, value in raw.items()}


def _learned_run_times(workload: Mapping[str, Any], pools: Mapping[str, Any]) -> LearnedRunTimes:
    learned = LearnedRunTimes()
    for name, samples in _per_pool(workload, "run_time_samples", pools).items():
        where = f"workload.run_time_samples.{name}"
        if not isinstance(samples, list):
            raise WorkloadError(f"{where}: expected a list of billed seconds per frame")
        for i, sample in enumerate(samples):
            learned.add(name, _checked(SECONDS, sample, f"{where}[{i}]"))
    return learned


@dataclass
class _PaidRun:
    """A run on a paid pool from its reservation to its end (the live budget gate's attempt)."""

    budget: str
    pool: str
    frames: int
    sec_per_frame: float
    price: float
    admitted_at: float
    billed_s: float
    reserved_usd: float
    max_run_s: float

    @property
    def cost_usd(self) -> float:
        return self.price * self.billed_s / 3600.0


@dataclass
class _PoolSim:
    base: PoolState
    price: float
    running_ends: list[float] = field(default_factory=list)  # heap of finish times on base slots
    provisioned: int = 0

    def free_slots(self) -> int:
        return self.base.free_slots - len(self.running_ends)


def simulate(
    ruleset: RuleSet,
    world: World,
    workload: Mapping[str, Any],
    clock: SimClock | None = None,
    aging_s: float = DEFAULT_AGING_S,
    rules: PassRules | None = None,
    spend_step_s: float | None = 0.5,
    limit_lead_s: float = 2.0,
    completion_lag_s: float = COMPLETION_LAG_S,
) -> SimReport:
    """Replay `workload`: every pass is `scheduler.pass_planner.plan_pass`, as in the live dispatcher.
    `spend_step_s` / `limit_lead_s`: the live spend enforcer's step (`[cloud] spend_accrual_s`) and
    lead (the agents' heartbeat interval); None: spend enforcement off (`[cloud] spend_enforcement`).
    A run's end frees its slot and settles its paid run at once; under project limits, its project's
    count drops `completion_lag_s` later (the completion's commit), with a pass; see `COMPLETION_LAG_S`."""
    clock = clock or SimClock()
    arrivals = generate_arrivals(workload)
    pools = {p.name: _PoolSim(p, p.price_per_hour) for p in world.pools}
    spent: dict[str, float] = {n: b.spent_usd for n, b in world.budgets.items()}
    events: list[tuple[float, int, str, Any]] = []
    seq = itertools.count()
    for a in arrivals:
        heapq.heappush(events, (a.at, next(seq), "arrive", a))
    for name, trace in (workload.get("price_traces") or {}).items():
        if name not in pools:
            raise WorkloadError(f"workload.price_traces: no pool named {name!r} in the world")
        for at, price in _price_points(name, trace):
            heapq.heappush(events, (at, next(seq), "price", (name, price)))
    report = SimReport(tasks=len(arrivals))
    queue: list[Arrival] = []
    completions: list[float] = []
    per_pool: Counter[str] = Counter()
    spend_by_budget: defaultdict[str, float] = defaultdict(float)
    running_by_project: Counter[str] = Counter()
    paid: dict[str, _PaidRun] = {}  # task id -> its open paid run, until it finishes
    limits = _project_limits(workload.get("project_limits") or {})
    turnaround = _turnarounds(workload, pools)
    learned = _learned_run_times(workload, pools)
    horizon = float(workload.get("duration_s", 3600)) * DRAIN_FACTOR

    def snapshot() -> World:
        now = clock.now
        snaps = []
        for sim in pools.values():
            free = sim.free_slots()
            wait = 0.0 if free > 0 or not sim.running_ends else max(0.0, sim.running_ends[0] - now)
            snaps.append(
                replace(
                    sim.base,
                    free_slots=max(0, free),
                    queue_wait_s=wait,
                    price_per_hour=sim.price,
                    can_provision=max(0, sim.base.can_provision - sim.provisioned),
                )
            )
        budgets = {n: replace(b, spent_usd=spent[n]) for n, b in world.budgets.items()}
        return World(learned.overlay(tuple(snaps)), budgets, world.locks, world.notes)

    def settle(task: TaskSpec) -> None:
        """The run ended: a paid run settles and teaches the estimate (the budget gate's `on_run_ended`)."""
        run = paid.pop(task.id, None)
        if run is not None:
            spent[run.budget] += run.cost_usd - run.reserved_usd
            report.reserved_usd[task.id] = run.reserved_usd
            sample = billed_sec_per_frame(run.billed_s, run.frames)
            if sample is not None:
                learned.add(run.pool, sample)

    def next_check(task_id: str, run: _PaidRun, step_s: float) -> None:
        """Schedule the first enforcement step (live, each run's own: admitted + k x `step_s`) at
        which the run could need more room: none while elapsed + two steps + the lead is within its limit."""
        earliest = max(clock.now + 1e-9, run.admitted_at + run.max_run_s - limit_lead_s - 2 * step_s)
        at = run.admitted_at + max(1, math.ceil((earliest - run.admitted_at) / step_s - 1e-9)) * step_s
        if run.max_run_s > 0 and at < run.admitted_at + run.billed_s:
            heapq.heappush(events, (at, next(seq), "enforce", task_id))

    def enforce(task_id: str, step_s: float) -> None:
        """One live enforcement step for one run: keep its limit ahead of it, under the cap."""
        run = paid.get(task_id)
        if run is None:
            return
        elapsed = clock.now - run.admitted_at
        progress = (min(run.frames, math.floor(elapsed / run.sec_per_frame)), run.frames)
        ahead = run_ahead_s(step_s, elapsed, progress)
        short = limit_shortfall_usd(run.max_run_s, run.price, elapsed, ahead, limit_lead_s)
        if short > 0:
            cap = world.budgets[run.budget].monthly_cap_usd
            for usd in extension_tries_usd(short, step_s, run.price):
                if spent[run.budget] + usd <= cap:
                    spent[run.budget] += usd
                    run.reserved_usd += usd
                    run.max_run_s = raised_limit_s(run.max_run_s, usd, run.price)
                    break
        next_check(task_id, run, step_s)

    def schedule() -> None:
        if not queue:
            return
        by_id = {arrival.task.id: arrival for arrival in queue}
        waiting = [Waiting(a.task, PRIORITY_RANK[a.task.priority], a.at) for a in queue]
        state = PassWorld(snapshot(), limits, dict(running_by_project))
        for planned in plan_snapshot(ruleset, state, waiting, aging_s, rules):
            if planned.action is Action.REJECT:
                report.rejected += 1
                del by_id[planned.waiting.task.id]
                continue
            if not planned.launch:
                continue
            decision = planned.decision
            assert decision.pool is not None and decision.estimate is not None
            arrival = by_id.pop(planned.waiting.task.id)
            sim = pools[decision.pool]
            task = arrival.task
            running_by_project[task.project] += 1
            report.assignments[task.id] = decision.pool
            report.dispatched_at[task.id] = clock.now
            if not residency_allows(sim.base.trust_zone, task.sensitivity, task.project in world.locks):
                report.residency_violations += 1
            # Reserved now, billed (like the live budget gate) from now to the run's end.
            billed_s = task.frames * sim.base.sec_per_frame + turnaround.get(decision.pool, 0.0)
            frame_s = sim.base.sec_per_frame
            provisioned = planned.provision
            if provisioned:  # starts when its instance is up
                sim.provisioned += 1
                billed_s += sim.base.provision_s
                end = clock.now + billed_s
            else:
                end = clock.now + billed_s
                heapq.heappush(sim.running_ends, end)
            cost = sim.price * billed_s / 3600.0
            heapq.heappush(events, (end, next(seq), "finish", (decision.pool, arrival, provisioned)))
            if decision.budget and cost > 0:  # reserved now (the budget gate), settled at the finish
                spent[decision.budget] = spent.get(decision.budget, 0.0) + planned.reserved_usd
                paid[task.id] = _PaidRun(
                    decision.budget, decision.pool, task.frames, frame_s, sim.price, clock.now, billed_s,
                    planned.reserved_usd, decision.estimate.max_run_s,
                )  # fmt: skip
                report.reserved_usd[task.id] = planned.reserved_usd
                spend_by_budget[decision.budget] += cost
                if spend_step_s is not None:
                    next_check(task.id, paid[task.id], spend_step_s)
            if sim.base.trust_zone != PRIVATE_ZONE:
                report.cloud_cost_usd += cost
            per_pool[decision.pool] += 1
            report.dispatched += 1
        queue[:] = list(by_id.values())

    changed = False  # an event other than an enforcement step happened at this instant
    while events:
        t, _, kind, payload = heapq.heappop(events)
        if t > horizon:
            break
        clock.advance_to(t)
        if kind == "arrive":
            queue.append(payload)
        elif kind == "price":
            name, price = payload
            pools[name].price = price
        elif kind == "finish":
            name, arrival, provisioned = payload
            sim = pools[name]
            if provisioned:
                sim.provisioned -= 1
            else:
                heapq.heappop(sim.running_ends)
            settle(arrival.task)
            if limits and completion_lag_s > 0:  # the project's count drops when the completion commits
                heapq.heappush(events, (t + completion_lag_s, next(seq), "recorded", arrival.task.project))
            else:
                running_by_project[arrival.task.project] -= 1
            took = clock.now - arrival.at
            completions.append(took)
            if arrival.task.sla_seconds and took > arrival.task.sla_seconds:
                report.sla_misses += 1
        elif kind == "recorded":
            running_by_project[payload] -= 1
        elif kind == "enforce":
            assert spend_step_s is not None
            enforce(payload, spend_step_s)
        # An enforcement step only takes room: alone it starts no pass (a live pass sees it at its next).
        changed = changed or kind != "enforce"
        if events and events[0][0] == t:
            continue  # process every event at this instant before placing
        if changed:
            schedule()
        changed = False
    report.unfinished = len(queue) + (report.dispatched - len(completions))
    report.per_pool = dict(per_pool)
    report.spend_by_budget = dict(spend_by_budget)
    report.end_time_s = clock.now
    if completions:
        completions.sort()
        report.completion_mean_s = sum(completions) / len(completions)
        report.completion_p95_s = completions[min(len(completions) - 1, math.ceil(0.95 * len(completions)) - 1)]
    return report


def plan_snapshot(
    ruleset: RuleSet,
    state: PassWorld,
    waiting: list[Waiting],
    aging_s: float = DEFAULT_AGING_S,
    rules: PassRules | None = None,
) -> list[Planned[PurePlacement]]:
    """One simulated pass: the waiting tasks in queue order through `plan_pass`, placed by `place()`."""
    return plan_pass(queue_order(waiting, aging_s), pure_placement(ruleset), state, rules)


def _project_limits(raw: Any) -> dict[str, int]:
    if not isinstance(raw, Mapping) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw.values()
    ):
        raise WorkloadError("workload.project_limits: expected a mapping of project (or '*') to an integer >= 0")
    return {str(k): int(v) for k, v in raw.items()}


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    """`max_spot_price_per_hour=0.5:2.0:0.25` -> (name, [0.5, 0.75, ..., 2.0])."""
    try:
        name, values = spec.split("=", 1)
        start, stop, step = (float(v) for v in values.split(":"))
    except ValueError:
        raise WorkloadError(
            f"--sweep {spec!r}: expected NAME=START:STOP:STEP, e.g. max_spot_price_per_hour=0.5:2.0:0.25"
        ) from None
    base = name.split(".", 1)[0]
    if base not in SWEEPABLE:
        raise WorkloadError(
            f"--sweep {name!r}: choose one of {list(SWEEPABLE)} (monthly_cap_usd.<budget> for one budget)"
        )
    quantity = SWEPT[base]
    start, stop = (_checked(quantity, v, f"--sweep {name} {end}") for v, end in ((start, "START"), (stop, "STOP")))
    step = _checked(quantity, step, f"--sweep {name} STEP")
    if step <= 0 or stop < start:
        raise WorkloadError(f"--sweep {spec!r}: need STEP > 0 and STOP >= START")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > SWEEP_POINTS_MAX:
        raise WorkloadError(f"--sweep {spec!r}: {count} points; the limit is {SWEEP_POINTS_MAX} (use a larger STEP)")
    return name, [round(start + i * step, 10) for i in range(count)]


def with_override(ruleset: RuleSet, world: World, name: str, value: float) -> tuple[RuleSet, World]:
    """The rule set / world with one sweep parameter set to `value`."""
    base, _, target = name.partition(".")
    if base == "monthly_cap_usd":
        budgets: dict[str, Budget] = {
            n: replace(b, monthly_cap_usd=value) if not target or n == target else b for n, b in world.budgets.items()
        }
        if target and target not in budgets:
            raise WorkloadError(f"--sweep: no budget named {target!r}; known: {sorted(budgets)}")
        return ruleset, replace(world, budgets=budgets)
    rules = []
    for rule in ruleset.rules:
        if base == "max_spot_price_per_hour" and rule.max_spot_price_per_hour is not None:
            rule = replace(rule, max_spot_price_per_hour=value)
        elif (
            base == "onprem_queue_wait_s_gt" and rule.burst_when and rule.burst_when.onprem_queue_wait_s_gt is not None
        ):
            rule = replace(rule, burst_when=replace(rule.burst_when, onprem_queue_wait_s_gt=value))
        rules.append(rule)
    new_rules = tuple(rules)
    return RuleSet(new_rules, f"{ruleset.version}+{name}={value:g}", ruleset.source, RuleIndex(new_rules)), world


def sweep(
    ruleset: RuleSet, world: World, workload: Mapping[str, Any], name: str, values: list[float]
) -> list[tuple[float, SimReport]]:
    return [(v, simulate(*with_override(ruleset, world, name, v), workload)) for v in values]
