"""Live capacity: agent heartbeats (authoritative, per agent) plus Prometheus (pool-level signals).

Three parts, each usable alone:

* `AgentRegistry` remembers every agent's last heartbeat and what was dispatched to it since, so a
  stale heartbeat never lets the dispatcher send more tasks than an agent has slots
  (effective free = reported free - dispatched since the heartbeat and not yet listed as running).
* `PrometheusSignals` runs configurable PromQL per signal, keyed by the `pool` label; when Prometheus
  is down, slow or its data is old it reports `stale=True` and never raises.
* `CapacityView` merges both with the statically configured pools into the `PoolState`s placement
  reads, and says in `notes` when it fell back to heartbeats only.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from facefleet.config import PoolConfig, SchedulerConfig
from facefleet.domain import CLOUD_ZONE, PRIVATE_ZONE, TRUST_ZONES
from facefleet.scheduler import metrics
from facefleet.scheduler.placement.model import PoolState
from facefleet.v1 import scheduler_pb2, types_pb2

log = structlog.get_logger()

DEFAULT_SEC_PER_FRAME = 0.05

# Signal name -> PromQL. Every query must return one series per `pool` label (attach `pool` as a
# target label in the scrape config for exporters that do not know it, e.g. dcgm-exporter).
# GPU signals prefer the DCGM exporter's names and fall back per pool to the agent's own gauges.
DEFAULT_PROMETHEUS_QUERIES: dict[str, str] = {
    "free_slots": "sum by (pool) (facefleet_agent_slots_free)",
    "gpu_util": ("avg by (pool) (DCGM_FI_DEV_GPU_UTIL) / 100 or avg by (pool) (facefleet_agent_gpu_utilization_ratio)"),
    "gpu_mem_used_bytes": (
        "sum by (pool) (DCGM_FI_DEV_FB_USED) * 1048576 or sum by (pool) (facefleet_agent_gpu_memory_used_bytes)"
    ),
    # Seconds since each pool's newest free-slot sample: the freshness check.
    "data_age_s": "time() - max by (pool) (timestamp(facefleet_agent_slots_free))",
    # No default: queue wait per pool comes from whatever queue fronts the pool (set it in config).
    "queue_wait_s": "",
}
AGE_SIGNAL = "data_age_s"
QUEUE_WAIT_SIGNAL = "queue_wait_s"


class HeartbeatRejected(ValueError):
    """A heartbeat the registry cannot use; `field` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"heartbeat {field}: {message}")
        self.field = field
        self.message = message


class Reserved(NamedTuple):
    """The agent a slot was reserved on (`AgentRegistry.reserve`)."""

    agent_id: str
    address: str


@dataclass
class PoolMembers:
    """One pool's agents as placement sees them (`AgentRegistry.pool_members`): "live" = dispatchable."""

    provider: str  # of the pool's first agent by id
    region: str
    zones: set[str] = field(default_factory=set)  # trust zones of the agents not lost
    instances: int = 0  # agents not lost
    live: int = 0
    free_slots: int = 0  # effective free slots of the live agents
    speeds: list[float] = field(default_factory=list)  # reported sec/frame of the live agents
    gpu: str = ""  # of the first live agent that reports one
    states: Counter[str] = field(default_factory=Counter)  # agents per `AgentRecord.state()`


