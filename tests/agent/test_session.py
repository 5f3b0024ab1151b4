"""The agent's session with the scheduler, over real gRPC against the scheduler's side of the contract
(`SessionScheduler` in conftest): inventory first, heartbeats, controls at any time, assignments,
batched updates, refusals, reconnects, several replicas, prefetched runs waiting for a slot, and the
fallback to unary heartbeats + RunTask for a scheduler without sessions."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from facefleet.agent.run_journal import RUN_ENDED_STATES, RunJournal
from facefleet.agent.server import WAITING_STAGE
from facefleet.agent.session import SESSION, UNARY, Outbox
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.agent.conftest import FakePipeline, SessionScheduler, journal_outcomes, serve_scheduler
from tests.agent.test_heartbeat import free_port

RUNNING = types_pb2.TASK_STATE_RUNNING
SUCCEEDED = types_pb2.TASK_STATE_SUCCEEDED
CANCELLED = types_pb2.TASK_STATE_CANCELLED


class GatedPipeline(FakePipeline):
    """A run of task T holds before its first frame until `release(T)` (the others run freely)."""

    def __init__(self, *held: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.held = {task_id: threading.Event() for task_id in held}

    def release(self, task_id: str) -> None:
        self.held[task_id].set()

    def run(self, job: Any, on_progress: Any, cancelled: threading.Event) -> Any:
        gate = self.held.get(job.task_id)
        while gate is not None and not gate.wait(0.02):
            if cancelled.is_set():
                from tests.agent.conftest import FakePipelineError

                raise FakePipelineError("cancelled", "CANCELLED")
        return super().run(job, on_progress, cancelled)


def test_session_opens_with_the_inventory_then_heartbeats_and_obeys_controls(make_agent, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # An outcome from before a restart, not yet acknowledged: the first message must report it.
    journal = RunJournal.in_dir(tmp_path / "agent" / "work")
    journal.accept("t-before", 2, 3)
    journal.finish("t-before", 2, types_pb2.Progress(task_id="t-before", state=SUCCEEDED))
    journal.close()
    scheduler = SessionScheduler(leader_term=4)
    server = serve_scheduler(scheduler)
    try:
        env = make_agent(scheduler_port=server.port, slots=2)
        assert scheduler.wait_until(lambda: len(scheduler.heartbeats) >= 4)
        first = scheduler.messages[0].heartbeat
        assert first.agent_id == env.handle.runtime.identity.agent_id and (first.total_slots, first.free_slots) == (
            2,
            2,
        )
        assert [(r.task_id, r.attempt, r.finished, r.outcome.state) for r in first.runs] == [
            ("t-before", 2, True, SUCCEEDED)
        ]
        assert first.known_leader_term == 3
        # one session carries it all; the acknowledgement in the first control ends the reporting
        assert scheduler.sessions_opened == 1 and scheduler.unary_heartbeats == 0 and not scheduler.violations
        assert env.handle.session is not None and env.handle.session.mode == SESSION
        assert not scheduler.heartbeats[-1].runs and scheduler.heartbeats[-1].known_leader_term == 4
        # a control on its own, between heartbeats: drain, and a newer leader's term
        scheduler.send(
            scheduler_pb2.SchedulerMessage(control=scheduler_pb2.HeartbeatResponse(drain=True, leader_term=9))
        )
        deadline = time.monotonic() + 5
        while not env.handle.runtime.draining and time.monotonic() < deadline:
            time.sleep(0.01)
        assert env.handle.runtime.draining and env.handle.runtime.journal.leader_term == 9
        assert scheduler.wait_until(lambda: scheduler.heartbeats[-1].free_slots == 0)
    finally:
        server.stop(0)


def test_assignments_report_running_at_once_then_batched_progress_and_one_ending(make_agent, session_scheduler) -> None:  # type: ignore[no-untyped-def]
    scheduler, port = session_scheduler
    pipeline = FakePipeline(frames=40, frame_seconds=0.0005)
    # frames come ten times faster than the outbox linger (5 ms), so progress coalesces even on a slow host
    env = make_agent(pipeline=pipeline, scheduler_port=port, slots=4)
    assert scheduler.wait_until(lambda: scheduler.sessions_opened == 1 and len(scheduler.heartbeats) >= 1)
    tasks = [f"t-{n}" for n in range(4)]
    scheduler.assign(*(env.request(task_id, frames=40) for task_id in tasks))
    assert scheduler.wait_until(lambda: all(scheduler.ended(t) is not None for t in tasks))
    time.sleep(0.3)  # nothing may follow an ending
    for task_id in tasks:
        updates = [u.progress for u in scheduler.updates_of(task_id)]
        assert updates[0].state == RUNNING  # "accepted", or newer progress it was coalesced with
        assert [p.state for p in updates].count(SUCCEEDED) == 1 and updates[-1].state == SUCCEEDED
        assert all(p.state == RUNNING for p in updates[:-1])
        frames = [p.frames_done for p in updates]
        assert frames == sorted(frames) and frames[-1] == 40
        assert Path(env.data / "out" / f"{task_id}.png").is_file()
    # 4 runs x 40 frames of progress went out coalesced, in a few batched messages
    carrying = [m for m in scheduler.messages if m.updates]
    assert sum(len(m.updates) for m in carrying) < 4 * 40 / 2
    assert len(carrying) < sum(len(m.updates) for m in carrying)
    # a repeated assignment of a finished run replays its outcome; it does not run again
    scheduler.assign(env.request("t-0", frames=40))
    assert scheduler.wait_until(
        lambda: len([u for u in scheduler.updates_of("t-0") if u.progress.state == SUCCEEDED]) == 2
    )
    assert pipeline.calls.count("t-0") == 1


def test_refusals_say_whether_the_task_may_go_elsewhere(make_agent, session_scheduler) -> None:  # type: ignore[no-untyped-def]
    scheduler, port = session_scheduler
    pipeline = FakePipeline()
    pipeline.gate.clear()
    env = make_agent(pipeline=pipeline, scheduler_port=port, slots=1, max_waiting=0, trust_zone="cloud", pool="aws-a")
    assert scheduler.wait_until(lambda: scheduler.sessions_opened == 1 and len(scheduler.heartbeats) >= 1)
    outside = (env.data.parent / "elsewhere.png").as_uri()
    scheduler.assign(
        env.request("t-stale", leader_term=0),
        env.request("t-private", sensitivity=types_pb2.SENSITIVITY_PRIVATE),
        env.request("t-bad-input", source_uri=outside),
        env.request("t-runs"),
        env.request("t-full"),
    )
    assert scheduler.wait_until(lambda: len(scheduler.refusals) == 4)
    refusals = {r.task_id: r for r in scheduler.refusals}
    expected = {
        "t-private": (types_pb2.RESIDENCY_VIOLATION, False),
        "t-bad-input": (types_pb2.INPUT_REJECTED, False),
        "t-full": (types_pb2.NO_CAPACITY, True),
        "t-stale": (types_pb2.STALE_LEADER_TERM, True),
    }
    assert {task: (r.error.reason, r.retry) for task, r in refusals.items()} == expected
    assert "private" in refusals["t-private"].error.message and refusals["t-bad-input"].error.field
    assert all(r.attempt == 1 for r in scheduler.refusals)
    assert scheduler.updates_of("t-runs")[0].progress.state == RUNNING
    pipeline.gate.set()
    assert scheduler.wait_until(lambda: scheduler.ended("t-runs") is not None)
    assert pipeline.calls == ["t-runs"]


def test_prefetched_assignments_wait_and_a_lock_cancel_recalls_them_before_they_start(
    make_agent, session_scheduler
) -> None:  # type: ignore[no-untyped-def]
    scheduler, port = session_scheduler
    pipeline = FakePipeline()
    pipeline.gate.clear()
    env = make_agent(
        pipeline=pipeline, scheduler_port=port, slots=1, max_waiting=2, trust_zone="cloud", pool="aws-a", name="cloud"
    )
    assert scheduler.wait_until(lambda: scheduler.sessions_opened == 1 and len(scheduler.heartbeats) >= 1)
    held = ["t-1", "t-2", "t-3"]
    scheduler.assign(*(env.request(task_id, project="film-x") for task_id in held), env.request("t-4"))
    assert scheduler.wait_until(lambda: len(scheduler.refusals) == 1 and len(scheduler.updates) >= 3)
    assert pipeline.started.wait(5) and pipeline.calls == ["t-1"]
    refused = scheduler.refusals[0]
    assert (refused.task_id, refused.error.reason, refused.retry) == ("t-4", types_pb2.NO_CAPACITY, True)
    for task_id in ("t-2", "t-3"):
        first = scheduler.updates_of(task_id)[0].progress
        assert (first.state, first.stage) == (RUNNING, WAITING_STAGE)
    # the inventory lists the waiting ones as accepted, not finished; no slot is free
    assert scheduler.wait_until(lambda: {r.task_id for r in scheduler.heartbeats[-1].runs} == set(held))
    beat = scheduler.heartbeats[-1]
    assert not any(r.finished for r in beat.runs) and beat.free_slots == 0
    assert sorted(beat.running_task_ids) == held
    # Film-X is locked: lock enforcement cancels the project's in-flight cloud tasks
    scheduler.cancel_task_ids = list(held)
    assert scheduler.wait_until(lambda: all(scheduler.ended(t) is not None for t in held))
    pipeline.gate.set()
    time.sleep(0.3)
    assert pipeline.calls == ["t-1"]  # the waiting ones never reached the pipeline
    recorded = journal_outcomes(env.work_dir)
    assert set(recorded) == set(held)
    for task_id in ("t-2", "t-3"):
        outcome = recorded[task_id]
        assert outcome is not None and outcome.state == CANCELLED and outcome.stage == WAITING_STAGE
        assert "before it started" in outcome.message and outcome.frames_done == 0
        assert scheduler.ended(task_id) == outcome
    assert recorded["t-1"] is not None and recorded["t-1"].state == CANCELLED
    assert env.handle.runtime.free_slots == 1


def test_a_waiting_assignment_starts_when_a_slot_frees(make_agent, session_scheduler) -> None:  # type: ignore[no-untyped-def]
    scheduler, port = session_scheduler
    pipeline = GatedPipeline("t-first")
    env = make_agent(pipeline=pipeline, scheduler_port=port, slots=1, max_waiting=1)
    assert scheduler.wait_until(lambda: scheduler.sessions_opened == 1 and len(scheduler.heartbeats) >= 1)
    scheduler.assign(env.request("t-first"), env.request("t-next"))
    assert scheduler.wait_until(lambda: len(scheduler.updates_of("t-next")) >= 1)
    assert env.handle.runtime.waiting_task_ids() == ["t-next"]
    pipeline.release("t-first")
    assert scheduler.wait_until(lambda: scheduler.ended("t-next") is not None)
    assert pipeline.calls == ["t-first", "t-next"]
    stages = [(u.progress.state, u.progress.stage) for u in scheduler.updates_of("t-next")]
    assert stages[0] == (RUNNING, WAITING_STAGE) and (RUNNING, "accepted") in stages and stages[-1][0] == SUCCEEDED
    assert scheduler.ended("t-first") is not None and scheduler.ended("t-first").state == SUCCEEDED  # type: ignore[union-attr]


def test_a_broken_session_reconnects_with_the_inventory_and_runs_go_on(make_agent) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    first = SessionScheduler()
    server = serve_scheduler(first, f"127.0.0.1:{port}")
    pipeline = GatedPipeline("t-away", "t-long")
    env = make_agent(pipeline=pipeline, scheduler_port=port, slots=2)
    assert first.wait_until(lambda: first.sessions_opened == 1 and len(first.heartbeats) >= 1)
    first.assign(env.request("t-away"), env.request("t-long"))
    assert first.wait_until(lambda: len(first.updates) >= 2)
    server.stop(0)  # the scheduler goes away; the runs go on
    pipeline.release("t-away")
    deadline = time.monotonic() + 10
    while "t-away" in env.handle.runtime.running_task_ids() and time.monotonic() < deadline:
        time.sleep(0.02)
    session = env.handle.session
    assert session is not None
    while session.failures < 1 and time.monotonic() < deadline:  # it noticed, and retries
        time.sleep(0.02)
    assert session.failures >= 1 and session.sessions == 1
    second = SessionScheduler()
    restarted_at = time.monotonic()
    server = serve_scheduler(second, f"127.0.0.1:{port}")
    try:
        assert second.wait_until(lambda: len(second.heartbeats) >= 1)
        # back within about two heartbeat intervals (0.2 s) of the restart, plus a loaded machine's slack
        assert time.monotonic() - restarted_at < 2.0
        opening = {r.task_id: r for r in second.messages[0].heartbeat.runs}
        assert opening["t-away"].finished and opening["t-away"].outcome.state == SUCCEEDED
        assert not opening["t-long"].finished
        # a run assigned on the broken session reports its ending on the new one
        pipeline.release("t-long")
        assert second.wait_until(lambda: second.ended("t-long") is not None)
        assert second.ended("t-long").state == SUCCEEDED  # type: ignore[union-attr]
        assert not second.violations and first.ended("t-away") is None
    finally:
        server.stop(0)


def test_replicas_vote_on_drain_and_updates_go_to_the_replica_that_assigned(make_agent) -> None:  # type: ignore[no-untyped-def]
    leader, standby = SessionScheduler(leader_term=2), SessionScheduler(leader_term=0)
    servers = [serve_scheduler(leader), serve_scheduler(standby)]
    try:
        env = make_agent(scheduler_ports=tuple(server.port for server in servers), slots=2)
        assert all(s.wait_until(lambda s=s: len(s.heartbeats) >= 1) for s in (leader, standby))
        leader.assign(env.request("t-led", leader_term=2))
        assert leader.wait_until(lambda: leader.ended("t-led") is not None)
        assert not standby.updates_of("t-led")
        standby.drain = True
        assert standby.wait_until(lambda: standby.heartbeats[-1].free_slots == 0)
        assert env.handle.runtime.draining  # the leader says nothing about draining: one vote suffices
        standby.drain = False
        assert leader.wait_until(lambda: leader.heartbeats[-1].free_slots == 2)
    finally:
        for server in servers:
            server.stop(0)


def test_a_scheduler_without_sessions_gets_unary_heartbeats_and_runtask(make_agent, fake_scheduler) -> None:  # type: ignore[no-untyped-def]
    scheduler, port = fake_scheduler  # serves Heartbeat only: AgentSession is UNIMPLEMENTED
    env = make_agent(scheduler_port=port)
    assert scheduler.wait_for(lambda beats: len(beats) >= 2)
    assert env.handle.session is not None and env.handle.session.mode == UNARY
    assert env.handle.session.sessions == 0
    assert env.run(env.task("t-old"))[-1].state == SUCCEEDED


# --- the outbox's batching -------------------------------------------------------------------


def _progress(task_id: str, frames: int, state: int = RUNNING) -> types_pb2.Progress:
    return types_pb2.Progress(task_id=task_id, frames_done=frames, state=state)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["progress", "end", "take"])), max_size=60))
def test_batches_coalesce_progress_but_keep_order_and_every_ending(steps: list[tuple[str, str]]) -> None:
    outbox = Outbox(max_batch=4, linger_s=0)
    posted: dict[str, list[types_pb2.Progress]] = {"a": [], "b": [], "c": []}
    delivered: dict[str, list[types_pb2.Progress]] = {"a": [], "b": [], "c": []}

    def take() -> None:
        message = outbox.take(time.monotonic())
        assert message is not None
        for update in message.updates:
            delivered[update.task_id].append(update.progress)

    for task_id, step in steps:
        if step == "take":
            take()
        elif not any(p.state in RUN_ENDED_STATES for p in posted[task_id]):
            state = SUCCEEDED if step == "end" else RUNNING
            progress = _progress(task_id, len(posted[task_id]), state)
            posted[task_id].append(progress)
            outbox.update(task_id, 1, progress)
    take()
    for task_id, sent in posted.items():
        got = delivered[task_id]
        frames = [p.frames_done for p in got]
        assert frames == sorted(set(frames))  # in order, nothing twice
        assert (got[-1] if got else None) == (sent[-1] if sent else None)  # the newest is never lost
        assert [p for p in got if p.state == SUCCEEDED] == [p for p in sent if p.state == SUCCEEDED]


def test_a_batch_goes_out_after_the_linger_or_once_full() -> None:
    outbox = Outbox(max_batch=3, linger_s=0.005)
    outbox.update("a", 1, _progress("a", 1))
    started = time.monotonic()
    message = outbox.take(started + 30)
    assert message is not None and len(message.updates) == 1 and time.monotonic() - started < 1.0
    for task_id in "xyz":
        outbox.update(task_id, 1, _progress(task_id, 1))
    message = outbox.take(time.monotonic() + 30)
    assert message is not None and len(message.updates) == 3
    threading.Timer(0.05, outbox.close).start()
    assert outbox.take(time.monotonic() + 30) is None


def test_an_ending_or_a_refusal_goes_out_at_once_and_progress_waits_for_company() -> None:
    outbox = Outbox(max_batch=100, linger_s=5.0)
    outbox.update("a", 1, _progress("a", 1))
    started = time.monotonic()
    threading.Timer(0.05, outbox.update, ("b", 1, _progress("b", 2, SUCCEEDED))).start()
    message = outbox.take(started + 30)
    assert message is not None and [update.task_id for update in message.updates] == ["a", "b"]
    assert 0.04 <= time.monotonic() - started < 2.0  # sent when the ending came, not after the linger
    outbox.refuse(scheduler_pb2.RunRefusal(task_id="c", attempt=1))
    started = time.monotonic()
    message = outbox.take(started + 30)
    assert message is not None and len(message.refusals) == 1 and time.monotonic() - started < 2.0
    outbox.update("d", 1, _progress("d", 1))
    started = time.monotonic()
    message = outbox.take(started + 0.2)  # progress alone lingers: here until the deadline
    assert message is not None and len(message.updates) == 1 and time.monotonic() - started >= 0.19


def test_with_the_real_scheduler_outcomes_finished_while_it_was_down_are_recorded_once(make_agent, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The session against the real SchedulerApp: work arrives over the session, the scheduler stops
    while a run goes on, the run finishes meanwhile, and the restarted scheduler (same port, same
    store) records that outcome from the new session's inventory; the agent ran it once."""
    from facefleet.scheduler.app import SchedulerApp
    from facefleet.v1 import scheduler_pb2_grpc
    from tests.scheduler.conftest import FAST_DISPATCH, make_settings
    from tests.scheduler.fake_agents import wait_for

    port = free_port()
    config = make_settings(tmp_path / "scheduler", listen=f"127.0.0.1:{port}", metrics_port=-1)
    app = SchedulerApp(config, dispatcher_settings=FAST_DISPATCH).start()
    pipeline = FakePipeline()
    env = make_agent(pipeline=pipeline, scheduler_port=port, slots=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = scheduler_pb2_grpc.SchedulerStub(channel)

    def submit(name: str) -> str:
        task = env.task(name, sensitivity=types_pb2.SENSITIVITY_PRIVATE)
        task.ClearField("id")
        return str(stub.SubmitTask(scheduler_pb2.SubmitTaskRequest(task=task), timeout=10).task_id)

    try:
        first = submit("first")
        wait_for(lambda: app.store.get(first).state == "succeeded", 15, what="a task over the session")
        session = env.handle.session
        assert session is not None and session.mode == SESSION and session.sessions == 1
        pipeline.gate.clear()
        held = submit("held")
        wait_for(lambda: held in env.handle.runtime.running_task_ids(), 15, what="the held task to start")
        app.stop()
        pipeline.gate.set()  # it finishes while no scheduler listens
        wait_for(lambda: not env.handle.runtime.running_task_ids(), 15, what="the run to finish")
        app = SchedulerApp(config, dispatcher_settings=FAST_DISPATCH).start()
        wait_for(lambda: app.store.get(held).state == "succeeded", 20, what="the outcome from the inventory")
        assert session.sessions == 2
        assert pipeline.calls.count(held) == 1 and pipeline.calls.count(first) == 1
        recorded = journal_outcomes(env.work_dir)
        assert recorded[held] is not None and recorded[held].state == SUCCEEDED
        assert app.store.get(held).agent_id == env.handle.runtime.identity.agent_id
    finally:
        channel.close()
        app.stop()
