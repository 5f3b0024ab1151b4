"""Durable task store: SQLAlchemy Core over SQLite (embedded default) or PostgreSQL (production).

One schema for both. Every state change goes through `transition()`, which locks the row
(`SELECT ... FOR UPDATE` on PostgreSQL; `BEGIN IMMEDIATE` serialises writers on SQLite), refuses
illegal moves (see `scheduler.task_states`) and appends a row to `transitions` in the same
transaction. A second completion of a finished task is a counted, logged no-op.

SQLite runs in WAL mode with `synchronous=FULL`: every commit is fsynced, so an id handed to a
client survives power loss, not only a process crash. Group commit (`scheduler.group_commit`)
amortises the fsync over many submits, which is what makes FULL affordable.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from facefleet.domain import DISPATCHED, IN_FLIGHT, PLACED, QUEUED, TERMINAL, sensitivity_from_proto
from facefleet.scheduler import metrics, schema, task_states
from facefleet.security.audit import Entry
from facefleet.v1 import types_pb2

log = structlog.get_logger()

metadata = sa.MetaData()
SCHEMA_VERSION = 3  # of the tables below: raise it with each change, with a step (`_MIGRATIONS`)


tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("idempotency_key", sa.String(200), unique=True, nullable=True),
    sa.Column("project", sa.String(64), nullable=False),
    sa.Column("sensitivity", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("pool", sa.String(128), nullable=True),
    sa.Column("rule", sa.String(128), nullable=True),
    sa.Column("agent_id", sa.String(128), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("checkpoint_frame", sa.Integer, nullable=False, default=0),
    sa.Column("checkpoint_uri", sa.Text, nullable=False, default=""),
    sa.Column("placement", sa.JSON, nullable=True),
    sa.Column("placement_proto", sa.LargeBinary, nullable=True),
    sa.Column("task_proto", sa.LargeBinary, nullable=False),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("not_before", sa.Float, nullable=False, default=0.0),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("last_reason", sa.Text, nullable=False, default=""),
    sa.Index("ix_tasks_project_state", "project", "state"),
    sa.Index("ix_tasks_agent_state", "agent_id", "state"),
    sa.Index("ix_tasks_submitted", "submitted_at", "id"),
    # ListTasks by state or by project walks these in (submitted_at, id) order: a range scan, no sort.
    sa.Index("ix_tasks_state_submitted", "state", "submitted_at", "id"),
    sa.Index("ix_tasks_project_submitted", "project", "submitted_at", "id"),
)

transitions = sa.Table(
    "transitions",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(40), nullable=False),
    sa.Column("from_state", sa.String(16), nullable=False),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("pool", sa.String(128), nullable=False, default=""),
    sa.Column("agent_id", sa.String(128), nullable=False, default=""),
    sa.Index("ix_transitions_task", "task_id", "seq"),
)

progress = sa.Table(
    "progress",
    metadata,
    sa.Column("task_id", sa.String(40), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("progress_proto", sa.LargeBinary, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

# The leader term: one row per leader lock name, raised each time a replica gains leadership. It
# fences dispatches (agents refuse a term older than one they have seen), so it must never go back:
# raised in one transaction under the leader lock, and never below the wall clock in milliseconds,
# so a scheduler on a fresh database still outranks every term its agents saw before.
leader_terms = sa.Table(
    "leader_terms",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("term", sa.BigInteger, nullable=False),
)

# Audit records committed with the decisions they record (`stage_records_in`): one row per commit,
# its records as a JSON list of [kind, actor, fields]. The audit trail writes them to the
# tamper-evident log after the commit and then deletes the row (docs/security.md, "Audit log format").
audit_outbox = sa.Table(
    "audit_outbox",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),  # time-ordered (`new_task_id`'s form)
    sa.Column("at", sa.Float, nullable=False),  # staged at: the order they are written in
    sa.Column("records", sa.Text, nullable=False),
)


def _drop_the_unread_index(conn: Connection) -> None:
    """2 -> 3: `ix_tasks_state_not_before` goes. No query reads it (`runnable_ids` walks the
    queue-order index), and every write of a task's state wrote a page of it."""
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_tasks_state_not_before")


# 1 -> 2 adds `audit_outbox` (create_all makes it): a facefleet without it would leave its rows unwritten.
_MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: lambda _conn: None, 2: _drop_the_unread_index}


T = TypeVar("T")


def new_task_id() -> str:
    """A UUIDv7 (RFC 9562) in hex: 48 bits of Unix time in milliseconds, the version, 74 random bits.

    Ids minted later sort later (to the millisecond), so each index keyed by task id (the tasks'
    primary key, `transitions`, `progress`) grows at its right edge: a commit of many tasks touches
    one or two of its pages, not one page per task anywhere in an index as large as the history
    (docs/benchmarks.md). The random bits keep ids unguessable; the time in them is the submit's."""
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits: 12 for rand_a, 62 for rand_b
    millis = time.time_ns() // 1_000_000
    value = millis << 80 | 0x7 << 76 | (rand >> 68) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
    return f"{value:032x}"


class Writer(Protocol):
    def run(self, op: Callable[[Connection], T], isolated: bool = True) -> T: ...
    def on_writer_thread(self) -> bool: ...


