"""The agent service: runs swap tasks the scheduler assigns, one per slot.

Work arrives on the agent's session with each scheduler replica (`agent.session`: assignments in,
batched updates and refusals out), or, from a scheduler that predates sessions, as `Agent.RunTask`
streams this gRPC server still serves (with `CancelTask` and `Describe`): the rolling-upgrade path.

`AgentRuntime` owns slots and runs, keyed by task id (the idempotency key): a repeated assignment for
a running task re-attaches to the same run, one for a finished task replays the outcome, and
completion is recorded once. Every run and its outcome are in the run journal (`agent.run_journal`)
before anyone hears of them, so this holds across agent restarts: a task that succeeded here never
runs again, and outcomes stay in the heartbeat's inventory until the scheduler acknowledges them. A
dispatch from a leader term older than the newest seen is refused. A session's assignment beyond the
free slots waits in a FIFO (at most `max_waiting`, journaled as accepted) and starts when a slot
frees; a cancel ends a waiting run before it starts. Runs live in their own threads, so a scheduler
that disconnects does not stop the work; a run publishes its updates to its session's listener.
Refusals before any work starts are RunRefusals (session) or gRPC statuses with a
`facefleet-reason` (RunTask); anything that fails once work started is a final Progress (FAILED + Error).

Residency, third layer: an agent in the cloud trust zone refuses any private or project-locked task.

Hard run-time limit (RunTaskRequest.max_run_s, seconds since this agent started the run): a timer
stops the run when it reaches it, the cooperative way a cancel does, and the run ends CANCELLED
with a message that begins "run-time limit reached" (checkpoint kept, journaled like any outcome).
The scheduler's cloud reservation covers the limit; when it extends the reservation it raises the
limit (HeartbeatResponse.run_limits, `raise_run_limit`). A limit is only ever raised.
"""

from __future__ import annotations

import math
import shutil
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import grpc
import structlog
from prometheus_client import start_http_server

from facefleet.agent import metrics
from facefleet.agent.gpu_stats import GpuProbe
from facefleet.agent.inputs import InputRejected, InputResolver
from facefleet.agent.models.verify import ModelStatus
from facefleet.agent.pipeline.runner import ProgressUpdate, SwapJob, SwapResult
from facefleet.agent.run_journal import RUN_ENDED_STATES, JournaledRun, RunJournal
from facefleet.agent.session import SchedulerSession, scheduler_sessions
from facefleet.config import AgentConfig
from facefleet.domain import (
    PRIVATE,
    RUN_LIMIT_REACHED,
    residency_allows,
    sensitivity_from_proto,
    sensitivity_known,
    state_name,
)
from facefleet.grpc_server import SERVICE_NAMES, ServerHandle, add_tolerant_service, build_server
from facefleet.money import SECONDS
from facefleet.rpc_errors import abort
from facefleet.v1 import agent_pb2, agent_pb2_grpc, scheduler_pb2, types_pb2

# How long a CancelTask that arrived before its RunTask keeps that RunTask from starting.
CANCEL_BEFORE_START_WINDOW_S = 30.0
log = structlog.get_logger()

FINISHED_RUNS_KEPT = 4096
WAITING_STAGE = "waiting"  # Progress.stage of a run accepted beyond the free slots, not started yet
MAX_RUN_S_CEILING = SECONDS.ceiling  # a run-time limit above a month is a unit mix-up
SEC_PER_FRAME_SMOOTHING = 0.3

try:
    FACEFLEET_VERSION = version("facefleet")
except PackageNotFoundError:  # running from a source tree without an install
    FACEFLEET_VERSION = "0+unknown"


class Pipeline(Protocol):
    """The swap pipeline the agent drives (agent.pipeline.runner.SwapPipeline)."""

    @property
    def engine(self) -> str: ...

    @property
    def execution_providers(self) -> list[str]: ...

    @property
    def models(self) -> list[ModelStatus]: ...

    def run(
        self, job: SwapJob, on_progress: Callable[[ProgressUpdate], None], cancelled: threading.Event
    ) -> SwapResult: ...


JobFactory = Callable[..., SwapJob]
default_job_factory: JobFactory = SwapJob
RunListener = Callable[[types_pb2.Progress], None]


@dataclass(frozen=True)
class AgentIdentity:
    agent_id: str
    pool: str
    trust_zone: str
    provider: str
    region: str
    address: str
    instance_id: str = ""


def residency_refusal(identity: AgentIdentity, request: agent_pb2.RunTaskRequest) -> str | None:
    """Why this agent must not run the task (residency), or None. Pure."""
    task = request.task
    sensitivity = sensitivity_from_proto(task.sensitivity)
    if residency_allows(identity.trust_zone, sensitivity, request.project_locked):
        return None
    if not sensitivity_known(task.sensitivity):
        why = "its sensitivity is unset, which counts as private"
    elif sensitivity == PRIVATE:
        why = "its sensitivity is private"
    else:
        why = f"project {task.project!r} is under a compliance lock"
    return (
        f"task {task.id} refused by agent {identity.agent_id} (pool {identity.pool}, trust zone "
        f"{identity.trust_zone!r}): {why}, so it may only run in the private trust zone; "
        "the scheduler must place it on an on-prem pool"
    )


def reason_from_error(error: BaseException) -> int:
    """The ErrorReason carried by a pipeline error (int, enum name or a mirroring Enum), INTERNAL when none."""
    code = getattr(error, "reason_code", None)
    if isinstance(code, int) and code in types_pb2.ErrorReason.values():
        return int(code)
    name = code if isinstance(code, str) else getattr(code, "name", None)
    if isinstance(name, str):
        try:
            return int(types_pb2.ErrorReason.Value(name))
        except ValueError:
            pass
    return int(types_pb2.INTERNAL)