@dataclass
class AgentRecord:
    """What the scheduler knows about one agent. Copies handed out are snapshots."""

    agent_id: str
    address: str
    pool: str
    trust_zone: str
    provider: str
    region: str
    gpu: str = ""
    instance_id: str = ""
    sec_per_frame: float = 0.0
    execution_providers: tuple[str, ...] = ()
    total_slots: int = 0
    free_slots: int = 0  # as the last heartbeat reported them
    healthy: bool = True
    running: frozenset[str] = frozenset()
    preempting: bool = False
    last_seen: float = 0.0
    draining: bool = False
    lost_at: float | None = None
    # Tasks sent since the last heartbeat that the agent has not yet listed as running: id -> sent at.
    in_flight: dict[str, float] = field(default_factory=dict)
    last_dispatch: float = 0.0
    # The agent's run-journal inventory as of its last heartbeat built under this leader's term
    # (task id -> newest report), and how many such heartbeats arrived: the reconciliation clock.
    runs: dict[str, types_pb2.RunReport] = field(default_factory=dict)
    inventories: int = 0
    # An agent with an open AgentSession (scheduler.agent_sessions): every assignment it holds is
    # in `in_flight` until its ending update, refusal or the session's end, and it may hold
    # `prefetch` more than it has slots (its pool's setting), waiting in its own queue.
    session: bool = False  # it has opened one with this replica (and is dispatched to through one)
    session_open: bool = False
    prefetch: int = 0

    @property
    def effective_free_slots(self) -> int:
        """Assignments this agent may take now. Never more outstanding than total_slots + prefetch
        for a session agent; a RunTask agent: its reported free slots less those sent since."""
        # Counted without building the union of `running` and `in_flight`: this runs for every agent
        # of a pool on every launch (`_best_agent_locked`).
        if self.session:
            held = len(self.in_flight)
            for task_id in self.running:  # a session agent's running tasks are normally held too
                if task_id not in self.in_flight:
                    held += 1
            free = self.total_slots + self.prefetch - held
        else:
            free = self.free_slots - len(self.in_flight)
        return free if free > 0 else 0

    @property
    def task_ids(self) -> frozenset[str]:
        """Every task that may be on this agent: listed as running or sent and not yet confirmed."""
        return self.running | frozenset(self.in_flight)

    def state(self) -> str:
        if self.lost_at is not None:
            return "lost"
        if self.draining or self.preempting:
            return "draining"
        return "ready"

    def snapshot(self) -> AgentRecord:
        # A field-for-field copy with its own dicts. Not dataclasses.replace: every dispatch pass
        # snapshots every agent, and replace's re-run of __init__ was most of that pass's set-up.
        copy = object.__new__(AgentRecord)
        copy.__dict__.update(self.__dict__)
        copy.in_flight = dict(self.in_flight)
        copy.runs = dict(self.runs)
        return copy


@dataclass(frozen=True)
class AgentInstructions:
    """What the next heartbeat response tells an agent."""

    drain: bool = False
    cancel_task_ids: tuple[str, ...] = ()


