"""Security and compliance end to end: the real scheduler from `build_scheduler` with mTLS from the
demo PKI, real agents (`agent.server.serve_agent`, RoleGate, mTLS heartbeats) running a recording
fake pipeline, and the audit log the scheduler itself wrote."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from facefleet.agent.server import AgentHandle, serve_agent
from facefleet.cli import app as cli_app
from facefleet.config import (
    AgentConfig,
    AuditConfig,
    PolicyConfig,
    PoolConfig,
    ResidencyConfig,
    SchedulerConfig,
    Settings,
    TLSConfig,
)
from facefleet.rpc_errors import FIELD_KEY, reason_of
from facefleet.scheduler.assembly import AssembledScheduler, build_scheduler
from facefleet.scheduler.dispatcher import DispatcherSettings
from facefleet.scheduler.store import Step
from facefleet.security import certs
from facefleet.security.audit import query, verify
from facefleet.security.roles import RoleGate
from facefleet.security.tls import secure_channel, server_credentials
from facefleet.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.agent.conftest import (
    FakePipelineError,
    ProgressUpdate,
    QualityReport,
    SwapJob,
    SwapResult,
    journal_outcomes,
    write_image,
)
from tests.scheduler.fake_agents import wait_for

TIMEOUT = 10
PUBLIC, PRIVATE = types_pb2.SENSITIVITY_PUBLIC, types_pb2.SENSITIVITY_PRIVATE
# Public work prefers the cloud pool (allow order) and may use on-prem; private stays on-prem.
RULES = """
rules:
  - id: private-onprem
    match: {sensitivity: [private]}
    allow: ["onprem-*"]
    trust_zones: [private]
    prefer: latency
  - id: public-cloud-first
    match: {sensitivity: [public]}
    allow: ["cloud-*", "onprem-*"]
    prefer: order
  - id: default
    match: {}
    allow: ["onprem-*"]
"""
FAST = DispatcherSettings(project_limits={}, lost_grace_s=2.0, backoff_initial_s=0.05, backoff_max_s=0.3, warmup_s=0.5)


@dataclass
class RunRecord:
    """One execution as the agent's pipeline saw it (the agents' own record, not the scheduler's)."""

    task_id: str
    started: float
    resume_from: int
    decided: float = 0.0  # monotonic time the outcome was decided (taken before checking cancel)
    outcome: str = ""


