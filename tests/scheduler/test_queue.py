"""Queue order: priority, then age, with aging; per-project limits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from facefleet.scheduler.queue import QueuedItem, effective_priority, order_key, ordered, within_limits


def item(task_id: str, priority: int, at: float, project: str = "p") -> QueuedItem:
    return QueuedItem(task_id, project, priority, at)


def test_urgent_before_low_at_the_same_age() -> None:
    assert [i.task_id for i in ordered([item("low", 1, 100), item("urgent", 4, 100), item("normal", 2, 100)])] == [
        "urgent",
        "normal",
        "low",
    ]


def test_fifo_within_a_priority() -> None:
    assert [i.task_id for i in ordered([item("b", 2, 200), item("a", 2, 100)])] == ["a", "b"]


def test_aging_lets_an_old_low_task_pass_fresh_urgent_ones() -> None:
    old_low = item("old-low", 1, 0.0)
    # waited 181 s at aging 60 s/level: effective 1 + 3.02 > a fresh urgent's 4.0
    fresh_urgent = item("fresh-urgent", 4, 181.0)
    assert ordered([fresh_urgent, old_low], aging_s=60)[0].task_id == "old-low"
    assert effective_priority(1, 0.0, now=181.0, aging_s=60) > effective_priority(4, 181.0, now=181.0, aging_s=60)


@given(st.lists(st.tuples(st.integers(1, 4), st.floats(0, 1e6)), min_size=1, max_size=50), st.floats(0, 1e6))
def test_no_starvation_bound(entries: list[tuple[int, float]], low_at: float) -> None:
    """A low task is ahead of every urgent task submitted more than 3 aging periods after it."""
    aging = 60.0
    low = item("low", 1, low_at)
    later = [item(f"u{i}", 4, low_at + 3 * aging + 1 + at) for i, (_, at) in enumerate(entries)]
    assert ordered([*later, low], aging)[0].task_id == "low"
    assert order_key(1, low_at, aging) < min(order_key(4, u.submitted_at, aging) for u in later)


def test_project_limits_keep_order_and_count_in_flight() -> None:
    items = [item("a1", 4, 1, "a"), item("b1", 4, 2, "b"), item("a2", 3, 3, "a"), item("a3", 3, 4, "a")]
    admitted = within_limits(items, {"a": 1}, {"a": 2, "*": 5})
    assert [i.task_id for i in admitted] == ["a1", "b1"]
    assert [i.task_id for i in within_limits(items, {}, {})] == ["a1", "b1", "a2", "a3"]
    assert [i.task_id for i in within_limits(items, {"b": 1}, {"*": 1})] == ["a1"]
