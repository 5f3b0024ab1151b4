"""In-test agents that speak the real Agent gRPC contract and heartbeat to a real scheduler.

`HollowAgent` completes tasks instantly (kubemark-style hollow node) or slowly, frame by frame
with checkpoints. It is idempotent on the task id as the contract demands: a repeat RunTask while
running re-attaches; after completion it replays the final progress, except that a later attempt
of a run that ended without success runs again, as the real agent does. Like a real agent's run
journal (in memory here) it reports its runs and unacknowledged outcomes in each heartbeat and
refuses a dispatch from a leader term older than the newest it has seen. `executions` counts how many
times each task actually ran here, so tests can assert "never ran twice".
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from facefleet.grpc_server import SERVICE_NAMES, ServerHandle, build_server
from facefleet.v1 import agent_pb2, agent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2


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
        self.runs: dict[str, Run] = {}
        self.executions: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.cancel_requests: list[str] = []
        self.resumed_from: dict[str, int] = {}
        self.leader_term = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ServerHandle | None = None
        self._heartbeat: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> HollowAgent:
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
        assert self._server is not None
        return f"127.0.0.1:{self._server.port}"

    def kill(self) -> None:
        """Stop abruptly: no more heartbeats, streams broken (as a crashed process would)."""
        self._stop.set()
        if self._server is not None:
            self._server.server.stop(grace=None)

    stop = kill

    def busy(self) -> list[str]:
        with self._lock:
            return [task_id for task_id, run in self.runs.items() if not run.done.is_set()]

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
            free_slots=max(0, self.slots - len(running)),
            healthy=True,
            running_task_ids=running,
            sec_per_frame=max(self.frame_s, 0.001),
        )

    def _heartbeat_loop(self) -> None:
        # Several addresses (comma-separated) = every scheduler replica hears the heartbeat.
        channels = [grpc.insecure_channel(address) for address in self.scheduler_address.split(",")]
        stubs = [scheduler_pb2_grpc.SchedulerStub(channel) for channel in channels]
        while not self._stop.is_set():
            for stub in stubs:
                try:
                    reply = stub.Heartbeat(self.heartbeat_request(), timeout=2)
                    for task_id in reply.cancel_task_ids:
                        self._cancel(task_id)
                    with self._lock:
                        self.leader_term = max(self.leader_term, reply.leader_term)
                        for ref in reply.acknowledged:
                            run = self.runs.get(ref.task_id)
                            if run is not None and run.attempt == ref.attempt and run.done.is_set():
                                run.acknowledged = True
                except grpc.RpcError:
                    pass  # scheduler down or restarting: keep trying
            self._stop.wait(self.heartbeat_s)
        for channel in channels:
            channel.close()

    # ---- Agent service -------------------------------------------------------------------------

    def RunTask(self, request: agent_pb2.RunTaskRequest, context: grpc.ServicerContext) -> Iterator[types_pb2.Progress]:
        task = request.task
        private = task.sensitivity == types_pb2.SENSITIVITY_PRIVATE or request.project_locked
        if self.refuse_residency and private and self.trust_zone != "private":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "RESIDENCY_VIOLATION: private task on a cloud agent")
        with self._lock:
            run = self.runs.get(task.id)
            if run is not None and run.done.is_set() and request.attempt > run.attempt:
                final = run.history[-1].state if run.history else types_pb2.TASK_STATE_UNSPECIFIED
                if final != types_pb2.TASK_STATE_SUCCEEDED:
                    run = None  # cancelled or preempted before: this attempt runs again
            if run is None:
                if request.leader_term < self.leader_term:
                    context.abort(grpc.StatusCode.ABORTED, f"stale leader term {request.leader_term}")
                if len(self.busy_unlocked()) >= self.slots:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"agent {self.agent_id} has no free slot")
                self.leader_term = max(self.leader_term, request.leader_term)
                run = Run(
                    task=task,
                    resume_from=request.resume_from_frame,
                    attempt=request.attempt,
                    leader_term=request.leader_term,
                )
                self.runs[task.id] = run
                self.executions[task.id] += 1
                self.resumed_from[task.id] = request.resume_from_frame
                threading.Thread(target=self._execute, args=(run,), daemon=True).start()
        yield from self._follow(run, context)

    def busy_unlocked(self) -> list[str]:
        return [task_id for task_id, run in self.runs.items() if not run.done.is_set()]

    def CancelTask(
        self, request: agent_pb2.AgentCancelRequest, context: grpc.ServicerContext
    ) -> agent_pb2.AgentCancelResponse:
        self.cancel_requests.append(request.task_id)
        return agent_pb2.AgentCancelResponse(was_running=self._cancel(request.task_id))

    def Describe(self, request: agent_pb2.DescribeRequest, context: grpc.ServicerContext) -> agent_pb2.AgentDescription:
        return agent_pb2.AgentDescription(agent_id=self.agent_id, pool=self.pool, trust_zone=self.trust_zone)

    def _cancel(self, task_id: str) -> bool:
        with self._lock:
            run = self.runs.get(task_id)
        if run is None or run.done.is_set():
            return False
        run.cancelled.set()
        return True

    def _publish(self, run: Run, progress: types_pb2.Progress) -> None:
        with run.changed:
            run.history.append(progress)
            if progress.state != types_pb2.TASK_STATE_RUNNING:
                run.done.set()
            run.changed.notify_all()

    def _execute(self, run: Run) -> None:
        task = run.task
        total = max(1, task.frames)
        frame = run.resume_from
        if self.frame_s > 0:
            while frame < total:
                if run.cancelled.wait(self.frame_s) or self._stop.is_set():
                    break
                frame += 1
                checkpoint = frame - frame % self.checkpoint_every
                self._publish(
                    run,
                    types_pb2.Progress(
                        task_id=task.id,
                        frames_done=frame,
                        frames_total=total,
                        stage="swap",
                        checkpoint_frame=checkpoint,
                        checkpoint_uri=f"file:///ckpt/{task.id}" if checkpoint else "",
                        state=types_pb2.TASK_STATE_RUNNING,
                    ),
                )
        if self._stop.is_set():
            return  # "crashed": never finishes here
        state = types_pb2.TASK_STATE_CANCELLED if run.cancelled.is_set() else types_pb2.TASK_STATE_SUCCEEDED
        if state == types_pb2.TASK_STATE_SUCCEEDED:
            with self._lock:
                self.completed[task.id] += 1
        self._publish(
            run,
            types_pb2.Progress(
                task_id=task.id,
                frames_done=total if state == types_pb2.TASK_STATE_SUCCEEDED else frame,
                frames_total=total,
                stage="done",
                state=state,
                output_uri=task.output_uri,
            ),
        )

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