@dataclass
class RecordingPipeline:
    """A fake swap pipeline that records every run; `gate` cleared holds runs before their first
    frame, `midway` cleared holds them after it (frame 1 reported and checkpointed)."""

    frames: int = 3
    frame_seconds: float = 0.01
    engine: str = "classical"
    execution_providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    models: list[Any] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    midway: threading.Event = field(default_factory=threading.Event)
    runs: list[RunRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gate.set()
        self.midway.set()

    def run(self, job: Any, on_progress: Callable[[Any], None], cancelled: threading.Event) -> SwapResult:
        record = RunRecord(job.task_id, time.monotonic(), job.resume_from_frame)
        self.runs.append(record)
        try:
            while not self.gate.wait(0.02):
                if cancelled.is_set():
                    raise FakePipelineError("cancelled", "CANCELLED")
            for done in range(job.resume_from_frame + 1, self.frames + 1):
                if cancelled.is_set():
                    raise FakePipelineError("cancelled", "CANCELLED")
                time.sleep(self.frame_seconds)
                on_progress(ProgressUpdate(done, self.frames, 1.0 / self.frame_seconds, "swap", done))
                while not self.midway.wait(0.02):
                    if cancelled.is_set():
                        raise FakePipelineError("cancelled", "CANCELLED")
            record.decided = time.monotonic()
            if cancelled.is_set():
                raise FakePipelineError("cancelled", "CANCELLED")
            Path(job.output_path).parent.mkdir(parents=True, exist_ok=True)
            Path(job.output_path).write_bytes(b"swapped")
            record.outcome = "succeeded"
            return SwapResult(Path(job.output_path), self.frames, self.engine, QualityReport(0.8, 0.7, 1), 0, {})
        except FakePipelineError:
            record.decided = record.decided or time.monotonic()
            record.outcome = "cancelled"
            raise

    def ran(self) -> set[str]:
        return {run.task_id for run in self.runs}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.init_demo_pki(directory)
    return directory


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other-pki")
    certs.init_demo_pki(directory)
    return directory


class Cluster:
    def __init__(self, tmp: Path, pki: Path, pools: tuple[PoolConfig, ...] = ()) -> None:
        self.tmp = tmp
        self.tls = TLSConfig(dir=pki)
        self.data = tmp / "data"
        self.data.mkdir()
        policy = tmp / "policy"
        policy.mkdir()
        (policy / "rules.yaml").write_text(RULES)
        (policy / "locks.yaml").write_text("locks: []\n")
        self.settings = Settings(
            tls=self.tls,
            scheduler=SchedulerConfig(
                listen="127.0.0.1:0",
                store_url=f"sqlite:///{tmp}/scheduler.db",
                metrics_port=-1,
                heartbeat_timeout_s=3.0,
                pools=list(pools),
            ),
            policy=PolicyConfig(dir=policy),
            audit=AuditConfig(path=tmp / "audit.jsonl"),
            residency=ResidencyConfig(private_storage_prefixes=[self.data.as_uri()]),
        )
        self.app: AssembledScheduler = build_scheduler(self.settings, dispatcher_settings=FAST).start()
        self.address = f"127.0.0.1:{self.app.port}"
        self.agents: list[AgentHandle] = []
        self.channels: list[grpc.Channel] = []
        self.source = write_image(self.data / "source.png", 1)
        self.target = write_image(self.data / "target.png", 2)

    def start_agent(
        self, agent_id: str, pool: str, zone: str, pipeline: RecordingPipeline, slots: int = 1, **agent: Any
    ) -> AgentHandle:
        config = AgentConfig(
            listen="127.0.0.1:0",
            pool=pool,
            trust_zone=zone,  # type: ignore[arg-type]
            provider="onprem" if zone == "private" else "aws",
            slots=slots,
            agent_id=agent_id,
            work_dir=self.tmp / agent_id / "work",
            checkpoint_root=self.tmp / agent_id / "checkpoints",
            allowed_roots=[self.data],
            metrics_port=0,
            heartbeat_interval_s=0.2,
            **agent,
        )
        handle = serve_agent(
            config,
            server_credentials(self.tls, "agent"),
            [RoleGate(None)],
            scheduler_channel_factory=lambda: secure_channel(self.address, self.tls, "agent"),
            pipeline=pipeline,
            job_factory=SwapJob,
        )
        self.agents.append(handle)
        wait_for(lambda: self.app.registry.get(agent_id) is not None, 10, what=f"agent {agent_id} to heartbeat")
        return handle

    def channel(self, identity: str, tls: TLSConfig | None = None) -> grpc.Channel:
        channel = secure_channel(self.address, tls or self.tls, identity)
        self.channels.append(channel)
        return channel

    def scheduler(self, identity: str = "submitter") -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self.channel(identity))

    def admin(self, identity: str = "compliance") -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.channel(identity))

    def task(self, project: str, sensitivity: int, name: str, **overrides: Any) -> types_pb2.Task:
        fields: dict[str, Any] = {
            "project": project,
            "sensitivity": sensitivity,
            "priority": types_pb2.PRIORITY_NORMAL,
            "frames": 3,
            "source_uri": self.source.as_uri(),
            "target_uri": self.target.as_uri(),
            "output_uri": (self.data / "out" / f"{name}.png").as_uri(),
        }
        fields.update(overrides)
        return types_pb2.Task(**fields)

    def submit(self, task: types_pb2.Task) -> str:
        reply = self.scheduler().SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task), timeout=TIMEOUT)
        return str(reply.task_id)

    def state(self, task_id: str) -> str:
        return self.app.store.get(task_id).state

    def stop(self) -> None:
        for channel in self.channels:
            channel.close()
        self.app.stop()
        for handle in self.agents:
            handle.stop(grace=None)