def checkpoint_dir_from_uri(uri: str, roots: Sequence[Path]) -> Path | None:
    """The local directory of a `file://` checkpoint URI inside one of `roots`, else None."""
    parts = urlsplit(uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        return None
    path = Path(unquote(parts.path)).resolve()
    for root in roots:
        if path.is_relative_to(root.resolve()):
            return path
    return None


@dataclass
class TaskRun:
    """One run of one task on this agent; progress is a latest-snapshot plus a sequence number."""

    task_id: str
    attempt: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)
    latest: types_pb2.Progress = field(default_factory=types_pb2.Progress)
    sequence: int = 0
    preempted: bool = False
    cancel_reason: str = ""
    started_at: float = field(default_factory=time.monotonic)
    listener: RunListener | None = None  # the session that was assigned this run (agent.session)
    max_run_s: float = 0.0  # hard run-time limit from started_at (0 = none); armed by start_limit
    _limit_timer: threading.Timer | None = field(default=None, repr=False)
    _limit_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def finished(self) -> bool:
        return self.latest.state in RUN_ENDED_STATES

    def start_limit(self) -> None:
        """Arm the hard run-time limit as the run starts (a waiting run: when its slot frees)."""
        with self._limit_lock:
            if self.max_run_s > 0:
                self._arm_locked(self.max_run_s)

    def raise_limit(self, max_run_s: float) -> bool:
        """Raise the limit of a run that has one and has not reached it; never lowers it."""
        with self._limit_lock:
            if self.max_run_s <= 0 or max_run_s <= self.max_run_s or self.cancelled.is_set() or self.finished:
                return False
            if self._limit_timer is None:  # still waiting for a slot: armed with it when it starts
                self.max_run_s = max_run_s
            else:
                self._arm_locked(max_run_s)
            return True

    def end_limit(self) -> None:
        with self._limit_lock:
            if self._limit_timer is not None:
                self._limit_timer.cancel()

    def _arm_locked(self, max_run_s: float) -> None:
        if self._limit_timer is not None:
            self._limit_timer.cancel()
        self.max_run_s = max_run_s
        delay = max(0.0, self.started_at + max_run_s - time.monotonic())
        self._limit_timer = threading.Timer(delay, self._limit_reached, (max_run_s,))
        self._limit_timer.daemon = True
        self._limit_timer.start()

    def _limit_reached(self, armed_s: float) -> None:
        """Stop the run the way a cancel does (the pipeline checks `cancelled` between frames)."""
        with self._limit_lock:
            if self.max_run_s != armed_s or self.cancelled.is_set() or self.finished:
                return  # raised meanwhile (a newer timer runs), or the run ended or was stopped already
            elapsed = time.monotonic() - self.started_at
            self.cancel_reason = (
                f"{RUN_LIMIT_REACHED}: the run used its whole {armed_s:g} s limit (the scheduler's "
                f"reservation for it); stopped after {elapsed:.1f} s at frame {self.latest.frames_done}, "
                f"checkpoint kept at frame {self.latest.checkpoint_frame}"
            )
            self.cancelled.set()
        log.warning("run_limit_reached", task_id=self.task_id, attempt=self.attempt, max_run_s=armed_s)

    def publish(self, progress: types_pb2.Progress) -> None:
        with self.changed:
            self.latest = progress
            self.sequence += 1
            self.changed.notify_all()
            if self.listener is not None:
                _tell(self.listener, progress)

    def subscribe(self, listener: RunListener) -> None:
        """Send every update from now on to `listener`, starting with the current one (in order: both
        under the run's lock). A newer subscriber replaces the previous one."""
        with self.changed:
            self.listener = listener
            if self.sequence > 0:
                _tell(listener, self.latest)

    def follow(self, is_active: Callable[[], bool], poll_s: float = 0.5) -> Iterator[types_pb2.Progress]:
        """Yield the current snapshot, then every newer one, until a terminal state or the caller leaves."""
        seen = -1
        while True:
            with self.changed:
                while self.sequence == seen and is_active():
                    self.changed.wait(poll_s)
                if self.sequence == seen:
                    return
                seen, snapshot = self.sequence, self.latest
            if seen > 0:
                yield snapshot
            if snapshot.state in RUN_ENDED_STATES:
                return


def _tell(listener: RunListener, progress: types_pb2.Progress) -> None:
    try:
        listener(progress)
    except Exception as error:  # a listener's fault never stops the run that publishes
        log.error("run_listener_failed", task_id=progress.task_id, exc_info=error)


# Refusals after which the task may go to another agent now (the scheduler re-queues it); any other
# refusal is about the task itself (bad input, residency, models) and fails it.
RETRY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL})


