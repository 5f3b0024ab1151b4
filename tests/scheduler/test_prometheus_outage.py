"""Prometheus stopped mid-run (a real Prometheus binary): placement carries on from heartbeats and
says so in the decision's notes."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from facefleet.v1 import scheduler_pb2, types_pb2
from tests.fixtures.ports import free_port
from tests.scheduler.fake_agents import wait_for


def private_task(name: str) -> types_pb2.Task:
    return types_pb2.Task(
        project="prom",
        sensitivity=types_pb2.SENSITIVITY_PRIVATE,
        frames=1,
        source_uri="file:///data/face.jpg",
        target_uri=f"file:///data/{name}.jpg",
    )


@pytest.mark.prometheus
@pytest.mark.slow
def test_placement_continues_on_heartbeats_when_prometheus_stops(
    prometheus_server,
    start_scheduler,
    start_agent,
    client,  # type: ignore[no-untyped-def]
) -> None:
    # An exporter with the agent gauge the default PromQL reads, so Prometheus has fresh data.
    registry = CollectorRegistry()
    Gauge("facefleet_agent_slots_free", "free slots", ["pool"], registry=registry).labels(pool="onprem-a").set(4)
    exporter_port = free_port()
    exporter, _thread = start_http_server(exporter_port, addr="127.0.0.1", registry=registry)
    prometheus = prometheus_server([f"127.0.0.1:{exporter_port}"])
    prometheus.wait_for_series("facefleet_agent_slots_free")
    try:
        app = start_scheduler(prometheus_url=prometheus.url)
        start_agent(app.port, "onprem-1", "onprem-a", "private", slots=4)
        stub = client(app.port)
        wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent heartbeat")

        before = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=private_task("before")))
        wait_for(lambda: app.store.get(before.task_id).state == "succeeded", 20, what="task with Prometheus up")
        notes = list(stub.Explain(scheduler_pb2.ExplainRequest(task_id=before.task_id)).notes)
        assert not any("prometheus stale" in note for note in notes), notes

        prometheus.stop()
        wait_for(
            lambda: any("prometheus stale" in n for n in app.capacity.snapshot(time.time()).notes),
            10,
            what="capacity to notice Prometheus is gone",
        )
        after = stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=private_task("after")))
        wait_for(lambda: app.store.get(after.task_id).state == "succeeded", 20, what="task with Prometheus down")
        decision = stub.Explain(scheduler_pb2.ExplainRequest(task_id=after.task_id))
        assert decision.pool == "onprem-a"
        assert any("prometheus stale" in note for note in decision.notes), list(decision.notes)
    finally:
        exporter.shutdown()
