"""Placement hot-path benchmark: decisions/s and p50/p99 latency of `place()`.

Grid: 10/100/1,000 rules x 10/200 pools. Every task has a distinct project name, so the rule
lookup memo never hits (worst case); rules carry project globs across all sensitivity/priority
buckets and the matched rules allow a realistic mix of on-prem and cloud pools.

    .venv/bin/python bench/placement.py [--decisions 3000] [--seed 1]
Prints one JSON document (machine, date, settings, figures) and a one-line summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_facts
from facefleet.domain import PRIORITIES, SENSITIVITIES
from facefleet.scheduler.placement import RuleSet, TaskSpec, World, load_ruleset, place


def make_rules(count: int, rng: random.Random) -> RuleSet:
    rules: list[dict[str, Any]] = []
    for i in range(count - 1):
        rule: dict[str, Any] = {
            "id": f"r{i}",
            "match": {
                "sensitivity": rng.sample(SENSITIVITIES, rng.randint(1, 2)),
                "priority": rng.sample(PRIORITIES, rng.randint(1, 3)),
                "project": [f"team{i % 97}-{rng.choice('abcdefgh')}*"],
            },
            "allow": rng.sample(["onprem-*", "aws-*", "azure-*", "cloud-*", "onprem-dc1-*"], 3),
            "prefer": rng.choice(["cost", "latency", "order"]),
            "max_spot_price_per_hour": round(rng.uniform(0.5, 2.0), 2),
            "budget": "mkt",
            "allow_cloud_internal": rng.random() < 0.2,
        }
        if rng.random() < 0.5:
            rule["burst_when"] = {"onprem_queue_wait_s_gt": 60}
        if rng.random() < 0.3:
            rule["deny"] = ["azure-*"]
        rules.append(rule)
    rules.append({"id": "default", "match": {}, "allow": ["onprem-*"]})
    return load_ruleset({"rules": rules}, f"bench-{count}")


def make_world(count: int, rng: random.Random) -> World:
    pools = []
    for i in range(count):
        kind = ("onprem", "aws", "azure", "cloud")[i % 4]
        private = kind == "onprem"
        pools.append(
            {
                "name": f"{kind}-{'dc1-' if private and i % 8 == 0 else ''}{i}",
                "provider": kind,
                "trust_zone": "private" if private else "cloud",
                "free_slots": rng.randint(0, 4),
                "queue_wait_s": rng.uniform(0, 300),
                "sec_per_frame": rng.uniform(0.03, 0.2),
                "price_per_hour": 0.0 if private else rng.uniform(0.2, 2.5),
                "spot": not private,
                "can_provision": 0 if private else rng.randint(0, 8),
                "provision_s": 0 if private else rng.uniform(60, 180),
                "healthy": rng.random() > 0.05,
            }
        )
    return World.from_dict({"pools": pools, "budgets": [{"name": "mkt", "monthly_cap_usd": 1000, "spent_usd": 300}]})


def make_tasks(count: int, rng: random.Random) -> list[TaskSpec]:
    return [
        TaskSpec(
            id=f"t{i}",
            project=f"team{rng.randrange(97)}-{rng.choice('abcdefghij')}{i}",
            sensitivity=rng.choice(SENSITIVITIES),
            priority=rng.choice(PRIORITIES),
            sla_seconds=rng.choice([0, 300, 1800]),
            frames=rng.randint(1, 3000),
        )
        for i in range(count)
    ]


def measure(rules: RuleSet, world: World, tasks: list[TaskSpec]) -> dict[str, Any]:
    for task in tasks[:200]:  # warm-up (glob caches for pool names)
        place(task, rules, world)
    samples = []
    cpu_samples = []
    outcomes: dict[str, int] = {}
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for task in tasks:
        cpu_start = cpu_clock()
        start = clock()
        decision = place(task, rules, world)
        samples.append(clock() - start)
        cpu_samples.append(cpu_clock() - cpu_start)
        outcomes[decision.outcome] = outcomes.get(decision.outcome, 0) + 1
    samples.sort()
    cpu_samples.sort()
    total_s = sum(samples) / 1e9
    return {
        "decisions": len(samples),
        "decisions_per_s": round(len(samples) / total_s),
        "p50_ms": round(samples[len(samples) // 2] / 1e6, 4),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1] / 1e6, 4),
        "max_ms": round(samples[-1] / 1e6, 4),
        "mean_ms": round(statistics.fmean(samples) / 1e6, 4),
        # CPU time of this thread: excludes time the OS gave other processes (shared machines)
        "cpu_p50_ms": round(cpu_samples[len(cpu_samples) // 2] / 1e6, 4),
        "cpu_p99_ms": round(cpu_samples[int(len(cpu_samples) * 0.99) - 1] / 1e6, 4),
        "outcomes": outcomes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rules", default="10,100,1000")
    parser.add_argument("--pools", default="10,200")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    results = []
    for n_rules in (int(x) for x in args.rules.split(",")):
        for n_pools in (int(x) for x in args.pools.split(",")):
            rng = random.Random(args.seed)
            rules, world = make_rules(n_rules, rng), make_world(n_pools, rng)
            figures = measure(rules, world, make_tasks(args.decisions, rng))
            results.append({"rules": n_rules, "pools": n_pools, **figures})
    report = {
        "benchmark": "placement",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine_facts(), "cores_used": 1},
        "settings": {"decisions_per_config": args.decisions, "seed": args.seed, "rule_memo": "cold (unique projects)"},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    worst = max(results, key=lambda r: (r["rules"], r["pools"]))
    print(
        f"placement: {worst['rules']} rules x {worst['pools']} pools -> p50 {worst['p50_ms']} ms, "
        f"p99 {worst['p99_ms']} ms (cpu p99 {worst['cpu_p99_ms']} ms), "
        f"{worst['decisions_per_s']} decisions/s (target p99 <= 1 ms)"
    )


if __name__ == "__main__":
    main()
