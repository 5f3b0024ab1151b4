"""Group commit for SubmitTask: many concurrent submits share one durable transaction.

Each caller enqueues its task and blocks; one writer thread takes everything pending (up to
`max_batch`), inserts it in a single transaction, commits (one fsync), and only then releases
each caller with its id. So an id is never returned before it is durable, and the fsync cost is
shared by the whole batch instead of paid per task.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog

from scheduler import metrics
from scheduler.store import NewTask, SubmitResult, TaskStore

log = structlog.get_logger()


class StoreUnavailable(RuntimeError):
    """The batch could not be committed; callers answer UNAVAILABLE and the client retries."""


@dataclass
class _Pending:
    item: NewTask
    future: Future[SubmitResult] = field(default_factory=Future)


class GroupCommitter:
    def __init__(self, store: TaskStore, max_batch: int = 512) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, item: NewTask, timeout: float = 30.0) -> SubmitResult:
        """Block until `item` is committed; returns its id (or the existing one for a repeated key)."""
        if self._closed:
            raise StoreUnavailable("the scheduler is shutting down; retry against another replica")
        pending = _Pending(item)
        self._pending.put(pending)
        return pending.future.result(timeout=timeout)

    def close(self) -> None:
        self._closed = True
        self._pending.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    nxt = self._pending.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            results = self._store.insert_batch([pending.item for pending in batch], time.time())
        except Exception as exc:
            log.error("group commit failed", size=len(batch), error=str(exc))
            failure = StoreUnavailable(f"could not store the task durably ({type(exc).__name__}); retry")
            for pending in batch:
                pending.future.set_exception(failure)
            return
        metrics.SUBMIT_BATCH_SIZE.observe(len(batch))
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)
