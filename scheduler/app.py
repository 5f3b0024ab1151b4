"""Wire the scheduler together: store, group commit, rules, capacity, leader lock, dispatcher,
gRPC server and the /metrics endpoint. `SchedulerApp(settings).start()` is `facefleet scheduler run`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from prometheus_client import start_http_server
from sqlalchemy.engine import make_url

from facefleet.config import Settings
from facefleet.domain import PRIORITY_BY_PROTO
from facefleet.grpc_server import SERVICE_NAMES, AioServerHandle, AioServices, LoopThread, build_aio_server
from facefleet.scheduler import metrics
from facefleet.scheduler.agent_streams import AioChannelFactory
from facefleet.scheduler.capacity import AgentRegistry, CapacityView
from facefleet.scheduler.dispatcher import (
    AdmissionGate,
    AuditHook,
    Dispatcher,
    DispatcherSettings,
    DispatchListener,
    PassRecords,
)
from facefleet.scheduler.group_commit import GroupCommitter
from facefleet.scheduler.leader import LeaderLock
from facefleet.scheduler.placement_gateway import LivePlacement, RulesSource
from facefleet.scheduler.rules_source import FileRuleSource
from facefleet.scheduler.service import IntakeCheck, IntakeRefused, SchedulerServicer, add_scheduler_service
from facefleet.scheduler.spend_enforcement import SpendEnforcer
from facefleet.scheduler.store import TaskStore

if TYPE_CHECKING:
    from facefleet.scheduler.cloud.wiring import CloudParts

log = structlog.get_logger()

ServiceRegistration = tuple[str, Callable[[AioServices], Any]]  # (full service name, add its servicer)


def ensure_sqlite_dir(store_url: str) -> None:
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]


class SchedulerApp:
    def __init__(
        self,
        settings: Settings,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        extra_services: Sequence[ServiceRegistration] = (),
        rules_source: RulesSource | None = None,
        listeners: Sequence[DispatchListener] = (),
        audit: AuditHook | None = None,
        records: PassRecords | None = None,
        channel_for: AioChannelFactory | None = None,
        dispatcher_settings: DispatcherSettings | None = None,
        admission: AdmissionGate | None = None,
        intake_check: IntakeCheck | None = None,
        intake_refused: IntakeRefused | None = None,
        cloud: CloudParts | None = None,
    ) -> None:
        self.settings = settings
        config = settings.scheduler
        ensure_sqlite_dir(config.store_url)
        self.store = TaskStore(config.store_url)
        self.committer = GroupCommitter(self.store)
        self.registry = AgentRegistry.from_config(config, heartbeat_interval_s=settings.agent.heartbeat_interval_s)
        self.capacity = CapacityView.from_config(config, self.registry)
        self.rules: Any = rules_source or FileRuleSource(settings.policy.dir)
        # Ledger gate, price feeds, provisioner (scheduler.cloud.wiring.build_cloud). Placement and
        # heartbeats read `self.cloud` on each call, so parts attached after construction work too.
        self.cloud = cloud
        self._budgets: tuple[str, Any] | None = None
        self.placement = LivePlacement(
            self.rules,
            self.capacity,
            spent_for=self._budget_spent,
            pool_overlay=self._cloud_pools,
            on_budgets=self._budgets_loaded,
        )
        self.leader = LeaderLock.for_url(config.store_url)
        # One event loop for the gRPC server (SubmitTask awaits its group commit there instead of
        # holding a thread) and the dispatcher's agent streams; other methods run on a thread pool.
        self._loop = LoopThread("scheduler-loop")
        self.dispatcher = Dispatcher(
            self.store,
            self.placement,
            self.registry,
            dispatcher_settings
            or DispatcherSettings(
                project_limits=dict(config.project_limits),
                lost_grace_s=config.lost_grace_s,
                warmup_s=config.heartbeat_timeout_s,
                inventory_wait_s=config.heartbeat_timeout_s + config.lost_grace_s,
            ),
            is_leader=lambda: self.leader.is_leader,
            channel_for=channel_for,
            listeners=[*listeners, *(cloud.listeners if cloud else ())],
            audit=audit,
            records=records,
            gate=cloud.gate if cloud else None,
            admission=admission,
            loop=self._loop,
        )
        self.committer.on_inserted = self.dispatcher.queue_grew  # new work: an idle dispatcher passes now
        if config.launch_with_intake:
            self.dispatcher.take_intake(self.committer)
        # Spend enforced while cloud runs go on: extend reservations or stop runs (docs/finance.md).
        self.enforcer = (
            SpendEnforcer(
                cloud.budgets,
                self.dispatcher.stop_run,
                settings.cloud.spend_accrual_s,
                audit=audit,
                progress_of=self._progress_of,
                raise_limit=self.dispatcher.raise_run_limit,
                # A raised limit reaches a session agent at once, another with its next heartbeat reply.
                limit_lead_s=float(self.registry.heartbeat_interval_s),
            )
            if cloud is not None and settings.cloud.spend_enforcement
            else None
        )
        self.servicer = SchedulerServicer(
            self.store,
            self.committer,
            self.placement,
            _CloudHeartbeats(self),
            cancel_hook=self._cancel_on_agent,
            intake_check=intake_check,
            intake_refused=intake_refused,
            sessions=self.dispatcher.sessions,
        )
        self._credentials = credentials
        self._interceptors = list(interceptors)
        self._extra_services = list(extra_services)
        self._server: AioServerHandle | None = None
        self._metrics_server: Any = None
        self.metrics_port = 0
        self._stop = threading.Event()
        self._gauges: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the scheduler is not started; call start() first")
        return self._server.port

    def start(self) -> SchedulerApp:
        config = self.settings.scheduler
        if hasattr(self.rules, "start"):
            self.rules.start()
        self.leader.start()
        if self.cloud is not None:
            if self._budgets is not None:
                self.cloud.observe_budgets(*self._budgets)
            self.cloud.start()
        self.dispatcher.start()
        if self.enforcer is not None:
            self.enforcer.start()
        try:
            self._server = build_aio_server(
                self._loop,
                config.listen,
                [
                    (
                        SERVICE_NAMES["Scheduler"],
                        lambda server: add_scheduler_service(self.servicer, server),
                    ),
                    *self._extra_services,
                ],
                self._credentials,
                self._interceptors,
                max_workers=64,
            )
        except Exception:
            self.dispatcher.stop()
            self._loop.stop()
            raise
        if config.metrics_port >= 0:
            self._metrics_server, _thread = start_http_server(config.metrics_port, addr=_host_of(config.listen))
            self.metrics_port = int(self._metrics_server.server_port)
        self._gauges = threading.Thread(target=self._update_gauges, name="scheduler-gauges", daemon=True)
        self._gauges.start()
        log.info(
            "scheduler started",
            port=self._server.port,
            store=make_url(config.store_url).render_as_string(hide_password=True),
            metrics_port=self.metrics_port,
            tls=self._credentials is not None,
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace=1.0)
        if self.enforcer is not None:
            self.enforcer.stop()
        self.dispatcher.stop()
        self._loop.stop()  # after the dispatcher: its agent streams close on this loop
        if self.cloud is not None:
            self.cloud.stop()
        self._before_store_closes()
        self.committer.close()
        self.leader.stop()
        if hasattr(self.rules, "stop"):
            self.rules.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.store.close()

    def _before_store_closes(self) -> None:
        """Parts that still write to the store as they stop (the audit trail deletes the staged
        records it writes last)."""

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait()

    def _progress_of(self, task_id: str) -> tuple[int, int] | None:
        latest = self.store.latest_progress(task_id)
        return (latest.progress.frames_done, latest.progress.frames_total) if latest is not None else None

    def _budget_spent(self, budget: str) -> float:
        return self.cloud.budget_spent(budget) if self.cloud is not None else 0.0

    def _cloud_pools(self, pools: tuple[Any, ...], now: float) -> tuple[Any, ...]:
        overlay = self.cloud.pool_overlay if self.cloud is not None else None
        return overlay(pools, now) if overlay is not None else pools

    def _budgets_loaded(self, version: str, budgets: Any) -> None:
        self._budgets = (version, budgets)  # replayed to cloud parts attached later, in start()
        if self.cloud is not None:
            self.cloud.observe_budgets(version, budgets)

    def _cancel_on_agent(self, task_id: str, agent_id: str | None, reason: str) -> None:
        if agent_id:
            self.dispatcher.cancel_on_agent(task_id, agent_id, reason)

    def _update_gauges(self) -> None:
        while not self._stop.wait(1.0):
            try:
                depth = self.store.queued_by_priority()
                for value, name in PRIORITY_BY_PROTO.items():
                    metrics.QUEUE_DEPTH.labels(priority=name).set(depth.get(value, 0))
                metrics.LEADER.set(1 if self.leader.is_leader else 0)
            except Exception as error:  # the store may be briefly unreachable; keep serving
                log.warning("could not refresh queue gauges", error=str(error))


class _CloudHeartbeats:
    """The registry as heartbeat sink, plus the cloud side (instance registration) when attached."""

    def __init__(self, app: SchedulerApp) -> None:
        self._app = app

    def record_heartbeat(self, req: Any, now: float) -> Any:
        cloud = self._app.cloud
        sink = cloud.heartbeat_sink(self._app.registry) if cloud is not None else self._app.registry
        return sink.record_heartbeat(req, now)

    def request_cancel(self, agent_id: str, task_id: str) -> None:
        self._app.registry.request_cancel(agent_id, task_id)


def _host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host or "0.0.0.0"
