"""AgentRegistry: heartbeats, over-dispatch accounting, lost agents, drain and cancel instructions."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefleet.scheduler.capacity import AgentRegistry, HeartbeatRejected
from facefleet.v1 import scheduler_pb2


def beat(
    agent_id: str = "a1",
    pool: str = "onprem-a",
    free: int = 2,
    total: int = 2,
    running: tuple[str, ...] = (),
    **extra: object,
) -> scheduler_pb2.HeartbeatRequest:
    fields: dict[str, object] = {
        "agent_id": agent_id,
        "address": f"127.0.0.1:{5000 + len(agent_id)}",
        "pool": pool,
        "trust_zone": "private",
        "provider": "onprem",
        "region": "local",
        "total_slots": total,
        "free_slots": free,
        "healthy": True,
        "running_task_ids": list(running),
    }
    fields.update(extra)
    return scheduler_pb2.HeartbeatRequest(**fields)  # type: ignore[arg-type]


def test_dispatch_since_heartbeat_counts_against_free_slots() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=10)
    registry.record_heartbeat(beat(free=2), now=100.0)
    registry.note_dispatched("a1", "t1", now=100.5)
    registry.note_dispatched("a1", "t2", now=100.6)
    # The heartbeat still says 2 free, but both were sent since: nothing is left to give.
    assert registry.get("a1").effective_free_slots == 0  # type: ignore[union-attr]
    assert registry.pick_agent("onprem-a", now=100.7) is None


def test_stale_heartbeat_sampled_before_dispatch_does_not_release_slots() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=10)
    registry.record_heartbeat(beat(free=2), now=100.0)
    registry.note_dispatched("a1", "t1", now=100.5)
    # Sampled before t1 arrived: still 2 free and t1 not listed. Effective must stay 1, not 2.
    registry.record_heartbeat(beat(free=2), now=101.0)
    assert registry.get("a1").effective_free_slots == 1  # type: ignore[union-attr]
    # A heartbeat listing t1 as running already counts it in free_slots: no double counting.
    registry.record_heartbeat(beat(free=1, running=("t1",)), now=102.0)
    record = registry.get("a1")
    assert record is not None
    assert record.in_flight == {}
    assert record.effective_free_slots == 1


def test_in_flight_reservation_expires_when_heartbeats_never_list_it() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=10, in_flight_grace_s=5)
    registry.record_heartbeat(beat(free=1, total=1), now=100.0)
    registry.note_dispatched("a1", "t1", now=100.0)
    registry.record_heartbeat(beat(free=1, total=1), now=104.0)
    assert registry.get("a1").effective_free_slots == 0  # type: ignore[union-attr]
    registry.record_heartbeat(beat(free=1, total=1), now=106.0)
    assert registry.get("a1").effective_free_slots == 1  # type: ignore[union-attr]


def test_note_finished_frees_reserved_and_running_slots() -> None:
    registry = AgentRegistry()
    registry.record_heartbeat(beat(free=0, total=1, running=("t0",)), now=100.0)
    assert registry.pick_agent("onprem-a", now=100.1) is None
    registry.note_finished("a1", "t0")
    assert registry.get("a1").effective_free_slots == 1  # type: ignore[union-attr]
    registry.note_dispatched("a1", "t1", now=100.2)
    assert registry.pick_agent("onprem-a", now=100.3) is None
    registry.note_finished("a1", "t1")
    assert registry.pick_agent("onprem-a", now=100.4) is not None


def test_concurrent_reservations_never_exceed_slots() -> None:
    registry = AgentRegistry()
    registry.record_heartbeat(beat("a1", free=3, total=3), now=100.0)
    registry.record_heartbeat(beat("a2", free=2, total=2), now=100.0)
    won: list[str] = []
    lock = threading.Lock()

    def grab(i: int) -> None:
        agent = registry.reserve("onprem-a", f"t{i}", now=100.1)
        if agent is not None:
            with lock:
                won.append(agent.agent_id)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won) == ["a1", "a1", "a1", "a2", "a2"]


def test_pick_prefers_most_effective_free_and_skips_unusable_agents() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=10)
    registry.record_heartbeat(beat("big", free=4, total=4), now=100.0)
    registry.record_heartbeat(beat("small", free=1, total=1), now=100.0)
    registry.record_heartbeat(beat("sick", free=8, total=8, healthy=False), now=100.0)
    registry.record_heartbeat(beat("spot", free=8, total=8, preempting=True), now=100.0)
    registry.record_heartbeat(beat("other", pool="cloud-b", free=8, total=8, trust_zone="cloud"), now=100.0)
    assert registry.pick_agent("onprem-a", now=101.0).agent_id == "big"  # type: ignore[union-attr]
    for i in range(3):
        registry.note_dispatched("big", f"t{i}", now=101.0)
    # big now has 1 effective slot like small; small waited longer for work.
    assert registry.pick_agent("onprem-a", now=101.0).agent_id == "small"  # type: ignore[union-attr]
    assert registry.drain("big") and registry.drain("small")
    assert registry.pick_agent("onprem-a", now=101.0) is None
    assert registry.drain("nobody") is False


def test_silent_agent_is_lost_once_and_revives_on_heartbeat() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=5)
    registry.record_heartbeat(beat("a1", free=1, total=2, running=("t1",)), now=100.0)
    registry.note_dispatched("a1", "t2", now=101.0)
    registry.record_heartbeat(beat("a2", free=1, total=1), now=103.0)
    # Not yet past the timeout: nobody lost, but a1 is already skipped once silent too long.
    assert registry.sweep(now=104.0) == []
    lost = registry.sweep(now=105.5)
    assert [r.agent_id for r in lost] == ["a1"]
    assert lost[0].task_ids == {"t1", "t2"}
    assert registry.lost_since("a1") == 105.5
    assert registry.lost_since("a2") is None
    assert registry.sweep(now=106.0) == []  # reported once
    assert registry.pick_agent("onprem-a", now=106.0).agent_id == "a2"  # type: ignore[union-attr]
    registry.record_heartbeat(beat("a1", free=2, total=2), now=107.0)
    assert registry.lost_since("a1") is None


def test_silent_agent_is_not_picked_before_the_sweep_runs() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=5)
    registry.record_heartbeat(beat(free=2), now=100.0)
    assert registry.pick_agent("onprem-a", now=105.0) is not None
    assert registry.pick_agent("onprem-a", now=105.1) is None


def test_heartbeat_response_carries_drain_and_cancels_until_task_is_gone() -> None:
    registry = AgentRegistry(heartbeat_interval_s=2)
    registry.record_heartbeat(beat(free=0, running=("t1", "t2")), now=100.0)
    registry.request_cancel("a1", "t1")
    registry.drain("a1")
    response = registry.record_heartbeat(beat(free=0, running=("t1", "t2")), now=101.0)
    assert response.drain is True
    assert list(response.cancel_task_ids) == ["t1"]
    assert response.heartbeat_interval_s == 2
    assert response.server_time.seconds > 0
    # Still running: the cancel is sent again (at-least-once).
    response = registry.record_heartbeat(beat(free=1, running=("t2",)), now=102.0)
    assert list(response.cancel_task_ids) == ["t1"]
    response = registry.record_heartbeat(beat(free=1, running=("t2",)), now=103.0)
    assert list(response.cancel_task_ids) == []
    registry.undrain("a1")
    assert registry.pending_instructions("a1").drain is False


@pytest.mark.parametrize(
    ("field", "value"),
    [("agent_id", " "), ("pool", ""), ("trust_zone", "public"), ("address", "")],
)
def test_unusable_heartbeats_are_rejected_with_the_field(field: str, value: str) -> None:
    registry = AgentRegistry()
    with pytest.raises(HeartbeatRejected) as raised:
        request = beat()
        setattr(request, field, value)
        registry.record_heartbeat(request, now=1.0)
    assert raised.value.field == field
    assert registry.agents() == []


def test_free_slots_above_total_are_refused() -> None:
    registry = AgentRegistry()
    with pytest.raises(HeartbeatRejected, match="9 free of 2 slots"):
        registry.record_heartbeat(beat(free=9, total=2), now=1.0)
    assert registry.get("a1") is None


def test_note_dispatched_to_unknown_agent_says_so() -> None:
    with pytest.raises(KeyError, match="never sent a heartbeat"):
        AgentRegistry().note_dispatched("ghost", "t1", now=1.0)


def test_raised_run_limits_go_to_the_agent_holding_the_run_until_it_leaves() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=10)
    registry.record_heartbeat(beat("a1", free=2), now=100.0)
    registry.record_heartbeat(beat("a2", free=2), now=100.0)
    registry.note_dispatched("a1", "t1", now=100.5)
    registry.raise_run_limit("t1", 1, 12.0)
    registry.raise_run_limit("t1", 1, 9.0)  # an older, lower limit arriving late: the higher stays
    registry.raise_run_limit("t9", 1, 5.0)  # a task no agent holds: nobody is told
    sent = registry.record_heartbeat(beat("a1", free=1, running=("t1",)), now=101.0).run_limits
    assert [(r.task_id, r.attempt, r.max_run_s) for r in sent] == [("t1", 1, 12.0)]
    assert not registry.record_heartbeat(beat("a2"), now=101.0).run_limits
    # Repeated while the run goes on (a heartbeat reply may be lost); gone once it left the agent.
    assert registry.record_heartbeat(beat("a1", free=1, running=("t1",)), now=102.0).run_limits
    registry.note_finished("a1", "t1")
    assert not registry.record_heartbeat(beat("a1", free=2), now=103.0).run_limits


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["onprem-a", "cloud-b"]),
            st.integers(0, 4),  # free slots reported
            st.integers(0, 3),  # tasks reserved on it since
            st.booleans(),  # healthy
            st.sampled_from([100.0, 100.5, 101.0]),  # last dispatch
        ),
        max_size=12,
    )
)
def test_the_chosen_agent_has_the_most_free_slots_then_waited_longest_then_lowest_id(
    agents: list[tuple[str, int, int, bool, float]],
) -> None:
    registry = AgentRegistry(heartbeat_timeout_s=10.0)
    for index, (pool, free, reserved, healthy, last_dispatch) in enumerate(agents):
        agent_id = f"agent-{index:02d}"
        registry.record_heartbeat(beat(agent_id, pool=pool, free=free, total=4, healthy=healthy), now=100.0)
        for task in range(reserved):
            registry.note_dispatched(agent_id, f"{agent_id}-t{task}", now=100.0)
        registry._agents[agent_id].last_dispatch = last_dispatch
    records = [registry._agents[f"agent-{index:02d}"] for index in range(len(agents))]
    for pool in ("onprem-a", "cloud-b"):
        candidates = [r for r in records if r.pool == pool and r.healthy and r.effective_free_slots > 0]
        expected = min(candidates, key=lambda r: (-r.effective_free_slots, r.last_dispatch, r.agent_id), default=None)
        chosen = registry.pick_agent(pool, now=101.0)
        assert (chosen.agent_id if chosen else None) == (expected.agent_id if expected else None)


def test_an_agent_that_moves_to_another_pool_is_picked_only_there() -> None:
    registry = AgentRegistry(heartbeat_timeout_s=10)
    registry.record_heartbeat(beat("a1", pool="onprem-a"), now=100.0)
    registry.record_heartbeat(beat("a2", pool="onprem-b"), now=100.0)
    picked = registry.pick_agent("onprem-a", now=100.1)
    assert picked is not None and picked.agent_id == "a1"
    registry.record_heartbeat(beat("a1", pool="onprem-b", free=4, total=4), now=100.2)  # re-registered elsewhere
    assert registry.pick_agent("onprem-a", now=100.3) is None
    moved = registry.reserve("onprem-b", "t1", now=100.3)
    assert moved is not None and moved.agent_id == "a1"  # most free slots in its new pool
