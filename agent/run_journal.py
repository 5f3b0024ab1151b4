"""The agent's run journal: every run it accepted and its outcome, durable across restarts.

One SQLite database (WAL, `synchronous=FULL`) in the agent's data directory. A run is journaled
(task id, attempt, leader term) before its thread starts, and its outcome (the final Progress:
state, output URI, checkpoint, quality) before the scheduler can see it. An outcome stays in the
inventory the agent reports until the scheduler acknowledges it; the row itself stays, so a task
that succeeded here is never started again (a repeat replays the recorded outcome).

The journal also keeps the newest leader term the agent has seen: a dispatch from an older term
is refused (fencing). `note_term` and `accept` serialize on one lock, so an inventory built after
`note_term(t)` lists every run accepted from a term older than `t`.

A run found unfinished when the journal opens was cut short by an agent restart: it is closed as
PREEMPTED (resume from its checkpoint), an outcome like any other. Acknowledged runs older than
`retention_days` are dropped when the journal opens: the scheduler has recorded them long ago.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from facefleet.domain import TERMINAL_PROTO
from facefleet.v1 import types_pb2

# A run ends on this agent when its task is terminal or was preempted (it may resume elsewhere):
# its final Progress is the outcome the journal keeps.
RUN_ENDED_STATES = frozenset(TERMINAL_PROTO | {types_pb2.TASK_STATE_PREEMPTED})
JOURNAL_FILE = "run-journal.db"
RESTART_MESSAGE = "the agent restarted during the run; resume from the checkpoint"
RETENTION_DAYS = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    leader_term INTEGER NOT NULL,
    state TEXT NOT NULL,               -- running | finished
    outcome BLOB,                      -- types.Progress, final
    acknowledged INTEGER NOT NULL DEFAULT 0,
    accepted_at REAL NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
CREATE INDEX IF NOT EXISTS runs_open ON runs (acknowledged, state);
CREATE TABLE IF NOT EXISTS fence (id INTEGER PRIMARY KEY CHECK (id = 1), leader_term INTEGER NOT NULL);
INSERT OR IGNORE INTO fence (id, leader_term) VALUES (1, 0);
"""


@dataclass(frozen=True)
class JournaledRun:
    task_id: str
    attempt: int
    leader_term: int
    outcome: types_pb2.Progress | None  # None while running

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def succeeded(self) -> bool:
        return self.outcome is not None and self.outcome.state == types_pb2.TASK_STATE_SUCCEEDED

    def report(self) -> types_pb2.RunReport:
        report = types_pb2.RunReport(
            task_id=self.task_id, attempt=self.attempt, leader_term=self.leader_term, finished=self.finished
        )
        if self.outcome is not None:
            report.outcome.CopyFrom(self.outcome)
        return report


class RunJournal:
    def __init__(self, path: Path, retention_days: float = RETENTION_DAYS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.leader_term = int(self._db.execute("SELECT leader_term FROM fence").fetchone()[0])
        self.interrupted = self._close_interrupted()
        self._db.execute(
            "DELETE FROM runs WHERE acknowledged = 1 AND accepted_at < ?", (time.time() - retention_days * 86400,)
        )

    @classmethod
    def in_dir(cls, directory: Path) -> RunJournal:
        return cls(Path(directory) / JOURNAL_FILE)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- fencing -------------------------------------------------------------------------------

    def note_term(self, term: int) -> bool:
        """Remember a newer leader term (durably); True when it was newer."""
        with self._lock:
            if term <= self.leader_term:
                return False
            self._db.execute("UPDATE fence SET leader_term = ? WHERE id = 1", (term,))
            self.leader_term = term
            return True

    # --- runs ----------------------------------------------------------------------------------

    def accept(self, task_id: str, attempt: int, term: int) -> str:
        """Journal a new run; "" when accepted, else why not (a stale term). Durable on return."""
        with self._lock:
            if term < self.leader_term:
                return (
                    f"leader term {term} is older than term {self.leader_term} this agent has seen: "
                    "a newer scheduler leads; this dispatch is stale"
                )
            if term > self.leader_term:
                self._db.execute("UPDATE fence SET leader_term = ? WHERE id = 1", (term,))
                self.leader_term = term
            self._db.execute(
                "INSERT OR REPLACE INTO runs (task_id, attempt, leader_term, state, accepted_at)"
                " VALUES (?, ?, ?, 'running', ?)",
                (task_id, attempt, term, time.time()),
            )
            return ""

    def finish(self, task_id: str, attempt: int, outcome: types_pb2.Progress) -> None:
        """Record a run's outcome (durable on return), before anyone is told."""
        with self._lock:
            self._db.execute(
                "UPDATE runs SET state = 'finished', outcome = ? WHERE task_id = ? AND attempt = ?",
                (outcome.SerializeToString(), task_id, attempt),
            )

    def acknowledge(self, refs: list[tuple[str, int]]) -> None:
        """The scheduler recorded these outcomes: stop reporting them (the rows stay: never rerun)."""
        if not refs:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE runs SET acknowledged = 1 WHERE task_id = ? AND attempt = ? AND state = 'finished'", refs
            )
            self._db.execute("COMMIT")

    def latest(self, task_id: str) -> JournaledRun | None:
        """The task's newest attempt here, or None when it never ran here."""
        with self._lock:
            row = self._db.execute(
                "SELECT task_id, attempt, leader_term, outcome FROM runs WHERE task_id = ? ORDER BY attempt DESC",
                (task_id,),
            ).fetchone()
        return _run(row) if row is not None else None

    def succeeded(self, task_id: str) -> JournaledRun | None:
        """The attempt of `task_id` that succeeded here, if any: success is final."""
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, attempt, leader_term, outcome FROM runs"
                " WHERE task_id = ? AND state = 'finished' ORDER BY attempt DESC",
                (task_id,),
            ).fetchall()
        for run in map(_run, rows):
            if run.succeeded:
                return run
        return None

    def inventory(self) -> list[JournaledRun]:
        """Every run still going and every outcome not yet acknowledged."""
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, attempt, leader_term, outcome FROM runs WHERE acknowledged = 0"
            ).fetchall()
        return [_run(row) for row in rows]

    def all_runs(self) -> list[JournaledRun]:
        """Everything journaled (audits and tests: what this agent ran, from its own records)."""
        with self._lock:
            rows = self._db.execute("SELECT task_id, attempt, leader_term, outcome FROM runs").fetchall()
        return [_run(row) for row in rows]

    def _close_interrupted(self) -> list[str]:
        rows = self._db.execute("SELECT task_id, attempt FROM runs WHERE state = 'running'").fetchall()
        for task_id, attempt in rows:
            outcome = types_pb2.Progress(
                task_id=task_id,
                state=types_pb2.TASK_STATE_PREEMPTED,
                message=RESTART_MESSAGE,
                error=types_pb2.Error(reason=types_pb2.PREEMPTED, message=RESTART_MESSAGE),
            )
            self._db.execute(
                "UPDATE runs SET state = 'finished', outcome = ? WHERE task_id = ? AND attempt = ?",
                (outcome.SerializeToString(), task_id, attempt),
            )
        return [task_id for task_id, _attempt in rows]


def _run(row: tuple[str, int, int, bytes | None]) -> JournaledRun:
    task_id, attempt, term, blob = row
    outcome = None
    if blob is not None:
        outcome = types_pb2.Progress()
        outcome.ParseFromString(blob)
    return JournaledRun(task_id, int(attempt), int(term), outcome)
