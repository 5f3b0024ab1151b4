"""Validate a SubmitTaskRequest into a clean task, or raise TaskInputError naming the field.

Checks, in order: total size, unknown fields (proto3 keeps them silently: a client built against a
newer or wrong contract must hear about it), enums outside their range (proto3 enums are open),
project, URIs, frames, SLA, labels, pipeline options. Defaults are filled in here so the rest of
the scheduler sees one normal form. An unspecified sensitivity becomes PRIVATE: the safe default
(it only ever runs on-prem).
"""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from facefleet.domain import PROJECT_NAME_RULE, is_project_name
from facefleet.rpc_errors import TaskInputError
from facefleet.scheduler.placement.model import MAX_FRAMES
from facefleet.scheduler.store import NewTask
from facefleet.v1 import scheduler_pb2, types_pb2

MAX_REQUEST_BYTES = 64 * 1024
MAX_URI_CHARS = 2048
MAX_SLA_SECONDS = 7 * 24 * 3600
MAX_LABELS = 32
MAX_LABEL_VALUE_CHARS = 256
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_CHECKPOINT_EVERY = 100_000
DEFAULT_CHECKPOINT_EVERY = 48

LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
URI_SCHEMES = ("file", "s3")
FACE_SELECTORS = ("all", "largest", "reference")
MASKS = ("inswapper", "box", "ellipse")  # the agent's MaskKind, first the default (a test checks both)
PROVIDERS = ("tensorrt", "cuda", "cpu")


def validate_submit(request: scheduler_pb2.SubmitTaskRequest, wire_size: int | None = None) -> NewTask:
    """The clean task to store. `wire_size` is the serialized size when the caller knows it."""
    size = wire_size if wire_size is not None else request.ByteSize()
    if size > MAX_REQUEST_BYTES:
        raise TaskInputError(
            "request", f"request is {size} bytes; the limit is {MAX_REQUEST_BYTES} (large data goes in URIs)"
        )
    reject_unknown_fields(request, "request")
    if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise TaskInputError(
            "idempotency_key",
            f"{len(request.idempotency_key)} characters; the limit is {MAX_IDEMPOTENCY_KEY_CHARS}",
        )
    if not request.HasField("task"):
        raise TaskInputError("task", "missing: set task.project, task.source_uri and task.target_uri")
    return NewTask(task=validate_task(request.task), idempotency_key=request.idempotency_key)


def validate_task(task: types_pb2.Task, path: str = "task") -> types_pb2.Task:
    """Return a normalised copy of `task` (defaults filled in) or raise TaskInputError."""
    reject_unknown_fields(task, path)
    clean = types_pb2.Task()
    clean.CopyFrom(task)
    if clean.id:
        raise TaskInputError(f"{path}.id", "must be empty: the scheduler assigns task ids")
    if not clean.project:
        raise TaskInputError(f"{path}.project", "missing: every task belongs to a project")
    if not is_project_name(clean.project):
        raise TaskInputError(
            f"{path}.project", f"{clean.project[:80]!r} is not a valid project name ({PROJECT_NAME_RULE})"
        )
    sensitivity = _enum_value(types_pb2.Sensitivity, clean.sensitivity, f"{path}.sensitivity", "SENSITIVITY_")
    clean.sensitivity = sensitivity or types_pb2.SENSITIVITY_PRIVATE  # type: ignore[assignment]
    priority = _enum_value(types_pb2.Priority, clean.priority, f"{path}.priority", "PRIORITY_")
    clean.priority = priority or types_pb2.PRIORITY_NORMAL  # type: ignore[assignment]
    _check_uri(clean.source_uri, f"{path}.source_uri", required=True)
    _check_uri(clean.target_uri, f"{path}.target_uri", required=True)
    _check_uri(clean.output_uri, f"{path}.output_uri", required=False)
    if clean.frames == 0:
        clean.frames = 1
    if clean.frames > MAX_FRAMES:
        raise TaskInputError(f"{path}.frames", f"{clean.frames} frames; the limit is {MAX_FRAMES}")
    if clean.sla_seconds > MAX_SLA_SECONDS:
        raise TaskInputError(
            f"{path}.sla_seconds", f"{clean.sla_seconds} s; the limit is {MAX_SLA_SECONDS} s (7 days); 0 = no SLA"
        )
    _check_labels(clean, path)
    _check_options(clean.options, f"{path}.options")
    return clean


