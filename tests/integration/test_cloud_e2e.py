"""Cloud bursting end to end through a real SchedulerApp on 127.0.0.1 (insecure), with
`build_cloud` wired in exactly as production does:

- interruption: a real cloud agent (`serve_agent`) gets an AWS instance-action notice from a local
  IMDSv2 server, checkpoints, reports PREEMPTED; the task resumes from that checkpoint on-prem;
- budget: a burst bigger than the remaining budget sends exactly the affordable tasks to the paid
  pool, the rest run on-prem, and the ledger never passes cap + one estimate;
- provisioner against moto_server: on-prem full -> a tagged spot instance is launched; a hollow
  agent heartbeating with its instance id registers it; idle teardown terminates it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from facefleet.agent.interruption import AwsInterruptionWatcher
from facefleet.agent.server import AgentHandle, serve_agent
from facefleet.config import (
    AgentConfig,
    AwsCloudConfig,
    CloudConfig,
    CloudPoolConfig,
    PolicyConfig,
    PoolConfig,
    SchedulerConfig,
    Settings,
)
from facefleet.scheduler.app import SchedulerApp
from facefleet.scheduler.cloud.aws import AwsSpotBackend
from facefleet.scheduler.cloud.backend import TAG_CLUSTER, TAG_INSTANCE, TAG_POOL
from facefleet.scheduler.cloud.prices import SpotPrice
from facefleet.scheduler.cloud.wiring import CloudParts, build_cloud, ledger_engine
from facefleet.scheduler.dispatcher import DispatcherSettings
from facefleet.scheduler.ledger import BudgetAccount, Usage, cloud_spend, month_of
from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.agent.conftest import FakePipeline, SwapJob, write_image
from tests.cloud.burst_policy import BURST_RULES
from tests.cloud.conftest import ec2, moto_endpoint  # noqa: F401  (fixtures)
from tests.scheduler.fake_agents import HollowAgent, wait_for

FAST_DISPATCH = DispatcherSettings(
    project_limits={}, lost_grace_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.3, warmup_s=0.5
)
AMI = "ami-03cf127a"  # one of moto's built-in AMIs


# ---- set-up ------------------------------------------------------------------------------------


def write_policy(directory: Path, rules: str, budgets: str = "budgets: []\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(rules)
    (directory / "budgets.yaml").write_text(budgets)
    (directory / "locks.yaml").write_text("locks: []\n")
    return directory


def make_settings(
    tmp_path: Path, rules: str, budgets: str = "budgets: []\n", static_pools: tuple[PoolConfig, ...] = (), **cloud: Any
) -> Settings:
    return Settings(
        scheduler=SchedulerConfig(
            listen="127.0.0.1:0",
            store_url=f"sqlite:///{tmp_path}/scheduler.db",
            metrics_port=-1,
            heartbeat_timeout_s=1.5,
            lost_grace_s=1.0,
            pools=list(static_pools),
        ),
        policy=PolicyConfig(dir=write_policy(tmp_path / "policy", rules, budgets)),
        cloud=CloudConfig(**cloud),
    )


@pytest.fixture
def start_scheduler() -> Iterator[Callable[..., tuple[SchedulerApp, CloudParts]]]:
    started: list[SchedulerApp] = []

    def start(settings: Settings, **cloud_overrides: Any) -> tuple[SchedulerApp, CloudParts]:
        parts = build_cloud(settings, ledger_engine(settings.scheduler.store_url), **cloud_overrides)
        app = SchedulerApp(settings, dispatcher_settings=FAST_DISPATCH, cloud=parts)
        started.append(app.start())
        return app, parts

    yield start
    for app in started:
        app.stop()


@pytest.fixture
def stub() -> Iterator[Callable[[int], scheduler_pb2_grpc.SchedulerStub]]:
    channels: list[grpc.Channel] = []

    def connect(port: int) -> scheduler_pb2_grpc.SchedulerStub:
        channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
        return scheduler_pb2_grpc.SchedulerStub(channels[-1])

    yield connect
    for channel in channels:
        channel.close()


@pytest.fixture
def hollow_agents() -> Iterator[list[HollowAgent]]:
    agents: list[HollowAgent] = []
    yield agents
    for agent in agents:
        agent.kill()


def public_task(frames: int, project: str = "promo", **fields: Any) -> types_pb2.Task:
    return types_pb2.Task(
        project=project,
        sensitivity=types_pb2.SENSITIVITY_PUBLIC,
        priority=types_pb2.PRIORITY_HIGH,
        frames=frames,
        source_uri=fields.pop("source_uri", "file:///data/face.jpg"),
        target_uri=fields.pop("target_uri", "file:///data/clip.mp4"),
        **fields,
    )


def submit(stub: scheduler_pb2_grpc.SchedulerStub, task: types_pb2.Task) -> str:
    return str(stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task), timeout=10).task_id)


# ---- interruption ------------------------------------------------------------------------------


class Imds(BaseHTTPRequestHandler):
    """IMDSv2: token, then spot/instance-action (404 until `notice` is set)."""

    notice: dict[str, str] | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: str = "") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._send(200, "token-1") if ok else self._send(400)

    def do_GET(self) -> None:
        if self.path != "/latest/meta-data/spot/instance-action" or self.headers.get("X-aws-ec2-metadata-token") != (
            "token-1"
        ):
            return self._send(401)
        notice = type(self).notice
        if notice is None:
            return self._send(404)
        import json

        self._send(200, json.dumps(notice))


@pytest.fixture
def imds() -> Iterator[tuple[type[Imds], str]]:
    handler = type("ImdsForTest", (Imds,), {"notice": None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


INTERRUPTION_RULES = """
rules:
  - id: cloud-first
    match: {sensitivity: [public]}
    allow: ["cloud-*", "onprem-*"]
    prefer: order
  - id: default
    match: {}
    allow: ["onprem-*"]
