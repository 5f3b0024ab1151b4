"""Launch spot instances when placement wants cloud capacity; tear down idle and never-registered ones.

The provisioner owns the instance records; backends only talk to the provider. A pool never has
more than `max_instances` instances counting those still launching or booting. Launch and
terminate calls run with the lock released, so a slow provider never blocks `can_provision`.
Call `sync()` at start-up to adopt instances a previous scheduler launched (found by tag).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import structlog

from facefleet.config import CloudPoolConfig
from facefleet.scheduler.cloud.backend import (
    BootSpec,
    CloudBackend,
    CloudInstance,
    CloudLaunchError,
    LaunchRequest,
    facefleet_tags,
    render_boot_script,
)
from facefleet.scheduler.metrics import CLOUD_INSTANCES

log = structlog.get_logger()

InstanceState = Literal["launching", "pending", "ready", "terminating"]
STATES: tuple[InstanceState, ...] = ("launching", "pending", "ready", "terminating")


@dataclass(frozen=True)
class ProvisionCause:
    """Who asked for an instance: the rule (and its budget account) of the task that found no slot.
    Its boot and idle time are charged there (scheduler.cloud.idle_cost)."""

    budget: str
    rule: str = ""
    project: str = ""


@dataclass(frozen=True)
class TrackedInstance:
    instance_id: str
    pool: str
    provider: str
    state: InstanceState
    launched_at: float
    provider_id: str | None = None
    registered_at: float | None = None
    last_busy_at: float | None = None
    busy_slots: int = 0
    cause: ProvisionCause | None = None


@dataclass(frozen=True)
class Teardown:
    instance_id: str
    pool: str
    reason: Literal["idle", "never_registered"]
    instance: TrackedInstance | None = None  # as it was when terminated (launch time, provider id, cause)
    ended_at: float = 0.0


class UnknownPoolError(KeyError):
    def __init__(self, pool: str, known: Sequence[str]) -> None:
        super().__init__(f"no cloud pool named {pool!r}; configured cloud pools: {', '.join(known) or '(none)'}")


class Provisioner:
    def __init__(
        self,
        backends: Mapping[str, CloudBackend],
        pools: Sequence[CloudPoolConfig],
        clock: Callable[[], float] = time.time,
        *,
        cluster: str = "facefleet",
        scheduler_address: str = "",
        agent_tls_dir: str = "/etc/facefleet/certs",
    ) -> None:
        self._pools = {pool.name: pool for pool in pools}
        for pool in pools:
            if pool.provider not in backends:
                raise ValueError(
                    f"cloud pool {pool.name!r} uses provider {pool.provider!r} but no backend is configured"
                )
        self._backends = dict(backends)
        self._clock = clock
        self._cluster = cluster
        self._scheduler_address = scheduler_address
        self._tls_dir = agent_tls_dir
        self._instances: dict[str, TrackedInstance] = {}
        self._backoff_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._export_metrics()

    # ---- queries -------------------------------------------------------------------------
    def pool(self, name: str) -> CloudPoolConfig:
        try:
            return self._pools[name]
        except KeyError:
            raise UnknownPoolError(name, sorted(self._pools)) from None

    def instances(self, pool: str | None = None) -> list[TrackedInstance]:
        with self._lock:
            return [i for i in self._instances.values() if pool is None or i.pool == pool]

    def _live(self, pool: str) -> list[TrackedInstance]:
        return [i for i in self._instances.values() if i.pool == pool and i.state != "terminating"]

    def can_provision(self, pool: str, now: float | None = None) -> int:
        """How many more instances this pool may launch right now (0 while backing off)."""
        config = self.pool(pool)
        now = self._clock() if now is None else now
        with self._lock:
            if self._backoff_until.get(pool, 0.0) > now:
                return 0
            return max(0, config.max_instances - len(self._live(pool)))

    def pending_slots(self, pool: str) -> int:
        """Slots on instances launched but not yet registered: capacity that is on its way."""
        config = self.pool(pool)
        with self._lock:
            booting = [i for i in self._live(pool) if i.state in ("launching", "pending")]
        return len(booting) * config.slots_per_instance

    # ---- launching -----------------------------------------------------------------------
    def ensure_capacity(self, pool: str, wanted_slots: int, cause: ProvisionCause | None = None) -> list[str]:
        """Launch enough instances for `wanted_slots` more slots, minus those already booting.

        Never exceeds the pool's max_instances. Returns the facefleet ids launched. A provider
        refusal is logged and pauses launches for the pool for `launch_backoff_s`.
        """
        config = self.pool(pool)
        now = self._clock()
        with self._lock:
            if wanted_slots <= 0 or self._backoff_until.get(pool, 0.0) > now:
                return []
            live = self._live(pool)
            booting_slots = sum(config.slots_per_instance for i in live if i.state in ("launching", "pending"))
            needed = math.ceil(max(0, wanted_slots - booting_slots) / config.slots_per_instance)
            count = min(needed, config.max_instances - len(live))
            claimed = [
                TrackedInstance(f"ff-{uuid.uuid4().hex[:12]}", pool, config.provider, "launching", now, cause=cause)
                for _ in range(max(0, count))
            ]
            for instance in claimed:
                self._instances[instance.instance_id] = instance
        launched: list[str] = []
        for instance in claimed:
            if self._launch_one(config, instance):
                launched.append(instance.instance_id)
        self._export_metrics()
        return launched

    def _launch_one(self, config: CloudPoolConfig, instance: TrackedInstance) -> bool:
        backend = self._backends[config.provider]
        try:
            request = LaunchRequest(
                pool=config.name,
                instance_id=instance.instance_id,
                region=config.region,
                instance_type=config.instance_type,
                max_price_usd_per_hour=config.max_price_usd_per_hour,
                boot_script=render_boot_script(
                    BootSpec(
                        pool=config.name,
                        instance_id=instance.instance_id,
                        scheduler=self._scheduler_address,
                        provider=config.provider,
                        region=config.region,
                        tls_dir=self._tls_dir,
                        slots=config.slots_per_instance,
                    )
                ),
                tags=facefleet_tags(self._cluster, config.name, instance.instance_id),
            )
            cloud = backend.launch(request)
        except (CloudLaunchError, ValueError) as exc:
            with self._lock:
                self._instances.pop(instance.instance_id, None)
                self._backoff_until[config.name] = self._clock() + config.launch_backoff_s
            log.warning(
                "cloud_launch_failed",
                pool=config.name,
                provider=config.provider,
                error=str(exc),
                backoff_s=config.launch_backoff_s,
            )
            return False
        with self._lock:
            current = self._instances.get(instance.instance_id)
            if current is not None and current.state == "launching":
                self._instances[instance.instance_id] = replace(current, state="pending", provider_id=cloud.provider_id)
        log.info(
            "cloud_instance_launched",
            pool=config.name,
            provider=config.provider,
            instance_id=instance.instance_id,
            provider_id=cloud.provider_id,
        )
        return True

    # ---- agent lifecycle -----------------------------------------------------------------
    def _find(self, instance_id: str) -> TrackedInstance | None:
        found = self._instances.get(instance_id)
        if found is None:
            found = next((i for i in self._instances.values() if i.provider_id == instance_id), None)
        return found

    def on_agent_registered(self, instance_id: str, now: float | None = None) -> bool:
        """An agent reporting this facefleet (or provider) instance id registered. False if unknown."""
        now = self._clock() if now is None else now
        with self._lock:
            found = self._find(instance_id)
            if found is None or found.state == "terminating":
                return False
            if found.state != "ready":
                self._instances[found.instance_id] = replace(found, state="ready", registered_at=now, last_busy_at=now)
        self._export_metrics()
        return True

    def report_load(self, instance_id: str, busy_slots: int, now: float | None = None) -> None:
        """From each heartbeat: an instance with busy slots is not idle."""
        now = self._clock() if now is None else now
        with self._lock:
            found = self._find(instance_id)
            if found is None or found.state != "ready":
                return
            last_busy = now if busy_slots > 0 or found.busy_slots > 0 else found.last_busy_at
            self._instances[found.instance_id] = replace(found, busy_slots=busy_slots, last_busy_at=last_busy)

    # ---- teardown ------------------------------------------------------------------------
    def due_for_teardown(self, now: float) -> list[Teardown]:
        """Pure decision: which instances `reap` would terminate at `now`."""
        due: list[Teardown] = []
        with self._lock:
            for i in self._instances.values():
                config = self._pools.get(i.pool)
                if config is None or i.state in ("terminating", "launching"):
                    continue
                if i.state == "pending" and now - i.launched_at > config.register_timeout_s:
                    due.append(Teardown(i.instance_id, i.pool, "never_registered"))
                elif i.state == "ready" and i.busy_slots == 0:
                    idle_since = i.last_busy_at or i.registered_at or i.launched_at
                    if now - idle_since > config.idle_teardown_s:
                        due.append(Teardown(i.instance_id, i.pool, "idle"))
        return due

    def reap(self, now: float | None = None) -> list[Teardown]:
        """Terminate idle and never-registered instances. A failed terminate is retried next time."""
        now = self._clock() if now is None else now
        done: list[Teardown] = []
        for teardown in self.due_for_teardown(now):
            with self._lock:
                instance = self._instances.get(teardown.instance_id)
                if instance is None or instance.provider_id is None:
                    continue
                self._instances[instance.instance_id] = replace(instance, state="terminating")
            self._export_metrics()
            cloud = CloudInstance(instance.instance_id, instance.provider_id, instance.pool, instance.state)
            try:
                self._backends[instance.provider].terminate(cloud)
            except Exception as exc:  # provider errors must not stop the reaper; retry next round
                with self._lock:
                    self._instances[instance.instance_id] = instance
                log.warning("cloud_terminate_failed", instance_id=instance.instance_id, error=str(exc))
                continue
            with self._lock:
                self._instances.pop(instance.instance_id, None)
            log.info(
                "cloud_instance_terminated",
                instance_id=instance.instance_id,
                pool=instance.pool,
                reason=teardown.reason,
            )
            done.append(replace(teardown, instance=instance, ended_at=now))
        self._export_metrics()
        return done

    def forget(self, instance_id: str) -> None:
        """The instance is gone (spot interruption, agent lost and the provider shows it terminated)."""
        with self._lock:
            found = self._find(instance_id)
            if found is not None:
                self._instances.pop(found.instance_id, None)
        self._export_metrics()

    # ---- reconciliation ------------------------------------------------------------------
    def sync(self, now: float | None = None) -> None:
        """Reconcile with the providers: adopt tagged instances we do not know, drop vanished ones."""
        now = self._clock() if now is None else now
        seen: dict[str, CloudInstance] = {}
        listed_providers: set[str] = set()
        for provider, backend in self._backends.items():
            try:
                for cloud in backend.describe(self._cluster):
                    seen[cloud.instance_id] = cloud
            except Exception as exc:  # one provider down must not drop the other's records
                log.warning("cloud_describe_failed", provider=provider, error=str(exc))
                continue
            listed_providers.add(provider)
        with self._lock:
            for instance_id, cloud in seen.items():
                config = self._pools.get(cloud.pool)
                if instance_id in self._instances or config is None:
                    continue
                launched_at = cloud.launched_at.timestamp() if cloud.launched_at else now
                self._instances[instance_id] = TrackedInstance(
                    instance_id, cloud.pool, config.provider, "pending", launched_at, provider_id=cloud.provider_id
                )
                log.info("cloud_instance_adopted", instance_id=instance_id, pool=cloud.pool)
            for instance_id, instance in list(self._instances.items()):
                if (
                    instance.provider in listed_providers
                    and instance_id not in seen
                    and instance.state in ("pending", "ready", "terminating")
                ):
                    del self._instances[instance_id]
                    log.info("cloud_instance_vanished", instance_id=instance_id, pool=instance.pool)
        self._export_metrics()

    def _export_metrics(self) -> None:
        with self._lock:
            counts = {(pool, state): 0 for pool in self._pools for state in STATES}
            for instance in self._instances.values():
                counts[(instance.pool, instance.state)] = counts.get((instance.pool, instance.state), 0) + 1
        for (pool, state), count in counts.items():
            CLOUD_INSTANCES.labels(pool=pool, state=state).set(count)