class Refusal(Exception):
    """Admission refused before work starts: a gRPC status with a facefleet-reason (RunTask) or a
    RunRefusal (session)."""

    def __init__(self, code: grpc.StatusCode, reason: int, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field

    def run_refusal(self, request: agent_pb2.RunTaskRequest) -> scheduler_pb2.RunRefusal:
        return scheduler_pb2.RunRefusal(
            task_id=request.task.id,
            attempt=request.attempt,
            error=types_pb2.Error(reason=self.reason, message=self.message, field=self.field),  # type: ignore[arg-type]
            retry=self.code in RETRY_CODES,
        )


@dataclass(frozen=True)
class _Waiting:
    """An accepted run that waits for a free slot (prefetch); it has not started."""

    run: TaskRun
    request: agent_pb2.RunTaskRequest
    checkpoint_dir: Path


class AgentRuntime:
    """Slots, runs and the agent's view of itself; no gRPC servicer context in here."""

    def __init__(
        self,
        identity: AgentIdentity,
        pipeline: Pipeline | None,
        resolver: InputResolver,
        work_dir: Path,
        checkpoint_root: Path,
        slots: int,
        gpu: GpuProbe | None = None,
        job_factory: JobFactory = default_job_factory,
        pipeline_error: BaseException | None = None,
        journal: RunJournal | None = None,
        max_waiting: int = 0,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, got {max_waiting}")
        self.identity = identity
        self.pipeline = pipeline
        self.pipeline_error = pipeline_error
        self.resolver = resolver
        self.work_dir = Path(work_dir)
        self.checkpoint_root = Path(checkpoint_root)
        self.total_slots = slots
        self.max_waiting = max_waiting
        self.gpu = gpu or GpuProbe()
        self.job_factory = job_factory
        self.draining = False
        self.preempting = False
        self.sec_per_frame = 0.0
        self._lock = threading.Lock()
        self._running: dict[str, TaskRun] = {}
        self._waiting: OrderedDict[str, _Waiting] = OrderedDict()  # accepted beyond the free slots, FIFO
        self._finished: OrderedDict[str, TaskRun] = OrderedDict()
        # CancelTask that arrived before its RunTask (the two race on separate connections):
        # task id -> when. A RunTask for it shortly after is refused instead of started.
        self._cancelled_unstarted: dict[str, float] = {}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_root.mkdir(parents=True, exist_ok=True)
        self.journal = journal or RunJournal.in_dir(self.work_dir)
        if self.journal.interrupted:
            log.warning("runs_interrupted_by_restart", tasks=self.journal.interrupted)
        self._update_slot_gauges()

    # --- state shared with the heartbeat -------------------------------------------------------

    @property
    def free_slots(self) -> int:
        with self._lock:
            return max(0, self.total_slots - len(self._running) - len(self._waiting))

    def running_task_ids(self) -> list[str]:
        """Every run this agent holds: started, or accepted and waiting for a slot."""
        with self._lock:
            return sorted([*self._running, *self._waiting])

    def waiting_task_ids(self) -> list[str]:
        with self._lock:
            return list(self._waiting)

    @property
    def healthy(self) -> bool:
        return self.pipeline is not None

    def set_draining(self, draining: bool) -> None:
        if draining != self.draining:
            log.info("agent_drain" if draining else "agent_undrain", agent_id=self.identity.agent_id)
        self.draining = draining

    def notice_preemption(self) -> list[str]:
        """Spot interruption notice: take nothing new, stop the runs as PREEMPTED (checkpoints stay)."""
        self.preempting = True
        metrics.PREEMPTION_NOTICES.labels(provider=self.identity.provider).inc()
        reason = "spot interruption notice: resume from the checkpoint elsewhere"
        with self._lock:
            runs = list(self._running.values())
            waiting = list(self._waiting.values())
            self._waiting.clear()
        for run in runs:
            run.preempted = True
            run.cancel_reason = reason
            run.cancelled.set()
        for entry in waiting:
            self._end_unstarted(entry, types_pb2.TASK_STATE_PREEMPTED, reason)
        return [run.task_id for run in runs] + [entry.run.task_id for entry in waiting]

    def heartbeat_request(self) -> scheduler_pb2.HeartbeatRequest:
        term = self.journal.leader_term  # read before the inventory: it lists all that term's predecessors got
        runs = [run.report() for run in self.journal.inventory()]
        gpu_name, _ = self.gpu.describe()
        return scheduler_pb2.HeartbeatRequest(
            agent_id=self.identity.agent_id,
            address=self.identity.address,
            pool=self.identity.pool,
            trust_zone=self.identity.trust_zone,
            provider=self.identity.provider,
            region=self.identity.region,
            total_slots=self.total_slots,
            free_slots=0 if (self.draining or self.preempting) else self.free_slots,
            healthy=self.healthy,
            running_task_ids=self.running_task_ids(),
            execution_providers=self.execution_providers(),
            gpu=gpu_name,
            sec_per_frame=self.sec_per_frame,
            preempting=self.preempting,
            instance_id=self.identity.instance_id,
            runs=runs,
            known_leader_term=term,
        )

    def apply_leader(self, term: int, acknowledged: Sequence[types_pb2.RunRef]) -> None:
        """A leader's heartbeat reply: fence older terms, forget the outcomes it has recorded."""
        if term > 0 and self.journal.note_term(term):
            log.info("leader_term_seen", leader_term=term)
        self.journal.acknowledge([(ref.task_id, ref.attempt) for ref in acknowledged])

    def execution_providers(self) -> list[str]:
        return list(self.pipeline.execution_providers) if self.pipeline is not None else []

    def describe(self) -> agent_pb2.AgentDescription:
        gpu_name, gpu_memory_mb = self.gpu.describe()
        models = []
        for model in self.pipeline.models if self.pipeline is not None else []:
            models.append(
                agent_pb2.ModelInfo(
                    name=model.name, role=model.role, sha256=model.sha256, verified=model.verified, error=model.error
                )
            )
        engine = self.pipeline.engine if self.pipeline is not None else f"unavailable: {self.pipeline_error}"
        return agent_pb2.AgentDescription(
            agent_id=self.identity.agent_id,
            pool=self.identity.pool,
            trust_zone=self.identity.trust_zone,
            provider=self.identity.provider,
            region=self.identity.region,
            execution_providers=self.execution_providers(),
            models=models,
            gpu=gpu_name,
            gpu_memory_mb=gpu_memory_mb,
            engine=engine,
            total_slots=self.total_slots,
            free_slots=self.free_slots,
            version=FACEFLEET_VERSION,
        )

    # --- admission -----------------------------------------------------------------------------

    def _validate(self, request: agent_pb2.RunTaskRequest) -> None:
        task = request.task
        if not task.id:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                types_pb2.INVALID_TASK,
                "task.id is empty; the scheduler assigns an id before dispatch",
                "task.id",
            )
        if not (math.isfinite(request.max_run_s) and 0 <= request.max_run_s <= MAX_RUN_S_CEILING):
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                types_pb2.INVALID_TASK,
                f"max_run_s {request.max_run_s!r} is not a run-time limit: expected seconds in "
                f"[0, {MAX_RUN_S_CEILING:g}] (0 = none)",
                "max_run_s",
            )
        refusal = residency_refusal(self.identity, request)
        if refusal is not None:
            metrics.REFUSALS.labels(reason="RESIDENCY_VIOLATION").inc()
            log.warning("residency_refusal", task_id=task.id, project=task.project, agent_id=self.identity.agent_id)
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, types_pb2.RESIDENCY_VIOLATION, refusal)

    def _precheck_inputs(self, request: agent_pb2.RunTaskRequest) -> None:
        task = request.task
        try:
            self.resolver.precheck_input(task.source_uri, "task.source_uri")
            self.resolver.precheck_input(task.target_uri, "task.target_uri")
            if task.options.reference_face_uri:
                self.resolver.precheck_input(task.options.reference_face_uri, "task.options.reference_face_uri")
            self.resolver.precheck_output(task.output_uri, "task.output_uri")
        except InputRejected as error:
            metrics.REFUSALS.labels(reason="INPUT_REJECTED").inc()
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, types_pb2.INPUT_REJECTED, error.message, error.field
            ) from error

    def _checkpoint_dir(self, request: agent_pb2.RunTaskRequest) -> Path:
        if request.checkpoint_uri:
            chosen = checkpoint_dir_from_uri(request.checkpoint_uri, [self.checkpoint_root])
            if chosen is None:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    types_pb2.INPUT_REJECTED,
                    f"checkpoint_uri {request.checkpoint_uri!r} is not a file:// directory under this agent's "
                    f"checkpoint root {self.checkpoint_root.resolve()}; configure the same shared "
                    "checkpoint_root on every agent of the pool",
                    "checkpoint_uri",
                )
            return chosen
        return (self.checkpoint_root / request.task.id).resolve()

    def assign(self, request: agent_pb2.RunTaskRequest, listener: RunListener) -> scheduler_pb2.RunRefusal | None:
        """A session's assignment: start it, queue it for a slot (up to `max_waiting`), re-attach to
        it or replay its outcome; its updates go to `listener`. A refusal is returned, not raised."""
        try:
            run = self.start_or_attach(request, may_wait=True)
        except Refusal as refusal:
            return refusal.run_refusal(request)
        except Exception as error:  # never crash on input: refuse, the scheduler places it again
            log.error("assignment_admission_crashed", task_id=request.task.id, exc_info=error)
            message = f"agent failed to admit task {request.task.id}: {type(error).__name__}: {error}"
            return Refusal(grpc.StatusCode.INTERNAL, types_pb2.INTERNAL, message).run_refusal(request)
        run.subscribe(listener)
        return None

    def start_or_attach(self, request: agent_pb2.RunTaskRequest, may_wait: bool = False) -> TaskRun:
        """The run for this task: an existing one (re-attach / replay) or a new one; raises Refusal.
        `may_wait`: with every slot busy, queue it (accepted, not started) while fewer than
        `max_waiting` wait, instead of refusing."""
        self._validate(request)
        task_id = request.task.id
        self.journal.note_term(request.leader_term)  # a newer leader speaks: fence the older ones
        with self._lock:
            existing = self._running.get(task_id) or self._waiting_run(task_id) or self._finished.get(task_id)
            if existing is not None and not self._rerun_allowed(existing, request.attempt):
                if existing.attempt == request.attempt:  # re-attach: the dispatcher's limit may be newer
                    existing.raise_limit(request.max_run_s)
                return existing
        if existing is None and (journaled := self._journaled_outcome(task_id, request.attempt)) is not None:
            return journaled
        if self.pipeline is None:
            reason = reason_from_error(self.pipeline_error) if self.pipeline_error else types_pb2.INTERNAL
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                reason,
                f"agent {self.identity.agent_id} cannot run tasks: {self.pipeline_error}",
            )
        if self.draining or self.preempting:
            metrics.REFUSALS.labels(reason="NO_CAPACITY").inc()
            state = "preempting (spot interruption)" if self.preempting else "draining"
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                types_pb2.NO_CAPACITY,
                f"agent {self.identity.agent_id} is {state} and takes no new tasks; requeue elsewhere",
            )
        self._precheck_inputs(request)
        checkpoint_dir = self._checkpoint_dir(request)
        with self._lock:
            existing = self._running.get(task_id) or self._waiting_run(task_id)  # a concurrent duplicate won
            if existing is not None:
                return existing
            cancelled_at = self._cancelled_unstarted.pop(task_id, None)
            if cancelled_at is not None and time.monotonic() - cancelled_at < CANCEL_BEFORE_START_WINDOW_S:
                metrics.REFUSALS.labels(reason="CANCELLED").inc()
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    types_pb2.CANCELLED,
                    f"task {task_id} was cancelled on agent {self.identity.agent_id} before it started; "
                    "not starting it (the scheduler re-queues it)",
                )
            waits = len(self._running) >= self.total_slots
            if waits and (not may_wait or len(self._waiting) >= self.max_waiting):
                metrics.REFUSALS.labels(reason="NO_CAPACITY").inc()
                queue = f" and {len(self._waiting)} of {self.max_waiting} waiting" if may_wait else ""
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    types_pb2.NO_CAPACITY,
                    f"agent {self.identity.agent_id} is full ({self.total_slots} of "
                    f"{self.total_slots} slots busy{queue}); requeue the task",
                )
            stale = self.journal.accept(task_id, request.attempt, request.leader_term)
            if stale:
                metrics.REFUSALS.labels(reason="STALE_LEADER_TERM").inc()
                raise Refusal(grpc.StatusCode.ABORTED, types_pb2.STALE_LEADER_TERM, f"task {task_id}: {stale}")
            run = TaskRun(task_id=task_id, attempt=request.attempt, max_run_s=request.max_run_s)
            if waits:
                stage, message = WAITING_STAGE, f"accepted; waiting for a free slot ({len(self._waiting)} ahead)"
                self._waiting[task_id] = _Waiting(run, request, checkpoint_dir)
            else:
                stage, message = "accepted", ""
                self._running[task_id] = run
            run.publish(
                self._progress(
                    run,
                    request,
                    checkpoint_dir,
                    state=types_pb2.TASK_STATE_RUNNING,
                    stage=stage,
                    message=message,
                    frames_done=request.resume_from_frame,
                )
            )
            self._finished.pop(task_id, None)
        self._update_slot_gauges()
        if waits:
            log.info("task_waiting", task_id=task_id, attempt=request.attempt)
        else:
            self._launch(run, request, checkpoint_dir)
        return run

    def _waiting_run(self, task_id: str) -> TaskRun | None:
        entry = self._waiting.get(task_id)
        return entry.run if entry is not None else None

    def _launch(self, run: TaskRun, request: agent_pb2.RunTaskRequest, checkpoint_dir: Path) -> None:
        run.start_limit()
        thread = threading.Thread(
            target=self._execute, args=(run, request, checkpoint_dir), name=f"task-{run.task_id}", daemon=True
        )
        thread.start()
        log.info("task_started", task_id=run.task_id, attempt=request.attempt, resume_from=request.resume_from_frame)

    def _start_waiting(self) -> None:
        """Start waiting runs, oldest first, while slots are free."""
        started: list[_Waiting] = []
        with self._lock:
            while self._waiting and len(self._running) < self.total_slots and not self.preempting:
                task_id, entry = self._waiting.popitem(last=False)
                self._running[task_id] = entry.run
                started.append(entry)
        for entry in started:
            run, request = entry.run, entry.request
            run.started_at = time.monotonic()
            run.publish(
                self._progress(
                    run,
                    request,
                    entry.checkpoint_dir,
                    state=types_pb2.TASK_STATE_RUNNING,
                    stage="accepted",
                    frames_done=request.resume_from_frame,
                )
            )
            self._launch(run, request, entry.checkpoint_dir)

    def _end_unstarted(self, entry: _Waiting, state: int, reason: str) -> None:
        """A waiting run ends before it started (cancel, preemption): journaled, then published."""
        preempted = state == types_pb2.TASK_STATE_PREEMPTED
        message = f"{reason} (before it started)"
        final = self._progress(
            entry.run,
            entry.request,
            entry.checkpoint_dir,
            state=state,
            stage=WAITING_STAGE,
            frames_done=entry.request.resume_from_frame,
            message=message,
            error=types_pb2.Error(reason=types_pb2.PREEMPTED if preempted else types_pb2.CANCELLED, message=message),
        )
        self._finish(entry.run, final)

    def _journaled_outcome(self, task_id: str, attempt: int) -> TaskRun | None:
        """A run this agent finished before (maybe before a restart) that answers this request: a
        success (final), or the outcome of this attempt or a later one. None: run it."""
        journaled: JournaledRun | None = self.journal.succeeded(task_id) or self.journal.latest(task_id)
        if journaled is None or journaled.outcome is None:
            return None
        if not journaled.succeeded and journaled.attempt < attempt:
            return None  # a later attempt of a run that did not succeed here: run it again
        replay = TaskRun(task_id=task_id, attempt=journaled.attempt)
        replay.publish(journaled.outcome)
        return replay

    @staticmethod
    def _rerun_allowed(existing: TaskRun, attempt: int) -> bool:
        """Only a later attempt of a run that ended without success runs again; success is final."""
        return (
            existing.finished and attempt > existing.attempt and existing.latest.state != types_pb2.TASK_STATE_SUCCEEDED
        )

    def raise_run_limit(self, task_id: str, attempt: int, max_run_s: float) -> bool:
        """Raise the hard run-time limit of a running or waiting (task, attempt) (the scheduler
        extended its reservation); never lowers it. False when no such run is here or it has no limit."""
        with self._lock:
            run = self._running.get(task_id) or self._waiting_run(task_id)
        if run is None or run.attempt != attempt or not math.isfinite(max_run_s):
            return False
        raised = run.raise_limit(min(max_run_s, MAX_RUN_S_CEILING))
        if raised:
            log.info("run_limit_raised", task_id=task_id, attempt=attempt, max_run_s=round(max_run_s, 3))
        return raised

    def cancel(self, task_id: str, reason: str) -> bool:
        return bool(self.cancel_runs([task_id], reason))

    def cancel_runs(self, task_ids: Sequence[str], reason: str) -> list[str]:
        """Stop these runs; returns those there were to stop. Waiting ones leave the FIFO first, all
        under one lock: a slot freed by a run cancelled here never starts another one cancelled here
        (a lock recalls a cloud agent's prefetched work before it starts)."""
        reason = reason or "cancelled"
        with self._lock:
            waiting = [entry for task_id in task_ids if (entry := self._waiting.pop(task_id, None)) is not None]
            running = [run for task_id in task_ids if (run := self._running.get(task_id)) is not None]
            known = {entry.run.task_id for entry in waiting} | {run.task_id for run in running}
            now = time.monotonic()
            for task_id in task_ids:  # never seen here: its RunTask may be in flight
                if task_id not in known and task_id not in self._finished:
                    self._cancelled_unstarted = {
                        tid: at
                        for tid, at in self._cancelled_unstarted.items()
                        if now - at < CANCEL_BEFORE_START_WINDOW_S
                    }
                    self._cancelled_unstarted[task_id] = now
        for entry in waiting:  # they never start
            self._end_unstarted(entry, types_pb2.TASK_STATE_CANCELLED, reason)
            log.info("waiting_task_cancelled", task_id=entry.run.task_id)
        for run in running:
            run.cancel_reason = reason
            run.cancelled.set()
        return [entry.run.task_id for entry in waiting] + [run.task_id for run in running]

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running_task_ids():
                return True
            time.sleep(0.05)
        return False

    # --- execution -----------------------------------------------------------------------------

    def _progress(
        self, run: TaskRun, request: agent_pb2.RunTaskRequest, checkpoint_dir: Path, **fields: Any
    ) -> types_pb2.Progress:
        progress = types_pb2.Progress(
            task_id=run.task_id,
            checkpoint_uri=checkpoint_dir.as_uri() + "/",
            output_uri=request.task.output_uri,
            engine=self.pipeline.engine if self.pipeline is not None else "",
            frames_total=request.task.frames,
            checkpoint_frame=request.resume_from_frame,
        )
        for name, value in fields.items():
            if name == "error":
                progress.error.CopyFrom(value)
            elif name == "quality":
                progress.quality.CopyFrom(value)
            else:
                setattr(progress, name, value)
        return progress

    def _execute(self, run: TaskRun, request: agent_pb2.RunTaskRequest, checkpoint_dir: Path) -> None:
        task = request.task
        pool = self.identity.pool
        temp_dir = self.work_dir / "tasks" / f"{task.id}-{run.attempt}-{uuid.uuid4().hex[:8]}"
        last = run.latest
        try:
            temp_dir.mkdir(parents=True, exist_ok=True)
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            source = self.resolver.fetch_input(task.source_uri, "task.source_uri", temp_dir)
            target = self.resolver.fetch_input(task.target_uri, "task.target_uri", temp_dir)
            reference = (
                self.resolver.fetch_input(task.options.reference_face_uri, "task.options.reference_face_uri", temp_dir)
                if task.options.reference_face_uri
                else None
            )
            output = self.resolver.output_path(task.output_uri, "task.output_uri", temp_dir)
            options = task.options
            job = self.job_factory(
                task_id=task.id,
                source_path=source,
                target_path=target,
                output_path=output,
                face_selector=options.face_selector or "largest",
                reference_face_path=reference,
                blend=options.blend if options.blend > 0 else 1.0,  # proto3 default 0 means "unset"
                **({"mask": options.mask} if options.mask else {}),  # unset: the pipeline's default
                min_id_similarity=options.min_id_similarity or None,  # 0: no quality gate
                enhance=options.enhance,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every_frames=options.checkpoint_every_frames or 48,
                resume_from_frame=request.resume_from_frame,
            )
            frames_seen = [request.resume_from_frame]

            def on_progress(update: ProgressUpdate) -> None:
                nonlocal last
                done, fps = update.frames_done, update.fps
                if done > frames_seen[0] and self.pipeline is not None:
                    metrics.FRAMES.labels(pool=pool, engine=self.pipeline.engine).inc(done - frames_seen[0])
                    frames_seen[0] = done
                if fps > 0:
                    metrics.FPS.labels(pool=pool).set(fps)
                    self._observe_sec_per_frame(1.0 / fps)
                last = self._progress(
                    run,
                    request,
                    checkpoint_dir,
                    state=types_pb2.TASK_STATE_RUNNING,
                    frames_done=done,
                    frames_total=update.frames_total or task.frames,
                    fps=fps,
                    stage=update.stage,
                    checkpoint_frame=update.checkpoint_frame,
                    message=update.message,
                )
                run.publish(last)

            assert self.pipeline is not None
            result = self.pipeline.run(job, on_progress, run.cancelled)
            self.resolver.publish_output(task.output_uri, "task.output_uri", result.output_path)
            processed = result.frames_processed or result.frames or 1
            for stage, seconds in result.stage_seconds.items():
                metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds / processed)  # per frame
            frames = result.frames
            elapsed = time.monotonic() - run.started_at
            if frames > 0 and elapsed > 0:
                self._observe_sec_per_frame(elapsed / max(1, processed))
            quality = result.quality
            final = self._progress(
                run,
                request,
                checkpoint_dir,
                state=types_pb2.TASK_STATE_SUCCEEDED,
                stage="done",
                frames_done=frames,
                frames_total=frames,
                fps=last.fps,
                checkpoint_frame=result.checkpoint_frame or frames,
                engine=result.engine or last.engine,
                quality=types_pb2.Quality(
                    id_similarity_mean=quality.id_similarity_mean or 0.0,
                    id_similarity_min=quality.id_similarity_min or 0.0,
                    faces_swapped=quality.faces_swapped,
                ),
                message=f"swap finished with the {result.engine or last.engine} engine",
            )
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # nothing left to resume
        except Exception as error:
            final = self._failure(run, request, checkpoint_dir, last, error)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
        self._finish(run, final)

    def _failure(
        self,
        run: TaskRun,
        request: agent_pb2.RunTaskRequest,
        checkpoint_dir: Path,
        last: types_pb2.Progress,
        error: Exception,
    ) -> types_pb2.Progress:
        common = {
            "frames_done": last.frames_done,
            "frames_total": last.frames_total,
            "checkpoint_frame": last.checkpoint_frame,
            "stage": last.stage,
        }
        if run.cancelled.is_set():
            state = types_pb2.TASK_STATE_PREEMPTED if run.preempted else types_pb2.TASK_STATE_CANCELLED
            stop_reason = types_pb2.PREEMPTED if run.preempted else types_pb2.CANCELLED
            message = run.cancel_reason or "cancelled"
            return self._progress(
                run,
                request,
                checkpoint_dir,
                state=state,
                message=message,
                error=types_pb2.Error(reason=stop_reason, message=message),
                **common,
            )
        reason = reason_from_error(error)
        message = str(getattr(error, "message", "") or error) or type(error).__name__
        if reason == types_pb2.INTERNAL:
            log.error("task_crashed", task_id=run.task_id, error=repr(error), exc_info=error)
            message = f"internal error in the agent: {type(error).__name__}: {message}"
        else:
            log.warning(
                "task_failed",
                task_id=run.task_id,
                reason=types_pb2.ErrorReason.Name(reason),  # type: ignore[arg-type]
                message=message,
            )
        return self._progress(
            run,
            request,
            checkpoint_dir,
            state=types_pb2.TASK_STATE_FAILED,
            message=message,
            error=types_pb2.Error(
                reason=reason,  # type: ignore[arg-type]
                message=message,
                field=str(getattr(error, "field", "") or ""),
            ),
            **common,
        )

    def _finish(self, run: TaskRun, final: types_pb2.Progress) -> None:
        run.end_limit()
        self.journal.finish(run.task_id, run.attempt, final)  # durable before anyone hears of it
        with self._lock:
            self._running.pop(run.task_id, None)
            self._finished[run.task_id] = run
            while len(self._finished) > FINISHED_RUNS_KEPT:
                self._finished.popitem(last=False)
        run.publish(final)  # after the slot is free: a client seeing the end may dispatch again at once
        self._start_waiting()
        outcome = state_name(final.state)
        metrics.TASKS.labels(pool=self.identity.pool, outcome=outcome).inc()
        self._update_slot_gauges()
        log.info(
            "task_finished",
            task_id=run.task_id,
            outcome=outcome,
            frames=final.frames_done,
            error=final.error.message or None,
        )

    def _observe_sec_per_frame(self, value: float) -> None:
        if self.sec_per_frame <= 0:
            self.sec_per_frame = value
        else:
            self.sec_per_frame += SEC_PER_FRAME_SMOOTHING * (value - self.sec_per_frame)

    def _update_slot_gauges(self) -> None:
        free = self.free_slots
        metrics.SLOTS_FREE.labels(pool=self.identity.pool).set(free)
        metrics.SLOTS_BUSY.labels(pool=self.identity.pool).set(self.total_slots - free)


