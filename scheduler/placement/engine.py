"""`place(task, rules, world) -> Decision`: first matching rule, filters, scorers, select.

Pure: no I/O, no clock, no randomness; the same call gives the same decision live, in
`facefleet explain`, in policy tests and in the simulator.
"""

from __future__ import annotations

from collections import Counter

from facefleet.scheduler.placement.filters import (
    ESTIMATE_FILTERS,
    PERMANENT_FILTERS,
    STATIC_FILTERS,
    FilterContext,
    estimate,
)
from facefleet.scheduler.placement.model import CandidateTrace, Decision, Estimate, PoolState, RuleSet, TaskSpec, World
from facefleet.scheduler.placement.policy import RuleIndex
from facefleet.scheduler.placement.scorers import score_all


def _index_of(rules: RuleSet) -> RuleIndex:
    index = rules.index
    if index is None:  # a RuleSet built by hand rather than by load_ruleset
        index = RuleIndex(rules.rules)
        object.__setattr__(rules, "index", index)
    return index  # type: ignore[no-any-return]


def _summary(counts: Counter[str]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def place(task: TaskSpec, rules: RuleSet, world: World) -> Decision:
    compiled = _index_of(rules).first_match(task)
    if compiled is None:
        return Decision(
            outcome="reject",
            pool=None,
            rule=None,
            reason=(
                f"no rule matches sensitivity={task.sensitivity} priority={task.priority} "
                f"project={task.project}; add a rule (or a default rule with match: {{}})"
            ),
            candidates=(),
            estimate=None,
            notes=world.notes,
            rules_version=rules.version,
        )
    rule = compiled.rule
    ctx = FilterContext(task, compiled, world)
    traces: list[CandidateTrace | None] = []
    feasible_pools: list[PoolState] = []
    feasible_slots: list[int] = []
    feasible_estimates: list[Estimate] = []
    failed: Counter[str] = Counter()
    best_case_s: list[float] = []  # run time alone on pools not permanently excluded

    for pool in world.pools:
        failed_filter: str | None = None
        detail: str | None = None
        for name, check in STATIC_FILTERS:
            detail = check(ctx, pool, None)
            if detail is not None:
                failed_filter = name
                break
        est: Estimate | None = None
        if failed_filter is None:
            est = estimate(task, pool)
            for name, check in ESTIMATE_FILTERS:
                detail = check(ctx, pool, est)
                if detail is not None:
                    failed_filter = name
                    break
        if failed_filter is None:
            assert est is not None
            traces.append(None)  # filled in after scoring
            feasible_pools.append(pool)
            feasible_slots.append(compiled.allow_position(pool.name))
            feasible_estimates.append(est)
            continue
        failed[failed_filter] += 1
        if failed_filter not in PERMANENT_FILTERS:
            best_case_s.append(task.frames * pool.sec_per_frame)
        traces.append(CandidateTrace(pool.name, False, failed_filter, detail or "", None, est))

    scores = score_all(feasible_estimates, feasible_slots, rule)
    best = -1
    for i, (pool, est, score) in enumerate(zip(feasible_pools, feasible_estimates, scores, strict=True)):
        if best < 0:
            best = i
            continue
        b_score, b_est, b_pool = scores[best], feasible_estimates[best], feasible_pools[best]
        if (score, -est.completion_s, b_pool.name) > (b_score, -b_est.completion_s, pool.name):
            best = i
    feasible_iter = iter(zip(feasible_pools, feasible_estimates, scores, strict=True))
    candidates = []
    for trace in traces:
        if trace is None:
            pool, est, score = next(feasible_iter)
            trace = CandidateTrace(pool.name, True, None, "", score, est)
        candidates.append(trace)

    if best >= 0:
        pool, est = feasible_pools[best], feasible_estimates[best]
        return Decision(
            outcome="dispatch",
            pool=pool.name,
            rule=rule.id,
            reason=(
                f"rule {rule.id} (prefer {rule.prefer}): {pool.name} scored {scores[best]:.3f} of "
                f"{len(feasible_pools)} feasible pool(s); est. ${est.cost_usd:.6f}, {est.completion_s:.1f} s"
            ),
            candidates=tuple(candidates),
            estimate=est,
            notes=world.notes,
            budget=rule.budget,
            rules_version=rules.version,
        )

    if not world.pools:
        outcome, reason = "queue", "no pools known yet (no agent has reported); waiting for capacity"
    elif not best_case_s:
        outcome = "reject"
        reason = (
            f"rule {rule.id}: no known pool may ever run this task ({_summary(failed)}); "
            "check the rule's allow/deny/trust_zones and the task's sensitivity and project lock"
        )
    elif task.sla_seconds > 0 and min(best_case_s) > task.sla_seconds:
        outcome = "reject"
        reason = (
            f"rule {rule.id}: sla {task.sla_seconds:g} s cannot be met; the fastest allowed pool needs "
            f"{min(best_case_s):g} s for {task.frames} frame(s) even when idle"
        )
    else:
        outcome = "queue"
        reason = f"rule {rule.id}: nothing feasible now ({_summary(failed)}); waiting"
    return Decision(
        outcome=outcome,  # type: ignore[arg-type]
        pool=None,
        rule=rule.id,
        reason=reason,
        candidates=tuple(candidates),
        estimate=None,
        notes=world.notes,
        budget=None,
        rules_version=rules.version,
    )