@pytest.fixture
def cluster(tmp_path: Path, pki: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path, pki)
    yield running
    running.stop()


def trailer(error: grpc.RpcError, key: str) -> str:
    return next((str(value) for name, value in getattr(error, "trailing_metadata", tuple)() or () if name == key), "")


def audit_records(cluster: Cluster, kind: str) -> list[dict[str, Any]]:
    return query(cluster.settings.audit.path, kind=kind)


# ---- authentication and roles ---------------------------------------------------------------------


def test_clients_without_a_valid_certificate_or_role_are_refused_and_denials_audited(
    cluster: Cluster, pki: Path, other_pki: Path
) -> None:
    request = scheduler_pb2.SubmitTaskRequest(task=cluster.task("demo", PUBLIC, "x"))
    # No client certificate: the TLS handshake fails (cannot be audited in Python gRPC; see docs).
    bare = grpc.secure_channel(cluster.address, grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes()))
    cluster.channels.append(bare)
    with pytest.raises(grpc.RpcError) as no_cert:
        scheduler_pb2_grpc.SchedulerStub(bare).SubmitTask(request, timeout=TIMEOUT)
    assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
    # A submitter certificate from another CA: refused at the handshake too.
    foreign = TLSConfig(dir=other_pki, ca=pki / "ca.pem")
    with pytest.raises(grpc.RpcError) as other_ca:
        scheduler_pb2_grpc.SchedulerStub(cluster.channel("submitter", foreign)).SubmitTask(request, timeout=TIMEOUT)
    assert other_ca.value.code() == grpc.StatusCode.UNAVAILABLE
    # Valid certificates with the wrong role: PERMISSION_DENIED, and audited by the live scheduler.
    with pytest.raises(grpc.RpcError) as wrong_role:
        cluster.scheduler("finance").SubmitTask(request, timeout=TIMEOUT)
    assert wrong_role.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(wrong_role.value) == "PERMISSION_DENIED_ROLE"
    with pytest.raises(grpc.RpcError) as not_compliance:
        cluster.admin("submitter").LockProject(
            admin_pb2.LockProjectRequest(project="demo", reason="try"), timeout=TIMEOUT
        )
    assert not_compliance.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert cluster.submit(cluster.task("demo", PUBLIC, "ok"))  # the right role still gets in

    denials = audit_records(cluster, "denial")
    assert [(d["actor"], d["method"]) for d in denials] == [
        ("finance", "/facefleet.v1.Scheduler/SubmitTask"),
        ("submitter", "/facefleet.v1.Admin/LockProject"),
    ]
    assert denials[1]["required_roles"] == ["compliance"] and denials[1]["roles"] == ["submitter"]
    assert verify(cluster.settings.audit.path).ok


# ---- residency at intake ---------------------------------------------------------------------------


