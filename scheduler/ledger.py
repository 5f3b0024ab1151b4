"""Cloud spend ledger (SQLAlchemy Core, same database as the scheduler store).

Spend = instance-seconds x spot price, attributed to task, project, rule, pool and budget
account. Placement calls `reserve` before sending a task to cloud: a reservation is granted only
while `spent + reserved + estimate <= cap`, atomically, so concurrent placements never commit more
than the cap. Spend can pass the cap only through tasks costing more than their estimate, so
estimates must be upper bounds (price x SLA-bounded runtime) for invariant 3 to hold. `settle`
turns the reservation into spend; `release` drops one that produced none.
Months are calendar months in UTC ("2026-11").
"""

from __future__ import annotations

import threading
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from facefleet.money import USD
from facefleet.scheduler import schema
from facefleet.scheduler.metrics import BUDGET_ALERT, BUDGET_CAP, BUDGET_SPENT

log = structlog.get_logger()

metadata = sa.MetaData()
SCHEMA_VERSION = 1  # of the tables below: raise it with each change, with a step (`scheduler.schema`)

cloud_spend = sa.Table(
    "cloud_spend",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("month", sa.String(7), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("rule", sa.String(128), nullable=False),
    sa.Column("pool", sa.String(128), nullable=False),
    sa.Column("budget", sa.String(128), nullable=False),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("instance_id", sa.String(128), nullable=False),
    sa.Column("instance_seconds", sa.Float, nullable=False),
    sa.Column("usd_per_hour", sa.Float, nullable=False),
    sa.Column("usd", sa.Float, nullable=False),
    sa.Column("estimate_usd", sa.Float, nullable=True),
    sa.Column("outcome", sa.String(32), nullable=False, server_default="completed"),
    sa.Index("ix_cloud_spend_budget_month", "budget", "month"),
    sa.Index("ix_cloud_spend_ended_at", "ended_at"),
)

budget_reservations = sa.Table(
    "budget_reservations",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("month", sa.String(7), nullable=False),
    sa.Column("budget", sa.String(128), nullable=False),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("estimate_usd", sa.Float, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_budget_reservations_budget_month", "budget", "month"),
)

# Last known cap per account (the source of truth is the rules store); lets the CLI show caps offline.
budget_accounts = sa.Table(
    "budget_accounts",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("monthly_cap_usd", sa.Float, nullable=False),
    sa.Column("alert_pct", sa.Float, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


class BudgetAccountLike(Protocol):
    """Anything with these fields: placement's `Budget`, admin_pb2.Budget, `BudgetAccount`."""

    @property
    def name(self) -> str: ...
    @property
    def monthly_cap_usd(self) -> float: ...
    @property
    def alert_pct(self) -> float: ...


@dataclass(frozen=True)
class BudgetAccount:
    name: str
    monthly_cap_usd: float
    alert_pct: float = 80.0


@dataclass(frozen=True)
class Reservation:
    id: str
    budget: str
    task_id: str
    estimate_usd: float
    month: str


@dataclass(frozen=True)
class Usage:
    task_id: str
    project: str
    rule: str
    pool: str
    budget: str
    provider: str
    instance_id: str
    instance_seconds: float
    usd_per_hour: float
    ended_at: datetime
    outcome: str = "completed"  # completed | failed | preempted

    @property
    def usd(self) -> float:
        return self.instance_seconds / 3600.0 * self.usd_per_hour


@dataclass(frozen=True)
class AccountStatus:
    name: str
    month: str
    monthly_cap_usd: float | None
    alert_pct: float | None
    spent_usd: float
    reserved_usd: float
    forecast_usd: float

    @property
    def remaining_usd(self) -> float | None:
        if self.monthly_cap_usd is None:
            return None
        return self.monthly_cap_usd - self.spent_usd - self.reserved_usd


def month_of(at: datetime) -> str:
    return _utc(at).strftime("%Y-%m")


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def month_bounds(month: str) -> tuple[datetime, datetime]:
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def linear_forecast(spent_usd: float, month: str, now: datetime) -> float:
    """Month-end spend if the month-to-date rate continues (pure)."""
    start, end = month_bounds(month)
    now = _utc(now)
    if now >= end:
        return spent_usd
    elapsed = (now - start).total_seconds()
    if elapsed <= 0:
        return spent_usd
    return spent_usd * (end - start).total_seconds() / elapsed


class SpendLedger:
    """Thread-safe; one instance per scheduler process (only the leader reserves)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._alerted: set[tuple[str, str]] = set()
        schema.prepare(engine, metadata, "spend_ledger", SCHEMA_VERSION)

    # ---- accounts ----------------------------------------------------------------------
    def upsert_accounts(self, accounts: Iterable[BudgetAccountLike], now: datetime) -> None:
        """Record the caps the rules store currently holds (call on every rules load)."""
        with self._engine.begin() as conn:
            for account in accounts:
                conn.execute(sa.delete(budget_accounts).where(budget_accounts.c.name == account.name))
                conn.execute(
                    sa.insert(budget_accounts).values(
                        name=account.name,
                        monthly_cap_usd=float(account.monthly_cap_usd),
                        alert_pct=float(account.alert_pct),
                        updated_at=_utc(now),
                    )
                )
                BUDGET_CAP.labels(budget=account.name).set(float(account.monthly_cap_usd))

    def accounts(self) -> dict[str, BudgetAccount]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(budget_accounts)).all()
        return {r.name: BudgetAccount(r.name, r.monthly_cap_usd, r.alert_pct) for r in rows}

    # ---- reads -------------------------------------------------------------------------
    def spent(self, budget: str, month: str) -> float:
        with self._engine.connect() as conn:
            return self._spent(conn, budget, month)

    @staticmethod
    def _spent(conn: sa.Connection, budget: str, month: str) -> float:
        query = sa.select(sa.func.coalesce(sa.func.sum(cloud_spend.c.usd), 0.0)).where(
            cloud_spend.c.budget == budget, cloud_spend.c.month == month
        )
        return float(conn.execute(query).scalar_one())

    @staticmethod
    def _reserved(conn: sa.Connection, budget: str, month: str) -> float:
        query = sa.select(sa.func.coalesce(sa.func.sum(budget_reservations.c.estimate_usd), 0.0)).where(
            budget_reservations.c.budget == budget, budget_reservations.c.month == month
        )
        return float(conn.execute(query).scalar_one())

    def reserved(self, budget: str, month: str) -> float:
        with self._engine.connect() as conn:
            return self._reserved(conn, budget, month)

    def instance_seconds(self, instance_ids: Iterable[str]) -> float:
        """Instance-seconds billed so far on these instance ids (facefleet's and the provider's)."""
        query = sa.select(sa.func.coalesce(sa.func.sum(cloud_spend.c.instance_seconds), 0.0)).where(
            cloud_spend.c.instance_id.in_(list(instance_ids))
        )
        with self._engine.connect() as conn:
            return float(conn.execute(query).scalar_one())

    def _grouped(self, column: sa.Column[Any], month: str, budget: str | None) -> dict[str, float]:
        query = sa.select(column, sa.func.sum(cloud_spend.c.usd)).where(cloud_spend.c.month == month)
        if budget is not None:
            query = query.where(cloud_spend.c.budget == budget)
        with self._engine.connect() as conn:
            rows = conn.execute(query.group_by(column).order_by(column)).all()
        return {str(key): float(total) for key, total in rows}

    def by_project(self, month: str, budget: str | None = None) -> dict[str, float]:
        return self._grouped(cloud_spend.c.project, month, budget)

    def by_pool(self, month: str, budget: str | None = None) -> dict[str, float]:
        return self._grouped(cloud_spend.c.pool, month, budget)

    def by_budget(self, month: str) -> dict[str, float]:
        return self._grouped(cloud_spend.c.budget, month, None)

    def forecast_month_end(self, budget: str, now: datetime) -> float:
        month = month_of(now)
        return linear_forecast(self.spent(budget, month), month, now)

    def status(self, now: datetime) -> list[AccountStatus]:
        """Every account with a cap or with spend this month."""
        month = month_of(now)
        accounts = self.accounts()
        spent = self.by_budget(month)
        result = []
        for name in sorted(set(accounts) | set(spent)):
            account = accounts.get(name)
            with self._engine.connect() as conn:
                reserved = self._reserved(conn, name, month)
            result.append(
                AccountStatus(
                    name=name,
                    month=month,
                    monthly_cap_usd=account.monthly_cap_usd if account else None,
                    alert_pct=account.alert_pct if account else None,
                    spent_usd=spent.get(name, 0.0),
                    reserved_usd=reserved,
                    forecast_usd=linear_forecast(spent.get(name, 0.0), month, now),
                )
            )
        return result

    def records(self, since: datetime, until: datetime | None = None) -> list[dict[str, Any]]:
        query = sa.select(cloud_spend).where(cloud_spend.c.ended_at >= _utc(since))
        if until is not None:
            query = query.where(cloud_spend.c.ended_at < _utc(until))
        with self._engine.connect() as conn:
            rows = conn.execute(query.order_by(cloud_spend.c.ended_at, cloud_spend.c.id)).mappings().all()
        return [{**row, "ended_at": _utc(row["ended_at"])} for row in rows]

    # ---- writes ------------------------------------------------------------------------
    def _serialize(self, conn: sa.Connection, budget: str) -> None:
        """Cross-process guard on PostgreSQL (a second replica, a CLI); in-process we hold _lock."""
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": zlib.crc32(budget.encode())})

    def reserve(
        self, account: BudgetAccountLike, task_id: str, estimate_usd: float, now: datetime
    ) -> Reservation | None:
        """Hold `estimate_usd` of `account`'s month; None when it does not fit under the cap."""
        estimate_usd = USD.check(estimate_usd, f"task {task_id}: cost estimate")
        month = month_of(now)
        with self._lock, self._engine.begin() as conn:
            self._serialize(conn, account.name)
            committed = self._spent(conn, account.name, month) + self._reserved(conn, account.name, month)
            if committed + estimate_usd > account.monthly_cap_usd:
                return None
            reservation = Reservation(str(uuid.uuid4()), account.name, task_id, float(estimate_usd), month)
            conn.execute(
                sa.insert(budget_reservations).values(
                    id=reservation.id,
                    month=month,
                    budget=account.name,
                    task_id=task_id,
                    estimate_usd=reservation.estimate_usd,
                    created_at=_utc(now),
                )
            )
        return reservation

    def extend(self, account: BudgetAccountLike, reservation: Reservation, add_usd: float) -> Reservation | None:
        """Grow a running task's reservation by `add_usd` under the same cap check as `reserve`;
        None when it does not fit (or the reservation is gone: settled or released meanwhile)."""
        add_usd = USD.check(add_usd, f"task {reservation.task_id}: reservation extension")
        with self._lock, self._engine.begin() as conn:
            self._serialize(conn, account.name)
            committed = self._spent(conn, account.name, reservation.month) + self._reserved(
                conn, account.name, reservation.month
            )
            if committed + add_usd > account.monthly_cap_usd:
                return None
            grown = reservation.estimate_usd + add_usd
            updated = conn.execute(
                sa.update(budget_reservations)
                .where(budget_reservations.c.id == reservation.id)
                .values(estimate_usd=grown)
            ).rowcount
        if not updated:
            return None
        return Reservation(reservation.id, reservation.budget, reservation.task_id, grown, reservation.month)

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation that produced no spend (dispatch failed, task cancelled before start)."""
        with self._lock, self._engine.begin() as conn:
            conn.execute(sa.delete(budget_reservations).where(budget_reservations.c.id == reservation.id))

    def open_reservations(self) -> list[Reservation]:
        """Reservations not yet settled (after a restart: settle or release each by its task)."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(budget_reservations)).all()
        return [Reservation(r.id, r.budget, r.task_id, r.estimate_usd, r.month) for r in rows]

    def settle(self, reservation: Reservation | None, usage: Usage, account: BudgetAccountLike | None = None) -> float:
        """Record actual spend and drop the reservation in one transaction; returns the usd recorded."""
        with self._lock, self._engine.begin() as conn:
            if reservation is not None:
                conn.execute(sa.delete(budget_reservations).where(budget_reservations.c.id == reservation.id))
            conn.execute(
                sa.insert(cloud_spend).values(
                    month=month_of(usage.ended_at),
                    ended_at=_utc(usage.ended_at),
                    task_id=usage.task_id,
                    project=usage.project,
                    rule=usage.rule,
                    pool=usage.pool,
                    budget=usage.budget,
                    provider=usage.provider,
                    instance_id=usage.instance_id,
                    instance_seconds=usage.instance_seconds,
                    usd_per_hour=usage.usd_per_hour,
                    usd=usage.usd,
                    estimate_usd=reservation.estimate_usd if reservation else None,
                    outcome=usage.outcome,
                )
            )
            spent = self._spent(conn, usage.budget, month_of(usage.ended_at))
        BUDGET_SPENT.labels(budget=usage.budget).set(spent)
        if account is not None:
            self._check_alert(account, month_of(usage.ended_at), spent)
        return usage.usd

    def record(self, usage: Usage, account: BudgetAccountLike | None = None) -> float:
        """Spend without a reservation (e.g. an idle instance's tail, booked to its last budget)."""
        return self.settle(None, usage, account)

    def _check_alert(self, account: BudgetAccountLike, month: str, spent: float) -> None:
        cap = float(account.monthly_cap_usd)
        over = cap > 0 and spent >= cap * float(account.alert_pct) / 100.0
        BUDGET_ALERT.labels(budget=account.name).set(1 if over else 0)
        if over and (account.name, month) not in self._alerted:
            self._alerted.add((account.name, month))
            log.warning(
                "budget_alert",
                budget=account.name,
                month=month,
                spent_usd=round(spent, 4),
                cap_usd=cap,
                alert_pct=account.alert_pct,
                pct_used=round(100.0 * spent / cap, 2),
            )
