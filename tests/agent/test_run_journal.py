"""The agent's run journal: durable runs and outcomes, fencing by leader term, restart behaviour.

The restart tests stop a real agent (gRPC server, heartbeats) and start a new one on the same work
directory, as an operator's restart would: what it ran before is answered from its journal.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from facefleet.agent.run_journal import RESTART_MESSAGE, RunJournal
from facefleet.rpc_errors import reason_of
from facefleet.v1 import agent_pb2, types_pb2
from tests.agent.conftest import FakePipeline

SUCCEEDED = types_pb2.TASK_STATE_SUCCEEDED


def outcome(task_id: str, state: int = SUCCEEDED) -> types_pb2.Progress:
    return types_pb2.Progress(task_id=task_id, state=state, output_uri=f"file:///out/{task_id}.png")  # type: ignore[arg-type]


def test_outcomes_survive_a_reopen_until_acknowledged(tmp_path: Path) -> None:
    journal = RunJournal.in_dir(tmp_path)
    assert journal.accept("t1", 1, 5) == ""
    assert journal.accept("t2", 1, 5) == ""
    journal.finish("t1", 1, outcome("t1"))
    journal.close()

    reopened = RunJournal.in_dir(tmp_path)
    assert reopened.leader_term == 5
    runs = {run.task_id: run for run in reopened.inventory()}
    assert runs["t1"].succeeded and runs["t1"].outcome is not None
    assert runs["t1"].outcome.output_uri == "file:///out/t1.png"
    # t2 was running when the agent stopped: closed as PREEMPTED, to resume from its checkpoint.
    assert reopened.interrupted == ["t2"]
    assert runs["t2"].outcome is not None and runs["t2"].outcome.state == types_pb2.TASK_STATE_PREEMPTED
    assert runs["t2"].outcome.message == RESTART_MESSAGE

    reopened.acknowledge([("t1", 1)])
    assert [run.task_id for run in reopened.inventory()] == ["t2"]
    succeeded = reopened.succeeded("t1")
    assert succeeded is not None and succeeded.attempt == 1  # acknowledged, still never rerun


def test_a_stale_leader_term_is_refused_and_the_fence_is_durable(tmp_path: Path) -> None:
    journal = RunJournal.in_dir(tmp_path)
    assert journal.note_term(7)
    assert not journal.note_term(6)
    assert "older than term 7" in journal.accept("t1", 1, 6)
    assert journal.inventory() == []
    journal.close()
    reopened = RunJournal.in_dir(tmp_path)
    assert "older than term 7" in reopened.accept("t1", 1, 3)
    assert reopened.accept("t1", 1, 7) == ""


def test_a_restarted_agent_replays_a_finished_run_instead_of_running_it_again(make_agent) -> None:  # type: ignore[no-untyped-def]
    first = make_agent(pipeline=FakePipeline(frames=2), name="a1")
    task = first.task("t-once")
    assert first.run(task, attempt=1, leader_term=3)[-1].state == SUCCEEDED
    first.handle.stop()

    second = make_agent(pipeline=FakePipeline(frames=2), name="a1")  # same work dir: same journal
    replay = second.run(task, attempt=1, leader_term=4)
    assert [p.state for p in replay] == [SUCCEEDED]
    assert replay[-1].output_uri == task.output_uri and replay[-1].quality.faces_swapped == 1
    # A later attempt of a task that succeeded here is answered with that success too.
    assert second.run(task, attempt=2, leader_term=4)[-1].state == SUCCEEDED
    assert second.pipeline.calls == []
    inventory = {run.task_id: run for run in second.handle.runtime.heartbeat_request().runs}
    assert inventory["t-once"].finished and inventory["t-once"].outcome.state == SUCCEEDED
    assert second.handle.runtime.heartbeat_request().known_leader_term == 4


def test_the_agent_refuses_a_dispatch_from_an_older_leader_term(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(pipeline=FakePipeline(frames=1))
    env.handle.runtime.apply_leader(9, [])
    with pytest.raises(grpc.RpcError) as caught:
        env.run(env.task("t-stale"), attempt=1, leader_term=8)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert reason_of(caught.value) == "STALE_LEADER_TERM"
    assert env.pipeline.calls == []
    assert env.run(env.task("t-fresh"), attempt=1, leader_term=9)[-1].state == SUCCEEDED


def test_acknowledged_outcomes_leave_the_heartbeat_inventory(make_agent) -> None:  # type: ignore[no-untyped-def]
    env = make_agent(pipeline=FakePipeline(frames=1))
    env.run(env.task("t-ack"), attempt=1, leader_term=2)
    runtime = env.handle.runtime
    assert [run.task_id for run in runtime.heartbeat_request().runs] == ["t-ack"]
    runtime.apply_leader(2, [types_pb2.RunRef(task_id="t-ack", attempt=2)])  # another attempt: kept
    assert [run.task_id for run in runtime.heartbeat_request().runs] == ["t-ack"]
    runtime.apply_leader(2, [types_pb2.RunRef(task_id="t-ack", attempt=1)])
    assert list(runtime.heartbeat_request().runs) == []
    # Still never run again after the acknowledgement.
    final = list(env.stub.RunTask(agent_pb2.RunTaskRequest(task=env.task("t-ack"), attempt=1, leader_term=2)))
    assert final[-1].state == SUCCEEDED and env.pipeline.calls == ["t-ack"]


def test_acknowledged_runs_past_the_retention_are_dropped_on_open(tmp_path: Path) -> None:
    journal = RunJournal.in_dir(tmp_path)
    for task_id in ("old-acked", "old-unacked"):
        journal.accept(task_id, 1, 1)
        journal.finish(task_id, 1, outcome(task_id))
    journal.acknowledge([("old-acked", 1)])
    journal.close()
    kept = RunJournal(tmp_path / "run-journal.db", retention_days=-1)  # everything counts as old
    assert {run.task_id for run in kept.all_runs()} == {"old-unacked"}  # unacknowledged: kept
