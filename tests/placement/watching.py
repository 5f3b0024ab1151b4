"""What the rule-source tests share: waiting for a watcher to catch up, and reading its metrics."""

from __future__ import annotations

import time
from collections.abc import Callable

from facefleet.scheduler.metrics import RULES_LOAD_ERRORS, RULES_SOURCE_ERRORS
from facefleet.scheduler.rules_source import SourceError


def errors_metric() -> float:
    return RULES_LOAD_ERRORS._value.get()  # type: ignore[attr-defined,no-any-return]


def reason_count(reason: SourceError) -> float:
    return RULES_SOURCE_ERRORS.labels(reason=reason.value)._value.get()  # type: ignore[attr-defined,no-any-return]


def wait_for(predicate: Callable[[], bool], timeout: float = 1.0) -> float:
    """Seconds until `predicate()` held; AssertionError after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")
