"""Prefetched: order kept, bounded look-ahead, source errors reach the consumer, close stops the source."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from facefleet.agent.pipeline.prefetch import Prefetched


def test_items_arrive_in_order_and_then_stop() -> None:
    items = Prefetched(range(100), depth=4, name="t")
    assert list(items) == list(range(100))
    with pytest.raises(StopIteration):
        next(items)
    items.close()


def test_look_ahead_is_bounded_by_depth() -> None:
    produced: list[int] = []

    def source() -> Iterator[int]:
        for i in range(50):
            produced.append(i)
            yield i

    items = Prefetched(source(), depth=3, name="t")
    time.sleep(0.3)
    # depth items queued plus at most one held by the thread waiting to put it
    assert len(produced) <= 3 + 1
    assert next(items) == 0
    items.close()


def test_an_error_in_the_source_is_raised_to_the_consumer_after_earlier_items() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("target video is corrupt")

    items = Prefetched(source(), depth=8, name="t")
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(ValueError, match="corrupt"):
        next(items)
    items.close()


def test_close_stops_an_endless_source_and_runs_its_cleanup() -> None:
    cleaned = threading.Event()

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    items = Prefetched(endless(), depth=2, name="t")
    assert next(items) == 0
    items.close()
    assert cleaned.wait(5), "the generator's cleanup did not run after close()"


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Prefetched(range(3), depth=0, name="t")
