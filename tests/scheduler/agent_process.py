"""A real agent as its own process (for crash tests): `agent.server.serve_agent` with mTLS, the run
journal in its work directory, heartbeats to every scheduler replica; only the swap is instant.

    python -m tests.scheduler.agent_process --agent-id onprem-1 --pool onprem-a --trust-zone private \
        --scheduler 127.0.0.1:50051 --tls-dir pki --work-dir w --data d --slots 8

`InstantPipeline` writes the output (naming the agent and attempt that produced it) and returns at
once, so the figures measure the control plane. `AgentProcess` starts, SIGKILLs and restarts one.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facefleet.agent.pipeline.quality import QualityReport
from facefleet.agent.pipeline.runner import ProgressUpdate, SwapJob, SwapResult
from tests.scheduler.scheduler_process import kill9, terminate

REPO = Path(__file__).resolve().parents[2]


@dataclass
class InstantPipeline:
    agent_id: str
    engine: str = "instant"
    execution_providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    models: list[Any] = field(default_factory=list)

    def run(self, job: SwapJob, on_progress: Callable[[Any], None], cancelled: threading.Event) -> SwapResult:
        on_progress(ProgressUpdate(1, 1, 100.0, "swap", 1))
        Path(job.output_path).write_text(f"{self.agent_id}\n")
        return SwapResult(Path(job.output_path), 1, self.engine, QualityReport(0.9, 0.9, 1), 1, {}, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("agent-id", "pool", "trust-zone", "scheduler", "tls-dir", "work-dir", "checkpoint-root", "data"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()

    from facefleet.agent.server import serve_agent
    from facefleet.config import AgentConfig, TLSConfig
    from facefleet.security.roles import RoleGate
    from facefleet.security.tls import secure_channel, server_credentials

    tls = TLSConfig(dir=Path(args.tls_dir))
    config = AgentConfig(
        listen="127.0.0.1:0",
        pool=args.pool,
        trust_zone=args.trust_zone,
        provider="onprem" if args.trust_zone == "private" else "aws",
        slots=args.slots,
        agent_id=args.agent_id,
        work_dir=Path(args.work_dir),
        checkpoint_root=Path(args.checkpoint_root),
        allowed_roots=[Path(args.data)],
        metrics_port=0,
        heartbeat_interval_s=0.3,
    )
    factories = [
        (lambda address=address: secure_channel(address, tls, "agent")) for address in args.scheduler.split(",")
    ]
    handle = serve_agent(
        config,
        server_credentials(tls, "agent"),
        [RoleGate(None)],
        scheduler_channel_factories=factories,
        pipeline=InstantPipeline(args.agent_id),
        job_factory=SwapJob,
    )
    print(f"agent {args.agent_id} serving on {handle.port}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    handle.stop(grace=None)


class AgentProcess:
    def __init__(self, agent_id: str, pool: str, zone: str, scheduler: str, tls_dir: Path, root: Path) -> None:
        self.agent_id = agent_id
        self.work_dir = root / agent_id
        self.args = [
            sys.executable, "-m", "tests.scheduler.agent_process", "--agent-id", agent_id, "--pool", pool,
            "--trust-zone", zone, "--scheduler", scheduler, "--tls-dir", str(tls_dir),
            "--work-dir", str(self.work_dir), "--checkpoint-root", str(root / "checkpoints" / pool),
            "--data", str(root / "data"),
        ]  # fmt: skip
        self.log = root / f"{agent_id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def journal_path(self) -> Path:
        return self.work_dir / "run-journal.db"

    def start(self) -> AgentProcess:
        env = {**os.environ, "FACEFLEET_LOG_LEVEL": "warning", "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=log, env=env, cwd=REPO)
        return self

    def kill9(self) -> None:
        kill9(self.process)

    def stop(self) -> None:
        terminate(self.process)


if __name__ == "__main__":
    main()
