"""Schema versions of the scheduler's database (`scheduler.schema`): new databases are stamped,
databases from before versioning count as version 1, older ones are upgraded by their parts' steps
in one transaction, and one written by a newer release is refused with `error:` and `hint:`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from facefleet.scheduler import schema
from facefleet.scheduler.cloud.wiring import ledger_engine
from facefleet.scheduler.ledger import SpendLedger
from facefleet.scheduler.run_estimates import RunTimeBook
from facefleet.scheduler.store import SCHEMA_VERSION, NewTask, TaskStore
from tests.scheduler.conftest import write_policy
from tests.scheduler.test_launch_with_intake import make_task


def versions(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {row.part: row.version for row in conn.execute(sa.select(schema.schema_versions))}
    finally:
        engine.dispose()


def set_version(url: str, part: str, version: int) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.update(schema.schema_versions).where(schema.schema_versions.c.part == part).values(version=version)
            )
    finally:
        engine.dispose()


def store_with_a_task(url: str, then: str) -> str:
    """A store at `url` holding one task, then `then` (SQL) run on it as another release might have
    left it; returns the task's id."""
    store = TaskStore(url)
    [stored] = store.insert_batch([NewTask(make_task(), "")], time.time())
    store.close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(then)
    engine.dispose()
    return stored.task_id


