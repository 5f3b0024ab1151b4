"""LeaderLock: PostgreSQL advisory lock (real server) and the SQLite lock file across processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY

from facefleet.scheduler.leader import FileLeaderLock, LeaderLock, PostgresLeaderLock, advisory_key, psycopg_url
from tests.fixtures.postgres import PostgresServer


def wait_until(condition: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `condition()` held; fails the test after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def locks() -> Iterator[list[LeaderLock]]:
    made: list[LeaderLock] = []
    yield made
    for lock in made:
        lock.stop()


def test_for_url_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(LeaderLock.for_url("postgresql://u@127.0.0.1:1/db"), PostgresLeaderLock)
    file_lock = LeaderLock.for_url(f"sqlite:///{tmp_path}/facefleet.db")
    assert isinstance(file_lock, FileLeaderLock)
    assert file_lock.path == tmp_path / "facefleet.db.leader"
    assert LeaderLock.for_url("sqlite://").try_acquire() is True
    with pytest.raises(ValueError, match="no leader lock for backend 'mysql'"):
        LeaderLock.for_url("mysql://u@h/db")
    assert psycopg_url("postgres://u:p@h:5/db") == "postgresql+psycopg://u:p@h:5/db"
    assert advisory_key("facefleet-scheduler") == advisory_key("facefleet-scheduler") != advisory_key("x")


@pytest.mark.postgres
def test_exactly_one_leader_and_handover_on_release(postgres_url: str, locks: list[LeaderLock]) -> None:
    first = LeaderLock.for_url(postgres_url, name="ha-release")
    second = LeaderLock.for_url(postgres_url, name="ha-release")
    locks += [first, second]
    assert first.try_acquire() is True
    assert second.try_acquire() is False
    assert first.try_acquire() is True  # re-entrant for the holder
    assert REGISTRY.get_sample_value("facefleet_leader") == 1
    changes: list[bool] = []
    second.on_change(changes.append)
    second.start()
    time.sleep(1.2)
    assert (first.is_leader, second.is_leader) == (True, False)
    first.stop()
    took = wait_until(lambda: second.is_leader, timeout_s=3)
    assert took < 2.0
    assert changes == [True]
    assert first.is_leader is False


@pytest.mark.postgres
def test_terminated_connection_hands_leadership_over(
    postgres_server: PostgresServer, postgres_url: str, locks: list[LeaderLock]
) -> None:
    first = LeaderLock.for_url(postgres_url, name="ha-kill")
    second = LeaderLock.for_url(postgres_url, name="ha-kill")
    locks += [first, second]
    first.start()
    wait_until(lambda: first.is_leader, timeout_s=3)
    second.start()
    time.sleep(1.2)
    assert second.is_leader is False
    lost: list[bool] = []
    first.on_change(lost.append)
    assert isinstance(first, PostgresLeaderLock)
    pid = first.backend_pid
    with psycopg.connect(postgres_server.dsn_for("postgres"), autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    took_over = wait_until(lambda: second.is_leader, timeout_s=3)
    noticed = wait_until(lambda: not first.is_leader, timeout_s=3)
    assert took_over < 2.5 and noticed < 2.5
    assert lost and lost[0] is False
    # The old leader keeps trying and stays a follower while the new one holds the lock.
    time.sleep(1.5)
    assert (first.is_leader, second.is_leader) == (False, True)


@pytest.mark.postgres
def test_leadership_survives_a_server_restart(postgres_server: PostgresServer, postgres_url: str) -> None:
    lock = LeaderLock.for_url(postgres_url, name="ha-restart").start()
    try:
        wait_until(lambda: lock.is_leader, timeout_s=3)
        postgres_server.stop("immediate")
        wait_until(lambda: not lock.is_leader, timeout_s=3)
        postgres_server.start()
        wait_until(lambda: lock.is_leader, timeout_s=10)
    finally:
        lock.stop()
        postgres_server.start()  # later tests need it up (no-op when running)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from facefleet.scheduler.leader import FileLeaderLock
    lock = FileLeaderLock(Path(sys.argv[1]))
    print("leader" if lock.try_acquire() else "follower", flush=True)
    time.sleep(60)
    """
)


def test_sqlite_lock_file_is_exclusive_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "facefleet.db.leader"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        verdicts = (line.strip() for line in holder.stdout if line.strip() in ("leader", "follower"))
        assert next(verdicts) == "leader"  # other stdout lines are the child's logs
        assert path.read_text().strip() == str(holder.pid)
        lock = FileLeaderLock(path, check_interval_s=0.2)
        assert lock.try_acquire() is False
        lock.start()
        time.sleep(0.5)
        assert lock.is_leader is False
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=5)
        assert wait_until(lambda: lock.is_leader, timeout_s=2) < 1.0
        assert path.read_text().strip() == str(os.getpid())
        lock.stop()
        assert lock.is_leader is False
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=5)
