"""TaskStore against SQLite and a real PostgreSQL: state machine, completion once, idempotency, group commit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from facefleet.domain import TASK_STATES as ALL_STATES
from facefleet.scheduler import metrics
from facefleet.scheduler.group_commit import GroupCommitter
from facefleet.scheduler.store import (
    Change,
    IllegalTransition,
    NewTask,
    Placement,
    Step,
    TaskRecord,
    TaskStore,
    UnknownTask,
    tasks,
    transitions,
)
from facefleet.scheduler.task_states import ALLOWED_FROM, is_legal
from facefleet.v1 import types_pb2


def make_task(project: str = "demo", priority: int = types_pb2.PRIORITY_NORMAL) -> types_pb2.Task:
    return types_pb2.Task(
        project=project,
        sensitivity=types_pb2.SENSITIVITY_PUBLIC,
        priority=priority,  # type: ignore[arg-type]
        frames=1,
        source_uri="file:///data/a.jpg",
        target_uri="file:///data/b.jpg",
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path) -> TaskStore:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/tasks.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    task_store = TaskStore(url)
    yield task_store
    task_store.close()


def submit(store: TaskStore, key: str = "", **kwargs: object) -> str:
    return store.insert_batch([NewTask(make_task(**kwargs), key)], time.time())[0].task_id  # type: ignore[arg-type]


def test_sqlite_runs_wal_with_full_sync(tmp_path) -> None:  # type: ignore[no-untyped-def]
    task_store = TaskStore(f"sqlite:///{tmp_path}/t.db")
    with task_store._writer.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    task_store.close()


def test_lifecycle_records_every_transition(store: TaskStore) -> None:
    task_id = submit(store)
    now = time.time()
    assert store.transition_chain(
        task_id,
        [Step("placed", "placed", pool="onprem-a"), Step("dispatched", "sent", agent_id="a1", count_attempt=True)],
        now,
    )
    assert store.transition(task_id, "running", "started", now, expect_from="dispatched", expect_agent="a1")
    assert store.transition(task_id, "succeeded", "done", now, expect_agent="a1")
    record = store.get(task_id)
    assert (record.state, record.pool, record.agent_id, record.attempts) == ("succeeded", "onprem-a", "a1", 1)
    assert record.finished_at is not None
    assert [(t.from_state, t.to_state) for t in store.transitions_of(task_id)] == [
        ("", "queued"),
        ("queued", "placed"),
        ("placed", "dispatched"),
        ("dispatched", "running"),
        ("running", "succeeded"),
    ]


def test_placement_is_kept_for_explain(store: TaskStore) -> None:
    task_id = submit(store)
    decision = types_pb2.PlacementDecision(pool="onprem-a", rule="r1", reason="fits")
    placement = Placement("onprem-a", "r1", {"outcome": "dispatch", "reason": "fits"}, decision.SerializeToString())
    assert store.transition(task_id, "placed", "placed", time.time(), placement=placement)
    record = store.get(task_id)
    assert record.placement == {"outcome": "dispatch", "reason": "fits"}
    assert record.placement_decision() == decision
    assert (record.pool, record.rule) == ("onprem-a", "r1")


def test_reads_by_id_match_the_rows_as_sqlalchemy_reads_them(store: TaskStore) -> None:
    # get/get_many read through the driver (the dispatch path's fast read): same records as a
    # plain Core read, placement JSON and bytes included, on both databases; many ids in chunks.
    placed, plain = submit(store), submit(store, key="k")
    decision = types_pb2.PlacementDecision(pool="onprem-a", rule="r1", reason="fits")
    placement = Placement("onprem-a", "r1", {"outcome": "dispatch", "n": [1, 2]}, decision.SerializeToString())
    assert store.transition(placed, "placed", "placed", time.time(), placement=placement)
    many = store.insert_batch([NewTask(make_task(), "") for _ in range(600)], time.time())
    ids = [placed, plain, *(result.task_id for result in many)]
    with store.engine.connect() as conn:
        rows = {row.id: TaskRecord(**row._mapping) for row in conn.execute(sa.select(tasks))}
    assert store.get(placed) == rows[placed] and store.get(plain) == rows[plain]
    assert store.get_many([*ids, "no-such-task", placed]) == {task_id: rows[task_id] for task_id in ids}
    assert store.get_many([]) == {}
    with pytest.raises(UnknownTask):
        store.get("no-such-task")


def test_illegal_transitions_are_refused(store: TaskStore) -> None:
    task_id = submit(store)
    with pytest.raises(IllegalTransition, match="queued -> running"):
        store.transition(task_id, "running", "skip ahead", time.time())
    with pytest.raises(IllegalTransition):
        store.transition(task_id, "succeeded", "never ran", time.time())
    assert store.get(task_id).state == "queued"
    with pytest.raises(UnknownTask):
        store.transition("nope", "placed", "x", time.time())


def test_completion_is_recorded_once(store: TaskStore) -> None:
    task_id = submit(store)
    now = time.time()
    store.transition_chain(task_id, [Step("placed", "p"), Step("dispatched", "d", agent_id="a1")], now)
    before = metrics.DUPLICATE_COMPLETIONS.labels(state="succeeded")._value.get()
    results = []
    barrier = threading.Barrier(8)

    def complete() -> None:
        barrier.wait()
        results.append(store.transition(task_id, "succeeded", "done", time.time()))

    threads = [threading.Thread(target=complete) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    terminal = [t for t in store.transitions_of(task_id) if t.to_state == "succeeded"]
    assert len(terminal) == 1
    assert metrics.DUPLICATE_COMPLETIONS.labels(state="succeeded")._value.get() == before + 7
    assert store.transition(task_id, "failed", "late failure report", time.time()) is False
    assert store.get(task_id).state == "succeeded"


def test_stale_worker_cannot_move_a_task_it_no_longer_owns(store: TaskStore) -> None:
    task_id = submit(store)
    now = time.time()
    store.transition_chain(task_id, [Step("placed", "p"), Step("dispatched", "d", agent_id="a1")], now)
    store.transition(task_id, "queued", "agent lost", now, expect_agent="a1")
    store.transition_chain(task_id, [Step("placed", "p"), Step("dispatched", "d", agent_id="a2")], now)
    assert store.transition(task_id, "succeeded", "old agent reports", now, expect_agent="a1") is False
    assert store.get(task_id).state == "dispatched"


def test_idempotency_key_returns_the_same_task(store: TaskStore) -> None:
    first = store.insert_batch([NewTask(make_task(), "key-1"), NewTask(make_task(), "key-1")], time.time())
    assert first[0].created and not first[1].created
    assert first[0].task_id == first[1].task_id
    again = store.insert_batch([NewTask(make_task(), "key-1")], time.time())[0]
    assert (again.task_id, again.created) == (first[0].task_id, False)
    assert len(store.list_tasks()[0]) == 1


def test_checkpoint_only_moves_forward(store: TaskStore) -> None:
    task_id = submit(store)
    now = time.time()
    dispatch = [Step("placed", "p", pool="cloud-a"), Step("dispatched", "d", agent_id="a1", count_attempt=True)]
    store.transition_chain(task_id, dispatch, now)

    def checkpoint(agent_id: str, frame: int) -> None:
        progress = types_pb2.Progress(task_id=task_id, checkpoint_frame=frame, checkpoint_uri=f"file:///c/{frame}")
        store.record_progress(task_id, agent_id, progress, now)

    checkpoint("a1", 40)
    checkpoint("a1", 10)
    record = store.get(task_id)
    assert (record.checkpoint_frame, record.checkpoint_uri) == (40, "file:///c/40")
    latest = store.latest_progress(task_id)
    assert latest is not None and latest.version == 2 and latest.progress.checkpoint_frame == 10


def dispatch(store: TaskStore, task_id: str, agent_id: str, now: float) -> None:
    """Place a queued task on pool cloud-a and send it to `agent_id`."""
    steps = [Step("placed", "p", pool="cloud-a"), Step("dispatched", "d", agent_id=agent_id, count_attempt=True)]
    assert store.transition_chain(task_id, steps, now, expect_from="queued")


def test_only_the_run_holding_the_task_moves_its_checkpoint_and_a_fresh_start_forgets_it(store: TaskStore) -> None:
    """A stopped run's late report (its agent no longer holds the task) never sets the checkpoint,
    alone or in a session's batch; a fresh start forgets it in the same commit as the move."""
    task_id = submit(store)
    now = time.time()

    def checkpoint(agent_id: str, frame: int) -> None:
        progress = types_pb2.Progress(
            task_id=task_id, checkpoint_frame=frame, checkpoint_uri=f"file:///{agent_id}/{frame}"
        )
        store.record_progress(task_id, agent_id, progress, now)

    def held() -> tuple[int, str]:
        record = store.get(task_id)
        return record.checkpoint_frame, record.checkpoint_uri

    dispatch(store, task_id, "cloud-1", now)
    checkpoint("cloud-1", 20)
    assert held() == (20, "file:///cloud-1/20")
    assert store.transition(task_id, "queued", "stopped", now, expect_agent="cloud-1", agent_id="", fresh_start=True)
    assert held() == (0, "")
    checkpoint("cloud-1", 30)  # the stopped run's late report
    store.record_progress_many([(task_id, "cloud-1", types_pb2.Progress(checkpoint_frame=35, checkpoint_uri="x"))], now)
    assert held() == (0, "")
    dispatch(store, task_id, "onprem-1", now)
    checkpoint("cloud-1", 40)  # still late, now that another agent holds the task
    checkpoint("onprem-1", 10)
    assert held() == (10, "file:///onprem-1/10")


