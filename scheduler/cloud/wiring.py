"""Assemble the cloud side of a scheduler from `Settings`: ledger gate, price feeds, provisioner.

`build_cloud(settings, engine)` is the one entry point (`scheduler.assembly.build_scheduler` and
tests call it); `SchedulerApp(..., cloud=parts)` plugs the parts in:

- `listeners`       dispatch listeners (the ledger settles / releases on finish and re-queue);
- `gate`            the dispatcher's last word (budget reservation) and provisioning trigger;
- `pool_overlay`    cloud pools' price, staleness and provisioning headroom, and paid pools' run time
                    learned from completed runs (scheduler.run_estimates);
- `budget_spent`    committed spend (spent + reserved) this month per budget, for placement's World;
- `observe_budgets` hears each rule-set version: caps recorded in the ledger (`upsert_accounts`);
- `heartbeat_sink`  wraps the agent registry so heartbeats with `instance_id` reach the provisioner;
- `start()/stop()`  the background price refresh / provisioning / reaper thread.

With `[cloud] enabled = false` (or no cloud pools) only the ledger part is live: static config
pools keep their configured price and still reserve against their rule's budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from facefleet.config import CloudPoolConfig, Settings
from facefleet.scheduler.cloud.backend import CloudBackend
from facefleet.scheduler.cloud.budget_gate import BudgetGate
from facefleet.scheduler.cloud.burst import CloudBurst
from facefleet.scheduler.cloud.idle_cost import book_instance_end
from facefleet.scheduler.cloud.prices import AwsSpotPriceFeed, AzureRetailPriceFeed, PriceBook, PriceFeed
from facefleet.scheduler.cloud.provisioner import Provisioner
from facefleet.scheduler.ledger import SpendLedger
from facefleet.scheduler.placement.model import Budget, PoolState
from facefleet.scheduler.placement_gateway import PlacementResult
from facefleet.scheduler.run_estimates import RunTimeBook
from facefleet.scheduler.store import TaskRecord
from facefleet.v1 import scheduler_pb2

log = structlog.get_logger()

PoolOverlay = Callable[[tuple[PoolState, ...], float], tuple[PoolState, ...]]


class CloudConfigError(ValueError):
    """The [cloud] section cannot be turned into working backends; the message says what to fix."""


class AgentInstances:
    """agent id -> cloud instance id, as heartbeats report it (the ledger attributes spend by it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_agent: dict[str, str] = {}

    def note(self, agent_id: str, instance_id: str) -> None:
        if instance_id:
            with self._lock:
                self._by_agent[agent_id] = instance_id

    def instance_of(self, agent_id: str) -> str:
        with self._lock:
            return self._by_agent.get(agent_id, "")


class HeartbeatTap:
    """A HeartbeatSink that records in the registry first, then tells the cloud side."""

    def __init__(self, sink: Any, observers: Sequence[Callable[[scheduler_pb2.HeartbeatRequest, float], None]]) -> None:
        self._sink = sink
        self._observers = list(observers)

    def record_heartbeat(self, req: scheduler_pb2.HeartbeatRequest, now: float) -> scheduler_pb2.HeartbeatResponse:
        response: scheduler_pb2.HeartbeatResponse = self._sink.record_heartbeat(req, now)
        for observe in self._observers:
            try:
                observe(req, now)
            except Exception:  # the agent's heartbeat must be answered whatever the cloud side does
                log.exception("cloud heartbeat observer failed", agent_id=req.agent_id)
        return response

    def request_cancel(self, agent_id: str, task_id: str) -> None:
        self._sink.request_cancel(agent_id, task_id)


class CloudGate:
    """The dispatcher's gate: budget reservation, then (when no agent was free) provisioning demand."""

    def __init__(self, budgets: BudgetGate, burst: CloudBurst | None) -> None:
        self._budgets = budgets
        self._burst = burst

    def admit(self, task: TaskRecord, decision: PlacementResult, now: float) -> str:
        if self._burst is not None:
            self._burst.satisfied(task.id)
        return self._budgets.admit(task, decision, now)

    def withdraw(self, task_id: str) -> None:
        self._budgets.withdraw(task_id)

    def run_limit_s(self, task_id: str) -> float:
        return self._budgets.run_limit_s(task_id)

    def no_agent(self, task: TaskRecord, decision: PlacementResult, now: float) -> None:
        if self._burst is not None:
            self._burst.no_agent(task, decision, now)


@dataclass
class CloudParts:
    listeners: list[Any]
    pool_overlay: PoolOverlay | None
    budget_spent: Callable[[str], float]
    gate: CloudGate
    observe_budgets: Callable[[str, Mapping[str, Budget]], None]
    ledger: SpendLedger
    budgets: BudgetGate
    instances: AgentInstances
    run_times: RunTimeBook
    burst: CloudBurst | None = None
    _started: bool = field(default=False, repr=False)

    @property
    def provisioner(self) -> Provisioner | None:
        return self.burst.provisioner if self.burst is not None else None

    @property
    def prices(self) -> PriceBook | None:
        return self.burst.prices if self.burst is not None else None

    def heartbeat_sink(self, registry: Any) -> HeartbeatTap:
        observers: list[Callable[[scheduler_pb2.HeartbeatRequest, float], None]] = [
            lambda req, _now: self.instances.note(req.agent_id, req.instance_id)
        ]
        if self.burst is not None:
            observers.append(self.burst.on_heartbeat)
        return HeartbeatTap(registry, observers)

    def start(self) -> None:
        if not self._started and self.burst is not None:
            self.burst.start()
        self._started = True

    def stop(self) -> None:
        if self.burst is not None:
            self.burst.stop()
        self._started = False


def build_cloud(
    settings: Settings,
    engine: Engine,
    *,
    clock: Callable[[], float] = time.time,
    backends: Mapping[str, CloudBackend] | None = None,
    price_feeds: Sequence[PriceFeed] | None = None,
    tick_s: float = 2.0,
) -> CloudParts:
    """The cloud parts for one scheduler process. `backends` / `price_feeds` replace the ones built
    from `[cloud]` (tests point them at moto_server or recorded responses)."""
    ledger = SpendLedger(engine)
    instances = AgentInstances()
    cloud = settings.cloud
    run_times = RunTimeBook(engine, clock=clock)
    budgets = BudgetGate(
        ledger,
        clock=clock,
        instance_of=instances.instance_of,
        on_completed_run=run_times.record,
    )
    burst: CloudBurst | None = None
    if cloud.enabled and cloud.pools:
        chosen_backends = dict(backends) if backends is not None else _backends_from_config(settings)
        feeds = list(price_feeds) if price_feeds is not None else _feeds_from_config(settings)
        provisioner = Provisioner(
            chosen_backends,
            cloud.pools,
            clock,
            cluster=cloud.cluster,
            scheduler_address=cloud.scheduler_address,
            agent_tls_dir=cloud.agent_tls_dir,
        )
        prices = PriceBook(feeds, cloud.price_refresh_s, cloud.price_stale_after_s)
        burst = CloudBurst(
            provisioner,
            prices,
            cloud.pools,
            clock,
            tick_s=tick_s,
            on_instance_ended=lambda teardown, price: book_instance_end(ledger, teardown, price),
        )
        log.info(
            "cloud bursting enabled",
            pools=[pool.name for pool in cloud.pools],
            providers=sorted(chosen_backends),
            feeds=[feed.provider for feed in feeds],
        )
    return CloudParts(
        listeners=[budgets],
        pool_overlay=_chain(burst.overlay, run_times.overlay) if burst is not None else run_times.overlay,
        budget_spent=budgets.committed,
        gate=CloudGate(budgets, burst),
        observe_budgets=budgets.observe_budgets,
        ledger=ledger,
        budgets=budgets,
        instances=instances,
        run_times=run_times,
        burst=burst,
    )


def _chain(first: PoolOverlay, then: PoolOverlay) -> PoolOverlay:
    return lambda pools, now: then(first(pools, now), now)


def ledger_engine(store_url: str) -> Engine:
    """An engine for the ledger on the scheduler's database (SQLite: WAL and a long busy timeout)."""
    if not store_url.startswith("sqlite"):
        return sa.create_engine(store_url, pool_pre_ping=True)
    engine = sa.create_engine(store_url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # BEGIN IMMEDIATE below: reservations serialize
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _pools_of(settings: Settings, provider: str) -> list[CloudPoolConfig]:
    return [pool for pool in settings.cloud.pools if pool.provider == provider]


def _single_region(pools: Sequence[CloudPoolConfig], provider: str) -> str:
    regions = sorted({pool.region for pool in pools})
    if len(regions) != 1:
        raise CloudConfigError(
            f"[[cloud.pools]] with provider {provider} span regions {regions}; one scheduler drives one "
            f"{provider} region: keep those pools in one region (run another cluster for the other)"
        )
    return regions[0]


def _backends_from_config(settings: Settings) -> dict[str, CloudBackend]:
    backends: dict[str, CloudBackend] = {}
    aws_pools = _pools_of(settings, "aws")
    if aws_pools:
        import boto3

        from facefleet.scheduler.cloud.aws import AwsSpotBackend

        client = boto3.client("ec2", region_name=_single_region(aws_pools, "aws"))
        backends["aws"] = AwsSpotBackend(client, settings.cloud.aws)
    azure_pools = _pools_of(settings, "azure")
    if azure_pools:
        from facefleet.scheduler.cloud.azure import AzureSpotBackend

        azure = settings.cloud.azure
        if not azure.subscription_id:
            raise CloudConfigError("Azure cloud pools need cloud.azure.subscription_id in facefleet.toml")
        try:
            from azure.identity import DefaultAzureCredential  # type: ignore[import-not-found]
        except ImportError as error:
            raise CloudConfigError(
                "Azure cloud pools need the azure-identity package for credentials: "
                "pip install azure-identity (managed identity, environment or az login)"
            ) from error
        from azure.mgmt.compute import ComputeManagementClient

        compute = ComputeManagementClient(DefaultAzureCredential(), azure.subscription_id)
        backends["azure"] = AzureSpotBackend(compute, azure)
    return backends


def _feeds_from_config(settings: Settings) -> list[PriceFeed]:
    feeds: list[PriceFeed] = []
    aws_pools = _pools_of(settings, "aws")
    if aws_pools:
        import boto3

        client = boto3.client("ec2", region_name=_single_region(aws_pools, "aws"))
        feeds.append(AwsSpotPriceFeed(client, sorted({pool.instance_type for pool in aws_pools})))
    azure_pools = _pools_of(settings, "azure")
    if azure_pools:
        feeds.append(
            AzureRetailPriceFeed(
                sorted({pool.region for pool in azure_pools}),
                sorted({pool.instance_type for pool in azure_pools}),
                base_url=settings.cloud.azure_price_api,
            )
        )
    return feeds
