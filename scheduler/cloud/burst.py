"""Cloud bursting in the live scheduler: what placement sees of cloud pools, and when to launch.

- `overlay(pools, now)`: every configured cloud pool gets price / price_stale from the PriceBook and
  `can_provision` from the Provisioner (`cloud_pool_state`); a pool with no agent yet is added, and
  is healthy while it may still launch one.
- `no_agent(...)`: placement chose a cloud pool but no agent had a free slot: remember the demand
  and its cause (the rule and budget account of the task). The background `tick` turns recent
  demand into `provisioner.ensure_capacity` (so a slow provider call never blocks the dispatch
  loop), reaps idle / never-registered instances (`on_instance_ended` books their boot and idle
  time: scheduler.cloud.idle_cost) and refreshes prices.
- `on_heartbeat(...)`: an agent reporting an `instance_id` registers that instance and reports load;
  a preempting one is forgotten (its instance is going away).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import structlog

from facefleet.config import CloudPoolConfig
from facefleet.scheduler.cloud.pool_view import cloud_pool_state
from facefleet.scheduler.cloud.prices import PriceBook
from facefleet.scheduler.cloud.provisioner import ProvisionCause, Provisioner, Teardown
from facefleet.scheduler.placement.model import PoolState
from facefleet.scheduler.placement_gateway import PlacementResult
from facefleet.scheduler.store import TaskRecord
from facefleet.v1 import scheduler_pb2

log = structlog.get_logger()


class CloudBurst:
    def __init__(
        self,
        provisioner: Provisioner,
        prices: PriceBook,
        pools: Sequence[CloudPoolConfig],
        clock: Callable[[], float] = time.time,
        demand_window_s: float = 2.0,
        tick_s: float = 2.0,
        on_instance_ended: Callable[[Teardown, float], object] | None = None,
    ) -> None:
        self._on_instance_ended = on_instance_ended
        self._causes: dict[str, ProvisionCause] = {}  # pool -> the latest task's rule and budget that wanted it
        self.provisioner = provisioner
        self.prices = prices
        self._pools = {pool.name: pool for pool in pools}
        self._clock = clock
        self._window = demand_window_s
        self._tick_s = tick_s
        self._lock = threading.Lock()
        self._demand: dict[str, dict[str, float]] = defaultdict(dict)  # pool -> task id -> last wanted at
        self._unknown_instances: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- placement's view --------------------------------------------------------------------
    def overlay(self, pools: tuple[PoolState, ...], now: float) -> tuple[PoolState, ...]:
        at = datetime.fromtimestamp(now, UTC)
        by_name = {pool.name: pool for pool in pools}
        result = []
        for pool in pools:
            config = self._pools.get(pool.name)
            result.append(pool if config is None else self._state(config, pool, at))
        for name, config in self._pools.items():
            if name not in by_name:
                result.append(self._state(config, None, at))
        return tuple(result)

    def _state(self, config: CloudPoolConfig, base: PoolState | None, at: datetime) -> PoolState:
        state = cloud_pool_state(config, self.provisioner, self.prices, at, base=base)
        return replace(state, healthy=(base is not None and base.healthy) or state.can_provision > 0)

    # ---- dispatch gate part ------------------------------------------------------------------
    def no_agent(self, task: TaskRecord, decision: PlacementResult, now: float) -> None:
        if decision.pool in self._pools:
            cause = ProvisionCause(decision.decision.budget or "", decision.rule, task.project)
            with self._lock:
                self._demand[decision.pool][task.id] = now
                self._causes[decision.pool] = cause

    def satisfied(self, task_id: str) -> None:
        """The task got an agent after all: it no longer asks for a new instance."""
        with self._lock:
            for tasks in self._demand.values():
                tasks.pop(task_id, None)

    def wanted_slots(self, now: float) -> dict[str, int]:
        """Tasks that wanted each cloud pool within the demand window (and found no agent)."""
        with self._lock:
            for tasks in self._demand.values():
                for task_id in [t for t, at in tasks.items() if now - at > self._window]:
                    del tasks[task_id]
            return {pool: len(tasks) for pool, tasks in self._demand.items() if tasks}

    # ---- heartbeats --------------------------------------------------------------------------
    def on_heartbeat(self, request: scheduler_pb2.HeartbeatRequest, now: float) -> None:
        instance_id = request.instance_id
        if not instance_id or request.pool not in self._pools:
            return
        if request.preempting:
            self.provisioner.forget(instance_id)
            return
        if self.provisioner.on_agent_registered(instance_id, now):
            self.provisioner.report_load(instance_id, max(0, request.total_slots - request.free_slots), now)
        elif instance_id not in self._unknown_instances:
            self._unknown_instances.add(instance_id)
            log.warning(
                "agent reports an instance the provisioner does not track",
                agent_id=request.agent_id,
                instance_id=instance_id,
                pool=request.pool,
                hint="launched by hand or by another cluster tag; it serves, but is never torn down by facefleet",
            )

    # ---- background work ---------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Launch for recent demand, reap idle / never-registered instances, refresh due prices."""
        now = self._clock() if now is None else now
        self.prices.refresh(datetime.fromtimestamp(now, UTC))
        for pool, wanted in self.wanted_slots(now).items():
            with self._lock:
                cause = self._causes.get(pool)
            launched = self.provisioner.ensure_capacity(pool, wanted, cause)
            if launched:
                log.info("cloud capacity requested", pool=pool, wanted_slots=wanted, launched=launched)
        at = datetime.fromtimestamp(now, UTC)
        for teardown in self.provisioner.reap(now):
            config = self._pools.get(teardown.pool)
            if self._on_instance_ended is not None and config is not None:
                self._on_instance_ended(teardown, self._state(config, None, at).price_per_hour)

    def start(self) -> None:
        if self._thread is not None:
            return
        self.prices.refresh(datetime.fromtimestamp(self._clock(), UTC))
        try:
            self.provisioner.sync()
        except Exception as error:  # a provider outage at start-up must not stop the scheduler
            log.warning("cloud instance sync failed at start; retrying on the next tick", error=str(error))
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cloud-burst", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("cloud burst tick failed; retrying")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
