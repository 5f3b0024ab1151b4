"""Data residency beyond placement: storage allow-list for private work, URI redaction, lock actions.

Pure functions, no I/O: intake calls `check_storage`, everything that logs a URI calls `redact_uri`,
the dispatcher calls `lock_actions` whenever the set of locked projects changes.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from facefleet.domain import ON_AGENT_PROTO, TERMINAL_PROTO, residency_allows, sensitivity_from_proto
from facefleet.rpc_errors import TaskInputError
from facefleet.v1 import types_pb2

URI_FIELDS = ("source_uri", "target_uri", "output_uri", "options.reference_face_uri")


class ResidencyViolation(TaskInputError):
    """A private or locked task names storage outside the private zone's allow-list."""

    reason = types_pb2.RESIDENCY_VIOLATION


def redact_uri(uri: str) -> str:
    """Scheme + bucket/host + a short digest of the rest: `s3://bucket/…#sha256:1a2b3c4d`.

    Logs, metrics and audit records use this so they never carry a full private path
    (file names often name people). The digest lets an operator match two log lines.
    """
    if not uri:
        return ""
    parts = urlsplit(uri)
    if not parts.scheme:
        return f"…#sha256:{hashlib.sha256(uri.encode()).hexdigest()[:8]}"
    rest = uri[len(parts.scheme) + 3 + len(parts.netloc) :] if "://" in uri else uri[len(parts.scheme) + 1 :]
    digest = hashlib.sha256(rest.encode()).hexdigest()[:8]
    return f"{parts.scheme}://{parts.netloc}/…#sha256:{digest}"


def _normalised(uri: str) -> str | None:
    """Lower-case scheme, resolved path; None when the path tries to climb out (`..`)."""
    parts = urlsplit(uri)
    if not parts.scheme or "://" not in uri:
        return None
    if ".." in parts.path.split("/"):
        return None
    path = posixpath.normpath(parts.path) if parts.path else ""
    if path == ".":
        path = ""
    if parts.path.endswith("/") and not path.endswith("/"):
        path += "/"
    return f"{parts.scheme.lower()}://{parts.netloc}{path}"


def storage_allowed(uri: str, allowed_prefixes: Iterable[str]) -> bool:
    """Prefix match on a component boundary: `s3://vault` allows `s3://vault/x`, not `s3://vault-evil/x`."""
    normal = _normalised(uri)
    if normal is None:
        return False
    for prefix in allowed_prefixes:
        if not prefix:
            continue
        scheme, sep, rest = prefix.partition("://")
        prefix_normal = f"{scheme.lower()}{sep}{rest}"
        if normal == prefix_normal.rstrip("/") or (
            normal.startswith(prefix_normal) and (prefix_normal.endswith("/") or normal[len(prefix_normal)] == "/")
        ):
            return True
    return False


def _uri_fields(task: types_pb2.Task) -> list[tuple[str, str]]:
    return [
        ("source_uri", task.source_uri),
        ("target_uri", task.target_uri),
        ("output_uri", task.output_uri),
        ("options.reference_face_uri", task.options.reference_face_uri),
    ]


def check_storage(task: types_pb2.Task, locked: bool, allowed_prefixes: list[str]) -> None:
    """Raise ResidencyViolation (a TaskInputError) for the first URI of a private or locked task
    that is not on storage allowed for the private zone. Public tasks are not checked here."""
    if task.sensitivity != types_pb2.SENSITIVITY_PRIVATE and not locked:
        return
    why = "locked project" if locked and task.sensitivity != types_pb2.SENSITIVITY_PRIVATE else "private task"
    for field_name, uri in _uri_fields(task):
        if uri and not storage_allowed(uri, allowed_prefixes):
            raise ResidencyViolation(
                f"task.{field_name}",
                f"{why}: {redact_uri(uri)} is not on storage allowed for the private zone "
                f"(allowed prefixes: {', '.join(allowed_prefixes) or 'none'}); move the data to allowed "
                "storage, or have an operator extend [residency] private_storage_prefixes",
            )


class LockActionKind(StrEnum):
    REPLACE = "replace"  # queued/placed for a non-private pool: place again (private pools only)
    STOP_AND_RERUN_ONPREM = "stop_and_rerun_onprem"  # running on a non-private agent: cancel, re-queue


@dataclass(frozen=True)
class TaskLocation:
    """What lock_actions needs to know about one task."""

    task_id: str
    project: str
    state: int  # types_pb2.TaskState
    trust_zone: str = ""  # zone of the pool it is placed on / running in; "" when not placed
    pool: str = ""
    sensitivity: int = types_pb2.SENSITIVITY_UNSPECIFIED


@dataclass(frozen=True)
class LockAction:
    task_id: str
    project: str
    kind: LockActionKind
    pool: str
    reason: str


def lock_actions(locked_projects: Collection[str], tasks: Iterable[TaskLocation]) -> list[LockAction]:
    """What to do so no task of a locked project (or a private task) is left on a non-private pool.

    Queued/placed/preempted for a non-private pool → REPLACE; dispatched/running on a non-private
    agent → STOP_AND_RERUN_ONPREM (progress on cloud storage is discarded: the re-run starts on-prem
    from scratch, because a cloud checkpoint is itself data that must not be trusted or moved).
    Tasks not yet placed (no zone) need nothing: placement filters them. Terminal tasks are history.
    """
    actions = []
    for task in tasks:
        if task.state in TERMINAL_PROTO or not task.trust_zone:
            continue
        locked = task.project in locked_projects
        if residency_allows(task.trust_zone, sensitivity_from_proto(task.sensitivity), locked):
            continue
        why = "project locked" if locked else "private task"
        active = task.state in ON_AGENT_PROTO
        kind = LockActionKind.STOP_AND_RERUN_ONPREM if active else LockActionKind.REPLACE
        actions.append(
            LockAction(
                task_id=task.task_id,
                project=task.project,
                kind=kind,
                pool=task.pool,
                reason=f"{why}: was {types_pb2.TaskState.Name(task.state)} on {task.trust_zone} pool {task.pool}",  # type: ignore[arg-type]
            )
        )
    return actions
