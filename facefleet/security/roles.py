"""Which role may call which RPC, and the server interceptor that enforces it.

Roles come from the client certificate (SAN URI `urn:facefleet:role:<role>`). Methods not in the
map are refused (fail closed); health checks and reflection need any authenticated peer.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

import grpc
import structlog

from facefleet.rpc_errors import abort, abort_async
from facefleet.security.identity import ANONYMOUS, Identity, peer_identity
from facefleet.v1 import types_pb2

HUMAN_ROLES = ("submitter", "operator", "finance", "compliance", "auditor")
COMPONENT_ROLES = ("scheduler", "agent")
ANY_AUTHENTICATED = frozenset({"*"})
INSECURE_IDENTITY = Identity(subject="insecure-dev", roles=frozenset({*HUMAN_ROLES, *COMPONENT_ROLES}))

_READERS = frozenset({"submitter", "operator", "auditor", "compliance", "finance"})

METHOD_ROLES: dict[str, frozenset[str]] = {
    "/facefleet.v1.Scheduler/SubmitTask": frozenset({"submitter", "operator"}),
    "/facefleet.v1.Scheduler/SubmitTasks": frozenset({"submitter", "operator"}),
    "/facefleet.v1.Scheduler/SubmitStream": frozenset({"submitter", "operator"}),
    "/facefleet.v1.Scheduler/CancelTask": frozenset({"submitter", "operator"}),
    "/facefleet.v1.Scheduler/GetTask": _READERS,
    "/facefleet.v1.Scheduler/ListTasks": _READERS,
    "/facefleet.v1.Scheduler/WatchTask": _READERS,
    "/facefleet.v1.Scheduler/Explain": _READERS,
    "/facefleet.v1.Scheduler/Heartbeat": frozenset({"agent"}),
    "/facefleet.v1.Scheduler/AgentSession": frozenset({"agent"}),
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
    "/facefleet.v1.Admin/ListFleet": frozenset({"operator", "auditor", "finance"}),
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

    def __init__(
        self, audit: _Auditor | None, insecure: bool = False, on_denial: Callable[[str], None] | None = None
    ) -> None:
        """`on_denial(method)` runs for each refused call (the serving process counts them)."""
        self.audit = audit
        self.insecure = insecure
        self.on_denial = on_denial
        if insecure:
            message = "RoleGate in INSECURE mode: every caller is 'insecure-dev' with ALL roles; never in production"
            log.warning("insecure_role_gate", message=message)
            sys.stderr.write(f"WARNING: {message}\n")

    def _identity(self, context: grpc.ServicerContext) -> Identity:
        return INSECURE_IDENTITY if self.insecure else peer_identity(context)

    def _deny(self, context: grpc.ServicerContext, identity: Identity, method: str) -> None:
        message = self._refusal(identity, method)
        abort(context, grpc.StatusCode.PERMISSION_DENIED, types_pb2.PERMISSION_DENIED_ROLE, message)

    def _refusal(self, identity: Identity, method: str) -> str:
        """Count, log and audit a refused call; the message to answer it with."""
        roles = required_roles(method)
        needed = (
            "an authenticated client certificate"
            if roles is ANY_AUTHENTICATED
            else ("one of the roles " + ", ".join(sorted(roles)) if roles else "nothing: the method is not allowed")
        )
        if self.on_denial is not None:
            self.on_denial(method)
        log.warning("permission_denied", method=method, actor=identity.subject, roles=sorted(identity.roles))
        if self.audit is not None:
            try:
                self.audit.denial(identity.subject, method, sorted(roles or ()), sorted(identity.roles))
            except Exception:  # the refusal stands even if the audit write fails; say so loudly
                log.exception("audit_write_failed", method=method, actor=identity.subject)
        who = f"{identity.subject} (roles: {', '.join(sorted(identity.roles)) or 'none'})"
        return (
            f"{method} needs {needed}; caller is {who}. Use a certificate carrying a permitted role "
            "(facefleet certs issue NAME --role ROLE)."
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


class AioRoleGate(grpc.aio.ServerInterceptor):
    """RoleGate for grpc.aio servers. Coroutine handlers are checked on the event loop (the audit
    write of a refusal runs on a thread); plain handlers, which the server runs on its thread pool,
    are wrapped exactly as RoleGate wraps them."""

    def __init__(
        self, audit: _Auditor | None, insecure: bool = False, on_denial: Callable[[str], None] | None = None
    ) -> None:
        self.gate = RoleGate(audit, insecure, on_denial)
        # Wrapped handler per method: the wrapping is the same for every call of a method.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def _check(self, context: grpc.aio.ServicerContext, method: str) -> Identity:
        identity = self.gate._identity(context)  # type: ignore[arg-type]
        if not is_allowed(identity, method):
            message = await asyncio.get_running_loop().run_in_executor(None, self.gate._refusal, identity, method)
            await abort_async(context, grpc.StatusCode.PERMISSION_DENIED, types_pb2.PERMISSION_DENIED_ROLE, message)
        return identity

    def _wrap_unary(self, behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        async def call(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            token = _current.set(await self._check(context, method))
            try:
                return await behavior(request_or_iterator, context)
            finally:
                _current.reset(token)

        return call

    def _wrap_stream(self, behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., Any]:
        async def call(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            token = _current.set(await self._check(context, method))
            try:
                async for item in behavior(request_or_iterator, context):
                    yield item
            finally:
                _current.reset(token)

        return call

    async def intercept_service(  # type: ignore[override]  # None = unknown method, as grpc expects
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        for kind, make, streams in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
        ):
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
                wrapped = (self._wrap_stream if streams else self._wrap_unary)(behavior, method)
            else:  # a plain handler: runs on the server's thread pool
                wrapped = (self.gate._wrap_stream if streams else self.gate._wrap_unary)(behavior, method)
            return make(wrapped, **options)  # type: ignore[operator]
        return handler
