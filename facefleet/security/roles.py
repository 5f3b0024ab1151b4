"""Which role may call which RPC, and the server interceptor that enforces it.

Roles come from the client certificate (SAN URI `urn:facefleet:role:<role>`). Methods not in the
map are refused (fail closed); health checks and reflection need any authenticated peer.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc
import structlog

from facefleet.rpc_errors import abort
from facefleet.security.identity import ANONYMOUS, Identity, peer_identity
from facefleet.v1 import types_pb2
from scheduler import metrics

HUMAN_ROLES = ("submitter", "operator", "finance", "compliance", "auditor")
COMPONENT_ROLES = ("scheduler", "agent")
ANY_AUTHENTICATED = frozenset({"*"})
INSECURE_IDENTITY = Identity(subject="insecure-dev", roles=frozenset({*HUMAN_ROLES, *COMPONENT_ROLES}))

_READERS = frozenset({"submitter", "operator", "auditor", "compliance", "finance"})

METHOD_ROLES: dict[str, frozenset[str]] = {
    "/facefleet.v1.Scheduler/SubmitTask": frozenset({"submitter", "operator"}),
    "/facefleet.v1.Scheduler/CancelTask": frozenset({"submitter", "operator"}),
    "/facefleet.v1.Scheduler/GetTask": _READERS,
    "/facefleet.v1.Scheduler/ListTasks": _READERS,
    "/facefleet.v1.Scheduler/WatchTask": _READERS,
    "/facefleet.v1.Scheduler/Explain": _READERS,
    "/facefleet.v1.Scheduler/Heartbeat": frozenset({"agent"}),
    "/facefleet.v1.Agent/RunTask": frozenset({"scheduler"}),
    "/facefleet.v1.Agent/CancelTask": frozenset({"scheduler"}),
    "/facefleet.v1.Agent/Describe": frozenset({"scheduler", "operator"}),
    "/facefleet.v1.Admin/WhoAmI": ANY_AUTHENTICATED,
    "/facefleet.v1.Admin/SetBudget": frozenset({"finance"}),
    "/facefleet.v1.Admin/ListBudgets": frozenset({"finance", "operator", "auditor"}),
    "/facefleet.v1.Admin/LockProject": frozenset({"compliance"}),
    "/facefleet.v1.Admin/UnlockProject": frozenset({"compliance"}),
    "/facefleet.v1.Admin/ListLocks": frozenset({"compliance", "auditor", "operator"}),
    "/facefleet.v1.Admin/ReloadRules": frozenset({"operator"}),
    "/facefleet.v1.Admin/DrainAgent": frozenset({"operator"}),
}
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_current: contextvars.ContextVar[Identity] = contextvars.ContextVar("facefleet_identity", default=ANONYMOUS)
log = structlog.get_logger()


def current_identity() -> Identity:
    """The caller of the RPC being handled (set by RoleGate); ANONYMOUS outside a gated call."""
    return _current.get()


def required_roles(method: str) -> frozenset[str] | None:
    """Roles allowed to call `method`; ANY_AUTHENTICATED; or None when the method is unknown (deny)."""
    if method in METHOD_ROLES:
        return METHOD_ROLES[method]
    if method.startswith(OPEN_SERVICES):
        return ANY_AUTHENTICATED
    return None


def is_allowed(identity: Identity, method: str) -> bool:
    roles = required_roles(method)
    if roles is None or not identity.authenticated:
        return False
    return roles is ANY_AUTHENTICATED or identity.has_any(roles)


class _Auditor(Protocol):  # the part of AuditLog the gate uses (structural: avoids an import cycle)
    def denial(self, actor: str, method: str, required_roles: list[str], roles: list[str]) -> Any: ...


class RoleGate(grpc.ServerInterceptor):
    """Refuse calls whose peer lacks a required role: PERMISSION_DENIED (PERMISSION_DENIED_ROLE),
    an audit record of kind "denial" and `facefleet_permission_denied_total{method}` +1.

    `insecure=True` (plaintext development servers only) treats every caller as "insecure-dev"
    with every role, and says so loudly.
    """

    def __init__(self, audit: _Auditor | None, insecure: bool = False) -> None:
        self.audit = audit
        self.insecure = insecure
        if insecure:
            message = "RoleGate in INSECURE mode: every caller is 'insecure-dev' with ALL roles; never in production"
            log.warning("insecure_role_gate", message=message)
            sys.stderr.write(f"WARNING: {message}\n")

    def _identity(self, context: grpc.ServicerContext) -> Identity:
        return INSECURE_IDENTITY if self.insecure else peer_identity(context)

    def _deny(self, context: grpc.ServicerContext, identity: Identity, method: str) -> None:
        roles = required_roles(method)
        needed = (
            "an authenticated client certificate"
            if roles is ANY_AUTHENTICATED
            else ("one of the roles " + ", ".join(sorted(roles)) if roles else "nothing: the method is not allowed")
        )
        metrics.DENIALS.labels(method).inc()
        log.warning("permission_denied", method=method, actor=identity.subject, roles=sorted(identity.roles))
        if self.audit is not None:
            try:
                self.audit.denial(identity.subject, method, sorted(roles or ()), sorted(identity.roles))
            except Exception:  # the refusal stands even if the audit write fails; say so loudly
                log.exception("audit_write_failed", method=method, actor=identity.subject)
        who = f"{identity.subject} (roles: {', '.join(sorted(identity.roles)) or 'none'})"
        abort(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            types_pb2.PERMISSION_DENIED_ROLE,
            f"{method} needs {needed}; caller is {who}. Use a certificate carrying a permitted role "
            "(facefleet certs issue NAME --role ROLE).",
        )

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def call(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            identity = self._identity(context)
            if not is_allowed(identity, method):
                self._deny(context, identity, method)
            token = _current.set(identity)
            try:
                return behavior(request_or_iterator, context)
            finally:
                _current.reset(token)

        return call

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def call(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            identity = self._identity(context)
            if not is_allowed(identity, method):
                self._deny(context, identity, method)
            token = _current.set(identity)
            try:
                yield from behavior(request_or_iterator, context)
            finally:
                _current.reset(token)

        return call

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._wrap_unary(handler.unary_unary, method), **options)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._wrap_unary(handler.stream_unary, method), **options)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(handler.unary_stream, method), **options)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self._wrap_stream(handler.stream_stream, method), **options)
        return handler
