"""Tamper-evident audit log: append-only JSONL, every record hash-chained to the one before it.

Record: `{"seq", "at", "kind", "actor", ...kind fields..., "prev", "hash"[, "sig"]}`.
`hash` = sha256 over the canonical JSON (sorted keys, no spaces, UTF-8) of the record without
`hash` and `sig`, so it covers `prev` and `seq`; `prev` of the first record is 64 zeros.
`sig` (optional) signs `hash`: "hmac-sha256:<hex>" with a shared secret, or "ed25519:<hex>"; a signed
record also names its scheme in `signed` (covered by `hash`), so stripping the signatures shows.
Appends are serialised across threads (lock) and processes (flock on the file).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from facefleet.domain import PRIVATE_ZONE

GENESIS = "0" * 64


class AuditKind(StrEnum):
    PLACEMENT = "placement"
    DISPATCH = "dispatch"
    DISPATCH_WITHDRAWN = "dispatch_withdrawn"  # a dispatch recorded before its commit that did not commit
    COMPLETION = "completion"
    ADMIN = "admin"
    DENIAL = "denial"
    RESIDENCY_REFUSAL = "residency_refusal"
    LOCK = "lock"
    UNLOCK = "unlock"


Entry = tuple[AuditKind | str, str, Mapping[str, Any]]  # (kind, actor, fields): one record to append


class AuditLogCorrupt(RuntimeError):
    """The log's last record cannot be read, so a new record cannot be chained to it."""


# One encoder for every record: json.dumps with options builds a new encoder per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(record: dict[str, Any]) -> bytes:
    return _CANONICAL.encode(record).encode()


def record_hash(record: dict[str, Any]) -> str:
    if "hash" in record or "sig" in record:
        record = {key: value for key, value in record.items() if key not in ("hash", "sig")}
    return hashlib.sha256(canonical_json(record)).hexdigest()


# Stand-ins for a new record's hash and signature in `seal`'s one encoding (random per process).
_HASH_SLOT, _SIG_SLOT = secrets.token_hex(32), secrets.token_hex(32)


def seal(record: dict[str, Any], signer: Signer | None) -> bytes:
    """Set `record`'s `hash` (and `sig` with a signer) and return `canonical_json(record)`.

    One encoding instead of two (the record for its hash, then the record with it): the record is
    encoded once with stand-ins for both, the hashed form is that text without the two members, and
    the line is that text with the real values. A stand-in is found at the top level only when it
    occurs exactly once (nested text cannot hold the top-level member's unescaped quotes, a nested
    key can); otherwise, as for a record that already holds either key, the plain way is taken."""
    if "hash" not in record and "sig" not in record:
        slots = {"hash": _HASH_SLOT, "sig": _SIG_SLOT} if signer is not None else {"hash": _HASH_SLOT}
        text = _CANONICAL.encode({**record, **slots})
        members = [f',"{key}":"{slot}"' for key, slot in slots.items()]  # never first: "actor" < both
        if all(text.count(slot) == 1 for slot in slots.values()) and all(m in text for m in members):
            hashed = text
            for member in members:
                hashed = hashed.replace(member, "", 1)
            record["hash"] = hashlib.sha256(hashed.encode()).hexdigest()
            text = text.replace(_HASH_SLOT, record["hash"], 1)
            if signer is not None:
                record["sig"] = signer.sign(record["hash"])
                text = text.replace(f'"{_SIG_SLOT}"', _CANONICAL.encode(record["sig"]), 1)
            return text.encode()
    record["hash"] = record_hash(record)
    if signer is not None:
        record["sig"] = signer.sign(record["hash"])
    return canonical_json(record)