def test_a_new_database_is_stamped_with_every_parts_version(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    TaskStore(url).close()
    engine = ledger_engine(url)
    SpendLedger(engine)
    RunTimeBook(engine)
    engine.dispose()
    assert versions(url) == {"task_store": SCHEMA_VERSION, "spend_ledger": 1, "run_times": 1}


def test_a_database_from_before_versioning_is_version_1_upgraded_and_keeps_its_tasks(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    task_id = store_with_a_task(url, then="DROP TABLE schema_versions")  # as every store before versioning
    reopened = TaskStore(url)
    assert reopened.get(task_id).project == "p"
    reopened.close()
    assert versions(url) == {"task_store": SCHEMA_VERSION}


def test_a_version_1_store_gets_the_audit_outbox_and_keeps_its_tasks(tmp_path: Path) -> None:
    """Version 2 added `audit_outbox` (audit records staged with their launches): a store written by
    version 1 has no such table, and is upgraded in place."""
    url = f"sqlite:///{tmp_path}/s.db"
    task_id = store_with_a_task(url, then="DROP TABLE audit_outbox")
    set_version(url, "task_store", 1)
    reopened = TaskStore(url)
    with reopened.engine.begin() as conn:
        row_id = reopened.stage_records_in(conn, [("dispatch", "scheduler", {"task": task_id})], time.time())
    assert reopened.staged_records() == [(row_id, [("dispatch", "scheduler", {"task": task_id})])]
    assert reopened.get(task_id).project == "p"
    reopened.close()
    assert versions(url) == {"task_store": SCHEMA_VERSION}


def test_a_store_from_a_newer_release_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    TaskStore(url).close()
    set_version(url, "task_store", 7)
    newer = rf"task_store tables at schema version 7, newer than .* version {SCHEMA_VERSION}"
    with pytest.raises(schema.SchemaMismatch, match=newer):
        TaskStore(url)
    assert versions(url) == {"task_store": 7}


def test_scheduler_run_on_a_newer_store_says_error_and_hint(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    TaskStore(url).close()
    set_version(url, "task_store", SCHEMA_VERSION + 1)
    policy = write_policy(tmp_path / "policy")
    command = [sys.executable, "-m", "facefleet", "scheduler", "run", "--store", url, "--policy", str(policy)]
    result = subprocess.run(
        [*command, "--listen", "127.0.0.1:0", "--metrics-port", "0", "--insecure"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    shown = result.stdout + result.stderr
    assert result.returncode == 1, shown
    newer = f"schema version {SCHEMA_VERSION + 1}, newer than this facefleet's version {SCHEMA_VERSION}"
    assert "error:" in shown and newer in shown, shown
    assert "hint: use the facefleet release that wrote this database" in shown, shown
    assert "Traceback" not in shown and "internal error" not in shown, shown


def demo_tables(version: int) -> tuple[sa.MetaData, sa.Table]:
    metadata = sa.MetaData()
    columns = [sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String(32), nullable=False)]
    if version >= 2:
        columns.append(sa.Column("colour", sa.String(16), nullable=False, server_default=""))
    return metadata, sa.Table("demo", metadata, *columns)


def test_an_older_part_is_upgraded_by_its_steps_once_and_keeps_its_rows(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/s.db")
    v1, table = demo_tables(1)
    assert schema.prepare(engine, v1, "demo", 1) == 1
    with engine.begin() as conn:
        conn.execute(sa.insert(table).values(id=1, name="kept"))
    ran: list[int] = []

    def add_colour(conn: sa.Connection) -> None:
        ran.append(1)
        conn.exec_driver_sql("ALTER TABLE demo ADD COLUMN colour VARCHAR(16) NOT NULL DEFAULT ''")

    v2, table2 = demo_tables(2)
    assert schema.prepare(engine, v2, "demo", 2, {1: add_colour}) == 1
    assert schema.prepare(engine, v2, "demo", 2, {1: add_colour}) == 2
    assert ran == [1]
    with engine.connect() as conn:
        assert conn.execute(sa.select(table2.c.name, table2.c.colour)).all() == [("kept", "")]
    with pytest.raises(schema.SchemaMismatch, match="cannot upgrade them from version 2 to 3"):
        schema.prepare(engine, v2, "demo", 3, {1: add_colour})
    with engine.connect() as conn:
        found = conn.execute(sa.select(schema.schema_versions.c.version).where(schema.schema_versions.c.part == "demo"))
        assert found.scalar() == 2
    engine.dispose()


def test_a_failing_step_leaves_the_database_at_its_old_version(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/s.db")
    v1, _table = demo_tables(1)
    schema.prepare(engine, v1, "demo", 1)

    def broken(conn: sa.Connection) -> None:
        conn.exec_driver_sql("ALTER TABLE demo ADD COLUMN colour VARCHAR(16) NOT NULL DEFAULT ''")
        raise RuntimeError("step failed half-way")

    v2, _ = demo_tables(2)
    with pytest.raises(RuntimeError, match="half-way"):
        schema.prepare(engine, v2, "demo", 2, {1: broken})
    with engine.connect() as conn:
        assert "colour" not in {c["name"] for c in sa.inspect(conn).get_columns("demo")}
        version = conn.execute(sa.select(schema.schema_versions.c.version)).scalar()
    assert version == 1
    engine.dispose()


def test_replicas_that_start_together_on_postgresql_stamp_once(postgres_url: str) -> None:
    results: list[object] = []

    def open_store() -> None:
        try:
            TaskStore(postgres_url).close()
            results.append("ok")
        except Exception as error:  # collected: the assertion below shows it
            results.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == ["ok"] * 4
    assert versions(postgres_url) == {"task_store": SCHEMA_VERSION}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_2_store_loses_the_unread_index_and_keeps_its_tasks_and_staged_records(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Version 3 drops `ix_tasks_state_not_before` (read by no query: each launch's commit writes a
    page fewer). Records a version-2 leader staged and did not write yet are still there."""
    url = f"sqlite:///{tmp_path}/s.db" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    version_2_index = "CREATE INDEX ix_tasks_state_not_before ON tasks (state, not_before)"
    task_id = store_with_a_task(url, then=version_2_index)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO audit_outbox VALUES ('0190a', 1.0, '[[\"dispatch\", \"scheduler\", {}]]')")
    set_version(url, "task_store", 2)
    reopened = TaskStore(url)
    assert reopened.staged_records() == [("0190a", [("dispatch", "scheduler", {})])]
    assert reopened.get(task_id).project == "p"
    reopened.close()
    with engine.connect() as conn:
        indexes = {index["name"] for index in sa.inspect(conn).get_indexes("tasks")}
    engine.dispose()
    assert "ix_tasks_state_not_before" not in indexes and "ix_tasks_state_submitted" in indexes
    assert versions(url) == {"task_store": SCHEMA_VERSION}
