"""Run-time estimates learned from completed cloud runs, so a reservation is an upper bound.

A pool's configured (or heartbeat-reported) `sec_per_frame` is what the agents say one frame takes;
what the ledger bills is the whole attempt, from the reservation to the run's end (dispatch, model
load, encode, stream turnarounds). For every paid pool this book keeps the billed seconds per frame
of its last `window` runs that completed or were stopped at their hard run-time limit (a lower
bound of their true time) and answers a high percentile of them; placement's World then uses
`max(configured, learned)` as the pool's `sec_per_frame`, so estimates and the run bound
(scheduler.placement.filters.run_bound_s: the limit the agent enforces and the reservation) grow
to what runs really cost and never fall below the configured value. Samples live in the scheduler's
database (`run_time_samples`), so a restarted or newly elected leader starts from them.
`LearnedRunTimes` is the learning itself (no I/O, not thread-safe): `RunTimeBook` wraps it for the
live scheduler, `scheduler.simulate` feeds one with its simulated completions.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from facefleet.scheduler import schema
from facefleet.scheduler.placement.model import PoolState

metadata = sa.MetaData()
SCHEMA_VERSION = 1  # of the tables below: raise it with each change, with a step (`scheduler.schema`)

run_time_samples = sa.Table(
    "run_time_samples",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("pool", sa.String(128), nullable=False),
    sa.Column("sec_per_frame", sa.Float, nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
    sa.Index("ix_run_time_samples_pool_id", "pool", "id"),
)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (a value that occurred; with few samples, the maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class LearnedRunTimes:
    """Per pool: the last `window` billed seconds per frame and their `fraction` percentile."""

    def __init__(self, window: int = 200, fraction: float = 0.95) -> None:
        self.window = window
        self.fraction = fraction
        self._samples: dict[str, deque[float]] = {}
        self._learned: dict[str, float] = {}

    def add(self, pool: str, sec_per_frame: float) -> None:
        samples = self._samples.setdefault(pool, deque(maxlen=self.window))
        samples.append(sec_per_frame)
        self._learned[pool] = percentile(list(samples), self.fraction)

    def learned(self, pool: str) -> float | None:
        """The pool's high-percentile billed seconds per frame; None before its first sample."""
        return self._learned.get(pool)

    def overlay(self, pools: tuple[PoolState, ...]) -> tuple[PoolState, ...]:
        """Paid pools with `sec_per_frame = max(configured, learned)` (placement's World)."""
        return tuple(
            replace(pool, sec_per_frame=self._learned[pool.name])
            if pool.price_per_hour > 0 and self._learned.get(pool.name, 0.0) > pool.sec_per_frame
            else pool
            for pool in pools
        )


def billed_sec_per_frame(billed_s: float, frames: int) -> float | None:
    """One run's sample: billed seconds per frame (None for a run that teaches nothing)."""
    if billed_s <= 0 or frames < 1 or not math.isfinite(billed_s):
        return None
    return billed_s / frames


class RunTimeBook:
    """Thread-safe; one per scheduler process; `LearnedRunTimes` persisted in `run_time_samples`."""

    def __init__(
        self,
        engine: Engine,
        window: int = 200,
        fraction: float = 0.95,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._runs = LearnedRunTimes(window, fraction)
        schema.prepare(engine, metadata, "run_times", SCHEMA_VERSION)
        self._load()

    def _load(self) -> None:
        with self._engine.connect() as conn:
            pools = [row.pool for row in conn.execute(sa.select(run_time_samples.c.pool).distinct())]
            for pool in pools:
                query = (
                    sa.select(run_time_samples.c.sec_per_frame)
                    .where(run_time_samples.c.pool == pool)
                    .order_by(run_time_samples.c.id.desc())
                    .limit(self._window)
                )
                for sample in reversed([row.sec_per_frame for row in conn.execute(query)]):
                    self._runs.add(pool, sample)

    def record(self, pool: str, billed_s: float, frames: int) -> None:
        """One completed run on `pool`: `billed_s` seconds billed for `frames` frames."""
        sample = billed_sec_per_frame(billed_s, frames)
        if sample is None:
            return
        with self._engine.begin() as conn:
            conn.execute(sa.insert(run_time_samples).values(pool=pool, sec_per_frame=sample, recorded_at=self._clock()))
            newest = conn.execute(sa.select(sa.func.max(run_time_samples.c.id))).scalar_one()
            if newest % self._window == 0:  # now and then: keep the table to about two windows a pool
                self._prune(conn, pool)
        with self._lock:
            self._runs.add(pool, sample)

    def _prune(self, conn: sa.Connection, pool: str) -> None:
        keep_from = conn.execute(
            sa.select(run_time_samples.c.id)
            .where(run_time_samples.c.pool == pool)
            .order_by(run_time_samples.c.id.desc())
            .offset(self._window)
            .limit(1)
        ).scalar()
        if keep_from is not None:
            conn.execute(
                sa.delete(run_time_samples).where(run_time_samples.c.pool == pool, run_time_samples.c.id <= keep_from)
            )

    def learned(self, pool: str) -> float | None:
        """The pool's high-percentile billed seconds per frame; None before its first completed run."""
        with self._lock:
            return self._runs.learned(pool)

    def overlay(self, pools: tuple[PoolState, ...], now: float) -> tuple[PoolState, ...]:
        """Paid pools with `sec_per_frame = max(configured, learned)` (placement's World)."""
        with self._lock:
            return self._runs.overlay(pools)


def samples_before(engine: Engine, until: float, window: int = 200) -> dict[str, list[float]]:
    """Per pool, the last `window` samples recorded before `until` (oldest first): what a
    `RunTimeBook` would have started from at that time (a replay's starting estimates)."""
    samples: dict[str, list[float]] = {}
    if not sa.inspect(engine).has_table(run_time_samples.name):
        return samples
    with engine.connect() as conn:
        query = (
            sa.select(run_time_samples.c.pool, run_time_samples.c.sec_per_frame)
            .where(run_time_samples.c.recorded_at < until)
            .order_by(run_time_samples.c.id)
        )
        for row in conn.execute(query):
            samples.setdefault(row.pool, []).append(row.sec_per_frame)
    return {pool: values[-window:] for pool, values in samples.items()}
