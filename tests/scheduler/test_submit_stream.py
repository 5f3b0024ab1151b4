"""SubmitStream: one open stream of submits, each answered (by its seq) as SubmitTask answers it,
durable before its answer; a task submitted on it runs like any other."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from facefleet.scheduler.service import MAX_STREAM_IN_FLIGHT
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.scheduler.fake_agents import wait_for
from tests.scheduler.test_submit_tasks import answer_alone, item, mixed_batch, stored_projects


def streamed(requests: list[scheduler_pb2.SubmitTaskRequest]) -> list[scheduler_pb2.SubmitStreamRequest]:
    return [
        scheduler_pb2.SubmitStreamRequest(seq=100 + index, submit=request) for index, request in enumerate(requests)
    ]


def by_seq(replies: Iterator[scheduler_pb2.SubmitStreamResponse]) -> dict[int, scheduler_pb2.SubmitTaskResult]:
    answers: dict[int, scheduler_pb2.SubmitTaskResult] = {}
    for reply in replies:
        assert reply.seq not in answers, f"seq {reply.seq} answered twice"
        answers[reply.seq] = reply.result
    return answers


def test_each_request_is_answered_by_its_seq_and_only_the_bad_ones_are_refused(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    stub = client(app.port)
    earlier = stub.SubmitTask(item(key="order-0", project="batch-c"))

    answers = by_seq(stub.SubmitStream(iter(streamed(mixed_batch())), timeout=10))

    assert sorted(answers) == list(range(100, 106))
    outcomes = [answers[seq].WhichOneof("outcome") for seq in range(100, 106)]
    assert outcomes == ["submitted", "error", "submitted", "submitted", "submitted", "error"]
    first_key, again = answers[102].submitted, answers[103].submitted
    assert {first_key.created, again.created} == {True, False} and first_key.task_id == again.task_id
    assert (answers[104].submitted.task_id, answers[104].submitted.created) == (earlier.task_id, False)
    assert answers[101].error.reason == types_pb2.INVALID_TASK
    assert (
        answers[101].error.field == "submit.task.target_uri" and "submit.task.target_uri" in answers[101].error.message
    )
    assert answers[105].error.field == "submit.task"
    # Durable when answered: a reader of its own, on the store's file, sees every accepted task.
    stored = stored_projects(app.settings.scheduler.store_url, answers.values())
    assert stored == {"batch-a", "batch-b", "batch-c"}


def answer_in_stream(result: scheduler_pb2.SubmitTaskResult) -> tuple[Any, ...]:
    """A stream's answer in `answer_alone`'s terms (its field and message lose the `submit.` prefix)."""
    if result.HasField("submitted"):
        return ("submitted", result.submitted.created)
    assert result.error.field.startswith("submit.") and result.error.message.startswith("submit.")
    reason = types_pb2.ErrorReason.Name(result.error.reason)
    return ("error", reason, result.error.field.removeprefix("submit."), result.error.message.removeprefix("submit."))


def test_each_request_gets_the_answer_submit_task_gives_it(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    stub = client(app.port)
    requests = [
        item(target_uri="file:///data/../../etc/shadow"),
        item(project="../up"),
        item(project="x" * 80),
        item(source_uri="http://x/a.jpg"),
        item(output_uri="file:///data/\x00.jpg"),
        item(sensitivity=77),
        item(project="fine"),
        scheduler_pb2.SubmitTaskRequest(),
    ]
    answers = by_seq(stub.SubmitStream(iter(streamed(requests)), timeout=10))
    in_stream = [answer_in_stream(answers[100 + index]) for index in range(len(requests))]
    alone = [answer_alone(stub, request) for request in requests]
    assert in_stream == alone
    assert [answer[0] for answer in alone].count("error") == len(requests) - 1


def test_answers_come_as_requests_are_stored_while_the_stream_stays_open(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    """A client that waits for each answer before it sends the next (as a latency-bound client does)."""
    app = start_scheduler()
    stub = client(app.port)
    outbox: queue.SimpleQueue[scheduler_pb2.SubmitStreamRequest | None] = queue.SimpleQueue()

    def requests() -> Iterator[scheduler_pb2.SubmitStreamRequest]:
        while (request := outbox.get()) is not None:
            yield request

    replies = stub.SubmitStream(requests(), timeout=30)
    ids = []
    for seq in range(5):
        outbox.put(scheduler_pb2.SubmitStreamRequest(seq=seq, submit=item(project="one-by-one")))
        reply = next(replies)
        assert reply.seq == seq and reply.result.submitted.created
        ids.append(reply.result.submitted.task_id)
    outbox.put(None)
    assert list(replies) == []  # the server ends the stream once the client has and all is answered
    assert len(set(ids)) == 5
    assert {app.store.get(task_id).project for task_id in ids} == {"one-by-one"}


def test_tasks_submitted_on_a_stream_run(start_scheduler, start_agent, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    agent = start_agent(app.port, "onprem-1", "onprem-a", "private", slots=4)
    stub = client(app.port)
    wait_for(lambda: app.registry.get("onprem-1") is not None, 5, what="the agent's first heartbeat")
    private = item(project="streamed", sensitivity=types_pb2.SENSITIVITY_PRIVATE)  # the agent's pool is private
    answers = by_seq(stub.SubmitStream(iter(streamed([private] * 20)), timeout=10))
    ids = [result.submitted.task_id for result in answers.values()]
    assert len(set(ids)) == 20
    wait_for(lambda: all(agent.completed[task_id] == 1 for task_id in ids), 20, what="the streamed tasks to run")


def test_bytes_that_are_no_message_end_the_stream_after_the_answers_before_them(start_scheduler) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    good = streamed([item(project="before-corrupt")])[0].SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = channel.stream_stream(
            "/facefleet.v1.Scheduler/SubmitStream",
            request_serializer=lambda raw: raw,
            response_deserializer=scheduler_pb2.SubmitStreamResponse.FromString,
        )
        replies = call(iter([good, b"\xff" * 16, good]), timeout=10)
        first = next(replies)
        with pytest.raises(grpc.RpcError) as ended:
            next(replies)
    assert first.seq == 100 and first.result.submitted.created
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SubmitStream" in str(ended.value.details()) and "not a valid protobuf message" in str(ended.value.details())


def test_unknown_fields_refuse_only_their_request(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    stub = client(app.port)
    newer = scheduler_pb2.SubmitStreamRequest(seq=7, submit=item(project="newer-client")).SerializeToString()
    newer += b"\xa0\x06\x01"  # field 100 (varint 1): a field this contract does not know
    ok = scheduler_pb2.SubmitStreamRequest(seq=8, submit=item(project="older-client"))
    answers = by_seq(stub.SubmitStream(iter([scheduler_pb2.SubmitStreamRequest.FromString(newer), ok]), timeout=10))
    assert answers[7].error.field == "request" and "regenerate the client stubs" in answers[7].error.message
    assert answers[8].submitted.created


def test_a_stream_holds_at_most_its_limit_of_requests_waiting_for_their_commit(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    """Backpressure: with the store's writer held, the stream starts its limit of submits and then
    reads no more (the rest wait in gRPC's flow control), and all are answered once it goes on."""
    app = start_scheduler(launch_with_intake=False)
    stub = client(app.port)
    committer = app.committer
    started: list[Any] = []
    submit_async = committer.submit_async

    async def counted(item: Any, timeout: float = 30.0) -> Any:
        started.append(item)
        return await submit_async(item, timeout)

    committer.submit_async = counted  # type: ignore[method-assign]
    total = MAX_STREAM_IN_FLIGHT + 50
    requests = [scheduler_pb2.SubmitStreamRequest(seq=seq, submit=item(project="backpressure")) for seq in range(total)]
    answers: dict[int, Any] = {}
    committer._writing.acquire()  # the writer cannot commit: every submit waits for its commit
    try:
        replies: Any = stub.SubmitStream(iter(requests), timeout=60)
        reader = threading.Thread(target=lambda: answers.update(by_seq(replies)))
        reader.start()
        wait_for(lambda: len(started) >= MAX_STREAM_IN_FLIGHT, 20, what="the stream to fill up")
        time.sleep(0.5)
        assert len(started) == MAX_STREAM_IN_FLIGHT and not answers
    finally:
        committer._writing.release()
    reader.join(60)
    assert len(answers) == total and all(result.submitted.created for result in answers.values())


def test_a_fault_of_ours_answers_that_request_with_an_error_and_the_stream_goes_on(start_scheduler, client) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    stub = client(app.port)
    validated = app.servicer._validated

    def faulty(request: Any, wire_size: int | None) -> Any:
        if request.task.project == "faulty":
            raise RuntimeError("a bug")
        return validated(request, wire_size)

    app.servicer._validated = faulty  # type: ignore[method-assign]
    requests = streamed([item(project="faulty"), item(project="fine")])
    answers = by_seq(stub.SubmitStream(iter(requests), timeout=10))
    assert answers[100].error.reason == types_pb2.INTERNAL and "submit it again" in answers[100].error.message
    assert "a bug" not in answers[100].error.message
    assert answers[101].submitted.created
