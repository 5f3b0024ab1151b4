"""facefleet vs Celery + Redis on the same routing workload, same machine, same run.

The workload: N tasks, half private and half public; private work must start on on-prem workers,
public work on cloud workers. Each side gets the same number of execution slots per group.

(a) facefleet: a real `facefleet scheduler run` subprocess (SQLite WAL, synchronous=FULL, group
    commit; every task validated, stored durably before its id is returned, placed by the real
    policy engine with its decision trace recorded, dispatched over gRPC) and two hollow agents
    (one private pool, one cloud pool; `--slots` slots each) that record when each RunTask
    arrives and finish at once. With `--payload-kib K` every task carries K KiB of input: the
    client writes it to a file and submits its URI (the facefleet way: large data goes in URIs),
    the agent reads the file before it reports the task started.
(b) Celery + Redis (`bench/celery_side.py`): Redis with appendfsync always, acks_late, prefetch 1,
    two prefork worker groups with `--slots` processes each; the payload travels in the message.

Reported per side: throughput (tasks/s, first submit -> last start), submit->start p50/p99 and the
facefleet/Celery throughput ratio. Prints JSON (machine, settings of both sides) + one summary line.

`--batch N` sends facefleet's tasks N per `SubmitTasks` call (1 = one `SubmitTask` each; Celery's
client has no bulk send and publishes one message per task either way). `--stream` sends each of
facefleet's clients' tasks as messages on one `SubmitStream` (as Celery's client publishes on one
open broker connection) instead of a call per task. `--rate R` offers both sides
the same open-loop load, R tasks/s, for a submit->start comparison that is not a backlog: by default
each side's clients submit as fast as they can, so a side whose intake outruns its workers builds a
queue whose wait is most of its p50 (docs/benchmarks.md). `--warmup N` (default 50) runs N tasks
through each side before its clock starts, so neither side's cold start (first connections, first
SQL statements and placements, worker imports) lands in the measured tail.

    .venv/bin/python bench/compare_celery.py --tasks 2000 --slots 4 --payload-kib 0,64 [--repeat 3]

On a shared machine both sides drift between runs (Celery moved 388 to 794 tasks/s in one day here):
`--repeat N` alternates N pairs per payload and reports the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import (
    context_switches,
    cpu_seconds,
    host_cpu_times,
    machine_facts,
    percentiles,
    steal_share,
    system_cpu_seconds,
)
from facefleet.long_running import freeze_startup_objects
from facefleet.scheduler.store import TaskStore
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.scheduler.conftest import write_policy
from tests.scheduler.fake_agents import HollowAgent
from tests.scheduler.scheduler_process import SchedulerProcess, prefetch_env

# private -> on-prem pool (trust zone private), public -> cloud pool: the rule set the tests use.
GROUPS = (("onprem-a", "private"), ("cloud-b", "cloud"))
ROUTING_SQL = "SELECT sensitivity, pool, count(*) FROM tasks GROUP BY sensitivity, pool"


class TimedHollowAgent(HollowAgent):
    """A hollow agent that notes when each task starts and reads its input (if a file)."""

    def __init__(self, *args: Any, starts: dict[str, float], lock: threading.Lock, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.starts = starts
        self.starts_lock = lock

    def on_start(self, task: types_pb2.Task) -> None:
        """A run starts (a prefetched one when a slot frees, not when it arrives)."""
        if task.target_uri.startswith("file://") and "/payload/" in task.target_uri:
            Path(task.target_uri.removeprefix("file://")).read_bytes()
        with self.starts_lock:
            self.starts.setdefault(task.id, time.time())


def run_agents(address: str, slots: int, pipe: multiprocessing.connection.Connection) -> None:
    """Child process: two timed hollow agents; sends their start times when told to stop."""
    starts: dict[str, float] = {}
    lock = threading.Lock()
    agents = [
        TimedHollowAgent(
            address, f"hollow-{pool}", pool, zone, slots=slots, heartbeat_s=0.2, starts=starts, lock=lock
        ).start()
        for pool, zone in GROUPS
    ]
    freeze_startup_objects()  # as `facefleet agent run` does: no full collection stalls a session
    while not pipe.poll(0.05):
        with lock:
            count = len(starts)
        pipe.send(("count", count))
    pipe.recv()
    for agent in agents:
        agent.kill()
    with lock:
        pipe.send(("starts", dict(starts)))


def warm_up(address: str, requests: list[bytes], pipe: multiprocessing.connection.Connection) -> int:
    """Run `requests` through before the clock starts (first connections, first statements, first
    placements: a cold start the measured tasks should not pay); returns how many started."""
    with grpc.insecure_channel(address) as channel:
        submit = channel.unary_unary(
            "/facefleet.v1.Scheduler/SubmitTask",
            request_serializer=None,
            response_deserializer=scheduler_pb2.SubmitTaskResponse.FromString,
        )
        for raw in requests:
            submit(raw, timeout=60)
    deadline, count = time.time() + 60, 0
    while count < len(requests) and time.time() < deadline:
        _kind, count = pipe.recv()
    return count


def stream_request(seq: int, raw: bytes) -> bytes:
    """A SubmitStreamRequest around an already serialized SubmitTaskRequest (field 2)."""
    request = scheduler_pb2.SubmitStreamRequest(seq=seq)
    request.submit.MergeFromString(raw)
    return request.SerializeToString()


def batch_request(items: list[bytes]) -> bytes:
    """A SubmitTasksRequest of already serialized SubmitTaskRequests (field 1, repeated)."""
    request = scheduler_pb2.SubmitTasksRequest()
    for raw in items:
        request.items.add().MergeFromString(raw)
    return request.SerializeToString()


def run_facefleet(
    tasks: int,
    slots: int,
    payload_bytes: int,
    clients: int,
    prefetch: int = 0,
    batch: int = 1,
    rate: float = 0.0,
    warmup: int = 0,
    stream: bool = False,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ff-compare-"))
    store_url = f"sqlite:///{work}/bench.db"
    env = prefetch_env(dict(GROUPS), prefetch)
    scheduler = SchedulerProcess(
        store_url, write_policy(work / "policy"), work / "scheduler.log", extra_env=env
    ).start()
    # spawn, not fork: this process already uses grpc (waiting for the scheduler), and a forked
    # child can deadlock in grpc.server().
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    agents = spawn.Process(target=run_agents, args=(scheduler.address, slots, child), daemon=True)
    agents.start()
    requests: list[bytes] = []
    (work / "payload").mkdir()
    for i in range(tasks):
        target = f"file:///data/t{i}.jpg"
        if payload_bytes:
            path = work / "payload" / f"t{i}.bin"
            path.write_bytes(b"p" * payload_bytes)
            target = f"file://{path}"
        task = types_pb2.Task(
            project="bench",
            sensitivity=types_pb2.SENSITIVITY_PRIVATE if i % 2 == 0 else types_pb2.SENSITIVITY_PUBLIC,
            priority=types_pb2.PRIORITY_NORMAL,
            frames=1,
            source_uri="file:///data/face.jpg",
            target_uri=target,
        )
        requests.append(scheduler_pb2.SubmitTaskRequest(task=task).SerializeToString())
    if payload_bytes:
        # The inputs are at rest before the clock starts: 2,000 x 64 KiB left dirty were written
        # back during one run and its commits' fsyncs stalled for seconds (2026-12-04, docs/benchmarks.md).
        os.sync()
    time.sleep(1.0)  # first heartbeats: both pools known before the clock starts
    warmed = warm_up(scheduler.address, requests[:warmup], parent) if warmup else 0
    submitted: dict[str, float] = {}
    errors: list[str] = []

    calls = requests if batch == 1 else [batch_request(requests[at : at + batch]) for at in range(0, tasks, batch)]

    async def drive() -> None:
        async with grpc.aio.insecure_channel(scheduler.address) as channel:
            method = "SubmitTask" if batch == 1 else "SubmitTasks"
            reply_class = scheduler_pb2.SubmitTaskResponse if batch == 1 else scheduler_pb2.SubmitTasksResponse
            submit = channel.unary_unary(
                f"/facefleet.v1.Scheduler/{method}",
                request_serializer=None,
                response_deserializer=reply_class.FromString,
            )
            pending = iter(enumerate(calls))
            begin = time.time()

            async def stream_client() -> None:
                """One SubmitStream per client: each task a message on it, its answer awaited."""
                call = channel.stream_stream(
                    "/facefleet.v1.Scheduler/SubmitStream",
                    request_serializer=None,
                    response_deserializer=scheduler_pb2.SubmitStreamResponse.FromString,
                )(timeout=600)
                for index, raw in pending:
                    if rate > 0:
                        await asyncio.sleep(max(0.0, begin + index / rate - time.time()))
                    at = time.time()
                    await call.write(stream_request(index, raw))
                    reply = await call.read()
                    if reply.result.HasField("submitted"):
                        submitted[reply.result.submitted.task_id] = at
                    else:
                        errors.append(reply.result.error.message)
                await call.done_writing()

            async def client() -> None:
                for index, raw in pending:
                    if rate > 0:  # open loop: call `index` is due at begin + its first task's index / rate
                        await asyncio.sleep(max(0.0, begin + index * batch / rate - time.time()))
                    at = time.time()
                    try:
                        reply = await submit(raw, timeout=60)
                    except grpc.RpcError as error:
                        errors.append(str(error.code()))
                        continue
                    for outcome in reply.results if batch > 1 else [reply]:
                        if batch > 1 and not outcome.HasField("submitted"):
                            errors.append(outcome.error.message)
                            continue
                        submitted[(outcome.submitted if batch > 1 else outcome).task_id] = at

            await asyncio.gather(*((stream_client if stream else client)() for _ in range(clients)))

    assert scheduler.process is not None
    pid = scheduler.process.pid
    cpu_before, kernel_before, switches_before = cpu_seconds(pid), system_cpu_seconds(pid), context_switches(pid)
    started = time.time()
    asyncio.run(drive())
    submit_done = time.time()
    deadline = started + 600
    count = 0
    while count < warmed + len(submitted) and time.time() < deadline:
        kind, count = parent.recv()
    cpu = cpu_seconds(pid) - cpu_before
    kernel = system_cpu_seconds(pid) - kernel_before
    switches = context_switches(pid) - switches_before
    parent.send("stop")
    while True:
        kind, value = parent.recv()
        if kind == "starts":
            starts: dict[str, float] = value
            break
    agents.join(timeout=10)
    reader = TaskStore(store_url)
    final_states = reader.count_by_state()
    reader.close()
    scheduler.stop()
    with sqlite3.connect(work / "bench.db") as db:
        routed = {f"{sensitivity}->{pool}": count for sensitivity, pool, count in db.execute(ROUTING_SQL)}
    latencies = [starts[task_id] - at for task_id, at in submitted.items() if task_id in starts]
    finished = max(starts.values()) if starts else time.time()
    return {
        "tasks": tasks,
        "accepted": len(submitted),
        "started": len(latencies),
        "errors": len(errors),
        "throughput_tasks_per_s": round(len(latencies) / (finished - started), 1),
        "submit_rate_tasks_per_s": round(len(submitted) / (submit_done - started), 1),
        "submit_to_start": percentiles(latencies),
        # Where the scheduler's time goes (one process, one GIL): CPU per task, its kernel share
        # and thread context switches per task (live threads only).
        "scheduler_cpu_ms_per_task": round(cpu / max(len(submitted), 1) * 1e3, 2),
        "scheduler_kernel_share": round(kernel / cpu, 2) if cpu else 0.0,
        "scheduler_context_switches_per_task": round(switches / max(len(submitted), 1), 1),
        "final_states": final_states,
        "routing": routed,  # sensitivity -> pool it ran on: private must only show onprem-a
        "settings": {
            "store": "sqlite WAL, synchronous=FULL, group commit (id returned only after fsync)",
            "placement": "real policy engine, decision trace stored per task",
            "agents": {pool: slots for pool, _zone in GROUPS},
            "prefetch": prefetch,
            "clients": clients,
            "tasks_per_submit_call": batch,
            "submit_api": "SubmitStream, one per client" if stream else "SubmitTask" if batch == 1 else "SubmitTasks",
            "offered_rate_tasks_per_s": rate or "as fast as the clients submit",
            "warmup_tasks": warmup,
            "payload": f"{payload_bytes} bytes in a file, passed by URI, read by the agent"
            if payload_bytes
            else "none",
        },
    }


def spin() -> None:
    """A busy CPU (`--busy-cores`): runs until the bench ends it."""
    while True:
        pass


def run_pair(args: argparse.Namespace, sizes: list[int]) -> list[dict[str, Any]]:
    """One round: facefleet, then Celery, at each payload size."""
    from bench.celery_side import run_celery  # needs celery + redis-server; imported late for --help

    runs = []
    for kib in sizes:
        before = host_cpu_times()
        ours = run_facefleet(
            args.tasks,
            args.slots,
            kib * 1024,
            args.clients,
            args.prefetch,
            args.batch,
            args.rate,
            args.warmup,
            args.stream,
        )
        between = host_cpu_times()
        ours["host_steal_share"] = steal_share(before, between)
        theirs = run_celery(args.tasks, args.slots, kib * 1024, private_share=0.5, rate=args.rate, warmup=args.warmup)
        theirs["host_steal_share"] = steal_share(between, host_cpu_times())
        ratio = ours["throughput_tasks_per_s"] / max(theirs["throughput_tasks_per_s"], 1e-9)
        runs.append({"payload_kib": kib, "facefleet": ours, "celery": theirs, "ratio": round(ratio, 2)})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=4, help="facefleet slots per agent = Celery processes per group")
    parser.add_argument("--payload-kib", default="0,64", help="comma-separated payload sizes (KiB), one run each")
    parser.add_argument("--clients", type=int, default=16, help="concurrent facefleet submit clients")
    parser.add_argument(
        "--prefetch", type=int, default=0, help="facefleet pools' prefetch (assignments per agent beyond its slots)"
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="facefleet tasks per submit call (1 = SubmitTask, more = SubmitTasks)"
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="facefleet's clients submit over one SubmitStream each (a message per task) instead of a call per task",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered load for both sides, tasks/s (open loop); 0 = each side's clients submit as fast as they can",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="tasks run through each side before its clock starts (not measured; 0 = measure a cold start)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="pairs per payload (alternated); report the median ratio")
    parser.add_argument(
        "--busy-cores",
        type=int,
        default=0,
        help="processes that spin on the CPU for the whole run: contention both sides meet alike, "
        "and that can be repeated (the host's steal cannot)",
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.stream and args.batch != 1:
        parser.error("--stream sends one task per message; drop --batch")

    runs = []
    sizes = [int(size) for size in args.payload_kib.split(",")]
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(max(0, args.busy_cores))]
    for spinner in spinners:
        spinner.start()
    try:
        for _round in range(max(1, args.repeat)):  # rounds alternate the sides, so drift hits both
            runs.extend(run_pair(args, sizes))
    finally:
        for spinner in spinners:
            spinner.terminate()
    median_ratio = {
        str(kib): round(statistics.median(run["ratio"] for run in runs if run["payload_kib"] == kib), 2)
        for kib in sizes
    }
    report = {
        "benchmark": "compare_celery",
        "machine": machine_facts(),
        "settings": {
            "tasks": args.tasks,
            "slots_per_group": args.slots,
            "prefetch": args.prefetch,
            "facefleet_tasks_per_submit_call": args.batch,
            "facefleet_submit_stream": args.stream,
            "offered_rate_tasks_per_s": args.rate,
            "warmup_tasks_per_side": args.warmup,
            "private_share": 0.5,
            "repeat": args.repeat,
            "busy_cores": args.busy_cores,
        },
        "runs": runs,
        "median_ratio_by_payload_kib": median_ratio,
        "target": "issue #15: median ratio >= 1.5 at 0 KiB and >= 2 at 64 KiB; facefleet p50 <= Celery's",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    medians = ", ".join(f"{kib} KiB {ratio}x" for kib, ratio in median_ratio.items())
    at_or_below = sum(
        1 for run in runs if run["facefleet"]["submit_to_start"]["p50_ms"] <= run["celery"]["submit_to_start"]["p50_ms"]
    )
    paced = f"offered {args.rate:g} tasks/s" if args.rate else "as fast as clients submit"
    tail = (
        f" ({args.tasks} tasks, {args.slots} slots per group, prefetch {args.prefetch}, "
        f"{'SubmitStream' if args.stream else f'{args.batch} tasks per facefleet call'}, {paced}"
        f"{f', {args.busy_cores} busy cores' if args.busy_cores else ''}; "
        f"median ratio {medians}; facefleet p50 <= Celery's in {at_or_below} of {len(runs)} pairs)"
    )
    print("compare_celery: " + "; ".join(summary_line(run) for run in runs) + tail)


def summary_line(run: dict[str, Any]) -> str:
    ours, theirs = run["facefleet"], run["celery"]
    return (
        f"{run['payload_kib']} KiB: facefleet {ours['throughput_tasks_per_s']} tasks/s "
        f"(p50 {ours['submit_to_start']['p50_ms']} ms, p99 {ours['submit_to_start']['p99_ms']} ms, "
        f"{ours['scheduler_cpu_ms_per_task']} ms scheduler CPU per task{_steal(ours)}) "
        f"vs celery {theirs['throughput_tasks_per_s']} tasks/s "
        f"(p50 {theirs['submit_to_start']['p50_ms']} ms, p99 {theirs['submit_to_start']['p99_ms']} ms{_steal(theirs)}) "
        f"= {run['ratio']}x"
    )


def _steal(side: dict[str, Any]) -> str:
    share = side.get("host_steal_share")
    return "" if share is None else f", host steal {share:.0%}"


if __name__ == "__main__":
    main()