def test_private_task_outside_the_storage_allow_list_is_refused_naming_the_field_and_audited(
    cluster: Cluster,
) -> None:
    outside = "file:///mnt/shared/people/jane-doe.png"
    stub = cluster.scheduler()
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitTask(
            scheduler_pb2.SubmitTaskRequest(task=cluster.task("clinic", PRIVATE, "a", target_uri=outside)),
            timeout=TIMEOUT,
        )
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(error.details() or "")
    assert "task.target_uri" in details and "allowed" in details
    assert trailer(error, FIELD_KEY) == "task.target_uri"
    assert reason_of(error) == "RESIDENCY_VIOLATION"
    # A public task may use other storage; a public task of a locked project may not.
    assert cluster.submit(cluster.task("open", PUBLIC, "b", target_uri=outside))
    cluster.admin().LockProject(admin_pb2.LockProjectRequest(project="open", reason="hold"), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as locked:
        stub.SubmitTask(
            scheduler_pb2.SubmitTaskRequest(task=cluster.task("open", PUBLIC, "c", source_uri=outside)),
            timeout=TIMEOUT,
        )
    assert trailer(locked.value, FIELD_KEY) == "task.source_uri"

    refusals = [r for r in audit_records(cluster, "residency_refusal") if r["actor"] == "submitter"]
    assert [(r["project"], r["field"]) for r in refusals] == [
        ("clinic", "task.target_uri"),
        ("open", "task.source_uri"),
    ]
    assert all(r["uri"].startswith("file:///…#sha256:") for r in refusals)
    assert "jane-doe" not in cluster.settings.audit.path.read_text()  # never a full private path
    assert verify(cluster.settings.audit.path).ok


def test_a_batch_refuses_only_the_items_outside_the_allow_list_and_audits_each(cluster: Cluster) -> None:
    outside = "file:///mnt/shared/people/john-roe.png"
    items = [
        scheduler_pb2.SubmitTaskRequest(task=cluster.task("clinic", PRIVATE, "inside")),
        scheduler_pb2.SubmitTaskRequest(task=cluster.task("clinic", PRIVATE, "outside", target_uri=outside)),
        scheduler_pb2.SubmitTaskRequest(task=cluster.task("open", PUBLIC, "public", target_uri=outside)),
    ]
    reply = cluster.scheduler().SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=items), timeout=TIMEOUT)
    assert [result.WhichOneof("outcome") for result in reply.results] == ["submitted", "error", "submitted"]
    refused = reply.results[1].error
    assert refused.reason == types_pb2.RESIDENCY_VIOLATION and refused.field == "items[1].task.target_uri"
    assert "allowed" in refused.message
    refusals = [r for r in audit_records(cluster, "residency_refusal") if r["actor"] == "submitter"]
    assert [(r["project"], r["field"]) for r in refusals] == [("clinic", "task.target_uri")]
    assert "john-roe" not in cluster.settings.audit.path.read_text()
    with pytest.raises(grpc.RpcError) as denied:  # the same role gate as SubmitTask
        cluster.scheduler("finance").SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=items[:1]), timeout=TIMEOUT)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert verify(cluster.settings.audit.path).ok


# ---- project locks ---------------------------------------------------------------------------------


def on_prem_held_by_a_private_task(cluster: Cluster) -> tuple[RecordingPipeline, RecordingPipeline]:
    """An on-prem and a cloud agent, one slot each; a private task holds the on-prem slot (its
    pipeline's gate is closed) until the test opens `onprem.gate`."""
    onprem, cloud = RecordingPipeline(), RecordingPipeline()
    cluster.start_agent("onprem-1", "onprem-a", "private", onprem)
    cluster.start_agent("cloud-1", "cloud-a", "cloud", cloud)
    onprem.gate.clear()
    blocker = cluster.submit(cluster.task("clinic", PRIVATE, "blocker"))
    wait_for(lambda: cluster.state(blocker) == "running", 10, what="the private task to hold on-prem")
    return onprem, cloud


