"""Over real gRPC: an unknown field or an out-of-range enum in a submitted task is INVALID_ARGUMENT,
and the message (and the facefleet-field metadata) names the field."""

from __future__ import annotations

import grpc
import pytest

from facefleet.rpc_errors import FIELD_KEY, reason_of
from facefleet.v1 import scheduler_pb2, types_pb2


def valid_task() -> types_pb2.Task:
    return types_pb2.Task(
        project="promo-spring",
        sensitivity=types_pb2.SENSITIVITY_PUBLIC,
        priority=types_pb2.PRIORITY_HIGH,
        frames=1,
        source_uri="file:///data/in/face.jpg",
        target_uri="file:///data/in/shot.jpg",
        output_uri="file:///data/out/shot.jpg",
    )


def submit_raw(port: int, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/facefleet.v1.Scheduler/SubmitTask",
            request_serializer=lambda raw: raw,
            response_deserializer=scheduler_pb2.SubmitTaskResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
        return info.value


def test_unknown_field_in_the_task_is_named(start_scheduler) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    task_bytes = valid_task().SerializeToString() + b"\xb8\x06\x07"  # field 103 (varint) inside Task
    request = b"\x0a" + bytes([len(task_bytes)]) + task_bytes  # SubmitTaskRequest.task = 1
    error = submit_raw(app.port, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "103" in error.details() and "task" in error.details()
    assert reason_of(error) == "INVALID_TASK"


@pytest.mark.parametrize(("field", "number"), [("sensitivity", 3), ("priority", 4)])
def test_enum_value_outside_the_enum_is_named(start_scheduler, field: str, number: int) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    task = valid_task()
    task.ClearField(field)
    task_bytes = task.SerializeToString() + bytes([number << 3, 9])  # value 9 is no enum member
    request = b"\x0a" + bytes([len(task_bytes)]) + task_bytes
    error = submit_raw(app.port, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"task.{field}" in error.details()
    assert (FIELD_KEY, f"task.{field}") in tuple(error.trailing_metadata() or ())
    # The server keeps serving: the valid task goes through.
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        from facefleet.v1 import scheduler_pb2_grpc

        reply = scheduler_pb2_grpc.SchedulerStub(channel).SubmitTask(
            scheduler_pb2.SubmitTaskRequest(task=valid_task()), timeout=10
        )
        assert reply.created