def reject_unknown_fields(message: Message, path: str) -> None:
    """Raise for a field number the contract does not define, anywhere in `message`."""
    unknown = UnknownFieldSet(message)
    if len(unknown):
        numbers = sorted({unknown[index].field_number for index in range(len(unknown))})
        raise TaskInputError(
            path,
            f"unknown field number(s) {numbers} in {message.DESCRIPTOR.full_name}; "
            "the client and scheduler disagree on the contract (regenerate the client stubs)",
        )
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None or descriptor.message_type.GetOptions().map_entry:
            continue
        if descriptor.is_repeated:
            for index, item in enumerate(value):
                reject_unknown_fields(item, f"{path}.{descriptor.name}[{index}]")
        else:
            reject_unknown_fields(value, f"{path}.{descriptor.name}")


def _enum_value(enum: object, value: int, field: str, prefix: str) -> int:
    if value not in enum.values():  # type: ignore[attr-defined]
        allowed = [name.removeprefix(prefix).lower() for name in enum.keys()[1:]]  # type: ignore[attr-defined]
        raise TaskInputError(field, f"{value} is not a valid value; use one of {', '.join(allowed)}")
    return value


def _check_uri(uri: str, field: str, required: bool) -> None:
    if not uri:
        if required:
            raise TaskInputError(field, "missing: give a file:///path or s3://bucket/key URI")
        return
    if len(uri) > MAX_URI_CHARS:
        raise TaskInputError(field, f"{len(uri)} characters; the limit is {MAX_URI_CHARS}")
    if CONTROL_CHARS.search(uri):
        raise TaskInputError(field, "contains control characters; percent-encode them")
    parts = urlsplit(uri)
    if parts.scheme not in URI_SCHEMES:
        raise TaskInputError(
            field, f"scheme {parts.scheme or '(none)'!r} is not allowed; use file:///path or s3://bucket/key"
        )
    if ".." in parts.path.split("/"):
        raise TaskInputError(field, "'..' path segments are not allowed (path traversal); give a normalised path")
    if parts.scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path.startswith("/")):
        raise TaskInputError(field, f"{uri[:80]!r} is not an absolute local path; use file:///absolute/path")
    if parts.scheme == "s3" and (not parts.netloc or parts.path in ("", "/")):
        raise TaskInputError(field, f"{uri[:80]!r} needs a bucket and a key: s3://bucket/key")


def _check_labels(task: types_pb2.Task, path: str) -> None:
    if len(task.labels) > MAX_LABELS:
        raise TaskInputError(f"{path}.labels", f"{len(task.labels)} labels; the limit is {MAX_LABELS}")
    for key, value in task.labels.items():
        if not LABEL_KEY_RE.fullmatch(key):
            raise TaskInputError(
                f"{path}.labels",
                f"label key {key[:80]!r} is invalid (letters, digits, '.', '_', '/', '-'; 1-63 characters)",
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise TaskInputError(
                f"{path}.labels[{key}]", f"{len(value)} characters; the limit is {MAX_LABEL_VALUE_CHARS}"
            )


def _check_options(options: types_pb2.PipelineOptions, path: str) -> None:
    options.face_selector = options.face_selector or "largest"
    if options.face_selector not in FACE_SELECTORS:
        raise TaskInputError(
            f"{path}.face_selector", f"{options.face_selector[:40]!r}; use one of {', '.join(FACE_SELECTORS)}"
        )
    if options.face_selector == "reference":
        _check_uri(options.reference_face_uri, f"{path}.reference_face_uri", required=True)
    else:
        _check_uri(options.reference_face_uri, f"{path}.reference_face_uri", required=False)
    options.mask = options.mask or MASKS[0]
    if options.mask not in MASKS:
        raise TaskInputError(f"{path}.mask", f"{options.mask[:40]!r}; use one of {', '.join(MASKS)}")
    # 0 means "not set" in proto3; a blend of exactly 0 would leave the target unchanged anyway.
    if options.blend == 0:
        options.blend = 1.0
    if math.isnan(options.blend) or not 0.0 < options.blend <= 1.0:
        raise TaskInputError(f"{path}.blend", f"{options.blend}; must be a number in (0, 1]")
    if math.isnan(options.min_id_similarity) or not 0.0 <= options.min_id_similarity <= 1.0:
        raise TaskInputError(
            f"{path}.min_id_similarity", f"{options.min_id_similarity}; must be in [0, 1] (0: no quality gate)"
        )
    if options.execution_provider not in ("", *PROVIDERS):
        raise TaskInputError(
            f"{path}.execution_provider",
            f"{options.execution_provider[:40]!r}; use one of {', '.join(PROVIDERS)} or leave empty for the best",
        )
    if options.checkpoint_every_frames == 0:
        options.checkpoint_every_frames = DEFAULT_CHECKPOINT_EVERY
    if options.checkpoint_every_frames > MAX_CHECKPOINT_EVERY:
        raise TaskInputError(
            f"{path}.checkpoint_every_frames",
            f"{options.checkpoint_every_frames}; the limit is {MAX_CHECKPOINT_EVERY}",
        )