def test_lock_while_queued_for_cloud_keeps_the_project_on_prem_and_the_audit_proves_it(cluster: Cluster) -> None:
    onprem, cloud = on_prem_held_by_a_private_task(cluster)
    cloud.gate.clear()
    running_on_cloud = cluster.submit(cluster.task("promo-p", PUBLIC, "p0"))
    wait_for(lambda: cluster.state(running_on_cloud) == "running", 10, what="promo-p's first task on the cloud")
    queued = [cluster.submit(cluster.task("promo-p", PUBLIC, f"p{i}")) for i in range(1, 4)]
    time.sleep(0.5)  # both pools are full: the dispatcher leaves them queued (their rule prefers the cloud)
    assert all(cluster.state(t) == "queued" for t in queued)
    cluster.admin().LockProject(
        admin_pb2.LockProjectRequest(project="promo-p", reason="talent contract"), timeout=TIMEOUT
    )
    locked_at = time.monotonic()
    cloud.gate.set()  # the cloud agent is free from now on
    time.sleep(1.0)  # several dispatch passes with a free cloud slot and locked work waiting
    assert cluster.state(running_on_cloud) == "queued"  # stopped on the cloud, waiting for on-prem
    onprem.gate.set()
    every = [running_on_cloud, *queued]
    wait_for(lambda: all(cluster.state(t) == "succeeded" for t in every), 20, what="promo-p to finish on-prem")

    # From the agents' own records: the running cloud task was stopped, nothing of promo-p ran there after.
    cloud_runs = [run for run in cloud.runs if run.task_id in every]
    assert [run.task_id for run in cloud_runs] == [running_on_cloud]
    assert cloud_runs[0].outcome == "cancelled" and cloud_runs[0].decided <= locked_at + 0.5
    assert set(every) <= {run.task_id for run in onprem.runs if run.outcome == "succeeded"}
    rerun = [run for run in onprem.runs if run.task_id == running_on_cloud]
    assert rerun and rerun[-1].resume_from == 0  # re-run from the start, no cloud checkpoint
    for task_id in every:
        assert cluster.app.store.get(task_id).pool == "onprem-a"

    audit_path = cluster.settings.audit.path
    lock_acts = [r for r in audit_records(cluster, "admin") if r["act"] == "lock_enforcement"]
    assert [(r["args"]["task"], r["args"]["action"]) for r in lock_acts] == [
        (running_on_cloud, "stop_and_rerun_onprem")
    ]
    since = query(audit_path, project="promo-p", kind="lock")[0]["at"]
    runner = CliRunner()
    proof = runner.invoke(
        cli_app, ["audit", "proof", "--project", "promo-p", "--since", since, "--path", str(audit_path)]
    )
    assert proof.exit_code == 0, proof.output
    # Over the whole history the proof fails: promo-p's first task was dispatched to the cloud before the lock.
    whole = runner.invoke(cli_app, ["audit", "proof", "--project", "promo-p", "--path", str(audit_path)])
    assert whole.exit_code != 0, whole.output
    verified = runner.invoke(cli_app, ["audit", "verify", str(audit_path)])
    assert verified.exit_code == 0, verified.output


def test_a_run_stopped_by_a_lock_after_its_checkpoint_reruns_on_prem_from_frame_zero(cluster: Cluster) -> None:
    """The cloud run has checkpointed frame 1 when its project is locked: the on-prem re-run starts
    from frame 0 (compliance asks for a fresh start, and on-prem agents cannot read the cloud's
    checkpoint root). The stop forgets the checkpoint in its own commit, and a report the stopped
    run sends after it cannot bring one back (tests/scheduler/test_store.py covers that fence)."""
    onprem, cloud = on_prem_held_by_a_private_task(cluster)
    cloud.midway.clear()
    task_id = cluster.submit(cluster.task("promo-c", PUBLIC, "c0"))
    wait_for(lambda: cluster.app.store.get(task_id).checkpoint_frame == 1, 10, what="a checkpoint on the cloud")
    cluster.admin().LockProject(admin_pb2.LockProjectRequest(project="promo-c", reason="talent"), timeout=TIMEOUT)
    wait_for(lambda: [run.outcome for run in cloud.runs] == ["cancelled"], 10, what="the cloud run to stop")
    time.sleep(0.3)  # its last reports reach the scheduler
    record = cluster.app.store.get(task_id)
    assert (record.state, record.checkpoint_frame, record.checkpoint_uri) == ("queued", 0, "")
    onprem.gate.set()
    wait_for(lambda: cluster.state(task_id) == "succeeded", 20, what="the re-run on-prem")
    assert [(run.task_id, run.resume_from) for run in onprem.runs][-1] == (task_id, 0)


