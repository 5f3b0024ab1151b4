"""How well `facefleet simulate` replays a live run (issue #16): same pool per task, same spend.

Records a live run: a real `facefleet scheduler run` process, an on-prem hollow agent (2 slots) and a
cloud hollow agent (4 slots, spot, $7.20/h) with known run times, a cloud budget whose cap binds
part-way through, public and private tasks of mixed priority and length arriving over time. Then
turns the run's history into a workload exactly as `facefleet budget history` does, replays it
through `scheduler.simulate` (the same pass planner as the live dispatcher) against a world with
the same pools and cap, and compares: the share of tasks the simulator sends to the pool they ran
on live, and simulated cloud spend vs the live ledger.

The same workload is recorded live `--live-runs` times (default 2): each run is replayed and scored,
and the live runs are compared with each other (`live_vs_live`: the share of tasks that ran on the
same pool in two live runs of the same arrivals). That is the ceiling any simulator can reach on
this host: where live itself does not repeat, no replay can match it every time.

    .venv/bin/python bench/replay_accuracy.py [--tasks 60] [--seconds 20] [--seed 7] [--live-runs 2] [--output FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine_facts
from facefleet.domain import DISPATCHED
from facefleet.scheduler.history_workload import completed_runs, historic_tasks, history_workload
from facefleet.scheduler.ledger import SpendLedger
from facefleet.scheduler.placement.model import World
from facefleet.scheduler.placement.world import compose_world
from facefleet.scheduler.rules_source.files import read_policy_dir
from facefleet.scheduler.run_estimates import samples_before
from facefleet.scheduler.simulate import simulate
from facefleet.scheduler.store import TaskStore
from facefleet.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.cloud.burst_policy import cloud_pool_toml, write_burst_policy
from tests.scheduler.fake_agents import HollowAgent, wait_for
from tests.scheduler.scheduler_process import SchedulerProcess

PRICE = 7.20
ONPREM_FRAME_S, CLOUD_FRAME_S = 0.5, 0.6
ONPREM_SLOTS, CLOUD_SLOTS = 2, 4
PRIORITIES = [types_pb2.PRIORITY_LOW, types_pb2.PRIORITY_NORMAL, types_pb2.PRIORITY_HIGH, types_pb2.PRIORITY_URGENT]


class CloudAgent(HollowAgent):
    def heartbeat_request(self) -> scheduler_pb2.HeartbeatRequest:
        request = super().heartbeat_request()
        request.instance_id = "i-bench-1"
        return request


def workload_plan(tasks: int, seconds: float, seed: int) -> list[tuple[float, types_pb2.Task]]:
    rng = random.Random(seed)
    plan = []
    for _ in range(tasks):
        private = rng.random() < 0.25
        task = types_pb2.Task(
            project=rng.choice(["promo", "trailer", "med"]),
            sensitivity=types_pb2.SENSITIVITY_PRIVATE if private else types_pb2.SENSITIVITY_PUBLIC,
            priority=rng.choice(PRIORITIES),
            frames=rng.randint(2, 6),
            source_uri="file:///data/face.jpg",
            target_uri="file:///data/clip.mp4",
        )
        plan.append((rng.uniform(0, seconds), task))
    return sorted(plan, key=lambda item: item[0])


def record_live(directory: Path, cap: float, plan: list[tuple[float, types_pb2.Task]]) -> dict[str, Any]:
    policy = write_burst_policy(directory / "policy", cap)
    (directory / "facefleet.toml").write_text(cloud_pool_toml("cloud-spot", PRICE, CLOUD_FRAME_S))
    store_url = f"sqlite:///{directory / 'store.db'}"
    scheduler = SchedulerProcess(store_url, policy, directory / "scheduler.log").start()
    onprem = HollowAgent(scheduler.address, "onprem-1", "onprem-a", "private", slots=ONPREM_SLOTS,
                         frame_s=ONPREM_FRAME_S).start()  # fmt: skip
    cloud = CloudAgent(scheduler.address, "spot-1", "cloud-spot", "cloud", slots=CLOUD_SLOTS, frame_s=CLOUD_FRAME_S)
    cloud.start()
    try:
        channel = grpc.insecure_channel(scheduler.address)
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        admin = admin_pb2_grpc.AdminStub(channel)

        def fleet_ready() -> bool:  # both pools known with every slot free before the first arrival
            pools = admin.ListFleet(admin_pb2.ListFleetRequest(), timeout=10).pools
            free = {pool.name: pool.free_slots for pool in pools}
            return free.get("onprem-a") == ONPREM_SLOTS and free.get("cloud-spot") == CLOUD_SLOTS

        wait_for(fleet_ready, 30, interval=0.2, what="both agents registered")
        time.sleep(1.0)
        ids = [""] * len(plan)  # the task id of each planned arrival, in plan order
        started = time.monotonic()

        def submit(index: int, at: float, task: types_pb2.Task) -> None:
            time.sleep(max(0.0, at - (time.monotonic() - started)))
            ids[index] = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task), timeout=30).task_id

        threads = [threading.Thread(target=submit, args=(i, *item)) for i, item in enumerate(plan)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        def all_done() -> bool:
            states = [stub.GetTask(scheduler_pb2.GetTaskRequest(task_id=i), timeout=10).state for i in ids]
            return all(state == types_pb2.TASK_STATE_SUCCEEDED for state in states)

        wait_for(all_done, 600, interval=0.5, what="the live run to finish")
        wall_s = time.monotonic() - started
        channel.close()
    except Exception:
        exited = scheduler.process.poll() if scheduler.process is not None else None
        tail = (directory / "scheduler.log").read_text(errors="replace").splitlines()[-20:]
        print(f"the live run failed (scheduler exit status {exited}); its log ends:", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        onprem.kill()
        cloud.kill()
        scheduler.stop()
    store = TaskStore(store_url)
    ledger = SpendLedger(sa.create_engine(store_url))
    try:
        records = {task_id: store.get(task_id) for task_id in ids}
        dispatched = {
            task_id: min((t.at for t in store.transitions_of(task_id) if t.to_state == DISPATCHED), default=0.0)
            for task_id in ids
        }
        # A millisecond early: a datetime rounds to microseconds and must not cut off the first task.
        since = datetime.fromtimestamp(min(r.submitted_at for r in records.values()) - 0.001, UTC)
        until = datetime.now(UTC) + timedelta(seconds=1)
        workload = history_workload(
            ledger,
            since,
            until,
            historic_tasks(store, since, until),
            {"cloud-spot"},
            sec_per_frame={"cloud-spot": CLOUD_FRAME_S, "onprem-a": ONPREM_FRAME_S},
            run_time_samples=samples_before(sa.create_engine(store_url), since.timestamp()),
            runs=completed_runs(sa.create_engine(store_url), since, until),
        )  # as `facefleet budget history` does with the scheduler's config
        rows = ledger.records(since - timedelta(minutes=1))
    finally:
        store.close()
    stopped = sum(1 for r in rows if r["outcome"] != "completed")
    return {
        "ids": ids,
        "pools": {task_id: record.pool for task_id, record in records.items()},
        "dispatched_at": {task_id: round(at - since.timestamp(), 3) for task_id, at in dispatched.items()},
        "reserved_usd": {str(r["task_id"]): float(r["estimate_usd"] or 0.0) for r in rows},
        "billed_s": {str(r["task_id"]): float(r["instance_seconds"]) for r in rows},
        "ended_at": sorted(round(r["ended_at"].timestamp() - since.timestamp(), 3) for r in rows),
        "spend_usd": sum(float(r["usd"]) for r in rows),
        "cloud_runs": len(rows),
        "budget_stops": stopped,
        "workload": workload,
        "wall_s": wall_s,
    }


def replay(policy_dir: Path, cap: float, workload: dict[str, Any]) -> Any:
    ruleset, budgets, locks = read_policy_dir(policy_dir)
    world = World.from_dict(
        {
            "pools": [
                {"name": "onprem-a", "provider": "onprem", "trust_zone": "private", "free_slots": ONPREM_SLOTS,
                 "sec_per_frame": ONPREM_FRAME_S},
                {"name": "cloud-spot", "provider": "aws", "trust_zone": "cloud", "free_slots": CLOUD_SLOTS,
                 "sec_per_frame": CLOUD_FRAME_S, "price_per_hour": PRICE, "spot": True},
            ],
            "budgets": [{"name": "burst", "monthly_cap_usd": cap}],
        }
    )  # fmt: skip
    return simulate(ruleset, compose_world(world, budgets, locks), workload)


def compare_reservations(live: dict[str, Any], sim: Any) -> dict[str, Any]:
    """Per task on the cloud pool in both runs: the budget gate's reservation live (the ledger row's
    estimate) and simulated; equal reservations mean both sides saw the same learned estimate."""
    both = sorted(set(live["reserved_usd"]) & set(sim.reserved_usd))
    diffs = [sim.reserved_usd[t] - live["reserved_usd"][t] for t in both]
    return {
        "tasks": len(both),
        "equal_within_1e-6": sum(1 for d in diffs if abs(d) <= 1e-6),
        "within_1pct": sum(1 for t, d in zip(both, diffs, strict=True) if abs(d) <= 0.01 * live["reserved_usd"][t]),
        "mean_abs_diff_usd": round(sum(map(abs, diffs)) / len(diffs), 6) if diffs else 0.0,
        "per_task": [
            {
                "id": t,
                "live_usd": round(live["reserved_usd"][t], 6),
                "sim_usd": round(sim.reserved_usd[t], 6),
                "live_billed_s": round(live["billed_s"][t], 3),
            }
            for t in both
        ],
    }


def end_to_dispatch_lags(live: dict[str, Any], within_s: float = 0.25) -> dict[str, Any]:
    """Live, from a cloud run's recorded end (the ledger row's ended_at: when the scheduler handled
    the agent's ending update) to the next cloud dispatch when that came within `within_s`: the
    lag with which freed slot and budget room reach a launch (the simulator launches at the end)."""
    ends = live["ended_at"]
    lags = []
    for task_id, pool in live["pools"].items():
        at = live["dispatched_at"][task_id]
        before = [end for end in ends if end <= at]
        if pool == "cloud-spot" and before and at - before[-1] <= within_s:
            lags.append(at - before[-1])
    lags.sort()
    return {
        "count": len(lags),
        "median_s": round(lags[len(lags) // 2], 3) if lags else None,
        "max_s": round(lags[-1], 3) if lags else None,
    }


def score(live: dict[str, Any], sim: Any) -> dict[str, Any]:
    """One live run against its replay: same pool per task, spend, reservations, dispatch times."""
    live_pools: dict[str, str] = live["pools"]
    replayed = {task["id"] for task in live["workload"]["tasks"]}
    assert replayed == set(live_pools), f"history lost {len(set(live_pools) - replayed)} task(s)"
    same = sum(1 for task_id, pool in live_pools.items() if sim.assignments.get(task_id) == pool)
    spend_error = (sim.cloud_cost_usd - live["spend_usd"]) / live["spend_usd"] if live["spend_usd"] else 0.0
    gaps = sorted(  # |live - simulated| dispatch time of the tasks both sent to the same pool
        abs(live["dispatched_at"][task_id] - sim.dispatched_at[task_id])
        for task_id, pool in live_pools.items()
        if sim.assignments.get(task_id) == pool
    )
    return {
        "live": {
            "wall_s": round(live["wall_s"], 2),
            "spend_usd": round(live["spend_usd"], 6),
            "cloud_runs": live["cloud_runs"],
            "budget_stops": live["budget_stops"],
            "per_pool": dict(sorted(Counter(live_pools.values()).items())),
            "end_to_next_cloud_dispatch": end_to_dispatch_lags(live),
        },
        "simulated": {"spend_usd": round(sim.cloud_cost_usd, 6), "per_pool": sim.per_pool},
        "same_pool_pct": round(100.0 * same / len(live_pools), 2),
        "spend_error_pct": round(100.0 * spend_error, 2),
        "dispatch_time_gap_s": {
            "median": round(gaps[len(gaps) // 2], 3) if gaps else None,
            "max": round(gaps[-1], 3) if gaps else None,
        },
        "replayed_workload": live["workload"],
        "mismatched": [
            {
                **{k: a[k] for k in ("id", "at", "priority", "sensitivity", "frames")},
                "live": live_pools[a["id"]],
                "simulated": sim.assignments.get(a["id"], "-"),
                "live_dispatched_at": live["dispatched_at"][a["id"]],
                "sim_dispatched_at": round(sim.dispatched_at.get(a["id"], -1.0), 3),
            }
            for a in live["workload"]["tasks"]
            if sim.assignments.get(a["id"]) != live_pools[a["id"]]
        ],
        "reservations": compare_reservations(live, sim),
        # task id -> [live pool, live dispatched at, simulated pool, simulated dispatched at]
        "timeline": {
            task_id: [
                pool,
                live["dispatched_at"][task_id],
                sim.assignments.get(task_id, "-"),
                round(sim.dispatched_at.get(task_id, -1.0), 3),
            ]
            for task_id, pool in live_pools.items()
        },
    }


def live_vs_live(
    plan: list[tuple[float, types_pb2.Task]], first: dict[str, Any], second: dict[str, Any]
) -> dict[str, Any]:
    """Two live runs of the same arrivals, task by task (plan order): how often live repeats itself.
    Times are each run's own (seconds from its first arrival, as in its timeline)."""
    arrived = [{task["id"]: task["at"] for task in live["workload"]["tasks"]} for live in (first, second)]
    differ = []
    for index, (_at, task) in enumerate(plan):
        a, b = first["ids"][index], second["ids"][index]
        if first["pools"][a] != second["pools"][b]:
            differ.append(
                {
                    "index": index,
                    "at": [arrived[0][a], arrived[1][b]],
                    "priority": types_pb2.Priority.Name(task.priority),
                    "sensitivity": types_pb2.Sensitivity.Name(task.sensitivity),
                    "frames": task.frames,
                    "pools": [first["pools"][a], second["pools"][b]],
                    "dispatched_at": [first["dispatched_at"][a], second["dispatched_at"][b]],
                }
            )
    spends = (first["spend_usd"], second["spend_usd"])
    return {
        "same_pool_pct": round(100.0 * (len(plan) - len(differ)) / len(plan), 2),
        "spend_diff_pct": round(100.0 * (spends[1] - spends[0]) / spends[0], 2) if spends[0] else 0.0,
        "differ": differ,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=20.0, help="arrivals spread over this long")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cap-runs", type=float, default=14.5, help="cap as this many average cloud runs' cost")
    parser.add_argument("--live-runs", type=int, default=2, help="record the same workload live this many times")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    plan = workload_plan(args.tasks, args.seconds, args.seed)
    cap = round(args.cap_runs * 4 * CLOUD_FRAME_S * PRICE / 3600, 6)  # an average task has 4 frames
    lives, replays = [], []
    for _ in range(max(1, args.live_runs)):
        with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
            directory = Path(tmp)
            live = record_live(directory, cap, plan)
            replays.append(score(live, replay(directory / "policy", cap, live["workload"])))
            lives.append(live)
    pairs = [live_vs_live(plan, a, b) for a, b in itertools.combinations(lives, 2)]
    result = {
        "bench": "replay_accuracy",
        "machine": machine_facts(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "tasks": args.tasks,
            "arrivals_over_s": args.seconds,
            "seed": args.seed,
            "cap_usd": cap,
            "price_per_hour": PRICE,
            "onprem": [ONPREM_SLOTS, ONPREM_FRAME_S],
            "cloud": [CLOUD_SLOTS, CLOUD_FRAME_S],
            "live_runs": len(lives),
        },
        "same_pool_pct": [r["same_pool_pct"] for r in replays],  # simulated vs each live run
        "spend_error_pct": [r["spend_error_pct"] for r in replays],
        "live_vs_live_same_pool_pct": [p["same_pool_pct"] for p in pairs],
        "replays": replays,
        "live_vs_live": pairs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    for number, r in enumerate(replays, start=1):
        print(
            f"replay accuracy (live run {number}): same pool {r['same_pool_pct']}% of {args.tasks} tasks, spend "
            f"${r['simulated']['spend_usd']:.4f} simulated vs ${r['live']['spend_usd']:.4f} live "
            f"({r['spend_error_pct']:+.2f}%), {r['live']['budget_stops']} budget stops live; reservations equal "
            f"within 1% for {r['reservations']['within_1pct']} of {r['reservations']['tasks']} cloud tasks "
            f"(mean |sim - live| ${r['reservations']['mean_abs_diff_usd']:.6f}); dispatch times |sim - live| "
            f"median {r['dispatch_time_gap_s']['median']} s, max {r['dispatch_time_gap_s']['max']} s; live end -> "
            f"next cloud dispatch median {r['live']['end_to_next_cloud_dispatch']['median_s']} s",
            file=sys.stderr,
        )
    for p in pairs:
        print(
            f"live vs live (ceiling): same pool {p['same_pool_pct']}% of {args.tasks} tasks, "
            f"spend {p['spend_diff_pct']:+.2f}%",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
