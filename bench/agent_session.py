"""What one real agent costs per task: its CPU and threads, fed over its AgentSession or over RunTask.

The agent is a real process (`tests/scheduler/agent_process.py`: `serve_agent` with mTLS, the run
journal with `synchronous=FULL`; only the swap is instant). This bench plays the scheduler: the
`SessionScheduler` double from the agent tests, which assigns in batches over the session and keeps
`--window` assignments outstanding (`session`), or, as a scheduler without sessions would, one
`RunTask` stream per task with `--window` streams at once while the agent heartbeats (`runtask`).

    .venv/bin/python bench/agent_session.py --tasks 3000 --slots 64 --window 64

Prints one JSON document (machine, date, settings, results) and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_seconds, machine_facts, percentiles  # noqa: E402
from facefleet.agent.run_journal import RUN_ENDED_STATES  # noqa: E402
from facefleet.config import TLSConfig  # noqa: E402
from facefleet.grpc_server import SERVICE_NAMES, build_server  # noqa: E402
from facefleet.security import certs  # noqa: E402
from facefleet.security.tls import secure_channel, server_credentials  # noqa: E402
from facefleet.v1 import agent_pb2, agent_pb2_grpc, scheduler_pb2_grpc, types_pb2  # noqa: E402
from tests.agent.conftest import FakeScheduler, SessionScheduler, write_image  # noqa: E402
from tests.scheduler.agent_process import AgentProcess  # noqa: E402


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


class Sampler:
    """The agent's thread count, sampled every 50 ms: the peak while tasks flow."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, threads_of(self.pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def requests(data: Path, count: int) -> list[agent_pb2.RunTaskRequest]:
    source = write_image(data / "source.png", 1).as_uri()
    target = write_image(data / "target.png", 2).as_uri()
    (data / "out").mkdir(exist_ok=True)
    return [
        agent_pb2.RunTaskRequest(
            task=types_pb2.Task(
                id=f"t{n:06d}",
                project="bench",
                sensitivity=types_pb2.SENSITIVITY_PUBLIC,
                frames=1,
                source_uri=source,
                target_uri=target,
                output_uri=(data / "out" / f"t{n:06d}.png").as_uri(),
            ),
            attempt=1,
            leader_term=1,
        )
        for n in range(count)
    ]


def grew(items: list[Any], past: int) -> bool:
    return len(items) > past


def feed_session(scheduler: SessionScheduler, work: list[agent_pb2.RunTaskRequest], window: int) -> list[float]:
    """Assign in batches, keeping `window` outstanding, until every run has ended; returns each
    task's seconds from its assignment being sent to its first update (RUNNING) arriving."""
    seen = ended = sent = 0
    assigned_at: dict[str, float] = {}
    answered_s: dict[str, float] = {}
    while ended < len(work):
        batch = work[sent : sent + max(0, window - (sent - ended))]
        if batch:
            now = time.perf_counter()
            assigned_at.update((request.task.id, now) for request in batch)
            scheduler.assign(*batch)
            sent += len(batch)
        with scheduler.received:
            scheduler.received.wait_for(partial(grew, scheduler.updates, seen), timeout=30)
            fresh, seen = scheduler.updates[seen:], len(scheduler.updates)
        now = time.perf_counter()
        for update in fresh:
            answered_s.setdefault(update.task_id, now - assigned_at[update.task_id])
        ended += sum(1 for update in fresh if update.progress.state in RUN_ENDED_STATES)
    assert not scheduler.refusals, scheduler.refusals[:3]
    return list(answered_s.values())


def feed_runtask(stub: agent_pb2_grpc.AgentStub, work: list[agent_pb2.RunTaskRequest], window: int) -> None:
    def run(request: agent_pb2.RunTaskRequest) -> int:
        return list(stub.RunTask(request, timeout=60))[-1].state

    with ThreadPoolExecutor(window) as pool:
        states = list(pool.map(run, work))
    assert all(state == types_pb2.TASK_STATE_SUCCEEDED for state in states)


def measure(mode: str, tasks: int, slots: int, window: int, root: Path, tls: TLSConfig) -> dict[str, Any]:
    scheduler = SessionScheduler() if mode == "session" else FakeScheduler()
    server = build_server(
        "127.0.0.1:0",
        [(SERVICE_NAMES["Scheduler"], lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, s))],
        server_credentials(tls, "scheduler"),
    )
    root.mkdir(parents=True)
    agent = AgentProcess(f"bench-{mode}", "onprem-a", "private", f"127.0.0.1:{server.port}", tls.dir, root)
    agent.args += ["--slots", str(slots)]
    agent.start()
    try:
        assert scheduler.wait_for(lambda beats: len(beats) >= 1, timeout=60), "the agent never heartbeat"
        work = requests(root / "data", tasks)
        pid = agent.process.pid  # type: ignore[union-attr]
        idle_threads = threads_of(pid)
        cpu_before, started = cpu_seconds(pid), time.perf_counter()
        with Sampler(pid) as sampler:
            if mode == "session":
                answered = feed_session(scheduler, work, window)  # type: ignore[arg-type]
            else:
                answered = []
                port = int(re.search(r"serving on (\d+)", agent.log.read_text()).group(1))  # type: ignore[union-attr]
                channel = secure_channel(f"127.0.0.1:{port}", tls, "scheduler")
                feed_runtask(agent_pb2_grpc.AgentStub(channel), work, window)
                channel.close()
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu_before
        return {
            "mode": mode,
            "tasks_per_s": round(tasks / elapsed, 1),
            "agent_cpu_ms_per_task": round(cpu / tasks * 1e3, 3),
            "agent_threads_idle": idle_threads,
            "agent_threads_peak": sampler.peak,
            "messages_from_agent": len(getattr(scheduler, "messages", [])) or None,
            "assignment_to_running": percentiles(answered) if answered else None,
        }
    finally:
        agent.stop()
        server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--window", type=int, default=64, help="assignments / streams outstanding at once")
    parser.add_argument("--modes", default="session,runtask")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="facefleet-agent-bench-") as tmp:
        root = Path(tmp)
        certs.init_demo_pki(root / "pki")
        tls = TLSConfig(dir=root / "pki")
        for mode in args.modes.split(","):
            results.append(measure(mode, args.tasks, args.slots, args.window, root / mode, tls))
    report = {
        "machine": machine_facts(),
        "settings": {"tasks": args.tasks, "slots": args.slots, "window": args.window},
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    print(
        "agent_session: "
        + "; ".join(
            f"{r['mode']} {r['tasks_per_s']} tasks/s, {r['agent_cpu_ms_per_task']} ms agent CPU/task, "
            f"{r['agent_threads_peak']} threads peak"
            for r in results
        )
    )


if __name__ == "__main__":
    main()
