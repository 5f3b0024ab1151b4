"""Calls into an event loop from another thread: `gathered()` posts a burst with one wake-up."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import uvloop

from facefleet import loop_calls
from facefleet.grpc_server import LoopThread


class CountingLoop:
    """A LoopThread whose `call_soon_threadsafe` calls (the loop's wake-ups) are counted."""

    def __init__(self) -> None:
        self.thread = LoopThread("test-loop-calls")
        self.loop: Any = self.thread.loop
        self.wakeups = 0
        post = self.loop.call_soon_threadsafe

        def counted(callback: Any, *args: Any) -> Any:
            self.wakeups += 1
            return post(callback, *args)

        self.loop.call_soon_threadsafe = counted

    def drain(self) -> None:
        """Wait until everything posted so far has run."""
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.thread.loop).result(5)


@pytest.fixture
def loop() -> Any:
    counting = CountingLoop()
    yield counting
    counting.thread.stop()


def test_the_servers_loop_is_uvloops() -> None:
    thread = LoopThread("test-uvloop")
    try:
        assert isinstance(thread.loop, uvloop.Loop)
    finally:
        thread.stop()


def test_calls_outside_a_gathered_block_each_wake_the_loop(loop: CountingLoop) -> None:
    seen: list[int] = []
    for value in range(3):
        loop_calls.call_soon(loop.loop, seen.append, value)
    loop.drain()
    assert seen == [0, 1, 2]
    assert loop.wakeups == 3 + 1  # and drain's own


def test_a_gathered_burst_runs_in_order_after_the_block_with_one_wake_up(loop: CountingLoop) -> None:
    seen: list[str] = []
    with loop_calls.gathered():
        loop_calls.call_soon(loop.loop, seen.append, "assignment")
        with loop_calls.gathered():  # nested: posted with the outer block
            loop_calls.call_soon(loop.loop, seen.append, "answer")
        loop.drain()
        assert seen == [] and loop.wakeups == 1  # only drain's own post so far
    loop.drain()
    assert seen == ["assignment", "answer"]
    assert loop.wakeups == 3  # drain, the burst, drain


def test_a_failing_call_is_reported_and_the_rest_of_the_burst_still_runs(loop: CountingLoop) -> None:
    seen: list[str] = []
    reported: list[dict[str, Any]] = []
    loop.loop.set_exception_handler(lambda _loop, context: reported.append(context))

    def fails() -> None:
        raise ValueError("boom")

    with loop_calls.gathered():
        loop_calls.call_soon(loop.loop, fails)
        loop_calls.call_soon(loop.loop, seen.append, "after")
    loop.drain()
    assert seen == ["after"]
    assert [type(context["exception"]) for context in reported] == [ValueError]


def test_a_block_that_raises_still_posts_what_it_called(loop: CountingLoop) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError), loop_calls.gathered():
        loop_calls.call_soon(loop.loop, seen.append, "sent")
        raise RuntimeError("the pass failed after sending")
    loop.drain()
    assert seen == ["sent"]


def test_a_closed_loop_refuses_at_once_and_a_gathered_call_to_it_is_dropped() -> None:
    counting = CountingLoop()
    other = CountingLoop()
    counting.thread.stop()
    counting.loop.close()
    seen: list[str] = []
    try:
        with pytest.raises(RuntimeError):
            loop_calls.call_soon(counting.loop, seen.append, "lost")
        with loop_calls.gathered():
            with pytest.raises(RuntimeError):
                loop_calls.call_soon(counting.loop, seen.append, "lost")
            loop_calls.call_soon(other.loop, seen.append, "delivered")
        other.drain()
        assert seen == ["delivered"]
    finally:
        other.thread.stop()


def test_each_thread_gathers_its_own_calls(loop: CountingLoop) -> None:
    seen: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def gathering_thread() -> None:
        with loop_calls.gathered():
            loop_calls.call_soon(loop.loop, seen.append, "held")
            inside.set()
            release.wait(5)

    worker = threading.Thread(target=gathering_thread)
    worker.start()
    assert inside.wait(5)
    loop_calls.call_soon(loop.loop, seen.append, "direct")  # this thread gathers nothing
    loop.drain()
    assert seen == ["direct"]
    release.set()
    worker.join(5)
    loop.drain()
    assert seen == ["direct", "held"]