"""


def test_spot_notice_preempts_and_the_task_resumes_from_its_checkpoint_on_prem(
    tmp_path: Path, start_scheduler: Any, stub: Any, imds: tuple[type[Imds], str]
) -> None:
    app, _parts = start_scheduler(make_settings(tmp_path, INTERRUPTION_RULES))
    data = tmp_path / "data"
    checkpoints = tmp_path / "checkpoints"  # the shared checkpoint root both agents mount
    handler, metadata_url = imds
    agents: list[AgentHandle] = []

    def agent(name: str, pool: str, zone: str, provider: str, pipeline: FakePipeline, **kwargs: Any) -> AgentHandle:
        config = AgentConfig(
            listen="127.0.0.1:0",
            pool=pool,
            trust_zone=zone,  # type: ignore[arg-type]
            provider=provider,
            agent_id=name,
            work_dir=tmp_path / name,
            checkpoint_root=checkpoints,
            allowed_roots=[data],
            metrics_port=0,
            heartbeat_interval_s=0.2,
            models_dir=tmp_path / "models",
        )
        # Two "replicas" on the same scheduler: the comma-separated heartbeat path is exercised too.
        factories = [lambda: grpc.insecure_channel(f"127.0.0.1:{app.port}")] * 2
        handle = serve_agent(
            config, None, scheduler_channel_factories=factories, pipeline=pipeline, job_factory=SwapJob, **kwargs
        )
        agents.append(handle)
        return handle

    cloud_pipeline = FakePipeline(frames=150, frame_seconds=0.02)
    onprem_pipeline = FakePipeline(frames=150, frame_seconds=0.01)
    try:
        cloud = agent(
            "spot-1",
            "cloud-spot",
            "cloud",
            "aws",
            cloud_pipeline,
            interruption_watcher=AwsInterruptionWatcher(metadata_url, timeout_s=0.5),
            interruption_poll_s=0.1,
        )
        agent("onprem-1", "onprem-a", "private", "onprem", onprem_pipeline)
        assert len(cloud.sessions) == 2
        wait_for(lambda: len(app.registry.agents()) == 2, 10, what="both agents heartbeating")

        source = write_image(data / "face.png", 1)
        target = write_image(data / "clip.png", 2)
        task_id = submit(
            stub(app.port),
            public_task(150, source_uri=source.as_uri(), target_uri=target.as_uri(),
                        output_uri=(data / "out.png").as_uri()),
        )  # fmt: skip
        wait_for(lambda: app.store.get(task_id).checkpoint_frame >= 30, 15, what="a checkpoint on the spot agent")
        assert app.store.get(task_id).agent_id == "spot-1"

        handler.notice = {"action": "terminate", "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        wait_for(lambda: app.store.get(task_id).state == "succeeded", 20, what="the task to finish on-prem")
    finally:
        for handle in agents:
            handle.stop(0)

    record = app.store.get(task_id)
    states = [t.to_state for t in app.store.transitions_of(task_id)]
    assert "preempted" in states and states[-1] == "succeeded"
    assert record.agent_id == "onprem-1" and record.pool == "onprem-a"
    assert cloud_pipeline.calls == [task_id] and onprem_pipeline.calls == [task_id]
    resumed_from = onprem_pipeline.jobs[0].resume_from_frame
    assert resumed_from >= 30, "the on-prem run must resume from the spot agent's checkpoint"
    assert Path(onprem_pipeline.jobs[0].checkpoint_dir) == (checkpoints / task_id).resolve()
    assert cloud.runtime.preempting and cloud.runtime.heartbeat_request().preempting


# ---- budget -------------------------------------------------------------------------------------

BUDGET_RULES = BURST_RULES
PRICE = 36.0  # USD/hour = $0.01 per second
FRAMES, FRAME_S = 50, 0.02  # each run takes at least 1.0 s: at least $0.01
REPORTED_SEC_PER_FRAME = 0.022  # the estimate is 10% above the true cost: $0.011
CAP, REMAINING = 0.10, 0.047  # 4 estimates fit (0.044), a 5th does not; after settling < 1 estimate is left


class SlowReportingAgent(HollowAgent):
    def __init__(self, *args: Any, sec_per_frame: float, instance_id: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reported_sec_per_frame = sec_per_frame
        self.instance_id = instance_id

    def heartbeat_request(self) -> scheduler_pb2.HeartbeatRequest:
        request = super().heartbeat_request()
        request.sec_per_frame = self.reported_sec_per_frame
        request.instance_id = self.instance_id
        return request


def test_burst_sends_exactly_the_affordable_tasks_to_the_paid_pool(
    tmp_path: Path, start_scheduler: Any, stub: Any, hollow_agents: list[HollowAgent]
) -> None:
    settings = make_settings(
        tmp_path,
        BUDGET_RULES,
        f"budgets:\n  - {{name: burst, monthly_cap_usd: {CAP}, alert_pct: 80}}\n",
        static_pools=(
            # The run bound without margin or slack: each reservation is the estimate, $0.011.
            PoolConfig(
                name="cloud-spot",
                provider="aws",
                trust_zone="cloud",
                price_per_hour=PRICE,
                spot=True,
                run_margin=1.0,
                run_slack_s=0.0,
            ),
        ),
    )
    app, parts = start_scheduler(settings)
    earlier = Usage("earlier", "promo", "burst", "cloud-spot", "burst", "aws", "i-0", 3600.0, CAP - REMAINING,
                    datetime.now(UTC))  # fmt: skip
    parts.ledger.record(earlier, BudgetAccount("burst", CAP, 80))
    for agent_id, pool, zone, slots, instance in (
        ("onprem-1", "onprem-a", "private", 1, ""),
        ("spot-1", "cloud-spot", "cloud", 8, "i-spot1"),
    ):
        agent = SlowReportingAgent(f"127.0.0.1:{app.port}", agent_id, pool, zone, slots=slots, frame_s=FRAME_S,
                                   sec_per_frame=REPORTED_SEC_PER_FRAME, instance_id=instance)  # fmt: skip
        hollow_agents.append(agent.start())
    wait_for(lambda: len(app.registry.agents()) == 2, 10, what="both agents heartbeating")

    client = stub(app.port)
    ids = [submit(client, public_task(FRAMES)) for _ in range(8)]
    wait_for(lambda: all(app.store.get(i).state == "succeeded" for i in ids), 40, what="the whole burst to finish")

    pools = [app.store.get(i).pool for i in ids]
    month = month_of(datetime.now(UTC))
    estimate = PRICE * FRAMES * REPORTED_SEC_PER_FRAME / 3600.0
    spent = parts.ledger.spent("burst", month)
    # Spend enforcement may stop a run that outgrows its reservation on a loaded machine (its task
    # finishes on-prem); the bound is docs/finance.md's: one accrual step plus the stop per cloud slot.
    bound = 8 * PRICE / 3600 * (2 * settings.cloud.spend_accrual_s)
    assert spent <= CAP + bound
    assert parts.ledger.reserved("burst", month) == 0 and parts.ledger.open_reservations() == []
    with parts.ledger._engine.connect() as conn:
        rows = conn.execute(sa.select(cloud_spend).where(cloud_spend.c.task_id != "earlier")).mappings().all()
    spot = hollow_agents[1]
    assert sorted(r["task_id"] for r in rows) == sorted(i for i in ids for _ in range(spot.executions[i]))
    completed = [r for r in rows if r["outcome"] == "completed"]
    assert sorted(r["task_id"] for r in completed) == sorted(
        i for i, p in zip(ids, pools, strict=True) if p == "cloud-spot"
    )
    assert len({r["task_id"] for r in rows}) >= 4, "the 4 affordable tasks went to the paid pool"
    assert len(completed) <= 4 and pools.count("onprem-a") == 8 - len(completed), pools
    assert spent >= CAP - REMAINING + len(completed) * FRAMES * FRAME_S * PRICE / 3600
    for row in rows:
        assert (row["project"], row["rule"], row["pool"], row["budget"]) == ("promo", "burst", "cloud-spot", "burst")
        assert row["instance_id"] == "i-spot1" and row["usd_per_hour"] == PRICE
        assert row["outcome"] in ("completed", "requeued:budget_stop")
        assert row["estimate_usd"] >= estimate - 1e-12
    # Past the alert percentage: the gauge says so, and the caps reached the ledger from the rules load.
    assert REGISTRY.get_sample_value("facefleet_budget_alert", {"budget": "burst"}) == 1
    assert parts.ledger.accounts()["burst"].monthly_cap_usd == CAP


# ---- provisioner through the scheduler -----------------------------------------------------------

PROVISION_RULES = """
rules:
  - id: burst
    match: {sensitivity: [public]}
    allow: ["onprem-*", "aws-*"]
    prefer: cost
    max_spot_price_per_hour: 1.0
    budget: burst
  - id: default
    match: {}
    allow: ["onprem-*"]
