"""The agent's heartbeat: tells the scheduler who it is, what it can take and what it holds (the run
journal's inventory: runs going, outcomes not yet acknowledged), and obeys the reply (drain, cancels,
the leader's term to fence older leaders, outcomes acknowledged).

A daemon thread calls `Scheduler.Heartbeat` every `interval_s`. When the scheduler is unreachable it
backs off (tenacity, exponential with jitter, capped) and keeps trying; the thread only ends on `stop()`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

log = structlog.get_logger()


class HeartbeatSource(Protocol):
    """What the heartbeat needs from the agent runtime."""

    def heartbeat_request(self) -> scheduler_pb2.HeartbeatRequest: ...

    def set_draining(self, draining: bool) -> None: ...

    def cancel(self, task_id: str, reason: str) -> bool: ...

    def apply_leader(self, term: int, acknowledged: Sequence[types_pb2.RunRef]) -> None: ...


class HeartbeatLoop:
    def __init__(
        self,
        source: HeartbeatSource,
        channel_factory: Callable[[], grpc.Channel],
        interval_s: float,
        rpc_timeout_s: float = 5.0,
        max_backoff_s: float | None = None,
    ) -> None:
        self._source = source
        self._channel_factory = channel_factory
        self.interval_s = interval_s
        self._rpc_timeout_s = rpc_timeout_s
        # After a scheduler restart the new leader waits for this agent's inventory and declares it
        # lost after a few silent intervals: retries stay within two intervals, not 30 s.
        self._max_backoff_s = max_backoff_s if max_backoff_s is not None else 2 * interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-heartbeat", daemon=True)
        self._channel: grpc.Channel | None = None
        self.sent = 0
        self.failures = 0
        self.last_response: scheduler_pb2.HeartbeatResponse | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._channel is not None:
            self._channel.close()

    def beat_once(self) -> scheduler_pb2.HeartbeatResponse:
        """Send one heartbeat and apply the reply; raises grpc.RpcError when the scheduler is down."""
        if self._channel is None:
            self._channel = self._channel_factory()
        stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        request = self._source.heartbeat_request()
        response: scheduler_pb2.HeartbeatResponse = stub.Heartbeat(request, timeout=self._rpc_timeout_s)
        self.sent += 1
        self.last_response = response
        self.apply(response)
        return response

    def apply(self, response: scheduler_pb2.HeartbeatResponse) -> None:
        self._source.set_draining(response.drain)
        if response.leader_term or response.acknowledged:
            self._source.apply_leader(response.leader_term, response.acknowledged)
        for task_id in response.cancel_task_ids:
            if self._source.cancel(task_id, "cancelled by the scheduler (heartbeat reply)"):
                log.info("heartbeat_cancel", task_id=task_id)
        if response.heartbeat_interval_s > 0:
            self.interval_s = float(response.heartbeat_interval_s)

    def _log_retry(self, state: RetryCallState) -> None:
        self.failures += 1
        error = state.outcome.exception() if state.outcome else None
        detail = error.details() if isinstance(error, grpc.RpcError) and hasattr(error, "details") else error
        log.warning("heartbeat_failed", attempt=state.attempt_number, error=str(detail), retry=True)

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _run(self) -> None:
        while not self._stop.is_set():
            retrying = Retrying(
                retry=retry_if_exception_type(Exception),
                wait=wait_exponential_jitter(multiplier=min(0.5, self.interval_s), max=self._max_backoff_s),
                stop=lambda _state: self._stop.is_set(),
                sleep=self._sleep,
                before_sleep=self._log_retry,
                reraise=False,
            )
            with contextlib.suppress(Exception):  # RetryError when stopping mid-backoff: nothing to do
                retrying(self.beat_once)
            self._stop.wait(self.interval_s)


class DrainVotes:
    """Heartbeats to several scheduler replicas (each keeps its own live registry): the agent drains
    while any replica's last reply said so. `voter(i)` is the HeartbeatSource for loop number i."""

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

    def cancel(self, task_id: str, reason: str) -> bool:
        return self._votes.source.cancel(task_id, reason)

    def apply_leader(self, term: int, acknowledged: Sequence[types_pb2.RunRef]) -> None:
        self._votes.source.apply_leader(term, acknowledged)


def heartbeat_loops(
    source: HeartbeatSource, channel_factories: list[Callable[[], grpc.Channel]], interval_s: float
) -> list[HeartbeatLoop]:
    """One loop per scheduler replica; a single replica needs no vote."""
    if len(channel_factories) == 1:
        return [HeartbeatLoop(source, channel_factories[0], interval_s)]
    votes = DrainVotes(source, len(channel_factories))
    return [HeartbeatLoop(votes.voter(i), factory, interval_s) for i, factory in enumerate(channel_factories)]
