"""The Celery + Redis side of bench/compare_celery.py: what a Python team would otherwise build.

Redis runs with `appendonly yes` and `appendfsync always` (durable broker); Celery uses
`task_acks_late`, `worker_prefetch_multiplier=1`, and routes by a simple rule: private tasks to
the `onprem` queue, public ones to the `cloud` queue, each served by its own worker group.
Each task records its start time in Redis; submit->start latency and throughput come from those.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis as redis_lib
from celery import Celery

from bench.machine import percentiles

STARTS_KEY = "facefleet-bench:starts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_app(broker_url: str) -> Celery:
    app = Celery("facefleet_bench", broker=broker_url)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_routes={"bench.celery_side.swap_noop": {"queue": "onprem"}},
        task_default_queue="cloud",
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return app


BROKER_URL = os.environ.get("FACEFLEET_BENCH_BROKER", "redis://127.0.0.1:6379/0")
app = make_app(BROKER_URL)


_recorder: redis_lib.Redis | None = None


@app.task(name="bench.celery_side.swap_noop")
def swap_noop(task_id: str, submitted_at: float, payload: bytes = b"") -> None:
    """A no-op swap: record when it started (the payload only travels)."""
    global _recorder
    if _recorder is None:  # one connection per worker process
        _recorder = redis_lib.Redis.from_url(BROKER_URL)
    _recorder.rpush(STARTS_KEY, f"{task_id} {submitted_at} {time.time()}")


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.dir = Path(tempfile.mkdtemp(prefix="ff-redis-"))
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis_lib.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis_lib.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_celery(
    tasks: int,
    workers_per_group: int,
    payload_bytes: int,
    private_share: float,
    rate: float = 0.0,
    warmup: int = 0,
) -> dict[str, Any]:
    """`rate` > 0 paces the submissions (tasks/s, open loop); 0 submits as fast as the client can.
    `warmup` tasks (both queues) run before the clock starts and are not measured."""
    server = RedisServer()
    env = {**os.environ, "FACEFLEET_BENCH_BROKER": server.url}
    root = Path(__file__).resolve().parent.parent
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.celery_side",
                "worker",
                "-Q",
                queue,
                "-c",
                str(workers_per_group),
                "-P",
                "prefork",
                "--loglevel",
                "WARNING",
                "-n",
                f"{queue}@%h",
            ],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for queue in ("onprem", "cloud")
    ]
    try:
        bench_app = make_app(server.url)
        client = redis_lib.Redis.from_url(server.url)
        _wait_for_workers(bench_app, 2)
        payload = b"p" * payload_bytes
        private_every = max(1, round(1 / private_share)) if private_share > 0 else 0
        for i in range(warmup):
            bench_app.send_task(
                "bench.celery_side.swap_noop", args=(f"w{i}", time.time(), payload), queue=("onprem", "cloud")[i % 2]
            )
        deadline = time.time() + 60
        while client.llen(STARTS_KEY) < warmup and time.time() < deadline:
            time.sleep(0.02)
        client.delete(STARTS_KEY)
        started = time.time()
        for i in range(tasks):
            if rate > 0:
                time.sleep(max(0.0, started + i / rate - time.time()))
            private = private_every and i % private_every == 0
            bench_app.send_task(
                "bench.celery_side.swap_noop",
                args=(f"t{i}", time.time(), payload),
                queue="onprem" if private else "cloud",
            )
        submitted = time.time()
        while client.llen(STARTS_KEY) < tasks:
            if time.time() - started > 600:
                raise RuntimeError("celery side did not finish within 600 s")
            time.sleep(0.02)
        finished = time.time()
        latencies = []
        for raw in client.lrange(STARTS_KEY, 0, -1):
            _, submitted_at, start = (raw.decode() if isinstance(raw, bytes) else raw).split()
            latencies.append(float(start) - float(submitted_at))
        return {
            "tasks": tasks,
            "throughput_tasks_per_s": round(tasks / (finished - started), 1),
            "submit_rate_tasks_per_s": round(tasks / (submitted - started), 1),
            "submit_to_start": percentiles(latencies),
            "settings": {
                "broker": "redis appendonly yes, appendfsync always",
                "acks_late": True,
                "prefetch_multiplier": 1,
                "worker_groups": {"onprem": workers_per_group, "cloud": workers_per_group},
                "pool": "prefork",
                "offered_rate_tasks_per_s": rate or "as fast as one client submits",
                "warmup_tasks": warmup,
            },
        }
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        server.stop()


def _wait_for_workers(bench_app: Celery, expected: int) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        replies = bench_app.control.ping(timeout=1.0) or []
        if len(replies) >= expected:
            return
    raise RuntimeError("celery workers did not come up within 60 s")
