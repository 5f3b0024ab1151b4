"""The domain vocabulary: one definition of each word that placement, the dispatcher, the agent,
the store and the audit share — trust zones, sensitivities, priorities, task states — and the
residency rule they all enforce (invariant 1: private data, or a locked project's, stays private).

Names are the lower-case words used in rule files, the store and audit records; the `*_proto`
helpers map them to and from the gRPC contract's enums.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal, get_args

from facefleet.v1 import types_pb2

# Trust zones: where a pool runs. Only the private zone may hold private or locked work.
TrustZone = Literal["private", "cloud"]
PRIVATE_ZONE: TrustZone = "private"
CLOUD_ZONE: TrustZone = "cloud"
TRUST_ZONES: tuple[TrustZone, ...] = get_args(TrustZone)

# Sensitivities, least to most protected. A task that does not say is treated as private: a
# missing field must never let data leave the private zone.
PUBLIC = "public"
INTERNAL = "internal"
PRIVATE = "private"
SENSITIVITIES = (PUBLIC, INTERNAL, PRIVATE)
DEFAULT_SENSITIVITY = PRIVATE

# Project names: tasks, locks and spend are keyed by them. Lowercase, so `Film-X` and `film-x`
# cannot be two projects (a lock on the first would never apply to tasks of the second).
PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
PROJECT_NAME_RULE = "lowercase letters, digits, '.', '_', '-'; 1-63 characters, starting with a letter or digit"


def is_project_name(name: str) -> bool:
    return PROJECT_NAME.fullmatch(name) is not None


# Priorities, lowest first (queue order and preemption compare their positions).
PRIORITIES = ("low", "normal", "high", "urgent")
DEFAULT_PRIORITY = "normal"

# Task states. queued → placed → dispatched → running → succeeded | failed | cancelled;
# preempted → queued (resume from checkpoint).
QUEUED = "queued"
PLACED = "placed"
DISPATCHED = "dispatched"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
PREEMPTED = "preempted"
TASK_STATES = (QUEUED, PLACED, DISPATCHED, RUNNING, SUCCEEDED, FAILED, CANCELLED, PREEMPTED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
IN_FLIGHT = frozenset({PLACED, DISPATCHED, RUNNING})
PENDING = frozenset({QUEUED, PLACED, PREEMPTED})  # not yet started on an agent
ON_AGENT = frozenset({DISPATCHED, RUNNING})  # an agent holds it

# A run its agent stopped at its hard run-time limit (RunTaskRequest.max_run_s): how the run's
# CANCELLED message begins, and the reason the scheduler re-queues the task with.
RUN_LIMIT_REACHED = "run-time limit reached"
RUN_LIMIT = "run_limit"


def must_stay_private(sensitivity: str, project_locked: bool) -> bool:
    """Invariant 1: private sensitivity or a compliance lock pins a task to the private zone."""
    return sensitivity == PRIVATE or project_locked


def residency_allows(trust_zone: str, sensitivity: str, project_locked: bool) -> bool:
    """May a task with this sensitivity and lock state run in `trust_zone`? The one check that the
    placement filter, the dispatcher's re-check, the agent's refusal and `audit proof` share."""
    return trust_zone == PRIVATE_ZONE or not must_stay_private(sensitivity, project_locked)


# --- the gRPC contract's enums -----------------------------------------------------------------


def _enum_names(enum: object, prefix: str) -> dict[int, str]:
    return {value: name.removeprefix(prefix).lower() for name, value in enum.items() if value}  # type: ignore[attr-defined]


_SENSITIVITY_BY_PROTO = _enum_names(types_pb2.Sensitivity, "SENSITIVITY_")
_PRIORITY_BY_PROTO = _enum_names(types_pb2.Priority, "PRIORITY_")
PRIORITY_BY_PROTO: Mapping[int, str] = MappingProxyType(_PRIORITY_BY_PROTO)
_STATE_BY_PROTO = _enum_names(types_pb2.TaskState, "TASK_STATE_")
_STATE_TO_PROTO = {name: value for value, name in _STATE_BY_PROTO.items()}
TERMINAL_PROTO = frozenset(_STATE_TO_PROTO[state] for state in TERMINAL)
PENDING_PROTO = frozenset(_STATE_TO_PROTO[state] for state in PENDING)
ON_AGENT_PROTO = frozenset(_STATE_TO_PROTO[state] for state in ON_AGENT)


def sensitivity_from_proto(value: int) -> str:
    """SENSITIVITY_PUBLIC -> 'public'; an unset or unknown value is the protective default."""
    return _SENSITIVITY_BY_PROTO.get(value, DEFAULT_SENSITIVITY)


def sensitivity_known(value: int) -> bool:
    return value in _SENSITIVITY_BY_PROTO


def priority_from_proto(value: int) -> str | None:
    """PRIORITY_URGENT -> 'urgent'; None for unset or unknown values."""
    return _PRIORITY_BY_PROTO.get(value)


def state_to_proto(state: str) -> int:
    """'running' -> TASK_STATE_RUNNING; KeyError for a word that is not a task state."""
    return _STATE_TO_PROTO[state]


def state_name(value: int) -> str:
    """TASK_STATE_RUNNING -> 'running' for display; 'unspecified' for anything else."""
    return _STATE_BY_PROTO.get(value, "unspecified")


def state_from_proto(value: int) -> str:
    """TASK_STATE_RUNNING -> 'running'; ValueError for UNSPECIFIED or unknown numbers."""
    try:
        return _STATE_BY_PROTO[value]
    except KeyError:
        raise ValueError(f"task state {value} is not one of {', '.join(TASK_STATES)}") from None