def test_a_stopped_runs_late_report_is_not_the_tasks_latest_progress(store: TaskStore) -> None:
    """What GetTask and WatchTask show as the task's progress comes only from the run that holds it:
    after a stop (a lock, a budget) the cloud run's late report does not make it look as if it ran
    on, alone or in a session's batch; a completion's own progress is recorded with it."""
    task_id = submit(store)
    now = time.time()

    def report(agent_id: str, frame: int) -> None:
        store.record_progress(task_id, agent_id, types_pb2.Progress(task_id=task_id, frames_done=frame), now)

    def latest() -> tuple[int, int]:
        record = store.latest_progress(task_id)
        assert record is not None
        return record.version, record.progress.frames_done

    dispatch(store, task_id, "cloud-1", now)
    report("cloud-1", 3)
    assert latest() == (1, 3)
    assert store.transition(task_id, "queued", "stopped", now, expect_agent="cloud-1", agent_id="", fresh_start=True)
    report("cloud-1", 4)  # the stopped run's late report
    store.record_progress_many([(task_id, "cloud-1", types_pb2.Progress(task_id=task_id, frames_done=5))], now)
    assert latest() == (1, 3)
    dispatch(store, task_id, "onprem-1", now)
    report("cloud-1", 6)  # still late, now that another agent holds the task
    report("onprem-1", 1)
    assert latest() == (2, 1)
    done = types_pb2.Progress(task_id=task_id, frames_done=9)
    finish = Step("succeeded", "done", agent_id="onprem-1")
    assert store.apply_changes([Change(task_id, (finish,), expect_agent="onprem-1", progress=done)], now) == [True]
    assert latest() == (3, 9)


