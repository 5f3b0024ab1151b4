"""Dispatcher rules that placement alone cannot prove: the residency re-check before the RPC and
per-project limits. A deliberately wrong placer stands in for a placement bug."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from facefleet.scheduler.capacity import AgentRegistry
from facefleet.scheduler.dispatcher import Dispatcher, DispatcherSettings
from facefleet.scheduler.pass_planner import Action, PassWorld, Waiting
from facefleet.scheduler.placement import RuleSet, TaskSpec, load_ruleset, place
from facefleet.scheduler.placement.model import Budget, Decision, PoolState, World
from facefleet.scheduler.placement.proto_codec import task_spec_from_proto
from facefleet.scheduler.placement_gateway import LivePlacement, PlacementResult, WorldSnapshot
from facefleet.scheduler.rules_source.base import ActiveConfig
from facefleet.scheduler.simulate import plan_snapshot
from facefleet.scheduler.store import NewTask, TaskStore
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.cloud.burst_policy import BURST_RULES


class FixedPlacer:
    """Always answers `dispatch` to one pool, whatever the task (a buggy placement)."""

    def __init__(self, pool: str, trust_zone: str) -> None:
        self.pool = pool
        self.trust_zone = trust_zone

    def world(self, now: float) -> WorldSnapshot:
        pool = PoolState(name=self.pool, provider="aws", trust_zone=self.trust_zone, free_slots=8)
        return WorldSnapshot(ActiveConfig(RuleSet(rules=(), version="")), World(pools=(pool,), budgets={}, locks={}))

    def decide(self, task: types_pb2.Task, now: float, snapshot: Any = None, spec: Any = None) -> PlacementResult:
        decision = Decision("dispatch", self.pool, "buggy", "always here", (), None)
        return PlacementResult(
            outcome="dispatch",
            pool=self.pool,
            rule="buggy",
            reason="always here",
            summary=decision.to_dict(),
            proto=types_pb2.PlacementDecision(pool=self.pool, rule="buggy"),
            pool_trust_zone=self.trust_zone,
            project_locked=task.project == "locked-proj",
            decision=decision,
        )


def register(registry: AgentRegistry, agent_id: str, pool: str, zone: str, slots: int = 8) -> None:
    registry.record_heartbeat(
        scheduler_pb2.HeartbeatRequest(
            agent_id=agent_id,
            address="127.0.0.1:9",
            pool=pool,
            trust_zone=zone,
            provider="aws",
            total_slots=slots,
            free_slots=slots,
            healthy=True,
        ),
        time.time(),
    )


def submit(store: TaskStore, project: str, sensitivity: int) -> str:
    task = types_pb2.Task(
        project=project,
        sensitivity=sensitivity,
        priority=types_pb2.PRIORITY_NORMAL,
        frames=1,  # type: ignore[arg-type]
        source_uri="file:///a.jpg",
        target_uri="file:///b.jpg",
    )
    return store.insert_batch([NewTask(task, "")], time.time())[0].task_id


def test_residency_recheck_refuses_private_and_locked_work_on_a_cloud_pool(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "cloud-1", "cloud-b", "cloud")
    audits: list[tuple[str, dict[str, Any]]] = []
    dispatcher = Dispatcher(
        store,
        FixedPlacer("cloud-b", "cloud"),
        registry,
        DispatcherSettings(project_limits={}, warmup_s=0),
        audit=lambda kind, details: audits.append((kind, details)),
    )
    private = submit(store, "films", types_pb2.SENSITIVITY_PRIVATE)
    locked = submit(store, "locked-proj", types_pb2.SENSITIVITY_PUBLIC)
    public = submit(store, "promo", types_pb2.SENSITIVITY_PUBLIC)
    try:
        assert dispatcher.step() == 1  # only the public task is sent
        for task_id in (private, locked):
            record = store.get(task_id)
            assert record.state == "failed" and record.agent_id is None
            assert record.last_reason.startswith("RESIDENCY_VIOLATION")
        assert {details["task_id"] for kind, details in audits if kind == "residency_refused"} == {private, locked}
        assert store.get(public).state in ("dispatched", "queued")  # sent (the fake address then fails)
    finally:
        dispatcher.stop()
        store.close()


def test_project_limit_caps_tasks_in_flight(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "onprem-1", "onprem-a", "private", slots=10)
    dispatcher = Dispatcher(
        store,
        FixedPlacer("onprem-a", "private"),
        registry,
        DispatcherSettings(project_limits={"busy": 2, "*": 5}, warmup_s=0, backoff_initial_s=60),
    )
    busy = [submit(store, "busy", types_pb2.SENSITIVITY_PRIVATE) for _ in range(4)]
    other = [submit(store, "other", types_pb2.SENSITIVITY_PRIVATE) for _ in range(2)]
    try:
        dispatcher.dispatch_pass(time.time())
        # (the fake agent address then fails and re-queues them: look at what was dispatched)
        dispatched = {t for t in busy + other if any(x.to_state == "dispatched" for x in store.transitions_of(t))}
        assert len(dispatched & set(busy)) == 2
        assert set(other) <= dispatched
    finally:
        dispatcher.stop()
        store.close()


def counting_placement(calls: list[str]) -> LivePlacement:
    """The real placement gateway and engine over a world where the on-prem pool is full and one
    cloud slot is free; `calls` gets the id of every task it places."""
    ruleset = load_ruleset(
        {
            "rules": [
                {"id": "private-onprem", "match": {"sensitivity": ["private"]}, "allow": ["onprem-*"]},
                {"id": "public-cloud", "match": {"sensitivity": ["public"]}, "allow": ["cloud-*"]},
            ]
        },
        "test",
    )
    rules = SimpleNamespace(ruleset=ruleset, budgets={}, locks={}, version="1", errors=())
    pools = (
        PoolState(name="onprem-a", provider="onprem", trust_zone="private", free_slots=0),
        PoolState(name="cloud-b", provider="aws", trust_zone="cloud", free_slots=1),
    )
    capacity = SimpleNamespace(snapshot=lambda now: SimpleNamespace(pools=pools, notes=()))

    def counted(task: TaskSpec, active: RuleSet, world: World) -> Decision:
        calls.append(task.id)
        return place(task, active, world)

    return LivePlacement(SimpleNamespace(current=lambda: rules), capacity, place_fn=counted)


def test_a_pass_places_each_kind_of_waiting_task_once(tmp_path: Path) -> None:
    """The on-prem pool is full and the queue head is private work: the first private task is
    placed (it waits for a slot), the identical ones after it are not placed again, and the public
    task behind them still takes the free cloud slot. A private task of another project is placed."""
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "cloud-1", "cloud-b", "cloud", slots=1)
    calls: list[str] = []
    dispatcher = Dispatcher(
        store, counting_placement(calls), registry, DispatcherSettings(project_limits={}, warmup_s=0)
    )
    private = [submit(store, "films", types_pb2.SENSITIVITY_PRIVATE) for _ in range(6)]
    other_project = submit(store, "ads", types_pb2.SENSITIVITY_PRIVATE)
    public = submit(store, "promo", types_pb2.SENSITIVITY_PUBLIC)
    try:
        assert dispatcher.dispatch_pass(time.time()) == 1
        assert calls == [private[0], other_project, public]
        assert any(step.to_state == "dispatched" for step in store.transitions_of(public))
        for task_id in private:  # waiting for a slot: nothing recorded for them
            assert store.get(task_id).state == "queued" and store.get(task_id).placement is None
    finally:
        dispatcher.stop()
        store.close()


def test_the_live_pass_applies_the_plan_simulate_makes_for_the_same_snapshot(tmp_path: Path) -> None:
    """One planner: the dispatcher's pass over the real store, placement gateway and agent registry,
    and `facefleet simulate`'s pass over the same snapshot, place the same tasks in the same order
    and launch the same tasks on the same pools (aging, a project limit, a budget cap that binds, a
    locked project, private work, a task no pool can ever run)."""
    now = time.time()
    rules = load_ruleset(BURST_RULES, "rules.yaml")
    active = ActiveConfig(rules, budgets={"burst": Budget("burst", 0.35)}, locks={"secret": "audit"})
    pools = (
        PoolState(name="onprem-a", provider="onprem", trust_zone="private", free_slots=2, sec_per_frame=1.0),
        PoolState(name="cloud-a", provider="aws", trust_zone="cloud", free_slots=3, sec_per_frame=1.0,
                  price_per_hour=36.0),
    )  # fmt: skip
    capacity = SimpleNamespace(snapshot=lambda now: SimpleNamespace(pools=pools, notes=()))
    live_calls: list[tuple[str, str, str | None]] = []

    def recorded(task: TaskSpec, ruleset: RuleSet, world: World) -> Decision:
        decision = place(task, ruleset, world)
        live_calls.append((task.id, decision.outcome, decision.pool))
        return decision

    placer = LivePlacement(SimpleNamespace(current=lambda: active), capacity, place_fn=recorded)
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    registry = AgentRegistry(heartbeat_timeout_s=30)
    register(registry, "onprem-1", "onprem-a", "private", slots=2)
    register(registry, "cloud-1", "cloud-a", "cloud", slots=3)
    public, private = types_pb2.SENSITIVITY_PUBLIC, types_pb2.SENSITIVITY_PRIVATE
    normal, urgent, low = types_pb2.PRIORITY_NORMAL, types_pb2.PRIORITY_URGENT, types_pb2.PRIORITY_LOW
    for project, sensitivity, priority, age, frames, sla in [
        ("promo", public, normal, 30, 10, 0),
        ("promo", public, normal, 29, 10, 0),
        ("promo", public, normal, 28, 10, 0),  # over promo's limit of 2
        ("films", private, urgent, 5, 10, 0),
        ("films", private, urgent, 4, 10, 0),
        ("films", private, urgent, 3, 10, 0),  # on-prem is full by now: waits
        ("ads", public, low, 400, 10, 0),  # aged ahead of everything
        ("secret", public, urgent, 2, 10, 0),  # locked: on-prem only
        ("late", public, normal, 1, 100, 1),  # no pool can do 100 frames in 1 s: rejected
        ("batch", public, normal, 0, 10, 0),
        ("batch", public, normal, 0, 10, 0),  # the cap ($0.35; a run reserves its bound, $0.17) binds before this one
    ]:
        task = types_pb2.Task(project=project, sensitivity=sensitivity, priority=priority, frames=frames,
                              sla_seconds=sla, source_uri="file:///a.jpg", target_uri="file:///b.jpg")  # fmt: skip
        store.insert_batch([NewTask(task, "")], now - age)
    settings = DispatcherSettings(project_limits={"promo": 2}, warmup_s=0, backoff_initial_s=60)
    queued = store.runnable(now, 100, settings.aging_s)
    waiting = [Waiting(task_spec_from_proto(r.task()), r.priority, r.submitted_at) for r in queued]
    simulated = plan_snapshot(
        rules, PassWorld(placer.world(now).world, settings.project_limits), waiting, settings.aging_s
    )
    dispatcher = Dispatcher(store, placer, registry, settings)
    try:
        dispatcher.dispatch_pass(now)
        placed = [p for p in simulated if p.placed is not None]
        assert live_calls == [(p.waiting.task.id, p.decision.outcome, p.decision.pool) for p in placed]
        live_launches = {
            t.id: step.pool for t in queued for step in store.transitions_of(t.id) if step.to_state == "dispatched"
        }
        assert live_launches == {p.waiting.task.id: p.pool for p in simulated if p.launch}
        assert sorted(live_launches.values()) == ["cloud-a", "cloud-a", "onprem-a", "onprem-a"]
        rejected = {t.id for t in queued if store.get(t.id).state == "failed"}
        assert rejected == {p.waiting.task.id for p in simulated if p.action is Action.REJECT} != set()
    finally:
        dispatcher.stop()
        store.close()


def test_a_pass_asks_for_as_many_provisioned_slots_as_the_cloud_pool_can_add(tmp_path: Path) -> None:
    """No cloud agent yet, room for two more 4-slot instances: the pass plans eight tasks onto
    instances to provision and hands each to the provisioning gate; the other two wait."""
    rules = load_ruleset(BURST_RULES, "rules.yaml")
    active = ActiveConfig(rules, budgets={"burst": Budget("burst", 100.0)}, locks={})
    cloud = PoolState(name="cloud-a", provider="aws", trust_zone="cloud", can_provision=2, slots_per_instance=4,
                      price_per_hour=3.6, provision_s=60.0)  # fmt: skip
    capacity = SimpleNamespace(snapshot=lambda now: SimpleNamespace(pools=(cloud,), notes=()))
    placer = LivePlacement(SimpleNamespace(current=lambda: active), capacity)
    asked: list[str] = []
    gate = SimpleNamespace(
        admit=lambda task, decision, now: "",
        withdraw=lambda task_id: None,
        no_agent=lambda task, decision, now: asked.append(task.id),
    )
    store = TaskStore(f"sqlite:///{tmp_path}/d.db")
    dispatcher = Dispatcher(
        store, placer, AgentRegistry(heartbeat_timeout_s=30), DispatcherSettings(project_limits={}, warmup_s=0),
        gate=gate,
    )  # fmt: skip
    ids = [submit(store, "promo", types_pb2.SENSITIVITY_PUBLIC) for _ in range(10)]
    try:
        assert dispatcher.dispatch_pass(time.time()) == 0
        assert len(asked) == len(set(asked)) == 8 and set(asked) < set(ids)
        assert all(store.get(task_id).state == "queued" for task_id in ids)
    finally:
        dispatcher.stop()
        store.close()
