"""Interruption watchers against a local instance-metadata server (IMDSv2 and Azure Scheduled Events)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from facefleet.agent.interruption import (
    AwsInterruptionWatcher,
    AzureScheduledEventsWatcher,
    InterruptionMonitor,
    InterruptionNotice,
)


@dataclass
class Metadata:
    instance_action: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    tokens_issued: int = 0
    acknowledged: list[Any] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)


class MetadataHandler(BaseHTTPRequestHandler):
    md: Metadata

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: str = "", content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self.md.tokens_issued += 1
            token = f"token-{self.md.tokens_issued}"
            self.md.valid_tokens.add(token)
            return self._send(200, token)
        self._send(400, "missing TTL header")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") not in self.md.valid_tokens:
                return self._send(401)
            if self.md.instance_action is None:
                return self._send(404, "Not Found")
            return self._send(200, json.dumps(self.md.instance_action), "application/json")
        if url.path == "/metadata/scheduledevents":
            if self.headers.get("Metadata") != "true" or parse_qs(url.query).get("api-version") != ["2020-07-01"]:
                return self._send(400, '{"error": "Bad request"}', "application/json")
            body = {"DocumentIncarnation": len(self.md.events), "Events": self.md.events}
            return self._send(200, json.dumps(body), "application/json")
        self._send(404)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.md.acknowledged.append(json.loads(self.rfile.read(length)))
        self._send(200)


@pytest.fixture
def metadata() -> Iterator[tuple[Metadata, str]]:
    md = Metadata()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (MetadataHandler,), {"md": md}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield md, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_aws_watcher_reads_instance_action_with_imdsv2_token(metadata: tuple[Metadata, str]) -> None:
    md, base = metadata
    watcher = AwsInterruptionWatcher(base)
    assert watcher.poll() is None
    assert watcher.poll() is None
    assert md.tokens_issued == 1  # token reused until it expires

    md.instance_action = {"action": "terminate", "time": "2026-11-21T12:02:00Z"}
    notice = watcher.poll()
    assert notice == InterruptionNotice(
        "aws", "terminate", datetime(2026, 11, 21, 12, 2, tzinfo=UTC), raw=md.instance_action
    )

    md.valid_tokens.clear()  # token revoked: the watcher fetches a new one and retries
    assert watcher.poll() is not None
    assert md.tokens_issued == 2


def test_monitor_fires_within_two_seconds_of_the_notice(metadata: tuple[Metadata, str]) -> None:
    md, base = metadata
    fired = threading.Event()
    received: list[InterruptionNotice] = []

    def on_notice(notice: InterruptionNotice) -> None:
        received.append(notice)
        fired.set()

    monitor = InterruptionMonitor(AwsInterruptionWatcher(base), on_notice, interval_s=0.5)
    monitor.start()
    try:
        time.sleep(1.0)
        assert not fired.is_set()
        md.instance_action = {"action": "terminate", "time": "2026-11-21T12:02:00Z"}
        posted = time.monotonic()
        assert fired.wait(2.0), "no callback within 2 s of the instance-action notice"
        assert time.monotonic() - posted < 2.0
        time.sleep(0.6)
        assert len(received) == 1  # called once
    finally:
        monitor.stop()


def test_monitor_survives_an_unreachable_endpoint() -> None:
    calls: list[InterruptionNotice] = []
    monitor = InterruptionMonitor(AwsInterruptionWatcher("http://127.0.0.1:9", timeout_s=0.2), calls.append, 0.05)
    monitor.start()
    time.sleep(0.5)
    monitor.stop()
    assert calls == []


def test_azure_watcher_reports_preempt_for_this_vm_only(metadata: tuple[Metadata, str]) -> None:
    md, base = metadata
    watcher = AzureScheduledEventsWatcher(base, vm_name="ff-abc")
    assert watcher.poll() is None
    md.events = [
        {
            "EventId": "602d9444-d2cd-49c7-8624-8643e7171297",
            "EventType": "Reboot",
            "ResourceType": "VirtualMachine",
            "Resources": ["ff-abc"],
            "EventStatus": "Scheduled",
            "NotBefore": "Sat, 21 Nov 2026 12:10:00 GMT",
            "Description": "",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        },
        {
            "EventId": "1b2c3d4e-0000-4c7a-9e5f-0b1a2c3d4e5f",
            "EventType": "Preempt",
            "ResourceType": "VirtualMachine",
            "Resources": ["ff-other"],
            "EventStatus": "Scheduled",
            "NotBefore": "Sat, 21 Nov 2026 12:00:30 GMT",
            "Description": "",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        },
    ]
    assert watcher.poll() is None  # a reboot, and a preempt of another VM
    md.events.append({**md.events[1], "EventId": "a7f0", "Resources": ["ff-abc"]})
    notice = watcher.poll()
    assert notice is not None
    assert (notice.provider, notice.action, notice.event_id) == ("azure", "Preempt", "a7f0")
    assert notice.not_before == datetime(2026, 11, 21, 12, 0, 30, tzinfo=UTC)
    watcher.acknowledge("a7f0")
    assert md.acknowledged == [{"StartRequests": [{"EventId": "a7f0"}]}]
