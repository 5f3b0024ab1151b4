"""`facefleet up`: the whole system on one machine, on the embedded defaults.

It lays out a working directory (local CA, a copy of the default policies, sample inputs: two
public-domain portraits, Grace Hopper as the source face and the NASA astronaut as the targets),
starts a scheduler and two agents as real processes — an on-prem pool (trust zone private) and a
local pool marked as cloud — locks a project as compliance would, submits a small workload over
mTLS, follows it live and prints what went where and why. Everything it starts it stops again,
unless `--keep-running`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc

from facefleet.domain import state_name
from facefleet.scheduler.rules_source.files import default_policy_dir
from facefleet.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2

ASSETS = Path(__file__).resolve().parent / "demo_assets"
TERMINAL = {types_pb2.TASK_STATE_SUCCEEDED, types_pb2.TASK_STATE_FAILED, types_pb2.TASK_STATE_CANCELLED}
ONPREM_POOL, CLOUD_POOL, CLOUD_PRICE = "onprem-local", "cloud-local", 0.35
LOCKED_PROJECT = "film-x"
DEMO_MARKER = ".facefleet-demo"  # only a directory holding it is replaced by the next `facefleet up`


class DemoError(RuntimeError):
    """Something the user can act on went wrong while bringing the demo up."""


@dataclass(frozen=True)
class DemoTask:
    name: str
    project: str
    sensitivity: str
    priority: str
    target: str

    def to_proto(self, layout: DemoLayout) -> types_pb2.Task:
        return types_pb2.Task(
            project=self.project,
            sensitivity=f"SENSITIVITY_{self.sensitivity.upper()}",
            priority=f"PRIORITY_{self.priority.upper()}",
            sla_seconds=600,
            frames=1,
            source_uri=(layout.inputs / "source-face.jpg").resolve().as_uri(),
            target_uri=(layout.inputs / self.target).resolve().as_uri(),
            output_uri=(layout.outputs / f"{self.name}.jpg").resolve().as_uri(),
            options=types_pb2.PipelineOptions(face_selector="largest", mask="inswapper", blend=1.0),
            labels={"demo": self.name},
        )


# The sample workload: a private task, a locked-project task, and a burst of public urgent work
# bigger than the one on-prem slot, so the promo rule bursts part of it to the cloud-zone pool.
WORKLOAD = (
    DemoTask("hr-private-1", "hr-onboarding", "private", "normal", "target-1.jpg"),
    DemoTask("film-x-locked", LOCKED_PROJECT, "public", "urgent", "target-2.jpg"),
    *(DemoTask(f"promo-burst-{i}", "promo-spring", "public", "urgent", f"target-{i % 4 + 1}.jpg") for i in range(1, 5)),
    DemoTask("hr-private-2", "hr-onboarding", "private", "high", "target-3.jpg"),
)


@dataclass
class DemoLayout:
    root: Path

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def policies(self) -> Path:
        return self.root / "policies"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def config(self) -> Path:
        return self.root / "facefleet.toml"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def marker(self) -> Path:
        return self.root / DEMO_MARKER


@dataclass
class RunningStack:
    layout: DemoLayout
    scheduler_address: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
                print(f"warning: {name} did not stop on SIGTERM and was killed", file=sys.stderr)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = self.layout.logs / f"{name}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise DemoError(f"{name} exited with code {process.returncode}; last log lines:\n{tail}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(root: Path, fresh: bool = True) -> DemoLayout:
    """Create the working directory: certificates, policies, inputs, models, config."""
    from facefleet.security.certs import init_demo_pki

    layout = DemoLayout(root.resolve())
    if fresh and layout.root.exists():
        if not layout.marker.is_file() and (not layout.root.is_dir() or any(layout.root.iterdir())):
            raise DemoError(
                f"{layout.root} exists and is not a facefleet demo directory (no {DEMO_MARKER}); the demo "
                "would replace its contents: pass --dir with a new or empty directory"
            )
        shutil.rmtree(layout.root)
    for directory in (layout.root, layout.inputs, layout.outputs, layout.models, layout.logs):
        directory.mkdir(parents=True, exist_ok=True)
    layout.marker.write_text("made by `facefleet up`: the next run replaces this directory\n")
    init_demo_pki(layout.certs, force=True)
    shutil.copytree(default_policy_dir(), layout.policies, dirs_exist_ok=True, ignore=shutil.ignore_patterns("tests"))
    # Compliance locks the demo project live (audited); start with no locks on file.
    (layout.policies / "locks.yaml").write_text("locks: []\n")
    (layout.models / "manifest.toml").write_text(
        "# No verified ONNX models here: agents run the landmark (no-weights) engine.\n"
        "# See models/manifest.toml in the repository for the production ONNX entries.\n"
    )
    make_sample_inputs(layout.inputs)
    write_task_file(layout.root / "tasks.yaml")
    layout.config.write_text(render_config(layout, scheduler_port=free_port()))
    return layout


def write_task_file(path: Path) -> None:
    """The workload in the offline task format, for `facefleet explain tasks.yaml --world ...`."""
    import yaml

    tasks = [
        {"id": t.name, "project": t.project, "sensitivity": t.sensitivity, "priority": t.priority,
         "sla_seconds": 600, "frames": 1}
        for t in WORKLOAD
    ]  # fmt: skip
    path.write_text(yaml.safe_dump(tasks, sort_keys=False))


def make_sample_inputs(directory: Path) -> None:
    """Grace Hopper as the source face; four targets derived from the astronaut portrait."""
    portrait = cv2.imread(str(ASSETS / "astronaut.jpg"))
    source = cv2.imread(str(ASSETS / "grace_hopper.jpg"))
    if portrait is None or source is None:
        raise DemoError(f"demo assets in {ASSETS} are missing or unreadable; reinstall facefleet")
    cv2.imwrite(str(directory / "source-face.jpg"), source)
    variants = {
        "target-1.jpg": portrait,
        "target-2.jpg": cv2.convertScaleAbs(portrait, alpha=0.9, beta=-10),
        "target-3.jpg": cv2.GaussianBlur(portrait, (3, 3), 0),
        "target-4.jpg": cv2.convertScaleAbs(portrait, alpha=1.1, beta=5),
    }
    for name, image in variants.items():
        cv2.imwrite(str(directory / name), image)


def render_config(layout: DemoLayout, scheduler_port: int) -> str:
    root = layout.root
    return f"""# facefleet demo configuration (written by `facefleet up`)
