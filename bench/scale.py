"""How costs grow: placement vs rules and pools, a scheduler holding 100k queued tasks, 10->1,000 agents.

Parts (each bounded to about two minutes at the defaults; flags shrink them):
  placement  `place()` latency vs rules (10 -> 10,000 at 200 pools) and pools (10 -> 1,000 at
             1,000 rules), the same generators as bench/placement.py (cold rule memo).
  queue      a real `facefleet scheduler run` on a SQLite store pre-filled with `--queued` queued
             tasks and no agents: its RSS, and latency of SubmitTask, GetTask and ListTasks
             (first page, filtered by project, filtered by state) against that store.
  agents     a real scheduler and 10 -> 1,000 hollow agents heartbeating over gRPC from one
             asyncio process (each agent every `--heartbeat-s`): heartbeat RPC latency, the
             scheduler's CPU share under that load, and a dry-run placement (Explain) through
             the live world those agents make up.

    .venv/bin/python bench/scale.py [--parts placement,queue,agents] [--queued 100000] [--agents 10,100,1000]
Prints JSON (machine, date, settings, figures) and a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_seconds, machine_facts, percentiles
from bench.placement import make_rules, make_tasks, make_world, measure
from facefleet.domain import QUEUED
from facefleet.scheduler.store import NewTask, TaskStore
from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.scheduler.conftest import write_policy
from tests.scheduler.scheduler_process import SchedulerProcess

FILL_BATCH = 2000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


def sample_task(i: int) -> types_pb2.Task:
    return types_pb2.Task(
        project=f"proj-{i % 50}",
        sensitivity=types_pb2.SENSITIVITY_PRIVATE if i % 2 == 0 else types_pb2.SENSITIVITY_PUBLIC,
        priority=1 + i % 4,  # type: ignore[arg-type]
        frames=1 + i % 300,
        source_uri="file:///data/face.jpg",
        target_uri=f"file:///data/t{i}.mp4",
        output_uri=f"file:///out/t{i}.mp4",
    )


# ---- placement ------------------------------------------------------------------------------------


def placement_part(rule_counts: list[int], pool_counts: list[int], decisions: int) -> list[dict[str, Any]]:
    grid = [(rules, 200) for rules in rule_counts] + [(1000, pools) for pools in pool_counts]
    results = []
    for n_rules, n_pools in dict.fromkeys(grid):
        rng = random.Random(1)
        started = time.perf_counter()
        rules, world = make_rules(n_rules, rng), make_world(n_pools, rng)
        build_s = time.perf_counter() - started
        figures = measure(rules, world, make_tasks(decisions, rng))
        results.append({"rules": n_rules, "pools": n_pools, "ruleset_load_s": round(build_s, 2), **figures})
    return results


# ---- 100k queued tasks ----------------------------------------------------------------------------


def fill_store(store_url: str, count: int) -> float:
    """Insert `count` queued tasks, FILL_BATCH per durable transaction; returns rows/s."""
    store = TaskStore(store_url)
    started = time.perf_counter()
    for offset in range(0, count, FILL_BATCH):
        batch = [NewTask(sample_task(i), "") for i in range(offset, min(count, offset + FILL_BATCH))]
        store.insert_batch(batch, time.time())
    rate = count / (time.perf_counter() - started)
    store.close()
    return round(rate, 1)


def timed_calls(call: Callable[[], Any], count: int) -> dict[str, float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def queue_part(queued: int, calls: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ff-scale-queue-"))
    store_url = f"sqlite:///{work}/scale.db"
    fill_rate = fill_store(store_url, queued)
    scheduler = SchedulerProcess(store_url, write_policy(work / "policy"), work / "scheduler.log").start()
    assert scheduler.process is not None
    pid = scheduler.process.pid
    try:
        rss_start = rss_mib(pid)
        with grpc.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            counter = iter(range(queued, queued + 10 * calls))
            some_id = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=sample_task(0)), timeout=30).task_id
            figures = {
                "submit": timed_calls(
                    lambda: stub.SubmitTask(
                        scheduler_pb2.SubmitTaskRequest(task=sample_task(next(counter))), timeout=30
                    ),
                    calls,
                ),
                "get": timed_calls(
                    lambda: stub.GetTask(scheduler_pb2.GetTaskRequest(task_id=some_id), timeout=30), calls
                ),
                "list_first_page_100": timed_calls(
                    lambda: stub.ListTasks(scheduler_pb2.ListTasksRequest(limit=100), timeout=30), calls
                ),
                "list_by_project_100": timed_calls(
                    lambda: stub.ListTasks(scheduler_pb2.ListTasksRequest(project="proj-7", limit=100), timeout=30),
                    calls,
                ),
                "list_by_state_100": timed_calls(
                    lambda: stub.ListTasks(
                        scheduler_pb2.ListTasksRequest(state=types_pb2.TASK_STATE_QUEUED, limit=100), timeout=30
                    ),
                    calls,
                ),
            }
        cpu_before = cpu_seconds(pid)
        time.sleep(5)
        idle_cpu_share = (cpu_seconds(pid) - cpu_before) / 5
        rss_end = rss_mib(pid)
    finally:
        scheduler.stop()
    reader = TaskStore(store_url)
    still_queued = reader.count_by_state().get(QUEUED, 0)
    reader.close()
    return {
        "queued_tasks": still_queued,
        "fill_rows_per_s": fill_rate,
        "db_mib": round((work / "scale.db").stat().st_size / 2**20, 1),
        "scheduler_rss_mib": {"after_start": rss_start, "after_calls": rss_end},
        "scheduler_idle_cpu_share": round(idle_cpu_share, 3),
        "latency": figures,
    }


# ---- agents ---------------------------------------------------------------------------------------


def heartbeat(agent: int, pools: int) -> scheduler_pb2.HeartbeatRequest:
    private = agent % 2 == 0
    pool = f"{'onprem' if private else 'cloud'}-{agent % pools}"
    return scheduler_pb2.HeartbeatRequest(
        agent_id=f"hollow-{agent}",
        address=f"127.0.0.1:{20000 + agent}",  # never dialled: no task is submitted in this part
        pool=pool,
        trust_zone="private" if private else "cloud",
        provider="onprem" if private else "aws",
        region="local",
        total_slots=4,
        free_slots=4,
        healthy=True,
        sec_per_frame=0.05,
    )


async def heartbeat_load(
    address: str, agents: int, pools: int, interval_s: float, seconds: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)

        async def agent_loop(agent: int) -> None:
            nonlocal errors
            request = heartbeat(agent, pools)
            await asyncio.sleep(interval_s * agent / agents)  # spread the first beats
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    await stub.Heartbeat(request, timeout=10)
                    latencies.append(time.perf_counter() - started)
                except grpc.RpcError:
                    errors += 1
                await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - started)))

        await asyncio.gather(*(agent_loop(agent) for agent in range(agents)))
    return latencies, errors


async def explain_latency(address: str, calls: int) -> dict[str, float]:
    samples = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for i in range(calls):
            started = time.perf_counter()
            await stub.Explain(scheduler_pb2.ExplainRequest(task=sample_task(i)), timeout=30)
            samples.append(time.perf_counter() - started)
    return percentiles(samples)


def agents_part(counts: list[int], interval_s: float, seconds: float) -> list[dict[str, Any]]:
    results = []
    for agents in counts:
        work = Path(tempfile.mkdtemp(prefix="ff-scale-agents-"))
        pools = max(1, agents // 10)
        scheduler = SchedulerProcess(
            f"sqlite:///{work}/scale.db", write_policy(work / "policy"), work / "scheduler.log"
        ).start()
        assert scheduler.process is not None
        pid = scheduler.process.pid
        try:
            warm = asyncio.run(heartbeat_load(scheduler.address, agents, pools, interval_s, interval_s + 0.5))
            cpu_before, wall_before = cpu_seconds(pid), time.perf_counter()
            latencies, errors = asyncio.run(heartbeat_load(scheduler.address, agents, pools, interval_s, seconds))
            cpu_share = (cpu_seconds(pid) - cpu_before) / (time.perf_counter() - wall_before)
            explain = run_alongside(
                heartbeat_load(scheduler.address, agents, pools, interval_s, 4.0),
                explain_latency(scheduler.address, 100),
            )
            rss = rss_mib(pid)
        finally:
            scheduler.stop()
        results.append(
            {
                "agents": agents,
                "pools": 2 * pools,
                "heartbeats_per_s": round(len(latencies) / seconds, 1),
                "heartbeat_errors": errors + warm[1],
                "heartbeat_latency": percentiles(latencies),
                "scheduler_cpu_share": round(cpu_share, 3),
                "scheduler_cpu_ms_per_heartbeat": round(1000 * cpu_share * seconds / max(1, len(latencies)), 3),
                "explain_dry_run_latency": explain,
                "scheduler_rss_mib": rss,
            }
        )
    return results


def run_alongside(load: Awaitable[Any], probe: Awaitable[dict[str, float]]) -> dict[str, float]:
    """Run `probe` while `load` runs; return the probe's figures."""

    async def both() -> dict[str, float]:
        _, figures = await asyncio.gather(load, probe)
        return figures

    return asyncio.run(both())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="placement,queue,agents")
    parser.add_argument("--rules", default="10,100,1000,10000", help="rule counts (at 200 pools)")
    parser.add_argument("--pools", default="10,100,1000", help="pool counts (at 1,000 rules)")
    parser.add_argument("--decisions", type=int, default=1000, help="placements per configuration")
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per RPC in the queue part")
    parser.add_argument("--agents", default="10,100,1000")
    parser.add_argument("--heartbeat-s", type=float, default=2.0, help="interval of each hollow agent")
    parser.add_argument("--seconds", type=float, default=10.0, help="heartbeat load duration per agent count")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"placement", "queue", "agents"}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from placement, queue, agents")

    figures: dict[str, Any] = {}
    if "placement" in parts:
        figures["placement"] = placement_part(
            [int(x) for x in args.rules.split(",")], [int(x) for x in args.pools.split(",")], args.decisions
        )
    if "queue" in parts:
        figures["queue"] = queue_part(args.queued, args.calls)
    if "agents" in parts:
        figures["agents"] = agents_part([int(x) for x in args.agents.split(",")], args.heartbeat_s, args.seconds)
    report = {
        "benchmark": "scale",
        "machine": machine_facts(),
        "settings": vars(args) | {"output": None},
        "figures": figures,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    summary = []
    for row in figures.get("placement", []):
        summary.append(f"{row['rules']}r x {row['pools']}p p50 {row['p50_ms']} ms (cpu p99 {row['cpu_p99_ms']})")
    if "queue" in figures:
        q = figures["queue"]
        summary.append(
            f"{q['queued_tasks']} queued: RSS {q['scheduler_rss_mib']['after_calls']} MiB, submit p50 "
            f"{q['latency']['submit']['p50_ms']} ms, list p50 {q['latency']['list_by_state_100']['p50_ms']} ms"
        )
    for row in figures.get("agents", []):
        summary.append(
            f"{row['agents']} agents: heartbeat p99 {row['heartbeat_latency']['p99_ms']} ms, "
            f"scheduler CPU {row['scheduler_cpu_share']:.0%}, explain p50 {row['explain_dry_run_latency']['p50_ms']} ms"
        )
    print("scale: " + "; ".join(summary))


if __name__ == "__main__":
    main()
