"""The scheduler's audit appends in a process of their own: sealing records leaves the GIL to dispatch.

Sealing a record (its canonical JSON, SHA-256 hash and signature) is CPU work that the dispatch
path's threads waited behind: about a tenth of the scheduler's GIL time per task in compare_celery's
run (docs/benchmarks.md). `AuditProcess.append_many` sends a batch of entries to a child process that
appends them with its own `AuditLog` on the same file and answers only after the batch's fsync, so a
batch is exactly as durable when the call returns as with `AuditLog.append_many` in this process.
The file is shared the way `AuditLog` always shares it between processes (flock, the tail re-read
when another writer appended), so the records the scheduler still writes itself (admin acts, access
denials) chain with the child's.

A child that dies or cannot start fails the batch it had, as a failed write does (the writer logs
and counts it; dispatch goes on), and the next batch starts a new child. A child ends when its pipe
closes: at `close()`, or when the scheduler dies (it ignores SIGINT and SIGTERM, so a signal to the
whole process group cannot cut a batch short while the scheduler is still waiting for it).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from facefleet.security.audit import AuditKind, AuditLog, Signer

Entry = tuple[AuditKind | str, str, Mapping[str, Any]]


class AuditWriteFailed(RuntimeError):
    """The child could not write a batch (its error, or it died): nothing of it is acknowledged."""


class AuditProcess:
    """`append_many` for `audit` (its path and signer; its clock is the child's `time.time`), run in a
    child process. One caller at a time (the audit batch writer's thread)."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._connection: Connection | None = None
        self._process: Any = None
        self._start()

    @property
    def pid(self) -> int | None:
        """The child's process id (None between a child's end and the next batch)."""
        return self._process.pid if self._process is not None else None

    def append_many(self, entries: Sequence[Entry]) -> None:
        """Write `entries` in order, chained, durable on return. Raises AuditWriteFailed."""
        if not entries:
            return
        kinds = [AuditKind(kind).value for kind, _actor, _fields in entries]
        if self._connection is None:
            self._start()
        assert self._connection is not None
        try:
            self._connection.send(
                [(kind, actor, dict(fields)) for kind, (_kind, actor, fields) in zip(kinds, entries, strict=True)]
            )
            error = self._connection.recv()
        except (EOFError, OSError) as exc:
            self._end_child()
            ended = f"the audit writer process ended ({exc!r}); the next batch starts a new one"
            raise AuditWriteFailed(ended) from exc
        if error is not None:
            raise AuditWriteFailed(error)
        if self.audit.on_record is not None:
            for kind in kinds:
                self.audit.on_record(kind)

    def close(self, timeout: float = 10.0) -> None:
        """End the child after the batch it may be writing."""
        if self._connection is not None:
            with contextlib.suppress(OSError):  # it ended already
                self._connection.send(None)
        self._end_child(timeout)

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # not fork: the scheduler has threads and gRPC
        ours, theirs = context.Pipe()
        process = context.Process(
            target=serve,
            args=(theirs, str(self.audit.path), self.audit.signer),
            name="facefleet-audit-writer",
            daemon=True,
        )
        try:
            process.start()
        finally:
            theirs.close()
        self._connection, self._process = ours, process

    def _end_child(self, timeout: float = 1.0) -> None:
        connection, process = self._connection, self._process
        self._connection = self._process = None
        if connection is not None:
            connection.close()
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(timeout)


def serve(connection: Connection, path: str, signer: Signer | None) -> None:
    """The child: append each batch received, answer None (durable) or the error's text; end at EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    audit = AuditLog(Path(path), signer)
    try:
        while True:
            try:
                entries = connection.recv()
            except (EOFError, OSError):
                return
            if entries is None:
                return
            try:
                audit.append_many(entries)
            except Exception as exc:  # answered, never raised: the scheduler logs it and goes on
                answer: str | None = f"{type(exc).__name__}: {exc}"
            else:
                answer = None
            try:
                connection.send(answer)
            except OSError:
                return
    finally:
        audit.close()
