"""Queue ordering and per-project limits: pure functions, no I/O, no clock of their own.

Order: priority first, then age, with aging so low priority never starves. Each task gets a
virtual submission time

    order_key = submitted_at - priority * aging_s

and the queue runs in ascending order_key. Equivalently, a task's effective priority is
`priority + waited_seconds / aging_s`: every `aging_s` seconds of waiting is worth one priority
level. With the default aging_s = 60, a LOW (1) task that has waited 3 minutes ranks with a fresh
URGENT (4) one and goes before any URGENT task submitted later, so a steady stream of urgent work
delays low-priority work by at most (4 - 1) * aging_s, never forever. The store computes the same
key in SQL (`TaskStore.runnable`).

Per-project limits: `limits[project]` (or `limits["*"]` as the default) caps the tasks of a project
that are placed, dispatched or running at once; 0 or absent = unlimited.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

DEFAULT_AGING_S = 60.0


def order_key(priority: int, submitted_at: float, aging_s: float = DEFAULT_AGING_S) -> float:
    return submitted_at - priority * aging_s


def effective_priority(priority: int, submitted_at: float, now: float, aging_s: float = DEFAULT_AGING_S) -> float:
    return priority + max(0.0, now - submitted_at) / aging_s


@dataclass(frozen=True)
class QueuedItem:
    task_id: str
    project: str
    priority: int
    submitted_at: float


Item = TypeVar("Item", bound=QueuedItem)


def ordered(items: Iterable[Item], aging_s: float = DEFAULT_AGING_S) -> list[Item]:
    return sorted(items, key=lambda item: (order_key(item.priority, item.submitted_at, aging_s), item.task_id))


def project_limit(project: str, limits: Mapping[str, int]) -> int:
    """0 = unlimited."""
    return int(limits.get(project, limits.get("*", 0)))


def within_limits(
    items: Iterable[Item],
    in_flight_by_project: Mapping[str, int],
    limits: Mapping[str, int],
) -> list[Item]:
    """Keep queue order; drop tasks whose project already has its limit in flight (counting the
    ones admitted earlier in this same pass)."""
    counts = dict(in_flight_by_project)
    return [item for item in items if admit(item.project, counts, limits)]


def admit(project: str, counts: dict[str, int], limits: Mapping[str, int]) -> bool:
    """One more task of `project` fits under its limit: count it in `counts` and say True."""
    limit = project_limit(project, limits)
    if limit and counts.get(project, 0) >= limit:
        return False
    counts[project] = counts.get(project, 0) + 1
    return True
