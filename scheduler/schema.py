"""Schema versions of the scheduler's database.

Each part that owns tables there (the task store, the spend ledger, the learned run times) records
the version of its tables in `schema_versions`, one row per part, and `prepare` brings an older
database up to date with that part's own migration steps before the part serves; a database that a
newer facefleet wrote is refused with a sentence to act on, never half-understood.

A part's version goes up by one with each change to its tables, and the change's step (from the old
version) goes into the part's `migrations`: a function that alters the tables inside the same
transaction. Tables and indexes that are new need no step (`create_all` adds them). Databases from
before versioning (the part's tables present, no row) are version 1. On PostgreSQL the preparation
holds a transaction-level advisory lock, so replicas that start together take their turns.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

log = structlog.get_logger()

_versions_metadata = sa.MetaData()

schema_versions = sa.Table(
    "schema_versions",
    _versions_metadata,
    sa.Column("part", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

Migration = Callable[[Connection], None]  # takes a part's tables from version N to N + 1


class SchemaMismatch(RuntimeError):
    """The database holds a part's tables at a version this facefleet cannot use."""

    hint = "use the facefleet release that wrote this database or a newer one, or point the store URL elsewhere"


def prepare(
    engine: Engine,
    metadata: sa.MetaData,
    part: str,
    version: int,
    migrations: Mapping[int, Migration] | None = None,
) -> int:
    """Create or upgrade `part`'s tables (`metadata`) to `version`; returns the version found (the
    current one for a new database). Raises SchemaMismatch for a newer version, or an older one
    without a step to upgrade it."""
    steps = migrations or {}
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(zlib.crc32(b"facefleet schema"))))
        elif conn.dialect.name == "sqlite":
            driver: Any = conn.connection.driver_connection
            if not driver.in_transaction:  # pysqlite's own handling would commit each DDL statement alone
                driver.execute("BEGIN IMMEDIATE")
        schema_versions.create(conn, checkfirst=True)
        found = conn.execute(sa.select(schema_versions.c.version).where(schema_versions.c.part == part)).scalar()
        if found is None:
            existing = set(sa.inspect(conn).get_table_names())
            found = 1 if any(table.name in existing for table in metadata.sorted_tables) else version
            conn.execute(sa.insert(schema_versions).values(part=part, version=found, updated_at=time.time()))
        where = f"the database at {conn.engine.url.render_as_string(hide_password=True)}"
        if found > version:
            raise SchemaMismatch(
                f"{where} holds the {part} tables at schema version {found}, "
                f"newer than this facefleet's version {version}"
            )
        missing = [step for step in range(found, version) if step not in steps]
        if missing:
            raise SchemaMismatch(
                f"{where} holds the {part} tables at schema version {found}, and this facefleet "
                f"cannot upgrade them from version {missing[0]} to {version}"
            )
        for step in range(found, version):
            steps[step](conn)
        metadata.create_all(conn)
        if found != version:
            conn.execute(
                sa.update(schema_versions)
                .where(schema_versions.c.part == part)
                .values(version=version, updated_at=time.time())
            )
            log.info("database schema upgraded", part=part, from_version=found, to_version=version)
    return int(found)
