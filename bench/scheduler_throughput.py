"""Scheduler throughput: N submit clients against a real `facefleet scheduler run` with M hollow agents.

Hollow agents (as kubemark's hollow nodes) speak the real Agent contract and heartbeat, but
acknowledge and complete each task instantly, so the figures measure the control plane: intake +
durable group commit (submit -> ack) and placement + dispatch + completion recording (end to end).

    .venv/bin/python bench/scheduler_throughput.py --clients 16 --agents 4 --tasks 4000

Prints one JSON document (machine, date, settings, results) and a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_seconds, machine_facts  # noqa: E402
from facefleet.domain import DISPATCHED, PLACED, RUNNING, SUCCEEDED, TERMINAL  # noqa: E402
from facefleet.long_running import freeze_startup_objects  # noqa: E402
from facefleet.scheduler.store import Change, NewTask, Step, TaskStore, tasks  # noqa: E402
from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2  # noqa: E402
from tests.scheduler.conftest import write_policy  # noqa: E402
from tests.scheduler.fake_agents import HollowAgent  # noqa: E402
from tests.scheduler.scheduler_process import SchedulerProcess, prefetch_env  # noqa: E402


def run_agents(
    address: str,
    count: int,
    slots: int,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
) -> None:
    agents = [
        HollowAgent(
            address,
            f"hollow-{i}",
            "onprem-a" if i % 2 == 0 else "cloud-b",
            "private" if i % 2 == 0 else "cloud",
            slots=slots,
            heartbeat_s=0.5,
        ).start()
        for i in range(count)
    ]
    freeze_startup_objects()  # as `facefleet agent run` does: no full collection stalls a session
    ready.set()
    stop.wait()
    for agent in agents:
        agent.kill()


def fill_history(store_url: str, count: int) -> int:
    """`count` tasks that ran and succeeded, through the store's own writes (each with its four
    transitions and its final progress), as a store that has been in use holds; returns how many
    finished tasks the store holds before the run."""
    store = TaskStore(store_url)
    try:
        for first in range(0, count, 500):
            now = time.time()
            batch = [
                NewTask(
                    types_pb2.Task(
                        project="history",
                        sensitivity=types_pb2.SENSITIVITY_PUBLIC,
                        priority=types_pb2.PRIORITY_NORMAL,
                        frames=1,
                        source_uri="file:///data/face.jpg",
                        target_uri=f"file:///data/h{first + i}.jpg",
                    ),
                    "",
                )
                for i in range(min(500, count - first))
            ]
            store.insert_batch(batch, now)
            done = types_pb2.Progress(state=types_pb2.TASK_STATE_SUCCEEDED, frames_done=1, frames_total=1)
            steps = (
                Step(PLACED, "placed"),
                Step(DISPATCHED, "sent", agent_id="agent-h"),
                Step(RUNNING, "started"),
                Step(SUCCEEDED, "done"),
            )
            store.apply_changes([Change(new.task_id, steps, progress=done) for new in batch], now)
        counts = store.count_by_state()
    finally:
        store.close()
    return sum(counts.get(state, 0) for state in TERMINAL)


def states_since(engine: sa.Engine, since: float) -> dict[str, int]:
    """Tasks submitted at or after `since`, by state: this run's, without counting the history
    (a count over the whole table, polled, would compete with the scheduler for the CPU)."""
    query = sa.select(tasks.c.state, sa.func.count()).where(tasks.c.submitted_at >= since).group_by(tasks.c.state)
    with engine.connect() as conn:
        return {state: int(count) for state, count in conn.execute(query)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--agents", type=int, default=4, help="0 = measure intake only")
    parser.add_argument("--slots", type=int, default=16, help="slots per hollow agent")
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--prefetch", type=int, default=0, help="pools' prefetch: assignments beyond an agent's slots")
    parser.add_argument(
        "--batch", type=int, default=1, help="tasks per call: 1 = SubmitTask, more = SubmitTasks with that many items"
    )
    parser.add_argument("--store", default="", help="store URL (default: SQLite in a temp dir)")
    parser.add_argument(
        "--history", type=int, default=0, help="finished tasks in the store before the clock starts (a store in use)"
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="facefleet-bench-"))
    store_url = args.store or f"sqlite:///{work}/bench.db"
    history = fill_history(store_url, args.history)
    env = prefetch_env({"onprem-a": "private", "cloud-b": "cloud"}, args.prefetch)
    scheduler = SchedulerProcess(
        store_url, write_policy(work / "policy"), work / "scheduler.log", extra_env=env
    ).start()
    spawn = multiprocessing.get_context("spawn")  # not fork: a child forked after gRPC started may hang in it
    ready, stop = spawn.Event(), spawn.Event()
    agents = spawn.Process(target=run_agents, args=(scheduler.address, args.agents, args.slots, ready, stop))
    agents.start()
    if not ready.wait(60):
        sys.exit(
            "error: the hollow agents did not start within 60 s\n"
            f"hint: check that the scheduler is up (its log: {work / 'scheduler.log'}) and try fewer --agents"
        )
    time.sleep(1.5)  # first heartbeats

    latencies: list[float] = []
    errors: list[str] = []
    per_client = args.tasks // args.clients
    sensitivities = (types_pb2.SENSITIVITY_PUBLIC, types_pb2.SENSITIVITY_PRIVATE)

    def task(n: int, i: int) -> types_pb2.Task:
        return types_pb2.Task(
            project=f"bench-{n % 4}",
            sensitivity=sensitivities[i % 2],
            priority=1 + i % 4,  # type: ignore[arg-type]
            frames=1,
            source_uri="file:///data/face.jpg",
            target_uri=f"file:///data/t{n}-{i}.jpg",
        )

    async def client(n: int, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        for first in range(0, per_client, args.batch):
            items = [
                scheduler_pb2.SubmitTaskRequest(task=task(n, i))
                for i in range(first, min(per_client, first + args.batch))
            ]
            started = time.perf_counter()
            try:
                if args.batch == 1:
                    await stub.SubmitTask(items[0], timeout=30)
                    outcomes = ["submitted"]
                else:
                    reply = await stub.SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=items), timeout=30)
                    outcomes = [result.WhichOneof("outcome") for result in reply.results]
            except grpc.RpcError as error:
                errors.extend([str(error.code())] * len(items))
                continue
            elapsed = time.perf_counter() - started
            latencies.extend(elapsed for outcome in outcomes if outcome == "submitted")
            errors.extend(str(outcome) for outcome in outcomes if outcome != "submitted")

    async def drive() -> None:
        # Asyncio clients: cheap on CPU, so the figures are the scheduler's, not the client's.
        async with grpc.aio.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            await asyncio.gather(*(client(n, stub) for n in range(args.clients)))

    assert scheduler.process is not None
    cpu_start = cpu_seconds(scheduler.process.pid)
    submit_start = time.perf_counter()
    clock_started_at = time.time()
    asyncio.run(drive())
    submit_s = time.perf_counter() - submit_start
    submit_cpu = cpu_seconds(scheduler.process.pid) - cpu_start

    reader = sa.create_engine(store_url)  # plain reads: the store's own write engine would lock out its writer
    accepted = len(latencies)
    deadline = time.monotonic() + (600 if args.agents else 0)  # no agents: intake only
    while time.monotonic() < deadline:
        counts = states_since(reader, clock_started_at)
        if sum(counts.get(state, 0) for state in TERMINAL) >= accepted:
            break
        time.sleep(0.2)
    end_to_end_s = time.perf_counter() - submit_start
    total_cpu = cpu_seconds(scheduler.process.pid) - cpu_start
    counts = states_since(reader, clock_started_at)
    reader.dispose()
    stop.set()
    agents.join(timeout=10)
    scheduler.stop()

    result: dict[str, Any] = {
        "benchmark": "scheduler_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "settings": {
            "clients": args.clients,
            "agents": args.agents,
            "slots_per_agent": args.slots,
            "tasks": args.tasks,
            "prefetch": args.prefetch,
            "tasks_per_submit_call": args.batch,
            "history": history,
            "store": "sqlite (WAL, synchronous=FULL, group commit)" if not args.store else args.store.split("://")[0],
        },
        "results": {
            "accepted": accepted,
            "errors": len(errors),
            "submit_tasks_per_s": round(accepted / submit_s, 1),
            "submit_latency_ms": {
                "p50": round(percentile(latencies, 0.50) * 1000, 2),
                "p99": round(percentile(latencies, 0.99) * 1000, 2),
                "mean": round(statistics.fmean(latencies) * 1000, 2),
            },
            "scheduler_cpu_ms_per_submit": round(1000 * submit_cpu / max(1, accepted), 3),
            "scheduler_cpu_ms_per_task_end_to_end": round(1000 * total_cpu / max(1, accepted), 3)
            if args.agents
            else None,
            "end_to_end_tasks_per_s": round(accepted / end_to_end_s, 1) if args.agents else None,
            "end_to_end_s": round(end_to_end_s, 2) if args.agents else None,
            "final_states": counts,
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    r = result["results"]
    print(
        f"scheduler_throughput: {r['submit_tasks_per_s']} submits/s (p50 {r['submit_latency_ms']['p50']} ms, "
        f"p99 {r['submit_latency_ms']['p99']} ms, {r['scheduler_cpu_ms_per_submit']} ms scheduler CPU each), "
        f"{r['end_to_end_tasks_per_s']} tasks/s submit->succeeded "
        f"({r['scheduler_cpu_ms_per_task_end_to_end']} ms CPU each), "
        f"{args.clients} clients x {args.batch} tasks per call, {args.agents} hollow agents, "
        f"{accepted} tasks, {len(errors)} errors"
    )


if __name__ == "__main__":
    main()
