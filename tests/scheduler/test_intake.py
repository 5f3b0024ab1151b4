"""SubmitTask validation: each bad field is named; defaults filled; fuzzed inputs never escape as crashes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facefleet.rpc_errors import TaskInputError
from facefleet.scheduler.intake import MAX_REQUEST_BYTES, validate_submit
from facefleet.v1 import scheduler_pb2, types_pb2


def good_task(**overrides: object) -> types_pb2.Task:
    task = types_pb2.Task(
        project="promo-spring",
        sensitivity=types_pb2.SENSITIVITY_PUBLIC,
        priority=types_pb2.PRIORITY_HIGH,
        frames=120,
        source_uri="s3://faces/alice.jpg",
        target_uri="file:///data/clip.mp4",
    )
    for key, value in overrides.items():
        setattr(task, key, value)
    return task


def field_of(request: scheduler_pb2.SubmitTaskRequest) -> str:
    with pytest.raises(TaskInputError) as info:
        validate_submit(request)
    return info.value.field


def test_defaults_are_filled_in() -> None:
    task = good_task(sensitivity=0, priority=0, frames=0)
    clean = validate_submit(scheduler_pb2.SubmitTaskRequest(task=task)).task
    assert clean.sensitivity == types_pb2.SENSITIVITY_PRIVATE  # fail safe: stays on-prem
    assert clean.priority == types_pb2.PRIORITY_NORMAL
    assert clean.frames == 1
    assert (clean.options.face_selector, clean.options.mask, clean.options.blend) == ("largest", "inswapper", 1.0)
    assert clean.options.checkpoint_every_frames == 48


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"project": ""}, "task.project"),
        ({"project": "Bad Name!"}, "task.project"),
        ({"id": "chosen-by-client"}, "task.id"),
        ({"source_uri": ""}, "task.source_uri"),
        ({"source_uri": "http://example.com/a.jpg"}, "task.source_uri"),
        ({"target_uri": "file:///data/../etc/passwd"}, "task.target_uri"),
        ({"target_uri": "file://relative/path"}, "task.target_uri"),
        ({"output_uri": "s3://bucket-only"}, "task.output_uri"),
        ({"target_uri": "file:///" + "a" * 3000}, "task.target_uri"),
        ({"target_uri": "file:///data/a\nb"}, "task.target_uri"),
        ({"frames": 20_000_000}, "task.frames"),
        ({"sla_seconds": 10**7}, "task.sla_seconds"),
    ],
)
def test_bad_fields_are_named(overrides: dict[str, object], field: str) -> None:
    assert field_of(scheduler_pb2.SubmitTaskRequest(task=good_task(**overrides))) == field


def test_open_enum_values_are_refused_with_the_allowed_names() -> None:
    task = good_task()
    task.sensitivity = 9  # type: ignore[assignment]
    with pytest.raises(TaskInputError, match="public, internal, private") as info:
        validate_submit(scheduler_pb2.SubmitTaskRequest(task=task))
    assert info.value.field == "task.sensitivity"
    task = good_task()
    task.priority = 77  # type: ignore[assignment]
    assert field_of(scheduler_pb2.SubmitTaskRequest(task=task)) == "task.priority"


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("face_selector", "everyone", "task.options.face_selector"),
        ("mask", "hexagon", "task.options.mask"),
        ("blend", 1.5, "task.options.blend"),
        ("blend", float("nan"), "task.options.blend"),
        ("execution_provider", "rocm", "task.options.execution_provider"),
        ("face_selector", "reference", "task.options.reference_face_uri"),
        ("checkpoint_every_frames", 10**6, "task.options.checkpoint_every_frames"),
        ("min_id_similarity", 1.5, "task.options.min_id_similarity"),
        ("min_id_similarity", -0.1, "task.options.min_id_similarity"),
        ("min_id_similarity", float("nan"), "task.options.min_id_similarity"),
    ],
)
def test_pipeline_options(option: str, value: object, field: str) -> None:
    task = good_task()
    setattr(task.options, option, value)
    assert field_of(scheduler_pb2.SubmitTaskRequest(task=task)) == field


def test_labels_limits() -> None:
    task = good_task()
    task.labels["bad key!"] = "x"
    assert field_of(scheduler_pb2.SubmitTaskRequest(task=task)) == "task.labels"
    task = good_task()
    task.labels["ok"] = "v" * 300
    assert field_of(scheduler_pb2.SubmitTaskRequest(task=task)) == "task.labels[ok]"
    task = good_task()
    for i in range(40):
        task.labels[f"k{i}"] = "v"
    assert field_of(scheduler_pb2.SubmitTaskRequest(task=task)) == "task.labels"


def test_unknown_fields_are_named_with_their_message_path() -> None:
    inner = good_task().SerializeToString() + b"\xa8\x06\x05"  # field 101, varint, inside Task
    raw = b"\x0a" + bytes([len(inner)]) + inner
    request = scheduler_pb2.SubmitTaskRequest()
    request.ParseFromString(raw)
    with pytest.raises(TaskInputError, match=r"\[101\].*facefleet.v1.Task") as info:
        validate_submit(request)
    assert info.value.field == "request.task"


def test_oversized_request_and_missing_task() -> None:
    task = good_task()
    task.labels["big"] = "x" * 200
    request = scheduler_pb2.SubmitTaskRequest(task=task, idempotency_key="k")
    assert field_of(scheduler_pb2.SubmitTaskRequest()) == "task"
    assert field_of(scheduler_pb2.SubmitTaskRequest(task=good_task(), idempotency_key="k" * 200)) == "idempotency_key"
    with pytest.raises(TaskInputError, match=str(MAX_REQUEST_BYTES)):
        validate_submit(request, wire_size=MAX_REQUEST_BYTES + 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    project=st.text(max_size=80),
    sensitivity=st.integers(min_value=-5, max_value=10),
    priority=st.integers(min_value=-5, max_value=10),
    frames=st.integers(min_value=0, max_value=2**32 - 1),
    sla=st.integers(min_value=0, max_value=2**32 - 1),
    uri=st.one_of(st.text(max_size=100), st.sampled_from(["file:///a", "s3://b/k", "s3://", "file:///x/../y"])),
    blend=st.floats(allow_nan=True, allow_infinity=True, width=32),
    selector=st.text(max_size=12),
)
def test_fuzzed_requests_are_either_clean_or_a_named_field_error(
    project: str, sensitivity: int, priority: int, frames: int, sla: int, uri: str, blend: float, selector: str
) -> None:
    task = types_pb2.Task(project=project, frames=frames, sla_seconds=sla, source_uri=uri, target_uri="file:///t")
    task.sensitivity = sensitivity  # type: ignore[assignment]
    task.priority = priority  # type: ignore[assignment]
    task.options.blend = blend
    task.options.face_selector = selector
    try:
        clean = validate_submit(scheduler_pb2.SubmitTaskRequest(task=task)).task
    except TaskInputError as error:
        assert error.field.startswith("task") and error.message
        return
    assert clean.sensitivity in (1, 2, 3) and clean.priority in (1, 2, 3, 4)
    assert 0 < clean.options.blend <= 1 and clean.frames >= 1
    assert clean.source_uri.startswith(("file:///", "s3://"))