def test_a_checkpoint_the_agent_cannot_read_is_dropped_and_the_task_runs_from_frame_zero(cluster: Cluster) -> None:
    """A task preempted on a pool whose checkpoint root the on-prem agents do not share: the agent
    refuses the checkpoint (never reads outside its root), and the task runs from frame 0 instead of
    failing."""
    task_id = cluster.submit(cluster.task("promo-r", PUBLIC, "r0"))  # no agent yet: it waits in the queue
    store, now = cluster.app.store, time.time()
    steps = [Step("placed", "p", pool="cloud-b"), Step("dispatched", "d", agent_id="spot-9", count_attempt=True)]
    assert store.transition_chain(task_id, steps, now, expect_from="queued")
    elsewhere = (cluster.tmp / "cloud-b-checkpoints" / task_id).as_uri() + "/"
    store.record_progress(task_id, "spot-9", types_pb2.Progress(checkpoint_frame=2, checkpoint_uri=elsewhere), now)
    assert store.transition(task_id, "preempted", "spot interruption", now, expect_agent="spot-9")
    assert store.transition(task_id, "queued", "resume after preemption", now, agent_id="")
    onprem = RecordingPipeline()
    cluster.start_agent("onprem-1", "onprem-a", "private", onprem)
    wait_for(lambda: cluster.state(task_id) == "succeeded", 20, what="the task to run on-prem")
    assert [(run.task_id, run.resume_from) for run in onprem.runs] == [(task_id, 0)]
    reasons = [t.reason for t in store.transitions_of(task_id)]
    assert any("checkpoint_uri" in r and "start from frame 0" in r for r in reasons), reasons


@pytest.mark.slow
def test_fuzzed_flow_with_random_locks_never_runs_private_or_locked_work_on_the_cloud_agent(
    cluster: Cluster,
) -> None:
    rng = random.Random(20240607)
    onprem, cloud = RecordingPipeline(frame_seconds=0.02), RecordingPipeline(frame_seconds=0.02)
    cluster.start_agent("onprem-1", "onprem-a", "private", onprem, slots=2)
    cluster.start_agent("cloud-1", "cloud-a", "cloud", cloud, slots=2)
    projects = ["alpha", "beta", "gamma"]
    admin = cluster.admin()
    lock_intervals: dict[str, list[list[float]]] = {p: [] for p in projects}
    meta: dict[str, tuple[str, int]] = {}
    for index in range(48):
        project = rng.choice(projects)
        sensitivity: int = PRIVATE if rng.random() < 0.3 else PUBLIC
        meta[cluster.submit(cluster.task(project, sensitivity, f"f{index}"))] = (project, sensitivity)
        if index % 8 == 4:
            target = rng.choice(projects)
            intervals = lock_intervals[target]
            if intervals and len(intervals[-1]) == 1:  # locked: unlock it
                intervals[-1].append(time.monotonic())  # counted locked until the unlock was asked for
                admin.UnlockProject(admin_pb2.UnlockProjectRequest(project=target, reason="cleared"), timeout=TIMEOUT)
            else:
                admin.LockProject(admin_pb2.LockProjectRequest(project=target, reason="audit"), timeout=TIMEOUT)
                intervals.append([time.monotonic()])
        time.sleep(rng.uniform(0.0, 0.06))
    wait_for(lambda: all(cluster.state(t) == "succeeded" for t in meta), 40, what="every fuzzed task to succeed")

    def locked_during(project: str, start: float, end: float) -> bool:
        return any(iv[0] < end and start < (iv[1] if len(iv) > 1 else float("inf")) for iv in lock_intervals[project])

    assert cloud.runs, "the fuzz must exercise the cloud agent"
    for run in cloud.runs:
        project, sensitivity = meta[run.task_id]
        assert sensitivity != PRIVATE, f"private task {run.task_id} ran on the cloud agent"
        if run.outcome == "succeeded":  # finished work on the cloud: its project was never locked meanwhile
            assert not locked_during(project, run.started, run.decided), (run, lock_intervals[project])
    assert any(len(iv) for ivs in lock_intervals.values() for iv in ivs)
    assert verify(cluster.settings.audit.path).ok
    # Completion records are queued behind the store's commit: give the audit writer its batch.
    wait_for(lambda: len(audit_records(cluster, "completion")) >= len(meta), 10, what="every completion audited")
    completions = {r["task"]: r for r in audit_records(cluster, "completion")}
    assert set(completions) == set(meta)
    private_ids = {t for t, (_, s) in meta.items() if s == PRIVATE}
    assert all(completions[t]["trust_zone"] == "private" for t in private_ids)
    print(json.dumps({"tasks": len(meta), "cloud_runs": len(cloud.runs), "locks": lock_intervals}))


