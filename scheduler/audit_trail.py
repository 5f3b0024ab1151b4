"""The live scheduler's audit trail: dispatcher events and intake refusals mapped onto AuditLog records.

`AuditTrail` is a DispatchListener (dispatch, completion) and the dispatcher's audit hook
(placement decisions, residency refusals, lock enforcement). It never records a full URI: intake
refusals carry `redact_uri(...)` only. An audit write that fails is logged loudly and never stops
dispatch (the task state in the store stays the source of truth).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Protocol

import structlog

from facefleet.security.audit import AuditLog
from facefleet.security.residency import ResidencyViolation, redact_uri
from facefleet.v1 import types_pb2
from scheduler.placement_gateway import PlacementResult
from scheduler.store import TaskRecord

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
    def __init__(self, audit: AuditLog, agents: AgentZones | None = None) -> None:
        self.audit = audit
        self.agents = agents
        self._zones: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    # ---- DispatchListener ----------------------------------------------------------------------

    def on_dispatched(self, task: TaskRecord, decision: PlacementResult) -> None:
        zone = decision.pool_trust_zone or self._agent_zone(task.agent_id)
        with self._lock:
            self._zones[task.id] = zone
            self._zones.move_to_end(task.id)
            while len(self._zones) > ZONES_REMEMBERED:
                self._zones.popitem(last=False)
        self._write(self.audit.placement, task.id, task.project, decision.rule, decision.pool, zone, "dispatch")
        self._write(self.audit.dispatch, task.id, task.project, decision.pool, zone, task.agent_id or "")

    def on_finished(self, task: TaskRecord) -> None:
        """A completion is recorded only for a task that reached an agent: one that never ran has no zone."""
        if not task.agent_id:
            return
        with self._lock:
            zone = self._zones.pop(task.id, "")
        zone = zone or self._agent_zone(task.agent_id)
        self._write(self.audit.completion, task.id, task.project, task.pool or "", zone, task.state)

    # ---- dispatcher audit hook ------------------------------------------------------------------

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event == "placement":
            self._write(
                self.audit.placement,
                fields.get("task_id", ""),
                fields.get("project", ""),
                fields.get("rule", ""),
                fields.get("pool", ""),
                fields.get("trust_zone", ""),
                fields.get("outcome", ""),
            )
        elif event == "residency_refused":
            self._write(
                self.audit.append,
                "residency_refusal",
                ACTOR,
                task=fields.get("task_id", ""),
                project=fields.get("project", ""),
                field="pool",
                pool=fields.get("pool", ""),
                message=fields.get("detail", ""),
            )
        elif event == "lock_action":
            self._write(self.audit.admin, ACTOR, "lock_enforcement", dict(fields), "ok")
        else:
            self._write(self.audit.admin, ACTOR, event, dict(fields), "ok")

    # ---- intake ---------------------------------------------------------------------------------

    def intake_refusal(self, actor: str, task: types_pb2.Task, error: ResidencyViolation) -> None:
        self._write(
            self.audit.residency_refusal,
            actor,
            task.project,
            error.field,
            redact_uri(uri_of_field(task, error.field)),
            error.message,
        )

    # ---- plumbing -------------------------------------------------------------------------------

    def _agent_zone(self, agent_id: str | None) -> str:
        if not agent_id or self.agents is None:
            return ""
        return str(getattr(self.agents.get(agent_id), "trust_zone", "") or "")

    @staticmethod
    def _write(method: Any, *args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            log.exception("audit_write_failed", record=getattr(method, "__name__", str(method)))
