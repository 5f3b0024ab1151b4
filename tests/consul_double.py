"""A small, faithful test double of Consul's KV HTTP API (https://developer.hashicorp.com/consul/api-docs/kv).

Implements what facefleet uses, with the semantics of Consul's docs and source (agent/http.go,
agent/kvs_endpoint.go, agent/consul/kvs_endpoint.go):
  GET    /v1/kv/<key>[?recurse][&keys][&raw][&index=N&wait=5s][&dc=]  -> 200 JSON list | 404; X-Consul-Index
  PUT    /v1/kv/<key>[?cas=N][&flags=F]                               -> true | false
  DELETE /v1/kv/<key>[?recurse][&cas=N]                               -> true | false
  GET    /v1/status/leader
Blocking queries: with `index` > 0 the request waits until the index of the queried key/prefix
passes `index`, or until `wait` (default 5m, max 10m, plus up to wait/16 jitter) elapses, then
answers with the current data. `wait` is a Go duration: `5` without a unit is `400 Invalid wait
time`, as `time.ParseDuration` refuses it. The index of a query is the highest ModifyIndex under
it, including deletions (tombstones). `Value` is base64 in JSON.

Dev mode (`consul agent -dev`, what deploy/compose.yaml runs) pretty-prints every JSON answer and
ends it with a newline: a PUT answers `true\\n`. `dev_mode=False` answers compact JSON (`true`).

ACLs (`acl={token: {key_prefix: "read"|"write"|"deny"}}`, default policy deny): the token comes
from `X-Consul-Token`, `Authorization: Bearer` or `?token=`; an unknown token is `403 ACL not
found`; reading one key or writing without permission is `403 Permission denied`; a listing
(`?recurse`, `?keys`) drops what the token may not read, answers 404 when nothing is left, and
sets `X-Consul-Results-Filtered-By-ACLs: true` when it dropped anything, for a token other than
the anonymous one (Consul hides the header from anonymous callers).

Faults a real cluster produces, on demand: `inject(status, body)` answers the next KV request(s)
with an error (500 no leader, 429 rate limit, or a proxy's HTML page), optionally after a delay;
`restore_snapshot()` renumbers the store to lower indexes and wakes every blocked query, as a
snapshot restore does, so X-Consul-Index goes backwards. `?dc=` other than `datacenter` is
`500 No path to datacenter`. TLS: pass `tls=DoubleTLS(...)` to serve HTTPS, with
`verify_incoming=True` to require a client certificate signed by the CA; plain HTTP on that port
gets Go's `400 Client sent an HTTP request to an HTTPS server.`

A real agent can stand in: tests use it when CONSUL_HTTP_ADDR is set.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

MAX_WAIT_S = 600.0
DEFAULT_WAIT_S = 300.0
ANONYMOUS = "anonymous"
PLAIN_HTTP_TO_HTTPS = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
_GO_DURATION = re.compile(r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_wait(text: str) -> float:
    """A Go duration (`10s`, `100ms`, `1m30s`) in seconds, as time.ParseDuration reads it; `0` is
    the one value without a unit. ValueError otherwise. Capped at Consul's 10 minutes."""
    text = text.strip()
    if text in ("0", "+0", "-0"):
        return 0.0
    if not _GO_DURATION.fullmatch(text):
        raise ValueError(f"invalid duration {text!r}")
    seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))
    return min(-seconds if text.startswith("-") else seconds, MAX_WAIT_S)


@dataclass
class _Entry:
    value: bytes
    flags: int
    create_index: int
    modify_index: int


@dataclass
class Fault:
    methods: tuple[str, ...]
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DoubleTLS:
    """Server certificate and key, and the CA that client certificates must chain to."""

    cert: Path
    key: Path
    ca: Path
    verify_incoming: bool = True


class KVStore:
    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.tombstones: dict[str, int] = {}
        self.index = 1
        self.generation = 0  # bumped by a snapshot restore: blocked queries answer at once
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

    def restore_snapshot(self) -> None:
        """Renumber every entry from index 2 upwards (lower than before) and wake blocked queries."""
        with self.changed:
            for number, entry in enumerate(sorted(self.entries.values(), key=lambda e: e.modify_index), start=2):
                entry.create_index = entry.modify_index = number
            self.tombstones.clear()
            self.index = 1 + len(self.entries)
            self.generation += 1
            self.changed.notify_all()


