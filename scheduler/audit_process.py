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
and counts it; dispatch goes on), and the next batch starts a new child. A child ends when its socket
closes: at `close()`, or when the scheduler dies (it ignores SIGINT and SIGTERM, so a signal to the
whole process group cannot cut a batch short while the scheduler is still waiting for it).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from facefleet.security.audit import AuditKind, AuditLog, Entry


class AuditWriteFailed(RuntimeError):
    """The child could not write a batch (its error, or it died): nothing of it is acknowledged."""


class AuditProcess:
    """`append_many` for `audit` (its path and signer; its clock is the child's `time.time`), run in a
    child process. One caller at a time (the audit batch writer's thread)."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._connection: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
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
            for kind, count in Counter(kinds).items():
                self.audit.on_record(kind, count)

    def close(self, timeout: float = 10.0) -> None:
        """End the child after the batch it may be writing."""
        if self._connection is not None:
            with contextlib.suppress(OSError):  # it ended already
                self._connection.send(None)
        self._end_child(timeout)

    def _start(self) -> None:
        # A fresh interpreter running this module (not multiprocessing's spawn, which re-runs the
        # parent's __main__ and fails where that is no file), talking over a socket pair.
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())], pass_fds=(theirs.fileno(),), close_fds=True
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        connection = Connection(ours.detach())
        connection.send((str(self.audit.path), self.audit.signer))
        self._connection, self._process = connection, process

    def _end_child(self, timeout: float = 1.0) -> None:
        connection, process = self._connection, self._process
        self._connection = self._process = None
        if connection is not None:
            connection.close()
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)


def serve(connection: Connection) -> None:
    """The child: take (path, signer), then append each batch received and answer None (durable)
    or the error's text; end at EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        path, signer = connection.recv()
    except (EOFError, OSError):
        return
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


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