class IllegalTransition(Exception):
    def __init__(self, task_id: str, from_state: str, to_state: str) -> None:
        super().__init__(f"task {task_id}: transition {from_state} -> {to_state} is not allowed by the state machine")
        self.task_id = task_id
        self.from_state = from_state
        self.to_state = to_state


class UnknownTask(KeyError):
    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"no task with id {self.task_id!r}; list tasks with `facefleet tasks`"


@dataclass(frozen=True)
class NewTask:
    """A validated task ready to insert (the intake's output). `task_id` is the id it is stored
    under (known before the insert: the dispatcher may plan its launch in the same transaction); a
    repeated idempotency key returns the existing task's id instead."""

    task: types_pb2.Task
    idempotency_key: str
    task_id: str = dataclasses.field(default_factory=new_task_id)

    @functools.cached_property
    def stored_task(self) -> types_pb2.Task:
        """The task as stored: the submitted one under its id (read it, do not change it)."""
        task = types_pb2.Task()
        task.CopyFrom(self.task)
        task.id = self.task_id
        return task

    @functools.cached_property
    def _stored_proto(self) -> bytes:
        return self.stored_task.SerializeToString()

    def queued_record(self, now: float) -> TaskRecord:
        """The row `TaskStore` stores for this task at `now` (the dispatcher plans on it before)."""
        task = self.stored_task
        return TaskRecord(
            id=self.task_id, idempotency_key=self.idempotency_key or None, project=task.project,
            sensitivity=sensitivity_from_proto(task.sensitivity), priority=int(task.priority), state=QUEUED,
            pool=None, rule=None, agent_id=None, attempts=0, checkpoint_frame=0, checkpoint_uri="", placement=None,
            placement_proto=None, task_proto=self._stored_proto, submitted_at=now, updated_at=now,
            not_before=0.0, finished_at=None, last_reason="submitted",
        )  # fmt: skip


@dataclass(frozen=True)
class SubmitResult:
    task_id: str
    created: bool
    state: str


@dataclass(frozen=True)
class TaskRecord:
    id: str
    idempotency_key: str | None
    project: str
    sensitivity: str
    priority: int
    state: str
    pool: str | None
    rule: str | None
    agent_id: str | None
    attempts: int
    checkpoint_frame: int
    checkpoint_uri: str
    placement: dict[str, Any] | None
    placement_proto: bytes | None
    task_proto: bytes
    submitted_at: float
    updated_at: float
    not_before: float
    finished_at: float | None
    last_reason: str

    def task(self) -> types_pb2.Task:
        task = types_pb2.Task()
        task.ParseFromString(self.task_proto)
        return task

    def evolve(self, **changes: Any) -> TaskRecord:
        """`dataclasses.replace(self, **changes)` without re-running `__init__` (no field here is
        derived or checked): the dispatch path makes one or two of these per task."""
        unknown = changes.keys() - self.__dict__.keys()
        if unknown:
            raise TypeError(f"TaskRecord has no field {sorted(unknown)[0]!r}")
        copy = object.__new__(TaskRecord)
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy

    def placement_decision(self) -> types_pb2.PlacementDecision | None:
        if self.placement_proto is None:
            return None
        decision = types_pb2.PlacementDecision()
        decision.ParseFromString(self.placement_proto)
        return decision


@dataclass(frozen=True)
class TransitionRecord:
    seq: int
    task_id: str
    from_state: str
    to_state: str
    reason: str
    at: float
    pool: str
    agent_id: str


@dataclass(frozen=True)
class ProgressRecord:
    task_id: str
    version: int
    progress: types_pb2.Progress
    at: float


@dataclass(frozen=True)
class Placement:
    """What the dispatcher records when it places a task."""

    pool: str
    rule: str
    summary: dict[str, Any]
    decision: bytes


@dataclass(frozen=True)
class Step:
    """One transition in a `transition_chain`, with the columns it sets."""

    to_state: str
    reason: str
    pool: str | None = None
    agent_id: str | None = None
    placement: Placement | None = None
    not_before: float | None = None
    count_attempt: bool = False
    fresh_start: bool = False  # forget the task's checkpoint: its next run starts from frame 0


@dataclass(frozen=True)
class Change:
    """Transitions for one task, applied only if it is still where the caller thinks it is."""

    task_id: str
    steps: tuple[Step, ...]
    expect_from: str | None = None
    expect_agent: str | None = None
    progress: types_pb2.Progress | None = None


@dataclass(frozen=True)
class _Moved:
    """Where a `Change`'s steps take a task: its transitions' rows and the columns they set."""

    state: str
    transitions: list[tuple[Any, ...]]  # (task_id, from_state, to_state, reason, at, pool, agent_id)
    pool: str | None
    agent_id: str | None
    rule: str | None
    placement_json: str | None
    placement_proto: bytes | None
    not_before: float | None
    attempts: int  # added to the task's count
    finished_at: float | None


