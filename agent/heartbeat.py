"""What the agent's heartbeat says and how it obeys the scheduler's `control` (a HeartbeatResponse):
the heartbeat tells who the agent is, what it can take and what it holds (the run journal's
inventory: runs going or waiting, outcomes not yet acknowledged); the control says drain, cancel
these, raise these runs' run-time limits, this is the leader's term (fence older leaders), these
outcomes are recorded.

The transport (one AgentSession per scheduler replica, or unary Heartbeat calls to an older
scheduler) is `agent.session`. With several replicas, `DrainVotes` makes the agent drain while any
replica's last control said so (each replica keeps its own live registry).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from facefleet.v1 import agent_pb2, scheduler_pb2, types_pb2

log = structlog.get_logger()


class HeartbeatSource(Protocol):
    """What a scheduler connection needs from the agent runtime (agent.server.AgentRuntime)."""

    def heartbeat_request(self) -> scheduler_pb2.HeartbeatRequest: ...

    def set_draining(self, draining: bool) -> None: ...

    def cancel_runs(self, task_ids: Sequence[str], reason: str) -> list[str]: ...

    def apply_leader(self, term: int, acknowledged: Sequence[types_pb2.RunRef]) -> None: ...

    def raise_run_limit(self, task_id: str, attempt: int, max_run_s: float) -> bool: ...

    def assign(
        self, request: agent_pb2.RunTaskRequest, listener: Callable[[types_pb2.Progress], None]
    ) -> scheduler_pb2.RunRefusal | None: ...


def obey(source: HeartbeatSource, control: scheduler_pb2.HeartbeatResponse) -> None:
    """Apply one control from the scheduler (a session message or a unary heartbeat's reply)."""
    source.set_draining(control.drain)
    if control.leader_term or control.acknowledged:
        source.apply_leader(control.leader_term, control.acknowledged)
    if control.cancel_task_ids:
        stopped = source.cancel_runs(control.cancel_task_ids, "cancelled by the scheduler")
        if stopped:
            log.info("scheduler_cancel", task_ids=stopped)
    for limit in control.run_limits:  # the scheduler extended the run's reservation
        source.raise_run_limit(limit.task_id, limit.attempt, limit.max_run_s)


class DrainVotes:
    """Connections to several scheduler replicas: the agent drains while any replica's last control
    said so. `voter(i)` is the HeartbeatSource for connection number i."""

    def __init__(self, source: HeartbeatSource, replicas: int) -> None:
        self._source = source
        self._votes = [False] * replicas
        self._lock = threading.Lock()

    def voter(self, index: int) -> HeartbeatSource:
        return _DrainVoter(self, index)

    def vote(self, index: int, draining: bool) -> None:
        with self._lock:
            self._votes[index] = draining
            combined = any(self._votes)
        self._source.set_draining(combined)

    @property
    def source(self) -> HeartbeatSource:
        return self._source


class _DrainVoter:
    def __init__(self, votes: DrainVotes, index: int) -> None:
        self._votes = votes
        self._index = index

    def heartbeat_request(self) -> scheduler_pb2.HeartbeatRequest:
        return self._votes.source.heartbeat_request()

    def set_draining(self, draining: bool) -> None:
        self._votes.vote(self._index, draining)

    def cancel_runs(self, task_ids: Sequence[str], reason: str) -> list[str]:
        return self._votes.source.cancel_runs(task_ids, reason)

    def apply_leader(self, term: int, acknowledged: Sequence[types_pb2.RunRef]) -> None:
        self._votes.source.apply_leader(term, acknowledged)

    def raise_run_limit(self, task_id: str, attempt: int, max_run_s: float) -> bool:
        return self._votes.source.raise_run_limit(task_id, attempt, max_run_s)

    def assign(
        self, request: agent_pb2.RunTaskRequest, listener: Callable[[types_pb2.Progress], None]
    ) -> scheduler_pb2.RunRefusal | None:
        return self._votes.source.assign(request, listener)


def replica_sources(source: HeartbeatSource, replicas: int) -> list[HeartbeatSource]:
    """One source per scheduler replica; a single replica needs no vote."""
    if replicas == 1:
        return [source]
    votes = DrainVotes(source, replicas)
    return [votes.voter(i) for i in range(replicas)]