def test_list_filters_and_pagination(store: TaskStore) -> None:
    ids = [submit(store, project="alpha") for _ in range(5)] + [submit(store, project="beta") for _ in range(2)]
    page, token = store.list_tasks(project="alpha", limit=2)
    seen = [r.id for r in page]
    while token:
        page, token = store.list_tasks(project="alpha", limit=2, page_token=token)
        seen += [r.id for r in page]
    assert sorted(seen) == sorted(ids[:5])
    assert len(store.list_tasks(state="queued", limit=100)[0]) == 7
    with pytest.raises(ValueError, match="page_token"):
        store.list_tasks(page_token="garbage!")


def test_runnable_respects_backoff_and_priority(store: TaskStore) -> None:
    low = submit(store, priority=types_pb2.PRIORITY_LOW)
    urgent = submit(store, priority=types_pb2.PRIORITY_URGENT)
    backed_off = submit(store, priority=types_pb2.PRIORITY_URGENT)
    now = time.time()
    store.transition_chain(backed_off, [Step("placed", "p"), Step("dispatched", "d", agent_id="a")], now)
    store.transition(backed_off, "queued", "retry", now, not_before=now + 60)
    assert [r.id for r in store.runnable(now, 10, aging_s=60)] == [urgent, low]
    assert next(r.id for r in store.runnable(now + 61, 10, aging_s=60)) in (urgent, backed_off)


def test_group_commit_many_concurrent_submits_each_durable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/gc.db"
    task_store = TaskStore(url)
    committer = GroupCommitter(task_store)
    ids: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(50):
            result = committer.submit(NewTask(make_task(), f"c{n}-{i}" if i % 2 else ""))
            with lock:
                ids.append(result.task_id)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    committer.close()
    task_store.close()
    reopened = TaskStore(url)  # a fresh engine sees every id that was handed out
    with reopened._reader.connect() as conn:
        stored = {row[0] for row in conn.execute(sa.text("select id from tasks"))}
        assert conn.execute(sa.select(sa.func.count()).select_from(transitions)).scalar() == 800
    assert len(ids) == 800 and set(ids) == stored
    reopened.close()