def _moved(
    task_id: str, current: str, steps: Sequence[Step], pool: str | None, agent: str | None, now: float
) -> _Moved:
    """`steps` applied to a task in `current` on (`pool`, `agent`); raises IllegalTransition for a
    step the state machine does not allow, before anything is written."""
    state = current
    for step in steps:
        if not task_states.is_legal(state, step.to_state):
            raise IllegalTransition(task_id, state, step.to_state)
        state = step.to_state
    rule = placement_json = placement_proto = not_before = finished_at = None
    attempts = 0
    rows = []
    for step in steps:
        if step.placement is not None:
            pool, rule = step.placement.pool, step.placement.rule
            placement_json = json.dumps(step.placement.summary)
            placement_proto = step.placement.decision
        pool = step.pool if step.pool is not None else pool
        agent = step.agent_id if step.agent_id is not None else agent
        not_before = step.not_before if step.not_before is not None else not_before
        attempts += 1 if step.count_attempt else 0
        if step.to_state in TERMINAL:
            finished_at = now
        rows.append((task_id, current, step.to_state, step.reason, now, pool or "", agent or ""))
        current = step.to_state
    return _Moved(state, rows, pool, agent, rule, placement_json, placement_proto, not_before, attempts, finished_at)


def _record(row: sa.Row[Any]) -> TaskRecord:
    return TaskRecord(**row._mapping)


_RECORD_FIELDS = [field.name for field in dataclasses.fields(TaskRecord)]
_RECORD_COLUMNS = ", ".join(_RECORD_FIELDS)
_PLACEMENT_AT = _RECORD_FIELDS.index("placement")
_IDS_PER_READ = 500  # ids per `IN (...)` read: well inside every SQLite build's parameter limit


def _driver_cursor(conn: Connection) -> Any:
    """The DBAPI driver's own cursor on `conn`, inside its transaction (no per-execute overhead)."""
    driver = conn.connection.driver_connection
    assert driver is not None, "the connection is closed"
    return driver.cursor()


def _record_from_tuple(row: Sequence[Any]) -> TaskRecord:
    """A record from a driver row selected with `_RECORD_COLUMNS` (the dispatch path's fast read)."""
    values = list(row)
    placement = values[_PLACEMENT_AT]
    if isinstance(placement, str):  # SQLite hands JSON back as text; PostgreSQL already decoded it
        values[_PLACEMENT_AT] = json.loads(placement)
    return TaskRecord(*values)


def queued_in_order(ids: Sequence[str], records: dict[str, TaskRecord]) -> list[TaskRecord]:
    """The records of `ids` in that order, leaving out those no longer queued (a row may move
    between the read of the ids and the read of the records)."""
    return [record for record in map(records.get, ids) if record is not None and record.state == QUEUED]


def encode_page_token(submitted_at: float, task_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([submitted_at, task_id]).encode()).decode()


def decode_page_token(token: str) -> tuple[float, str]:
    """Raises ValueError with an actionable message for a token this server did not issue."""
    try:
        submitted_at, task_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(submitted_at), str(task_id)
    except Exception as exc:
        raise ValueError("page_token is not one this server issued; pass next_page_token unchanged") from exc


class StoreUnusable(RuntimeError):
    """The store URL names no database this scheduler can use, or the database cannot be reached."""


