"""Every gRPC method of the Scheduler, Admin and Agent services, fed hostile requests over mTLS.

Requests are generated from the contract itself (the services' descriptors): every field filled
with corpus strings, made-up text, extreme and non-finite numbers, unknown enum values, nested
and repeated values; then raw bytes that are not a valid message at all. Each call must end in OK
or a status that names a client-side problem; never UNKNOWN/INTERNAL (a crash in a handler) or
UNAVAILABLE, never a traceback in the server logs. After each method: both servers answer their
health check and every task the scheduler accepted is still there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facefleet.rpc_errors import reason_of
from facefleet.v1 import admin_pb2, agent_pb2, scheduler_pb2, types_pb2
from tests.agent.conftest import write_image
from tests.hostile.conftest import HostileStack
from tests.hostile.corpus import NUMBERS, hostile_text

SERVICES = (
    scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"],
    admin_pb2.DESCRIPTOR.services_by_name["Admin"],
    agent_pb2.DESCRIPTOR.services_by_name["Agent"],
)
METHODS = [method for service in SERVICES for method in service.methods]
CLIENT_SIDE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ABORTED,  # a dispatch fenced as stale (older leader term)
}
STREAM_DEADLINE_S = 3.0
EXAMPLES = 12  # per method; about 240 generated calls in all

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def identity_for(method: MethodDescriptor) -> str:
    """A certificate whose roles may call the method, so the handler (not the role gate) sees the input."""
    if method.containing_service.name == "Agent":
        return "scheduler"
    return "agent" if method.name == "Heartbeat" else "admin"


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return hostile_text(wire=True)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width = 64 if kind == FieldDescriptor.TYPE_DOUBLE else 32
        return st.one_of(st.sampled_from(NUMBERS), st.floats(width=width))
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))  # open enums: unknown numbers too
    low, high = INT_RANGES[kind]
    return st.one_of(st.sampled_from([low, high, 0, 1]), st.integers(low, high))


def message_values(descriptor: Descriptor, depth: int) -> st.SearchStrategy[dict[str, Any]]:
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            if value.message_type is None:
                optional[field.name] = st.dictionaries(scalar(key), scalar(value), max_size=3)
        elif field.message_type is not None:
            if depth >= 3:
                continue
            inner = message_values(field.message_type, depth + 1)
            is_list = field.is_repeated
            optional[field.name] = st.lists(inner, max_size=3) if is_list else inner
        elif field.is_repeated:
            optional[field.name] = st.lists(scalar(field), max_size=4)
        else:
            optional[field.name] = scalar(field)
    return st.fixed_dictionaries({}, optional=optional)


def valid_bases(stack: HostileStack) -> dict[str, dict[str, Any]]:
    """A request each input-checking method accepts, so that mutations of one or two fields reach the
    checks behind the first one (a wholly random request rarely passes the first)."""
    data = stack.root / "data"
    task = {
        "project": "hostile", "sensitivity": types_pb2.SENSITIVITY_PRIVATE, "priority": types_pb2.PRIORITY_NORMAL,
        "frames": 1, "source_uri": write_image(data / "source.png", 1).as_uri(),
        "target_uri": write_image(data / "target.png", 2).as_uri(), "output_uri": (data / "out.png").as_uri(),
    }  # fmt: skip
    beat = {
        "agent_id": "fuzz-agent", "pool": "fuzz-pool", "trust_zone": "private", "address": "127.0.0.1:1",
        "total_slots": 1, "free_slots": 1,
    }  # fmt: skip
    return {
        "SubmitTask": {"task": task},
        "SubmitTasks": {"items": [{"task": task}, {"task": task, "idempotency_key": "fuzz-batch"}]},
        "SubmitStream": {"seq": 1, "submit": {"task": task}},
        "Explain": {"task": task},
        "RunTask": {"task": {**task, "id": "fuzz-run"}, "attempt": 1, "leader_term": stack.scheduler.dispatcher.term},
        "Heartbeat": beat,
        "LockProject": {"project": "fuzz-project", "reason": "fuzzing"},
        "UnlockProject": {"project": "fuzz-project", "reason": "fuzzing"},
        "SetBudget": {"name": "fuzz", "monthly_cap_usd": 10.0, "alert_pct": 80.0, "reason": "fuzzing", "create": True},
        "DrainAgent": {"agent_id": "fuzz-agent", "reason": "fuzzing"},
        "ListTasks": {"project": "hostile", "limit": 10},
    }


def mutated(base: dict[str, Any], descriptor: Descriptor) -> st.SearchStrategy[dict[str, Any]]:
    """`base` with up to two fields (top level or one level down) replaced by generated values."""

    @st.composite
    def draw(draw_from: st.DrawFn) -> dict[str, Any]:
        values = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
        generated = draw_from(message_values(descriptor, 0))
        for key in draw_from(st.lists(st.sampled_from(sorted(generated) or [""]), max_size=2, unique=True)):
            if key not in generated:
                continue
            inner = generated[key]
            if isinstance(inner, dict) and isinstance(values.get(key), dict) and inner and values[key]:
                chosen = draw_from(st.sampled_from(sorted(inner)))
                values[key][chosen] = inner[chosen]
            else:
                values[key] = inner
        return values

    return draw()


def build(descriptor: Descriptor, values: dict[str, Any]) -> Message:
    message = message_factory.GetMessageClass(descriptor)()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(message, name) if field.is_repeated else None
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target.update(value)  # type: ignore[union-attr]
        elif field.message_type is not None and target is not None:
            for item in value:
                target.add().CopyFrom(build(field.message_type, item))
        elif field.message_type is not None:
            getattr(message, name).CopyFrom(build(field.message_type, value))
        elif target is not None:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


def invoke(stack: HostileStack, method: MethodDescriptor, payload: Message | bytes) -> grpc.StatusCode:
    """Call the method with a message (or raw bytes); the status code it ended with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    address = stack.agent_address if method.containing_service.name == "Agent" else None
    raw = isinstance(payload, bytes)
    serialize: Callable[[Any], bytes] = (lambda b: b) if raw else (lambda m: m.SerializeToString())
    response_type = message_factory.GetMessageClass(method.output_type)
    with stack.channel(identity_for(method), address) as channel:
        try:
            if method.server_streaming:
                call = channel.unary_stream(path, serialize, response_type.FromString)
                for reply in call(payload, timeout=STREAM_DEADLINE_S):
                    reply.ListFields()
            else:
                reply = channel.unary_unary(path, serialize, response_type.FromString)(payload, timeout=15)
                if method.name == "SubmitTask":
                    stack.accepted.add(reply.task_id)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
                return grpc.StatusCode.OK  # a stream still open at the deadline is a working stream
            assert code in CLIENT_SIDE, f"{path}: {code.name} ({reason_of(error)}): {error.details()}"
            return code  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_generated_requests_end_cleanly(
    stack: HostileStack, method: MethodDescriptor, capfd: pytest.CaptureFixture[str]
) -> None:
    base = valid_bases(stack).get(method.name)
    requests = message_values(method.input_type, 0)
    if base is not None:
        assert build(method.input_type, base).IsInitialized()
        requests = st.one_of(requests, mutated(base, method.input_type), mutated(base, method.input_type))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(values=requests)
    def call(values: dict[str, Any]) -> None:
        invoke(stack, method, build(method.input_type, values))

    call()
    stack.assert_healthy()
    logs = capfd.readouterr()
    assert "Traceback" not in logs.out + logs.err, logs.out[-3000:] + logs.err[-3000:]


