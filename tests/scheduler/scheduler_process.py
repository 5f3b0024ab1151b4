"""Run `facefleet scheduler run` as a real subprocess (for crash, HA and benchmark runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facefleet.config import TLSConfig
from facefleet.security.tls import secure_channel
from tests.fixtures.ports import free_port

FACEFLEET = str(Path(sys.executable).with_name("facefleet"))


def prefetch_env(pools: dict[str, str], prefetch: int) -> dict[str, str]:
    """Environment that configures `pools` (name -> trust zone) with `prefetch` assignments per
    agent beyond its slots (nothing when 0: the default)."""
    if not prefetch:
        return {}
    config = [
        {"name": name, "trust_zone": zone, "provider": "onprem" if zone == "private" else "aws", "prefetch": prefetch}
        for name, zone in pools.items()
    ]
    return {"FACEFLEET_SCHEDULER__POOLS": json.dumps(config)}


class SchedulerProcess:
    def __init__(
        self,
        store_url: str,
        policy_dir: Path,
        log_path: Path,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        """`tls_dir`: serve mTLS with this PKI (`certs.init_demo_pki`); None: plaintext."""
        self.store_url = store_url
        self.policy_dir = policy_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.extra_env = extra_env or {}
        self.tls_dir = tls_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> SchedulerProcess:
        env = {
            **os.environ,
            "FACEFLEET_LOG_LEVEL": "warning",
            "FACEFLEET_SCHEDULER__HEARTBEAT_TIMEOUT_S": "2",
            "FACEFLEET_SCHEDULER__LOST_GRACE_S": "1",
            **({"FACEFLEET_TLS__DIR": str(self.tls_dir)} if self.tls_dir is not None else {}),
            **self.extra_env,
        }
        env.pop("FACEFLEET_CONFIG", None)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                FACEFLEET,
                "scheduler",
                "run",
                "--listen",
                self.address,
                "--store",
                self.store_url,
                "--policy",
                str(self.policy_dir),
                "--metrics-port",
                "0",
                *(["--insecure"] if self.tls_dir is None else []),
            ],
            stdout=log,
            stderr=log,
            env=env,
            cwd=self.log_path.parent,
        )
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.channel("operator") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"scheduler exited with {self.process.returncode}; see {self.log_path}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
        raise TimeoutError(f"scheduler on {self.address} not serving after {timeout}s; see {self.log_path}")

    def channel(self, identity: str) -> grpc.Channel:
        """A client channel to this scheduler as `identity` (a certificate name in the PKI)."""
        if self.tls_dir is None:
            return grpc.insecure_channel(self.address)
        return secure_channel(self.address, TLSConfig(dir=self.tls_dir), identity)

    def kill9(self) -> None:
        kill9(self.process)

    def stop(self) -> None:
        terminate(self.process)


def kill9(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL, as a crash would, and reap it."""
    assert process is not None
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def terminate(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM (a clean stop), SIGKILL after 15 s."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
