"""Run an iterator on a background thread, a bounded number of items ahead of its consumer.

Used to overlap video decode with the stages: the decoder thread fills a small queue while the
worker pool swaps earlier frames. Exceptions raised by the source reach the consumer in order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


class Prefetched(Generic[T]):
    """Iterate `source` on a thread named `name`, holding at most `depth` items; `close` stops it."""

    def __init__(self, source: Iterable[T], depth: int, name: str):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._items: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._source = source
        self._thread = threading.Thread(target=self._fill, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        iterator = iter(self._source)
        try:
            for item in iterator:
                if not self._put(item):
                    break
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failure(exc))
        else:
            self._put(_DONE)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a generator's finally runs here, on the thread that ran it

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = self._items.get()
        if item is _DONE:
            self._items.put(_DONE)  # stay exhausted for later calls
            raise StopIteration
        if isinstance(item, _Failure):
            self._items.put(item)
            raise item.error
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
