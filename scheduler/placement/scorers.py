"""Scorers over the feasible pools: estimated cost, estimated completion time, allow-list order.

Each scorer maps a pool to [0, 1] (1 = best) relative to the other feasible pools; the rule's
weights (from `prefer`, or explicit `weights`) combine them. Higher total score wins; ties go to
the faster pool, then the name, so decisions are deterministic.
"""

from __future__ import annotations

from facefleet.scheduler.placement.model import Estimate, Rule

PREFER_WEIGHTS: dict[str, tuple[float, float, float]] = {
    # (cost, latency, order)
    "cost": (0.8, 0.15, 0.05),
    "latency": (0.15, 0.8, 0.05),
    "order": (0.0, 0.0, 1.0),
}


def weights_for(rule: Rule) -> tuple[float, float, float]:
    return rule.weights if any(rule.weights) else PREFER_WEIGHTS[rule.prefer]


def cost_score(cost: float, min_cost: float, max_cost: float) -> float:
    return 1.0 - (cost - min_cost) / max_cost if max_cost > 0 else 1.0


def latency_score(completion: float, min_completion: float) -> float:
    return min_completion / completion if completion > 0 else 1.0


def order_score(allow_position: int, allow_len: int) -> float:
    return 1.0 - allow_position / allow_len if allow_len else 1.0


def score_all(estimates: list[Estimate], allow_positions: list[int], rule: Rule) -> list[float]:
    """Combined score for each feasible pool (same order as `estimates`)."""
    if not estimates:
        return []
    w_cost, w_latency, w_order = weights_for(rule)
    max_cost = max(e.cost_usd for e in estimates)
    min_cost = min(e.cost_usd for e in estimates)
    min_completion = min(e.completion_s for e in estimates)
    allow_len = len(rule.allow)
    return [
        w_cost * cost_score(e.cost_usd, min_cost, max_cost)
        + w_latency * latency_score(e.completion_s, min_completion)
        + w_order * order_score(pos, allow_len)
        for e, pos in zip(estimates, allow_positions, strict=True)
    ]