class AgentServicer(agent_pb2_grpc.AgentServicer):
    def __init__(self, runtime: AgentRuntime) -> None:
        self.runtime = runtime

    def RunTask(self, request: agent_pb2.RunTaskRequest, context: grpc.ServicerContext) -> Iterator[types_pb2.Progress]:
        try:
            run = self.runtime.start_or_attach(request)
        except Refusal as refusal:
            abort(context, refusal.code, refusal.reason, refusal.message, refusal.field)
        except Exception as error:  # never crash on input: report and keep serving
            log.error("run_task_admission_crashed", task_id=request.task.id, exc_info=error)
            abort(
                context,
                grpc.StatusCode.INTERNAL,
                types_pb2.INTERNAL,
                f"agent failed to admit task {request.task.id}: {type(error).__name__}: {error}",
            )
        yield from run.follow(context.is_active)

    def CancelTask(
        self, request: agent_pb2.AgentCancelRequest, context: grpc.ServicerContext
    ) -> agent_pb2.AgentCancelResponse:
        if not request.task_id:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                types_pb2.INVALID_TASK,
                "task_id is empty; name the task to cancel",
                "task_id",
            )
        was_running = self.runtime.cancel(request.task_id, request.reason or "cancelled by request")
        return agent_pb2.AgentCancelResponse(was_running=was_running)

    def Describe(self, request: agent_pb2.DescribeRequest, context: grpc.ServicerContext) -> agent_pb2.AgentDescription:
        return self.runtime.describe()


