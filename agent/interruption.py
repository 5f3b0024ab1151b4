"""Spot interruption notices, read on the instance itself by the agent.

AWS: IMDSv2 — `PUT /latest/api/token`, then `GET /latest/meta-data/spot/instance-action`
(404 while no interruption is scheduled; about two minutes of warning).
Azure: Scheduled Events — `GET /metadata/scheduledevents?api-version=2020-07-01` with
`Metadata: true`; a `Preempt` event is a spot eviction (about 30 s of warning).

`InterruptionMonitor` polls a watcher in a daemon thread and calls back once, within one poll
interval of the notice. The agent's callback should: set `preempting` in heartbeats, checkpoint
running tasks, report them PREEMPTED and drain.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import requests
import structlog

log = structlog.get_logger()

METADATA_BASE_URL = "http://169.254.169.254"


@dataclass(frozen=True)
class InterruptionNotice:
    provider: str
    action: str  # aws: terminate | stop | hibernate; azure: Preempt
    not_before: datetime | None
    event_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


class InterruptionWatcher(Protocol):
    def poll(self) -> InterruptionNotice | None: ...


class MetadataUnavailableError(RuntimeError):
    """The instance metadata endpoint did not answer as documented."""


class AwsInterruptionWatcher:
    TOKEN_TTL_S = 21600

    def __init__(self, metadata_base_url: str = METADATA_BASE_URL, timeout_s: float = 1.0) -> None:
        self._base = metadata_base_url.rstrip("/")
        self._timeout = timeout_s
        self._session = requests.Session()
        self._token: str | None = None
        self._token_expires = 0.0

    def _fetch_token(self) -> str:
        now = time.monotonic()
        if self._token is None or now >= self._token_expires:
            response = self._session.put(
                f"{self._base}/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)},
                timeout=self._timeout,
            )
            if response.status_code != 200:
                raise MetadataUnavailableError(
                    f"IMDSv2 token request to {self._base} answered {response.status_code}; "
                    "is the instance metadata service enabled with http-tokens=required|optional?"
                )
            self._token = response.text.strip()
            self._token_expires = now + self.TOKEN_TTL_S - 60
        return self._token

    def poll(self) -> InterruptionNotice | None:
        for _attempt in range(2):
            response = self._session.get(
                f"{self._base}/latest/meta-data/spot/instance-action",
                headers={"X-aws-ec2-metadata-token": self._fetch_token()},
                timeout=self._timeout,
            )
            if response.status_code == 401:  # token expired or revoked: fetch a new one once
                self._token = None
                continue
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise MetadataUnavailableError(f"spot/instance-action answered {response.status_code}")
            body = response.json()
            not_before = None
            if body.get("time"):
                not_before = datetime.fromisoformat(str(body["time"]).replace("Z", "+00:00"))
            return InterruptionNotice("aws", str(body.get("action", "terminate")), not_before, raw=body)
        raise MetadataUnavailableError("IMDSv2 rejected a fresh token twice")


class AzureScheduledEventsWatcher:
    API_VERSION = "2020-07-01"

    def __init__(self, base_url: str = METADATA_BASE_URL, vm_name: str | None = None, timeout_s: float = 1.0) -> None:
        self._url = f"{base_url.rstrip('/')}/metadata/scheduledevents"
        self._vm_name = vm_name
        self._timeout = timeout_s
        self._session = requests.Session()

    def poll(self) -> InterruptionNotice | None:
        response = self._session.get(
            self._url,
            params={"api-version": self.API_VERSION},
            headers={"Metadata": "true"},
            timeout=self._timeout,
        )
        if response.status_code != 200:
            raise MetadataUnavailableError(f"scheduled events at {self._url} answered {response.status_code}")
        for event in response.json().get("Events", []):
            if event.get("EventType") != "Preempt":
                continue
            resources = event.get("Resources") or []
            if self._vm_name and resources and self._vm_name not in resources:
                continue
            not_before = None
            if event.get("NotBefore"):
                not_before = parsedate_to_datetime(str(event["NotBefore"])).astimezone(UTC)
            return InterruptionNotice("azure", "Preempt", not_before, event_id=event.get("EventId"), raw=event)
        return None

    def acknowledge(self, event_id: str) -> None:
        """Approve the event so Azure may proceed early (call once the checkpoint is written)."""
        self._session.post(
            self._url,
            params={"api-version": self.API_VERSION},
            headers={"Metadata": "true"},
            json={"StartRequests": [{"EventId": event_id}]},
            timeout=self._timeout,
        ).raise_for_status()


class InterruptionMonitor:
    """Polls a watcher every `interval_s` in a daemon thread; calls `on_notice` once, then stops."""

    def __init__(
        self,
        watcher: InterruptionWatcher,
        on_notice: Callable[[InterruptionNotice], None],
        interval_s: float = 1.0,
    ) -> None:
        self._watcher = watcher
        self._on_notice = on_notice
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.notice: InterruptionNotice | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="facefleet-interruption", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                notice = self._watcher.poll()
                failures = 0
            except (requests.RequestException, MetadataUnavailableError, ValueError) as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("interruption_poll_failed", error=str(exc), failures=failures)
                notice = None
            if notice is not None:
                self.notice = notice
                log.warning(
                    "spot_interruption_notice",
                    provider=notice.provider,
                    action=notice.action,
                    not_before=notice.not_before.isoformat() if notice.not_before else None,
                )
                try:
                    self._on_notice(notice)
                except Exception as exc:  # the callback's failure must be visible, not silent
                    log.error("interruption_callback_failed", error=str(exc))
                return
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
