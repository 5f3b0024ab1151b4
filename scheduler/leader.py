"""Exactly one dispatching scheduler per database: the leader lock.

PostgreSQL: a session-level `pg_try_advisory_lock` held on a dedicated connection. A watcher thread
confirms every `check_interval_s` that this session still holds it (the connection can die: server
restart, `pg_terminate_backend`, network loss); on loss it reports `is_leader=False`, reconnects and
tries to take the lock again. `is_leader` also turns False by itself when no check has succeeded for
`lease_s`, so a hung connection cannot keep a replica believing it leads.

SQLite: an exclusive `fcntl.flock` on `<db path>.leader`; the kernel drops it when the holder dies.

Leadership can overlap by up to `lease_s` after a connection loss (the old leader has not noticed
yet), so dispatch must still be fenced by the store's state transitions; the lock narrows the window,
it does not replace compare-and-set.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import NullPool

from facefleet.scheduler import metrics

log = structlog.get_logger()

DEFAULT_LOCK_NAME = "facefleet-scheduler"
LeaderCallback = Callable[[bool], None]


class LeaderLock(ABC):
    """Try to lead; watch leadership in the background; tell callbacks when it changes."""

    def __init__(self, name: str, check_interval_s: float = 1.0, lease_s: float = 2.0) -> None:
        self.name = name
        self.check_interval_s = check_interval_s
        self.lease_s = lease_s
        self._held = False
        self._confirmed_at = 0.0
        self._callbacks: list[LeaderCallback] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def for_url(store_url: str, name: str = DEFAULT_LOCK_NAME, check_interval_s: float = 1.0) -> LeaderLock:
        """The lock matching the store: PostgreSQL advisory lock or SQLite lock file."""
        url = make_url(store_url)
        backend = url.get_backend_name()
        if backend == "postgresql":
            return PostgresLeaderLock(store_url, name, check_interval_s=check_interval_s)
        if backend == "sqlite":
            database = url.database or ""
            if database in ("", ":memory:"):
                return ProcessLeaderLock(name)
            return FileLeaderLock(Path(database).with_name(Path(database).name + ".leader"), name)
        raise ValueError(
            f"store URL {store_url!r}: no leader lock for backend {backend!r}; "
            "use postgresql+psycopg://... or sqlite:///path"
        )

    @property
    def is_leader(self) -> bool:
        # No lock here: a check hung on the network holds it, and this must answer at once.
        if not self._held:
            return False
        watched = self._thread is not None
        return not watched or time.monotonic() - self._confirmed_at <= self.lease_s

    def on_change(self, callback: LeaderCallback) -> None:
        """Call `callback(is_leader)` from the watcher thread whenever leadership changes."""
        with self._lock:
            self._callbacks.append(callback)

    def try_acquire(self) -> bool:
        """Take the lock now if it is free; True when this instance leads afterwards."""
        with self._lock:
            if self._held:
                return self._confirm()
            acquired = self._acquire()
            if acquired:
                self._set_held(True)
            return acquired

    def start(self) -> LeaderLock:
        """Start the watcher thread (tries to acquire at once, then every check interval)."""
        with self._lock:
            if self._thread is None:
                self._stopping.clear()
                self._thread = threading.Thread(target=self._watch, name=f"leader-{self.name}", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching and release the lock."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.check_interval_s + 5)
        self._thread = None
        with self._lock:
            self._release()
            self._set_held(False)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            pause = self.check_interval_s
            try:
                with self._lock:
                    if self._held and not self._confirm():
                        self._set_held(False)  # stop dispatching first, then clean up
                        self._release()
                        # Give the healthy replicas a round to take over before trying again.
                        pause = 2 * self.check_interval_s
                    elif not self._held and self._acquire():
                        self._set_held(True)
            except Exception as error:  # the watcher must survive anything the database does
                log.warning("leader lock check failed", lock=self.name, error=f"{type(error).__name__}: {error}")
                with self._lock:
                    self._release()
                    self._set_held(False)
            self._stopping.wait(pause)

    def _set_held(self, held: bool) -> None:
        changed = held != self._held
        self._held = held
        if held:
            self._confirmed_at = time.monotonic()
        metrics.LEADER.set(1 if held else 0)
        if not changed:
            return
        log.info("leadership changed", lock=self.name, leader=held)
        for callback in list(self._callbacks):
            try:
                callback(held)
            except Exception as error:
                log.error("leader on_change callback failed", lock=self.name, error=repr(error))

    def _confirm(self) -> bool:
        """True when the lock is still held; refreshes the lease."""
        if self._still_held():
            self._confirmed_at = time.monotonic()
            return True
        return False

    @abstractmethod
    def _acquire(self) -> bool: ...

    @abstractmethod
    def _still_held(self) -> bool: ...

    @abstractmethod
    def _release(self) -> None: ...


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for `name` (pg advisory locks take a bigint)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def psycopg_url(store_url: str) -> str:
    """Accept postgres://, postgresql:// and postgresql+psycopg://; always use psycopg 3."""
    url = make_url(store_url.replace("postgres://", "postgresql://", 1))
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