class Signer:
    """Signs and checks record hashes with an HMAC secret or an Ed25519 key (PEM)."""

    def __init__(
        self,
        secret: bytes | None = None,
        private_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
    ) -> None:
        self.secret = secret
        self.private_key = private_key
        self.public_key = public_key or (private_key.public_key() if private_key else None)

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """Ed25519 private or public key in PEM, or else the file's bytes as an HMAC secret."""
        if not path.is_file():
            raise FileNotFoundError(f"audit signing key {path} not found; fix [audit] signing_key or --key")
        data = path.read_bytes()
        if b"-----BEGIN" in data:
            if b"PUBLIC KEY" in data:
                public = serialization.load_pem_public_key(data)
                if not isinstance(public, Ed25519PublicKey):
                    raise ValueError(f"{path}: only Ed25519 public keys are supported for audit signatures")
                return cls(public_key=public)
            private = serialization.load_pem_private_key(data, password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise ValueError(f"{path}: only Ed25519 private keys are supported for audit signatures")
            return cls(private_key=private)
        if len(data.strip()) < 16:
            raise ValueError(f"{path}: HMAC secret is shorter than 16 bytes; use a longer random secret")
        return cls(secret=data.strip())

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable (the scheduler's audit writer process gets a copy): Ed25519 keys as raw bytes."""
        raw = serialization.Encoding.Raw
        private = (
            self.private_key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
            if self.private_key is not None
            else None
        )
        public = self.public_key.public_bytes(raw, serialization.PublicFormat.Raw) if self.public_key else None
        return (_signer_from_raw, (self.secret, private, public))

    @property
    def scheme(self) -> str:
        return "hmac-sha256" if self.secret is not None else "ed25519"

    def sign(self, digest: str) -> str:
        if self.secret is not None:
            return "hmac-sha256:" + hmac.new(self.secret, digest.encode(), hashlib.sha256).hexdigest()
        if self.private_key is not None:
            return "ed25519:" + self.private_key.sign(digest.encode()).hex()
        raise ValueError("this signer holds only a public key; it can verify, not sign")

    def check(self, digest: str, signature: str) -> bool:
        scheme, _, value = signature.partition(":")
        if scheme == "hmac-sha256" and self.secret is not None:
            expected = hmac.new(self.secret, digest.encode(), hashlib.sha256).hexdigest()
            return hmac.compare_digest(expected, value)
        if scheme == "ed25519" and self.public_key is not None:
            try:
                self.public_key.verify(bytes.fromhex(value), digest.encode())
            except (InvalidSignature, ValueError):
                return False
            return True
        return False


def _signer_from_raw(secret: bytes | None, private: bytes | None, public: bytes | None) -> Signer:
    return Signer(
        secret=secret,
        private_key=Ed25519PrivateKey.from_private_bytes(private) if private is not None else None,
        public_key=Ed25519PublicKey.from_public_bytes(public) if public is not None else None,
    )


def _read_last_line(handle: Any) -> bytes:
    """The last complete line of a binary file handle (empty when the file is empty)."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    if end == 0:
        return b""
    block, position, tail = 4096, end, b""
    while position > 0:
        step = min(block, position)
        position -= step
        handle.seek(position)
        tail = handle.read(step) + tail
        if tail.count(b"\n") >= 2 or position == 0:
            break
    lines = tail.rstrip(b"\n").split(b"\n")
    if not tail.endswith(b"\n"):
        raise AuditLogCorrupt("the last audit record is incomplete (no trailing newline)")
    return lines[-1]


class AuditLog:
    """Append-only, hash-chained audit log at `path`. Safe to share between threads and processes."""

    def __init__(
        self,
        path: Path,
        signing_key: Path | Signer | None = None,
        clock: Callable[[], float] = time.time,
        on_record: Callable[[str, int], None] | None = None,
    ) -> None:
        """`on_record(kind, count)` runs after each durable batch, once per kind in it (the serving
        process counts them)."""
        self.path = Path(path)
        self.on_record = on_record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.signer = Signer.from_file(signing_key) if isinstance(signing_key, Path) else signing_key
        self.clock = clock
        self._lock = threading.Lock()
        # (inode, size, next seq, last hash) after our last write: while the file is still exactly
        # that, the next batch chains on without re-reading and parsing the tail.
        self._tail: tuple[int, int, int, str] | None = None
        self._handle: Any = None  # kept open between batches while `path` is still that file
        self._handle_inode = 0

    def _open(self) -> Any:
        """The log's file, opened once (an open per batch cost more than the batch's records)."""
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None  # removed (or moved away): start a new log at `path`
        if self._handle is not None and inode != self._handle_inode:
            self._forget_handle()
        if self._handle is None:
            # Unbuffered: a batch is one write() call, and a failed one leaves nothing behind to
            # be written later.
            self._handle = open(self.path, "ab+", buffering=0)  # noqa: SIM115 (kept open: `close`)
            self._handle_inode = os.fstat(self._handle.fileno()).st_ino
        return self._handle

    def close(self) -> None:
        with self._lock:
            self._forget_handle()

    def _forget_handle(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None

    def append(self, kind: AuditKind | str, actor: str, **fields: Any) -> dict[str, Any]:
        """Write one record and return it. Raises AuditLogCorrupt when the tail cannot be chained."""
        return self.append_many([(kind, actor, fields)])[0]

    def append_many(self, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """Write `(kind, actor, fields)` entries in order, chained, under one lock and one fsync.

        All or nothing as far as the chain goes: the records are written together, then fsynced."""
        if not entries:
            return []
        kinds = [AuditKind(kind) for kind, _actor, _fields in entries]
        with self._lock:
            handle = self._open()
            try:
                records = self._append_locked(handle, kinds, entries)
            except BaseException:
                self._forget_handle()  # the next batch starts from a fresh open and re-reads the tail
                raise
        if self.on_record is not None:
            for kind_value, count in Counter(kind.value for kind in kinds).items():
                self.on_record(kind_value, count)
        return records

    def _append_locked(self, handle: Any, kinds: list[AuditKind], entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """`append_many`'s records, written to `handle` under the file lock (other processes append too)."""
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            stat = os.fstat(handle.fileno())
            cached = self._tail
            if cached is not None and cached[:2] == (stat.st_ino, stat.st_size):
                seq, prev = cached[2], cached[3]
                last = b""
            else:
                seq, prev = 1, GENESIS
                last = _read_last_line(handle)
            if last:
                try:
                    previous = json.loads(last)
                    seq, prev = int(previous["seq"]) + 1, str(previous["hash"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise AuditLogCorrupt(
                        f"last record of {self.path} is unreadable ({exc}); run `facefleet audit verify "
                        f"{self.path}` and restore the log from backup before writing more"
                    ) from exc
            at = dt.datetime.fromtimestamp(self.clock(), dt.UTC).isoformat(timespec="milliseconds")
            records: list[dict[str, Any]] = []
            lines: list[bytes] = []
            for kind, (_kind, actor, fields) in zip(kinds, entries, strict=True):
                record: dict[str, Any] = {"seq": seq, "at": at, "kind": kind.value, "actor": actor}
                record.update({key: value for key, value in fields.items() if key not in record})
                if self.signer is not None:
                    record["signed"] = self.signer.scheme
                record["prev"] = prev
                lines.append(seal(record, self.signer))
                records.append(record)
                seq, prev = seq + 1, record["hash"]
            # Appended wherever the read position is (the file is opened in append mode), so no seek;
            # and under the lock the file ends where `stat` said plus what this batch wrote, so no tell.
            # (Each system call hands the GIL to another thread that wants it: the dispatch path.)
            lines.append(b"")
            data = b"\n".join(lines)
            unwritten = memoryview(data)
            while unwritten:  # an unbuffered write may take less than all of it
                unwritten = unwritten[handle.write(unwritten) :]
            os.fsync(handle.fileno())
            self._tail = (stat.st_ino, stat.st_size + len(data), seq, prev)
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return records

    # Typed shortcuts: the call sites in scheduler and admin service use these.
    def placement(
        self, task: str, project: str, rule: str, pool: str, trust_zone: str, outcome: str, actor: str = "scheduler"
    ) -> dict[str, Any]:
        return self.append(
            AuditKind.PLACEMENT, actor, task=task, project=project, rule=rule, pool=pool,
            trust_zone=trust_zone, outcome=outcome,
        )  # fmt: skip

    def dispatch(
        self, task: str, project: str, pool: str, trust_zone: str, agent: str, actor: str = "scheduler"
    ) -> dict[str, Any]:
        return self.append(
            AuditKind.DISPATCH, actor, task=task, project=project, pool=pool, trust_zone=trust_zone, agent=agent
        )

    def completion(
        self, task: str, project: str, pool: str, trust_zone: str, state: str, actor: str = "scheduler"
    ) -> dict[str, Any]:
        return self.append(
            AuditKind.COMPLETION, actor, task=task, project=project, pool=pool, trust_zone=trust_zone, state=state
        )

    def admin(self, actor: str, act: str, args: dict[str, Any], outcome: str = "ok") -> dict[str, Any]:
        return self.append(AuditKind.ADMIN, actor, act=act, args=args, outcome=outcome)

    def denial(self, actor: str, method: str, required_roles: list[str], roles: list[str]) -> dict[str, Any]:
        return self.append(AuditKind.DENIAL, actor, method=method, required_roles=required_roles, roles=roles)

    def residency_refusal(self, actor: str, project: str, field: str, uri: str, message: str) -> dict[str, Any]:
        """`uri` must already be redacted (facefleet.security.residency.redact_uri)."""
        return self.append(AuditKind.RESIDENCY_REFUSAL, actor, project=project, field=field, uri=uri, message=message)

    def lock(self, actor: str, project: str, reason: str, locked: bool) -> dict[str, Any]:
        return self.append(AuditKind.LOCK if locked else AuditKind.UNLOCK, actor, project=project, reason=reason)


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    records: int
    first_bad: int | None = None  # 1-based line number of the first record that fails
    problem: str = ""
    head: str = GENESIS  # hash of the last good record: note it down as an anchor


def _shown(value: Any, limit: int = 40) -> str:
    """A record's value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad(count: int, line: int, head: str, problem: str) -> VerifyReport:
    return VerifyReport(False, count, line, f"line {line}: {problem}", head)


def verify(path: Path, signer: Signer | None = None, anchor: str | None = None) -> VerifyReport:
    """Check seq, chain, hashes (and signatures with `signer`) of every line.

    Detects an edited, deleted, inserted or reordered record and names the first bad line.
    Truncating the tail leaves a valid shorter chain: pass `anchor` (a head hash noted earlier)
    to detect that too.
    """
    path = Path(path)
    if not path.is_file():
        return VerifyReport(False, 0, None, f"audit log {path} does not exist")
    prev, count, anchor_seen = GENESIS, 0, anchor is None
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                return _bad(count, line_no, prev, "incomplete record (no trailing newline): truncated or torn write")
            record, unreadable = _parse_record(raw)
            if unreadable:
                return _bad(count, line_no, prev, f"{unreadable}: the record was edited or damaged")
            if not isinstance(record, dict) or not {"seq", "prev", "hash"} <= record.keys():
                return _bad(count, line_no, prev, "missing seq/prev/hash: not an audit record")
            if record["seq"] != line_no:
                return _bad(
                    count,
                    line_no,
                    prev,
                    f"seq {_shown(record['seq'])} where {line_no} was expected: a record before it was deleted, "
                    "inserted or moved",
                )
            if record["prev"] != prev:
                return _bad(
                    count, line_no, prev, "prev does not match the hash of the record before it: chain broken here"
                )
            if record_hash(record) != record["hash"]:
                return _bad(count, line_no, prev, "hash does not match the content: this record was edited")
            if signer is None and ("sig" in record or "signed" in record):
                return _bad(
                    count,
                    line_no,
                    prev,
                    "the record is signed but no key was given to check it: pass --key or set [audit] signing_key",
                )
            if signer is not None and not signer.check(record["hash"], str(record.get("sig", ""))):
                return _bad(
                    count,
                    line_no,
                    prev,
                    "signature missing or invalid: the record was rewritten without the signing key",
                )
            prev, count = record["hash"], count + 1
            anchor_seen = anchor_seen or prev == anchor
    if not anchor_seen:
        return VerifyReport(
            False, count, count + 1, f"anchor {anchor} not found: records after line {count} were removed", prev
        )
    return VerifyReport(True, count, None, "", prev)


def _parse_record(raw: bytes) -> tuple[Any, str]:
    """The JSON value of one line, or why it is not a record that can be hashed and printed."""
    try:
        record = json.loads(raw)
        canonical_json(record)  # lone surrogates (\\ud800) decode but cannot be hashed as UTF-8
    except RecursionError:
        return None, "JSON nested too deeply to be an audit record"
    except UnicodeError:
        return None, "text that is not valid Unicode (a lone surrogate escape)"
    except ValueError as exc:
        return None, f"not valid JSON ({exc.__class__.__name__})"
    return record, ""


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every parseable record (for queries; use verify() to trust them). None for a missing file."""
    if not Path(path).is_file():
        return
    with open(path, "rb") as handle:
        for raw in handle:
            record, unreadable = _parse_record(raw)
            if not unreadable and isinstance(record, dict):
                yield record


def _record_time(record: dict[str, Any]) -> dt.datetime | None:
    """When a record was written; a time without a UTC offset is read as UTC."""
    try:
        at = dt.datetime.fromisoformat(str(record.get("at")))
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=dt.UTC)


def query(
    path: Path, project: str | None = None, since: dt.datetime | None = None, kind: str | None = None
) -> list[dict[str, Any]]:
    """Records matching every given filter (project, not older than `since`, kind), in log order."""
    if kind is not None:
        kind = AuditKind(kind).value
    matches = []
    for record in read_records(path):
        if (
            project is not None
            and record.get("project") != project
            and (not isinstance(record.get("args"), dict) or record["args"].get("project") != project)
        ):
            continue
        if kind is not None and record.get("kind") != kind:
            continue
        if since is not None:
            at = _record_time(record)
            if at is None or at < since:
                continue
        matches.append(record)
    return matches


@dataclass
class TaskResidency:
    task: str
    pools: list[str] = field(default_factory=list)
    zones: list[str] = field(default_factory=list)  # zones it was dispatched to or completed in
    final_state: str = ""
    # Pools of dispatches withdrawn before they were sent (their commit failed). Their zones still
    # count above: the scheduler chose them, so a private task withdrawn from a cloud pool fails too.
    withdrawn: list[str] = field(default_factory=list)

    @property
    def private_only(self) -> bool:
        return all(zone == PRIVATE_ZONE for zone in self.zones)


@dataclass
class ResidencyProof:
    project: str
    chain: VerifyReport
    tasks: list[TaskResidency]
    locks: list[dict[str, Any]]
    seen: bool = True  # the project appears in the log at all (a typo'd name proves nothing)
    zone_conflicts: list[str] = field(default_factory=list)  # records whose zone contradicts the config

    @property
    def passed(self) -> bool:
        return self.chain.ok and self.seen and all(task.private_only for task in self.tasks)


RESIDENCY_KINDS = (AuditKind.PLACEMENT, AuditKind.DISPATCH, AuditKind.DISPATCH_WITHDRAWN, AuditKind.COMPLETION)


def residency_proof(
    path: Path,
    project: str,
    since: dt.datetime | None = None,
    signer: Signer | None = None,
    pool_zones: Mapping[str, str] | None = None,
) -> ResidencyProof:
    """Every task of `project` and the trust zones it ran in; passes only if the chain verifies,
    the project appears in the log, and every dispatch and completion was in the private zone.
    Placements that never ran do not count; a dispatch withdrawn before it was sent does (listed
    in `withdrawn`). `pool_zones` (the configured pools): a pool listed
    there is in that zone whatever a record says."""
    chain = verify(path, signer)
    pool_zones = pool_zones or {}
    tasks: dict[str, TaskResidency] = {}
    locks = []
    conflicts: list[str] = []
    records = query(path, project=project)
    seen = bool(records)
    if since is not None:
        records = [r for r in records if (at := _record_time(r)) is not None and at >= since]
    for record in records:
        kind = record.get("kind")
        if kind in (AuditKind.LOCK, AuditKind.UNLOCK):
            locks.append(record)
            continue
        task_id = record.get("task")
        if not task_id or kind not in RESIDENCY_KINDS:
            continue
        entry = tasks.setdefault(str(task_id), TaskResidency(task=str(task_id)))
        if kind == AuditKind.DISPATCH_WITHDRAWN:
            entry.withdrawn.append(str(record.get("pool", "")))
        if kind in (AuditKind.DISPATCH, AuditKind.COMPLETION, AuditKind.DISPATCH_WITHDRAWN):
            pool, zone = str(record.get("pool", "")), str(record.get("trust_zone", ""))
            configured = pool_zones.get(pool)
            if configured is not None and configured != zone:
                conflicts.append(f"seq {record.get('seq')}: pool {pool} is configured {configured}, record says {zone}")
                zone = configured
            if pool and pool not in entry.pools:
                entry.pools.append(pool)
            if zone not in entry.zones:
                entry.zones.append(zone)
        if kind == AuditKind.COMPLETION:
            entry.final_state = str(record.get("state", ""))
    return ResidencyProof(project, chain, list(tasks.values()), locks, seen, conflicts)
