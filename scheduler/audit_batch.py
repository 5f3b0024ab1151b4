"""Group commit for the audit log: one writer thread, one flock + fsync per batch of records.

Callers enqueue `(kind, actor, fields)` entries; the writer takes everything pending and appends it
with `AuditLog.append_many` (records chained in enqueue order, one fsync). `wait(ticket)` blocks
until the entry with that ticket (and so every entry enqueued before it) is durable, which lets the
dispatcher enqueue a whole pass of records and wait once before it sends the RunTask calls.

`enqueue(..., linger=True)` (completion records: the store already holds the completion) does not
wake the writer: such a record goes out with the next batch anyone waits for (a dispatch pass's
flush) or at the latest `linger_s` later, so at low load a task's records cost one fsync, not two.

A failed write is logged loudly and its waiters are released: an audit failure never stops
dispatch (the task store stays the source of truth), exactly as with synchronous appends.

`enqueue_staged(tag, entries)`: records the task store already holds durably (staged with the
decisions they record, `TaskStore.stage_records_in`); they linger like completions, and once all of
a tag's records are written or failed (one batch holds all of them) `on_staged(tags, written)` hears so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from facefleet.security.audit import AuditKind, AuditLog, Entry

log = structlog.get_logger()

LINGER_S = 0.1  # the longest a lingering record waits for a batch to share


class Appender(Protocol):
    """Writes a batch durably: `AuditLog` itself, or `AuditProcess` (the same, in a child process)."""

    def append_many(self, entries: Sequence[Entry]) -> Any: ...
    def close(self) -> None: ...


class AuditBatchWriter:
    def __init__(
        self,
        audit: AuditLog,
        max_batch: int = 1024,
        linger_s: float = LINGER_S,
        appender: Appender | None = None,
        on_staged: Callable[[list[str], bool], None] | None = None,
    ) -> None:
        self.audit = audit
        self.on_staged = on_staged
        self._appender: Appender = appender if appender is not None else audit
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._pending: list[Entry] = []
        self._tags: list[str] = []  # per pending entry: its staged row ("" = none)
        self._due = False  # a pending entry is waited for (or may not linger): write now
        self._enqueued = 0  # tickets handed out (ticket n = the n-th entry ever enqueued)
        self._written = 0  # entries whose write has finished (durable, or failed and logged)
        self._failed = 0
        self._closed = False
        # One lock, two conditions: the writer sleeps on `_has_work` and is woken only when the
        # queue goes from empty to non-empty; waiters sleep on `_changed`. (One condition with
        # notify_all on every enqueue woke every waiter and the writer per record: a convoy of
        # thread switches on the dispatch path.)
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        self._has_work = threading.Condition(self._mutex)
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> int:
        """Entries that could not be written (each was logged)."""
        return self._failed

    def enqueue(self, kind: AuditKind | str, actor: str, fields: Mapping[str, Any], linger: bool = False) -> int:
        """Queue one record; returns its ticket for `wait`. Raises ValueError for an unknown kind.
        `linger`: written with the next batch, or `linger_s` from now at the latest."""
        return self._enqueue([(AuditKind(kind), actor, dict(fields))], linger, "")

    def enqueue_staged(self, tag: str, entries: Sequence[Entry]) -> int:
        """Queue records the store holds as staged row `tag` (lingering); returns the last one's ticket."""
        return self._enqueue([(AuditKind(kind), actor, dict(fields)) for kind, actor, fields in entries], True, tag)

    def _enqueue(self, entries: list[Entry], linger: bool, tag: str) -> int:
        with self._changed:
            if self._closed:
                raise RuntimeError("the audit writer is closed; the scheduler is shutting down")
            was_empty = not self._pending
            self._pending.extend(entries)
            self._tags.extend([tag] * len(entries))
            self._enqueued += len(entries)
            if was_empty or not (linger or self._due):
                self._due = self._due or not linger
                self._has_work.notify()  # the first entry starts the linger clock; a due one ends it
            return self._enqueued

    def write(self, kind: AuditKind | str, actor: str, fields: Mapping[str, Any], timeout: float = 30.0) -> None:
        """Queue one record and wait until it is written."""
        self.wait(self.enqueue(kind, actor, fields), timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every record enqueued so far is written."""
        with self._changed:
            ticket = self._enqueued
        self.wait(ticket, timeout)

    def wait(self, ticket: int, timeout: float = 30.0) -> None:
        with self._changed:
            if self._written < ticket and self._pending and not self._due:  # lingering ones are awaited now
                self._due = True
                self._has_work.notify()
            if not self._changed.wait_for(lambda: self._written >= ticket, timeout):
                log.error("audit write still pending after timeout", ticket=ticket, timeout_s=timeout)

    def close(self, timeout: float = 10.0) -> None:
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._has_work.notify()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._appender.close()
            if self._appender is not self.audit:
                self.audit.close()

    def _run(self) -> None:
        while True:
            with self._has_work:
                self._has_work.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return  # closed and drained
                # Only lingering entries: wait for company (a due entry, a waiter) up to linger_s.
                self._has_work.wait_for(lambda: self._due or self._closed, self._linger_s)
                size = min(self._max_batch, len(self._pending))
                while size < len(self._pending) and self._tags[size] and self._tags[size] == self._tags[size - 1]:
                    size += 1  # a staged row's records go in one batch: written or failed together
                batch, tags = self._pending[:size], self._tags[:size]
                del self._pending[:size], self._tags[:size]
                self._due = bool(self._pending)
            ok = True
            try:
                self._appender.append_many(batch)
            except Exception:
                ok = False
                self._failed += len(batch)
                log.exception("audit_write_failed", records=len(batch), kinds=sorted({str(e[0]) for e in batch}))
            with self._changed:
                self._written += len(batch)
                self._changed.notify_all()
            rows = [tag for tag in dict.fromkeys(tags) if tag]
            if rows and self.on_staged is not None:
                try:
                    self.on_staged(rows, ok)
                except Exception:
                    log.exception("audit_unstage_failed", rows=len(rows))
