"""Conversions between placement types and the gRPC contract (facefleet.v1)."""

from __future__ import annotations

from facefleet.domain import priority_from_proto, sensitivity_from_proto, sensitivity_known
from facefleet.rpc_errors import TaskInputError
from facefleet.scheduler.placement.model import CandidateTrace, Decision, Estimate, TaskSpec
from facefleet.v1 import types_pb2

_OUTCOME = {
    "dispatch": types_pb2.PlacementDecision.DISPATCH,
    "queue": types_pb2.PlacementDecision.QUEUE,
    "reject": types_pb2.PlacementDecision.REJECT,
}
_OUTCOME_BACK = {v: k for k, v in _OUTCOME.items()}


def task_spec_from_proto(task: types_pb2.Task, default_priority: str = "normal") -> TaskSpec:
    """TaskSpec from a proto Task. Sensitivity must be set (no default: residency depends on it);
    an unspecified priority becomes `default_priority`. Raises TaskInputError naming the field."""
    if not sensitivity_known(task.sensitivity):
        raise TaskInputError(
            "task.sensitivity", "must be SENSITIVITY_PUBLIC, SENSITIVITY_INTERNAL or SENSITIVITY_PRIVATE"
        )
    sensitivity = sensitivity_from_proto(task.sensitivity)
    priority = priority_from_proto(task.priority)
    if task.priority == types_pb2.PRIORITY_UNSPECIFIED:
        priority = default_priority
    elif priority is None:
        raise TaskInputError("task.priority", f"unknown priority value {task.priority}")
    if not task.project:
        raise TaskInputError("task.project", "required (rules and locks are per project)")
    return TaskSpec(
        id=task.id,
        project=task.project,
        sensitivity=sensitivity,
        priority=priority,
        sla_seconds=float(task.sla_seconds),
        frames=max(1, int(task.frames)),
    )


def _estimate_to_proto(est: Estimate | None, out: types_pb2.Estimate) -> None:
    if est is not None:
        out.cost_usd = est.cost_usd
        out.completion_s = est.completion_s
        out.reserve_usd = est.reserve_usd
        out.max_run_s = est.max_run_s


def decision_to_proto(decision: Decision) -> types_pb2.PlacementDecision:
    msg = types_pb2.PlacementDecision(
        outcome=_OUTCOME[decision.outcome],
        pool=decision.pool or "",
        rule=decision.rule or "",
        reason=decision.reason,
        rules_version=decision.rules_version,
        notes=list(decision.notes),
    )
    if decision.estimate is not None:
        _estimate_to_proto(decision.estimate, msg.estimate)
    for c in decision.candidates:
        item = msg.candidates.add(
            pool=c.pool,
            feasible=c.feasible,
            failed_filter=c.failed_filter or "",
            detail=c.detail,
            score=c.score or 0.0,
        )
        if c.estimate is not None:
            _estimate_to_proto(c.estimate, item.estimate)
    return msg


def decision_from_proto(msg: types_pb2.PlacementDecision) -> Decision:
    """Inverse of decision_to_proto (budget is not carried on the wire)."""

    def est(e: types_pb2.Estimate, present: bool) -> Estimate | None:
        return Estimate(e.cost_usd, e.completion_s, e.reserve_usd, e.max_run_s) if present else None

    if msg.outcome not in _OUTCOME_BACK:
        raise ValueError(f"PlacementDecision.outcome {msg.outcome} is unspecified or unknown")
    return Decision(
        outcome=_OUTCOME_BACK[msg.outcome],  # type: ignore[arg-type]
        pool=msg.pool or None,
        rule=msg.rule or None,
        reason=msg.reason,
        candidates=tuple(
            CandidateTrace(
                pool=c.pool,
                feasible=c.feasible,
                failed_filter=c.failed_filter or None,
                detail=c.detail,
                score=c.score if c.feasible else None,
                estimate=est(c.estimate, c.HasField("estimate")),
            )
            for c in msg.candidates
        ),
        estimate=est(msg.estimate, msg.HasField("estimate")),
        notes=tuple(msg.notes),
        rules_version=msg.rules_version,
    )
