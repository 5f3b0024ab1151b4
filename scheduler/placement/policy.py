"""The rule language: load and validate rules, budgets and locks documents (YAML or mappings).

A rule set is accepted whole or not at all: `load_ruleset` collects every problem (file, rule id,
field, message) and raises one `PolicyError` listing them all. Accepted rules are compiled into an
index (by sensitivity x priority bucket and literal project prefix, precompiled globs) so finding
the first matching rule costs far less than scanning every rule.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import translate
from typing import Any

from facefleet.domain import PRIORITIES, PRIVATE_ZONE, PROJECT_NAME_RULE, SENSITIVITIES, is_project_name
from facefleet.money import PERCENT, SECONDS, USD, USD_PER_HOUR, AmountError, Quantity
from facefleet.scheduler.placement.model import (
    GLOB_CHARS,
    PREFERENCES,
    Budget,
    BurstWhen,
    Rule,
    RuleSet,
    TaskSpec,
)
from facefleet.yaml_input import YamlInputError, parse_yaml

RULE_FIELDS = {
    "id",
    "description",
    "match",
    "allow",
    "deny",
    "prefer",
    "weights",
    "max_spot_price_per_hour",
    "burst_when",
    "budget",
    "allow_cloud_internal",
    "trust_zones",
}
MATCH_FIELDS = {"sensitivity", "priority", "project"}
BURST_FIELDS = {"onprem_queue_wait_s_gt", "onprem_free_slots_lt"}
WEIGHT = Quantity("weight", 1e6)  # scorer weights
RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    file: str
    rule_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        rule = f" rule {self.rule_id!r}" if self.rule_id else ""
        return f"{self.file}:{rule} field {self.field!r}: {self.message}"


class PolicyError(ValueError):
    """A rule, budget or lock document was rejected; `errors` lists every problem found."""

    def __init__(self, errors: list[PolicyIssue]) -> None:
        self.errors = errors
        lines = "\n  ".join(str(e) for e in errors)
        super().__init__(f"{len(errors)} problem(s); the whole document was rejected:\n  {lines}")


def _parse_document(text_or_mapping: str | bytes | Mapping[str, Any], source: str, top_key: str) -> Any:
    if isinstance(text_or_mapping, Mapping):
        return text_or_mapping
    try:
        data = parse_yaml(text_or_mapping, source) if text_or_mapping else None
    except YamlInputError as exc:
        raise PolicyError([PolicyIssue(source, None, top_key, str(exc))]) from None
    return data if data is not None else {}


def _string_list(value: Any, allowed: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], str | None]:
    """A list of strings (a single string is accepted as a one-item list); returns (items, error)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return (), f"expected a list of non-empty strings, got {value!r}"
    if allowed is not None:
        bad = [v for v in value if v not in allowed]
        if bad:
            return (), f"{bad} not allowed; choose from {list(allowed)}"
    return tuple(value), None


def _number(value: Any, quantity: Quantity = WEIGHT) -> tuple[float | None, str | None]:
    """(value, None) or (None, why): finite, >= 0, at most the quantity's ceiling (facefleet.money)."""
    try:
        return quantity.check(value, "value"), None
    except AmountError as exc:
        return None, str(exc).removeprefix("value: ")


