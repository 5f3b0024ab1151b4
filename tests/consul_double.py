"""A small, faithful test double of Consul's KV HTTP API (https://developer.hashicorp.com/consul/api-docs/kv).

Implements what facefleet uses, with Consul's documented semantics:
  GET    /v1/kv/<key>[?recurse][&keys][&raw][&index=N&wait=5s]  -> 200 JSON list | 404; X-Consul-Index
  PUT    /v1/kv/<key>[?cas=N][&flags=F]                          -> "true" | "false"
  DELETE /v1/kv/<key>[?recurse][&cas=N]                          -> "true" | "false"
  GET    /v1/status/leader
Blocking queries: with `index` > 0 the request waits until the index for the queried key/prefix
passes `index`, or until `wait` (default 5m, max 10m) elapses, then answers with the current data.
The index of a query is the highest ModifyIndex under it, including deletions (tombstones).
`Value` is base64 in JSON. A real agent can stand in: tests use it when CONSUL_HTTP_ADDR is set.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MAX_WAIT_S = 600.0


@dataclass
class _Entry:
    value: bytes
    flags: int
    create_index: int
    modify_index: int


def parse_wait(text: str) -> float:
    """Consul duration (`10s`, `100ms`, `1m`) in seconds, capped at 10 minutes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not match:
        raise ValueError(f"invalid wait {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return min(float(match.group(1)) * scale, MAX_WAIT_S)


class KVStore:
    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.tombstones: dict[str, int] = {}
        self.index = 1
        self.closed = False
        self.changed = threading.Condition()

    def query_index(self, key: str, recurse: bool) -> int:
        def under(k: str) -> bool:
            return k.startswith(key) if recurse else k == key

        found = [e.modify_index for k, e in self.entries.items() if under(k)]
        found += [i for k, i in self.tombstones.items() if under(k)]
        return max(found) if found else self.index

    def put(self, key: str, value: bytes, flags: int, cas: int | None) -> bool:
        with self.changed:
            current = self.entries.get(key)
            if cas is not None:
                if cas == 0 and current is not None:
                    return False
                if cas > 0 and (current is None or current.modify_index != cas):
                    return False
            self.index += 1
            create = current.create_index if current else self.index
            self.entries[key] = _Entry(value, flags, create, self.index)
            self.tombstones.pop(key, None)
            self.changed.notify_all()
            return True

    def delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        with self.changed:
            keys = [k for k in self.entries if (k.startswith(key) if recurse else k == key)]
            if cas is not None and not recurse:
                current = self.entries.get(key)
                if current is None or current.modify_index != cas:
                    return False
            if not keys:
                return True
            self.index += 1
            for k in keys:
                del self.entries[k]
                self.tombstones[k] = self.index
            self.changed.notify_all()
            return True


class _Handler(BaseHTTPRequestHandler):
    store: KVStore  # set on the subclass per server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return

    def _send(self, status: int, body: bytes, index: int | None = None, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if index is not None:
            self.send_header("X-Consul-Index", str(index))
            self.send_header("X-Consul-KnownLeader", "true")
            self.send_header("X-Consul-LastContact", "0")
        self.end_headers()
        self.wfile.write(body)

    def _parse(self) -> tuple[str, dict[str, list[str]]] | None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        if parts.path == "/v1/status/leader":
            self._send(200, b'"127.0.0.1:8300"')
            return None
        if not parts.path.startswith("/v1/kv/"):
            self._send(404, b"unknown endpoint", ctype="text/plain")
            return None
        return unquote(parts.path[len("/v1/kv/") :]), query

    @staticmethod
    def _int(query: dict[str, list[str]], name: str) -> int | None:
        return int(query[name][0]) if name in query and query[name][0] != "" else None

    def do_GET(self) -> None:
        parsed = self._parse()
        if parsed is None:
            return
        key, query = parsed
        recurse = "recurse" in query or "keys" in query
        try:
            index = self._int(query, "index") or 0
            wait = parse_wait(query["wait"][0]) if "wait" in query else 300.0
        except ValueError as exc:
            self._send(400, str(exc).encode(), ctype="text/plain")
            return
        store = self.store
        deadline = time.monotonic() + wait
        with store.changed:
            while index > 0 and not store.closed and store.query_index(key, recurse) <= index:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                store.changed.wait(remaining)
            current = store.query_index(key, recurse)
            items = sorted((k, e) for k, e in store.entries.items() if (k.startswith(key) if recurse else k == key))
        if not items:
            self._send(404, b"", index=current)
            return
        if "keys" in query:
            self._send(200, json.dumps([k for k, _ in items]).encode(), index=current)
            return
        if "raw" in query and not recurse:
            self._send(200, items[0][1].value, index=current, ctype="application/octet-stream")
            return
        body = [
            {
                "LockIndex": 0,
                "Key": k,
                "Flags": e.flags,
                "Value": base64.b64encode(e.value).decode() if e.value else None,
                "CreateIndex": e.create_index,
                "ModifyIndex": e.modify_index,
            }
            for k, e in items
        ]
        self._send(200, json.dumps(body).encode(), index=current)

    def do_PUT(self) -> None:
        parsed = self._parse()
        if parsed is None:
            return
        key, query = parsed
        length = int(self.headers.get("Content-Length") or 0)
        value = self.rfile.read(length) if length else b""
        try:
            ok = self.store.put(key, value, self._int(query, "flags") or 0, self._int(query, "cas"))
        except ValueError as exc:
            self._send(400, str(exc).encode(), ctype="text/plain")
            return
        self._send(200, b"true" if ok else b"false")

    def do_DELETE(self) -> None:
        parsed = self._parse()
        if parsed is None:
            return
        key, query = parsed
        ok = self.store.delete(key, "recurse" in query, self._int(query, "cas"))
        self._send(200, b"true" if ok else b"false")


class _TrackingServer(ThreadingHTTPServer):
    """Remembers open connections so stop() can cut keep-alive clients off, as a dead agent would."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.open_sockets: set[socket.socket] = set()

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = super().get_request()
        self.open_sockets.add(conn)
        return conn, addr

    def handle_error(self, request: object, client_address: object) -> None:
        return  # clients cut off by stop() are expected

    def shutdown_request(self, request: object) -> None:
        self.open_sockets.discard(request)  # type: ignore[arg-type]
        super().shutdown_request(request)  # type: ignore[arg-type]


class ConsulKVDouble:
    """Run the double on 127.0.0.1 on a free port: `with ConsulKVDouble() as consul: consul.url`."""

    def __init__(self) -> None:
        self.store = KVStore()
        handler = type("BoundHandler", (_Handler,), {"store": self.store})
        self._server = _TrackingServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="consul-double", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ConsulKVDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        for conn in list(self._server.open_sockets):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with self.store.changed:  # release blocked queries so their threads end
            self.store.closed = True
            self.store.changed.notify_all()

    def __enter__(self) -> ConsulKVDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