def test_group_commit_from_coroutines_mixes_with_threads_and_times_out_cleanly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The grpc.aio intake awaits its commit: ids only after the commit, same batches as the thread
    callers, and a writer that stalls gives a TimeoutError (answered UNAVAILABLE) instead of a hang."""
    url = f"sqlite:///{tmp_path}/gc-async.db"
    task_store = TaskStore(url)
    committer = GroupCommitter(task_store)

    async def submit_many() -> list[str]:
        results = await asyncio.gather(
            *(committer.submit_async(NewTask(make_task(), "repeat" if i % 10 == 0 else "")) for i in range(200))
        )
        return [result.task_id for result in results]

    threaded = threading.Thread(target=lambda: [committer.submit(NewTask(make_task(), "")) for _ in range(50)])
    threaded.start()
    ids = asyncio.run(submit_many())
    threaded.join()
    assert len(set(ids)) == 181  # 180 new + one task for the 20 submits that share a key
    assert task_store.count_by_state() == {"queued": 231}

    stalled, release = threading.Event(), threading.Event()

    def stall(_conn: object) -> None:
        stalled.set()
        release.wait(10)

    blocker = threading.Thread(target=committer.run, args=(stall,))
    blocker.start()
    assert stalled.wait(5)
    with pytest.raises(TimeoutError, match=r"did not commit within 0\.2s"):
        asyncio.run(committer.submit_async(NewTask(make_task(), ""), timeout=0.2))
    release.set()
    blocker.join()
    committer.close()
    task_store.close()


def test_state_machine_table_is_closed() -> None:
    for to_state, sources in ALLOWED_FROM.items():
        assert to_state in ALL_STATES and sources <= set(ALL_STATES)
    for terminal in ("succeeded", "failed", "cancelled"):
        assert not any(is_legal(terminal, target) for target in ALL_STATES)
    assert is_legal("preempted", "queued") and not is_legal("queued", "running")


def test_group_commit_lingers_only_for_company_that_is_coming(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A lone submit commits at once; while submits arrive faster than one per linger a batch waits
    the linger for company; a queued dispatch or completion write ends that wait."""
    task_store = TaskStore(f"sqlite:///{tmp_path}/gc-linger.db")
    linger = 0.6
    committer = GroupCommitter(task_store, intake_linger_s=linger)

    def timed(action: Callable[[], object]) -> float:
        started = time.monotonic()
        action()
        return time.monotonic() - started

    try:
        assert timed(lambda: committer.submit(NewTask(make_task(), ""))) < linger / 2  # idle: no company expected
        burst = [threading.Thread(target=committer.submit, args=(NewTask(make_task(), ""),)) for _ in range(8)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        assert timed(lambda: committer.submit(NewTask(make_task(), ""))) >= linger * 0.9  # busy: it waits

        lingering = threading.Thread(target=committer.submit, args=(NewTask(make_task(), ""),))

        def submit_then_write() -> None:
            lingering.start()
            time.sleep(0.05)
            assert committer.run(lambda conn: 1) == 1
            lingering.join()

        assert timed(submit_then_write) < linger / 2  # the write did not sit out the submit's linger
        assert task_store.count_by_state() == {"queued": 11}
    finally:
        committer.close()
        task_store.close()


def test_a_thread_reading_again_sees_what_other_threads_committed_meanwhile(store: TaskStore) -> None:
    """SQLite readers keep their connection per thread: a read must never answer from an old
    snapshot (the dispatcher reads the queue on one thread while the writer commits on another)."""
    now = time.time()
    [first] = store.insert_batch([NewTask(make_task(), "")], now)
    assert [r.id for r in store.runnable(now + 1, 10, 60.0)] == [first.task_id]
    assert store.get(first.task_id).state == "queued"
    committer = GroupCommitter(store)
    try:
        second = committer.submit(NewTask(make_task(), ""))  # committed on the writer thread
        committed = threading.Thread(
            target=lambda: store.transition(first.task_id, "placed", "test", now=now + 1, expect_from="queued")
        )
        committed.start()
        committed.join()
        assert [r.id for r in store.runnable(now + 2, 10, 60.0)] == [second.task_id]
        assert store.get(first.task_id).state == "placed"
    finally:
        committer.close()


def test_evolve_is_dataclasses_replace(store: TaskStore) -> None:
    import dataclasses

    record = store.get(store.insert_batch([NewTask(make_task(), "")], time.time())[0].task_id)
    changes = {"state": "succeeded", "agent_id": "a1", "attempts": 3, "finished_at": 9.0, "placement": {"x": 1}}
    evolved = record.evolve(**changes)
    assert evolved == dataclasses.replace(record, **changes) and evolved is not record
    assert record.state == "queued" and record.agent_id is None  # the original is untouched
    with pytest.raises(TypeError, match="no field 'stat'"):
        record.evolve(stat="succeeded")