def check_store(url: str, connect_timeout_s: int = 5) -> None:
    """Fail fast, with a sentence a person can act on, when `url` cannot serve as the task store:
    an unknown scheme or driver, a malformed URL, or a database server that does not answer."""
    try:
        parsed = sa.engine.make_url(url)
        shown = parsed.render_as_string(hide_password=True)
        parsed.get_dialect()
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as exc:
        without_secret = re.sub(r"//[^/@]*@", "//***@", url[:120])
        raise StoreUnusable(
            f"store URL {without_secret!r} is not usable ({exc}); use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        ) from None
    except ImportError as exc:
        raise StoreUnusable(f"store {shown}: its database driver is not installed ({exc})") from None
    if parsed.get_backend_name() == "sqlite":
        return
    engine = sa.create_engine(parsed, connect_args={"connect_timeout": connect_timeout_s}, poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            pass
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StoreUnusable(f"cannot reach the store {shown}: {reason}") from None
    finally:
        engine.dispose()


_QUEUE_DECISION = (
    tasks.update()
    .where(tasks.c.id == sa.bindparam("b_id"), tasks.c.state == QUEUED)
    .values(
        placement=sa.bindparam("b_placement", type_=tasks.c.placement.type),
        placement_proto=sa.bindparam("b_proto", type_=tasks.c.placement_proto.type),
        rule=sa.bindparam("b_rule"),
        updated_at=sa.bindparam("b_at"),
    )
)


class TaskStore:
    """All task persistence. Thread-safe: every method opens its own connection/transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self._writer = self._sqlite_engine(url, immediate=True)
            self._reader = self._sqlite_engine(url, immediate=False)
        else:
            self._writer = sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
            self._reader = self._writer
        schema.prepare(self._writer, metadata, "task_store", SCHEMA_VERSION, _MIGRATIONS)
        with warnings.catch_warnings():  # reflection cannot describe the queue-order expression index
            warnings.filterwarnings("ignore", "Skipped unsupported reflection", sa.exc.SAWarning)
            for index in tasks.indexes:  # create_all skips indexes added to a table that already exists
                index.create(self._writer, checkfirst=True)
        self._writer_thread: Writer | None = None
        # SQLite: each thread keeps one read connection (`_driver_read`), out of the pool: its
        # checkout and check-in (a rollback) cost more than the dispatcher's queue read itself.
        self._held_reads = threading.local() if self.is_sqlite else None
        self._insert_statements: tuple[str, str] | None = None
        self._apply_statements: dict[str, str] | None = None
        self._queue_indexes: set[float] = set()
        # Changes this process wrote that leave a task queued (re-queues): a reader that found the
        # queue empty knows it may have changed (counted as the change is written, before its commit).
        self.requeues = 0
        # Changes this process wrote that take a task out of the queue other than by a launch (a
        # cancel, a reject): a reader that kept part of the queue knows it changed (`queue_read`).
        self.unqueued = 0

    @property
    def _mark(self) -> str:
        """The driver's parameter placeholder in plain SQL (sqlite3: `?`, psycopg: `%s`)."""
        return "?" if self._writer.dialect.paramstyle == "qmark" else "%s"

    @property
    def engine(self) -> Engine:
        """The write engine: other stores of the scheduler (budget ledger) share its database."""
        return self._writer

    @staticmethod
    def _sqlite_engine(url: str, immediate: bool) -> Engine:
        engine = sa.create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=32, max_overflow=64
        )

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (SQLAlchemy recipe)
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            _driver_cursor(conn).execute(begin)  # not exec_driver_sql: its set-up cost more than the BEGIN

        return engine

    def close(self) -> None:
        self._writer.dispose()
        if self._reader is not self._writer:
            self._reader.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    def attach_writer(self, writer: Writer | None) -> None:
        """Route every write through `writer` (scheduler.group_commit): one writer thread, batched
        commits, no lock contention between threads. None = each call commits on its own."""
        self._writer_thread = writer

    def write(self, op: Callable[[Connection], T]) -> T:
        """Run `op(conn)` in one write transaction (the group commit's, when one is attached); `op`
        checks everything before it writes (no savepoint)."""
        return self._execute_write(op)

    def _execute_write(self, op: Callable[[Connection], T], isolated: bool = False) -> T:
        """Our operations check everything before they write, so they need no savepoint."""
        writer = self._writer_thread
        if writer is not None and not writer.on_writer_thread():
            return writer.run(op, isolated=isolated)
        with self._write() as conn:
            return op(conn)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._reader.connect() as conn:
            yield conn

    # ---- intake -------------------------------------------------------------------------------

    def insert_batch(self, batch: Sequence[NewTask], now: float) -> list[SubmitResult]:
        """Insert many tasks in ONE transaction; repeated idempotency keys return the existing task.

        On a unique-key race with another replica the batch is retried item by item.
        """
        try:
            with self._write() as conn:
                return self._insert_batch(conn, batch, now)
        except IntegrityError:
            results = []
            for item in batch:
                with self._write() as conn:
                    results.extend(self._insert_batch(conn, [item], now))
            return results

    def _insert_batch(self, conn: Connection, batch: Sequence[NewTask], now: float) -> list[SubmitResult]:
        return self._insert(conn, batch, now, {})[0]

    def insert_and_apply_in(
        self, conn: Connection, batch: Sequence[NewTask], changes: Sequence[Change], now: float
    ) -> tuple[list[SubmitResult], list[bool | Exception]]:
        """Insert `batch` and apply `changes` in the caller's transaction (the dispatcher's launches
        of submits with their intake: `GroupCommitter.insert_with`); each change gets the result
        `apply_changes_in` gives it. A change to a task this call creates is written with its
        insert: the row goes in where the change takes it, with every transition from `submitted`
        on, instead of in as queued and then moved (each index written once; a launched task's entry
        never enters the queue-order index)."""
        created = {item.task_id for item in batch}
        moves = {
            change.task_id: change
            for change in changes
            if change.task_id in created
            and change.expect_from in (None, QUEUED)
            and change.expect_agent is None
            and change.progress is None
        }
        results, moved = self._insert(conn, batch, now, moves)
        rest = [change for change in changes if change.task_id not in moved]
        applied = dict(zip([change.task_id for change in rest], self.apply_changes_in(conn, rest, now), strict=True))
        return results, [moved[c.task_id] if c.task_id in moved else applied[c.task_id] for c in changes]

    def _insert(
        self, conn: Connection, batch: Sequence[NewTask], now: float, moves: Mapping[str, Change]
    ) -> tuple[list[SubmitResult], dict[str, bool | Exception]]:
        """Insert `batch`, each new task moved on from queued by its change in `moves` (if any);
        returns the submits' results and the results of the changes it applied."""
        keys = {item.idempotency_key for item in batch if item.idempotency_key}
        existing: dict[str, SubmitResult] = {}
        if keys:
            rows = conn.execute(
                sa.select(tasks.c.idempotency_key, tasks.c.id, tasks.c.state).where(tasks.c.idempotency_key.in_(keys))
            )
            existing = {row.idempotency_key: SubmitResult(row.id, False, row.state) for row in rows}
        results: list[SubmitResult] = []
        applied: dict[str, bool | Exception] = {}
        task_rows: list[tuple[Any, ...]] = []
        transition_rows: list[tuple[Any, ...]] = []
        for item in batch:
            key = item.idempotency_key or None
            if key is not None and key in existing:
                results.append(existing[key])
                continue
            row = item.queued_record(now)
            task_id = row.id
            transition_rows.append((task_id, "", QUEUED, "submitted", now, "", ""))
            fields: tuple[Any, ...] = (QUEUED, None, None, None, 0, None, None, 0.0, None, "submitted")
            change = moves.get(task_id)
            if change is not None:
                try:
                    moved = _moved(task_id, QUEUED, change.steps, None, None, now)
                except IllegalTransition as error:  # refused before anything is written: it goes in queued
                    applied[task_id] = error
                else:
                    applied[task_id] = True
                    transition_rows.extend(moved.transitions)
                    fields = (
                        moved.state, moved.pool, moved.rule, moved.agent_id, moved.attempts, moved.placement_json,
                        moved.placement_proto, moved.not_before or 0.0, moved.finished_at, change.steps[-1].reason,
                    )  # fmt: skip
            submitted = (task_id, key, row.project, row.sensitivity, row.priority, row.task_proto, now, now)
            task_rows.append((*submitted, *fields))
            if key is not None:
                existing[key] = SubmitResult(task_id, False, QUEUED)
            results.append(SubmitResult(task_id, True, QUEUED))
        if task_rows:
            # Straight to the driver's cursor: this is the intake hot path, and first Core's per-row
            # work, then SQLAlchemy's per-execute set-up showed up in profiles. Columns not listed
            # take their server defaults.
            task_sql, transition_sql = self._insert_sql()
            cursor = _driver_cursor(conn)
            cursor.executemany(task_sql, task_rows)
            cursor.executemany(transition_sql, transition_rows)
        return results, applied

    def _insert_sql(self) -> tuple[str, str]:
        if self._insert_statements is None:
            mark = self._mark

            def statement(table: str, columns: str, count: int, constants: str) -> str:
                return f"INSERT INTO {table} ({columns}) VALUES ({', '.join([mark] * count)}{constants})"

            self._insert_statements = (
                statement(
                    "tasks",
                    "id, idempotency_key, project, sensitivity, priority, task_proto, submitted_at, updated_at, "
                    "state, pool, rule, agent_id, attempts, placement, placement_proto, not_before, finished_at, "
                    "last_reason, checkpoint_frame, checkpoint_uri",
                    18,
                    ", 0, ''",
                ),
                statement("transitions", "task_id, from_state, to_state, reason, at, pool, agent_id", 7, ""),
            )
        return self._insert_statements

    # ---- reads --------------------------------------------------------------------------------

    def next_leader_term(self, name: str, now: float) -> int:
        """Raise and return this lock's leader term (call once leadership is gained)."""
        with self._write() as conn:
            current = conn.execute(sa.select(leader_terms.c.term).where(leader_terms.c.name == name)).scalar()
            term = max(int(current or 0) + 1, int(now * 1000))
            if current is None:
                conn.execute(sa.insert(leader_terms).values(name=name, term=term))
            else:
                conn.execute(sa.update(leader_terms).where(leader_terms.c.name == name).values(term=term))
        return term

    def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskRecord]:
        """The records of `task_ids` that exist, by id (one read per 500 ids)."""
        found: dict[str, TaskRecord] = {}
        ids = list(dict.fromkeys(task_ids))
        for start in range(0, len(ids), _IDS_PER_READ):
            chunk = ids[start : start + _IDS_PER_READ]
            marks = ", ".join([self._mark] * len(chunk))
            for row in self._driver_read(f"SELECT {_RECORD_COLUMNS} FROM tasks WHERE id IN ({marks})", chunk):
                record = _record_from_tuple(row)
                found[record.id] = record
        return found

    def get(self, task_id: str) -> TaskRecord:
        rows = self._driver_read(f"SELECT {_RECORD_COLUMNS} FROM tasks WHERE id = {self._mark}", (task_id,))
        if not rows:
            raise UnknownTask(task_id)
        return _record_from_tuple(rows[0])

    def _driver_read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Rows of one read statement, on the driver directly: the dispatch path reads tasks by id
        often, and SQLAlchemy's per-statement work was ~10x the SQLite lookup itself."""
        held = self._held_reads
        raw = getattr(held, "connection", None) if held is not None else None
        if raw is None:
            raw = self._reader.raw_connection()
            if held is not None:
                raw.detach()  # closed when this thread (or the store) goes away
                held.connection = raw
        try:
            cursor = raw.cursor()
            cursor.execute(sql, tuple(params))  # SQLite autocommit: fetchall ends the statement and its snapshot
            return list(cursor.fetchall())
        except Exception:
            if held is not None:
                held.connection = None  # the next read opens another
            raise
        finally:
            if held is None or held.connection is None:
                raw.close()

    def transitions_of(self, task_id: str, after_seq: int = 0) -> list[TransitionRecord]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(transitions)
                .where(transitions.c.task_id == task_id, transitions.c.seq > after_seq)
                .order_by(transitions.c.seq)
            )
            return [TransitionRecord(**row._mapping) for row in rows]

    def latest_progress(self, task_id: str) -> ProgressRecord | None:
        with self._read() as conn:
            row = conn.execute(sa.select(progress).where(progress.c.task_id == task_id)).first()
        if row is None:
            return None
        message = types_pb2.Progress()
        message.ParseFromString(row.progress_proto)
        return ProgressRecord(row.task_id, row.version, message, row.at)

    def latest_progress_of(self, task_ids: list[str]) -> dict[str, types_pb2.Progress]:
        """The latest progress of each task that has one, in one query (task lists)."""
        if not task_ids:
            return {}
        with self._read() as conn:
            rows = conn.execute(
                sa.select(progress.c.task_id, progress.c.progress_proto).where(progress.c.task_id.in_(task_ids))
            )
            found = {}
            for row in rows:
                message = types_pb2.Progress()
                message.ParseFromString(row.progress_proto)
                found[row.task_id] = message
        return found

    def list_tasks(
        self,
        project: str = "",
        state: str = "",
        pool: str = "",
        limit: int = 100,
        page_token: str = "",
    ) -> tuple[list[TaskRecord], str]:
        """Tasks in submission order, filtered; returns (page, next_page_token or "")."""
        query = sa.select(tasks)
        if project:
            query = query.where(tasks.c.project == project)
        if state:
            query = query.where(tasks.c.state == state)
        if pool:
            query = query.where(tasks.c.pool == pool)
        if page_token:
            after_time, after_id = decode_page_token(page_token)
            query = query.where(
                sa.or_(
                    tasks.c.submitted_at > after_time,
                    sa.and_(tasks.c.submitted_at == after_time, tasks.c.id > after_id),
                )
            )
        query = query.order_by(tasks.c.submitted_at, tasks.c.id).limit(limit + 1)
        with self._read() as conn:
            rows = [_record(row) for row in conn.execute(query)]
        if len(rows) > limit:
            last = rows[limit - 1]
            return rows[:limit], encode_page_token(last.submitted_at, last.id)
        return rows, ""

    def runnable(self, now: float, limit: int, aging_s: float, offset: int = 0) -> list[TaskRecord]:
        """Queued tasks whose backoff has passed, in queue order (see `scheduler.queue`)."""
        ids = self.runnable_ids(now, limit, aging_s, offset)
        return queued_in_order(ids, self.get_many(ids))

    def runnable_ids(self, now: float, limit: int, aging_s: float, offset: int = 0) -> list[str]:
        """The ids of `runnable`'s tasks, in queue order.

        The dispatcher runs this every pass, so it walks a partial index on the order key itself
        (`ensure_queue_index`): LIMIT rows of an index scan instead of sorting the whole queue.
        Ids only: a pass skips the tasks its previous pass is still committing, and fetching (and
        decoding) their whole rows again was most of its read."""
        order, index = self.ensure_queue_index(aging_s)
        mark, hint = self._mark, f" INDEXED BY {index}" if self.is_sqlite else ""
        sql = (
            f"SELECT id FROM tasks{hint} WHERE state = '{QUEUED}' AND not_before <= {mark} "
            f"ORDER BY {order}, id LIMIT {int(limit)} OFFSET {int(offset)}"
        )
        return [row[0] for row in self._driver_read(sql, (now,))]

    def ensure_queue_index(self, aging_s: float) -> tuple[str, str]:
        """The queue-order expression for `aging_s` and its partial index (created once)."""
        order = f"(submitted_at - priority * {float(aging_s)!r})"
        name = f"ix_tasks_queue_order_{round(aging_s * 1000)}"
        if aging_s not in self._queue_indexes:
            self._execute_write(
                lambda conn: conn.exec_driver_sql(
                    f"CREATE INDEX IF NOT EXISTS {name} ON tasks ({order}, id) WHERE state = '{QUEUED}'"
                )
            )
            self._queue_indexes.add(aging_s)
        return order, name

    def in_flight(self, agent_id: str | None = None) -> list[TaskRecord]:
        query = sa.select(tasks).where(tasks.c.state.in_(IN_FLIGHT))
        if agent_id is not None:
            query = query.where(tasks.c.agent_id == agent_id)
        with self._read() as conn:
            return [_record(row) for row in conn.execute(query)]

    def in_flight_by_project(self) -> dict[str, int]:
        query = (
            sa.select(tasks.c.project, sa.func.count()).where(tasks.c.state.in_(IN_FLIGHT)).group_by(tasks.c.project)
        )
        with self._read() as conn:
            return {project: int(count) for project, count in conn.execute(query)}

    def queued_by_priority(self) -> dict[int, int]:
        query = sa.select(tasks.c.priority, sa.func.count()).where(tasks.c.state == QUEUED).group_by(tasks.c.priority)
        with self._read() as conn:
            return {int(priority): int(count) for priority, count in conn.execute(query)}

    def count_by_state(self) -> dict[str, int]:
        query = sa.select(tasks.c.state, sa.func.count()).group_by(tasks.c.state)
        with self._read() as conn:
            return {state: int(count) for state, count in conn.execute(query)}

    def terminal_among(self, task_ids: Sequence[str]) -> list[str]:
        """Which of `task_ids` are finished (an agent still running one should stop)."""
        if not task_ids:
            return []
        query = sa.select(tasks.c.id).where(tasks.c.id.in_(list(task_ids)), tasks.c.state.in_(TERMINAL))
        with self._read() as conn:
            return [row.id for row in conn.execute(query)]

    # ---- writes -------------------------------------------------------------------------------

    def transition(
        self,
        task_id: str,
        to_state: str,
        reason: str,
        now: float,
        *,
        expect_from: str | None = None,
        expect_agent: str | None = None,
        pool: str | None = None,
        agent_id: str | None = None,
        placement: Placement | None = None,
        not_before: float | None = None,
        count_attempt: bool = False,
        fresh_start: bool = False,
        progress_message: types_pb2.Progress | None = None,
    ) -> bool:
        """Move a task to `to_state`. Returns False (no change) when it is already terminal or no
        longer in `expect_from` / on `expect_agent` (someone else moved it: a stale worker).
        Raises IllegalTransition for a move the state machine forbids, UnknownTask for a bad id.
        `progress_message`, when given, is recorded in the same transaction.
        """
        step = Step(to_state, reason, pool, agent_id, placement, not_before, count_attempt, fresh_start)
        return self.transition_chain(
            task_id, [step], now, expect_from=expect_from, expect_agent=expect_agent, progress_message=progress_message
        )

    def transition_chain(
        self,
        task_id: str,
        steps: Sequence[Step],
        now: float,
        *,
        expect_from: str | None = None,
        expect_agent: str | None = None,
        progress_message: types_pb2.Progress | None = None,
    ) -> bool:
        """Apply several transitions atomically (e.g. queued -> placed -> dispatched), one commit."""
        change = Change(task_id, tuple(steps), expect_from, expect_agent, progress_message)
        return self._execute_write(lambda conn: self._apply(conn, change, now))

    def apply_changes(self, changes: Sequence[Change], now: float) -> list[bool | Exception]:
        """Many independent changes in one commit; each gets its own result (or its exception)."""
        return self._execute_write(lambda conn: self.apply_changes_in(conn, changes, now))

    def apply_changes_in(self, conn: Connection, changes: Sequence[Change], now: float) -> list[bool | Exception]:
        """`apply_changes` inside the caller's transaction (the writer's: `GroupCommitter.insert_with`)."""
        results: list[bool | Exception] = []
        cursor = _driver_cursor(conn)
        for change in changes:
            try:
                results.append(self._apply(conn, change, now, cursor))
            except (IllegalTransition, UnknownTask) as error:  # raised before anything is written
                results.append(error)
        return results

    def _apply(self, conn: Connection, change: Change, now: float, cursor: Any = None) -> bool:
        # Plain SQL with one fixed shape per statement on the driver's own cursor (same transaction):
        # this runs twice per task on the dispatch path, and first Core's statement building, then
        # SQLAlchemy's per-execute result set-up dominated its profile.
        task_id, steps = change.task_id, change.steps
        sql = self._apply_sql()
        cursor = cursor if cursor is not None else _driver_cursor(conn)
        cursor.execute(sql["select"], (task_id,))
        row = cursor.fetchone()
        if row is None:
            raise UnknownTask(task_id)
        current, row_pool, row_agent = row
        was, final = current, steps[-1].to_state
        if current in TERMINAL:
            if final in TERMINAL:
                metrics.DUPLICATE_COMPLETIONS.labels(state=final).inc()
                log.info(
                    "completion ignored: task already finished",
                    task_id=task_id,
                    state=current,
                    attempted=final,
                    reason=steps[-1].reason,
                )
            return False
        if change.expect_from is not None and current != change.expect_from:
            return False
        if change.expect_agent is not None and row_agent != change.expect_agent:
            return False
        moved = _moved(task_id, current, steps, row_pool, row_agent, now)  # checks the whole chain first
        current = moved.state
        cursor.executemany(sql["transition"], moved.transitions)
        if current == QUEUED:
            self.requeues += 1
        elif was == QUEUED and current not in (PLACED, DISPATCHED):
            self.unqueued += 1
        if change.progress is not None:  # before the update: the run's agent still holds the row
            self._write_progress(conn, task_id, change.progress, now, row_agent or "", cursor, held=True)
        cursor.execute(
            sql["update"],
            (
                current,
                now,
                steps[-1].reason,
                moved.pool,
                moved.agent_id,
                moved.rule,
                moved.placement_json,
                moved.placement_proto,
                moved.not_before,
                moved.attempts,
                moved.finished_at,
                task_id,
            ),
        )
        if any(step.fresh_start for step in steps):  # in this commit: no pass may resume the old run
            cursor.execute(sql["forget_checkpoint"], (task_id,))
        return True

    def _apply_sql(self) -> dict[str, str]:
        if self._apply_statements is None:
            mark = self._mark
            lock = "" if self.is_sqlite else " FOR UPDATE"
            upsert = (
                "ON CONFLICT (task_id) DO UPDATE SET version = progress.version + 1, "
                "progress_proto = excluded.progress_proto, at = excluded.at"
            )
            self._apply_statements = {
                "select": f"SELECT state, pool, agent_id FROM tasks WHERE id = {mark}{lock}",
                "transition": "INSERT INTO transitions (task_id, from_state, to_state, reason, at, pool, agent_id) "
                f"VALUES ({', '.join([mark] * 7)})",
                "update": f"UPDATE tasks SET state = {mark}, updated_at = {mark}, last_reason = {mark}, "
                f"pool = {mark}, agent_id = {mark}, rule = COALESCE({mark}, rule), "
                f"placement = COALESCE({mark}, placement), placement_proto = COALESCE({mark}, placement_proto), "
                f"not_before = COALESCE({mark}, not_before), attempts = attempts + {mark}, "
                f"finished_at = COALESCE({mark}, finished_at) WHERE id = {mark}",
                "progress": "INSERT INTO progress (task_id, version, progress_proto, at) "
                f"VALUES ({mark}, 1, {mark}, {mark}) " + upsert,
                # The same, only from the run that holds the task: a stopped or superseded run's
                # late report is not the task's latest progress (a watcher would see it run on).
                "holder_progress": "INSERT INTO progress (task_id, version, progress_proto, at) "
                f"SELECT {mark}, 1, {mark}, {mark} WHERE EXISTS "
                f"(SELECT 1 FROM tasks WHERE id = {mark} AND agent_id = {mark}) " + upsert,
                # Only the run that holds the task moves its checkpoint: a stopped or superseded
                # run's late report (another agent, often another pool) never does.
                "checkpoint": f"UPDATE tasks SET checkpoint_frame = {mark}, checkpoint_uri = {mark} "
                f"WHERE id = {mark} AND agent_id = {mark} AND checkpoint_frame < {mark}",
                "forget_checkpoint": f"UPDATE tasks SET checkpoint_frame = 0, checkpoint_uri = '' WHERE id = {mark}",
            }
        return self._apply_statements

    def record_queue_decisions(self, decisions: Sequence[tuple[str, Placement]], now: float) -> None:
        """`queue` outcomes: the tasks stay queued; keep each decision for Explain."""
        self._execute_write(lambda conn: self.record_queue_decisions_in(conn, decisions, now))

    def record_queue_decisions_in(
        self, conn: Connection, decisions: Sequence[tuple[str, Placement]], now: float
    ) -> None:
        """`record_queue_decisions` inside the caller's transaction."""
        if not decisions:
            return
        rows = [
            {"b_id": task_id, "b_placement": p.summary, "b_proto": p.decision, "b_rule": p.rule, "b_at": now}
            for task_id, p in decisions
        ]
        conn.execute(_QUEUE_DECISION, rows)  # one executemany for the whole pass

    # ---- audit records staged with the decisions they record ----------------------------------

    def stage_records_in(self, conn: Connection, records: Sequence[Entry], now: float) -> str:
        """Keep `records` ((kind, actor, fields) each) in the caller's transaction, so they are
        durable exactly when the decisions they record are; returns the row's id (`unstage_records`)."""
        row_id = new_task_id()  # time-ordered, as the tasks' ids: inserts land at the index's right edge
        text = json.dumps([[str(kind), actor, dict(fields)] for kind, actor, fields in records], separators=(",", ":"))
        mark = self._mark
        sql = f"INSERT INTO audit_outbox (id, at, records) VALUES ({mark}, {mark}, {mark})"
        _driver_cursor(conn).execute(sql, (row_id, now, text))
        return row_id

    def staged_records(self, staged_before: float | None = None) -> list[tuple[str, list[Entry]]]:
        """Rows not unstaged yet (staged before `staged_before`, if given), oldest first: (id, records)."""
        order = (audit_outbox.c.at, audit_outbox.c.id)  # ids minted in one millisecond sort at random
        query = sa.select(audit_outbox.c.id, audit_outbox.c.records).order_by(*order)
        if staged_before is not None:
            query = query.where(audit_outbox.c.at < staged_before)
        with self._reader.connect() as conn:
            rows = conn.execute(query).all()
        return [(row.id, [(kind, actor, fields) for kind, actor, fields in json.loads(row.records)]) for row in rows]

    def unstage_records(self, row_ids: Sequence[str]) -> None:
        """Delete staged rows (their records are in the audit log now)."""
        ids = list(row_ids)

        def delete(conn: Connection) -> None:
            for start in range(0, len(ids), _IDS_PER_READ):
                conn.execute(audit_outbox.delete().where(audit_outbox.c.id.in_(ids[start : start + _IDS_PER_READ])))

        self._execute_write(delete)

    def record_progress(self, task_id: str, agent_id: str, message: types_pb2.Progress, now: float) -> None:
        """Keep the latest progress per task, and the highest checkpoint reported by the agent that
        holds the task (`agent_id` is the reporting agent)."""
        self._execute_write(lambda conn: self._write_progress(conn, task_id, message, now, agent_id))

    def record_progress_many(self, progress: Sequence[tuple[str, str, types_pb2.Progress]], now: float) -> None:
        """`record_progress` for many (task id, agent id, progress) in one transaction (an agent
        session's batch)."""

        def run(conn: Connection) -> None:
            cursor = _driver_cursor(conn)
            for task_id, agent_id, message in progress:
                self._write_progress(conn, task_id, message, now, agent_id, cursor)

        self._execute_write(run)

    def _write_progress(
        self,
        conn: Connection,
        task_id: str,
        message: types_pb2.Progress,
        now: float,
        agent_id: str,
        cursor: Any = None,
        held: bool = False,
    ) -> None:
        """Only the run of `agent_id` while it holds the task moves its progress and checkpoint;
        `held`: the caller has checked that it does (a change's progress, in the same transaction).
        One upsert in plain driver SQL (SQLite >= 3.24 and PostgreSQL share the syntax): this runs
        for every progress message and every completion."""
        sql = self._apply_sql()
        cursor = cursor if cursor is not None else _driver_cursor(conn)
        proto = message.SerializeToString()
        if held:
            cursor.execute(sql["progress"], (task_id, proto, now))
        else:
            cursor.execute(sql["holder_progress"], (task_id, proto, now, task_id, agent_id))
        if message.checkpoint_frame:
            cursor.execute(
                sql["checkpoint"],
                (message.checkpoint_frame, message.checkpoint_uri, task_id, agent_id, message.checkpoint_frame),
            )
