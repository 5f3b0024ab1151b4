"""The completion batcher on a real SQLite store: batched commits, once-only completion, retries."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from facefleet.scheduler.completion_batch import Completion, CompletionBatcher
from facefleet.scheduler.group_commit import StoreUnavailable
from facefleet.scheduler.store import Change, Step, TaskStore
from facefleet.v1 import types_pb2
from tests.scheduler.test_dispatcher import submit

DONE = types_pb2.Progress(state=types_pb2.TASK_STATE_SUCCEEDED)


def dispatched(store: TaskStore, count: int, agent: str = "a-1") -> list[str]:
    ids = [submit(store, "p", types_pb2.SENSITIVITY_PRIVATE) for _ in range(count)]
    steps = (Step("placed", "placed"), Step("dispatched", "sent", agent_id=agent, count_attempt=True))
    assert store.apply_changes([Change(task_id, steps, "queued") for task_id in ids], time.time()) == [True] * count
    return ids


def completion(store: TaskStore, task_id: str, agent: str = "a-1") -> Completion:
    return Completion(store.get(task_id), agent, "succeeded", "done", DONE, time.time())


class CountingApply:
    def __init__(self, store: TaskStore, failures: int = 0) -> None:
        self.store = store
        self.failures = failures
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, changes: Sequence[Change], now: float) -> list[bool | Exception]:
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(len(changes))
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("could not write to the task store (OperationalError); retry")
        return self.store.apply_changes(changes, now)


@pytest.fixture
def store(tmp_path: Path) -> TaskStore:
    return TaskStore(f"sqlite:///{tmp_path}/c.db")


def test_completions_waiting_behind_a_commit_go_in_one_batch_each_recorded_once(store: TaskStore) -> None:
    ids = dispatched(store, 40)
    apply = CountingApply(store)
    recorded: list[str] = []
    batches: list[int] = []
    batcher = CompletionBatcher(apply, lambda c: recorded.append(c.record.id), lambda: batches.append(1))
    apply.gate.clear()  # the first commit is slow: the other completions queue behind it
    batcher.put(completion(store, ids[0]))
    assert apply.entered.wait(5)
    for task_id in ids[1:]:
        batcher.put(completion(store, task_id))
    batcher.put(completion(store, ids[5]))  # the agent repeated one: the store ignores it
    apply.gate.set()
    assert batcher.drain()
    batcher.close()
    assert sorted(recorded) == sorted(ids)  # each once, the repeat not
    assert apply.calls == [1, 40] and len(batches) == 2
    assert {store.get(task_id).state for task_id in ids} == {"succeeded"}


def test_a_completion_from_an_agent_the_task_is_no_longer_on_changes_nothing(store: TaskStore) -> None:
    (task_id,) = dispatched(store, 1, agent="a-1")
    recorded: list[str] = []
    batcher = CompletionBatcher(store.apply_changes, lambda c: recorded.append(c.record.id))
    batcher.put(completion(store, task_id, agent="stale-agent"))
    assert batcher.drain()
    batcher.close()
    assert recorded == [] and store.get(task_id).state == "dispatched"


def test_a_batch_the_store_refuses_is_retried_and_close_drains_what_is_pending(store: TaskStore) -> None:
    ids = dispatched(store, 3)
    apply = CountingApply(store, failures=2)
    recorded: list[str] = []
    batcher = CompletionBatcher(apply, lambda c: recorded.append(c.record.id))
    for task_id in ids:
        batcher.put(completion(store, task_id))
    batcher.close()  # drains: the retries happen before it returns
    assert sorted(recorded) == sorted(ids)
    assert len(apply.calls) >= 3 and {store.get(task_id).state for task_id in ids} == {"succeeded"}
    with pytest.raises(RuntimeError, match="stopping"):
        batcher.put(completion(store, ids[0]))


def test_lingering_gathers_completions_that_arrive_close_together_into_one_commit(store: TaskStore) -> None:
    ids = dispatched(store, 12)
    apply = CountingApply(store)
    batcher = CompletionBatcher(apply, lambda c: None, linger_s=0.5)
    started = time.monotonic()
    for task_id in ids:  # arriving one by one, each a little after the last
        batcher.put(completion(store, task_id))
        time.sleep(0.005)
    assert batcher.drain()
    assert apply.calls == [12]  # without the linger the first would have gone alone
    assert time.monotonic() - started < 5
    closing = dispatched(store, 1)
    batcher.put(completion(store, closing[0]))
    close_started = time.monotonic()
    batcher.close()  # does not sit out the linger: close commits what is pending at once
    assert time.monotonic() - close_started < 0.4
    assert apply.calls == [12, 1] and store.get(closing[0]).state == "succeeded"


def test_a_task_is_held_from_its_put_until_its_commit_has_finished(store: TaskStore) -> None:
    # The dispatcher asks this before recording an outcome an agent's inventory reports: while the
    # stream's completion of the same run waits for its commit, a second recording would be wasted.
    first, other = dispatched(store, 2)
    apply = CountingApply(store)
    batcher = CompletionBatcher(apply, lambda c: None)
    assert not batcher.holds(first)
    apply.gate.clear()
    batcher.put(completion(store, first))
    assert apply.entered.wait(5)
    assert batcher.holds(first) and not batcher.holds(other)  # in its commit
    batcher.put(completion(store, first))  # a repeat, queued behind the commit
    apply.gate.set()
    assert batcher.drain()
    assert not batcher.holds(first)  # both recorded (the repeat as the store's no-op)
    batcher.close()
    assert store.get(first).state == "succeeded"


def test_a_batch_is_recorded_only_once_the_dispatch_path_gives_way(store: TaskStore) -> None:
    """`give_way` (the dispatcher's `wait_quiet`) runs before each batch: nothing is written while
    it holds the batch back, and everything is once it returns."""
    [task_id] = dispatched(store, 1)
    quiet = threading.Event()
    asked = threading.Event()

    def give_way() -> None:
        asked.set()
        quiet.wait(10)

    batcher = CompletionBatcher(store.apply_changes, lambda _c: None, give_way=give_way)
    try:
        batcher.put(completion(store, task_id))
        assert asked.wait(5)
        time.sleep(0.2)
        assert store.get(task_id).state == "dispatched"  # held back: the dispatch path is busy
        quiet.set()
        assert batcher.drain(5)
        assert store.get(task_id).state == "succeeded"
    finally:
        quiet.set()
        batcher.close()
