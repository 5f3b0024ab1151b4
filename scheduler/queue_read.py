"""The dispatcher's read of the store's queue: runnable tasks in queue order, a few at a time, and
what one pass read but did not take, kept for the next pass (`ReadAhead`).

Reading the queue was the largest part of a dispatch pass's own time while slots free a few at a
time (compare_celery's 8-slot run, docs/benchmarks.md): two SQLite reads per pass to place three or
four tasks. The tasks a pass reads past those it takes are the head of the queue as that pass
leaves it, as long as nothing else changed the queue; the next pass starts from them instead of
reading the store again.

What keeps a read-ahead honest:
- it holds the queued tasks of one contiguous read from the head of the queue, in queue order,
  minus those the pass dispatched or failed; a task the pass kept queued with a new decision is
  held with that decision, as the store now has it;
- it is used only while the dispatcher's queue marks are those of its read (this process stored no
  new task, re-queued nothing, took nothing out of the queue otherwise: cancels, rejects; the same
  leader term) and at most `max_age_s` after it: what other processes change (another replica's
  intake or cancel, a backoff that ends) is seen at most that late, as the idle loop's periodic pass
  sees it;
- a launch or queue decision of this process that does not commit changes the marks too (its task
  is queued as before, ahead of what is held).
An empty read-ahead that reached the end of the queue spares the next pass its store read (a pass
for a submit offered to an idle dispatcher reads nothing then). When a pass has gone through a
read-ahead and wants more, it reads the store as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from facefleet.scheduler.pass_planner import Waiting
from facefleet.scheduler.store import TaskRecord, TaskStore, queued_in_order

Marks = tuple[int, ...]

# Queued tasks a store read fetches while read-aheads are being used: a pass fills a few freed
# slots, and the rest serve the passes after it until the queue changes.
READ_AHEAD = 32


@dataclass(frozen=True)
class ReadAhead:
    items: tuple[Waiting, ...]  # queued tasks in queue order: the head of the runnable queue
    drained: bool  # the read reached the end of the runnable queue
    marks: Marks  # the dispatcher's queue marks before the read
    read_at: float  # time.monotonic() before the read


def still_valid(ahead: ReadAhead | None, marks: Marks, max_age_s: float) -> ReadAhead | None:
    """`ahead` while nothing this process tracks changed the queue since its read, and it is young."""
    if ahead is None or ahead.marks != marks or time.monotonic() - ahead.read_at > max_age_s:
        return None
    return ahead


class QueueRead:
    """One pass's queue: a valid read-ahead's tasks first, then the store's, skipping the tasks of
    earlier passes still being committed (`uncommitted`). Iterate it lazily."""

    def __init__(
        self,
        store: TaskStore,
        to_waiting: Callable[[TaskRecord], Waiting],
        *,
        now: float,
        aging_s: float,
        want: int,
        limit: int,
        step: int,
        uncommitted: Mapping[str, str],
        ahead: ReadAhead | None,
        marks: Marks,
        read_at: float,
    ) -> None:
        self._store = store
        self._to_waiting = to_waiting
        self._now = now
        self._aging_s = aging_s
        self._want = want  # ids of the first store read, besides those already held
        self._limit = limit  # store rows read at most, besides those already held
        self._step = step  # records fetched per store read
        self._uncommitted = uncommitted
        self._ahead = ahead
        # The read the tasks held come from: the read-ahead's (older, so it expires no later), or this one.
        self.marks, self.read_at = (ahead.marks, ahead.read_at) if ahead is not None else (marks, read_at)
        self.held: list[Waiting] = []  # every queued task read (or carried over), in queue order
        self.drained = False  # the read reached the end of the runnable queue
        # The store's read skipped a task kept queued by a pass still committing, which this read
        # does not hold: what it holds is then no head of the queue to carry over.
        self._gapped = False

    def __iter__(self) -> Iterator[Waiting]:
        seen: set[str] = set()
        if self._ahead is not None:
            self.held.extend(self._ahead.items)  # all of them: those the pass does not reach stay held
            seen.update(item.task.id for item in self._ahead.items)
            for item in self._ahead.items:
                if item.task.id not in self._uncommitted:  # else kept queued by a pass still committing
                    yield item
            if self._ahead.drained:
                self.drained = True
                return
        uncommitted = self._uncommitted
        skip = len(uncommitted) + len(seen)  # rows at the head of the queue this pass will not take from the store
        offset, size = 0, self._want + skip
        while offset < self._limit + skip:
            ids = self._store.runnable_ids(self._now, size, self._aging_s, offset)
            fresh = [task_id for task_id in ids if task_id not in uncommitted and task_id not in seen]
            seen.update(fresh)  # a row may move between reads
            self._gapped = self._gapped or any(uncommitted.get(task_id) == "" for task_id in ids if task_id not in seen)
            for start in range(0, len(fresh), self._step):
                chunk = fresh[start : start + self._step]
                items = [self._to_waiting(record) for record in queued_in_order(chunk, self._store.get_many(chunk))]
                self.held.extend(items)  # those the pass does not reach are read ahead
                yield from items
            if len(ids) < size:
                self.drained = True
                return  # the end of the runnable queue
            offset, size = offset + size, max(size, self._step)

    def ahead(self, taken: set[str], replaced: Mapping[str, Waiting]) -> ReadAhead | None:
        """The next pass's read-ahead: the tasks held minus `taken` (dispatched or failed by this
        pass), with `replaced` swapped in (kept queued with a new decision); None if nothing is left
        to say (no task held and the queue not known to be drained, or a gap in what is held)."""
        if self._gapped:
            return None
        items = tuple(replaced.get(item.task.id, item) for item in self.held if item.task.id not in taken)
        if not items and not self.drained:
            return None
        return ReadAhead(items, self.drained, self.marks, self.read_at)