class AgentRegistry:
    """Thread-safe record of agents, their heartbeats and the tasks dispatched to them."""

    def __init__(
        self,
        heartbeat_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 2.0,
        in_flight_grace_s: float | None = None,
        prefetch: Mapping[str, int] | None = None,
    ) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.prefetch = dict(prefetch or {})  # pool -> assignments a session agent may hold beyond its slots
        self.heartbeat_interval_s = heartbeat_interval_s
        # A dispatched task that heartbeats sampled later than this still do not list has either
        # finished or been refused; the dispatcher normally reports that through note_finished.
        self.in_flight_grace_s = in_flight_grace_s if in_flight_grace_s is not None else heartbeat_timeout_s
        self._agents: dict[str, AgentRecord] = {}
        self._pools: dict[str, dict[str, AgentRecord]] = defaultdict(dict)  # pool -> its agents (by id)
        self._cancels: dict[str, set[str]] = defaultdict(set)
        # Raised hard run-time limits (spend enforcement extended the reservation): task id ->
        # (attempt, seconds). Sent to whichever agent holds the task until the run leaves it.
        self._run_limits: dict[str, tuple[int, float]] = {}
        # Reconciliation with the agents' run journals (see the dispatcher): the leader's term
        # (0 = not leading), outcomes reported and not yet handed to the dispatcher, and outcomes
        # recorded that each agent is told about (acknowledged) until it stops reporting them.
        self.leader_term = 0
        self._outcomes: list[tuple[str, types_pb2.RunReport]] = []
        self._handed: dict[str, set[tuple[str, int]]] = defaultdict(set)
        self._acks: dict[str, set[tuple[str, int]]] = defaultdict(set)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: SchedulerConfig, heartbeat_interval_s: float = 2.0) -> AgentRegistry:
        return cls(
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            heartbeat_interval_s=heartbeat_interval_s,
            prefetch={pool.name: pool.prefetch for pool in config.pools if pool.prefetch},
        )

    def record_heartbeat(self, req: scheduler_pb2.HeartbeatRequest, now: float) -> scheduler_pb2.HeartbeatResponse:
        """Store a heartbeat; answer with the agent's pending instructions.

        Raises HeartbeatRejected for a request that names no agent or pool, or an unknown trust zone.
        """
        _validate_heartbeat(req)
        running = frozenset(req.running_task_ids)
        with self._lock:
            record = self._agents.get(req.agent_id)
            if record is None:
                record = AgentRecord(
                    agent_id=req.agent_id,
                    address=req.address,
                    pool=req.pool,
                    trust_zone=req.trust_zone,
                    provider=req.provider,
                    region=req.region,
                )
                self._agents[req.agent_id] = record
                log.info("agent joined", agent_id=req.agent_id, pool=req.pool, trust_zone=req.trust_zone)
            elif record.lost_at is not None:
                log.info("lost agent is back", agent_id=req.agent_id, lost_for_s=round(now - record.lost_at, 3))
            record.address = req.address
            if record.pool != req.pool:  # an agent re-registered in another pool
                self._pools[record.pool].pop(record.agent_id, None)
            self._pools[req.pool][record.agent_id] = record
            record.pool = req.pool
            record.trust_zone = req.trust_zone
            record.provider = req.provider
            record.region = req.region
            record.gpu = req.gpu
            record.instance_id = req.instance_id
            record.sec_per_frame = req.sec_per_frame
            record.execution_providers = tuple(req.execution_providers)
            record.total_slots = req.total_slots
            record.free_slots = min(req.free_slots, req.total_slots)
            record.healthy = req.healthy
            record.preempting = req.preempting
            record.running = running
            record.last_seen = now
            record.lost_at = None
            record.prefetch = self.prefetch.get(req.pool, 0)
            # Listed as running: the reported free slots already count it. Not listed and sent long
            # before this heartbeat: it finished or was refused. Otherwise it may still be on the wire.
            # (A session agent's assignments leave `in_flight` only when the session says they ended.)
            if not record.session:
                record.in_flight = {
                    task_id: sent_at
                    for task_id, sent_at in record.in_flight.items()
                    if task_id not in running and now - sent_at <= self.in_flight_grace_s
                }
            response = self._control_locked(record, self._take_inventory_locked(record, req))
            # Cancels stay queued while the task may still be on the agent (at-least-once delivery).
            pending = self._cancels.get(req.agent_id)
            if pending:
                pending &= record.task_ids
            return response

    def control(self, agent_id: str) -> scheduler_pb2.HeartbeatResponse:
        """What a heartbeat response would tell the agent now (pushed on its session: cancels)."""
        with self._lock:
            record = self._agents.get(agent_id)
            if record is None:
                return scheduler_pb2.HeartbeatResponse(
                    cancel_task_ids=sorted(self._cancels.get(agent_id, ())), leader_term=self.leader_term
                )
            return self._control_locked(record, sorted(self._acks.get(agent_id, ())))

    def _control_locked(
        self, record: AgentRecord, acknowledged: Sequence[tuple[str, int]]
    ) -> scheduler_pb2.HeartbeatResponse:
        instructions = self._instructions_locked(record)
        limits = [(task, *self._run_limits[task]) for task in record.task_ids if task in self._run_limits]
        return scheduler_pb2.HeartbeatResponse(
            drain=instructions.drain,
            cancel_task_ids=list(instructions.cancel_task_ids),
            heartbeat_interval_s=max(1, math.ceil(self.heartbeat_interval_s)),
            server_time=_timestamp(time.time()),
            leader_term=self.leader_term,
            acknowledged=[types_pb2.RunRef(task_id=task_id, attempt=attempt) for task_id, attempt in acknowledged],
            run_limits=[
                scheduler_pb2.RunLimit(task_id=task_id, attempt=attempt, max_run_s=max_run_s)
                for task_id, attempt, max_run_s in sorted(limits)
            ],
        )

    def note_session(self, agent_id: str, is_open: bool) -> None:
        """The agent opened (or closed) its AgentSession with this replica: no work goes to it while
        closed (it reconnects, or falls back to heartbeats and RunTask: then it joins as before)."""
        with self._lock:
            record = self._agents.get(agent_id)
            if record is not None:
                record.session = record.session or is_open
                record.session_open = is_open

    def _take_inventory_locked(self, record: AgentRecord, req: scheduler_pb2.HeartbeatRequest) -> list[tuple[str, int]]:
        """Keep the agent's inventory when it was built under this leader's term (the agent fences
        older terms from then on); queue outcomes not seen before; return the acks to send."""
        if self.leader_term <= 0:
            return []
        reported = {(run.task_id, run.attempt): run for run in req.runs}
        if req.known_leader_term >= self.leader_term:
            record.inventories += 1
            record.runs = {}
            for run in req.runs:
                newest = record.runs.get(run.task_id)
                if newest is None or run.attempt > newest.attempt:
                    record.runs[run.task_id] = run
        handed = self._handed[record.agent_id]
        handed &= reported.keys()
        acks = self._acks[record.agent_id]
        acks &= reported.keys()
        for key, run in reported.items():
            if run.finished and key not in handed and key not in acks:
                handed.add(key)
                self._outcomes.append((record.agent_id, run))
        return sorted(acks)

    def set_leader_term(self, term: int) -> None:
        """This replica leads with `term` (0: it no longer leads); inventories start over."""
        with self._lock:
            self.leader_term = term
            self._outcomes.clear()
            self._handed.clear()
            for record in self._agents.values():
                record.runs = {}
                record.inventories = 0

    def inventory(self, agent_id: str) -> tuple[int, dict[str, types_pb2.RunReport]] | None:
        """(inventories received under this term, the newest one's runs by task id), None if unknown."""
        with self._lock:
            record = self._agents.get(agent_id)
            return None if record is None else (record.inventories, dict(record.runs))

    def take_outcomes(self) -> list[tuple[str, types_pb2.RunReport]]:
        """Finished runs agents reported since the last call, each once: (agent id, report)."""
        with self._lock:
            taken, self._outcomes = self._outcomes, []
            return taken

    def acknowledge(self, agent_id: str, task_id: str, attempt: int) -> None:
        """The outcome of (task, attempt) on the agent is recorded: tell the agent so."""
        with self._lock:
            self._acks[agent_id].add((task_id, attempt))

    def sweep(self, now: float) -> list[AgentRecord]:
        """Mark agents whose heartbeats stopped for longer than the timeout as lost; return those newly lost."""
        newly_lost = []
        with self._lock:
            for record in self._agents.values():
                if record.lost_at is None and now - record.last_seen > self.heartbeat_timeout_s:
                    record.lost_at = now
                    newly_lost.append(record.snapshot())
        for record in newly_lost:
            log.warning(
                "agent lost: heartbeats stopped",
                agent_id=record.agent_id,
                pool=record.pool,
                silent_for_s=round(now - record.last_seen, 3),
                tasks=sorted(record.task_ids),
            )
        return newly_lost

    def lost_since(self, agent_id: str) -> float | None:
        """When the agent was marked lost, or None when it is live (or unknown)."""
        with self._lock:
            record = self._agents.get(agent_id)
            return None if record is None else record.lost_at

    def get(self, agent_id: str) -> AgentRecord | None:
        with self._lock:
            record = self._agents.get(agent_id)
            return None if record is None else record.snapshot()

    def agents(self) -> list[AgentRecord]:
        with self._lock:
            return [record.snapshot() for record in sorted(self._agents.values(), key=lambda r: r.agent_id)]

    def pool_members(self, now: float) -> dict[str, PoolMembers]:
        """What placement needs of each pool's agents, counted under one lock without copying a
        record: every dispatch pass takes this, and a snapshot of every agent was most of its set-up."""
        members: dict[str, PoolMembers] = {}
        with self._lock:
            for record in sorted(self._agents.values(), key=lambda r: r.agent_id):
                pool = members.get(record.pool)
                if pool is None:
                    pool = members[record.pool] = PoolMembers(record.provider, record.region)
                pool.states[record.state()] += 1
                if record.lost_at is None:
                    pool.instances += 1
                    pool.zones.add(record.trust_zone)
                if self._dispatchable(record, now):
                    pool.live += 1
                    pool.free_slots += record.effective_free_slots
                    if record.sec_per_frame > 0:
                        pool.speeds.append(record.sec_per_frame)
                    pool.gpu = pool.gpu or record.gpu
        return members

    def pick_agent(self, pool: str, now: float) -> AgentRecord | None:
        """The dispatchable agent of `pool` with the most effective free slots, or None."""
        with self._lock:
            best = self._best_agent_locked(pool, now)
            return None if best is None else best.snapshot()

    def reserve(self, pool: str, task_id: str, now: float) -> Reserved | None:
        """pick_agent and note_dispatched as one step, so concurrent dispatchers never share a slot."""
        with self._lock:
            best = self._best_agent_locked(pool, now)
            if best is None:
                return None
            best.in_flight[task_id] = now
            best.last_dispatch = now
            return Reserved(best.agent_id, best.address)  # not a snapshot: a launch needs no more

    def note_dispatched(self, agent_id: str, task_id: str, now: float) -> None:
        """Count `task_id` against the agent's slots until a heartbeat lists it as running."""
        with self._lock:
            record = self._require_locked(agent_id)
            record.in_flight[task_id] = now
            record.last_dispatch = now

    def note_finished(self, agent_id: str, task_id: str) -> None:
        """The task left the agent (finished, failed, refused, cancelled): free its reservation."""
        with self._lock:
            record = self._agents.get(agent_id)
            if record is None:
                return
            if (record.in_flight.pop(task_id, None) is None or record.session) and task_id in record.running:
                # The agent's free slots counted it as busy; it is free now until the next heartbeat.
                record.running = record.running - {task_id}
                record.free_slots = min(record.total_slots, record.free_slots + 1)
            cancels = self._cancels.get(agent_id)
            if cancels:
                cancels.discard(task_id)
            self._run_limits.pop(task_id, None)

    def drain(self, agent_id: str) -> bool:
        """Stop sending new tasks to the agent and tell it so; False when the agent is unknown."""
        return self._set_draining(agent_id, True)

    def undrain(self, agent_id: str) -> bool:
        return self._set_draining(agent_id, False)

    def request_cancel(self, agent_id: str, task_id: str) -> None:
        """Ask the agent to stop `task_id` in its next heartbeat responses until it no longer has it."""
        with self._lock:
            self._cancels[agent_id].add(task_id)

    def raise_run_limit(self, task_id: str, attempt: int, max_run_s: float) -> None:
        """Send the run's raised hard run-time limit in the heartbeat responses of the agent that
        holds the task, until the run leaves it (agents only ever raise a limit)."""
        with self._lock:
            current = self._run_limits.get(task_id)
            if current is None or current[0] != attempt or current[1] < max_run_s:
                self._run_limits[task_id] = (attempt, max_run_s)

    def pending_instructions(self, agent_id: str) -> AgentInstructions:
        with self._lock:
            record = self._agents.get(agent_id)
            if record is None:
                return AgentInstructions(cancel_task_ids=tuple(sorted(self._cancels.get(agent_id, ()))))
            return self._instructions_locked(record)

    def _set_draining(self, agent_id: str, draining: bool) -> bool:
        with self._lock:
            record = self._agents.get(agent_id)
            if record is None:
                return False
            record.draining = draining
        log.info("agent drain changed", agent_id=agent_id, draining=draining)
        return True

    def _instructions_locked(self, record: AgentRecord) -> AgentInstructions:
        return AgentInstructions(
            drain=record.draining, cancel_task_ids=tuple(sorted(self._cancels.get(record.agent_id, ())))
        )

    def _require_locked(self, agent_id: str) -> AgentRecord:
        record = self._agents.get(agent_id)
        if record is None:
            raise KeyError(f"agent {agent_id!r} is unknown to the registry: it has never sent a heartbeat")
        return record

    def _best_agent_locked(self, pool: str, now: float) -> AgentRecord | None:
        # Most free slots first; among equals the one that waited longest for work, then by id.
        # One pass, each agent's free slots computed once and checked first (a busy fleet's agents
        # are mostly full): this runs for every task launched.
        best: AgentRecord | None = None
        best_free = 0
        for record in self._pools.get(pool, {}).values():
            free = record.effective_free_slots
            if free <= 0 or free < best_free or not self._dispatchable(record, now):
                continue
            if (
                best is None
                or free > best_free
                or (record.last_dispatch, record.agent_id) < (best.last_dispatch, best.agent_id)
            ):
                best, best_free = record, free
        return best

    def _dispatchable(self, record: AgentRecord, now: float) -> bool:
        return (
            record.healthy
            and (record.session_open or not record.session)
            and not record.draining
            and not record.preempting
            and record.lost_at is None
            and now - record.last_seen <= self.heartbeat_timeout_s
        )

    def is_dispatchable(self, record: AgentRecord, now: float) -> bool:
        """Healthy, heard from within the timeout, not draining, preempting or lost."""
        return self._dispatchable(record, now)