class PostgresLeaderLock(LeaderLock):
    def __init__(
        self, store_url: str, name: str = DEFAULT_LOCK_NAME, check_interval_s: float = 1.0, lease_s: float = 2.0
    ) -> None:
        super().__init__(name, check_interval_s=check_interval_s, lease_s=lease_s)
        self.key = advisory_key(name)
        # Short timeouts everywhere: a check must fail fast, not hang past the lease.
        self._engine = sa.create_engine(
            psycopg_url(store_url),
            poolclass=NullPool,
            connect_args={
                "connect_timeout": 2,
                "application_name": f"facefleet-leader:{name}",
                "keepalives": 1,
                "keepalives_idle": 1,
                "keepalives_interval": 1,
                "keepalives_count": 2,
                "tcp_user_timeout": 2000,
                "options": "-c statement_timeout=1500",
            },
        )
        self._connection: Connection | None = None

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend holding (or trying for) the lock; for diagnostics and tests."""
        with self._lock:
            if self._connection is None:
                return None
            return int(self._connection.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())

    def _acquire(self) -> bool:
        try:
            if self._connection is None or self._connection.closed:
                self._connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = self._connection.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar_one()
        except sa.exc.SQLAlchemyError as error:
            log.warning("leader lock: database unreachable", lock=self.name, error=_short(error))
            self._release()
            return False
        return bool(got)

    def _still_held(self) -> bool:
        if self._connection is None:
            return False
        try:
            held = self._connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND pid = pg_backend_pid() AND objsubid = 1"
                    " AND classid = (:high)::bigint::oid AND objid = (:low)::bigint::oid"
                ),
                {"high": (self.key >> 32) & 0xFFFFFFFF, "low": self.key & 0xFFFFFFFF},
            ).scalar_one()
        except sa.exc.SQLAlchemyError as error:
            log.warning("leader lock: connection lost", lock=self.name, error=_short(error))
            return False
        return bool(held)

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        with contextlib.suppress(Exception):
            connection.close()

    def stop(self) -> None:
        super().stop()
        self._engine.dispose()


class FileLeaderLock(LeaderLock):
    """`flock` on a file next to the SQLite database: one leader per database file and host."""

    def __init__(self, path: Path, name: str = DEFAULT_LOCK_NAME, check_interval_s: float = 1.0) -> None:
        super().__init__(name, check_interval_s=check_interval_s, lease_s=float("inf"))
        self.path = path
        self._fd: int | None = None

    def _acquire(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            log.warning("leader lock file unusable", path=str(self.path), error=str(error))
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def _still_held(self) -> bool:
        return self._fd is not None

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class ProcessLeaderLock(LeaderLock):
    """In-memory SQLite: the database lives in this process, so this process always leads."""

    def __init__(self, name: str = DEFAULT_LOCK_NAME) -> None:
        super().__init__(name, lease_s=float("inf"))
        self._taken = False

    def _acquire(self) -> bool:
        self._taken = True
        return True

    def _still_held(self) -> bool:
        return self._taken

    def _release(self) -> None:
        self._taken = False


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
