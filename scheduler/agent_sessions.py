"""Agent sessions: one long-lived `Scheduler.AgentSession` stream per agent (docs/architecture.md).

The agent opens the session and sends its heartbeat (identity, slots, inventory) first, then one
every heartbeat interval, plus batched run updates and refusals; the scheduler answers each
heartbeat with a `control` (a HeartbeatResponse, built as the unary Heartbeat builds it) and sends
assignments and pushed controls (cancels) whenever it likes.

* `AgentSession`: one open session; `send()` queues a SchedulerMessage from any thread.
* `AgentSessions`: the open sessions by agent id, the gRPC handler's body (`serve`) and the *inbox*:
  one thread that hands everything agents send to the listener (the dispatcher) in arrival order,
  several messages at a time, so the listener writes their updates with one store transaction per
  batch instead of one thread hop and one commit per update. Heartbeats are registered on the same
  thread, so a heartbeat's inventory never overtakes the updates the agent sent before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, Protocol

import grpc
import structlog

from facefleet import loop_calls
from facefleet.grpc_server import Decoded, corrupt_request
from facefleet.rpc_errors import abort_async
from facefleet.v1 import scheduler_pb2, types_pb2

log = structlog.get_logger()

# The most agent messages the listener gets in one batch (their updates share a store transaction).
MAX_BATCH = 512

HeartbeatHandler = Callable[[scheduler_pb2.HeartbeatRequest], scheduler_pb2.HeartbeatResponse]


class AgentSession:
    """One agent's open session on this replica. `runs` belongs to the listener (the dispatcher's
    assignments on this session); read and change it under `lock`, and only while not `closed`."""

    def __init__(self, agent_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.agent_id = agent_id
        self.lock = threading.Lock()
        self.closed = False
        self.runs: dict[str, Any] = {}
        self._loop = loop
        self._outbound: asyncio.Queue[scheduler_pb2.SchedulerMessage | None] = asyncio.Queue()

    def send(self, message: scheduler_pb2.SchedulerMessage) -> bool:
        """Queue `message` for the agent (any thread); False once the session has ended."""
        if self.closed:
            return False
        try:
            loop_calls.call_soon(self._loop, self._outbound.put_nowait, message)
        except RuntimeError:  # the loop is closed: the server is gone
            return False
        return True

    def end(self) -> None:
        """Stop sending (any thread): the stream's writer ends, then the session closes."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to end
            self._loop.call_soon_threadsafe(self._outbound.put_nowait, None)


class SessionListener(Protocol):
    """What the sessions hand to the dispatcher; every call runs on the inbox thread (may block)."""

    def session_opened(self, session: AgentSession) -> None: ...
    def session_messages(self, batch: list[tuple[AgentSession, scheduler_pb2.AgentMessage]]) -> None: ...
    def session_closed(self, session: AgentSession) -> None: ...


