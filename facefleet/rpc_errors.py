"""gRPC errors a person can act on, with a machine-readable reason code.

Every refusal goes out as a gRPC status plus the trailing metadata key `facefleet-reason`
(an `ErrorReason` name from proto/facefleet/v1/types.proto) and, for bad input, `facefleet-field`.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from facefleet.v1 import types_pb2

REASON_KEY = "facefleet-reason"
FIELD_KEY = "facefleet-field"


class TaskInputError(ValueError):
    """A submitted task is invalid; `field` names the offending field path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    reason: int,
    message: str,
    field: str = "",
) -> NoReturn:
    """Abort the RPC with `code` and `message`, attaching the reason (and field) as metadata."""
    context.set_trailing_metadata(_trailers(reason, field))
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


async def abort_async(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    reason: int,
    message: str,
    field: str = "",
) -> NoReturn:
    """`abort` for coroutine handlers on a grpc.aio server."""
    context.set_trailing_metadata(_trailers(reason, field))
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _trailers(reason: int, field: str) -> tuple[tuple[str, str], ...]:
    metadata: list[tuple[str, str]] = [(REASON_KEY, types_pb2.ErrorReason.Name(reason))]  # type: ignore[arg-type]
    if field:
        metadata.append((FIELD_KEY, field))
    return tuple(metadata)


def reason_of(error: grpc.RpcError) -> str:
    """The `facefleet-reason` a server attached to `error`, or "" when none."""
    return _trailer(error, REASON_KEY)


def field_of(error: grpc.RpcError) -> str:
    """The `facefleet-field` (the refused field's path) a server attached to `error`, or "" when none."""
    return _trailer(error, FIELD_KEY)


def _trailer(error: grpc.RpcError, key: str) -> str:
    trailing_metadata = getattr(error, "trailing_metadata", None)  # a sync call's error, or grpc.aio's
    for item in (trailing_metadata() if callable(trailing_metadata) else None) or ():
        if item[0] == key:
            return str(item[1])
    return ""
