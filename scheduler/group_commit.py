"""Group commit: one writer thread turns many concurrent writes into few durable transactions.

Callers (SubmitTask handlers, dispatch workers) enqueue their write and block. The writer takes
everything pending (up to `max_batch`), runs it in a single transaction, commits (one fsync), and
only then releases each caller with its result. So an id is never returned before it is durable,
the fsync cost is shared by the batch, and threads never fight over SQLite's write lock (whose
busy handler sleeps for milliseconds at a time). Each operation runs under its own SAVEPOINT (unless
it is known to fail before writing), so one failing operation cannot spoil the others in its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from facefleet import loop_calls
from facefleet.scheduler import metrics
from facefleet.scheduler.store import Change, NewTask, SubmitResult, TaskStore

log = structlog.get_logger()

T = TypeVar("T")

# A batch that starts with a submit waits this long for more before it commits: submits come in
# bursts from many clients, and each commit's fsync and set-up cost more CPU than the 2 ms. With
# 32 clients it took batches from ~6 to ~11 submits and 0.59-0.67 -> 0.53-0.58 ms of scheduler CPU
# per submit (docs/benchmarks.md). It waits only while submits arrive faster than one per linger
# (batches lately had company; a lone submit would only lose the 2 ms), and a queued dispatch or
# completion write ends the wait at once.
INTAKE_LINGER_S = 0.002
RATE_WEIGHT = 0.5  # weight of the newest batch in the intake rate estimate (an exponential average)


Offered = Any  # a submit waiting for its commit, as `IntakeLauncher.offer` gets it: `.insert` is its NewTask


class IntakeLauncher(Protocol):
    def offer(self, submit: Offered) -> bool: ...  # True: it stores the submit (insert_with or hand_back)


class StoreUnavailable(RuntimeError):
    """The batch could not be committed; callers answer UNAVAILABLE and the client retries."""


def _shutting_down() -> StoreUnavailable:
    return StoreUnavailable("the scheduler is shutting down; retry against another replica")


class _Pending:
    """One queued write and its caller's wake-up (a bare lock: cheaper than a Future's Condition).
    `carried`: submits an operation stores (`insert_with`), answered when the operation commits."""

    __slots__ = ("carried", "done", "error", "held", "insert", "isolated", "op", "value")

    def __init__(
        self,
        insert: NewTask | None = None,
        op: Callable[[Connection], Any] | None = None,
        isolated: bool = True,
        carried: Sequence[_Pending] = (),
    ) -> None:
        self.insert = insert
        self.op = op
        self.isolated = isolated
        self.carried = carried
        # Set by `insert_with` to answer `carried` later itself: _release leaves the answers here.
        self.held: list[tuple[list[_Pending], dict[int, tuple[bool, Any]]]] | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()

    def set_result(self, value: Any) -> None:
        self.value = value
        self.done.release()

    def set_exception(self, error: BaseException) -> None:
        self.error = error
        self.done.release()

    def result(self, timeout: float) -> Any:
        if not self.done.acquire(timeout=timeout):
            raise _commit_timeout(timeout)
        if self.error is not None:
            raise self.error
        return self.value


class _LoopPending(_Pending):
    """A queued write whose caller is a coroutine: the writer settles an asyncio future on its loop."""

    __slots__ = ("future", "loop")

    def __init__(self, insert: NewTask, loop: asyncio.AbstractEventLoop) -> None:
        # Not _Pending.__init__: its wake-up lock is for threads; a coroutine waits on `future`.
        self.insert, self.op, self.isolated, self.value, self.error = insert, None, True, None, None
        self.carried, self.held = (), None
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def set_result(self, value: Any) -> None:
        self._settle_on_loop(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle_on_loop(None, error)

    def _settle_on_loop(self, value: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed (it left): nobody to tell
            loop_calls.call_soon(self.loop, _settle, self.future, value, error)


def _release(batch: list[_Pending], outcomes: dict[int, tuple[bool, Any]]) -> None:
    """Wake every caller of a committed batch: threads one by one, coroutines with one hop onto
    each caller loop for all of its futures (one self-pipe write per loop and batch, not per submit)."""
    for pending in [p for p in batch if p.carried]:  # answered with the operation that stored them
        ok, value = outcomes[id(pending)]
        for index, submit in enumerate(pending.carried):
            outcomes[id(submit)] = (True, value[0][index]) if ok else (False, value)
        if ok and pending.held is not None:  # its caller answers them (`insert_with`)
            pending.held.append((list(pending.carried), outcomes))
            continue
        batch = batch + list(pending.carried)
    on_loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for pending in batch:
        ok, value = outcomes[id(pending)]
        if isinstance(pending, _LoopPending):
            on_loops.setdefault(pending.loop, []).append((pending.future, ok, value))
        elif ok:
            pending.set_result(value)
        else:
            pending.set_exception(value)
    for loop, settled in on_loops.items():
        with contextlib.suppress(RuntimeError):  # the callers' loop is closed (they left): nobody to tell
            loop_calls.call_soon(loop, _settle_all, settled)


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        _settle(future, None if not ok else value, None if ok else value)


def _commit_timeout(timeout: float) -> TimeoutError:
    return TimeoutError(f"the task store did not commit within {timeout}s; retry")


def _expire(future: asyncio.Future[Any], timeout: float) -> None:
    if not future.done():
        future.set_exception(_commit_timeout(timeout))


def _expire_all(futures: list[asyncio.Future[Any]], timeout: float) -> None:
    for future in futures:
        _expire(future, timeout)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller timed out or went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class GroupCommitter:
    def __init__(
        self, store: TaskStore, max_batch: int = 512, attach: bool = True, intake_linger_s: float = INTAKE_LINGER_S
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._intake_linger_s = intake_linger_s
        self._pending: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        # Set when a dispatch or completion write is queued: it cuts an intake batch's linger short
        # (a task waiting for its launch must not wait for company that submits are waiting for).
        self._urgent = threading.Event()
        self._insert_rate = 0.0  # submits/s lately, measured on the writer thread
        self._lingering = False  # the writer holds an intake batch open for company
        self._last_insert_batch = time.monotonic()
        self._closed = False
        # Held by whoever writes a batch: the writer thread, or a caller that finds it idle and
        # commits its operation itself (`insert_with`). On SQLite the batch is written on `_conn`,
        # one connection kept open (no pool checkout, reset and check-in per commit).
        self._writing = threading.Lock()
        self._writing_thread: int | None = None
        self._conn: Connection | None = None
        # Called after each commit that stored new tasks (the dispatcher: a pass may start now).
        self.on_inserted: Callable[[], None] = lambda: None
        # The dispatcher: while it idles as leader it takes single submits to store them with their
        # launch in one commit (`insert_with`); anything it does not take is committed here.
        self.launcher: IntakeLauncher | None = None
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()
        if attach:
            store.attach_writer(self)

    def submit(self, item: NewTask, timeout: float = 30.0) -> SubmitResult:
        """Block until `item` is committed; returns its id (or the existing one for a repeated key)."""
        result: SubmitResult = self._enqueue(_Pending(insert=item), timeout)
        return result

    async def submit_async(self, item: NewTask, timeout: float = 30.0) -> SubmitResult:
        """`submit` for coroutines (the grpc.aio intake): the loop is not blocked while it commits.
        An idle leading dispatcher (`launcher`) may take it, to store it with its launch."""
        if self._closed:
            raise _shutting_down()
        loop = asyncio.get_running_loop()
        pending = _LoopPending(item, loop)
        expiry = loop.call_later(timeout, _expire, pending.future, timeout)  # cheaper than asyncio.timeout
        launcher = self.launcher  # last before the wait: the dispatcher it wakes needs this thread's GIL
        if launcher is None or not launcher.offer(pending):
            self._pending.put(pending)
        try:
            result: SubmitResult = await pending.future
        finally:
            expiry.cancel()
        return result

    def submit_many(self, items: Sequence[NewTask], timeout: float = 30.0) -> list[SubmitResult | Exception]:
        """`submit` for a client's batch: all queued at once (so they share commits); per item its
        result or why it was not stored (StoreUnavailable, TimeoutError)."""
        if self._closed:
            raise _shutting_down()
        pendings = [_Pending(insert=item) for item in items]
        for pending in pendings:
            self._pending.put(pending)
        deadline = time.monotonic() + timeout
        results: list[SubmitResult | Exception] = []
        for pending in pendings:
            try:
                results.append(pending.result(max(0.0, deadline - time.monotonic())))
            except (StoreUnavailable, TimeoutError) as error:
                results.append(error)
        return results

    async def submit_many_async(
        self, items: Sequence[NewTask], timeout: float = 30.0
    ) -> list[SubmitResult | Exception]:
        """`submit_many` for coroutines: one timer for the batch, no loop iteration per item."""
        if self._closed:
            raise _shutting_down()
        loop = asyncio.get_running_loop()
        pendings = [_LoopPending(item, loop) for item in items]
        for pending in pendings:
            self._pending.put(pending)
        expiry = loop.call_later(timeout, _expire_all, [pending.future for pending in pendings], timeout)
        results: list[SubmitResult | Exception] = []
        try:
            for pending in pendings:
                try:
                    results.append(await pending.future)
                except (StoreUnavailable, TimeoutError) as error:
                    results.append(error)
        finally:
            expiry.cancel()
        return results

    def insert_with(
        self,
        offered: Sequence[Offered],
        now: float,
        changes: Sequence[Change],
        then: Callable[[Connection, list[bool | Exception]], T],
        timeout: float = 60.0,
    ) -> tuple[T | Exception, Callable[[], None]]:
        """Store `offered` submits (taken through `launcher.offer`) with `changes` applied
        (`TaskStore.insert_and_apply_in`: the dispatcher's launches of them, and of other tasks),
        and run `then(conn, results of the changes)` in the same transaction: one commit for all.
        Returns `then`'s result (or the exception it raised: the submits and changes are stored all
        the same) and `answer`: the submitters are answered when the caller calls it, once the
        transaction is durable (the dispatcher sends the launches first: an agent's start waits for
        no reply to a client). Raises when the transaction did not commit (the submitters get that
        error at once). No savepoint (SQLAlchemy's cost ~0.5 ms each here): like the store's own
        operations, `then` checks everything before it writes."""
        carried: list[_Pending] = list(offered)
        items = [pending.insert for pending in carried if pending.insert is not None]
        assert len(items) == len(carried), "offered submits come from submit_async"

        def op(conn: Connection) -> tuple[list[SubmitResult], T | Exception]:
            results, applied = self._store.insert_and_apply_in(conn, items, changes, now)
            try:
                return results, then(conn, applied)
            except IntegrityError:
                raise  # the whole batch is redone one write at a time
            except Exception as error:
                log.exception("a launch with its intake failed; the tasks stay queued")
                return results, error

        if self._closed:
            error = _shutting_down()
            _release(carried, {id(pending): (False, error) for pending in carried})
            raise error
        pending = _Pending(op=op, isolated=False, carried=carried)
        value: tuple[list[SubmitResult], T | Exception] = self._commit_here_or_enqueue(pending, timeout)
        metrics.SUBMIT_BATCH_SIZE.observe(len(items))
        held = pending.held or []

        def answer() -> None:
            while held:
                _release(*held.pop())

        return value[1], answer

    def hand_back(self, offered: Sequence[Offered]) -> None:
        """Offered submits the launcher will not store itself: the next intake commit stores them."""
        for pending in offered:
            if self._closed:
                pending.set_exception(_shutting_down())
            else:
                self._pending.put(pending)

    def run(self, op: Callable[[Connection], T], isolated: bool = True, timeout: float = 60.0) -> T:
        """Run `op(conn)` inside the next batch's transaction; return its result once committed.

        `isolated=False` skips the SAVEPOINT: only for operations that raise before they write."""
        result: T = self._commit_here_or_enqueue(_Pending(op=op, isolated=isolated), timeout)
        return result

    def _commit_here_or_enqueue(self, pending: _Pending, timeout: float) -> Any:
        """While the writer idles, commit `pending` on the calling thread (a hand-off to the writer
        and back cost more than the write itself: two thread switches on a process whose threads
        share one GIL); otherwise queue it for the writer's next batch. Not on an event loop.
        Committed here, the submits it carries (`insert_with`) are answered by its caller (`held`);
        queued, by the writer as it commits."""
        idle = self._pending.empty() and not self._lingering and not self._closed
        if idle and self._writing.acquire(blocking=False):
            if pending.carried:
                pending.held = []
            try:
                self._write_batch([pending])
            finally:
                self._writing.release()
            return pending.result(0)
        return self._enqueue(pending, timeout)

    def on_writer_thread(self) -> bool:
        return threading.get_ident() in (self._thread.ident, self._writing_thread)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._store.attach_writer(None)
        self._pending.put(None)
        self._thread.join(timeout=10)
        with self._writing:
            self._drop_connection()

    def _enqueue(self, pending: _Pending, timeout: float) -> Any:
        if self._closed:
            raise _shutting_down()
        self._pending.put(pending)
        if pending.op is not None:
            self._urgent.set()  # an intake batch lingering now commits at once
        return pending.result(timeout)

    def _run(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            batch = [first]
            stop = False
            if first.insert is not None and self._insert_rate * self._intake_linger_s > 1.0:
                # submits arriving meanwhile share this commit's fsync; a queued operation ends the wait
                self._lingering = True
                self._urgent.wait(self._intake_linger_s)
                self._lingering = False
            self._urgent.clear()
            while len(batch) < self._max_batch:
                try:
                    nxt = self._pending.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            with self._writing:
                self._write_batch(batch)
            if stop:
                return

    def _note_intake(self, inserts: int) -> None:
        """Update the intake rate estimate with a batch's submits (the linger's evidence)."""
        now = time.monotonic()
        elapsed = max(now - self._last_insert_batch, self._intake_linger_s, 1e-4)
        self._last_insert_batch = now
        self._insert_rate += RATE_WEIGHT * (inserts / elapsed - self._insert_rate)

    def _write_batch(self, batch: list[_Pending]) -> None:
        """`_commit` by the holder of `_writing` (the store's writer is this thread meanwhile)."""
        self._writing_thread = threading.get_ident()
        try:
            self._commit(batch)
        finally:
            self._writing_thread = None

    def _commit(self, batch: list[_Pending]) -> None:
        inserts = [p for p in batch if p.insert is not None]
        ops = [p for p in batch if p.op is not None]
        if inserts:
            self._note_intake(len(inserts))
        now = time.time()
        try:
            outcomes = self._transaction(inserts, ops, now)
        except IntegrityError:
            # An idempotency key raced with another replica: redo everything one by one.
            outcomes = {}
            for pending in batch:
                try:
                    outcomes.update(self._transaction(*(([pending], []) if pending.insert else ([], [pending])), now))
                except Exception as error:
                    outcomes[id(pending)] = (False, error)
        except Exception as error:
            log.error("group commit failed", size=len(batch), error=str(error))
            failure = StoreUnavailable(f"could not write to the task store ({type(error).__name__}); retry")
            outcomes = {id(pending): (False, failure) for pending in batch}
        else:
            if inserts:
                metrics.SUBMIT_BATCH_SIZE.observe(len(inserts))
                self.on_inserted()
        _release(batch, outcomes)

    def _transaction(self, inserts: list[_Pending], ops: list[_Pending], now: float) -> dict[int, tuple[bool, Any]]:
        outcomes: dict[int, tuple[bool, Any]] = {}
        if not self._store.is_sqlite:  # the pool's pre-ping finds a connection a server restart broke
            with self._store._write() as conn:
                self._run_batch(conn, inserts, ops, now, outcomes)
            return outcomes
        if self._conn is None:
            self._conn = self._store.engine.connect()
        conn = self._conn
        try:
            with conn.begin():
                self._run_batch(conn, inserts, ops, now, outcomes)
        except BaseException:
            self._drop_connection()  # the next batch opens another
            raise
        return outcomes

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _run_batch(
        self,
        conn: Connection,
        inserts: list[_Pending],
        ops: list[_Pending],
        now: float,
        outcomes: dict[int, tuple[bool, Any]],
    ) -> None:
        if inserts:
            results = self._store._insert_batch(conn, [p.insert for p in inserts if p.insert], now)
            for pending, result in zip(inserts, results, strict=True):
                outcomes[id(pending)] = (True, result)
        for pending in ops:
            assert pending.op is not None
            try:
                if pending.isolated:
                    with conn.begin_nested():
                        outcomes[id(pending)] = (True, pending.op(conn))
                else:
                    outcomes[id(pending)] = (True, pending.op(conn))
            except IntegrityError:
                raise
            except Exception as error:
                outcomes[id(pending)] = (False, error)
