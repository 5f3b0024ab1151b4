"""The rule-source interface and the last-known-good bookkeeping both sources share."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import structlog

from facefleet.scheduler.metrics import RULES_LOAD_ERRORS, RULES_SOURCE_ERRORS, RULES_VERSION
from facefleet.scheduler.placement.model import Budget, RuleSet
from facefleet.scheduler.placement.policy import FALLBACK_RULESET

log = structlog.get_logger()


class SourceError(StrEnum):
    """Why a rules source could not give a new config: the `reason` label of
    facefleet_rules_source_errors_total and `ActiveConfig.error_reason`."""

    INVALID = "invalid"  # a document failed validation
    MISSING = "missing"  # the rules document is not there
    UNREADABLE = "unreadable"  # policy files could not be read
    UNREACHABLE = "unreachable"  # no connection (refused, DNS, reset)
    TIMEOUT = "timeout"  # connected, but no answer in time
    TLS = "tls"  # handshake or certificate check failed, or TLS files unusable
    FORBIDDEN = "forbidden"  # 403: token unknown, or lacks the permission
    ACL_FILTERED = "acl_filtered"  # the token may not read (part of) the prefix: Consul filtered it
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx (no leader, unknown datacenter, ...)
    BAD_REQUEST = "bad_request"  # another 4xx
    BAD_REPLY = "bad_reply"  # an answer that is not Consul's (a proxy's login page, no index)
    INDEX_RESET = "index_reset"  # X-Consul-Index went backwards: the watch starts over
    INTERNAL = "internal"  # a bug in facefleet; logged with its traceback


def count_source_error(reason: SourceError) -> None:
    RULES_SOURCE_ERRORS.labels(reason=reason.value).inc()


@dataclass(frozen=True)
class ActiveConfig:
    """What placement uses now. `errors` describe the latest rejected load (empty when it was accepted);
    `error_reason` is its SourceError value."""

    ruleset: RuleSet
    budgets: dict[str, Budget] = field(default_factory=dict)
    locks: dict[str, str] = field(default_factory=dict)
    version: str = ""
    errors: tuple[str, ...] = ()
    source: str = ""
    error_reason: str = ""

    @property
    def is_fallback(self) -> bool:
        return self.ruleset is FALLBACK_RULESET


class RuleSource(Protocol):
    def current(self) -> ActiveConfig: ...
    def reload(self) -> ActiveConfig: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def subscribe(self, callback: Callable[[ActiveConfig], None]) -> None: ...
    def set_budget(self, name: str, monthly_cap_usd: float, alert_pct: float) -> None: ...
    def set_lock(self, project: str, reason: str, by: str) -> None: ...
    def remove_lock(self, project: str) -> None: ...


def config_version(ruleset: RuleSet, budgets: Mapping[str, Budget], locks: Mapping[str, str]) -> str:
    """Rules hash plus a short hash of budgets and locks, so any effective change gets a new version."""
    import hashlib
    import json

    extra = json.dumps(
        {
            "budgets": {n: [b.monthly_cap_usd, b.alert_pct] for n, b in sorted(budgets.items())},
            "locks": dict(sorted(locks.items())),
        },
        sort_keys=True,
    )
    return f"{ruleset.version}-{hashlib.sha256(extra.encode()).hexdigest()[:8]}"


class LastKnownGood:
    """Holds the active config; accepts valid candidates, keeps the previous one on failures.

    Thread-safe. Updates the rules metrics and notifies subscribers when the version changes.
    """

    def __init__(self, source: str) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[ActiveConfig], None]] = []
        self._active = ActiveConfig(
            ruleset=FALLBACK_RULESET,
            version=FALLBACK_RULESET.version,
            errors=("no rule set loaded yet: built-in private-only fallback active",),
            source=source,
            error_reason=SourceError.MISSING.value,
        )
        RULES_VERSION.info({"version": self._active.version, "source": source, "fallback": "true"})

    @property
    def active(self) -> ActiveConfig:
        return self._active

    def subscribe(self, callback: Callable[[ActiveConfig], None]) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def accept(self, ruleset: RuleSet, budgets: dict[str, Budget], locks: dict[str, str], source: str) -> ActiveConfig:
        version = config_version(ruleset, budgets, locks)
        with self._lock:
            changed = version != self._active.version or self._active.errors
            self._active = ActiveConfig(ruleset, budgets, locks, version, (), source)
            subscribers = list(self._subscribers)
            active = self._active
        if changed:
            RULES_VERSION.info({"version": version, "source": source, "fallback": "false"})
            log.info("rules_applied", version=version, source=source, rules=len(ruleset.rules))
            for callback in subscribers:
                try:
                    callback(active)
                except Exception:  # a subscriber bug must not stop the watcher
                    log.exception("rules_subscriber_failed", version=version)
        return active

    def reject(self, errors: list[str], source: str, reason: SourceError = SourceError.INVALID) -> ActiveConfig:
        """Keep the active config, record why the candidate (or the read) failed."""
        RULES_LOAD_ERRORS.inc()
        count_source_error(reason)
        with self._lock:
            prior = self._active
            self._active = ActiveConfig(
                prior.ruleset, prior.budgets, prior.locks, prior.version, tuple(errors), prior.source, reason.value
            )
            active = self._active
        log.warning("rules_rejected", source=source, reason=reason.value, errors=errors, keeping=prior.version)
        return active


class WatchedSource:
    """What both sources share: last-known-good state, subscriptions, and one watch thread.

    Subclasses set `_state`, implement `reload()` and `_watch()` (which loops until `_stop` is
    set), and name their thread with `watch_thread_name`.
    """

    watch_thread_name = "rules-watch"
    stop_join_timeout_s = 5.0
    _state: LastKnownGood

    def __init__(self) -> None:
        self._loaded = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self) -> ActiveConfig:
        raise NotImplementedError

    def _watch(self) -> None:
        raise NotImplementedError

    def current(self) -> ActiveConfig:
        if not self._loaded:
            return self.reload()
        return self._state.active

    def subscribe(self, callback: Callable[[ActiveConfig], None]) -> None:
        self._state.subscribe(callback)

    def start(self) -> None:
        if self._thread is not None:
            return
        self.current()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name=self.watch_thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.stop_join_timeout_s)