def _parse_rule(raw: Any, position: int, source: str, issues: list[PolicyIssue]) -> Rule | None:
    start = len(issues)
    if not isinstance(raw, Mapping):
        issues.append(PolicyIssue(source, None, f"rules[{position}]", "expected a mapping with id, match, allow"))
        return None
    rule_id = raw.get("id")
    label = str(rule_id) if rule_id else f"rules[{position}]"

    def problem(field_name: str, message: str) -> None:
        issues.append(PolicyIssue(source, label, field_name, message))

    if not isinstance(rule_id, str) or not RULE_ID.match(rule_id):
        problem("id", f"required: letters, digits, '_', '.', '-' (got {rule_id!r})")
    for unknown in sorted(set(raw) - RULE_FIELDS):
        problem(unknown, f"unknown field; known fields: {sorted(RULE_FIELDS)}")

    match = raw.get("match", {})
    sens: tuple[str, ...] = ()
    prio: tuple[str, ...] = ()
    project: tuple[str, ...] = ()
    if match is None:
        match = {}
    if not isinstance(match, Mapping):
        problem("match", f"expected a mapping (use {{}} to match every task), got {match!r}")
    else:
        for unknown in sorted(set(match) - MATCH_FIELDS):
            problem(f"match.{unknown}", f"unknown field; known: {sorted(MATCH_FIELDS)}")
        if "sensitivity" in match:
            sens, err = _string_list(match["sensitivity"], SENSITIVITIES)
            if err:
                problem("match.sensitivity", err)
        if "priority" in match:
            prio, err = _string_list(match["priority"], PRIORITIES)
            if err:
                problem("match.priority", err)
        if "project" in match:
            project, err = _string_list(match["project"])
            if err:
                problem("match.project", err)

    allow: tuple[str, ...] = ()
    if "allow" not in raw:
        problem("allow", 'required: a list of pool name globs, e.g. ["onprem-*"]')
    else:
        allow, err = _string_list(raw["allow"])
        if err:
            problem("allow", err)
    deny: tuple[str, ...] = ()
    if "deny" in raw:
        deny, err = _string_list(raw["deny"])
        if err:
            problem("deny", err)

    prefer = raw.get("prefer", "cost")
    if prefer not in PREFERENCES:
        problem("prefer", f"{prefer!r} is not one of {list(PREFERENCES)}")

    weights = (0.0, 0.0, 0.0)
    if "weights" in raw:
        w = raw["weights"]
        if not isinstance(w, Mapping) or set(w) - {"cost", "latency", "order"}:
            problem("weights", f"expected a mapping with keys cost, latency, order; got {w!r}")
        else:
            parsed = [_number(w.get(k, 0)) for k in ("cost", "latency", "order")]
            errs = [e for _, e in parsed if e]
            if errs:
                problem("weights", "; ".join(errs))
            elif sum(v or 0.0 for v, _ in parsed) <= 0:
                problem("weights", "at least one weight must be > 0")
            else:
                weights = tuple(v or 0.0 for v, _ in parsed)  # type: ignore[assignment]

    max_price = None
    if raw.get("max_spot_price_per_hour") is not None:
        max_price, err = _number(raw["max_spot_price_per_hour"], USD_PER_HOUR)
        if err:
            problem("max_spot_price_per_hour", err)

    burst = None
    if raw.get("burst_when") is not None:
        bw = raw["burst_when"]
        if not isinstance(bw, Mapping) or not bw:
            problem("burst_when", f"expected a mapping with one of {sorted(BURST_FIELDS)}, got {bw!r}")
        else:
            for unknown in sorted(set(bw) - BURST_FIELDS):
                problem(f"burst_when.{unknown}", f"unknown condition; known: {sorted(BURST_FIELDS)}")
            wait, slots = None, None
            if "onprem_queue_wait_s_gt" in bw:
                wait, err = _number(bw["onprem_queue_wait_s_gt"], SECONDS)
                if err:
                    problem("burst_when.onprem_queue_wait_s_gt", err)
            if "onprem_free_slots_lt" in bw:
                value = bw["onprem_free_slots_lt"]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    problem("burst_when.onprem_free_slots_lt", f"expected an integer >= 1, got {value!r}")
                else:
                    slots = value
            burst = BurstWhen(onprem_queue_wait_s_gt=wait, onprem_free_slots_lt=slots)

    budget = raw.get("budget")
    if budget is not None and (not isinstance(budget, str) or not budget):
        problem("budget", f"expected a budget account name, got {budget!r}")
    allow_internal = raw.get("allow_cloud_internal", False)
    if not isinstance(allow_internal, bool):
        problem("allow_cloud_internal", f"expected true or false, got {allow_internal!r}")
    zones: tuple[str, ...] = ()
    if "trust_zones" in raw:
        zones, err = _string_list(raw["trust_zones"])
        if err:
            problem("trust_zones", err)
    description = raw.get("description", "")
    if not isinstance(description, str):
        problem("description", "expected a string")

    if len(issues) > start:
        return None
    return Rule(
        id=str(rule_id),
        allow=allow,
        deny=deny,
        match_sensitivity=sens,
        match_priority=prio,
        match_project=project,
        prefer=str(prefer),
        weights=weights,
        max_spot_price_per_hour=max_price,
        burst_when=burst,
        budget=budget,
        allow_cloud_internal=bool(allow_internal),
        trust_zones=zones,
        description=description,
    )


def _is_catch_all(rule: Rule) -> bool:
    return (
        not rule.match_sensitivity and not rule.match_priority and (not rule.match_project or "*" in rule.match_project)
    )


