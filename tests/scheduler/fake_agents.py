"""In-test agents that speak the real agent contract to a real scheduler.

`HollowAgent` completes tasks instantly (kubemark-style hollow node) or slowly, frame by frame
with checkpoints. By default it opens one `Scheduler.AgentSession` per scheduler address (the
session is its heartbeat; assignments come in, batched updates and refusals go out) on an event
loop shared by every hollow agent of the process, so a hundred of them cost a few threads, not
hundreds. `session=False` keeps the older protocol: unary heartbeats and an Agent gRPC server
whose RunTask streams each task (what an agent of the previous release does).

It is idempotent on the task id as the contract demands: a repeat assignment while running
re-attaches; after completion it replays the final progress, except that a later attempt of a run
that ended without success runs again, as the real agent does. Like a real agent's run journal (in
memory here) it reports its runs and unacknowledged outcomes in each heartbeat and refuses a
dispatch from a leader term older than the newest it has seen. On a session it accepts up to
`max_waiting` assignments beyond its free slots into a FIFO (the pool's prefetch), starts them as
slots free and drops a waiting one that is cancelled before it starts. `executions` counts how many
times each task actually ran here and `most_held` the most runs it ever held at once (running and
waiting), so tests can assert "never ran twice" and "never over-dispatched".
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from facefleet.agent.run_journal import RUN_ENDED_STATES
from facefleet.grpc_server import SERVICE_NAMES, LoopThread, ServerHandle, build_server
from facefleet.rpc_errors import FIELD_KEY
from facefleet.v1 import agent_pb2, agent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2

UPDATE_LINGER_S = 0.005  # progress waits this long for company; endings and refusals go at once (as agent.session)


@dataclass
class Run:
    task: types_pb2.Task
    resume_from: int
    attempt: int = 0
    leader_term: int = 0
    acknowledged: bool = False
    history: list[types_pb2.Progress] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)
    started: bool = False
    session: _Session | None = None  # where its updates go (the session that assigned it)
    wake: asyncio.Event | None = None  # set on cancel (a session run's frames wait on it)


_shared_loop: LoopThread | None = None
_shared_loop_lock = threading.Lock()


def hollow_loop() -> LoopThread:
    """The event loop every session-speaking hollow agent of this process runs on."""
    global _shared_loop
    with _shared_loop_lock:
        if _shared_loop is None or not _shared_loop.thread.is_alive():
            _shared_loop = LoopThread("hollow-agents")
        return _shared_loop


class _Session:
    """One open AgentSession (on the hollow loop): updates and refusals waiting to be sent."""

    def __init__(self) -> None:
        self.updates: list[scheduler_pb2.RunUpdate] = []
        self.refusals: list[scheduler_pb2.RunRefusal] = []
        self.wake = asyncio.Event()
        self.urgent = False  # an ending or a refusal is pending
        self.open = True

    def update(self, run: Run, progress: types_pb2.Progress) -> None:
        if self.open:
            self.updates.append(scheduler_pb2.RunUpdate(task_id=run.task.id, attempt=run.attempt, progress=progress))
            self.urgent = self.urgent or progress.state in RUN_ENDED_STATES
            self.wake.set()

    def refuse(
        self, request: agent_pb2.RunTaskRequest, reason: int, message: str, retry: bool, field: str = ""
    ) -> None:
        if self.open:
            error = types_pb2.Error(reason=reason, message=message, field=field)  # type: ignore[arg-type]
            refusal = scheduler_pb2.RunRefusal(
                task_id=request.task.id, attempt=request.attempt, error=error, retry=retry
            )
            self.refusals.append(refusal)
            self.urgent = True
            self.wake.set()


class HollowAgent(agent_pb2_grpc.AgentServicer):
    def __init__(
        self,
        scheduler_address: str,
        agent_id: str,
        pool: str,
        trust_zone: str,
        slots: int = 4,
        frame_s: float = 0.0,
        checkpoint_every: int = 5,
        heartbeat_s: float = 0.2,
        refuse_residency: bool = True,
        session: bool = True,
        max_waiting: int = 64,
        checkpoint_root: str = "file:///ckpt/",
    ) -> None:
        self.scheduler_address = scheduler_address
        self.agent_id = agent_id
        self.pool = pool
        self.trust_zone = trust_zone
        self.slots = slots
        self.frame_s = frame_s
        self.checkpoint_every = checkpoint_every
        self.heartbeat_s = heartbeat_s
        self.refuse_residency = refuse_residency
        self.session = session
        self.max_waiting = max_waiting
        # Where its runs write checkpoints; as a real agent, it refuses to resume from one elsewhere.
        self.checkpoint_root = checkpoint_root
        self.runs: dict[str, Run] = {}
        # Task ids of the runs not done (`busy`): counted as it changes, as a real agent's journal
        # keeps them apart, not by a scan of every run this agent ever held on each assignment.
        self._held: set[str] = set()
        self.executions: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.cancel_requests: list[str] = []
        self.run_limits: dict[tuple[str, int], float] = {}  # raised limits received: (task, attempt) -> s
        self.resumed_from: dict[str, int] = {}
        self.most_held = 0  # the most runs held at once (running + waiting for a slot)
        self.leader_term = 0
        self._waiting: deque[Run] = deque()
        self._active = 0  # runs started and not finished
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ServerHandle | None = None
        self._heartbeat: threading.Thread | None = None
        self._loop: LoopThread | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> HollowAgent:
        if self.session:
            self._loop = hollow_loop()
            self._loop.call_soon(self._start_sessions)
            return self
        self._server = build_server(
            "127.0.0.1:0",
            [(SERVICE_NAMES["Agent"], lambda server: agent_pb2_grpc.add_AgentServicer_to_server(self, server))],
            None,
            max_workers=max(8, self.slots * 2 + 4),
        )
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True)
        self._heartbeat.start()
        return self

    @property
    def address(self) -> str:
        if self._server is None:
            return f"hollow-session:{self.agent_id}"  # never dialled: work comes over the session
        return f"127.0.0.1:{self._server.port}"

    def kill(self) -> None:
        """Stop abruptly: no more heartbeats, streams broken (as a crashed process would)."""
        self._stop.set()
        if self._server is not None:
            self._server.server.stop(grace=None)
        if self._loop is not None:
            for task in self._tasks:
                self._loop.call_soon(task.cancel)

    stop = kill

    def busy(self) -> list[str]:
        with self._lock:
            return self.busy_unlocked()

    def busy_unlocked(self) -> list[str]:
        return list(self._held)

    # ---- heartbeats ----------------------------------------------------------------------------

    def inventory(self) -> list[types_pb2.RunReport]:
        reports = []
        with self._lock:
            for task_id, run in self.runs.items():
                if run.acknowledged:
                    continue
                report = types_pb2.RunReport(
                    task_id=task_id, attempt=run.attempt, leader_term=run.leader_term, finished=run.done.is_set()
                )
                if run.done.is_set():
                    report.outcome.CopyFrom(run.history[-1])
                reports.append(report)
        return reports

    def heartbeat_request(self) -> scheduler_pb2.HeartbeatRequest:
        running = self.busy()
        busy_slots = self._active if self.session else len(running)
        return scheduler_pb2.HeartbeatRequest(
            runs=self.inventory(),
            known_leader_term=self.leader_term,
            agent_id=self.agent_id,
            address=self.address,
            pool=self.pool,
            trust_zone=self.trust_zone,
            provider="onprem" if self.trust_zone == "private" else "aws",
            region="local",
            total_slots=self.slots,
            free_slots=max(0, self.slots - busy_slots),
            healthy=True,
            running_task_ids=running,
            sec_per_frame=max(self.frame_s, 0.001),
        )

    def _apply_control(self, reply: scheduler_pb2.HeartbeatResponse) -> None:
        for task_id in reply.cancel_task_ids:
            if self._cancel(task_id):
                self.cancel_requests.append(task_id)
        with self._lock:
            self.leader_term = max(self.leader_term, reply.leader_term)
            for limit in reply.run_limits:
                key = (limit.task_id, limit.attempt)
                self.run_limits[key] = max(self.run_limits.get(key, 0.0), limit.max_run_s)
            for ref in reply.acknowledged:
                run = self.runs.get(ref.task_id)
                if run is not None and run.attempt == ref.attempt and run.done.is_set():
                    run.acknowledged = True

    def _heartbeat_loop(self) -> None:
        # Several addresses (comma-separated) = every scheduler replica hears the heartbeat.
        channels = [grpc.insecure_channel(address) for address in self.scheduler_address.split(",")]
        stubs = [scheduler_pb2_grpc.SchedulerStub(channel) for channel in channels]
        while not self._stop.is_set():
            for stub in stubs:
                with contextlib.suppress(grpc.RpcError):  # scheduler down or restarting: keep trying
                    self._apply_control(stub.Heartbeat(self.heartbeat_request(), timeout=2))
            self._stop.wait(self.heartbeat_s)
        for channel in channels:
            channel.close()

    # ---- AgentSession (on the hollow loop) -------------------------------------------------------

    def _start_sessions(self) -> None:
        assert self._loop is not None
        for address in self.scheduler_address.split(","):  # one session per scheduler replica
            self._tasks.append(self._loop.loop.create_task(self._keep_session(address)))

    async def _keep_session(self, address: str) -> None:
        while not self._stop.is_set():
            async with grpc.aio.insecure_channel(address) as channel:
                session = _Session()
                try:
                    await self._run_session(scheduler_pb2_grpc.SchedulerStub(channel), session)
                except grpc.RpcError:
                    pass  # scheduler down or restarting: reconnect
                finally:
                    session.open = False
            await asyncio.sleep(min(self.heartbeat_s, 0.5))

    async def _run_session(self, stub: scheduler_pb2_grpc.SchedulerStub, session: _Session) -> None:
        call = stub.AgentSession()
        await call.write(scheduler_pb2.AgentMessage(heartbeat=self.heartbeat_request()))
        sender = asyncio.get_running_loop().create_task(self._send(call, session))
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                if message.HasField("control"):
                    self._apply_control(message.control)
                for request in message.assignments:
                    self._assigned(request, session)
        finally:
            sender.cancel()

    async def _send(self, call: grpc.aio.StreamStreamCall, session: _Session) -> None:
        """Batched updates and refusals (progress at most UPDATE_LINGER_S late, endings and refusals at
        once), and a heartbeat each interval."""
        loop = asyncio.get_running_loop()
        next_heartbeat = loop.time() + self.heartbeat_s
        while True:
            try:
                await asyncio.wait_for(session.wake.wait(), max(0.0, next_heartbeat - loop.time()))
                if not session.urgent:
                    await asyncio.sleep(UPDATE_LINGER_S)
            except TimeoutError:
                pass
            session.wake.clear()
            session.urgent = False
            message = scheduler_pb2.AgentMessage(updates=session.updates, refusals=session.refusals)
            session.updates, session.refusals = [], []
            if loop.time() >= next_heartbeat:
                message.heartbeat.CopyFrom(self.heartbeat_request())
                next_heartbeat = loop.time() + self.heartbeat_s
            if message.updates or message.refusals or message.HasField("heartbeat"):
                await call.write(message)

    def on_start(self, task: types_pb2.Task) -> None:
        """Called as a run starts here (benchmarks time starts and read inputs here)."""

    def _assigned(self, request: agent_pb2.RunTaskRequest, session: _Session) -> None:
        """One assignment, as RunTask handles its request: start, queue, re-attach or refuse."""
        refusal = self._refusal(request)
        if refusal is not None:
            session.refuse(request, *refusal)
            return
        task = request.task
        with self._lock:
            run = self._journaled(request)
            if run is not None:  # re-attach: updates go to this session now; a finished run replays
                run.session = session
                if run.history:
                    session.update(run, run.history[-1])
                elif run.started:
                    session.update(run, types_pb2.Progress(task_id=task.id, state=types_pb2.TASK_STATE_RUNNING))
                return
            if self._active >= self.slots and len(self._waiting) >= self.max_waiting:
                session.refuse(request, types_pb2.NO_CAPACITY, f"agent {self.agent_id} has no free slot", True)
                return
            run = self._new_run(request)
            run.session = session
            self._waiting.append(run)
            self.most_held = max(self.most_held, len(self.busy_unlocked()))
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Start waiting runs while slots are free (an instant run frees its slot at once)."""
        assert self._loop is not None
        while True:
            with self._lock:
                if not self._waiting or self._active >= self.slots:
                    return
                run = self._waiting.popleft()
                run.started = True
                self._active += 1
                self.executions[run.task.id] += 1
                self.resumed_from[run.task.id] = run.resume_from
            self.on_start(run.task)
            if run.session is not None:
                run.session.update(run, types_pb2.Progress(task_id=run.task.id, state=types_pb2.TASK_STATE_RUNNING))
            if self.frame_s > 0:
                self._tasks.append(self._loop.loop.create_task(self._execute_async(run)))
                continue
            self._publish(run, self._final_progress(run, run.resume_from))
            with self._lock:
                self._active -= 1

    async def _execute_async(self, run: Run) -> None:
        total, frame = max(1, run.task.frames), run.resume_from
        run.wake = asyncio.Event()
        while frame < total and not run.cancelled.is_set() and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):  # a frame's time, or a cancel
                await asyncio.wait_for(run.wake.wait(), self.frame_s)
            if run.cancelled.is_set():
                break
            frame += 1
            self._publish(run, self._frame_progress(run, frame, total))
        if not self._stop.is_set():  # else "crashed": never finishes here
            self._finish(run, frame)

    def _finish(self, run: Run, frame: int) -> None:
        self._publish(run, self._final_progress(run, frame))
        with self._lock:
            self._active -= 1
        self._start_waiting()

    # ---- RunTask (agents without a session) ------------------------------------------------------

    def RunTask(self, request: agent_pb2.RunTaskRequest, context: grpc.ServicerContext) -> Iterator[types_pb2.Progress]:
        refusal = self._refusal(request)
        if refusal is not None:
            code = {
                types_pb2.RESIDENCY_VIOLATION: grpc.StatusCode.FAILED_PRECONDITION,
                types_pb2.STALE_LEADER_TERM: grpc.StatusCode.ABORTED,
                types_pb2.INPUT_REJECTED: grpc.StatusCode.INVALID_ARGUMENT,
            }.get(refusal[0], grpc.StatusCode.RESOURCE_EXHAUSTED)
            if refusal[3]:
                context.set_trailing_metadata(((FIELD_KEY, refusal[3]),))
            context.abort(code, refusal[1])
        with self._lock:
            run = self._journaled(request)
            if run is None:
                if len(self.busy_unlocked()) >= self.slots:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"agent {self.agent_id} has no free slot")
                run = self._new_run(request)
                run.started = True
                self.executions[run.task.id] += 1
                self.resumed_from[run.task.id] = request.resume_from_frame
                self.most_held = max(self.most_held, len(self.busy_unlocked()))
                self.on_start(run.task)
                threading.Thread(target=self._execute, args=(run,), daemon=True).start()
        yield from self._follow(run, context)

    def CancelTask(
        self, request: agent_pb2.AgentCancelRequest, context: grpc.ServicerContext
    ) -> agent_pb2.AgentCancelResponse:
        self.cancel_requests.append(request.task_id)
        return agent_pb2.AgentCancelResponse(was_running=self._cancel(request.task_id))

    def Describe(self, request: agent_pb2.DescribeRequest, context: grpc.ServicerContext) -> agent_pb2.AgentDescription:
        return agent_pb2.AgentDescription(agent_id=self.agent_id, pool=self.pool, trust_zone=self.trust_zone)

    # ---- the run journal (in memory) -------------------------------------------------------------

    def _refusal(self, request: agent_pb2.RunTaskRequest) -> tuple[int, str, bool, str] | None:
        """(reason, message, retry, field) when this agent refuses the request before looking it up."""
        task = request.task
        private = task.sensitivity == types_pb2.SENSITIVITY_PRIVATE or request.project_locked
        if self.refuse_residency and private and self.trust_zone != "private":
            return types_pb2.RESIDENCY_VIOLATION, "RESIDENCY_VIOLATION: private task on a cloud agent", False, ""
        if request.checkpoint_uri and not request.checkpoint_uri.startswith(self.checkpoint_root):
            unreadable = f"checkpoint_uri {request.checkpoint_uri!r} is not under {self.checkpoint_root}"
            return types_pb2.INPUT_REJECTED, unreadable, False, "checkpoint_uri"
        with self._lock:
            known = task.id in self.runs
            if not known and request.leader_term < self.leader_term:
                return types_pb2.STALE_LEADER_TERM, f"stale leader term {request.leader_term}", True, ""
        return None

    def _journaled(self, request: agent_pb2.RunTaskRequest) -> Run | None:
        """The journaled run a request re-attaches to (None: run it). Call with the lock held."""
        run = self.runs.get(request.task.id)
        if run is not None and run.done.is_set() and request.attempt > run.attempt:
            final = run.history[-1].state if run.history else types_pb2.TASK_STATE_UNSPECIFIED
            if final != types_pb2.TASK_STATE_SUCCEEDED:
                return None  # cancelled or preempted before: this attempt runs again
        return run

    def _new_run(self, request: agent_pb2.RunTaskRequest) -> Run:
        """Journal a new run (call with the lock held)."""
        self.leader_term = max(self.leader_term, request.leader_term)
        run = Run(
            task=request.task,
            resume_from=request.resume_from_frame,
            attempt=request.attempt,
            leader_term=request.leader_term,
        )
        self.runs[request.task.id] = run
        self._held.add(request.task.id)
        return run

    def _cancel(self, task_id: str) -> bool:
        with self._lock:
            run = self.runs.get(task_id)
            if run is None or run.done.is_set():
                return False
            run.cancelled.set()
            if run.wake is not None and self._loop is not None:
                self._loop.call_soon(run.wake.set)
            waiting = run in self._waiting
            if waiting:  # recalled before it started: it never runs
                self._waiting.remove(run)
        if waiting:
            self._publish(run, self._final_progress(run, run.resume_from))
        return True

    def _publish(self, run: Run, progress: types_pb2.Progress) -> None:
        with run.changed:
            run.history.append(progress)
            if progress.state != types_pb2.TASK_STATE_RUNNING:
                run.done.set()
                self._held.discard(run.task.id)
            run.changed.notify_all()
        if run.session is not None:
            run.session.update(run, progress)

    def _frame_progress(self, run: Run, frame: int, total: int) -> types_pb2.Progress:
        checkpoint = frame - frame % self.checkpoint_every
        return types_pb2.Progress(
            task_id=run.task.id,
            frames_done=frame,
            frames_total=total,
            stage="swap",
            checkpoint_frame=checkpoint,
            checkpoint_uri=f"{self.checkpoint_root}{run.task.id}" if checkpoint else "",
            state=types_pb2.TASK_STATE_RUNNING,
        )

    def _final_progress(self, run: Run, frame: int) -> types_pb2.Progress:
        task = run.task
        total = max(1, task.frames)
        state = types_pb2.TASK_STATE_CANCELLED if run.cancelled.is_set() else types_pb2.TASK_STATE_SUCCEEDED
        if state == types_pb2.TASK_STATE_SUCCEEDED:
            with self._lock:
                self.completed[task.id] += 1
        return types_pb2.Progress(
            task_id=task.id,
            frames_done=total if state == types_pb2.TASK_STATE_SUCCEEDED else frame,
            frames_total=total,
            stage="done",
            state=state,
            output_uri=task.output_uri,
        )

    def _execute(self, run: Run) -> None:
        total = max(1, run.task.frames)
        frame = run.resume_from
        if self.frame_s > 0:
            while frame < total:
                if run.cancelled.wait(self.frame_s) or self._stop.is_set():
                    break
                frame += 1
                self._publish(run, self._frame_progress(run, frame, total))
        if self._stop.is_set():
            return  # "crashed": never finishes here
        self._publish(run, self._final_progress(run, frame))

    def _follow(self, run: Run, context: grpc.ServicerContext) -> Iterator[types_pb2.Progress]:
        sent = 0
        while True:
            with run.changed:
                while sent >= len(run.history) and not self._stop.is_set() and context.is_active():
                    run.changed.wait(0.05)
                pending = run.history[sent:]
            if self._stop.is_set() or not context.is_active():
                return
            for progress in pending:
                yield progress
                sent += 1
                if progress.state != types_pb2.TASK_STATE_RUNNING:
                    return


def wait_for(predicate: object, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
