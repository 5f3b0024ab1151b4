"""One real stack for the hostile-input suite: the production scheduler (`build_scheduler`: Scheduler
and Admin services, mTLS from a demo PKI, file policies, SQLite, audit log) and one production agent
(`start_agent`: the real swap pipeline on the classical engine), both on 127.0.0.1, plus a
facefleet.toml so CLI commands reach them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from facefleet.agent.assembly import start_agent
from facefleet.agent.server import AgentHandle
from facefleet.config import AgentConfig, AuditConfig, PolicyConfig, SchedulerConfig, Settings, TLSConfig
from facefleet.healthcheck import check_health
from facefleet.scheduler.assembly import AssembledScheduler, build_scheduler
from facefleet.scheduler.dispatcher import DispatcherSettings
from facefleet.security import certs
from facefleet.security.tls import channel_credentials, secure_channel
from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.scheduler.fake_agents import wait_for

RULES = """
rules:
  - id: private-onprem
    match: {sensitivity: [private]}
    allow: ["onprem-*"]
    trust_zones: [private]
  - id: default
    match: {}
    allow: ["onprem-*"]
"""
FAST = DispatcherSettings(project_limits={}, lost_grace_s=2.0, backoff_initial_s=0.05, backoff_max_s=0.3, warmup_s=0.5)


@dataclass
class HostileStack:
    root: Path
    tls: TLSConfig
    settings: Settings
    scheduler: AssembledScheduler
    agent: AgentHandle
    config: Path  # facefleet.toml for CLI commands
    accepted: set[str] = field(default_factory=set)  # task ids SubmitTask accepted: none may be lost

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.scheduler.port}"

    @property
    def agent_address(self) -> str:
        return f"127.0.0.1:{self.agent.port}"

    def channel(self, identity: str, address: str | None = None) -> grpc.Channel:
        return secure_channel(address or self.address, self.tls, identity)

    def assert_healthy(self) -> None:
        """Both servers still answer their health service, and every accepted task is still known."""
        for target, identity in ((self.address, "operator"), (self.agent_address, "operator")):
            credentials = channel_credentials(self.tls, identity)
            result = check_health(target, credentials, timeout_s=5)
            assert result.serving, result.detail
        with self.channel("operator") as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            for task_id in sorted(self.accepted):
                status = stub.GetTask(scheduler_pb2.GetTaskRequest(task_id=task_id), timeout=10)
                assert status.task.id == task_id


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileStack]:
    root = tmp_path_factory.mktemp("hostile-stack")
    pki = root / "certs"
    certs.init_demo_pki(pki)
    policy = root / "policy"
    policy.mkdir()
    (policy / "rules.yaml").write_text(RULES)
    (policy / "locks.yaml").write_text("locks: []\n")
    data = root / "data"
    data.mkdir()
    tls = TLSConfig(dir=pki)
    settings = Settings(
        tls=tls,
        scheduler=SchedulerConfig(
            listen="127.0.0.1:0", store_url=f"sqlite:///{root}/scheduler.db", metrics_port=-1, heartbeat_timeout_s=3.0
        ),
        policy=PolicyConfig(dir=policy),
        audit=AuditConfig(path=root / "audit.jsonl"),
    )
    scheduler = build_scheduler(settings, dispatcher_settings=FAST).start()
    address = f"127.0.0.1:{scheduler.port}"
    models = root / "models"
    models.mkdir()
    (models / "manifest.toml").write_text("# no weights: the classical engine\n")
    agent_config = AgentConfig(
        listen="127.0.0.1:0",
        scheduler=address,
        pool="onprem-hostile",
        trust_zone="private",
        agent_id="hostile-agent",
        models_dir=models,
        work_dir=root / "agent-work",
        checkpoint_root=root / "checkpoints",
        allowed_roots=[data],
        metrics_port=0,
        heartbeat_interval_s=0.2,
    )
    agent = start_agent(agent_config, tls)
    wait_for(lambda: scheduler.registry.get("hostile-agent") is not None, 15, what="the agent's first heartbeat")
    config = root / "facefleet.toml"
    config.write_text(
        f'log_format = "console"\nlog_level = "warning"\n[tls]\ndir = "{pki}"\n[scheduler]\nlisten = "{address}"\n'
        f'store_url = "sqlite:///{root}/scheduler.db"\n[policy]\ndir = "{policy}"\n'
        f'[audit]\npath = "{root}/audit.jsonl"\n'
    )
    running = HostileStack(root, tls, settings, scheduler, agent, config)
    yield running
    agent.stop(grace=None)
    scheduler.stop()