def load_ruleset(text_or_mapping: str | bytes | Mapping[str, Any], source: str) -> RuleSet:
    """Parse and validate a rules document (`rules: [...]`); raise PolicyError listing every problem."""
    data = _parse_document(text_or_mapping, source, "rules")
    if not isinstance(data, Mapping) or not isinstance(data.get("rules"), list):
        raise PolicyError([PolicyIssue(source, None, "rules", "expected a top-level `rules:` list")])
    unknown_top = sorted(set(data) - {"rules"})
    issues: list[PolicyIssue] = [
        PolicyIssue(source, None, key, "unknown top-level key; only `rules` is allowed") for key in unknown_top
    ]
    if not data["rules"]:
        issues.append(PolicyIssue(source, None, "rules", "empty: at least one rule (e.g. a default) is required"))
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for position, raw in enumerate(data["rules"]):
        rule = _parse_rule(raw, position, source, issues)
        if rule is None:
            continue
        if rule.id in seen:
            issues.append(PolicyIssue(source, rule.id, "id", f"duplicate id (also rule #{seen[rule.id] + 1})"))
        seen.setdefault(rule.id, position)
        rules.append(rule)
    for i, rule in enumerate(rules[:-1]):
        if _is_catch_all(rule):
            later = [r.id for r in rules[i + 1 :]]
            issues.append(
                PolicyIssue(source, rule.id, "match", f"matches every task, so later rules {later} can never apply")
            )
            break
    if issues:
        raise PolicyError(issues)
    canonical = json.dumps(data["rules"], sort_keys=True, separators=(",", ":"), default=str)
    version = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    ruleset_rules = tuple(rules)
    return RuleSet(rules=ruleset_rules, version=version, source=source, index=RuleIndex(ruleset_rules))


def load_budgets(text_or_mapping: str | bytes | Mapping[str, Any], source: str) -> dict[str, Budget]:
    """Parse `budgets: [{name, monthly_cap_usd, alert_pct}]` (caps only; spend comes from the ledger)."""
    data = _parse_document(text_or_mapping, source, "budgets")
    items = data.get("budgets", []) if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise PolicyError([PolicyIssue(source, None, "budgets", "expected a top-level `budgets:` list")])
    issues: list[PolicyIssue] = []
    budgets: dict[str, Budget] = {}
    for i, raw in enumerate(items):
        name = raw.get("name") if isinstance(raw, Mapping) else None
        label = str(name) if name else f"budgets[{i}]"
        budget = budget_from_mapping(str(name or ""), raw, source, label, issues)
        if budget is not None:
            if budget.name in budgets:
                issues.append(PolicyIssue(source, label, "name", "duplicate budget name"))
            budgets[budget.name] = budget
    if issues:
        raise PolicyError(issues)
    return budgets


def budget_from_mapping(name: str, raw: Any, source: str, label: str, issues: list[PolicyIssue]) -> Budget | None:
    """One budget entry (shared by budgets.yaml and Consul `budgets/<name>` values)."""
    start = len(issues)
    if not isinstance(raw, Mapping):
        issues.append(PolicyIssue(source, label, "budget", "expected a mapping with monthly_cap_usd"))
        return None
    if not RULE_ID.match(name):
        issues.append(PolicyIssue(source, label, "name", f"required: letters, digits, '_', '.', '-' (got {name!r})"))
    for unknown in sorted(set(raw) - {"name", "monthly_cap_usd", "alert_pct"}):
        issues.append(PolicyIssue(source, label, unknown, "unknown field; known: name, monthly_cap_usd, alert_pct"))
    cap, err = _number(raw.get("monthly_cap_usd"), USD)
    if err:
        issues.append(PolicyIssue(source, label, "monthly_cap_usd", err))
    pct, err = _number(raw.get("alert_pct", 80.0), PERCENT)
    if err:
        issues.append(PolicyIssue(source, label, "alert_pct", err))
    if len(issues) > start:
        return None
    return Budget(name=name, monthly_cap_usd=cap or 0.0, alert_pct=pct if pct is not None else 80.0)


def load_locks(text_or_mapping: str | bytes | Mapping[str, Any], source: str) -> dict[str, str]:
    """Parse `locks: [{project, reason, by}]` into project -> reason."""
    data = _parse_document(text_or_mapping, source, "locks")
    items = data.get("locks", []) if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise PolicyError([PolicyIssue(source, None, "locks", "expected a top-level `locks:` list")])
    issues: list[PolicyIssue] = []
    locks: dict[str, str] = {}
    for i, raw in enumerate(items):
        if not isinstance(raw, Mapping) or not isinstance(raw.get("project"), str) or not raw["project"]:
            issues.append(PolicyIssue(source, f"locks[{i}]", "project", "expected {project, reason, by}"))
            continue
        if not isinstance(raw.get("reason", ""), str):
            issues.append(PolicyIssue(source, raw["project"], "reason", "expected a string"))
            continue
        if not is_project_name(raw["project"]):
            issues.append(PolicyIssue(source, raw["project"], "project", f"not a project name ({PROJECT_NAME_RULE})"))
            continue
        locks[raw["project"]] = str(raw.get("reason") or "locked")
    if issues:
        raise PolicyError(issues)
    return locks


