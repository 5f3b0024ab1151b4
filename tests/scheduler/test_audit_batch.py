"""Batched audit appends: one fsync per batch, records in enqueue order, the hash chain intact."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from facefleet.cli import app as cli_app
from facefleet.scheduler.audit_batch import AuditBatchWriter
from facefleet.scheduler.audit_trail import AuditTrail
from facefleet.scheduler.store import TaskRecord, TaskStore
from facefleet.security.audit import AuditKind, AuditLog, Signer, residency_proof, verify
from tests.scheduler.fake_agents import wait_for


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def counted_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.fsync as before, each call's file descriptor noted in the list returned."""
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    return fsyncs


def test_append_many_chains_records_in_order_with_one_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signer = Signer(secret=b"0123456789abcdef-secret")
    log = AuditLog(tmp_path / "a.jsonl", signing_key=signer)
    log.append(AuditKind.ADMIN, "alice", act="first", args={}, outcome="ok")
    fsyncs = counted_fsyncs(monkeypatch)
    written = log.append_many([(AuditKind.PLACEMENT, "scheduler", {"task": f"t{i}"}) for i in range(5)])
    assert len(fsyncs) == 1
    assert [r["seq"] for r in written] == [2, 3, 4, 5, 6]
    assert [r["task"] for r in records(log.path)[1:]] == [f"t{i}" for i in range(5)]
    report = verify(log.path, signer)
    assert report.ok and report.records == 6, report.problem
    assert log.append_many([]) == []


