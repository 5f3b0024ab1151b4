"""The task state machine: which transitions are legal. The state words themselves, and which
are terminal or in flight, are defined once in `facefleet.domain`.

In-flight states may also go straight back to queued (agent lost, RESOURCE_EXHAUSTED, scheduler
restart reconciliation).
"""

from __future__ import annotations

from facefleet.domain import (
    CANCELLED,
    DISPATCHED,
    FAILED,
    PLACED,
    PREEMPTED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
)

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