"""


class FixedFeed:
    provider = "aws"

    def refresh(self, now: datetime) -> list[SpotPrice]:
        return [SpotPrice("aws", "us-east-1", "g5.xlarge", 0.5, now)]


def test_burst_launches_a_tagged_spot_instance_registers_it_and_tears_it_down_when_idle(
    tmp_path: Path,
    start_scheduler: Any,
    stub: Any,
    hollow_agents: list[HollowAgent],
    ec2: Any,  # noqa: F811
) -> None:
    pool = CloudPoolConfig(name="aws-use1-g5", provider="aws", region="us-east-1", instance_type="g5.xlarge",
                           max_instances=2, idle_teardown_s=1.0, register_timeout_s=60)  # fmt: skip
    settings = make_settings(
        tmp_path,
        PROVISION_RULES,
        "budgets:\n  - {name: burst, monthly_cap_usd: 100, alert_pct: 80}\n",
        enabled=True,
        cluster="e2e",
        scheduler_address="127.0.0.1:50051",
        pools=[pool],
        aws=AwsCloudConfig(ami_id=AMI),
    )
    app, parts = start_scheduler(
        settings, backends={"aws": AwsSpotBackend(ec2, settings.cloud.aws)}, price_feeds=[FixedFeed()], tick_s=0.2
    )
    assert parts.provisioner is not None
    onprem = HollowAgent(f"127.0.0.1:{app.port}", "onprem-1", "onprem-a", "private", slots=1, frame_s=0.05)
    hollow_agents.append(onprem.start())
    wait_for(lambda: len(app.registry.agents()) == 1, 10, what="the on-prem agent")
    client = stub(app.port)
    long_one = submit(client, public_task(400))
    wait_for(lambda: app.store.get(long_one).state == "running", 10, what="on-prem busy")

    burst = submit(client, public_task(10))

    def launched() -> list[dict[str, Any]]:
        reply = ec2.describe_instances(Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": ["e2e"]}])
        return [i for r in reply["Reservations"] for i in r["Instances"]]

    wait_for(lambda: len(launched()) == 1, 15, what="a spot instance launched for the burst")
    instance = launched()[0]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags[TAG_POOL] == "aws-use1-g5" and tags[TAG_INSTANCE].startswith("ff-")
    assert instance.get("InstanceLifecycle") == "spot" and instance["InstanceType"] == "g5.xlarge"
    assert app.store.get(burst).state == "queued"  # waiting for the instance's agent

    spot = SlowReportingAgent(f"127.0.0.1:{app.port}", "spot-1", "aws-use1-g5", "cloud", slots=1, frame_s=0.01,
                              sec_per_frame=0.01, instance_id=tags[TAG_INSTANCE])  # fmt: skip
    hollow_agents.append(spot.start())
    wait_for(lambda: app.store.get(burst).state == "succeeded", 15, what="the burst task on the new instance")
    assert app.store.get(burst).pool == "aws-use1-g5" and spot.completed[burst] == 1
    assert len(launched()) == 1, "one task needs one instance"

    def terminated() -> bool:
        state = ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"][0]["Instances"][0]
        return bool(state["State"]["Name"] in ("shutting-down", "terminated"))

    wait_for(terminated, 15, what="idle teardown of the instance")
    wait_for(lambda: parts.provisioner.instances() == [], 5, what="the provisioner to drop the instance")
    month = month_of(datetime.now(UTC))
    with parts.ledger._engine.connect() as conn:
        row = conn.execute(sa.select(cloud_spend).where(cloud_spend.c.task_id == burst)).mappings().one()
    assert (row["pool"], row["instance_id"], row["usd_per_hour"]) == ("aws-use1-g5", tags[TAG_INSTANCE], 0.5)
    # The budget pays for the task and for the instance's boot and idle time (booked as the
    # instance's own `idle` rows once the reaper has seen it end), and for nothing else.
    with parts.ledger._engine.connect() as conn:
        rows = conn.execute(sa.select(cloud_spend).where(cloud_spend.c.budget == "burst")).mappings().all()
    idle = (f"instance:{tags[TAG_INSTANCE]}", "idle")
    assert {(r["task_id"], r["outcome"]) for r in rows} <= {(burst, row["outcome"]), idle}
    assert {r["instance_id"] for r in rows} <= {tags[TAG_INSTANCE], instance["InstanceId"]}, [dict(r) for r in rows]
    assert parts.ledger.spent("burst", month) == pytest.approx(sum(r["usd"] for r in rows))
    onprem.kill()
