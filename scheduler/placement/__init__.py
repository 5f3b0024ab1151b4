"""Placement: a pure function of (task, rules, world snapshot) -> decision + explain trace."""

from facefleet.scheduler.placement.engine import place
from facefleet.scheduler.placement.model import (
    Budget,
    CandidateTrace,
    Decision,
    Estimate,
    PoolState,
    Rule,
    RuleSet,
    TaskSpec,
    World,
)
from facefleet.scheduler.placement.policy import (
    FALLBACK_RULESET,
    PolicyError,
    PolicyIssue,
    load_budgets,
    load_locks,
    load_ruleset,
)
from facefleet.scheduler.placement.world import compose_world, load_world

__all__ = [
    "FALLBACK_RULESET",
    "Budget",
    "CandidateTrace",
    "Decision",
    "Estimate",
    "PolicyError",
    "PolicyIssue",
    "PoolState",
    "Rule",
    "RuleSet",
    "TaskSpec",
    "World",
    "compose_world",
    "load_budgets",
    "load_locks",
    "load_ruleset",
    "load_world",
    "place",
]
