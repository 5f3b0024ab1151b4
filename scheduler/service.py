"""The Scheduler gRPC service: intake, reads, watch, cancel, explain, heartbeat.

Any replica serves all of it (reads and submits go to the shared store); only the leader's
dispatcher acts on tasks. Bad input never crashes a handler: every refusal is a gRPC status with a
`facefleet-reason` (and `facefleet-field`) trailer and a message that says what to do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.unknown_fields import UnknownFieldSet

from facefleet.domain import CANCELLED, IN_FLIGHT, QUEUED, TERMINAL, state_from_proto, state_to_proto
from facefleet.grpc_server import AioServices, Decoded, corrupt_request, refuse_corrupt, tolerant_decoder
from facefleet.rpc_errors import TaskInputError, abort, abort_async
from facefleet.scheduler import metrics
from facefleet.scheduler.agent_sessions import AgentSessions
from facefleet.scheduler.group_commit import GroupCommitter, StoreUnavailable
from facefleet.scheduler.intake import validate_submit, validate_task
from facefleet.scheduler.placement_gateway import Placer
from facefleet.scheduler.spend_enforcement import MONEY_STOPS
from facefleet.scheduler.store import IllegalTransition, NewTask, SubmitResult, TaskRecord, TaskStore, UnknownTask
from facefleet.security.roles import current_identity
from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

log = structlog.get_logger()

MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
WATCH_POLL_S = 0.05
MAX_TASK_ID_CHARS = 64
MAX_SUBMIT_ITEMS = 1000  # per SubmitTasks call
MAX_STREAM_IN_FLIGHT = 1000  # requests of one SubmitStream waiting for their commit


class HeartbeatSink(Protocol):
    """scheduler.capacity.AgentRegistry."""

    def record_heartbeat(self, req: scheduler_pb2.HeartbeatRequest, now: float) -> scheduler_pb2.HeartbeatResponse: ...
    def request_cancel(self, agent_id: str, task_id: str) -> None: ...


CancelHook = Callable[[str, str | None, str], Any]  # (task id, agent id, reason)
# Policy checks on a valid task before it is stored (residency allow-list); raises TaskInputError.
# CPU only: it runs on the intake's event loop.
IntakeCheck = Callable[[types_pb2.Task], None]
# Told of every refused submit before the refusal is answered (actor, task as sent, why): the audit.
IntakeRefused = Callable[[str, types_pb2.Task, TaskInputError], None]


_CREATED, _DUPLICATE = metrics.SUBMITS.labels(result="created"), metrics.SUBMITS.labels(result="duplicate")


def _refusal(error: TaskInputError) -> tuple[int, str, str]:
    """(reason, message, field) of a refused submit."""
    return getattr(error, "reason", types_pb2.INVALID_TASK), str(error), error.field


def _submitted(result: SubmitResult) -> scheduler_pb2.SubmitTaskResponse:
    (_CREATED if result.created else _DUPLICATE).inc()
    return scheduler_pb2.SubmitTaskResponse(
        task_id=result.task_id,
        created=result.created,
        state=state_to_proto(result.state),  # type: ignore[arg-type]
    )


class _SubmitBatch:
    """A SubmitTasks call after validation: the clean items to store and the refused ones."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.accepted: list[NewTask] = []
        self.accepted_at: list[int] = []  # item index of each accepted task
        self.refused: list[tuple[int, TaskInputError, scheduler_pb2.SubmitTaskRequest]] = []

    def response(self, stored: list[SubmitResult | Exception]) -> scheduler_pb2.SubmitTasksResponse:
        results: list[Any] = [None] * self.size
        for index, error, _item in self.refused:
            results[index] = _refused_item(f"items[{index}]", error)
        for index, outcome in zip(self.accepted_at, stored, strict=True):
            results[index] = _stored_item(outcome)
        return scheduler_pb2.SubmitTasksResponse(results=results)


def _refused_item(where: str, error: TaskInputError) -> scheduler_pb2.SubmitTaskResult:
    """One refused item of SubmitTasks or SubmitStream (its field named as `where`.<path>)."""
    reason, _message, field = _refusal(error)
    path = f"{where}.{field}" if where else field
    refusal = types_pb2.Error(reason=reason, message=f"{path}: {error.message}", field=path)  # type: ignore[arg-type]
    return scheduler_pb2.SubmitTaskResult(error=refusal)