class ACL:
    """Key ACL rules per token, longest `key_prefix` wins, default deny (Consul's `key_prefix` rules)."""

    def __init__(self, tokens: dict[str, dict[str, str]]) -> None:
        self.tokens = tokens

    def policy(self, token: str, key: str) -> str:
        rules = self.tokens.get(token, {})
        matches = [prefix for prefix in rules if key.startswith(prefix)]
        return rules[max(matches, key=len)] if matches else "deny"

    def can_read(self, token: str, key: str) -> bool:
        return self.policy(token, key) in ("read", "write")

    def can_write(self, token: str, key: str) -> bool:
        return self.policy(token, key) == "write"


class _Handler(BaseHTTPRequestHandler):
    double: ConsulKVDouble  # set on the subclass per server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return

    def setup(self) -> None:
        context = self.double.tls_context
        if context is not None:  # TLS here, not in the accept loop: a bad client stalls only itself
            self.request.settimeout(5)
            if self.request.recv(1, socket.MSG_PEEK) != b"\x16":  # not a TLS handshake record
                self.request.sendall(PLAIN_HTTP_TO_HTTPS)  # what Go's net/http answers, then hangs up
                raise ConnectionAbortedError("plain HTTP on the HTTPS port")
            self.request = context.wrap_socket(self.request, server_side=True)
            self.request.settimeout(None)
            self.double.track(self.request)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if isinstance(self.request, ssl.SSLSocket):
                self.double.untrack(self.request)
                self.request.close()

    def _json(self, value: Any) -> bytes:
        if self.double.dev_mode:  # agent/http.go marshalJSON: MarshalIndent(obj, "", "    ") + "\n"
            return (json.dumps(value, indent=4) + "\n").encode()
        return json.dumps(value, separators=(",", ":")).encode()

    def _send(
        self,
        status: int,
        body: bytes,
        index: int | None = None,
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if index is not None:
            self.send_header("X-Consul-Index", str(index))
            self.send_header("X-Consul-KnownLeader", "true")
            self.send_header("X-Consul-LastContact", "0")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), ctype="text/plain; charset=utf-8")

    def _token(self, query: dict[str, list[str]]) -> str:
        bearer = self.headers.get("Authorization", "")
        given = (
            (query.get("token") or [""])[0]
            or self.headers.get("X-Consul-Token", "")
            or (bearer[len("Bearer ") :] if bearer.startswith("Bearer ") else "")
        )
        return given or ANONYMOUS

    def _parse(self) -> tuple[str, dict[str, list[str]], str] | None:
        """(key, query, token) for a KV request; None when it was answered here already."""
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        if parts.path == "/v1/status/leader":
            self._send(200, self._json("127.0.0.1:8300"))
            return None
        if not parts.path.startswith("/v1/kv/"):
            self._send(404, b"", ctype="text/plain")
            return None
        fault = self.double.next_fault(self.command)
        if fault is not None:
            if fault.delay_s:
                time.sleep(fault.delay_s)
            self._send(fault.status, fault.body, ctype=fault.content_type, headers=fault.headers)
            return None
        dc = (query.get("dc") or [""])[0]
        if dc and dc != self.double.datacenter:
            self._text(500, "No path to datacenter")
            return None
        token = self._token(query)
        acl = self.double.acl
        if acl is not None and token != ANONYMOUS and token not in acl.tokens:
            self._text(403, "ACL not found")
            return None
        return unquote(parts.path[len("/v1/kv/") :]), query, token

    @staticmethod
    def _int(query: dict[str, list[str]], name: str) -> int | None:
        return int(query[name][0]) if name in query and query[name][0] != "" else None

    def do_GET(self) -> None:
        parsed = self._parse()
        if parsed is None:
            return
        key, query, token = parsed
        listing = "recurse" in query or "keys" in query
        try:
            wait = parse_wait(query["wait"][0]) if query.get("wait", [""])[0] else DEFAULT_WAIT_S
        except ValueError:
            self._text(400, "Invalid wait time")
            return
        try:
            index = int(query["index"][0]) if query.get("index", [""])[0] else 0
            if index < 0:
                raise ValueError(index)
        except ValueError:
            self._text(400, "Invalid index")
            return
        acl = self.double.acl
        if acl is not None and not listing and not acl.can_read(token, key):
            self._text(403, "Permission denied")
            return
        store = self.double.store
        wait += random.uniform(0, wait / 16)  # Consul spreads wake-ups by up to wait/16
        deadline = time.monotonic() + wait
        with store.changed:
            generation = store.generation
            while index > 0 and not store.closed and store.query_index(key, listing) <= index:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or store.generation != generation:
                    break
                store.changed.wait(remaining)
            current = store.query_index(key, listing)
            items = sorted((k, e) for k, e in store.entries.items() if (k.startswith(key) if listing else k == key))
        headers: dict[str, str] = {}
        if acl is not None and listing:
            readable = [(k, e) for k, e in items if acl.can_read(token, k)]
            if len(readable) != len(items) and token != ANONYMOUS:
                headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
            items = readable
        if not items:
            self._send(404, b"", index=current, headers=headers)
            return
        if "keys" in query:
            self._send(200, self._json([k for k, _ in items]), index=current, headers=headers)
            return
        if "raw" in query and not listing:
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
        self._send(200, self._json(body), index=current, headers=headers)

    def _allowed_to_write(self, token: str, key: str) -> bool:
        acl = self.double.acl
        if acl is None or acl.can_write(token, key):
            return True
        self._text(403, "Permission denied")
        return False

    def do_PUT(self) -> None:
        parsed = self._parse()
        if parsed is None:
            return
        key, query, token = parsed
        length = int(self.headers.get("Content-Length") or 0)
        value = self.rfile.read(length) if length else b""
        if not self._allowed_to_write(token, key):
            return
        try:
            ok = self.double.store.put(key, value, self._int(query, "flags") or 0, self._int(query, "cas"))
        except ValueError as exc:
            self._text(400, str(exc))
            return
        self._send(200, self._json(ok))

    def do_DELETE(self) -> None:
        parsed = self._parse()
        if parsed is None:
            return
        key, query, token = parsed
        if not self._allowed_to_write(token, key):
            return
        ok = self.double.store.delete(key, "recurse" in query, self._int(query, "cas"))
        self._send(200, self._json(ok))


