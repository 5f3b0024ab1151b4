"""Runs waiting for a slot (prefetch), as a property: for any sequence of assignments, cancels and
finishing runs, the agent never runs more than its slots nor holds more than `max_waiting` waiting,
starts waiting runs oldest first, never starts a cancelled waiting run, and every accepted run ends
exactly once — in its journal and in the updates its session gets."""

from __future__ import annotations

import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from facefleet.agent.inputs import InputResolver
from facefleet.agent.pipeline.quality import QualityReport
from facefleet.agent.pipeline.runner import SwapResult
from facefleet.agent.run_journal import RUN_ENDED_STATES
from facefleet.agent.server import WAITING_STAGE, AgentIdentity, AgentRuntime
from facefleet.v1 import agent_pb2, types_pb2
from tests.agent.conftest import FakePipelineError, journal_outcomes, write_image

SLOTS, MAX_WAITING = 2, 2


class HeldPipeline:
    """Every run holds until `release(task_id)`; a cancel stops it at once."""

    engine = "held"

    def __init__(self) -> None:
        self.execution_providers = ["CPUExecutionProvider"]
        self.models: list[Any] = []
        self.calls: list[str] = []
        self.gates: dict[str, threading.Event] = {}

    def release(self, task_id: str) -> None:
        self.gates.setdefault(task_id, threading.Event()).set()

    def run(self, job: Any, on_progress: Callable[[Any], None], cancelled: threading.Event) -> SwapResult:
        self.calls.append(job.task_id)
        gate = self.gates.setdefault(job.task_id, threading.Event())
        while not gate.wait(0.005):
            if cancelled.is_set():
                raise FakePipelineError("cancelled", "CANCELLED")
        Path(job.output_path).write_bytes(b"swapped")
        return SwapResult(Path(job.output_path), 1, self.engine, QualityReport(0.9, 0.9, 1), 1, {})


class Model:
    """What the agent should hold: runs started (in order), running, waiting (FIFO)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running: set[str] = set()
        self.waiting: deque[str] = deque()
        self.cancelled_waiting: set[str] = set()

    def free_slot(self, task_id: str) -> None:
        self.running.discard(task_id)
        if self.waiting:
            self.start(self.waiting.popleft())

    def start(self, task_id: str) -> None:
        self.started.append(task_id)
        self.running.add(task_id)


def settle(runtime: AgentRuntime, pipeline: HeldPipeline, model: Model) -> None:
    deadline = time.monotonic() + 10
    expected = sorted(model.running | set(model.waiting))
    while time.monotonic() < deadline:
        if (
            pipeline.calls == model.started
            and runtime.running_task_ids() == expected
            and runtime.waiting_task_ids() == list(model.waiting)
        ):
            return
        time.sleep(0.005)
    raise AssertionError(
        f"agent holds {runtime.running_task_ids()} (waiting {runtime.waiting_task_ids()}), ran {pipeline.calls}; "
        f"expected {expected} (waiting {list(model.waiting)}), ran {model.started}"
    )


steps = st.lists(
    st.tuples(st.sampled_from(["assign", "assign", "cancel", "finish"]), st.integers(0, 7)), min_size=1, max_size=14
)


@settings(max_examples=25, deadline=None)
@given(steps)
def test_waiting_runs_keep_the_bounds_start_in_order_and_end_once(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        source = write_image(data / "source.png", 1).as_uri()
        target = write_image(data / "target.png", 2).as_uri()
        pipeline = HeldPipeline()
        identity = AgentIdentity("agent-1", "aws-a", "cloud", "aws", "r", "127.0.0.1:1")
        runtime = AgentRuntime(
            identity,
            pipeline,
            InputResolver([data], 2**20),
            root / "work",
            root / "checkpoints",
            SLOTS,
            max_waiting=MAX_WAITING,
        )
        model, accepted, serial = Model(), [], 0
        updates: dict[str, list[types_pb2.Progress]] = {}
        finished: set[str] = set()
        try:
            for op, pick in ops:
                if op == "assign":
                    serial += 1
                    task_id = f"t{serial}"
                    request = agent_pb2.RunTaskRequest(
                        task=types_pb2.Task(
                            id=task_id,
                            project="p",
                            sensitivity=types_pb2.SENSITIVITY_PUBLIC,
                            frames=1,
                            source_uri=source,
                            target_uri=target,
                            output_uri=(data / f"{task_id}.png").as_uri(),
                        ),
                        attempt=1,
                        leader_term=1,
                    )
                    refusal = runtime.assign(request, updates.setdefault(task_id, []).append)
                    full = len(model.running) >= SLOTS and len(model.waiting) >= MAX_WAITING
                    assert (refusal is not None) == full
                    if refusal is not None:
                        assert refusal.retry and refusal.error.reason == types_pb2.NO_CAPACITY
                        del updates[task_id]
                        continue
                    accepted.append(task_id)
                    if len(model.running) < SLOTS:
                        model.start(task_id)
                    else:
                        model.waiting.append(task_id)
                elif accepted and op == "cancel":
                    task_id = accepted[pick % len(accepted)]
                    runtime.cancel_runs([task_id], "recalled")
                    if task_id in model.waiting:
                        model.waiting.remove(task_id)
                        model.cancelled_waiting.add(task_id)
                    elif task_id in model.running:
                        model.free_slot(task_id)
                elif model.running and op == "finish":
                    task_id = sorted(model.running)[pick % len(model.running)]
                    pipeline.release(task_id)
                    finished.add(task_id)
                    model.free_slot(task_id)
                settle(runtime, pipeline, model)
                assert len(runtime.running_task_ids()) - len(runtime.waiting_task_ids()) <= SLOTS
                assert len(runtime.waiting_task_ids()) <= MAX_WAITING
            runtime.cancel_runs(accepted, "end of the example")
            assert runtime.wait_idle(10)
        finally:
            runtime.cancel_runs(runtime.running_task_ids(), "end of the example")
            runtime.wait_idle(10)
            runtime.journal.close()
        assert not set(pipeline.calls) & model.cancelled_waiting  # a recalled waiting run never started
        recorded = journal_outcomes(root / "work")
        assert sorted(recorded) == sorted(accepted)
        for task_id in accepted:
            outcome = recorded[task_id]
            assert outcome is not None
            ends = [p for p in updates[task_id] if p.state in RUN_ENDED_STATES]
            assert ends == [outcome] and updates[task_id][0].state == types_pb2.TASK_STATE_RUNNING
            if task_id in finished:
                assert outcome.state == types_pb2.TASK_STATE_SUCCEEDED
            else:
                assert outcome.state == types_pb2.TASK_STATE_CANCELLED
            if task_id not in pipeline.calls:
                assert outcome.stage == WAITING_STAGE and "before it started" in outcome.message
