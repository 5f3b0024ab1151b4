"""SubmitTasks: many tasks in one call, each item answered as SubmitTask would answer it alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

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
    reader = TaskStore(app.settings.scheduler.store_url)
    try:
        stored = {reader.get(result.submitted.task_id).project for result in results if result.HasField("submitted")}
    finally:
        reader.close()
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