@dataclass
class AgentHandle:
    """A running agent: gRPC server, scheduler sessions, metrics endpoint, GPU sampler."""

    runtime: AgentRuntime
    grpc: ServerHandle
    metrics_port: int
    session: SchedulerSession | None  # to the first scheduler; `sessions` has one per replica
    _metrics_server: Any
    _stop_sampler: threading.Event
    sessions: list[SchedulerSession] = field(default_factory=list)
    interruption: Any = None  # agent.interruption.InterruptionMonitor on cloud agents

    @property
    def port(self) -> int:
        return self.grpc.port

    def stop(self, grace: float | None = 1.0) -> None:
        self._stop_sampler.set()
        if self.interruption is not None:
            self.interruption.stop()
        for session in self.sessions:
            session.stop()
        for task_id in self.runtime.running_task_ids():
            self.runtime.cancel(task_id, "agent shutting down")
        self.grpc.stop(grace)
        self.runtime.wait_idle(10.0)
        self._metrics_server.shutdown()
        self._metrics_server.server_close()


def load_pipeline(config: AgentConfig) -> tuple[Pipeline | None, BaseException | None]:
    """Load the swap pipeline from the models dir; a failure is kept (Describe/heartbeat report it)."""
    try:
        from facefleet.agent.pipeline.provenance import C2paSigningKey
        from facefleet.agent.pipeline.runner import SwapPipeline

        signer = C2paSigningKey.from_config(config.c2pa_cert, config.c2pa_key)
        loaded: Pipeline = SwapPipeline.load(config.models_dir, config.execution_providers, provenance_signer=signer)
        return loaded, None
    except Exception as error:
        log.error("pipeline_load_failed", models_dir=str(config.models_dir), error=str(error))
        return None, error


