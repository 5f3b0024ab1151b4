"""The physical floors on this machine, so other figures read as a fraction of what it allows.

- gRPC unary round trip on loopback (health check, plaintext and mTLS-free)
- SQLite durable commits/s: one row per transaction, and batched (group commit)
- placement decision cost (1,000 rules x 200 pools) when the placement package is importable

Prints JSON (machine, date, settings, figures) and a one-line summary.
    .venv/bin/python bench/limits.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine_facts, percentiles
from facefleet.grpc_server import build_server


def grpc_round_trip(seconds: float) -> dict[str, Any]:
    handle = build_server("127.0.0.1:0", [], credentials=None, max_workers=4)
    samples: list[float] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            stub.Check(request, timeout=5)
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                stub.Check(request, timeout=5)
                samples.append(time.perf_counter() - start)
    finally:
        handle.stop(grace=None)
    return {"calls": len(samples), "calls_per_s": round(len(samples) / seconds, 1), **percentiles(samples)}


def sqlite_commits(seconds: float, batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "bench.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
        payload = b"x" * 256
        rows = commits = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            db.execute("BEGIN")
            db.executemany("INSERT INTO t (payload) VALUES (?)", [(payload,)] * batch)
            db.execute("COMMIT")
            rows += batch
            commits += 1
        db.close()
    return {
        "batch": batch,
        "commits_per_s": round(commits / seconds, 1),
        "rows_per_s": round(rows / seconds, 1),
        "synchronous": "FULL",
        "journal_mode": "WAL",
    }


def placement_cost(seconds: float) -> dict[str, Any]:
    """`place()` at 1,000 rules x 200 pools (bench/placement.py generators), for about `seconds`."""
    from bench.placement import make_rules, make_tasks, make_world, measure

    rng = random.Random(1)
    rules, world = make_rules(1000, rng), make_world(200, rng)
    decisions = max(200, int(seconds * 2000))  # ~0.3 ms each
    result: dict[str, Any] = measure(rules, world, make_tasks(decisions, rng))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    figures = {
        "grpc_unary_loopback": grpc_round_trip(args.seconds),
        "sqlite_commit_single": sqlite_commits(args.seconds, batch=1),
        "sqlite_commit_batched_64": sqlite_commits(args.seconds, batch=64),
        "placement_1000_rules_200_pools": placement_cost(args.seconds),
    }
    print(json.dumps({"bench": "limits", "machine": machine_facts(), "settings": vars(args), "figures": figures}))
    g, s1, s64 = figures["grpc_unary_loopback"], figures["sqlite_commit_single"], figures["sqlite_commit_batched_64"]
    print(
        f"limits: grpc unary {g['calls_per_s']}/s (p50 {g['p50_ms']} ms); sqlite durable "
        f"{s1['commits_per_s']} commits/s single, {s64['rows_per_s']} rows/s batched x64; placement 1000x200 "
        f"p50 {figures['placement_1000_rules_200_pools']['p50_ms']} ms"
    )


if __name__ == "__main__":
    main()