def _validate_heartbeat(req: scheduler_pb2.HeartbeatRequest) -> None:
    if not req.agent_id.strip():
        raise HeartbeatRejected("agent_id", "is empty; set a stable, unique id per agent")
    if not req.pool.strip():
        raise HeartbeatRejected("pool", f"agent {req.agent_id!r} names no pool; set agent.pool in its config")
    if req.trust_zone not in TRUST_ZONES:
        raise HeartbeatRejected(
            "trust_zone",
            f"agent {req.agent_id!r} reports {req.trust_zone!r}; it must be one of {', '.join(TRUST_ZONES)}",
        )
    if not req.address.strip():
        raise HeartbeatRejected("address", f"agent {req.agent_id!r} gives no host:port to dispatch to")
    if req.free_slots > req.total_slots:
        raise HeartbeatRejected(
            "free_slots", f"agent {req.agent_id!r} reports {req.free_slots} free of {req.total_slots} slots"
        )
    if not math.isfinite(req.sec_per_frame) or req.sec_per_frame < 0:
        raise HeartbeatRejected(
            "sec_per_frame", f"agent {req.agent_id!r} reports {req.sec_per_frame} s per frame; expected a finite >= 0"
        )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


# --------------------------------------------------------------------------------------- Prometheus


@dataclass(frozen=True)
class PrometheusSample:
    """Signal values per pool (`by_pool[pool][signal]`); `stale` means do not trust any of them."""

    by_pool: Mapping[str, Mapping[str, float]]
    stale: bool
    error: str | None = None
    taken_at: float = 0.0


