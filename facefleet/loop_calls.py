"""Calls into an asyncio loop from other threads, one wake-up per burst.

`loop.call_soon_threadsafe` writes to the loop's self-pipe every time; the loop thread wakes and
takes the GIL while the caller still has work to do, and the caller then waits for the GIL back. A
thread that makes several calls in a row (a dispatch pass: the agents' assignments, then the
submitters' answers) wraps them in `gathered()`: inside it, `call_soon` only collects, and the
calls go to each loop together, in order, with one `call_soon_threadsafe` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

_Calls = list[tuple[Callable[..., Any], tuple[Any, ...]]]
_local = threading.local()


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """`loop.call_soon_threadsafe(callback, *args)`, or held until this thread's `gathered()` ends.
    Raises RuntimeError when the loop is closed (held calls to a closed loop are dropped)."""
    held: dict[asyncio.AbstractEventLoop, _Calls] | None = getattr(_local, "held", None)
    if held is None:
        loop.call_soon_threadsafe(callback, *args)
        return
    if loop.is_closed():
        raise RuntimeError("Event loop is closed")
    held.setdefault(loop, []).append((callback, args))


@contextlib.contextmanager
def gathered() -> Iterator[None]:
    """Hold this thread's `call_soon` calls until the block ends, then post them per loop at once
    (also when the block raises: what was called still happens). Nested blocks post at the outer end."""
    if getattr(_local, "held", None) is not None:
        yield
        return
    held: dict[asyncio.AbstractEventLoop, _Calls] = {}
    _local.held = held
    try:
        yield
    finally:
        _local.held = None
        for loop, calls in held.items():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: nobody left to call
                loop.call_soon_threadsafe(_run_all, calls)


def _run_all(calls: _Calls) -> None:
    for callback, args in calls:
        try:
            callback(*args)
        except Exception as error:  # as with separate calls: reported, and the others still run
            loop = asyncio.get_running_loop()
            loop.call_exception_handler({"message": "a gathered loop call failed", "exception": error})
