"""The queries that must not sort the whole table: checked with SQLite's EXPLAIN QUERY PLAN."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from facefleet.scheduler.store import TaskStore

LIST_BY_STATE = "SELECT * FROM tasks WHERE state = 'queued' ORDER BY submitted_at, id LIMIT 101"
LIST_BY_PROJECT = "SELECT * FROM tasks WHERE project = 'films' ORDER BY submitted_at, id LIMIT 101"


def plan(path: Path, sql: str) -> str:
    with sqlite3.connect(path) as db:
        return " | ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + sql))


def test_listing_by_state_or_project_is_an_index_range_scan_without_a_sort(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path}/s.db")
    store.close()
    described = plan(tmp_path / "s.db", LIST_BY_STATE)
    assert "ix_tasks_state_submitted" in described and "TEMP B-TREE" not in described, described
    described = plan(tmp_path / "s.db", LIST_BY_PROJECT)
    assert "ix_tasks_project_submitted" in described and "TEMP B-TREE" not in described, described


def test_a_store_created_before_the_index_gets_it_when_opened(tmp_path: Path) -> None:
    TaskStore(f"sqlite:///{tmp_path}/s.db").close()
    with sqlite3.connect(tmp_path / "s.db") as db:
        db.execute("DROP INDEX ix_tasks_state_submitted")
    assert "ix_tasks_state_submitted" not in plan(tmp_path / "s.db", LIST_BY_STATE)  # an older database
    TaskStore(f"sqlite:///{tmp_path}/s.db").close()
    described = plan(tmp_path / "s.db", LIST_BY_STATE)
    assert "ix_tasks_state_submitted" in described and "TEMP B-TREE" not in described, described
