"""Group the dispatch workers' completions: one store commit and one wake-up per batch, not per task.

A dispatch worker that reads a terminal Progress (succeeded, failed, cancelled) hands it here and
returns; its agent slot is freed at once (the agent said it is done). One thread takes every
completion pending, applies them as one `apply_changes` (each still conditional on the task being
on that agent, so a late or repeated completion is the store's counted no-op), then calls
`on_recorded` for each that changed the task (metrics, ledger, audit) and `on_batch` once.

Before, each worker waited for its own commit: two thread hand-offs per task on a process whose
threads share one GIL, which is what the profiles of the dispatch path were full of.
A batch the store refuses is retried with backoff; `close()` drains what is pending.

`give_way()` runs before each batch: the dispatcher's `wait_quiet`, which returns once no pass runs
and no submit waits for one (or after a bound). Recording a completion is work nobody waits for;
done while a launch is on its way, it took the GIL from it at each of the launch's SQLite calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import structlog
import tenacity

from facefleet.domain import RUNNING
from facefleet.scheduler.store import Change, Step, TaskRecord
from facefleet.v1 import types_pb2

log = structlog.get_logger()


@dataclass(frozen=True)
class Completion:
    record: TaskRecord  # the task as dispatched
    agent_id: str
    to_state: str
    reason: str
    message: types_pb2.Progress
    at: float
    attempt: int = 0  # the run's attempt (acknowledged to the agent once recorded)
    started: str = ""  # the agent's start, not yet recorded: recorded first, in the same change

    def change(self) -> Change:
        end = Step(self.to_state, self.reason)
        steps = (Step(RUNNING, self.started), end) if self.started else (end,)
        return Change(self.record.id, steps, None, self.agent_id, self.message)

    @cached_property
    def finished_record(self) -> TaskRecord:
        """The task as this completion leaves it (what listeners get, without reading it back;
        built once, for the run's end and again when recorded); `attempts` counts this run, so it
        is the run's attempt number."""
        return self.record.evolve(
            state=self.to_state,
            agent_id=self.agent_id,
            attempts=self.record.attempts + 1,
            last_reason=self.reason,
            updated_at=self.at,
            finished_at=self.at,
        )


ApplyChanges = Callable[[Sequence[Change], float], list[bool | Exception]]


class CompletionBatcher:
    def __init__(
        self,
        apply: ApplyChanges,
        on_recorded: Callable[[Completion], None],
        on_batch: Callable[[], None] = lambda: None,
        max_batch: int = 512,
        attempts: int = 5,
        linger_s: float = 0.0,
        on_refused: Callable[[Completion], None] = lambda _completion: None,
        give_way: Callable[[], None] = lambda: None,
    ) -> None:
        self._apply = apply
        self._on_recorded = on_recorded
        self._on_batch = on_batch
        self._on_refused = on_refused
        self._max_batch = max_batch
        self._attempts = attempts
        self._linger_s = linger_s
        self._give_way = give_way
        self._pending: list[Completion] = []
        self._holding: dict[str, int] = {}  # task id -> its completions put and not yet recorded
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="completions", daemon=True)
        self._thread.start()

    def put(self, completion: Completion) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the dispatcher is stopping; the completion is recorded on the next run")
            self._pending.append(completion)
            task_id = completion.record.id
            self._holding[task_id] = self._holding.get(task_id, 0) + 1
            if len(self._pending) in (1, self._max_batch):  # wake the thread: asleep, or lingering on a full batch
                self._cond.notify()

    def holds(self, task_id: str) -> bool:
        """A completion of `task_id` is waiting for (or in) its commit: the same outcome arriving
        another way (an agent's inventory) needs no second recording; it is acknowledged once recorded."""
        with self._cond:
            return task_id in self._holding

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything put so far is recorded (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._linger_s > 0:  # let more completions join this batch
                    self._cond.wait_for(lambda: len(self._pending) >= self._max_batch or self._closed, self._linger_s)
                if not self._pending:
                    return  # closed and drained
                closed = self._closed
            if not closed:
                self._give_way_safely()
            with self._cond:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._busy = True
            try:
                self._record(batch)
            finally:
                with self._cond:
                    for completion in batch:
                        task_id = completion.record.id
                        left = self._holding.pop(task_id, 1) - 1
                        if left > 0:
                            self._holding[task_id] = left
                    self._busy = False
                    self._cond.notify_all()

    def _give_way_safely(self) -> None:
        try:
            self._give_way()
        except Exception:
            log.exception("waiting for the dispatch path to go quiet failed")

    def _record(self, batch: list[Completion]) -> None:
        changes = [completion.change() for completion in batch]
        try:
            results = tenacity.Retrying(
                stop=tenacity.stop_after_attempt(self._attempts),
                wait=tenacity.wait_exponential(multiplier=0.05, max=2.0),
                reraise=True,
            )(self._apply, changes, batch[-1].at)
        except Exception:
            # Left in flight in the store: a new leader's reconcile or the agent-loss sweep re-queues
            # them, and the agent answers a re-dispatch with the finished result (idempotent ids).
            log.exception("recording completions failed", tasks=[c.record.id for c in batch])
            return
        for completion, result in zip(batch, results, strict=True):
            if result is True:
                try:
                    self._on_recorded(completion)
                except Exception:
                    log.exception("completion hook failed", task_id=completion.record.id)
            else:
                if isinstance(result, Exception):
                    log.error("completion refused by the store", task_id=completion.record.id, error=str(result))
                try:
                    self._on_refused(completion)
                except Exception:
                    log.exception("completion refusal hook failed", task_id=completion.record.id)
        try:
            self._on_batch()
        except Exception:
            log.exception("completion batch hook failed")
