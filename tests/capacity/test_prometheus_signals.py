"""PrometheusSignals and CapacityView against a real Prometheus scraping a real exporter."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, start_http_server

from facefleet.scheduler.capacity import AgentRegistry, CapacityView, PrometheusSignals
from facefleet.v1 import scheduler_pb2
from tests.fixtures.ports import free_port
from tests.fixtures.prometheus import PrometheusHandle

pytestmark = pytest.mark.prometheus


class PoolExporter:
    """A tiny /metrics endpoint with the gauges agents and dcgm-exporter publish, per pool."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.free = Gauge("facefleet_agent_slots_free", "free", ["pool"], registry=self.registry)
        self.dcgm_util = Gauge("DCGM_FI_DEV_GPU_UTIL", "util %", ["pool", "gpu"], registry=self.registry)
        self.own_util = Gauge("facefleet_agent_gpu_utilization_ratio", "util", ["pool", "gpu"], registry=self.registry)
        self.queue_wait = Gauge("test_pool_queue_wait_seconds", "wait", ["pool"], registry=self.registry)
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def exporter() -> Iterator[PoolExporter]:
    exporter = PoolExporter()
    yield exporter
    exporter.close()


QUERIES = {"queue_wait_s": "max by (pool) (test_pool_queue_wait_seconds)"}


def heartbeat(agent_id: str, pool: str, free: int) -> scheduler_pb2.HeartbeatRequest:
    return scheduler_pb2.HeartbeatRequest(
        agent_id=agent_id,
        address="127.0.0.1:1",
        pool=pool,
        trust_zone="private",
        provider="onprem",
        total_slots=4,
        free_slots=free,
        healthy=True,
    )


def test_signals_follow_the_exporter_and_go_stale_when_prometheus_stops(
    exporter: PoolExporter, prometheus_server: Callable[..., PrometheusHandle]
) -> None:
    exporter.free.labels(pool="onprem-a").set(3)
    exporter.free.labels(pool="cloud-b").set(7)
    exporter.dcgm_util.labels(pool="onprem-a", gpu="0").set(50)
    exporter.dcgm_util.labels(pool="onprem-a", gpu="1").set(70)
    exporter.own_util.labels(pool="cloud-b", gpu="0").set(0.25)  # no DCGM there: falls back
    exporter.queue_wait.labels(pool="onprem-a").set(12.5)
    prometheus = prometheus_server([exporter.target])
    prometheus.wait_for_series('facefleet_agent_slots_free{pool="cloud-b"}')

    signals = PrometheusSignals(prometheus.url, QUERIES, max_age_s=10, refresh_s=0)
    sample = signals.sample(time.time())
    assert sample.stale is False, sample.error
    assert sample.by_pool["onprem-a"]["free_slots"] == 3
    assert sample.by_pool["cloud-b"]["free_slots"] == 7
    assert sample.by_pool["onprem-a"]["gpu_util"] == pytest.approx(0.6)
    assert sample.by_pool["cloud-b"]["gpu_util"] == pytest.approx(0.25)
    assert sample.by_pool["onprem-a"]["queue_wait_s"] == 12.5
    assert 0 < sample.by_pool["onprem-a"]["data_age_s"] < 5  # the sample's own time, not "now"

    registry = AgentRegistry(heartbeat_timeout_s=30)
    registry.record_heartbeat(heartbeat("a1", "onprem-a", free=2), now=time.time())
    view = CapacityView(registry, signals)
    snapshot = view.snapshot(time.time())
    assert snapshot.notes == ()
    pool = snapshot.pool("onprem-a")
    assert pool is not None
    assert pool.queue_wait_s == 12.5
    assert pool.free_slots == 2  # heartbeats stay authoritative for slots
    assert snapshot.signals["onprem-a"]["gpu_util"] == pytest.approx(0.6)
    assert REGISTRY.get_sample_value("facefleet_capacity_prometheus_stale") == 0

    prometheus.stop()
    started = time.monotonic()
    sample = signals.sample(time.time())
    assert time.monotonic() - started < 1.5
    assert sample.stale is True
    assert sample.by_pool == {}
    assert sample.error and prometheus.url in sample.error

    snapshot = view.snapshot(time.time())
    pool = snapshot.pool("onprem-a")
    assert pool is not None and pool.free_slots == 2 and pool.queue_wait_s == 0.0
    assert any("prometheus stale" in note and "heartbeats only" in note for note in snapshot.notes)
    assert REGISTRY.get_sample_value("facefleet_capacity_prometheus_stale") == 1


def test_old_or_missing_data_counts_as_stale(
    exporter: PoolExporter, prometheus_server: Callable[..., PrometheusHandle]
) -> None:
    exporter.free.labels(pool="onprem-a").set(1)
    prometheus = prometheus_server([exporter.target])
    prometheus.wait_for_series("facefleet_agent_slots_free")
    time.sleep(0.3)
    # Prometheus answers, but its newest sample is older than allowed.
    strict = PrometheusSignals(prometheus.url, max_age_s=0.05, refresh_s=0).sample(time.time())
    assert strict.stale is True
    assert strict.error is not None and "old (max" in strict.error
    relaxed = PrometheusSignals(prometheus.url, max_age_s=10, refresh_s=0).sample(time.time())
    assert relaxed.stale is False and relaxed.by_pool["onprem-a"]["free_slots"] == 1
    # The exporter goes away: Prometheus marks its series stale and the freshness query is empty.
    exporter.close()
    deadline = time.monotonic() + 10
    sample = relaxed
    while not sample.stale and time.monotonic() < deadline:
        time.sleep(0.3)
        sample = PrometheusSignals(prometheus.url, max_age_s=10, refresh_s=0).sample(time.time())
    assert sample.stale is True
    assert sample.error is not None and "no series for the freshness query" in sample.error
