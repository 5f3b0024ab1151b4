"""The dispatcher's event loop for agent calls: results across threads, no self-wait, clean close."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from facefleet.scheduler.agent_streams import AgentStreams


def test_run_spawn_blocking_and_close_cancel_what_still_runs() -> None:
    streams = AgentStreams(grpc.aio.insecure_channel)
    pool = ThreadPoolExecutor(2, thread_name_prefix="store-pool")
    cleaned = threading.Event()
    started = threading.Event()

    async def answer() -> str:
        caller = await streams.blocking(pool, threading.current_thread)
        return f"{threading.current_thread().name}/{caller.name.rsplit('_', 1)[0]}"

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    async def waits_on_itself() -> None:
        streams.run(answer(), timeout=1)

    try:
        assert streams.run(answer(), timeout=5) == "agent-streams/store-pool"
        streams.spawn(forever())
        assert started.wait(5)
        with pytest.raises(RuntimeError, match="its own loop"):
            streams.run(waits_on_itself(), timeout=5)
    finally:
        streams.close(timeout=5)
        pool.shutdown()
    assert cleaned.is_set()  # close() cancelled the stream and its clean-up ran
