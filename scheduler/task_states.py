"""The task state machine: which transitions are legal, which states are terminal.

queued → placed → dispatched → running → succeeded | failed | cancelled
preempted → queued (resume from checkpoint). In-flight states may also go straight back to
queued (agent lost, RESOURCE_EXHAUSTED, scheduler restart reconciliation).
"""

from __future__ import annotations

from facefleet.v1 import types_pb2

QUEUED = "queued"
PLACED = "placed"
DISPATCHED = "dispatched"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
PREEMPTED = "preempted"

ALL_STATES = (QUEUED, PLACED, DISPATCHED, RUNNING, SUCCEEDED, FAILED, CANCELLED, PREEMPTED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
IN_FLIGHT = frozenset({PLACED, DISPATCHED, RUNNING})

# to_state -> the states it may be entered from
ALLOWED_FROM: dict[str, frozenset[str]] = {
    QUEUED: frozenset({PLACED, DISPATCHED, RUNNING, PREEMPTED}),
    PLACED: frozenset({QUEUED}),
    DISPATCHED: frozenset({PLACED}),
    RUNNING: frozenset({DISPATCHED}),
    PREEMPTED: frozenset({DISPATCHED, RUNNING}),
    SUCCEEDED: frozenset({DISPATCHED, RUNNING}),
    FAILED: frozenset({QUEUED, PLACED, DISPATCHED, RUNNING, PREEMPTED}),
    CANCELLED: frozenset({QUEUED, PLACED, DISPATCHED, RUNNING, PREEMPTED}),
}


def is_legal(from_state: str, to_state: str) -> bool:
    return from_state in ALLOWED_FROM.get(to_state, frozenset())


def to_proto(state: str) -> int:
    """'running' -> TASK_STATE_RUNNING."""
    return types_pb2.TaskState.Value(f"TASK_STATE_{state.upper()}")


def from_proto(value: int) -> str:
    """TASK_STATE_RUNNING -> 'running'; raises ValueError for UNSPECIFIED or unknown numbers."""
    if value not in types_pb2.TaskState.values() or value == types_pb2.TASK_STATE_UNSPECIFIED:
        raise ValueError(f"task state {value} is not one of {', '.join(ALL_STATES)}")
    return types_pb2.TaskState.Name(value).removeprefix("TASK_STATE_").lower()  # type: ignore[arg-type]
