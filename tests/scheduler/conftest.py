"""Scheduler test set-up: a policy dir, an in-process SchedulerApp on 127.0.0.1, hollow agents."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from facefleet.config import PolicyConfig, SchedulerConfig, Settings
from facefleet.scheduler.app import SchedulerApp
from facefleet.scheduler.dispatcher import DispatcherSettings
from facefleet.v1 import scheduler_pb2_grpc
from tests.scheduler.fake_agents import HollowAgent

# Public work goes to the cloud pool, everything else stays on-prem (trust zone private).
TEST_RULES = """
rules:
  - id: private-onprem
    match: {sensitivity: [private]}
    allow: ["onprem-*"]
    trust_zones: [private]
    prefer: latency
  - id: public-cloud
    match: {sensitivity: [public]}
    allow: ["cloud-*"]
    prefer: cost
  - id: default
    match: {}
    allow: ["onprem-*"]
    prefer: cost
"""


def write_policy(directory: Path, rules: str = TEST_RULES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(rules)
    (directory / "budgets.yaml").write_text("budgets: []\n")
    (directory / "locks.yaml").write_text("locks:\n  - {project: locked-proj, reason: compliance hold, by: test}\n")
    return directory


def make_settings(tmp_path: Path, store_url: str | None = None, **scheduler: Any) -> Settings:
    config = {
        "listen": "127.0.0.1:0",
        "store_url": store_url or f"sqlite:///{tmp_path}/scheduler.db",
        "metrics_port": 0,
        "heartbeat_timeout_s": 1.0,
        "lost_grace_s": 0.5,
        **scheduler,
    }
    return Settings(
        scheduler=SchedulerConfig(**config),
        policy=PolicyConfig(dir=write_policy(tmp_path / "policy")),
    )


FAST_DISPATCH = DispatcherSettings(
    project_limits={}, lost_grace_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.5, warmup_s=0.5
)


@pytest.fixture
def start_scheduler(tmp_path: Path) -> Iterator[Callable[..., SchedulerApp]]:
    apps: list[SchedulerApp] = []

    def start(
        store_url: str | None = None, dispatch: DispatcherSettings = FAST_DISPATCH, **scheduler: Any
    ) -> SchedulerApp:
        app = SchedulerApp(make_settings(tmp_path, store_url, **scheduler), dispatcher_settings=dispatch).start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


@pytest.fixture
def start_agent() -> Iterator[Callable[..., HollowAgent]]:
    agents: list[HollowAgent] = []

    def start(scheduler_port: int, agent_id: str, pool: str, trust_zone: str, **kwargs: Any) -> HollowAgent:
        agent = HollowAgent(f"127.0.0.1:{scheduler_port}", agent_id, pool, trust_zone, **kwargs).start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.kill()


@pytest.fixture
def client() -> Iterator[Callable[[int], scheduler_pb2_grpc.SchedulerStub]]:
    channels: list[grpc.Channel] = []

    def connect(port: int) -> scheduler_pb2_grpc.SchedulerStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return scheduler_pb2_grpc.SchedulerStub(channel)

    yield connect
    for channel in channels:
        channel.close()