class _TrackingServer(ThreadingHTTPServer):
    """Remembers open connections so stop() can cut keep-alive clients off, as a dead agent would."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        with self.sockets_lock:
            self.open_sockets.add(conn)
        return conn, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # clients cut off by stop(), and failed TLS handshakes, are expected

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class ConsulKVDouble:
    """Run the double on 127.0.0.1 on a free port: `with ConsulKVDouble() as consul: consul.url`."""

    def __init__(
        self,
        *,
        acl: dict[str, dict[str, str]] | None = None,
        dev_mode: bool = True,
        datacenter: str = "dc1",
        tls: DoubleTLS | None = None,
    ) -> None:
        self.store = KVStore()
        self.acl = ACL(acl) if acl is not None else None
        self.dev_mode = dev_mode
        self.datacenter = datacenter
        self.tls = tls
        self._faults: list[Fault] = []
        self._faults_lock = threading.Lock()
        self.tls_context: ssl.SSLContext | None = None
        if tls is not None:
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(tls.cert, tls.key)
            if tls.verify_incoming:
                self.tls_context.verify_mode = ssl.CERT_REQUIRED
                self.tls_context.load_verify_locations(tls.ca)
        handler = type("BoundHandler", (_Handler,), {"double": self})
        self._server = _TrackingServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="consul-double", daemon=True)

    @property
    def address(self) -> str:
        """host:port, as CONSUL_HTTP_ADDR takes it."""
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def inject(
        self,
        status: int,
        body: bytes | str = b"",
        *,
        times: int = 1,
        delay_s: float = 0.0,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
        methods: tuple[str, ...] = ("GET",),
    ) -> None:
        """Answer the next `times` KV requests of `methods` with `status` and `body` (after `delay_s`)."""
        data = body.encode() if isinstance(body, str) else body
        fault = Fault(methods, status, data, content_type, delay_s, dict(headers or {}))
        with self._faults_lock:
            self._faults.extend([fault] * times)

    def next_fault(self, method: str) -> Fault | None:
        with self._faults_lock:
            for position, fault in enumerate(self._faults):
                if method in fault.methods:
                    return self._faults.pop(position)
            return None

    def restore_snapshot(self) -> None:
        self.store.restore_snapshot()

    def track(self, conn: socket.socket) -> None:
        with self._server.sockets_lock:
            self._server.open_sockets.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._server.sockets_lock:
            self._server.open_sockets.discard(conn)

    def start(self) -> ConsulKVDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._server.sockets_lock:
            open_sockets = list(self._server.open_sockets)
        for conn in open_sockets:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with self.store.changed:  # release blocked queries so their threads end
            self.store.closed = True
            self.store.changed.notify_all()

    def __enter__(self) -> ConsulKVDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
