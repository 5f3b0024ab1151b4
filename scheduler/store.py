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
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from facefleet.v1 import types_pb2
from scheduler import metrics, task_states
from scheduler.task_states import IN_FLIGHT, QUEUED, TERMINAL

log = structlog.get_logger()

metadata = sa.MetaData()

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
    sa.Index("ix_tasks_state_not_before", "state", "not_before"),
    sa.Index("ix_tasks_project_state", "project", "state"),
    sa.Index("ix_tasks_agent_state", "agent_id", "state"),
    sa.Index("ix_tasks_submitted", "submitted_at", "id"),
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


T = TypeVar("T")


class Writer(Protocol):
    def run(self, op: Callable[[Connection], T]) -> T: ...
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
    """A validated task ready to insert (the intake's output)."""

    task: types_pb2.Task
    idempotency_key: str


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

    def values(self) -> dict[str, Any]:
        values: dict[str, Any] = {"state": self.to_state, "last_reason": self.reason}
        if self.pool is not None:
            values["pool"] = self.pool
        if self.agent_id is not None:
            values["agent_id"] = self.agent_id
        if self.placement is not None:
            values["pool"] = self.placement.pool
            values["rule"] = self.placement.rule
            values["placement"] = self.placement.summary
            values["placement_proto"] = self.placement.decision
        if self.not_before is not None:
            values["not_before"] = self.not_before
        return values


@dataclass(frozen=True)
class Change:
    """Transitions for one task, applied only if it is still where the caller thinks it is."""

    task_id: str
    steps: tuple[Step, ...]
    expect_from: str | None = None
    expect_agent: str | None = None
    progress: types_pb2.Progress | None = None


def new_task_id() -> str:
    return uuid.uuid4().hex


def _record(row: sa.Row[Any]) -> TaskRecord:
    return TaskRecord(**row._mapping)


def encode_page_token(submitted_at: float, task_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([submitted_at, task_id]).encode()).decode()