def test_lock_recalls_prefetched_cloud_assignments_before_they_start(tmp_path: Path, pki: Path) -> None:
    """Prefetch 2 on the cloud pool: its one-slot agent holds one run and two waiting assignments, never
    more (its own bound is looser); a lock recalls all three and the waiting ones never start."""
    cloud_pool = PoolConfig(name="cloud-a", provider="aws", trust_zone="cloud", prefetch=2)
    onprem_pool = PoolConfig(name="onprem-a", provider="onprem", trust_zone="private")  # its agent comes later
    cluster = Cluster(tmp_path, pki, pools=(cloud_pool, onprem_pool))
    try:
        onprem, cloud = RecordingPipeline(), RecordingPipeline()
        cloud.gate.clear()
        agent = cluster.start_agent("cloud-1", "cloud-a", "cloud", cloud, max_waiting=5)
        tasks = [cluster.submit(cluster.task("promo-q", PUBLIC, f"q{i}")) for i in range(4)]
        wait_for(lambda: len(agent.runtime.running_task_ids()) == 3, 10, what="1 running + 2 prefetched on the cloud")
        time.sleep(0.5)  # several dispatch passes: slots + prefetch is the bound
        held = agent.runtime.running_task_ids()
        assert len(held) == 3 and len(agent.runtime.waiting_task_ids()) == 2 and len(cloud.runs) == 1
        (left_queued,) = set(tasks) - set(held)
        assert cluster.state(left_queued) == "queued"
        cluster.admin().LockProject(
            admin_pb2.LockProjectRequest(project="promo-q", reason="talent contract"), timeout=TIMEOUT
        )
        wait_for(lambda: not agent.runtime.running_task_ids(), 10, what="the lock to recall the cloud work")
        cloud.gate.set()
        cluster.start_agent("onprem-1", "onprem-a", "private", onprem, slots=4)
        wait_for(lambda: all(cluster.state(t) == "succeeded" for t in tasks), 20, what="promo-q to finish on-prem")

        # From the cloud agent's own records: one run reached the pipeline and was stopped; the two
        # prefetched ones ended in its journal as cancelled before they started.
        assert len(cloud.runs) == 1 and cloud.runs[0].outcome == "cancelled"
        outcomes = journal_outcomes(tmp_path / "cloud-1" / "work")
        assert set(outcomes) == set(held)
        waited = [t for t in held if t != cloud.runs[0].task_id]
        for task_id in waited:
            outcome = outcomes[task_id]
            assert outcome is not None and outcome.state == types_pb2.TASK_STATE_CANCELLED
            assert outcome.stage == "waiting" and "before it started" in outcome.message
        assert set(tasks) <= onprem.ran()
        assert all(cluster.app.store.get(t).pool == "onprem-a" for t in tasks)
    finally:
        cluster.stop()
