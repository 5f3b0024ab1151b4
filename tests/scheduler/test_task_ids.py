"""Task ids are UUIDv7: unique, minted in time order, so a commit of many tasks stays local in every
index keyed by task id. Checked on the database file (its write-ahead log), not on the code."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from facefleet.domain import DISPATCHED, PLACED
from facefleet.scheduler import store as store_module
from facefleet.scheduler.store import Change, NewTask, Step, TaskStore, new_task_id
from tests.scheduler.test_store import make_task

HISTORY = 20_000  # tasks already in the store: its id indexes span hundreds of pages
BATCH = 200
# WAL frames (pages) one commit of BATCH tasks may add: about 0.33 per task with UUIDv7 ids, about
# 1.7 per task (intake) and 1.1 (launch) with random ids, which touch a page per task per index.
MOST_FRAMES = BATCH // 2


def test_ids_are_unique_uuid7s() -> None:
    ids = [new_task_id() for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    for task_id in ids[:2_000]:
        parsed = uuid.UUID(hex=task_id)
        assert (parsed.version, parsed.variant, parsed.hex) == (7, uuid.RFC_4122, task_id)


def test_ids_minted_later_sort_later_and_carry_the_submit_time() -> None:
    before = time.time_ns() // 1_000_000
    first = new_task_id()
    time.sleep(0.002)
    second = new_task_id()
    after = time.time_ns() // 1_000_000
    assert first < second
    assert before <= int(first[:12], 16) <= int(second[:12], 16) <= after


def _wal_frames_of(path: Path, write: object) -> int:
    """Pages that `write()` adds to the database's write-ahead log, from an empty log."""
    with sqlite3.connect(path) as outside:
        assert outside.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # not busy
        page = outside.execute("PRAGMA page_size").fetchone()[0]
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size == 0
    write()  # type: ignore[operator]
    return (wal.stat().st_size - 32) // (page + 24)  # the log's header, then a header per frame


@pytest.mark.parametrize("ids", ["uuid7", "random"])
def test_a_commit_of_many_tasks_writes_a_few_index_pages_whatever_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ids: str
) -> None:
    """The promise holds with our ids and fails with random ones (the control): the same intake
    and launch commits into a store holding HISTORY tasks."""
    if ids == "random":
        monkeypatch.setattr(store_module, "new_task_id", lambda: uuid.uuid4().hex)
    path = tmp_path / "tasks.db"
    store = TaskStore(f"sqlite:///{path}")
    try:
        for _ in range(HISTORY // 500):
            store.insert_batch([NewTask(make_task(), "", store_module.new_task_id()) for _ in range(500)], time.time())
        batch = [NewTask(make_task(), "", store_module.new_task_id()) for _ in range(BATCH)]
        intake = _wal_frames_of(path, lambda: store.insert_batch(batch, time.time()))
        launches = [
            Change(new.task_id, (Step(PLACED, "placed"), Step(DISPATCHED, "sent", agent_id="agent-1"))) for new in batch
        ]
        launch = _wal_frames_of(path, lambda: store.apply_changes(launches, time.time()))
    finally:
        store.close()
    local = intake <= MOST_FRAMES and launch <= MOST_FRAMES
    assert local == (ids == "uuid7"), f"{ids} ids: intake {intake} frames, launch {launch} for {BATCH} tasks"
