"""Agent test fixtures: a fake swap pipeline, fake schedulers (unary heartbeats only, as before
sessions; or the scheduler's side of AgentSession), real gRPC servers."""

from __future__ import annotations

import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest

from facefleet.agent.models.verify import ModelStatus
from facefleet.agent.pipeline.quality import QualityReport
from facefleet.agent.pipeline.runner import ProgressUpdate, SwapJob, SwapResult
from facefleet.agent.run_journal import JOURNAL_FILE, RUN_ENDED_STATES
from facefleet.agent.server import AgentHandle, serve_agent
from facefleet.config import AgentConfig
from facefleet.v1 import agent_pb2, agent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2


class FakePipelineError(Exception):
    def __init__(self, message: str, reason_code: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason_code = reason_code


@dataclass
class FakePipeline:
    """Processes `frames` fake frames per job; `gate` (when cleared) holds every run before its first frame."""

    frames: int = 6
    frame_seconds: float = 0.01
    engine: str = "classical"
    execution_providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    models: list[Any] = field(
        default_factory=lambda: [
            ModelStatus("scrfd", "detector", "ab" * 32, True),
            ModelStatus("swap", "swapper", "", False, "missing"),
        ]
    )
    gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    calls: list[str] = field(default_factory=list)
    fail_with: Exception | None = None
    jobs: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gate.set()

    def run(self, job: Any, on_progress: Callable[[Any], None], cancelled: threading.Event) -> SwapResult:
        self.calls.append(job.task_id)
        self.jobs.append(job)
        assert Path(job.source_path).is_file() and Path(job.target_path).is_file()
        self.started.set()
        while not self.gate.wait(0.02):
            if cancelled.is_set():
                raise FakePipelineError("cancelled", "CANCELLED")
        if self.fail_with is not None:
            raise self.fail_with
        (Path(job.checkpoint_dir) / "segment-0.mp4").write_bytes(b"partial")
        for done in range(job.resume_from_frame + 1, self.frames + 1):
            if cancelled.is_set():
                raise FakePipelineError("cancelled", "CANCELLED")
            time.sleep(self.frame_seconds)
            on_progress(ProgressUpdate(done, self.frames, 1.0 / self.frame_seconds, "swap", done - done % 2))
        shutil.copyfile(job.target_path, job.output_path)
        return SwapResult(
            Path(job.output_path), self.frames, self.engine, QualityReport(0.8, 0.7, 1), self.frames, {"swap": 0.01}
        )


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Receives heartbeats; replies with what the test sets."""

    def __init__(self) -> None:
        self.heartbeats: list[scheduler_pb2.HeartbeatRequest] = []
        self.drain = False
        self.cancel_task_ids: list[str] = []
        self.run_limits: list[scheduler_pb2.RunLimit] = []  # sent in every reply while set
        self.received = threading.Condition()

    def Heartbeat(self, request: scheduler_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> Any:
        with self.received:
            self.heartbeats.append(request)
            self.received.notify_all()
        cancel, self.cancel_task_ids = self.cancel_task_ids, []
        return scheduler_pb2.HeartbeatResponse(drain=self.drain, cancel_task_ids=cancel, run_limits=self.run_limits)

    def wait_for(self, predicate: Callable[[list[scheduler_pb2.HeartbeatRequest]], bool], timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        with self.received:
            while not predicate(self.heartbeats):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.received.wait(remaining)
        return True


class SessionScheduler(FakeScheduler):
    """The scheduler's side of AgentSession as the contract in docs/agent.md states it: the first
    message must carry a heartbeat; each heartbeat is answered with a `control` (drain, cancels the
    test set, the leader term, and acknowledgements of the outcomes received so far, as the real
    scheduler acknowledges what it recorded); the test sends assignments and controls of its own
    at any time. Unary heartbeats still work (a scheduler serves both)."""

    def __init__(self, leader_term: int = 1) -> None:
        super().__init__()
        self.leader_term = leader_term
        self.messages: list[scheduler_pb2.AgentMessage] = []  # every message received, in order
        self.updates: list[scheduler_pb2.RunUpdate] = []
        self.refusals: list[scheduler_pb2.RunRefusal] = []
        self.violations: list[str] = []
        self.unary_heartbeats = 0
        self.sessions_opened = 0
        self._outgoing: queue.Queue[scheduler_pb2.SchedulerMessage | None] | None = None
        self._recorded: list[types_pb2.RunRef] = []  # outcomes to acknowledge in the next control

    def Heartbeat(self, request: scheduler_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> Any:
        self.unary_heartbeats += 1
        return super().Heartbeat(request, context)

    def AgentSession(self, request_iterator: Iterator[scheduler_pb2.AgentMessage], context: Any) -> Any:
        outgoing: queue.Queue[scheduler_pb2.SchedulerMessage | None] = queue.Queue()
        with self.received:
            self._outgoing = outgoing
            self.sessions_opened += 1
        threading.Thread(target=self._read, args=(request_iterator, outgoing), daemon=True).start()
        while (message := outgoing.get()) is not None:
            yield message

    def _read(self, requests: Iterator[scheduler_pb2.AgentMessage], outgoing: queue.Queue[Any]) -> None:
        first = True
        try:
            for message in requests:
                with self.received:
                    if first and not message.HasField("heartbeat"):
                        self.violations.append("the session's first message carries no heartbeat")
                    first = False
                    self.messages.append(message)
                    self.updates.extend(message.updates)
                    self.refusals.extend(message.refusals)
                    for update in message.updates:
                        if update.progress.state in RUN_ENDED_STATES:
                            self._recorded.append(types_pb2.RunRef(task_id=update.task_id, attempt=update.attempt))
                    if message.HasField("heartbeat"):
                        self.heartbeats.append(message.heartbeat)
                        self._recorded += [
                            types_pb2.RunRef(task_id=run.task_id, attempt=run.attempt)
                            for run in message.heartbeat.runs
                            if run.finished
                        ]
                    self.received.notify_all()
                if message.HasField("heartbeat"):
                    outgoing.put(scheduler_pb2.SchedulerMessage(control=self._control()))
        except grpc.RpcError:
            pass
        finally:
            outgoing.put(None)

    def _control(self) -> scheduler_pb2.HeartbeatResponse:
        with self.received:
            cancel, self.cancel_task_ids = self.cancel_task_ids, []
            recorded, self._recorded = self._recorded, []
        return scheduler_pb2.HeartbeatResponse(
            drain=self.drain, cancel_task_ids=cancel, leader_term=self.leader_term, acknowledged=recorded
        )

    def send(self, message: scheduler_pb2.SchedulerMessage) -> None:
        """Send on the open session, at once (not as a reply)."""
        assert self._outgoing is not None, "no session is open"
        self._outgoing.put(message)

    def assign(self, *requests: agent_pb2.RunTaskRequest) -> None:
        self.send(scheduler_pb2.SchedulerMessage(assignments=requests))

    def updates_of(self, task_id: str) -> list[scheduler_pb2.RunUpdate]:
        with self.received:
            return [update for update in self.updates if update.task_id == task_id]

    def ended(self, task_id: str) -> types_pb2.Progress | None:
        ends = [u.progress for u in self.updates_of(task_id) if u.progress.state in RUN_ENDED_STATES]
        return ends[-1] if ends else None

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10) -> bool:
        return self.wait_for(lambda _beats: condition(), timeout)


def serve_scheduler(servicer: FakeScheduler, address: str = "127.0.0.1:0") -> Any:
    from facefleet.grpc_server import SERVICE_NAMES, build_server

    return build_server(
        address,
        [(SERVICE_NAMES["Scheduler"], lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, s))],
        None,
    )


def journal_outcomes(work_dir: Path) -> dict[str, types_pb2.Progress | None]:
    """An agent's own record, read-only from its run journal file: task id -> outcome (None: going)."""
    with sqlite3.connect(f"file:{work_dir / JOURNAL_FILE}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT task_id, outcome FROM runs").fetchall()
    return {task_id: types_pb2.Progress.FromString(blob) if blob else None for task_id, blob in rows}


def write_image(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return path


@dataclass
class AgentEnv:
    handle: AgentHandle
    stub: agent_pb2_grpc.AgentStub
    pipeline: Any
    data: Path
    work_dir: Path
    checkpoint_root: Path

    def task(self, task_id: str, **overrides: Any) -> types_pb2.Task:
        source = write_image(self.data / f"{task_id}-source.png", 1)
        target = write_image(self.data / f"{task_id}-target.png", 2)
        fields: dict[str, Any] = {
            "id": task_id,
            "project": "demo",
            "sensitivity": types_pb2.SENSITIVITY_PUBLIC,
            "frames": 1,
            "source_uri": source.as_uri(),
            "target_uri": target.as_uri(),
            "output_uri": (self.data / "out" / f"{task_id}.png").as_uri(),
        }
        fields.update(overrides)
        return types_pb2.Task(**fields)

    def request(self, task_id: str, attempt: int = 1, leader_term: int = 1, **task: Any) -> agent_pb2.RunTaskRequest:
        return agent_pb2.RunTaskRequest(task=self.task(task_id, **task), attempt=attempt, leader_term=leader_term)

    def run(self, task: types_pb2.Task, **request: Any) -> list[types_pb2.Progress]:
        return list(self.stub.RunTask(agent_pb2.RunTaskRequest(task=task, **request), timeout=30))


@pytest.fixture
def fake_scheduler() -> Iterator[tuple[FakeScheduler, int]]:
    servicer = FakeScheduler()
    handle = serve_scheduler(servicer)
    yield servicer, handle.port
    handle.stop(0)


@pytest.fixture
def session_scheduler() -> Iterator[tuple[SessionScheduler, int]]:
    servicer = SessionScheduler()
    handle = serve_scheduler(servicer)
    yield servicer, handle.port
    handle.stop(0)


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., AgentEnv]]:
    handles: list[AgentHandle] = []
    channels: list[grpc.Channel] = []

    def make(
        pipeline: Any = None,
        scheduler_port: int | None = None,
        scheduler_ports: tuple[int, ...] = (),
        job_factory: Any = SwapJob,
        name: str = "agent",
        **config: Any,
    ) -> AgentEnv:
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "pool": "onprem-test",
            "trust_zone": "private",
            "slots": 1,
            "work_dir": tmp_path / name / "work",
            "checkpoint_root": tmp_path / "checkpoints",
            "allowed_roots": [data],
            "metrics_port": 0,
            "heartbeat_interval_s": 0.2,
            "models_dir": tmp_path / "models",
        }
        settings.update(config)
        agent_config = AgentConfig(**settings)
        pipeline = pipeline if pipeline is not None else FakePipeline()
        channel_factory = (
            (lambda: grpc.insecure_channel(f"127.0.0.1:{scheduler_port}")) if scheduler_port is not None else None
        )
        handle = serve_agent(
            agent_config,
            None,
            scheduler_channel_factory=channel_factory,
            scheduler_channel_factories=[
                (lambda port=port: grpc.insecure_channel(f"127.0.0.1:{port}")) for port in scheduler_ports
            ],
            pipeline=pipeline,
            job_factory=job_factory,
            gpu_sample_interval_s=0.5,
        )
        handles.append(handle)
        channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
        channels.append(channel)
        return AgentEnv(
            handle,
            agent_pb2_grpc.AgentStub(channel),
            pipeline,
            data,
            agent_config.work_dir,
            agent_config.checkpoint_root,
        )

    yield make
    for channel in channels:
        channel.close()
    for handle in handles:
        handle.stop(0)