class SessionRefused(Exception):
    """A session message the scheduler cannot take: the session ends with INVALID_ARGUMENT."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class AgentSessions:
    def __init__(self, listener: SessionListener | None = None) -> None:
        self.listener = listener
        self._sessions: dict[str, AgentSession] = {}
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name="agent-sessions", daemon=True)
        self._thread.start()

    # ---- the dispatcher's side -------------------------------------------------------------------

    def get(self, agent_id: str) -> AgentSession | None:
        with self._lock:
            return self._sessions.get(agent_id)

    def call(self, function: Callable[[], Any]) -> None:
        """Run `function` on the inbox thread, in order with what agents sent before."""
        self._inbox.put(("call", function, None))

    def close(self, timeout: float = 10.0) -> None:
        """End every session and stop the inbox once what it holds is handled."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.end()
        self._inbox.put(None)
        self._thread.join(timeout)

    # ---- the gRPC handler ----------------------------------------------------------------------

    async def serve(
        self, requests: AsyncIterator[Decoded], context: grpc.aio.ServicerContext, heartbeat: HeartbeatHandler
    ) -> AsyncIterator[scheduler_pb2.SchedulerMessage]:
        """The body of Scheduler.AgentSession: register the first heartbeat, answer it, then relay
        both ways until either side ends the stream."""
        first = await _next_message(requests, context)
        if first is None:
            return
        if not first.HasField("heartbeat"):
            await abort_async(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                types_pb2.INVALID_TASK,
                "the first AgentSession message must carry the agent's heartbeat (identity and inventory)",
                "heartbeat",
            )
        agent_id = first.heartbeat.agent_id
        loop = asyncio.get_running_loop()
        session = AgentSession(agent_id, loop)
        try:
            control = await self._heartbeat(heartbeat, first.heartbeat)
        except ValueError as error:
            await abort_async(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                types_pb2.INVALID_TASK,
                str(error),
                getattr(error, "field", ""),
            )
        self._open(session)
        reader = loop.create_task(self._read(session, requests, heartbeat, first))
        try:
            yield scheduler_pb2.SchedulerMessage(control=control)
            while True:
                message = await session._outbound.get()
                if message is None:
                    break
                yield message
        finally:
            reader.cancel()
            self._close(session)
        refused = reader.exception() if reader.done() and not reader.cancelled() else None
        if isinstance(refused, SessionRefused):
            await abort_async(
                context, grpc.StatusCode.INVALID_ARGUMENT, types_pb2.INVALID_TASK, str(refused), refused.field
            )

    async def _read(
        self,
        session: AgentSession,
        requests: AsyncIterator[Decoded],
        heartbeat: HeartbeatHandler,
        first: scheduler_pb2.AgentMessage,
    ) -> None:
        """Everything the agent sends after its first heartbeat; ends the session when it stops."""
        try:
            if first.updates or first.refusals:
                self._inbox.put(("message", session, first))
            async for decoded in requests:
                if decoded.error:
                    raise SessionRefused(corrupt_request(decoded, "AgentSession")[1], "request")
                message: scheduler_pb2.AgentMessage = decoded.message
                if message.updates or message.refusals:
                    self._inbox.put(("message", session, message))
                if message.HasField("heartbeat"):
                    if message.heartbeat.agent_id != session.agent_id:
                        raise SessionRefused(
                            f"this session belongs to agent {session.agent_id!r}; a heartbeat names "
                            f"{message.heartbeat.agent_id!r}: open one session per agent",
                            "heartbeat.agent_id",
                        )
                    try:
                        control = await self._heartbeat(heartbeat, message.heartbeat)
                    except ValueError as error:
                        raise SessionRefused(str(error), getattr(error, "field", "")) from error
                    session.send(scheduler_pb2.SchedulerMessage(control=control))
        except grpc.RpcError:
            pass  # the agent went away
        finally:
            session.end()

    async def _heartbeat(
        self, heartbeat: HeartbeatHandler, request: scheduler_pb2.HeartbeatRequest
    ) -> scheduler_pb2.HeartbeatResponse:
        """Register a heartbeat on the inbox thread (after the updates sent before it)."""
        future: Future[scheduler_pb2.HeartbeatResponse] = Future()
        self._inbox.put(("call", lambda: heartbeat(request), future))
        return await asyncio.wrap_future(future)

    def _open(self, session: AgentSession) -> None:
        with self._lock:
            previous = self._sessions.get(session.agent_id)
            self._sessions[session.agent_id] = session
        if previous is not None:  # the agent reconnected before this replica saw the old stream end
            self._mark_closed(previous)
            previous.end()
        log.info("agent session opened", agent_id=session.agent_id)
        self._inbox.put(("opened", session, None))

    def _close(self, session: AgentSession) -> None:
        with self._lock:
            if self._sessions.get(session.agent_id) is session:
                del self._sessions[session.agent_id]
        if self._mark_closed(session):
            log.info("agent session closed", agent_id=session.agent_id)

    def _mark_closed(self, session: AgentSession) -> bool:
        with session.lock:
            if session.closed:
                return False
            session.closed = True
        self._inbox.put(("closed", session, None))
        return True

    # ---- the inbox thread --------------------------------------------------------------------------

    def _drain(self) -> None:
        stopping = False
        while not stopping:
            items = [self._inbox.get()]
            while len(items) < MAX_BATCH:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            batch: list[tuple[AgentSession, scheduler_pb2.AgentMessage]] = []
            for item in items:
                if item is None:
                    stopping = True
                    continue
                kind, first, second = item
                if kind == "message":
                    batch.append((first, second))
                    continue
                self._deliver(batch)  # in order: what came before this item is handled first
                batch = []
                self._handle(kind, first, second)
            self._deliver(batch)

    def _deliver(self, batch: list[tuple[AgentSession, scheduler_pb2.AgentMessage]]) -> None:
        if batch and self.listener is not None:
            try:
                self.listener.session_messages(batch)
            except Exception:
                log.exception("handling agent session messages failed", messages=len(batch))

    def _handle(self, kind: str, first: Any, second: Any) -> None:
        try:
            if kind == "call":
                try:
                    result = first()
                except BaseException as error:
                    if second is None:
                        raise
                    second.set_exception(error)
                else:
                    if second is not None:
                        second.set_result(result)
            elif kind == "opened" and self.listener is not None:
                self.listener.session_opened(first)
            elif kind == "closed" and self.listener is not None:
                self.listener.session_closed(first)
        except Exception:
            log.exception("agent session work failed", kind=kind)


async def _next_message(
    requests: AsyncIterator[Decoded], context: grpc.aio.ServicerContext
) -> scheduler_pb2.AgentMessage | None:
    try:
        decoded = await requests.__anext__()
    except StopAsyncIteration:
        return None
    if decoded.error:
        await abort_async(context, grpc.StatusCode.INVALID_ARGUMENT, *corrupt_request(decoded, "AgentSession"))
    message: scheduler_pb2.AgentMessage = decoded.message
    return message
