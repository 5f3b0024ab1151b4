"""What each console page shows, assembled from the scheduler's gRPC answers and the same pure code
the CLI uses (explain's decision model, the ledger's forecast, the simulator, the audit proof).

A page is gated by the RPC it is built on: `is_allowed` (RoleGate's own rule) before anything is
asked, and the scheduler's RoleGate again on the call itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facefleet import domain
from facefleet.config import Settings
from facefleet.console.gateway import CallFailed, Gateway
from facefleet.console.tokens import Person
from facefleet.security.identity import Identity
from facefleet.security.roles import is_allowed
from facefleet.v1 import admin_pb2, scheduler_pb2, types_pb2

STATE_NAMES = domain.TASK_STATES
SWEEP_PARAMETERS = ("max_spot_price_per_hour", "monthly_cap_usd", "onprem_queue_wait_s_gt")
MAX_SWEEP_POINTS = 25
TASK_LIST_LIMIT = 200


@dataclass(frozen=True)
class Page:
    name: str
    title: str
    method: str  # the RPC the page is built on: its roles are the page's roles


PAGES = (
    Page("tasks", "Tasks", "/facefleet.v1.Scheduler/ListTasks"),
    Page("finance", "Finance", "/facefleet.v1.Admin/ListBudgets"),
    Page("compliance", "Compliance", "/facefleet.v1.Admin/ListLocks"),
    Page("fleet", "Fleet", "/facefleet.v1.Admin/ListFleet"),
)
PAGE = {page.name: page for page in PAGES}
ACTION_METHOD = {
    "set_budget": "/facefleet.v1.Admin/SetBudget",
    "lock": "/facefleet.v1.Admin/LockProject",
    "unlock": "/facefleet.v1.Admin/UnlockProject",
}


def may(person: Person, method: str) -> bool:
    return is_allowed(Identity(subject=person.certificate_name, roles=person.roles), method)


def state_name(value: int) -> str:
    """'running' for TASK_STATE_RUNNING; '—' for unset (a task's first transition has no `from`)."""
    return domain.state_from_proto(value) if value else "—"


# -- tasks ----------------------------------------------------------------------------------------
def id_similarity(progress: types_pb2.Progress) -> float | None:
    """The output face's mean ID similarity to the source (dlib's recognizer, on every engine), when
    it was measured: no face swapped means nothing to measure."""
    if not progress.HasField("quality") or not progress.quality.faces_swapped:
        return None
    return float(progress.quality.id_similarity_mean)


def task_row(status: scheduler_pb2.TaskStatus) -> dict[str, Any]:
    progress = status.last_progress
    return {
        "id": status.task.id,
        "project": status.task.project,
        "sensitivity": domain.sensitivity_from_proto(status.task.sensitivity),
        "priority": domain.priority_from_proto(status.task.priority) or domain.DEFAULT_PRIORITY,
        "state": state_name(status.state),
        "pool": status.pool,
        "rule": status.rule,
        "agent": status.agent_id,
        "attempts": status.attempts,
        "frames_done": progress.frames_done,
        "frames_total": progress.frames_total or status.task.frames,
        "stage": progress.stage,
        "id_similarity": id_similarity(progress),
        "submitted_at": status.submitted_at.ToDatetime(UTC) if status.HasField("submitted_at") else None,
    }


def task_filters(project: str, state: str, pool: str) -> scheduler_pb2.ListTasksRequest:
    if state and state not in STATE_NAMES:
        raise CallFailed(400, f"state {state!r} is not a task state; use one of {', '.join(STATE_NAMES)}")
    return scheduler_pb2.ListTasksRequest(
        project=project.strip(),
        state=domain.state_to_proto(state) if state else 0,  # type: ignore[arg-type]
        pool=pool.strip(),
        limit=TASK_LIST_LIMIT,
    )


def tasks(gateway: Gateway, person: Person, project: str, state: str, pool: str) -> list[dict[str, Any]]:
    reply = gateway.scheduler(person, "ListTasks", task_filters(project, state, pool))
    return [task_row(status) for status in reply.tasks]


def task_detail(gateway: Gateway, person: Person, task_id: str) -> dict[str, Any]:
    """The task, its transitions, and its recorded placement through explain's decision model."""
    from facefleet.scheduler.placement.proto_codec import decision_from_proto

    status = gateway.scheduler(person, "GetTask", scheduler_pb2.GetTaskRequest(task_id=task_id))
    recorded = gateway.scheduler(person, "Explain", scheduler_pb2.ExplainRequest(task_id=task_id))
    transitions = [
        {
            "at": t.at.ToDatetime(UTC),
            "from": state_name(t.from_state),
            "to": state_name(t.to_state),
            "reason": t.reason,
            "pool": t.pool,
            "agent": t.agent_id,
        }
        for t in status.transitions
    ]
    return {
        "row": task_row(status),
        "labels": dict(status.task.labels),
        "transitions": transitions,
        "decision": decision_from_proto(recorded).to_dict(),
        "error": status.last_progress.error.message if status.last_progress.HasField("error") else "",
    }


# -- finance --------------------------------------------------------------------------------------
def budgets(gateway: Gateway, person: Person, now: datetime) -> dict[str, Any]:
    """Spend vs cap per account with the ledger's month-end forecast and the alert state."""
    from facefleet.scheduler.ledger import linear_forecast, month_of

    month = month_of(now)
    reply = gateway.admin(person, "ListBudgets", admin_pb2.ListBudgetsRequest())
    accounts = []
    for budget in reply.budgets:
        cap, spent = budget.monthly_cap_usd, budget.spent_usd
        forecast = linear_forecast(spent, month, now)
        accounts.append(
            {
                "name": budget.name,
                "cap": cap,
                "alert_pct": budget.alert_pct,
                "spent": spent,
                "pct_used": 100 * spent / cap if cap else None,
                "forecast": forecast,
                "alert": bool(cap and spent >= cap * budget.alert_pct / 100),
                "forecast_over": bool(cap and forecast > cap),
            }
        )
    return {"month": month, "accounts": accounts}


def set_budget(gateway: Gateway, person: Person, name: str, cap: str, alert_pct: str, reason: str, create: bool) -> Any:
    try:
        cap_usd, alert = float(cap), float(alert_pct or 80)
    except ValueError:
        raise CallFailed(400, f"cap {cap!r} and alert {alert_pct!r} must be numbers") from None
    request = admin_pb2.SetBudgetRequest(
        name=name.strip(), monthly_cap_usd=cap_usd, alert_pct=alert, reason=reason, create=create
    )
    return gateway.admin(person, "SetBudget", request)


def _packaged_or(configured: Path | None, policy_dir: Path, name: str) -> Path:
    from facefleet.scheduler.rules_source.files import default_policy_dir

    if configured is not None:
        return configured
    beside = policy_dir / name
    return beside if beside.exists() else default_policy_dir() / name


def what_if(settings: Settings, parameter: str, start: str, stop: str, step: str) -> dict[str, Any]:
    """`facefleet simulate --sweep` over the scheduler's own policy, world and workload files."""
    import yaml

    from facefleet.scheduler.placement.policy import PolicyError
    from facefleet.scheduler.placement.world import WorldFileError, compose_world, load_world
    from facefleet.scheduler.rules_source.files import read_policy_dir
    from facefleet.scheduler.simulate import WorkloadError, parse_sweep, sweep

    if parameter not in SWEEP_PARAMETERS:
        raise CallFailed(400, f"parameter {parameter!r}: choose one of {', '.join(SWEEP_PARAMETERS)}")
    policy_dir = settings.policy.dir
    world_path = _packaged_or(settings.console.world, policy_dir, "world.yaml")
    workload_path = _packaged_or(settings.console.workload, policy_dir, "workload.yaml")
    try:
        name, values = parse_sweep(f"{parameter}={start}:{stop}:{step}")
        if len(values) > MAX_SWEEP_POINTS:
            raise WorkloadError(f"{len(values)} points; keep a sweep to {MAX_SWEEP_POINTS} (a larger step)")
        ruleset, budget_map, locks = read_policy_dir(policy_dir)
        world = compose_world(load_world(world_path), budget_map, locks)
        workload = yaml.safe_load(workload_path.read_text())
        points = sweep(ruleset, world, workload, name, values)
    except (WorkloadError, WorldFileError, OSError, yaml.YAMLError) as error:
        raise CallFailed(400, str(error)) from None
    except PolicyError as error:
        raise CallFailed(400, "policy invalid: " + "; ".join(str(e) for e in error.errors)) from None
    rows = [{"value": value, **report.to_dict()} for value, report in points]
    return {"parameter": name, "rows": rows, "world": str(world_path), "workload": str(workload_path)}


# -- compliance -----------------------------------------------------------------------------------
def locks(gateway: Gateway, person: Person) -> list[dict[str, Any]]:
    reply = gateway.admin(person, "ListLocks", admin_pb2.ListLocksRequest())
    return [{"project": lock.project, "reason": lock.reason} for lock in reply.locks]


def lock(gateway: Gateway, person: Person, project: str, reason: str, locked: bool) -> Any:
    if locked:
        return gateway.admin(
            person, "LockProject", admin_pb2.LockProjectRequest(project=project.strip(), reason=reason)
        )
    return gateway.admin(
        person, "UnlockProject", admin_pb2.UnlockProjectRequest(project=project.strip(), reason=reason)
    )


def audit_status(settings: Settings) -> dict[str, Any]:
    """`facefleet audit verify` on the scheduler's audit log."""
    from facefleet.security.audit import verify

    path = settings.audit.path
    if not path.is_file():
        return {"path": str(path), "ok": False, "records": 0, "head": "", "problem": "no audit log at this path"}
    report = verify(path)
    return {"path": str(path), **report.__dict__}


def residency(settings: Settings, project: str) -> dict[str, Any]:
    """`facefleet audit proof --project`: every task of the project, its pools and zones, the verdict."""
    from facefleet.security.audit import residency_proof

    proof = residency_proof(settings.audit.path, project.strip())
    return {
        "project": project.strip(),
        "passed": proof.passed,
        "chain_ok": proof.chain.ok,
        "chain_problem": proof.chain.problem,
        "tasks": [{**task.__dict__, "private_only": task.private_only} for task in proof.tasks],
        "locks": proof.locks,
    }


# -- fleet ----------------------------------------------------------------------------------------
def fleet(gateway: Gateway, person: Person) -> admin_pb2.Fleet:
    reply: admin_pb2.Fleet = gateway.admin(person, "ListFleet", admin_pb2.ListFleetRequest())
    return reply