def _default_agent_id(config: AgentConfig, port: int) -> str:
    return config.agent_id or f"{config.pool}-{socket.gethostname()}-{port}"


def serve_agent(
    config: AgentConfig,
    credentials: grpc.ServerCredentials | None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    *,
    scheduler_channel_factory: Callable[[], grpc.Channel] | None = None,
    scheduler_channel_factories: Sequence[Callable[[], grpc.Channel]] = (),
    interruption_watcher: Any = None,
    interruption_poll_s: float = 1.0,
    pipeline: Pipeline | None = None,
    job_factory: JobFactory = default_job_factory,
    s3_client_factory: Callable[[], Any] | None = None,
    gpu_sample_interval_s: float = 5.0,
) -> AgentHandle:
    """Start an agent: gRPC server on `config.listen`, /metrics on `config.metrics_port` (0 = free port),
    and a session (agent.session) with the scheduler through `scheduler_channel_factory` (None: no
    scheduler), or with every replica in `scheduler_channel_factories`. `pipeline=None` loads `SwapPipeline` from
    `config.models_dir`. `interruption_watcher` (agent.interruption, cloud agents) is polled
    every `interruption_poll_s`; a spot notice preempts the runs (see `preempt_on_notice`).
    """
    pipeline_error: BaseException | None = None
    if pipeline is None:
        pipeline, pipeline_error = load_pipeline(config)
    resolver = (
        InputResolver(config.allowed_roots, config.max_input_bytes, s3_client_factory)
        if s3_client_factory is not None
        else InputResolver(config.allowed_roots, config.max_input_bytes)
    )
    # The identity needs the bound port and the server needs a servicer: bind first, then fill it in.
    holder = _LateServicer()

    def add(server: grpc.Server) -> None:
        add_tolerant_service(holder, agent_pb2.DESCRIPTOR.services_by_name["Agent"], server)

    server = build_server(config.listen, [(SERVICE_NAMES["Agent"], add)], credentials, interceptors)
    host = config.listen.rsplit(":", 1)[0] or "127.0.0.1"
    identity = AgentIdentity(
        agent_id=_default_agent_id(config, server.port),
        pool=config.pool,
        trust_zone=config.trust_zone,
        provider=config.provider,
        region=config.region,
        address=config.advertise_address or f"{host}:{server.port}",
        instance_id=config.instance_id,
    )
    gpu = GpuProbe()
    runtime = AgentRuntime(
        identity,
        pipeline,
        resolver,
        config.work_dir,
        config.checkpoint_root,
        config.slots,
        gpu=gpu,
        job_factory=job_factory,
        pipeline_error=pipeline_error,
        max_waiting=config.max_waiting,
    )
    holder.target = AgentServicer(runtime)
    metrics_server, _thread = start_http_server(config.metrics_port)
    metrics_port = int(metrics_server.server_port)
    stop_sampler = threading.Event()

    def sample_gpu() -> None:
        while not stop_sampler.is_set():
            gpu.publish()
            stop_sampler.wait(gpu_sample_interval_s)

    threading.Thread(target=sample_gpu, name="agent-gpu-sampler", daemon=True).start()
    factories = [scheduler_channel_factory] if scheduler_channel_factory is not None else []
    factories += list(scheduler_channel_factories)
    sessions = scheduler_sessions(runtime, factories, config.heartbeat_interval_s)
    for session in sessions:
        session.start()
    monitor = None
    if interruption_watcher is not None:
        from facefleet.agent.interruption import InterruptionMonitor

        monitor = InterruptionMonitor(
            interruption_watcher,
            lambda notice: preempt_on_notice(runtime, interruption_watcher, notice),
            interruption_poll_s,
        )
        monitor.start()
    log.info(
        "agent_serving",
        agent_id=identity.agent_id,
        address=identity.address,
        pool=identity.pool,
        trust_zone=identity.trust_zone,
        metrics_port=metrics_port,
        engine=pipeline.engine if pipeline is not None else None,
        pipeline_error=str(pipeline_error) if pipeline_error else None,
    )
    first = sessions[0] if sessions else None
    return AgentHandle(runtime, server, metrics_port, first, metrics_server, stop_sampler, sessions, monitor)


