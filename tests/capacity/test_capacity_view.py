"""CapacityView: heartbeat pools merged with configured pools; the heartbeats-only fallback."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from facefleet.config import PoolConfig, SchedulerConfig
from facefleet.scheduler.capacity import AgentRegistry, CapacityView, PrometheusSignals
from facefleet.v1 import scheduler_pb2
from tests.fixtures.ports import free_port


def beat(agent_id: str, pool: str, zone: str, free: int, **extra: object) -> scheduler_pb2.HeartbeatRequest:
    return scheduler_pb2.HeartbeatRequest(
        agent_id=agent_id,
        address="127.0.0.1:1",
        pool=pool,
        trust_zone=zone,
        provider="onprem" if zone == "private" else "aws",
        region="local",
        total_slots=4,
        free_slots=free,
        healthy=True,
        **extra,  # type: ignore[arg-type]
    )


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_heartbeat_pools_sum_effective_free_slots_of_live_agents() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=5)
    registry.record_heartbeat(beat("a1", "view-onprem", "private", 3, sec_per_frame=0.02, gpu="L4"), now=100)
    registry.record_heartbeat(beat("a2", "view-onprem", "private", 2, sec_per_frame=0.04), now=100)
    registry.record_heartbeat(beat("a3", "view-onprem", "private", 4), now=90)  # silent: lost soon
    registry.note_dispatched("a1", "t1", now=100.5)
    snapshot = CapacityView(registry, None).snapshot(now=101)
    pool = snapshot.pool("view-onprem")
    assert pool is not None
    assert (pool.free_slots, pool.trust_zone, pool.gpu, pool.healthy) == (4, "private", "L4", True)
    assert pool.sec_per_frame == 0.03
    assert snapshot.notes == ()  # no Prometheus configured is the embedded default, not a fault
    assert gauge("facefleet_pool_free_slots", pool="view-onprem") == 4
    registry.sweep(now=101)
    CapacityView(registry, None).snapshot(now=101)
    assert gauge("facefleet_agents", pool="view-onprem", state="ready") == 2
    assert gauge("facefleet_agents", pool="view-onprem", state="lost") == 1


def test_configured_pool_without_agents_is_provisionable_and_merges_by_name() -> None:
    config = SchedulerConfig(
        pools=[
            PoolConfig(
                name="view-spot",
                provider="aws",
                region="eu-west-1",
                instance_type="g5.xlarge",
                max_instances=3,
                provision_s=90,
                price_per_hour=0.4,
                spot=True,
            ),
        ]
    )
    registry = AgentRegistry(heartbeat_timeout_s=5)
    view = CapacityView.from_config(config, registry)
    pool = view.snapshot(now=100).pool("view-spot")
    assert pool is not None
    assert (pool.free_slots, pool.can_provision, pool.healthy, pool.trust_zone) == (0, 3, True, "cloud")
    assert (pool.price_per_hour, pool.provision_s, pool.instance_type) == (0.4, 90, "g5.xlarge")
    registry.record_heartbeat(beat("c1", "view-spot", "cloud", 2), now=100)
    pool = view.snapshot(now=100.5).pool("view-spot")
    assert pool is not None
    assert (pool.free_slots, pool.can_provision, pool.price_per_hour) == (2, 2, 0.4)


def test_pool_with_a_cloud_member_is_never_private() -> None:
    registry = AgentRegistry()
    registry.record_heartbeat(beat("p1", "view-mixed", "private", 1), now=100)
    registry.record_heartbeat(beat("c1", "view-mixed", "cloud", 1), now=100)
    snapshot = CapacityView(registry, None).snapshot(now=100)
    assert snapshot.pool("view-mixed").trust_zone == "cloud"  # type: ignore[union-attr]
    assert any("disagree on trust zone" in note for note in snapshot.notes)
    # Configured as cloud, agent claims private: the pool stays cloud.
    static = CapacityView.from_config(
        SchedulerConfig(pools=[PoolConfig(name="view-cfg", trust_zone="cloud")]), registry
    )
    registry.record_heartbeat(beat("p2", "view-cfg", "private", 1), now=100)
    assert static.snapshot(now=100).pool("view-cfg").trust_zone == "cloud"  # type: ignore[union-attr]


def test_unreachable_prometheus_falls_back_fast_and_says_so() -> None:
    registry = AgentRegistry()
    registry.record_heartbeat(beat("a1", "view-fallback", "private", 2), now=time.time())
    signals = PrometheusSignals(f"http://127.0.0.1:{free_port()}", max_age_s=5, timeout_s=0.5)
    view = CapacityView(registry, signals)
    started = time.monotonic()
    snapshot = view.snapshot(time.time())
    assert time.monotonic() - started < 1.0
    assert snapshot.pool("view-fallback").free_slots == 2  # type: ignore[union-attr]
    assert len(snapshot.notes) == 1
    assert snapshot.notes[0].startswith("prometheus stale (query to http://127.0.0.1:")
    assert snapshot.notes[0].endswith("capacity from heartbeats only")
    assert gauge("facefleet_capacity_prometheus_stale") == 1
    # Within refresh_s the cached answer is reused: no second connection attempt on the hot path.
    assert signals.sample(time.time()) is signals.sample(time.time())
