"""The dispatcher's calls to agents on one asyncio event loop (grpc.aio), not one thread per call.

Every running task holds a RunTask stream for as long as it runs. With the sync API each stream
kept a worker thread blocked on it, and every message woke that thread: on a process whose threads
share one GIL, those hand-offs were a large share of the dispatch path's cost. Here one thread runs
an event loop that owns every agent channel and stream; the dispatcher's coroutines hand blocking
work (store writes, audit) to its worker pool with `blocking()`.

Thread rules: `spawn`, `run` and `call_soon` may be called from any thread except the loop's own;
`stub` only from coroutines on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import structlog

from facefleet.grpc_server import LoopThread
from facefleet.v1 import agent_pb2_grpc

log = structlog.get_logger()

T = TypeVar("T")

AioChannelFactory = Callable[[str], grpc.aio.Channel]


class AgentStreams:
    def __init__(self, channel_for: AioChannelFactory, loop: LoopThread | None = None) -> None:
        """`loop`: an event loop to share (the scheduler's gRPC server runs on it too); without one,
        AgentStreams starts its own and stops it on close()."""
        self._channel_for = channel_for
        self._owns_loop = loop is None
        self._loop_thread = loop or LoopThread("agent-streams")
        self._loop = self._loop_thread.loop
        self._thread = self._loop_thread.thread
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, agent_pb2_grpc.AgentStub] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` on the loop; failures are logged (the coroutine handles its own)."""
        self._loop.call_soon_threadsafe(self._start, coroutine)

    def _start(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("agent stream task failed", error=repr(task.exception()))

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coroutine` on the loop and wait for its result (from another thread)."""
        return self._loop_thread.run(coroutine, timeout)

    def call_soon(self, callback: Callable[[], Any]) -> None:
        self._loop_thread.call_soon(callback)

    def stub(self, address: str) -> agent_pb2_grpc.AgentStub:
        """The agent's stub on a channel this loop owns (created on first use)."""
        stub = self._stubs.get(address)
        if stub is None:
            channel = self._channels[address] = self._channel_for(address)
            stub = self._stubs[address] = agent_pb2_grpc.AgentStub(channel)
        return stub

    @staticmethod
    async def blocking(executor: Executor, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` on `executor`: store and audit calls block, the loop must not."""
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every stream (their coroutines' `finally` blocks run), close channels, stop."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for channel in self._channels.values():
                await channel.close(grace=None)
            self._channels.clear()
            self._stubs.clear()

        with contextlib.suppress(Exception):
            self.run(shutdown(), timeout)
        if self._owns_loop:
            self._loop_thread.stop(timeout)