RAW_PAYLOADS = (
    b"",
    b"\xff" * 16,
    b"\x0a\x04\xc3\x28\xff\xfe",  # field 1 as a string that is not UTF-8
    b"\x0a\xff\xff\xff\xff\x0f",  # field 1 claims 4 GiB
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an over-long varint
    b"\x0b" * 64,  # start-group tags that never end
    b"\x0a\x7f" + b"\x0a\x7d" * 63,  # nested length prefixes that do not add up
)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_bytes_that_are_no_message_are_refused(
    stack: HostileStack, method: MethodDescriptor, capfd: pytest.CaptureFixture[str]
) -> None:
    for payload in RAW_PAYLOADS:
        path = f"/{method.containing_service.full_name}/{method.name}"
        try:
            invoke(stack, method, payload)
        except AssertionError as problem:
            # grpc itself answers INTERNAL "Exception deserializing request!" before any handler runs
            assert "deserializing request" in str(problem), f"{path} {payload!r}: {problem}"
    stack.assert_healthy()
    logs = capfd.readouterr()
    assert "Traceback" not in logs.out + logs.err, logs.out[-3000:] + logs.err[-3000:]


def test_reload_rules_answers_applied_false_for_rules_that_are_not_utf8(stack: HostileStack) -> None:
    rules = stack.settings.policy.dir / "rules.yaml"
    good = rules.read_bytes()
    admin = admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name["ReloadRules"]
    try:
        rules.write_bytes(good.replace(b"private-onprem", b"priv\xe9-onprem"))
        with stack.channel("operator") as channel:
            call = channel.unary_unary(
                f"/{admin.containing_service.full_name}/ReloadRules",
                admin_pb2.ReloadRulesRequest.SerializeToString,
                admin_pb2.ReloadRulesResponse.FromString,
            )
            reply = call(admin_pb2.ReloadRulesRequest(), timeout=15)
        assert not reply.applied and any("not UTF-8 text" in error for error in reply.errors), reply
    finally:
        rules.write_bytes(good)
    stack.assert_healthy()


