"""SubmitTasks: many tasks in one call, each item answered as SubmitTask would answer it alone."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facefleet.rpc_errors import FIELD_KEY, reason_of
from facefleet.scheduler.group_commit import GroupCommitter
from facefleet.scheduler.service import MAX_SUBMIT_ITEMS, SchedulerServicer
from facefleet.scheduler.store import TaskStore
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.scheduler.test_scheduler_service import task


def item(key: str = "", **fields: Any) -> scheduler_pb2.SubmitTaskRequest:
    submitted = task()
    for name, value in fields.items():
        setattr(submitted, name, value)
    return scheduler_pb2.SubmitTaskRequest(task=submitted, idempotency_key=key)


def stored_projects(store_url: str, results: Iterable[scheduler_pb2.SubmitTaskResult]) -> set[str]:
    """The projects of the accepted tasks among `results`, read by a store of its own."""
    reader = TaskStore(store_url)
    try:
        return {reader.get(result.submitted.task_id).project for result in results if result.HasField("submitted")}
    finally:
        reader.close()


def mixed_batch() -> list[scheduler_pb2.SubmitTaskRequest]:
    return [
        item(project="batch-a"),
        item(target_uri="file:///data/../../etc/shadow"),  # refused: path traversal
        item(key="order-1", project="batch-b"),
        item(key="order-1", project="batch-b"),  # the same key again in the same call: the same task
        item(key="order-0", project="batch-c"),  # a key stored by an earlier call: that task
        scheduler_pb2.SubmitTaskRequest(),  # refused: no task
    ]


def test_each_item_is_answered_in_order_and_only_the_bad_ones_are_refused(
    start_scheduler, client, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    stub = client(app.port)
    earlier = stub.SubmitTask(item(key="order-0", project="batch-c"))

    reply = stub.SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=mixed_batch()), timeout=10)

    outcomes = [result.WhichOneof("outcome") for result in reply.results]
    assert outcomes == ["submitted", "error", "submitted", "submitted", "submitted", "error"]
    results = reply.results
    assert results[0].submitted.created and results[2].submitted.created
    assert (results[3].submitted.task_id, results[3].submitted.created) == (results[2].submitted.task_id, False)
    assert (results[4].submitted.task_id, results[4].submitted.created) == (earlier.task_id, False)
    assert results[1].error.reason == types_pb2.INVALID_TASK
    assert (
        results[1].error.field == "items[1].task.target_uri" and "items[1].task.target_uri" in results[1].error.message
    )
    assert results[5].error.field == "items[5].task"
    # Durable when answered: a reader of its own, on the store's file, sees every accepted task.
    stored = stored_projects(app.settings.scheduler.store_url, results)
    assert stored == {"batch-a", "batch-b", "batch-c"}
    assert len(stub.ListTasks(scheduler_pb2.ListTasksRequest(limit=100)).tasks) == 3


def test_a_call_over_the_item_limit_is_refused_whole_and_nothing_is_stored(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    stub = client(app.port)
    items = [item(project="too-many")] * (MAX_SUBMIT_ITEMS + 1)
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=items), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "INVALID_TASK" and f"limit is {MAX_SUBMIT_ITEMS}" in str(caught.value.details())
    assert (FIELD_KEY, "items") in tuple(caught.value.trailing_metadata() or ())
    assert not stub.ListTasks(scheduler_pb2.ListTasksRequest(project="too-many")).tasks
    empty = stub.SubmitTasks(scheduler_pb2.SubmitTasksRequest(), timeout=10)
    assert list(empty.results) == []


def test_the_thread_pool_path_answers_the_same(tmp_path: Path) -> None:
    """A servicer on a plain (thread pool) gRPC server gives each item the same answer."""
    store = TaskStore(f"sqlite:///{tmp_path}/tasks.db")
    committer = GroupCommitter(store)
    try:
        servicer = SchedulerServicer(store, committer, placer=None, heartbeats=None)
        servicer.SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=[item(key="order-0", project="batch-c")]), None)  # type: ignore[arg-type]
        reply = servicer.SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=mixed_batch()), None)  # type: ignore[arg-type]
        outcomes = [result.WhichOneof("outcome") for result in reply.results]
        assert outcomes == ["submitted", "error", "submitted", "submitted", "submitted", "error"]
        assert reply.results[3].submitted.task_id == reply.results[2].submitted.task_id
        assert store.count_by_state() == {"queued": 3}
    finally:
        committer.close()
        store.close()


ITEM_FIELDS = {
    "project": st.sampled_from(["batch", "", "../up", "x" * 80, "Upper Case", "ok.name_1"]),
    "source_uri": st.sampled_from(["file:///data/face.jpg", "http://x/a.jpg", "", "file:///data/../etc/passwd"]),
    "frames": st.sampled_from([1, 0, 48, 10**9]),
    "sensitivity": st.sampled_from([1, 2, 3, 77]),
    "sla_seconds": st.sampled_from([0, 60, 2**32 - 1]),
    "output_uri": st.sampled_from(["", "file:///data/out.jpg", "ftp://x/y", "file:///data/\x00.jpg"]),
}


@st.composite
def requests_(draw: st.DrawFn) -> scheduler_pb2.SubmitTaskRequest:
    submitted = task()
    for name, values in ITEM_FIELDS.items():
        if draw(st.booleans()):
            setattr(submitted, name, draw(values))
    return scheduler_pb2.SubmitTaskRequest(
        task=submitted, idempotency_key=draw(st.sampled_from(["", "k1", "k2", "k" * 200]))
    )


def answer_alone(stub, request: scheduler_pb2.SubmitTaskRequest) -> tuple[Any, ...]:  # type: ignore[no-untyped-def]
    try:
        reply = stub.SubmitTask(request, timeout=10)
    except grpc.RpcError as error:
        fields = dict(error.trailing_metadata() or ())
        return ("error", reason_of(error), fields.get(FIELD_KEY, ""), str(error.details()))
    return ("submitted", reply.created)


def answer_in_batch(result: scheduler_pb2.SubmitTaskResult, index: int) -> tuple[Any, ...]:
    if result.HasField("submitted"):
        return ("submitted", result.submitted.created)
    prefix = f"items[{index}]."
    assert result.error.field.startswith(prefix) and result.error.message.startswith(prefix)
    reason = types_pb2.ErrorReason.Name(result.error.reason)
    return ("error", reason, result.error.field.removeprefix(prefix), result.error.message.removeprefix(prefix))


def test_each_item_gets_the_answer_submit_task_gives_it_alone(start_scheduler, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Property: for any mix of good and bad requests, SubmitTasks answers item i exactly as a
    SubmitTask of item i would (same refusal reason, field and message; same created flag, with
    idempotency keys scoped per example)."""
    alone_app, batch_app = start_scheduler(), start_scheduler(f"sqlite:///{tmp_path}/batch.db")
    alone, batch = client(alone_app.port), client(batch_app.port)
    examples = iter(range(10**6))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(requests_(), max_size=8))
    def check(items: list[scheduler_pb2.SubmitTaskRequest]) -> None:
        scope = next(examples)
        for request in items:
            if request.idempotency_key in ("k1", "k2"):
                request.idempotency_key = f"{request.idempotency_key}-{scope}"
        expected = [answer_alone(alone, request) for request in items]
        reply = batch.SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=items), timeout=10)
        assert [answer_in_batch(result, i) for i, result in enumerate(reply.results)] == expected

    check()