def decode_page_token(token: str) -> tuple[float, str]:
    """Raises ValueError with an actionable message for a token this server did not issue."""
    try:
        submitted_at, task_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(submitted_at), str(task_id)
    except Exception as exc:
        raise ValueError("page_token is not one this server issued; pass next_page_token unchanged") from exc


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
        metadata.create_all(self._writer)
        self._writer_thread: Writer | None = None

    @staticmethod
    def _sqlite_engine(url: str, immediate: bool) -> Engine:
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (SQLAlchemy recipe)
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

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

    def _execute_write(self, op: Callable[[Connection], T]) -> T:
        writer = self._writer_thread
        if writer is not None and not writer.on_writer_thread():
            return writer.run(op)
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
        keys = {item.idempotency_key for item in batch if item.idempotency_key}
        existing: dict[str, SubmitResult] = {}
        if keys:
            rows = conn.execute(
                sa.select(tasks.c.idempotency_key, tasks.c.id, tasks.c.state).where(tasks.c.idempotency_key.in_(keys))
            )
            existing = {row.idempotency_key: SubmitResult(row.id, False, row.state) for row in rows}
        results: list[SubmitResult] = []
        task_rows: list[dict[str, Any]] = []
        transition_rows: list[dict[str, Any]] = []
        for item in batch:
            key = item.idempotency_key or None
            if key is not None and key in existing:
                results.append(existing[key])
                continue
            task_id = new_task_id()
            task = types_pb2.Task()
            task.CopyFrom(item.task)
            task.id = task_id
            task_rows.append(
                {
                    "id": task_id,
                    "idempotency_key": key,
                    "project": task.project,
                    "sensitivity": types_pb2.Sensitivity.Name(task.sensitivity).removeprefix("SENSITIVITY_").lower(),
                    "priority": int(task.priority),
                    "state": QUEUED,
                    "pool": None,
                    "rule": None,
                    "agent_id": None,
                    "attempts": 0,
                    "checkpoint_frame": 0,
                    "checkpoint_uri": "",
                    "placement": None,
                    "placement_proto": None,
                    "task_proto": task.SerializeToString(),
                    "submitted_at": now,
                    "updated_at": now,
                    "not_before": 0.0,
                    "finished_at": None,
                    "last_reason": "submitted",
                }
            )
            transition_rows.append(
                {
                    "task_id": task_id,
                    "from_state": "",
                    "to_state": QUEUED,
                    "reason": "submitted",
                    "at": now,
                    "pool": "",
                    "agent_id": "",
                }
            )
            result = SubmitResult(task_id, True, QUEUED)
            if key is not None:
                existing[key] = SubmitResult(task_id, False, QUEUED)
            results.append(result)
        if task_rows:
            conn.execute(tasks.insert(), task_rows)
            conn.execute(transitions.insert(), transition_rows)
        return results

    # ---- reads --------------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        with self._read() as conn:
            row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).first()
        if row is None:
            raise UnknownTask(task_id)
        return _record(row)

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

    def runnable(self, now: float, limit: int, aging_s: float) -> list[TaskRecord]:
        """Queued tasks whose backoff has passed, in queue order (see `scheduler.queue`)."""
        order = tasks.c.submitted_at - tasks.c.priority * aging_s
        query = (
            sa.select(tasks)
            .where(tasks.c.state == QUEUED, tasks.c.not_before <= now)
            .order_by(order, tasks.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [_record(row) for row in conn.execute(query)]

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
        progress_message: types_pb2.Progress | None = None,
    ) -> bool:
        """Move a task to `to_state`. Returns False (no change) when it is already terminal or no
        longer in `expect_from` / on `expect_agent` (someone else moved it: a stale worker).
        Raises IllegalTransition for a move the state machine forbids, UnknownTask for a bad id.
        `progress_message`, when given, is recorded in the same transaction.
        """
        step = Step(to_state, reason, pool, agent_id, placement, not_before, count_attempt)
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

        def run(conn: Connection) -> list[bool | Exception]:
            results: list[bool | Exception] = []
            for change in changes:
                try:
                    results.append(self._apply(conn, change, now))
                except (IllegalTransition, UnknownTask) as error:  # raised before anything is written
                    results.append(error)
            return results

        return self._execute_write(run)

    def _apply(self, conn: Connection, change: Change, now: float) -> bool:
        task_id, steps = change.task_id, change.steps
        row = conn.execute(
            sa.select(tasks.c.state, tasks.c.pool, tasks.c.agent_id).where(tasks.c.id == task_id).with_for_update()
        ).first()
        if row is None:
            raise UnknownTask(task_id)
        current = row.state
        final = steps[-1].to_state
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
        if change.expect_agent is not None and row.agent_id != change.expect_agent:
            return False
        # Check the whole chain before writing anything: a refused change leaves no trace.
        state = current
        for step in steps:
            if not task_states.is_legal(state, step.to_state):
                raise IllegalTransition(task_id, state, step.to_state)
            state = step.to_state
        values: dict[str, Any] = {"updated_at": now}
        current_pool, current_agent = row.pool, row.agent_id
        rows = []
        for step in steps:
            values.update(step.values())
            if step.count_attempt:
                values["attempts"] = tasks.c.attempts + 1
            if step.to_state in TERMINAL:
                values["finished_at"] = now
            current_pool = values.get("pool", current_pool)
            current_agent = values.get("agent_id", current_agent)
            rows.append(
                {
                    "task_id": task_id,
                    "from_state": current,
                    "to_state": step.to_state,
                    "reason": step.reason,
                    "at": now,
                    "pool": current_pool or "",
                    "agent_id": current_agent or "",
                }
            )
            current = step.to_state
        conn.execute(transitions.insert(), rows)
        conn.execute(tasks.update().where(tasks.c.id == task_id).values(**values))
        if change.progress is not None:
            self._write_progress(conn, task_id, change.progress, now)
        return True

    def record_queue_decisions(self, decisions: Sequence[tuple[str, Placement]], now: float) -> None:
        """`queue` outcomes: the tasks stay queued; keep each decision for Explain."""

        def run(conn: Connection) -> None:
            for task_id, placement in decisions:
                conn.execute(
                    tasks.update()
                    .where(tasks.c.id == task_id, tasks.c.state == QUEUED)
                    .values(
                        placement=placement.summary,
                        placement_proto=placement.decision,
                        rule=placement.rule,
                        updated_at=now,
                    )
                )

        self._execute_write(run)

    def record_progress(self, task_id: str, message: types_pb2.Progress, now: float) -> None:
        """Keep the latest progress per task and the highest checkpoint any agent reported."""
        self._execute_write(lambda conn: self._write_progress(conn, task_id, message, now))

    @staticmethod
    def _write_progress(conn: Connection, task_id: str, message: types_pb2.Progress, now: float) -> None:
        data = message.SerializeToString()
        updated = conn.execute(
            progress.update()
            .where(progress.c.task_id == task_id)
            .values(version=progress.c.version + 1, progress_proto=data, at=now)
        )
        if updated.rowcount == 0:
            conn.execute(progress.insert().values(task_id=task_id, version=1, progress_proto=data, at=now))
        if message.checkpoint_frame:
            conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.checkpoint_frame < message.checkpoint_frame)
                .values(checkpoint_frame=message.checkpoint_frame, checkpoint_uri=message.checkpoint_uri)
            )