def preempt_on_notice(runtime: AgentRuntime, watcher: Any, notice: Any, drain_timeout_s: float = 25.0) -> None:
    """A spot interruption notice: heartbeats say `preempting`, runs stop as PREEMPTED with their
    checkpoints (the scheduler resumes them elsewhere); then approve an Azure event so it may proceed."""
    stopped = runtime.notice_preemption()
    log.warning("preempting", agent_id=runtime.identity.agent_id, tasks=stopped, provider=notice.provider)
    runtime.wait_idle(drain_timeout_s)
    event_id = getattr(notice, "event_id", None)
    if event_id and hasattr(watcher, "acknowledge"):
        try:
            watcher.acknowledge(event_id)
        except Exception as error:  # the provider proceeds at NotBefore anyway
            log.warning("could not acknowledge the scheduled event", event_id=event_id, error=str(error))


class _LateServicer(agent_pb2_grpc.AgentServicer):
    """Forwards to the real servicer once the runtime exists (the runtime needs the bound port)."""

    target: AgentServicer | None = None

    def _servicer(self, context: grpc.ServicerContext) -> AgentServicer:
        if self.target is None:
            abort(context, grpc.StatusCode.UNAVAILABLE, types_pb2.INTERNAL, "agent is starting; retry shortly")
        return self.target

    def RunTask(self, request: agent_pb2.RunTaskRequest, context: grpc.ServicerContext) -> Iterator[types_pb2.Progress]:
        yield from self._servicer(context).RunTask(request, context)

    def CancelTask(
        self, request: agent_pb2.AgentCancelRequest, context: grpc.ServicerContext
    ) -> agent_pb2.AgentCancelResponse:
        return self._servicer(context).CancelTask(request, context)

    def Describe(self, request: agent_pb2.DescribeRequest, context: grpc.ServicerContext) -> agent_pb2.AgentDescription:
        return self._servicer(context).Describe(request, context)