log_format = "json"

[tls]
dir = "{layout.certs}"

[policy]
source = "file"
dir = "{layout.policies}"

[scheduler]
listen = "127.0.0.1:{scheduler_port}"
store_url = "sqlite:///{root / "facefleet.db"}"
metrics_port = 0
heartbeat_timeout_s = 6.0
lost_grace_s = 6.0

[[scheduler.pools]]
name = "{ONPREM_POOL}"
provider = "onprem"
trust_zone = "private"
region = "dc1"
sec_per_frame = 0.5

[[scheduler.pools]]
name = "{CLOUD_POOL}"
provider = "local"
trust_zone = "cloud"
region = "local"
instance_type = "demo.gpu"
spot = true
price_per_hour = {CLOUD_PRICE}
sec_per_frame = 0.5

[agent]
heartbeat_interval_s = 1.0
checkpoint_root = "{root / "checkpoints"}"
allowed_roots = ["{layout.inputs}", "{layout.outputs}"]

[residency]
private_storage_prefixes = ["{layout.root.as_uri()}/"]

[audit]
path = "{layout.audit}"

[console]
listen = "127.0.0.1:{free_port()}"
"""


def _spawn(layout: DemoLayout, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    log = (layout.logs / f"{name}.log").open("wb")
    env = {**os.environ, "FACEFLEET_CONFIG": str(layout.config), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "facefleet", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=layout.root,
        start_new_session=True,  # Ctrl-C reaches only the demo, which then stops these cleanly
    )


def start_stack(layout: DemoLayout) -> RunningStack:
    from facefleet.config import load_settings

    settings = load_settings(layout.config)
    address = settings.scheduler.listen
    stack = RunningStack(layout, address)
    stack.processes["scheduler"] = _spawn(layout, "scheduler", ["scheduler", "run", "--config", str(layout.config)])
    wait_for_health(stack, address, "scheduler", timeout_s=60)
    from facefleet.agent.pipeline.provenance import c2pa_available

    # Signed C2PA manifests need the `provenance` extra; without it outputs are labelled, unsigned.
    signing = (
        ["--c2pa-cert", str(layout.certs / "c2pa-signer.pem"), "--c2pa-key", str(layout.certs / "c2pa-signer-key.pem")]
        if c2pa_available()
        else []
    )
    for name, pool, zone, provider, slots in (
        ("agent-onprem", ONPREM_POOL, "private", "onprem", 1),
        ("agent-cloud", CLOUD_POOL, "cloud", "local", 2),
    ):
        stack.processes[name] = _spawn(
            layout,
            name,
            [
                "agent", "run", "--config", str(layout.config), "--pool", pool, "--trust-zone", zone,
                "--provider", provider, "--scheduler", address, "--models", str(layout.models),
                "--listen", f"127.0.0.1:{free_port()}", "--slots", str(slots), "--metrics-port", "0",
                "--tls-dir", str(layout.certs), "--work-dir", str(layout.root / "work" / name),
                *signing,
                "--allowed-root", str(layout.inputs), "--allowed-root", str(layout.outputs),
            ],
        )  # fmt: skip
    return stack


def start_console(stack: RunningStack, timeout_s: float = 30) -> str:
    """Serve the web console beside the stack; its sign-in address for the local user, every human role."""
    from facefleet.config import load_settings
    from facefleet.console.tokens import default_subject, sign_in_url
    from facefleet.security.roles import HUMAN_ROLES

    settings = load_settings(stack.layout.config)
    serve = ["console", "serve", "--config", str(stack.layout.config)]
    stack.processes["console"] = _spawn(stack.layout, "console", serve)
    host, port = settings.console.listen.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        stack.check_alive()
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                where = settings.console.listen
                raise DemoError(f"the console did not listen on {where} within {timeout_s:.0f} s") from None
            time.sleep(0.2)
    url, _ = sign_in_url(settings, HUMAN_ROLES, default_subject())
    return url


@contextmanager
def client_channel(layout: DemoLayout, address: str, identity: str) -> Iterator[grpc.Channel]:
    from facefleet.config import load_settings
    from facefleet.security.tls import secure_channel

    settings = load_settings(layout.config)
    channel = secure_channel(address, settings.tls, identity, insecure=False)
    try:
        yield channel
    finally:
        channel.close()


def wait_for_health(stack: RunningStack, address: str, name: str, timeout_s: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            with client_channel(stack.layout, address, "operator") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as error:
            last_error = str(error.details() if isinstance(error, grpc.Call) else error)
        time.sleep(0.3)
    raise DemoError(f"{name} at {address} did not become healthy within {timeout_s:.0f} s: {last_error}")


def wait_for_pools(stack: RunningStack, timeout_s: float = 60) -> None:
    """Until a dry-run placement sees capacity in both pools (both agents have heartbeated)."""
    probe = types_pb2.Task(
        project="demo-probe",
        sensitivity=types_pb2.SENSITIVITY_PUBLIC,
        priority=types_pb2.PRIORITY_URGENT,
        frames=1,
        source_uri="file:///probe.jpg",
        target_uri="file:///probe.jpg",
    )
    deadline = time.monotonic() + timeout_s
    live: set[str] = set()
    with client_channel(stack.layout, stack.scheduler_address, "operator") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        while time.monotonic() < deadline:
            stack.check_alive()
            decision = stub.Explain(scheduler_pb2.ExplainRequest(task=probe), timeout=5)
            # Filters run in order; a pool dropped after `capacity` has live agents with free slots.
            live = {c.pool for c in decision.candidates if c.feasible or c.failed_filter not in ("health", "capacity")}
            if {ONPREM_POOL, CLOUD_POOL} <= live:
                return
            time.sleep(0.5)
    raise DemoError(f"agents did not register with the scheduler within {timeout_s:.0f} s (pools live: {live})")


def lock_project(stack: RunningStack, project: str, reason: str) -> None:
    with client_channel(stack.layout, stack.scheduler_address, "compliance") as channel:
        admin_pb2_grpc.AdminStub(channel).LockProject(
            admin_pb2.LockProjectRequest(project=project, reason=reason), timeout=10
        )


def submit_workload(stack: RunningStack) -> dict[str, str]:
    """Submit every demo task (idempotent keys, so a retry never duplicates); name → task id."""
    ids: dict[str, str] = {}
    with client_channel(stack.layout, stack.scheduler_address, "submitter") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for task in WORKLOAD:
            reply = stub.SubmitTask(
                scheduler_pb2.SubmitTaskRequest(task=task.to_proto(stack.layout), idempotency_key=f"demo-{task.name}"),
                timeout=10,
            )
            ids[task.name] = reply.task_id
    return ids


def follow(
    stack: RunningStack,
    ids: dict[str, str],
    render: Callable[[dict[str, scheduler_pb2.TaskStatus]], None],
    timeout_s: float = 180,
) -> dict[str, scheduler_pb2.TaskStatus]:
    statuses: dict[str, scheduler_pb2.TaskStatus] = {}
    deadline = time.monotonic() + timeout_s
    with client_channel(stack.layout, stack.scheduler_address, "operator") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        while True:
            stack.check_alive()
            for name, task_id in ids.items():
                statuses[name] = stub.GetTask(scheduler_pb2.GetTaskRequest(task_id=task_id), timeout=10)
            render(statuses)
            if all(s.state in TERMINAL for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the workload did not finish within {timeout_s:.0f} s; see logs in {stack.layout.logs}"
                )
            time.sleep(0.5)


def summary_rows(layout: DemoLayout, statuses: dict[str, scheduler_pb2.TaskStatus]) -> list[dict[str, Any]]:
    from facefleet.console.pages import id_similarity

    rows = []
    for task in WORKLOAD:
        status = statuses[task.name]
        similarity = id_similarity(status.last_progress)
        output = layout.outputs / f"{task.name}.jpg"
        rows.append(
            {
                "task": task.name,
                "id": status.task.id,
                "project": task.project,
                "sensitivity": task.sensitivity,
                "state": state_name(status.state),
                "pool": status.pool,
                "rule": status.rule,
                "why": why(status.placement),
                "output": str(output) if output.exists() else "",
                "id_similarity": None if similarity is None else round(similarity, 3),
                "engine": status.last_progress.engine,
            }
        )
    return rows


def why(decision: types_pb2.PlacementDecision) -> str:
    """One line: the chosen pool, then each pool that was dropped and the filter that dropped it."""
    dropped = [f"{c.pool} dropped by {c.failed_filter} ({c.detail})" for c in decision.candidates if not c.feasible]
    chosen = f"{decision.pool} chosen" if decision.pool else decision.reason
    return "; ".join([chosen, *dropped])


def check_demo_promises(rows: list[dict[str, Any]]) -> list[str]:
    """What the demo must show; each broken promise is returned as a sentence."""
    problems = []
    for row in rows:
        if row["state"] != "succeeded":
            problems.append(f"{row['task']} ended {row['state']}")
        private = row["sensitivity"] == "private" or row["project"] == LOCKED_PROJECT
        if private and row["pool"] != ONPREM_POOL:
            problems.append(f"RESIDENCY: {row['task']} ran on {row['pool']}")
    if not any(r["pool"] == CLOUD_POOL for r in rows):
        problems.append("no public task burst to the cloud-zone pool")
    return problems