def test_writer_keeps_each_threads_order_and_the_chain_under_concurrency(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    writer = AuditBatchWriter(log)

    def produce(worker: int) -> None:
        for i in range(50):
            if i % 10 == 9:
                writer.write(AuditKind.COMPLETION, "scheduler", {"task": f"w{worker}-{i}"})
            else:
                writer.enqueue(AuditKind.DISPATCH, "scheduler", {"task": f"w{worker}-{i}"})

    threads = [threading.Thread(target=produce, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.flush()
    written = records(log.path)
    assert len(written) == 200
    for worker in range(4):
        mine = [int(r["task"].split("-")[1]) for r in written if r["task"].startswith(f"w{worker}-")]
        assert mine == list(range(50))
    assert verify(log.path).ok
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.enqueue(AuditKind.ADMIN, "scheduler", {})


def test_lingering_records_wait_for_a_batch_to_share_and_a_due_record_takes_them_in_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    writer = AuditBatchWriter(log, linger_s=30.0)
    fsyncs = counted_fsyncs(monkeypatch)
    try:
        for i in range(3):
            writer.enqueue(AuditKind.COMPLETION, "scheduler", {"task": f"done-{i}"}, linger=True)
        time.sleep(0.3)
        assert not log.path.exists() or records(log.path) == []  # nothing due yet: nothing written
        writer.write(AuditKind.DISPATCH, "scheduler", {"task": "next"}, timeout=5)
        assert [r["task"] for r in records(log.path)] == ["done-0", "done-1", "done-2", "next"]
        assert len(fsyncs) == 1
        writer.enqueue(AuditKind.COMPLETION, "scheduler", {"task": "done-3"}, linger=True)
        writer.flush(timeout=5)  # a flush waits for lingering records too
        assert records(log.path)[-1]["task"] == "done-3" and len(fsyncs) == 2
        assert verify(log.path).ok
    finally:
        writer.close()


def test_a_lingering_record_is_written_by_itself_after_the_linger(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    writer = AuditBatchWriter(log, linger_s=0.2)
    try:
        began = time.monotonic()
        writer.enqueue(AuditKind.COMPLETION, "scheduler", {"task": "alone"}, linger=True)
        deadline = began + 5
        while time.monotonic() < deadline and not (log.path.exists() and records(log.path)):
            time.sleep(0.01)
        assert [r["task"] for r in records(log.path)] == ["alone"]
        assert time.monotonic() - began >= 0.15
    finally:
        writer.close()


def test_closing_writes_what_lingers(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    writer = AuditBatchWriter(log, linger_s=30.0)
    writer.enqueue(AuditKind.COMPLETION, "scheduler", {"task": "at-close"}, linger=True)
    began = time.monotonic()
    writer.close()
    assert time.monotonic() - began < 5
    assert [r["task"] for r in records(log.path)] == ["at-close"]


def test_a_failed_write_is_logged_and_never_blocks_its_callers(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.path.write_text('{"seq": 1, "hash": "x"\n')  # the tail cannot be chained to
    writer = AuditBatchWriter(log)
    writer.write(AuditKind.ADMIN, "scheduler", {"act": "x"}, timeout=5)  # returns: failure is logged
    assert writer.failed == 1
    with pytest.raises(ValueError):
        writer.enqueue("no-such-kind", "scheduler", {})
    writer.close()


class Decision:
    """The placement fields the trail reads."""

    pool_trust_zone, rule, pool = "private", "r1", "onprem-a"


def dispatched_record(task_id: str, state: str) -> TaskRecord:
    return TaskRecord(
        id=task_id, idempotency_key=None, project="p", sensitivity="private", priority=2, state=state,
        pool="onprem-a", rule="r1", agent_id="a1", attempts=1, checkpoint_frame=0, checkpoint_uri="",
        placement=None, placement_proto=None, task_proto=b"", submitted_at=0.0, updated_at=0.0,
        not_before=0.0, finished_at=None, last_reason="",
    )  # fmt: skip


def staged_in(store: TaskStore, records_: list[Any]) -> str:
    """Stage `records_` as a launch's commit does: in a transaction of the store."""
    return store.write(lambda conn: store.stage_records_in(conn, records_, time.time()))


def test_staged_launch_records_reach_the_log_and_leave_the_store(tmp_path: Path) -> None:
    """A launch's records are staged in its commit; after it the trail writes them (lingering, so
    with the next batch), tagged with the staged row, and deletes the row once they are durable.
    A completion goes after them."""
    log = AuditLog(tmp_path / "a.jsonl")
    store = TaskStore(f"sqlite:///{tmp_path}/s.db")
    trail = AuditTrail(log)
    trail.store = store
    record = dispatched_record("t1", "succeeded")
    launch = trail.launch_records(record, Decision())  # type: ignore[arg-type]
    row_id = staged_in(store, launch)
    assert store.staged_records() == [(row_id, [(str(k), a, f) for k, a, f in launch])]
    trail.staged(row_id, launch)
    trail.on_finished(record)  # queued too: the store already holds the completion durably
    trail.flush()
    written = records(log.path)
    assert [(r["kind"], r.get("staged")) for r in written] == [
        ("placement", row_id),
        ("dispatch", row_id),
        ("completion", None),
    ]
    assert written[1]["trust_zone"] == written[2]["trust_zone"] == "private"
    wait_for(lambda: store.staged_records() == [], 5, what="the written row deleted from the store")
    assert verify(log.path).ok
    trail.close()
    store.close()


def test_staged_records_a_crash_or_a_failed_write_left_are_written_at_the_next_leader_start(tmp_path: Path) -> None:
    """Rows nobody wrote (the scheduler died after its commit; the log could not be written) stay in
    the store until a leader starts: `write_leftovers` writes them in staging order, once."""
    store = TaskStore(f"sqlite:///{tmp_path}/s.db")
    log = AuditLog(tmp_path / "a.jsonl")
    failing = AuditTrail(log)
    failing.store = store
    # committed by a scheduler that died before it handed them to its writer
    first = staged_in(store, failing.launch_records(dispatched_record("t1", "dispatched"), Decision()))  # type: ignore[arg-type]
    real_append_many = log.append_many

    def refuse(_entries: Any) -> Any:
        raise OSError(28, "No space left on device")

    log.append_many = refuse  # type: ignore[method-assign]
    second_records = failing.launch_records(dispatched_record("t2", "dispatched"), Decision())  # type: ignore[arg-type]
    second = staged_in(store, second_records)
    failing.staged(second, second_records)
    failing.flush()
    assert failing.writer.failed == 2 and [row for row, _ in store.staged_records()] == [first, second]
    log.append_many = real_append_many  # type: ignore[method-assign]
    assert failing.write_leftovers(staged_before=time.time() - 60) == 0  # a periodic look: not old enough
    assert failing.write_leftovers() == 2  # the failed row is no longer anyone's: written now
    assert failing.write_leftovers() == 0  # queued already: not twice
    failing.flush()
    written = records(log.path)
    assert [(r["kind"], r["task"], r["staged"]) for r in written] == [
        ("placement", "t1", first),
        ("dispatch", "t1", first),
        ("placement", "t2", second),
        ("dispatch", "t2", second),
    ]
    wait_for(lambda: store.staged_records() == [], 5, what="the written rows deleted from the store")
    assert verify(log.path).ok
    failing.close()
    store.close()


def test_a_row_written_while_leftovers_are_read_is_not_written_again(tmp_path: Path) -> None:
    """A leader's look for leftovers reads a row that the writer is writing at that moment; the
    writer then deletes it and forgets it before the look filters what it read. The look must not
    queue it again (it would be written twice)."""
    log = AuditLog(tmp_path / "a.jsonl")
    store = TaskStore(f"sqlite:///{tmp_path}/s.db")
    trail = AuditTrail(log)
    launch = trail.launch_records(dispatched_record("t1", "dispatched"), Decision())  # type: ignore[arg-type]
    row_id = staged_in(store, launch)
    with trail._lock:
        trail._queued_rows.add(row_id)  # queued and being written: `staged` was called for it

    class WrittenDuringTheRead(TaskStore):
        def staged_records(self, staged_before: float | None = None) -> Any:
            rows = super().staged_records(staged_before)
            trail._staged_done([row_id], True)  # the writer finishes right after the read
            return rows

    racing = WrittenDuringTheRead(f"sqlite:///{tmp_path}/s.db")
    trail.store = racing
    assert trail.write_leftovers() == 0
    assert store.staged_records() == []
    trail.close()
    racing.close()
    store.close()


def test_a_withdrawn_dispatch_in_an_older_log_is_listed_by_the_proof(tmp_path: Path) -> None:
    """Schedulers before staged records wrote `dispatch_withdrawn` for a launch whose records were
    written but whose commit failed. Such logs still verify, and the residency proof lists it."""
    log = AuditLog(tmp_path / "audit.jsonl")
    fields = {"task": "t9", "project": "p", "pool": "onprem-a", "trust_zone": "private", "agent": "a1"}
    log.append_many(
        [
            (AuditKind.PLACEMENT, "scheduler", {**fields, "rule": "r1", "outcome": "dispatch"}),
            (AuditKind.DISPATCH, "scheduler", fields),
            (AuditKind.DISPATCH_WITHDRAWN, "scheduler", fields),
        ]
    )
    assert verify(log.path).ok
    proof = residency_proof(log.path, "p")
    assert proof.passed and proof.tasks[0].withdrawn == ["onprem-a"]
    shown = CliRunner().invoke(cli_app, ["audit", "proof", "--project", "p", "--path", str(log.path)])
    assert shown.exit_code == 0 and "t9: dispatch to onprem-a withdrawn before it was sent" in shown.output

    # The scheduler chose a cloud pool for it: withdrawn or not, the proof fails on that choice.
    cloud = {**fields, "task": "t10", "pool": "cloud-b", "trust_zone": "cloud"}
    log.append_many([(AuditKind.DISPATCH, "scheduler", cloud), (AuditKind.DISPATCH_WITHDRAWN, "scheduler", cloud)])
    proof = residency_proof(log.path, "p")
    assert not proof.passed and [t.task for t in proof.tasks if not t.private_only] == ["t10"]