class PrometheusSignals:
    """Pool-level capacity signals from Prometheus: short timeouts, no retries, never raises.

    `sample(now)` queries at most every `refresh_s` and otherwise answers from the last result,
    so the dispatcher's hot path does not wait on HTTP. A failed query, a Prometheus that answers
    nothing for the freshness signal, or data older than `max_age_s` all give `stale=True`.
    """

    def __init__(
        self,
        url: str,
        queries: Mapping[str, str] | None = None,
        max_age_s: float = 30.0,
        timeout_s: float = 1.0,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        merged = {**DEFAULT_PROMETHEUS_QUERIES, **(queries or {})}
        self.queries = {name: query for name, query in merged.items() if query.strip()}
        self.max_age_s = max_age_s
        self.timeout_s = min(timeout_s, 1.0)
        self.refresh_s = refresh_s
        self._clock = clock
        self._client = PrometheusConnect(url=self.url, retry=Retry(total=0), timeout=self.timeout_s)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._last: PrometheusSample | None = None
        self._refreshing = False

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> PrometheusSignals | None:
        if not config.prometheus_url:
            return None
        return cls(
            config.prometheus_url,
            queries=config.prometheus_queries,
            max_age_s=config.prometheus_max_age_s,
            timeout_s=config.prometheus_timeout_s,
        )

    def sample(self, now: float) -> PrometheusSample:
        with self._lock:
            last = self._last
            # While one caller refreshes, the others get the previous sample instead of waiting.
            if last is not None and (self._refreshing or 0 <= now - last.taken_at < self.refresh_s):
                return last
            self._refreshing = True
        try:
            fresh = self._query(now)
        finally:
            with self._lock:
                self._refreshing = False
        with self._lock:
            self._last = fresh
        return fresh

    def close(self) -> None:
        self._client.close()

    def _query(self, now: float) -> PrometheusSample:
        by_pool: dict[str, dict[str, float]] = defaultdict(dict)
        try:
            for signal, query in self.queries.items():
                for series in self._client.custom_query(query):
                    pool = series.get("metric", {}).get("pool")
                    value = float(series["value"][1])
                    if pool and math.isfinite(value):
                        by_pool[pool][signal] = value
        except Exception as error:  # any failure means: fall back to heartbeats
            reason = f"{type(error).__name__}: {_first_line(error)}"
            return self._stale(now, f"query to {self.url} failed ({reason})")
        if AGE_SIGNAL in self.queries:
            ages = {pool: signals[AGE_SIGNAL] for pool, signals in by_pool.items() if AGE_SIGNAL in signals}
            if not ages:
                return self._stale(now, f"no series for the freshness query {self.queries[AGE_SIGNAL]!r}")
            fresh_pools = {pool for pool, age in ages.items() if age <= self.max_age_s}
            if not fresh_pools:
                oldest = min(ages.values())
                return self._stale(now, f"newest data is {oldest:.1f}s old (max {self.max_age_s:g}s)")
            by_pool = defaultdict(dict, {pool: by_pool[pool] for pool in fresh_pools})
        metrics.CAPACITY_SOURCE_STALE.set(0)
        return PrometheusSample(by_pool={k: dict(v) for k, v in by_pool.items()}, stale=False, taken_at=now)

    def _stale(self, now: float, error: str) -> PrometheusSample:
        if self._last is None or not self._last.stale:
            log.warning("prometheus capacity signals stale; using heartbeats only", error=error, url=self.url)
        metrics.CAPACITY_SOURCE_STALE.set(1)
        return PrometheusSample(by_pool={}, stale=True, error=error, taken_at=now)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else "no detail"


# ------------------------------------------------------------------------------------------- view


GAUGES_EVERY_S = 0.5  # agent and free-slot gauges: fresher than any scrape interval, not every pass


@dataclass(frozen=True)
class CapacitySnapshot:
    """What placement sees: one PoolState per pool, and why the numbers may be less than complete."""

    pools: tuple[PoolState, ...]
    notes: tuple[str, ...] = ()
    signals: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # fresh Prometheus values
    taken_at: float = 0.0

    def pool(self, name: str) -> PoolState | None:
        return next((p for p in self.pools if p.name == name), None)


class CapacityView:
    """Merge heartbeats, Prometheus and configured pools into a `CapacitySnapshot`."""

    def __init__(
        self,
        registry: AgentRegistry,
        prometheus: PrometheusSignals | None,
        static_pools: Sequence[PoolState] = (),
    ) -> None:
        self.registry = registry
        self.prometheus = prometheus
        self.static_pools = {pool.name: pool for pool in static_pools}
        self._gauge_labels: set[tuple[str, str]] = set()
        self._gauge_pools: set[str] = set()
        self._gauge_lock = threading.Lock()
        self._published_at = -math.inf  # monotonic time of the last gauge update

    @classmethod
    def from_config(cls, config: SchedulerConfig, registry: AgentRegistry) -> CapacityView:
        return cls(registry, PrometheusSignals.from_config(config), [pool_state_from_config(p) for p in config.pools])

    def snapshot(self, now: float) -> CapacitySnapshot:
        members = self.registry.pool_members(now)
        notes: list[str] = []
        sample: PrometheusSample | None = None
        if self.prometheus is not None:
            sample = self.prometheus.sample(now)
            if sample.stale:
                notes.append(f"prometheus stale ({sample.error}): capacity from heartbeats only")
                metrics.CAPACITY_SOURCE_STALE.set(1)
            else:
                metrics.CAPACITY_SOURCE_STALE.set(0)
        signals = {} if sample is None or sample.stale else sample.by_pool

        pools = []
        for name in sorted(set(members) | set(self.static_pools)):
            state = self._pool_state(name, members.get(name), notes)
            pool_signals = signals.get(name, {})
            if QUEUE_WAIT_SIGNAL in pool_signals:
                state = replace(state, queue_wait_s=max(0.0, pool_signals[QUEUE_WAIT_SIGNAL]))
            pools.append(state)
        if time.monotonic() - self._published_at >= GAUGES_EVERY_S:  # dispatch passes run far more often
            self._publish(members, pools)
        return CapacitySnapshot(pools=tuple(pools), notes=tuple(notes), signals=signals, taken_at=now)

    def _pool_state(self, name: str, members: PoolMembers | None, notes: list[str]) -> PoolState:
        static = self.static_pools.get(name)
        # None: a configured pool no agent has joined (a pool is listed for its agents or its config).
        members = members if members is not None else PoolMembers(provider="", region="")
        zones = set(members.zones)
        if static is not None:
            zones.add(static.trust_zone)
        # Private only when every source agrees: a pool with any cloud member is a cloud pool.
        trust_zone = PRIVATE_ZONE if zones == {PRIVATE_ZONE} else CLOUD_ZONE
        if len(zones) > 1:
            notes.append(
                f"pool {name}: agents/config disagree on trust zone ({', '.join(sorted(zones))}); treated as cloud"
            )
        speeds = members.speeds
        if static is None:
            return PoolState(
                name=name,
                provider=members.provider,
                trust_zone=trust_zone,
                region=members.region,
                gpu=members.gpu,
                free_slots=members.free_slots,
                sec_per_frame=sum(speeds) / len(speeds) if speeds else DEFAULT_SEC_PER_FRAME,
                healthy=members.live > 0,
                instance_type="",
            )
        return replace(
            static,
            trust_zone=trust_zone,
            gpu=members.gpu or static.gpu,
            free_slots=members.free_slots,
            sec_per_frame=sum(speeds) / len(speeds) if speeds else static.sec_per_frame,
            can_provision=max(0, static.can_provision - members.instances),
            # A pool without live agents is still healthy while it can provision one.
            healthy=members.live > 0 or static.can_provision > members.instances,
        )

    def _publish(self, members: Mapping[str, PoolMembers], pools: list[PoolState]) -> None:
        self._published_at = time.monotonic()
        counts = {(pool, state): count for pool, m in members.items() for state, count in m.states.items()}
        with self._gauge_lock:
            for pool, state in self._gauge_labels - set(counts):
                metrics.AGENTS.labels(pool=pool, state=state).set(0)
            for (pool, state), count in counts.items():
                metrics.AGENTS.labels(pool=pool, state=state).set(count)
            self._gauge_labels |= set(counts)
            for pool_state in pools:
                metrics.POOL_FREE_SLOTS.labels(pool=pool_state.name).set(pool_state.free_slots)
            for gone in self._gauge_pools - {p.name for p in pools}:
                metrics.POOL_FREE_SLOTS.labels(pool=gone).set(0)
            self._gauge_pools |= {p.name for p in pools}


def pool_state_from_config(pool: PoolConfig) -> PoolState:
    """A configured pool before any agent joins: no free slots, up to max_instances provisionable."""
    return PoolState(
        name=pool.name,
        provider=pool.provider,
        trust_zone=pool.trust_zone,
        region=pool.region,
        free_slots=0,
        sec_per_frame=pool.sec_per_frame,
        price_per_hour=pool.price_per_hour,
        spot=pool.spot,
        instance_type=pool.instance_type,
        can_provision=pool.max_instances,
        provision_s=pool.provision_s,
        healthy=True,
        run_margin=pool.run_margin,
        run_slack_s=pool.run_slack_s,
    )
