"""The one place a production scheduler is assembled from settings (`facefleet scheduler run`).

Security and compliance wiring: mTLS server credentials (plaintext only with `tls.insecure`,
loudly), the role gate interceptor, the hash-chained AuditLog fed by the dispatcher (placements,
dispatches, completions, residency refusals, lock enforcement) and by intake, the Admin service,
scheduler→agent client credentials, the storage allow-list at SubmitTask, and compliance-lock
enforcement (live re-check before each RPC, re-placement of tasks already headed for the cloud).
Cloud bursting (ledger gate, price feeds, provisioner) comes from `scheduler/cloud/wiring.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import structlog

from facefleet.config import Settings
from facefleet.grpc_server import SERVICE_NAMES, add_tolerant_service
from facefleet.rpc_errors import TaskInputError
from facefleet.scheduler import metrics
from facefleet.scheduler.admin_service import AdminServicer
from facefleet.scheduler.agent_streams import AioChannelFactory
from facefleet.scheduler.app import SchedulerApp, ensure_sqlite_dir
from facefleet.scheduler.audit_trail import AuditTrail
from facefleet.scheduler.cloud.wiring import build_cloud, ledger_engine
from facefleet.scheduler.dispatcher import DispatcherSettings
from facefleet.scheduler.fleet_view import fleet_status
from facefleet.scheduler.lock_enforcement import EnforcingRuleSource, LockEnforcer, LockGate
from facefleet.scheduler.placement_gateway import RulesSource
from facefleet.scheduler.rules_source import ConsulRuleSource, FileRuleSource
from facefleet.scheduler.rules_source.consul_endpoint import resolve_endpoint
from facefleet.scheduler.store import check_store
from facefleet.security.audit import AuditLog
from facefleet.security.residency import ResidencyViolation, check_storage
from facefleet.security.roles import AioRoleGate
from facefleet.security.tls import secure_aio_channel, server_credentials_unless_insecure
from facefleet.v1 import admin_pb2, types_pb2

log = structlog.get_logger()
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]


def rules_source_from(settings: Settings) -> Any:
    """The configured rules source. Raises ConsulSettingsError (a ValueError) for Consul settings
    that cannot work; Consul being down or refusing is never an error here (fallback rules)."""
    policy = settings.policy
    if policy.source == "consul":
        endpoint = resolve_endpoint(
            policy.consul_addr,
            token=policy.consul_token,
            ssl=policy.consul_ssl,
            ca=policy.consul_ca,
            client_cert=policy.consul_client_cert,
            client_key=policy.consul_client_key,
            verify=policy.consul_verify,
            dc=policy.consul_dc,
        )
        return ConsulRuleSource(endpoint, policy.consul_prefix)
    return FileRuleSource(policy.dir)


def agent_channel_factory(settings: Settings) -> AioChannelFactory:
    """scheduler→agent channels (grpc.aio, the dispatcher's event loop): mTLS as identity
    "scheduler" (plaintext only when tls.insecure)."""
    tls = settings.tls

    def channel_for(address: str) -> grpc.aio.Channel:
        return secure_aio_channel(address, tls, "scheduler")

    return channel_for


class AssembledScheduler(SchedulerApp):
    """A SchedulerApp plus the parts that start and stop with it: the audit trail, the Admin
    service, and lock enforcement (built here from the app's own store, dispatcher and registry)."""

    def __init__(
        self,
        settings: Settings,
        *,
        audit_log: AuditLog,
        audit_trail: AuditTrail,
        lock_gate: LockGate,
        admin: AdminServicer,
        **parts: Any,
    ) -> None:
        super().__init__(settings, audit=audit_trail, records=audit_trail, admission=lock_gate, **parts)
        self.audit_log, self.audit_trail, self.lock_gate, self.admin = audit_log, audit_trail, lock_gate, admin
        audit_trail.agents = self.registry
        audit_trail.store = self.store  # written staged records are deleted there
        self.lock_enforcer = LockEnforcer(
            self.store,
            self.rules,
            lock_gate,
            self.dispatcher,
            self.registry,
            pool_zones=lambda: {pool.name: pool.trust_zone for pool in self.capacity.snapshot(audit_log.clock()).pools},
            audit=audit_trail,
            unknown_wait_s=settings.scheduler.heartbeat_timeout_s + settings.scheduler.lost_grace_s,
        )
        admin.rules = EnforcingRuleSource(self.rules, self.lock_enforcer)
        admin.drain = self.registry.drain
        admin.fleet = lambda: fleet_status(self.registry, self.capacity, audit_log.clock())

    def start(self) -> AssembledScheduler:
        super().start()  # starts the cloud parts too
        self.rules.subscribe(self.lock_enforcer.on_rules)
        self.lock_enforcer.enforce_now()  # tasks left on cloud pools by a previous run
        return self

    def stop(self) -> None:
        self.lock_enforcer.stop()
        super().stop()

    def _before_store_closes(self) -> None:
        self.audit_trail.close()  # after the dispatcher (its last records are written), before the store


def build_scheduler(
    settings: Settings,
    *,
    channel_for: AioChannelFactory | None = None,
    rules_source: RulesSource | None = None,
    dispatcher_settings: DispatcherSettings | None = None,
    spent_usd: Callable[[str], float] | None = None,
) -> AssembledScheduler:
    """Assemble (not start) the production scheduler. Raises TLSMaterialError when certificates are
    missing (and `tls.insecure` is off), FileNotFoundError/ValueError for a bad audit signing key,
    StoreUnusable for a store URL that names no usable or reachable database."""
    check_store(settings.scheduler.store_url)
    credentials = server_credentials_unless_insecure(settings.tls, "scheduler")
    audit = AuditLog(settings.audit.path, settings.audit.signing_key, on_record=metrics.count_audit_records)
    rules: Any = rules_source or rules_source_from(settings)
    gate = LockGate(rules)
    trail = AuditTrail(audit, separate_process=settings.audit.separate_writer)
    allowed_prefixes = list(settings.residency.private_storage_prefixes)

    def intake_check(task: types_pb2.Task) -> None:
        check_storage(task, gate.project_locked(task.project), allowed_prefixes)

    def intake_refused(actor: str, task: types_pb2.Task, error: TaskInputError) -> None:
        if isinstance(error, ResidencyViolation):
            trail.intake_refusal(actor, task, error)

    def spent(name: str) -> float:
        return spent_usd(name) if spent_usd is not None else 0.0

    ensure_sqlite_dir(settings.scheduler.store_url)
    cloud = build_cloud(settings, ledger_engine(settings.scheduler.store_url))
    if spent_usd is None:
        spent_usd = cloud.budget_spent
    # rules and drain are set by AssembledScheduler once the registry and lock enforcer exist
    admin = AdminServicer(rules, audit, drain=lambda _agent_id: False, spent_usd=spent)
    app = AssembledScheduler(
        settings,
        audit_log=audit,
        audit_trail=trail,
        lock_gate=gate,
        admin=admin,
        credentials=credentials,
        interceptors=[AioRoleGate(audit, insecure=settings.tls.insecure, on_denial=metrics.count_denial)],
        extra_services=[
            (
                SERVICE_NAMES["Admin"],
                lambda server: add_tolerant_service(admin, ADMIN_SERVICE, server),
            )
        ],
        rules_source=rules,
        listeners=[trail],
        channel_for=channel_for or agent_channel_factory(settings),
        dispatcher_settings=dispatcher_settings,
        intake_check=intake_check,
        intake_refused=intake_refused,
        cloud=cloud,
    )
    log.info(
        "scheduler assembled",
        tls=credentials is not None,
        audit=str(settings.audit.path),
        audit_signed=settings.audit.signing_key is not None,
        rules=type(rules).__name__,
        cloud=app.cloud is not None,
    )
    return app