def _literal_prefix(glob: str) -> str:
    found = GLOB_CHARS.search(glob)
    return glob if found is None else glob[: found.start()]


class CompiledRule:
    """A rule with precompiled globs and per-pool-name memo tables (names repeat across decisions)."""

    __slots__ = ("_allow", "_allow_cache", "_deny", "_deny_cache", "_project", "rule")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self._project = (
            re.compile("|".join(f"(?:{translate(g)})" for g in rule.match_project)) if rule.match_project else None
        )
        self._allow = tuple(re.compile(translate(g)) for g in rule.allow)
        self._deny = re.compile("|".join(f"(?:{translate(g)})" for g in rule.deny)) if rule.deny else None
        self._allow_cache: dict[str, int] = {}
        self._deny_cache: dict[str, bool] = {}

    def project_matches(self, project: str) -> bool:
        return self._project is None or self._project.match(project) is not None

    def allow_position(self, pool: str) -> int:
        """Index of the first allow glob matching `pool`, or -1 when none does."""
        cached = self._allow_cache.get(pool)
        if cached is None:
            cached = next((i for i, rx in enumerate(self._allow) if rx.match(pool)), -1)
            if len(self._allow_cache) < 65536:
                self._allow_cache[pool] = cached
        return cached

    def denied(self, pool: str) -> bool:
        if self._deny is None:
            return False
        cached = self._deny_cache.get(pool)
        if cached is None:
            cached = self._deny.match(pool) is not None
            if len(self._deny_cache) < 65536:
                self._deny_cache[pool] = cached
        return cached


class RuleIndex:
    """First-match lookup in O(len(project) + candidates) instead of O(rules).

    Rules are bucketed by (sensitivity, priority) — a rule with no sensitivity/priority filter goes in
    every bucket it admits — and within a bucket by the literal prefix of each project glob. A task
    collects the rule positions stored under every prefix of its project name, and the lowest
    position whose full glob matches wins.
    """

    _MEMO_LIMIT = 65536

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.compiled = tuple(CompiledRule(r) for r in rules)
        self._buckets: dict[tuple[str, str], dict[str, list[int]]] = {}
        for position, rule in enumerate(rules):
            prefixes = {_literal_prefix(g) for g in rule.match_project} if rule.match_project else {""}
            for sens in rule.match_sensitivity or SENSITIVITIES:
                for prio in rule.match_priority or PRIORITIES:
                    bucket = self._buckets.setdefault((sens, prio), {})
                    for prefix in prefixes:
                        bucket.setdefault(prefix, []).append(position)
        self._max_prefix = {key: max(map(len, b)) for key, b in self._buckets.items()}
        self._memo: dict[tuple[str, str, str], int] = {}

    def first_match(self, task: TaskSpec) -> CompiledRule | None:
        key = (task.sensitivity, task.priority, task.project)
        position = self._memo.get(key)
        if position is None:
            position = self._search(task)
            if len(self._memo) >= self._MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = position
        return None if position < 0 else self.compiled[position]

    def _search(self, task: TaskSpec) -> int:
        bucket_key = (task.sensitivity, task.priority)
        bucket = self._buckets.get(bucket_key)
        if not bucket:
            return -1
        project = task.project
        positions: list[int] = []
        for length in range(min(len(project), self._max_prefix[bucket_key]) + 1):
            found = bucket.get(project[:length])
            if found:
                positions.extend(found)
        for position in sorted(positions):
            if self.compiled[position].project_matches(project):
                return position
        return -1


# With no valid rule set at all, placement still runs: only private-zone pools, never cloud.
FALLBACK_RULESET: RuleSet = load_ruleset(
    {
        "rules": [
            {
                "id": "fallback-private-only",
                "description": "No valid rule set loaded: everything stays on the private trust zone.",
                "match": {},
                "allow": ["*"],
                "trust_zones": [PRIVATE_ZONE],
                "prefer": "latency",
            }
        ]
    },
    "<built-in fallback>",
)