def test_impossible_heartbeat_is_refused_and_the_agent_stays_as_it_was(stack: HostileStack) -> None:
    beat = scheduler_pb2.HeartbeatRequest(
        agent_id="hostile-agent", pool="onprem-hostile", trust_zone="private", address="127.0.0.1:1",
        total_slots=1, free_slots=50,
    )  # fmt: skip
    method = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].methods_by_name["Heartbeat"]
    assert invoke(stack, method, beat) == grpc.StatusCode.INVALID_ARGUMENT
    assert stack.scheduler.registry.get("hostile-agent").address == stack.agent_address  # type: ignore[union-attr]


def test_a_video_task_on_an_agent_without_ffprobe_fails_with_a_reason(
    stack: HostileStack, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import shutil

    data = stack.root / "data"
    source, target = data / "face.png", data / "clip.mp4"
    write_image(source, 1)
    target.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "ffprobe" else real_which(name))
    task = types_pb2.Task(
        id="no-ffprobe", project="p", sensitivity=types_pb2.SENSITIVITY_PRIVATE, priority=types_pb2.PRIORITY_NORMAL,
        frames=10, source_uri=source.as_uri(), target_uri=target.as_uri(), output_uri=(data / "out.mp4").as_uri(),
    )  # fmt: skip
    method = agent_pb2.DESCRIPTOR.services_by_name["Agent"].methods_by_name["RunTask"]
    with stack.channel("scheduler", stack.agent_address) as channel:
        call = channel.unary_stream(
            f"/{method.containing_service.full_name}/RunTask",
            agent_pb2.RunTaskRequest.SerializeToString,
            types_pb2.Progress.FromString,
        )
        request = agent_pb2.RunTaskRequest(task=task, attempt=1, leader_term=stack.scheduler.dispatcher.term)
        last = list(call(request, timeout=30))[-1]
    assert last.state == types_pb2.TASK_STATE_FAILED
    assert last.error.reason == types_pb2.PROVIDER_UNAVAILABLE and "ffprobe is not installed" in last.error.message
    logs = capfd.readouterr()
    assert "Traceback" not in logs.out + logs.err and "task_crashed" not in logs.out + logs.err
