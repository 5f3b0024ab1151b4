"""The agent's connection to one scheduler replica: a long-lived `Scheduler.AgentSession`, which is
also its heartbeat (docs/agent.md, "Sessions").

The agent opens the session (cloud instances need no inbound port). Its first message is a heartbeat
with the run journal's inventory; then one every interval. Every `control` the scheduler sends, in
reply or on its own, is obeyed (`agent.heartbeat.obey`). Assignments go to the runtime (start, wait
for a slot, re-attach or replay its outcome); a refused one goes back as a RunRefusal. A run publishes
its updates straight into the session's `Outbox` (no thread follows a run); one sender drains it in
batches. A run's ending update or a refusal (each frees a slot the scheduler waits for) goes out at
once, with whatever else is pending; progress waits at most `LINGER_S` for company or `MAX_BATCH`
updates, a run's non-ending progress coalesced to the newest, ending updates never dropped. Under
load the batches grow by themselves: whatever is posted while a message is being sent goes next.

When a session breaks, runs go on. The client reconnects with capped exponential backoff (at most
2 x interval: a new leader waits about two intervals for inventories) and opens with a fresh
inventory, which carries every outcome the broken session may have lost. A scheduler that answers
UNIMPLEMENTED predates sessions: the client falls back to unary `Heartbeat` calls while that
scheduler dispatches with `Agent.RunTask` (the rolling-upgrade path); when a unary heartbeat fails it
tries a session again (the scheduler may come back upgraded).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from facefleet.agent.heartbeat import HeartbeatSource, obey, replica_sources
from facefleet.agent.run_journal import RUN_ENDED_STATES
from facefleet.v1 import agent_pb2, scheduler_pb2, scheduler_pb2_grpc, types_pb2

log = structlog.get_logger()

LINGER_S = 0.005  # a progress update waits at most this long for others to share its message
MAX_BATCH = 256  # updates and refusals in one message at most (about; a message is cut once it is full)
SESSION = "session"
UNARY = "unary"  # an older scheduler: Heartbeat calls, and it dispatches with Agent.RunTask


@dataclass
class _RunUpdates:
    progress: types_pb2.Progress | None = None  # the newest non-ending update not sent yet
    ending: types_pb2.Progress | None = None


class Outbox:
    """Run updates and refusals waiting to go out on one session; any thread posts, one sender takes."""

    def __init__(self, max_batch: int = MAX_BATCH, linger_s: float = LINGER_S) -> None:
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._changed = threading.Condition()
        self._runs: dict[tuple[str, int], _RunUpdates] = {}
        self._refusals: list[scheduler_pb2.RunRefusal] = []
        self._count = 0
        self._first_at = 0.0
        self._urgent = False  # an ending or a refusal is pending: no linger
        self.closed = False

    def update(self, task_id: str, attempt: int, progress: types_pb2.Progress) -> None:
        with self._changed:
            if self.closed:
                return
            pending = self._runs.setdefault((task_id, attempt), _RunUpdates())
            if pending.ending is not None:
                return  # nothing follows a run's end
            if progress.state in RUN_ENDED_STATES:
                pending.ending = progress
                self._urgent = True
            elif pending.progress is None:
                pending.progress = progress
            else:
                pending.progress = progress  # coalesced: only the newest counts
                return
            self._posted()

    def refuse(self, refusal: scheduler_pb2.RunRefusal) -> None:
        with self._changed:
            if not self.closed:
                self._refusals.append(refusal)
                self._urgent = True
                self._posted()

    def _posted(self) -> None:
        self._count += 1
        if self._count == 1:
            self._first_at = time.monotonic()
            self._changed.notify_all()
        elif self._count == self.max_batch or self._urgent:
            self._changed.notify_all()

    def take(self, deadline: float) -> scheduler_pb2.AgentMessage | None:
        """The next batch: at once when it holds an ending or a refusal, else once it is full or has
        lingered `linger_s`, or whatever is pending at `deadline` (monotonic; maybe nothing); None
        once closed."""
        with self._changed:
            while not self.closed:
                now = time.monotonic()
                if self._count and (
                    self._urgent or self._count >= self.max_batch or now >= self._first_at + self.linger_s
                ):
                    break
                if now >= deadline:
                    break
                wake_at = min(deadline, self._first_at + self.linger_s) if self._count else deadline
                self._changed.wait(wake_at - now)
            if self.closed:
                return None
            message = scheduler_pb2.AgentMessage(refusals=self._refusals)
            for (task_id, attempt), pending in self._runs.items():
                for progress in (pending.progress, pending.ending):
                    if progress is not None:
                        message.updates.add(task_id=task_id, attempt=attempt, progress=progress)
            self._runs.clear()
            self._refusals = []
            self._count = 0
            self._urgent = False
            return message

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()


class SchedulerSession:
    """This agent's connection to one scheduler replica: an AgentSession, or unary heartbeats to a
    scheduler without sessions. A daemon thread; it only ends on `stop()`."""

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
        self._thread = threading.Thread(target=self._run, name="agent-session", daemon=True)
        self._channel: grpc.Channel | None = None
        self._outbox: Outbox | None = None  # the open session's
        self._call: Any = None
        self._last_heard = 0.0
        self._opened = False  # the open session's scheduler has answered
        self.mode = SESSION
        self.sent = 0  # heartbeats that reached a scheduler (on an open session, or unary calls)
        self.failures = 0
        self.sessions = 0  # sessions opened (the scheduler answered)
        self.last_control: scheduler_pb2.HeartbeatResponse | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._end_session()
        self._thread.join(timeout)
        if self._channel is not None:
            self._channel.close()

    # --- what the scheduler says ---------------------------------------------------------------

    def _control(self, control: scheduler_pb2.HeartbeatResponse) -> None:
        self.last_control = control
        obey(self._source, control)
        if control.heartbeat_interval_s > 0:
            self.interval_s = float(control.heartbeat_interval_s)

    def _assign(self, request: agent_pb2.RunTaskRequest, outbox: Outbox) -> None:
        listener = partial(self._forward, request.task.id, request.attempt)
        refusal = self._source.assign(request, listener)
        if refusal is not None:
            outbox.refuse(refusal)

    def _forward(self, task_id: str, attempt: int, progress: types_pb2.Progress) -> None:
        """A run's update, to the session open now; between sessions the next inventory carries outcomes."""
        outbox = self._outbox
        if outbox is not None:
            outbox.update(task_id, attempt, progress)

    # --- the session ---------------------------------------------------------------------------

    def _stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        if self._channel is None:
            self._channel = self._channel_factory()
        return scheduler_pb2_grpc.SchedulerStub(self._channel)

    def _session(self) -> None:
        """One session until it breaks; raises when it did not open (UNIMPLEMENTED: switch to unary)."""
        outbox = Outbox()
        self._outbox = outbox  # before the inventory is read: no outcome falls between the two
        self._last_heard = time.monotonic()
        self._opened = False
        call = self._stub().AgentSession(self._messages(outbox))
        self._call = call
        if self._stop.is_set():  # stopped while this session was being opened
            self._end_session()
        opened_at = 0.0
        try:
            for message in call:
                self._last_heard = time.monotonic()
                if not opened_at:
                    opened_at = self._last_heard
                    self._opened = True
                    self.sessions += 1
                    self.sent += 1  # the opening heartbeat
                    log.info("session_opened", sessions=self.sessions)
                if message.HasField("control"):
                    self._control(message.control)
                for request in message.assignments:
                    self._assign(request, outbox)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED and not opened_at:
                log.info("scheduler_without_sessions", fallback="unary heartbeats; it dispatches with RunTask")
                self.mode = UNARY
                return
            if not opened_at or self._stop.is_set():
                raise
            log.warning("session_broken", code=error.code().name, detail=error.details())
        finally:
            self._end_session()
        if not opened_at or time.monotonic() - opened_at < self.interval_s:
            raise ConnectionError("the scheduler ended the session at once")  # back off before the next

    def _messages(self, outbox: Outbox) -> Iterator[scheduler_pb2.AgentMessage]:
        """The session's outgoing stream (gRPC's sender thread pulls it): heartbeats and batches."""
        yield self._heartbeat_message()
        next_beat = time.monotonic() + self.interval_s
        while True:
            message = outbox.take(next_beat)
            if message is None:
                return
            if time.monotonic() >= next_beat:
                if time.monotonic() - self._last_heard > max(3 * self.interval_s, self._rpc_timeout_s):
                    log.warning("session_silent", silent_s=round(time.monotonic() - self._last_heard, 1))
                    self._end_session()  # the scheduler stopped answering: reconnect
                    return
                message.heartbeat.CopyFrom(self._heartbeat_message().heartbeat)
                next_beat = time.monotonic() + self.interval_s
            if message.updates or message.refusals or message.HasField("heartbeat"):
                yield message

    def _heartbeat_message(self) -> scheduler_pb2.AgentMessage:
        self.sent += self._opened
        return scheduler_pb2.AgentMessage(heartbeat=self._source.heartbeat_request())

    def _end_session(self) -> None:
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.close()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    # --- unary heartbeats (schedulers without sessions) ----------------------------------------

    def beat_once(self) -> scheduler_pb2.HeartbeatResponse:
        """Send one unary heartbeat and obey the reply; raises grpc.RpcError when the scheduler is down."""
        request = self._source.heartbeat_request()
        response: scheduler_pb2.HeartbeatResponse = self._stub().Heartbeat(request, timeout=self._rpc_timeout_s)
        self.sent += 1
        self._control(response)
        return response

    # --- the thread ----------------------------------------------------------------------------

    def _connect_once(self) -> None:
        if self.mode == SESSION:
            self._session()
            return
        try:
            self.beat_once()
        except Exception:
            self.mode = SESSION  # the scheduler may come back upgraded: offer a session first
            raise
        self._stop.wait(self.interval_s)

    def _log_retry(self, state: RetryCallState) -> None:
        self.failures += 1
        error = state.outcome.exception() if state.outcome else None
        detail = error.details() if isinstance(error, grpc.RpcError) and hasattr(error, "details") else error
        log.warning("scheduler_unreachable", attempt=state.attempt_number, error=str(detail), retry=True)

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
                retrying(self._connect_once)


def scheduler_sessions(
    source: HeartbeatSource, channel_factories: list[Callable[[], grpc.Channel]], interval_s: float
) -> list[SchedulerSession]:
    """One connection per scheduler replica; with several, they vote on draining (DrainVotes)."""
    sources = replica_sources(source, len(channel_factories))
    pairs = zip(sources, channel_factories, strict=True)
    return [SchedulerSession(each, factory, interval_s) for each, factory in pairs]
