"""The Admin gRPC service: budgets (finance), project locks (compliance), rules and drains (operator).

Roles are enforced by RoleGate before a handler runs; every call that reaches a handler is audited
here with the caller's identity and its outcome (ok, rejected, failed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Protocol

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from facefleet.domain import PROJECT_NAME_RULE, is_project_name
from facefleet.money import PERCENT, USD, AmountError
from facefleet.rpc_errors import abort
from facefleet.scheduler.intake import CONTROL_CHARS
from facefleet.security.audit import AuditLog
from facefleet.security.roles import current_identity
from facefleet.v1 import admin_pb2, admin_pb2_grpc, types_pb2

log = structlog.get_logger()

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
MAX_REASON_CHARS = 500
DEFAULT_ALERT_PCT = 80.0


class RuleSnapshot(Protocol):
    locks: Mapping[str, str]  # project -> reason
    budgets: Mapping[str, Any]  # name -> object or mapping with monthly_cap_usd, alert_pct


class AdminRuleSource(Protocol):
    """What the Admin service needs from scheduler.rules_source.RuleSource."""

    def set_lock(self, project: str, reason: str, by: str) -> Any: ...
    def remove_lock(self, project: str) -> Any: ...
    def set_budget(self, name: str, monthly_cap_usd: float, alert_pct: float) -> Any: ...
    def current(self) -> RuleSnapshot: ...
    def reload(self) -> Any: ...


class _Rejected(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _budget_value(budget: Any, name: str, default: float = 0.0) -> float:
    value = budget.get(name, default) if isinstance(budget, Mapping) else getattr(budget, name, default)
    return float(value if value is not None else default)


def _check_name(field: str, value: str, what: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise _Rejected(
            field,
            f"{what} {value!r} is not a valid name: use 1-128 letters, digits, '_', '.', '-', starting "
            "with a letter or digit",
        )
    return value


def _check_project(value: str) -> str:
    """The same project-name rule as task intake: a lock on a name no task can carry would never apply."""
    if not is_project_name(value):
        hint = f"; did you mean {value.lower()!r}?" if is_project_name(value.lower()) else ""
        raise _Rejected("project", f"project {value[:80]!r} is not a valid project name ({PROJECT_NAME_RULE}){hint}")
    return value


def _check_reason(value: str) -> str:
    reason = value.strip()
    if not reason:
        raise _Rejected("reason", "a reason is required: say why (ticket, regulation, incident) for the audit log")
    if len(reason) > MAX_REASON_CHARS:
        raise _Rejected("reason", f"reason is {len(reason)} characters; keep it under {MAX_REASON_CHARS}")
    if CONTROL_CHARS.search(reason):
        raise _Rejected("reason", "reason holds control characters (newline, escape...): write it on one line")
    return reason


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        rule_source: AdminRuleSource,
        audit: AuditLog,
        drain: Callable[[str], bool],
        spent_usd: Callable[[str], float] = lambda name: 0.0,
        fleet: Callable[[], admin_pb2.Fleet] = admin_pb2.Fleet,
    ) -> None:
        self.rules = rule_source
        self.audit = audit
        self.drain = drain
        self.spent_usd = spent_usd
        self.fleet = fleet

    # -- plumbing ---------------------------------------------------------------------------
    def _audit(self, act: str, args: dict[str, Any], outcome: str) -> None:
        self.audit.admin(current_identity().subject, act, args, outcome)

    def _run(self, act: str, args: dict[str, Any], context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        """Run `work`, audit the outcome, and turn validation or backend errors into gRPC statuses."""
        try:
            result = work()
        except _Rejected as exc:
            self._audit(act, {**args, "error": exc.message}, "rejected")
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, types_pb2.INVALID_TASK, exc.message, exc.field)
        except Exception as exc:
            log.exception("admin_call_failed", act=act)
            self._audit(act, {**args, "error": str(exc)}, "failed")
            self._fail(context, act, exc)
        self._audit(act, args, "ok")
        return result

    @staticmethod
    def _fail(context: grpc.ServicerContext, act: str, exc: Exception) -> NoReturn:
        abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            types_pb2.INTERNAL,
            f"{act} could not be applied: {exc}. Nothing changed; check the rules store and retry.",
        )

    # -- RPCs -------------------------------------------------------------------------------
    def WhoAmI(self, request: admin_pb2.WhoAmIRequest, context: grpc.ServicerContext) -> admin_pb2.Identity:
        identity = current_identity()
        self._audit("whoami", {}, "ok")
        return admin_pb2.Identity(subject=identity.subject, roles=sorted(identity.roles))

    def SetBudget(self, request: admin_pb2.SetBudgetRequest, context: grpc.ServicerContext) -> admin_pb2.Budget:
        args = {
            "name": request.name, "monthly_cap_usd": request.monthly_cap_usd,
            "alert_pct": request.alert_pct, "reason": request.reason, "create": request.create,
        }  # fmt: skip

        def work() -> admin_pb2.Budget:
            name = _check_name("name", request.name, "budget")
            try:
                cap = USD.check(request.monthly_cap_usd, "monthly_cap_usd")
                alert = PERCENT.check(request.alert_pct or DEFAULT_ALERT_PCT, "alert_pct")
            except AmountError as exc:
                field = str(exc).split(":", 1)[0]
                raise _Rejected(field, str(exc)) from None
            _check_reason(request.reason)
            if not request.create and name not in self.rules.current().budgets:
                known = ", ".join(sorted(self.rules.current().budgets)) or "none"
                raise _Rejected("name", f"no budget account {name!r} (known: {known}); set create to add a new account")
            self.rules.set_budget(name, cap, alert)
            return admin_pb2.Budget(name=name, monthly_cap_usd=cap, alert_pct=alert, spent_usd=self.spent_usd(name))

        result: admin_pb2.Budget = self._run("set_budget", args, context, work)
        return result

    def ListBudgets(
        self, request: admin_pb2.ListBudgetsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListBudgetsResponse:
        def work() -> admin_pb2.ListBudgetsResponse:
            budgets = self.rules.current().budgets
            return admin_pb2.ListBudgetsResponse(
                budgets=[
                    admin_pb2.Budget(
                        name=name,
                        monthly_cap_usd=_budget_value(budget, "monthly_cap_usd"),
                        alert_pct=_budget_value(budget, "alert_pct", DEFAULT_ALERT_PCT),
                        spent_usd=self.spent_usd(name),
                    )
                    for name, budget in sorted(budgets.items())
                ]
            )

        result: admin_pb2.ListBudgetsResponse = self._run("list_budgets", {}, context, work)
        return result

    def LockProject(
        self, request: admin_pb2.LockProjectRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ProjectLock:
        by = current_identity().subject

        def work() -> admin_pb2.ProjectLock:
            project = _check_project(request.project)
            reason = _check_reason(request.reason)
            self.rules.set_lock(project, reason, by)
            self.audit.lock(by, project, reason, locked=True)
            return admin_pb2.ProjectLock(project=project, reason=reason, locked=True, by=by, at=_now())

        result: admin_pb2.ProjectLock = self._run(
            "lock_project", {"project": request.project, "reason": request.reason}, context, work
        )
        return result

    def UnlockProject(
        self, request: admin_pb2.UnlockProjectRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ProjectLock:
        by = current_identity().subject
        args: dict[str, Any] = {"project": request.project, "reason": request.reason}

        def work() -> admin_pb2.ProjectLock:
            project = _check_name("project", request.project, "project")
            reason = _check_reason(request.reason)
            was_locked = project in self.rules.current().locks
            args["was_locked"] = was_locked
            if was_locked:
                self.rules.remove_lock(project)
                self.audit.lock(by, project, reason, locked=False)
            return admin_pb2.ProjectLock(project=project, reason=reason, locked=False, by=by, at=_now())

        result: admin_pb2.ProjectLock = self._run("unlock_project", args, context, work)
        return result

    def ListLocks(
        self, request: admin_pb2.ListLocksRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListLocksResponse:
        def work() -> admin_pb2.ListLocksResponse:
            locks = self.rules.current().locks
            return admin_pb2.ListLocksResponse(
                locks=[
                    admin_pb2.ProjectLock(project=project, reason=reason, locked=True)
                    for project, reason in sorted(locks.items())
                ]
            )

        result: admin_pb2.ListLocksResponse = self._run("list_locks", {}, context, work)
        return result

    def ReloadRules(
        self, request: admin_pb2.ReloadRulesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ReloadRulesResponse:
        """A reload that finds an invalid rule set keeps the last good one: applied=false, errors listed."""

        def work() -> admin_pb2.ReloadRulesResponse:
            outcome = self.rules.reload()
            errors = [str(error) for error in (getattr(outcome, "errors", None) or [])]
            applied = bool(getattr(outcome, "applied", not errors)) if outcome is not None else True
            version = str(getattr(outcome, "version", "") or getattr(self.rules.current(), "version", ""))
            return admin_pb2.ReloadRulesResponse(version=version, applied=applied, errors=errors)

        result: admin_pb2.ReloadRulesResponse = self._run("reload_rules", {}, context, work)
        return result

    def DrainAgent(
        self, request: admin_pb2.DrainAgentRequest, context: grpc.ServicerContext
    ) -> admin_pb2.DrainAgentResponse:
        args: dict[str, Any] = {"agent_id": request.agent_id, "reason": request.reason}

        def work() -> admin_pb2.DrainAgentResponse:
            if not request.agent_id.strip():
                raise _Rejected("agent_id", "agent_id is required: see `facefleet agents` for the ids")
            _check_reason(request.reason)
            found = bool(self.drain(request.agent_id))
            args["found"] = found
            return admin_pb2.DrainAgentResponse(found=found)

        result: admin_pb2.DrainAgentResponse = self._run("drain_agent", args, context, work)
        return result

    def ListFleet(self, request: admin_pb2.ListFleetRequest, context: grpc.ServicerContext) -> admin_pb2.Fleet:
        """Live telemetry that the console polls every second: not audited when allowed (a record a
        second per open page would bury the acts); a refusal is audited by RoleGate as always."""
        try:
            return self.fleet()
        except Exception as exc:
            log.exception("admin_call_failed", act="list_fleet")
            self._fail(context, "list_fleet", exc)