def _stored_item(outcome: SubmitResult | Exception) -> scheduler_pb2.SubmitTaskResult:
    """One valid item of SubmitTasks or SubmitStream: stored (durable), or why it was not."""
    if isinstance(outcome, Exception):
        message = f"{outcome}; this task was not accepted (submit it again)"
        return scheduler_pb2.SubmitTaskResult(error=types_pb2.Error(reason=types_pb2.INTERNAL, message=message))
    return scheduler_pb2.SubmitTaskResult(submitted=_submitted(outcome))


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def task_status(store: TaskStore, record: TaskRecord, with_history: bool = True) -> scheduler_pb2.TaskStatus:
    status = scheduler_pb2.TaskStatus(
        task=record.task(),
        state=state_to_proto(record.state),  # type: ignore[arg-type]
        pool=record.pool or "",
        rule=record.rule or "",
        agent_id=record.agent_id or "",
        attempts=record.attempts,
        submitted_at=timestamp(record.submitted_at),
    )
    decision = record.placement_decision()
    if decision is not None:
        status.placement.CopyFrom(decision)
    if with_history:
        latest = store.latest_progress(record.id)
        if latest is not None:
            status.last_progress.CopyFrom(latest.progress)
        for transition in store.transitions_of(record.id):
            status.transitions.add(
                from_state=state_to_proto(transition.from_state) if transition.from_state else 0,
                to_state=state_to_proto(transition.to_state),
                reason=transition.reason,
                at=timestamp(transition.at),
                pool=transition.pool,
                agent_id=transition.agent_id,
            )
    return status


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        store: TaskStore,
        committer: GroupCommitter,
        placer: Placer | None,
        heartbeats: HeartbeatSink | None,
        cancel_hook: CancelHook | None = None,
        clock: Callable[[], float] = time.time,
        intake_check: IntakeCheck | None = None,
        intake_refused: IntakeRefused | None = None,
        sessions: AgentSessions | None = None,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.committer = committer
        self.placer = placer
        self.heartbeats = heartbeats
        self.cancel_hook = cancel_hook
        self.intake_check = intake_check
        self.intake_refused = intake_refused
        self.clock = clock

    # ---- intake ----------------------------------------------------------------------------------

    def SubmitTask(
        self, request: scheduler_pb2.SubmitTaskRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.SubmitTaskResponse:
        return self.submit(request, context, wire_size=None)

    def submit(
        self, request: scheduler_pb2.SubmitTaskRequest, context: grpc.ServicerContext, wire_size: int | None
    ) -> scheduler_pb2.SubmitTaskResponse:
        clean = self._validated(request, wire_size)
        if isinstance(clean, TaskInputError):
            self._refused(clean, current_identity().subject, request)
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, *_refusal(clean))
        try:
            result = self.committer.submit(clean)
        except (StoreUnavailable, TimeoutError) as error:
            abort(context, grpc.StatusCode.UNAVAILABLE, types_pb2.INTERNAL, f"{error}; the task was not accepted")
        return _submitted(result)

    async def submit_async(
        self, request: scheduler_pb2.SubmitTaskRequest, context: grpc.aio.ServicerContext, wire_size: int | None
    ) -> scheduler_pb2.SubmitTaskResponse:
        """`submit` on a grpc.aio server's loop: validation runs inline (CPU only), the commit is
        awaited, and the one blocking step of a refusal (its audit record) runs on a thread."""
        clean = self._validated(request, wire_size)
        if isinstance(clean, TaskInputError):
            actor = current_identity().subject
            await asyncio.get_running_loop().run_in_executor(None, self._refused, clean, actor, request)
            await abort_async(context, grpc.StatusCode.INVALID_ARGUMENT, *_refusal(clean))
        try:
            result = await self.committer.submit_async(clean)
        except (StoreUnavailable, TimeoutError) as error:
            message = f"{error}; the task was not accepted"
            await abort_async(context, grpc.StatusCode.UNAVAILABLE, types_pb2.INTERNAL, message)
        return _submitted(result)

    async def submit_stream(
        self, requests: AsyncIterator[Decoded], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SubmitStreamResponse]:
        """Scheduler.SubmitStream: each request answered as SubmitTask would answer it, as soon as
        it is durable. At most MAX_STREAM_IN_FLIGHT requests of a stream wait for their commit; the
        stream reads on when one is answered (gRPC's flow control holds the client back meanwhile).
        Bytes that are no message end the stream with INVALID_ARGUMENT, after the answers to the
        requests before them."""
        answers: asyncio.Queue[scheduler_pb2.SubmitStreamResponse | None] = asyncio.Queue()
        room = asyncio.Semaphore(MAX_STREAM_IN_FLIGHT)
        actor = current_identity().subject

        async def answer(request: scheduler_pb2.SubmitStreamRequest, wire_size: int) -> None:
            try:
                if len(UnknownFieldSet(request)):
                    stubs = "unknown fields in SubmitStreamRequest; regenerate the client stubs"
                    result = _refused_item("", TaskInputError("request", stubs))
                else:
                    result = await self._stream_item(request.submit, wire_size, actor)
            except Exception:  # a fault of ours, not of the request: answered all the same, and logged
                log.exception("a SubmitStream request failed", seq=request.seq)
                message = "internal error; this task was not accepted (submit it again)"
                result = scheduler_pb2.SubmitTaskResult(
                    error=types_pb2.Error(reason=types_pb2.INTERNAL, message=message)
                )
            finally:
                room.release()
            answers.put_nowait(scheduler_pb2.SubmitStreamResponse(seq=request.seq, result=result))

        async def read() -> Decoded | None:
            """Start an answer per request; the first request that is no message, if any."""
            pending: set[asyncio.Task[None]] = set()
            try:
                async for decoded in requests:
                    if decoded.error:
                        return decoded
                    await room.acquire()
                    started = asyncio.ensure_future(answer(decoded.message, decoded.size))
                    pending.add(started)
                    started.add_done_callback(pending.discard)
                return None
            finally:
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            corrupt = await reader
        finally:
            reader.cancel()
        if corrupt is not None:
            await abort_async(context, grpc.StatusCode.INVALID_ARGUMENT, *corrupt_request(corrupt, "SubmitStream"))

    async def _stream_item(
        self, request: scheduler_pb2.SubmitTaskRequest, wire_size: int, actor: str
    ) -> scheduler_pb2.SubmitTaskResult:
        clean = self._validated(request, wire_size)
        if isinstance(clean, TaskInputError):
            await asyncio.get_running_loop().run_in_executor(None, self._refused, clean, actor, request)
            return _refused_item("submit", clean)
        try:
            return _stored_item(await self.committer.submit_async(clean))
        except (StoreUnavailable, TimeoutError) as error:
            return _stored_item(error)

    def SubmitTasks(
        self, request: scheduler_pb2.SubmitTasksRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.SubmitTasksResponse:
        batch = self._batch(request)
        if isinstance(batch, TaskInputError):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, *_refusal(batch))
        if batch.refused:
            self._refused_items(batch.refused, current_identity().subject)
        try:
            stored = self.committer.submit_many(batch.accepted)
        except StoreUnavailable as error:
            abort(context, grpc.StatusCode.UNAVAILABLE, types_pb2.INTERNAL, f"{error}; no task was accepted")
        return batch.response(stored)

    async def submit_many_async(
        self, request: scheduler_pb2.SubmitTasksRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitTasksResponse:
        """`SubmitTasks` on a grpc.aio server's loop, as `submit_async`."""
        batch = self._batch(request)
        if isinstance(batch, TaskInputError):
            await abort_async(context, grpc.StatusCode.INVALID_ARGUMENT, *_refusal(batch))
        if batch.refused:
            actor = current_identity().subject
            await asyncio.get_running_loop().run_in_executor(None, self._refused_items, batch.refused, actor)
        try:
            stored = await self.committer.submit_many_async(batch.accepted)
        except StoreUnavailable as error:
            await abort_async(
                context, grpc.StatusCode.UNAVAILABLE, types_pb2.INTERNAL, f"{error}; no task was accepted"
            )
        return batch.response(stored)

    def _batch(self, request: scheduler_pb2.SubmitTasksRequest) -> _SubmitBatch | TaskInputError:
        """Each item validated as SubmitTask validates it; the call itself refused only when it is
        too long or speaks another contract."""
        if len(request.items) > MAX_SUBMIT_ITEMS:
            return TaskInputError("items", f"{len(request.items)} items; the limit is {MAX_SUBMIT_ITEMS} per call")
        if len(UnknownFieldSet(request)):
            return TaskInputError("request", "unknown fields in SubmitTasksRequest; regenerate the client stubs")
        batch = _SubmitBatch(len(request.items))
        for index, item in enumerate(request.items):
            clean = self._validated(item, item.ByteSize())
            if isinstance(clean, TaskInputError):
                batch.refused.append((index, clean, item))
            else:
                batch.accepted_at.append(index)
                batch.accepted.append(clean)
        return batch

    def _refused_items(
        self, refused: list[tuple[int, TaskInputError, scheduler_pb2.SubmitTaskRequest]], actor: str
    ) -> None:
        for _index, error, item in refused:
            self._refused(error, actor, item)

    def _validated(self, request: scheduler_pb2.SubmitTaskRequest, wire_size: int | None) -> NewTask | TaskInputError:
        try:
            clean = validate_submit(request, wire_size)
            if self.intake_check is not None:
                self.intake_check(clean.task)
        except TaskInputError as error:
            metrics.SUBMITS.labels(result="invalid").inc()
            return error
        return clean

    def _refused(self, error: TaskInputError, actor: str, request: scheduler_pb2.SubmitTaskRequest) -> None:
        if self.intake_refused is not None:
            self.intake_refused(actor, request.task, error)

    # ---- reads -----------------------------------------------------------------------------------

    def _record(self, task_id: str, context: grpc.ServicerContext) -> TaskRecord:
        found = self._lookup(task_id)
        if not isinstance(found, TaskRecord):
            abort(context, *found)
        return found

    def _lookup(self, task_id: str) -> TaskRecord | tuple[grpc.StatusCode, int, str, str]:
        """The task, or how to refuse the call (code, reason, message, field)."""
        if not task_id or len(task_id) > MAX_TASK_ID_CHARS:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                types_pb2.INVALID_TASK,
                "task_id is empty or too long; pass the id SubmitTask returned",
                "task_id",
            )
        try:
            return self.store.get(task_id)
        except UnknownTask as error:
            return grpc.StatusCode.NOT_FOUND, types_pb2.UNKNOWN_TASK, str(error), "task_id"

    def GetTask(self, request: scheduler_pb2.GetTaskRequest, context: grpc.ServicerContext) -> scheduler_pb2.TaskStatus:
        return task_status(self.store, self._record(request.task_id, context))

    def ListTasks(
        self, request: scheduler_pb2.ListTasksRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.ListTasksResponse:
        state = ""
        if request.state:
            try:
                state = state_from_proto(request.state)
            except ValueError as error:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, types_pb2.INVALID_TASK, str(error), "state")
        if request.limit > MAX_LIST_LIMIT:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                types_pb2.INVALID_TASK,
                f"limit {request.limit} is above {MAX_LIST_LIMIT}; page with next_page_token",
                "limit",
            )
        try:
            records, token = self.store.list_tasks(
                project=request.project,
                state=state,
                pool=request.pool,
                limit=request.limit or DEFAULT_LIST_LIMIT,
                page_token=request.page_token,
            )
        except ValueError as error:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, types_pb2.INVALID_TASK, str(error), "page_token")
        statuses = [task_status(self.store, record, with_history=False) for record in records]
        latest = self.store.latest_progress_of([status.task.id for status in statuses])
        for status in statuses:  # progress and ID similarity for lists, without each task's history
            if status.task.id in latest:
                status.last_progress.CopyFrom(latest[status.task.id])
        return scheduler_pb2.ListTasksResponse(tasks=statuses, next_page_token=token)

    def WatchTask(
        self, request: scheduler_pb2.WatchTaskRequest, context: grpc.ServicerContext
    ) -> Iterator[scheduler_pb2.TaskEvent]:
        """Every transition (from the first) and each new progress, until the task is terminal."""
        watch = _Watch(self.store, self._record(request.task_id, context).id)
        while context.is_active():
            events, finished = watch.poll()
            yield from events
            if finished:
                return
            time.sleep(WATCH_POLL_S)

    async def watch_async(
        self, request: scheduler_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.TaskEvent]:
        """WatchTask on a grpc.aio server: store reads on a thread, no thread held between polls; a
        client that goes away cancels this coroutine."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, self._lookup, request.task_id)
        if not isinstance(found, TaskRecord):
            await abort_async(context, *found)
        watch = _Watch(self.store, found.id)
        while True:
            events, finished = await loop.run_in_executor(None, watch.poll)
            for event in events:
                yield event
            if finished:
                return
            await asyncio.sleep(WATCH_POLL_S)

    # ---- cancel ----------------------------------------------------------------------------------

    def CancelTask(
        self, request: scheduler_pb2.CancelTaskRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.CancelTaskResponse:
        record = self._record(request.task_id, context)
        reason = f"cancelled: {request.reason[:200]}" if request.reason else "cancelled by request"
        if record.state in TERMINAL:
            return scheduler_pb2.CancelTaskResponse(state=state_to_proto(record.state))  # type: ignore[arg-type]
        try:
            self.store.transition(record.id, CANCELLED, reason, self.clock())
        except IllegalTransition as error:  # pragma: no cover - every live state may be cancelled
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, types_pb2.INTERNAL, str(error))
        final = self.store.get(record.id)
        if final.state == CANCELLED and record.agent_id and record.state in IN_FLIGHT:
            if self.cancel_hook is not None:
                self.cancel_hook(record.id, record.agent_id, reason)
            elif self.heartbeats is not None:
                self.heartbeats.request_cancel(record.agent_id, record.id)
        return scheduler_pb2.CancelTaskResponse(state=state_to_proto(final.state))  # type: ignore[arg-type]

    # ---- explain ---------------------------------------------------------------------------------

    def Explain(
        self, request: scheduler_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> types_pb2.PlacementDecision:
        subject = request.WhichOneof("subject")
        if subject == "task_id":
            record = self._record(request.task_id, context)
            decision = record.placement_decision()
            if decision is None and record.state == QUEUED and self.placer is not None:
                # Still waiting and never evaluated (the dispatcher skips the queue while every slot
                # is taken): answer with what placement would decide now.
                return self.placer.decide(record.task(), self.clock()).proto
            if decision is None:
                abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    types_pb2.UNKNOWN_TASK,
                    f"task {record.id} has not been through placement yet (state {record.state}); "
                    "ask again once it is placed, or explain the task body for a dry run",
                    "task_id",
                )
            stops = [t.reason for t in self.store.transitions_of(record.id) if t.reason.startswith(MONEY_STOPS)]
            if stops:  # a run was stopped at its limit or at the cap (scheduler.spend_enforcement): say so
                decision.notes.append(stops[-1])
            return decision
        if subject == "task":
            if self.placer is None:
                abort(context, grpc.StatusCode.UNAVAILABLE, types_pb2.INTERNAL, "placement is not configured here")
            try:
                task = validate_task(request.task)
            except TaskInputError as error:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, types_pb2.INVALID_TASK, str(error), error.field)
            task.id = task.id or "dry-run"
            return self.placer.decide(task, self.clock()).proto
        abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            types_pb2.INVALID_TASK,
            "set either task_id (recorded decision) or task (dry run)",
            "subject",
        )

    # ---- heartbeat -------------------------------------------------------------------------------

    def Heartbeat(
        self, request: scheduler_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.HeartbeatResponse:
        if self.heartbeats is None:
            abort(context, grpc.StatusCode.UNAVAILABLE, types_pb2.INTERNAL, "this scheduler takes no heartbeats")
        try:
            return self.heartbeat_response(request)
        except ValueError as error:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                types_pb2.INVALID_TASK,
                str(error),
                getattr(error, "field", ""),
            )

    def heartbeat_response(self, request: scheduler_pb2.HeartbeatRequest) -> scheduler_pb2.HeartbeatResponse:
        """Register a heartbeat (unary Heartbeat, or an AgentSession's) and build the answer.
        Raises ValueError (HeartbeatRejected) for a heartbeat the registry cannot use."""
        assert self.heartbeats is not None
        response = self.heartbeats.record_heartbeat(request, self.clock())
        # Anything the agent still runs that the store says is finished (cancelled elsewhere, or
        # completed on another agent) should stop: the heartbeat is the fallback path for cancels.
        finished = self.store.terminal_among(list(request.running_task_ids))
        extra = [task_id for task_id in finished if task_id not in response.cancel_task_ids]
        response.cancel_task_ids.extend(extra)
        return response

    async def agent_session(
        self, requests: AsyncIterator[Decoded], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SchedulerMessage]:
        """Scheduler.AgentSession (scheduler.agent_sessions): heartbeats, assignments, updates."""
        if self.heartbeats is None or self.sessions is None:
            await abort_async(
                context, grpc.StatusCode.UNIMPLEMENTED, types_pb2.INTERNAL, "this scheduler opens no agent sessions"
            )
        async for message in self.sessions.serve(requests, context, self.heartbeat_response):
            yield message


class _Watch:
    """What a WatchTask stream has sent so far, and the next events to send."""

    def __init__(self, store: TaskStore, task_id: str) -> None:
        self.store = store
        self.task_id = task_id
        self.last_seq = 0
        self.progress_version = 0

    def poll(self) -> tuple[list[scheduler_pb2.TaskEvent], bool]:
        """New transitions and the latest progress since the last poll; True once terminal."""
        events = []
        finished = False
        for transition in self.store.transitions_of(self.task_id, after_seq=self.last_seq):
            self.last_seq = transition.seq
            events.append(
                scheduler_pb2.TaskEvent(
                    task_id=self.task_id,
                    state=state_to_proto(transition.to_state),  # type: ignore[arg-type]
                    reason=transition.reason,
                    at=timestamp(transition.at),
                    pool=transition.pool,
                )
            )
            finished = transition.to_state in TERMINAL
        latest = self.store.latest_progress(self.task_id)
        if latest is not None and latest.version != self.progress_version and not finished:
            self.progress_version = latest.version
            events.append(
                scheduler_pb2.TaskEvent(
                    task_id=self.task_id,
                    state=latest.progress.state or types_pb2.TASK_STATE_RUNNING,
                    reason=latest.progress.stage,
                    at=timestamp(latest.at),
                    progress=latest.progress,
                )
            )
        return events, finished


# ---- registration with tolerant decoding ---------------------------------------------------------


def add_scheduler_service(servicer: SchedulerServicer, server: grpc.Server | AioServices) -> None:
    """Like the generated add_SchedulerServicer_to_server, but corrupt request bytes get
    INVALID_ARGUMENT with a message (not gRPC's bare INTERNAL) and SubmitTask sees the wire size.

    On a grpc.aio server SubmitTask and WatchTask are coroutines on its loop; the other methods
    stay plain functions, which the server runs on its thread pool."""
    on_loop = isinstance(server, AioServices)
    methods = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].methods_by_name
    request_classes = {
        "SubmitTask": scheduler_pb2.SubmitTaskRequest,
        "SubmitTasks": scheduler_pb2.SubmitTasksRequest,
        "GetTask": scheduler_pb2.GetTaskRequest,
        "ListTasks": scheduler_pb2.ListTasksRequest,
        "WatchTask": scheduler_pb2.WatchTaskRequest,
        "CancelTask": scheduler_pb2.CancelTaskRequest,
        "Explain": scheduler_pb2.ExplainRequest,
        "Heartbeat": scheduler_pb2.HeartbeatRequest,
    }
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, request_class in request_classes.items():
        response_class: Any = {
            "SubmitTask": scheduler_pb2.SubmitTaskResponse,
            "SubmitTasks": scheduler_pb2.SubmitTasksResponse,
            "GetTask": scheduler_pb2.TaskStatus,
            "ListTasks": scheduler_pb2.ListTasksResponse,
            "WatchTask": scheduler_pb2.TaskEvent,
            "CancelTask": scheduler_pb2.CancelTaskResponse,
            "Explain": types_pb2.PlacementDecision,
            "Heartbeat": scheduler_pb2.HeartbeatResponse,
        }[name]
        assert methods[name].output_type.full_name == response_class.DESCRIPTOR.full_name
        decode = tolerant_decoder(request_class)
        if name == "WatchTask":
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _async_watch_handler(servicer) if on_loop else _stream_handler(servicer, name),
                request_deserializer=decode,
                response_serializer=response_class.SerializeToString,
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _async_handlers[name](servicer)
                if on_loop and name in _async_handlers
                else _unary_handler(servicer, name),
                request_deserializer=decode,
                response_serializer=response_class.SerializeToString,
            )
    if on_loop:  # coroutines on the loop; a sync server answers UNIMPLEMENTED (clients fall back)
        assert methods["AgentSession"].output_type.full_name == scheduler_pb2.SchedulerMessage.DESCRIPTOR.full_name
        handlers["AgentSession"] = grpc.stream_stream_rpc_method_handler(
            servicer.agent_session,
            request_deserializer=tolerant_decoder(scheduler_pb2.AgentMessage),
            response_serializer=scheduler_pb2.SchedulerMessage.SerializeToString,
        )
        assert methods["SubmitStream"].output_type.full_name == scheduler_pb2.SubmitStreamResponse.DESCRIPTOR.full_name
        handlers["SubmitStream"] = grpc.stream_stream_rpc_method_handler(
            servicer.submit_stream,
            request_deserializer=tolerant_decoder(scheduler_pb2.SubmitStreamRequest),
            response_serializer=scheduler_pb2.SubmitStreamResponse.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("facefleet.v1.Scheduler", handlers),))
    server.add_registered_method_handlers("facefleet.v1.Scheduler", handlers)  # type: ignore[union-attr]


def _unary_handler(servicer: SchedulerServicer, name: str) -> Callable[[Decoded, grpc.ServicerContext], Any]:
    def handle(decoded: Decoded, context: grpc.ServicerContext) -> Any:
        refuse_corrupt(decoded, name, context)
        if name == "SubmitTask":
            return servicer.submit(decoded.message, context, wire_size=decoded.size)
        return getattr(servicer, name)(decoded.message, context)

    return handle


def _stream_handler(servicer: SchedulerServicer, name: str) -> Callable[[Decoded, grpc.ServicerContext], Iterator[Any]]:
    def handle(decoded: Decoded, context: grpc.ServicerContext) -> Iterator[Any]:
        refuse_corrupt(decoded, name, context)
        yield from getattr(servicer, name)(decoded.message, context)

    return handle


def _async_submit_handler(servicer: SchedulerServicer) -> Callable[..., Any]:
    async def handle(decoded: Decoded, context: grpc.aio.ServicerContext) -> Any:
        if decoded.error:
            await abort_async(context, grpc.StatusCode.INVALID_ARGUMENT, *corrupt_request(decoded, "SubmitTask"))
        return await servicer.submit_async(decoded.message, context, wire_size=decoded.size)

    return handle


def _async_submit_many_handler(servicer: SchedulerServicer) -> Callable[..., Any]:
    async def handle(decoded: Decoded, context: grpc.aio.ServicerContext) -> Any:
        if decoded.error:
            await abort_async(context, grpc.StatusCode.INVALID_ARGUMENT, *corrupt_request(decoded, "SubmitTasks"))
        return await servicer.submit_many_async(decoded.message, context)

    return handle


_async_handlers = {"SubmitTask": _async_submit_handler, "SubmitTasks": _async_submit_many_handler}


def _async_watch_handler(servicer: SchedulerServicer) -> Callable[..., AsyncIterator[Any]]:
    async def handle(decoded: Decoded, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if decoded.error:
            await abort_async(context, grpc.StatusCode.INVALID_ARGUMENT, *corrupt_request(decoded, "WatchTask"))
        async for event in servicer.watch_async(decoded.message, context):
            yield event

    return handle
