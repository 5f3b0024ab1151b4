"""Every Prometheus metric the scheduler exports, in one place (served on /metrics).

Dashboards and alert rules under deploy/ name these; tests check they exist.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

QUEUE_DEPTH = Gauge("facefleet_queue_depth", "Tasks waiting to be placed, by priority.", ["priority"])
PLACEMENTS = Counter(
    "facefleet_placements_total", "Placement decisions by pool, rule and outcome.", ["pool", "rule", "outcome"]
)
DISPATCH_LATENCY = Histogram(
    "facefleet_dispatch_latency_seconds",
    "Time from a placement decision to the agent accepting the task.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_WAIT = Histogram(
    "facefleet_task_queue_wait_seconds",
    "Time from submission to dispatch.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800),
)
PASS_PLAN_DEVIATIONS = Counter(
    "facefleet_pass_plan_deviations_total",
    "Planned launches the dispatcher could not apply, by I/O race (no_agent: the pool had no agent slot "
    "left; ledger: the budget ledger refused the reservation).",
    ["race"],
)
REQUEUES = Counter("facefleet_requeues_total", "Tasks sent back to the queue, by reason.", ["reason"])
TASKS_FINISHED = Counter("facefleet_tasks_finished_total", "Tasks reaching a terminal state.", ["state", "pool"])
DUPLICATE_COMPLETIONS = Counter(
    "facefleet_duplicate_completions_total",
    "Completions reported for a task already finished (recorded once, the repeat ignored).",
    ["state"],
)
DUPLICATE_OUTCOMES = Counter(
    "facefleet_duplicate_outcomes_total",
    "Outcomes an agent reported for a superseded run (audited, never recorded as a completion).",
    ["state"],
)
SUBMITS = Counter("facefleet_submits_total", "SubmitTask calls by result (created, duplicate, invalid).", ["result"])
SUBMIT_BATCH_SIZE = Histogram(
    "facefleet_submit_batch_size",
    "Submits committed per group-commit transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
LEADER = Gauge("facefleet_leader", "1 when this scheduler replica holds the leader lock.")
AGENTS = Gauge("facefleet_agents", "Known agents by pool and state (ready, draining, lost).", ["pool", "state"])
POOL_FREE_SLOTS = Gauge("facefleet_pool_free_slots", "Free slots per pool as placement sees them.", ["pool"])
CAPACITY_SOURCE_STALE = Gauge(
    "facefleet_capacity_prometheus_stale", "1 when Prometheus is down or stale and placement uses heartbeats only."
)
RULES_VERSION = Info("facefleet_rules", "The active rule-set version and its source.")
RULES_LOAD_ERRORS = Counter("facefleet_rules_load_errors_total", "Rule-set loads rejected as invalid or unreachable.")
RULES_SOURCE_ERRORS = Counter(
    "facefleet_rules_source_errors_total",
    "Rules-source problems by reason (SourceError in scheduler/rules_source/base.py): the last good set stays.",
    ["reason"],
)
SPOT_PRICE = Gauge(
    "facefleet_spot_price_usd_per_hour",
    "Latest spot price per provider, region and instance type.",
    ["provider", "region", "instance_type"],
)
PRICE_FEED_STALE = Gauge("facefleet_price_feed_stale", "1 when a price feed is failing or stale.", ["provider"])
BUDGET_SPENT = Gauge("facefleet_budget_spent_usd", "Cloud spend month to date by budget account.", ["budget"])
BUDGET_CAP = Gauge("facefleet_budget_cap_usd", "Monthly cap by budget account.", ["budget"])
BUDGET_ALERT = Gauge("facefleet_budget_alert", "1 when spend passed the account's alert percentage.", ["budget"])
CLOUD_INSTANCES = Gauge("facefleet_cloud_instances", "Cloud instances by pool and state.", ["pool", "state"])
AUDIT_RECORDS = Counter("facefleet_audit_records_total", "Audit records written, by kind.", ["kind"])
DENIALS = Counter("facefleet_permission_denied_total", "Calls refused for a missing role or certificate.", ["method"])


_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, remembered: hot paths count per task, and `labels()` checks and
    looks its arguments up under a lock on every call. (None of these metrics ever drops a child.)"""
    key = (id(metric), values)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*values)
    return found


def count_audit_records(kind: str, count: int) -> None:
    """AuditLog's on_record hook in the scheduler process."""
    child(AUDIT_RECORDS, kind).inc(count)


def count_denial(method: str) -> None:
    """RoleGate's on_denial hook in the scheduler process."""
    DENIALS.labels(method).inc()
