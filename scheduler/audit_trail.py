"""The live scheduler's audit trail: dispatcher events and intake refusals mapped onto AuditLog records.

`AuditTrail` is a DispatchListener (dispatch, completion) and the dispatcher's audit hook
(placement decisions, residency refusals, lock enforcement). It never records a full URI: intake
refusals carry `redact_uri(...)` only. An audit write that fails is logged loudly and never stops
dispatch (the task state in the store stays the source of truth).

Writes go through one `AuditBatchWriter` (one fsync per batch). The records of a launch (its
`placement` and `dispatch`) are made by `launch_records` inside the dispatcher's commit, which stages
them in the task store in the same transaction (`TaskStore.stage_records_in`): they are durable
exactly when the launch is, before any agent may start it, and a launch that does not commit leaves
none. After the commit `staged` queues them for the log, tagged with the staged row's id (`staged`
field); once written the row is deleted. Rows a crash left behind are written when a leader next
starts, those of a failed write by the leader a minute later (`write_leftovers`); a crash between a
write and its row's deletion writes that row's records twice, with the same `staged` id.
Completions and placements that launched nothing are only queued (the store holds what they
record); every other record (refusals, lock actions) waits until it is written.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from facefleet.scheduler.audit_batch import AuditBatchWriter
from facefleet.scheduler.audit_process import AuditProcess
from facefleet.scheduler.placement_gateway import PlacementResult
from facefleet.scheduler.store import TaskRecord, TaskStore
from facefleet.security.audit import AuditKind, AuditLog, Entry
from facefleet.security.residency import ResidencyViolation, redact_uri
from facefleet.v1 import types_pb2

log = structlog.get_logger()

ACTOR = "scheduler"
ZONES_REMEMBERED = 100_000  # task id -> trust zone of its current dispatch, for completion records


class AgentZones(Protocol):
    def get(self, agent_id: str) -> Any: ...  # AgentRecord | None, with .trust_zone


def uri_of_field(task: types_pb2.Task, field: str) -> str:
    """The URI a residency error names (`task.source_uri`, `task.options.reference_face_uri`, ...)."""
    value: Any = task
    for part in field.removeprefix("task.").split("."):
        value = getattr(value, part, "")
    return value if isinstance(value, str) else ""


class AuditTrail:
    def __init__(self, audit: AuditLog, agents: AgentZones | None = None, separate_process: bool = False) -> None:
        """`separate_process`: the batches are sealed and written by a child process (`AuditProcess`)."""
        self.audit = audit
        self.agents = agents
        self.writer = AuditBatchWriter(
            audit, appender=AuditProcess(audit) if separate_process else None, on_staged=self._staged_done
        )
        self.store: TaskStore | None = None  # where staged records are deleted once written (set by the app)
        self._zones: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._queued_rows: set[str] = set()  # staged rows queued for the log and not written yet

    # ---- a launch's records (the dispatcher's PassRecords) ---------------------------------------

    def launch_records(self, task: TaskRecord, decision: PlacementResult) -> list[Entry]:
        """A launch's `placement` and `dispatch` records, for its commit to stage (`staged` next)."""
        zone = decision.pool_trust_zone or self._agent_zone(task.agent_id)
        with self._lock:
            self._zones[task.id] = zone
            self._zones.move_to_end(task.id)
            while len(self._zones) > ZONES_REMEMBERED:
                self._zones.popitem(last=False)
        placement = {"task": task.id, "project": task.project, "rule": decision.rule, "pool": decision.pool}
        return [
            (AuditKind.PLACEMENT, ACTOR, {**placement, "trust_zone": zone, "outcome": "dispatch"}),
            (AuditKind.DISPATCH, ACTOR, self._dispatch_fields(task, decision, zone)),
        ]

    def staged(self, row_id: str, records: Sequence[Entry]) -> None:
        """`records` are committed in the store as row `row_id`: into the log with the next batch."""
        with self._lock:
            self._queued_rows.add(row_id)
        try:
            self.writer.enqueue_staged(
                row_id, [(kind, actor, {**fields, "staged": row_id}) for kind, actor, fields in records]
            )
        except Exception:
            with self._lock:
                self._queued_rows.discard(row_id)
            log.exception("audit_write_failed", staged=row_id)  # kept in the store: written later

    def write_leftovers(self, staged_before: float | None = None) -> int:
        """Queue the staged rows no one is writing (a crash left them, or their write failed); a
        leader calls it before its first pass, and then now and then for those staged before
        `staged_before` (younger ones may be on their way here from a commit). Returns how many rows."""
        if self.store is None:
            return 0
        with self._lock:  # a row being written now may be deleted (and no longer queued) after the read
            queued = set(self._queued_rows)
        try:
            rows = self.store.staged_records(staged_before)
        except Exception:
            log.exception("reading staged audit records failed; the leader tries again later")
            return 0
        with self._lock:
            queued |= self._queued_rows
        rows = [(row_id, records) for row_id, records in rows if row_id not in queued]
        for row_id, records in rows:
            self.staged(row_id, records)
        if rows:
            log.warning("audit records left staged in the store are written now", rows=len(rows))
        return len(rows)

    def _staged_done(self, rows: list[str], written: bool) -> None:
        """The writer's word on staged rows: written ones are deleted from the store, failed ones
        stay there for the leader's next look (`write_leftovers`)."""
        try:
            if written and self.store is not None:
                self.store.unstage_records(rows)
        finally:  # after the delete: a leader starting meanwhile must not queue these rows again
            with self._lock:
                self._queued_rows.difference_update(rows)

    # ---- DispatchListener ----------------------------------------------------------------------

    def on_dispatched(self, task: TaskRecord, decision: PlacementResult) -> None:
        """Committed and about to be sent: its records were staged with the commit (`launch_records`)."""

    def _dispatch_fields(self, task: TaskRecord, decision: PlacementResult, zone: str) -> dict[str, Any]:
        return {
            "task": task.id,
            "project": task.project,
            "pool": decision.pool,
            "trust_zone": zone,
            "agent": task.agent_id or "",
        }

    def flush(self) -> None:
        """Wait until every record queued so far is durable."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def on_finished(self, task: TaskRecord) -> None:
        """A completion is recorded only for a task that reached an agent: one that never ran has no zone.

        Queued, not waited for, and lingering: the store already holds the completion durably, and
        the record is written with the writer's next batch (a pass's staged launch records, say),
        or `audit_batch.LINGER_S` later at the latest. Waiting here cost a
        thread hand-off per task on the dispatch path; a batch of its own, an fsync per task."""
        if not task.agent_id:
            return
        with self._lock:
            zone = self._zones.pop(task.id, "")
        zone = zone or self._agent_zone(task.agent_id)
        self._queue(
            AuditKind.COMPLETION,
            {
                "task": task.id,
                "project": task.project,
                "pool": task.pool or "",
                "trust_zone": zone,
                "state": task.state,
            },
            linger=True,
        )

    # ---- dispatcher audit hook ------------------------------------------------------------------

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event == "placement":  # made on the dispatcher thread during a pass: flushed with the pass
            self._queue(
                AuditKind.PLACEMENT,
                {
                    "task": fields.get("task_id", ""),
                    "project": fields.get("project", ""),
                    "rule": fields.get("rule", ""),
                    "pool": fields.get("pool", ""),
                    "trust_zone": fields.get("trust_zone", ""),
                    "outcome": fields.get("outcome", ""),
                },
            )
        elif event == "residency_refused":
            self._record(
                AuditKind.RESIDENCY_REFUSAL,
                {
                    "task": fields.get("task_id", ""),
                    "project": fields.get("project", ""),
                    "field": "pool",
                    "pool": fields.get("pool", ""),
                    "message": fields.get("detail", ""),
                },
            )
        elif event == "lock_action":
            self._record(AuditKind.ADMIN, {"act": "lock_enforcement", "args": dict(fields), "outcome": "ok"})
        else:
            self._record(AuditKind.ADMIN, {"act": event, "args": dict(fields), "outcome": "ok"})

    # ---- intake ---------------------------------------------------------------------------------

    def intake_refusal(self, actor: str, task: types_pb2.Task, error: ResidencyViolation) -> None:
        fields = {
            "project": task.project,
            "field": error.field,
            "uri": redact_uri(uri_of_field(task, error.field)),
            "message": error.message,
        }
        self._record(AuditKind.RESIDENCY_REFUSAL, fields, actor)

    # ---- plumbing -------------------------------------------------------------------------------

    def _agent_zone(self, agent_id: str | None) -> str:
        if not agent_id or self.agents is None:
            return ""
        return str(getattr(self.agents.get(agent_id), "trust_zone", "") or "")

    def _queue(self, kind: AuditKind, fields: dict[str, Any], actor: str = ACTOR, linger: bool = False) -> None:
        try:
            self.writer.enqueue(kind, actor, fields, linger)
        except Exception:
            log.exception("audit_write_failed", record=kind.value)

    def _record(self, kind: AuditKind, fields: dict[str, Any], actor: str = ACTOR) -> None:
        try:
            self.writer.write(kind, actor, fields)
        except Exception:
            log.exception("audit_write_failed", record=kind.value)
