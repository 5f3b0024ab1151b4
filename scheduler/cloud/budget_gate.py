"""The spend ledger in the live dispatch path (invariant 3).

- Placement sees each budget as `cap` (rules store) with `spent_usd = spent + reserved` this month
  (`committed`), so its budget filter already drops what cannot fit.
- Right before a launch on a paid pool the dispatcher calls `admit`: the ledger reserves the
  placement's run bound atomically (`Estimate.reserve_usd` = price x (provision + the hard run-time
  limit + slack), scheduler.placement.filters.run_bound_s); a refused reservation keeps the task
  queued (on-prem may take it). The dispatcher sends that limit to the agent (`run_limit_s`), which
  stops the run when it reaches it: the reservation is an upper bound of what the run can bill.
- While the run goes on, `scheduler.spend_enforcement` grows the reservation (`extend`, which raises
  the run's limit by the time the added dollars buy) ahead of the limit, or, when the cap has no
  room, lets the agent stop the run at its limit (and stops it itself as a backstop).
- The attempt ends in exactly one of: `on_run_ended` (settle as soon as the agent reports the run's
  end, keyed by task and attempt: the dispatcher calls it before it frees the run's slot, so budget
  room and slot free together and the pass that ending wakes sees both), `on_finished` (settle:
  instance-seconds x the price placement used, attributed to task/project/rule/pool/budget; a no-op
  after `on_run_ended`), `on_requeued` (settle the partial run: preemption, lost agent, budget
  stop), `withdraw` (the launch never happened: release). Settling pops the open attempt, so each
  attempt settles once however many ways its outcome arrives. A completed run's billed seconds per
  frame go to `on_completed_run` (scheduler.run_estimates).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog

from facefleet.domain import CANCELLED, FAILED, RUN_LIMIT, SUCCEEDED
from facefleet.scheduler.ledger import Reservation, SpendLedger, Usage, month_of
from facefleet.scheduler.placement.model import Budget
from facefleet.scheduler.placement_gateway import PlacementResult
from facefleet.scheduler.store import TaskRecord

log = structlog.get_logger()

OUTCOMES = {SUCCEEDED: "completed", FAILED: "failed", CANCELLED: "cancelled"}


@dataclass(frozen=True)
class Attempt:
    """One launch of a task on a paid pool, from reservation to settlement."""

    reservation: Reservation
    project: str
    rule: str
    pool: str
    provider: str
    usd_per_hour: float
    admitted_at: float
    agent_id: str = ""
    frames: int = 1
    attempt: int = 0  # the run's attempt number (RunTaskRequest.attempt)
    max_run_s: float = 0.0  # the hard run-time limit the reservation covers (raised by `extend`)

    def accrued_usd(self, now: float) -> float:
        """Cost of this attempt so far (billed from the reservation on)."""
        return max(0.0, now - self.admitted_at) * self.usd_per_hour / 3600.0


def raised_limit_s(max_run_s: float, add_usd: float, usd_per_hour: float) -> float:
    """A run's limit after its reservation grew by `add_usd`: raised by the seconds those dollars buy
    (0 stays 0: a run without a limit)."""
    return max_run_s + add_usd * 3600.0 / usd_per_hour if max_run_s > 0 else 0.0


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class BudgetGate:
    """Thread-safe. `instance_of(agent_id)` names the cloud instance an agent runs on (heartbeats)."""

    def __init__(
        self,
        ledger: SpendLedger,
        clock: Callable[[], float] = time.time,
        instance_of: Callable[[str], str] = lambda _agent_id: "",
        committed_ttl_s: float = 0.25,
        on_completed_run: Callable[[str, float, int], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self._on_completed_run = on_completed_run
        self._clock = clock
        self._instance_of = instance_of
        self._ttl = committed_ttl_s
        self._lock = threading.Lock()
        self._accounts: dict[str, Budget] = {}
        self._attempts: dict[str, Attempt] = {}
        self._committed: dict[str, tuple[float, float]] = {}  # budget -> (read at, usd)
        self._room_changes = 0  # bumped whenever spend or reservations change: a read begun before is stale
        self._adopted = False

    # ---- what placement reads ----------------------------------------------------------------------
    def observe_budgets(self, version: str, budgets: Mapping[str, Budget]) -> None:
        """A rules load: remember the caps and record them in the ledger (finance CLI reads them)."""
        with self._lock:
            self._accounts = dict(budgets)
        try:
            self.ledger.upsert_accounts(budgets.values(), utc(self._clock()))
        except Exception as error:  # the database may blip; caps are re-recorded on the next version
            log.warning("budget accounts not recorded", rules_version=version, error=str(error))

    def committed(self, budget: str) -> float:
        """Spent + reserved this month (cached for `committed_ttl_s`; `admit` re-checks atomically)."""
        now = self._clock()
        with self._lock:
            cached = self._committed.get(budget)
            if cached is not None and now - cached[0] < self._ttl:
                return cached[1]
            changes = self._room_changes
        month = month_of(utc(now))
        usd = self.ledger.spent(budget, month) + self.ledger.reserved(budget, month)
        with self._lock:
            if self._room_changes == changes:  # else a settlement or reservation raced this read: don't keep it
                self._committed[budget] = (now, usd)
        return usd

    # ---- the dispatch gate -------------------------------------------------------------------------
    def admit(self, task: TaskRecord, decision: PlacementResult, now: float) -> str:
        estimate = decision.decision.estimate
        pool = decision.pool_state
        if estimate is None or estimate.reserve_usd <= 0 or pool is None or pool.price_per_hour <= 0:
            return ""  # a free pool (on-prem): nothing to reserve
        self._release_orphans_once()
        name = decision.decision.budget
        with self._lock:
            account = self._accounts.get(name or "")
            previous = self._attempts.pop(task.id, None)
        if previous is not None:  # left open by a path that told us nothing: give it back
            self.ledger.release(previous.reservation)
        if name is None or account is None:
            return (
                f"rule {decision.rule} sends task to paid pool {decision.pool} but budget account "
                f"{name or '(none)'} is not in the rules store; add it to budgets"
            )
        amount = estimate.reserve_usd
        reservation = self.ledger.reserve(account, task.id, amount, utc(now))
        self._forget_committed(account.name)
        if reservation is None:
            log.info(
                "budget reservation refused",
                task_id=task.id,
                budget=account.name,
                estimate_usd=round(amount, 6),
                cap_usd=account.monthly_cap_usd,
                pool=decision.pool,
            )
            return (
                f"budget {account.name}: reservation ${amount:.4f} (run bound) does not fit under the cap "
                f"${account.monthly_cap_usd:.4f} (spent + reserved this month); waiting for other capacity"
            )
        attempt = Attempt(
            reservation, task.project, decision.rule, decision.pool, pool.provider, pool.price_per_hour, now,
            frames=max(1, task.task().frames), attempt=task.attempts + 1, max_run_s=estimate.max_run_s,
        )  # fmt: skip
        with self._lock:
            self._attempts[task.id] = attempt
        return ""

    def run_limit_s(self, task_id: str) -> float:
        """The hard run-time limit the task's open attempt has reserved (0: none, e.g. a free pool)."""
        with self._lock:
            attempt = self._attempts.get(task_id)
        return attempt.max_run_s if attempt is not None else 0.0

    def extend(self, task_id: str, add_usd: float) -> bool:
        """Grow a running attempt's reservation under the cap, and its run limit by the seconds the
        added dollars buy; False when the account has no room."""
        with self._lock:
            attempt = self._attempts.get(task_id)
            account = self._accounts.get(attempt.reservation.budget) if attempt is not None else None
        if attempt is None or account is None:
            return False
        grown = self.ledger.extend(account, attempt.reservation, add_usd)
        self._forget_committed(account.name)
        if grown is None:
            return False
        with self._lock:
            current = self._attempts.get(task_id)
            if current is not None and current.reservation.id == grown.id:
                raised = raised_limit_s(current.max_run_s, add_usd, current.usd_per_hour)
                self._attempts[task_id] = replace(current, reservation=grown, max_run_s=raised)
        return True

    def withdraw(self, task_id: str) -> None:
        with self._lock:
            attempt = self._attempts.pop(task_id, None)
        if attempt is not None:
            self.ledger.release(attempt.reservation)
            self._forget_committed(attempt.reservation.budget)

    def no_agent(self, task: TaskRecord, decision: PlacementResult, now: float) -> None:
        """Provisioning is not the ledger's business (see CloudBurst)."""

    # ---- dispatch listener -------------------------------------------------------------------------
    def on_dispatched(self, task: TaskRecord, decision: PlacementResult) -> None:
        with self._lock:
            attempt = self._attempts.get(task.id)
            if attempt is not None and task.agent_id:
                self._attempts[task.id] = replace(attempt, agent_id=task.agent_id)

    def on_run_ended(self, task: TaskRecord) -> None:
        """The agent reported the end of attempt `task.attempts` (the store records it later):
        settle that attempt now, so its budget room frees with its slot. Another attempt's open
        reservation is left alone; `on_finished` after this finds nothing left to settle."""
        self._settle(task.id, OUTCOMES.get(task.state, task.state), task.finished_at or self._clock(), task.attempts)

    def on_finished(self, task: TaskRecord) -> None:
        self._settle(task.id, OUTCOMES.get(task.state, task.state), task.finished_at or self._clock())

    def on_requeued(self, task: TaskRecord, reason: str) -> None:
        self._settle(task.id, "preempted" if reason == "preempted" else f"requeued:{reason}", self._clock())

    # Outcomes whose billed seconds per frame teach the estimate: a completed run, and a run the
    # agent stopped at its limit (a lower bound of its true time: the next bound grows by the margin).
    TEACHING_OUTCOMES = frozenset({"completed", f"requeued:{RUN_LIMIT}"})

    def _settle(self, task_id: str, outcome: str, ended: float, attempt_number: int | None = None) -> None:
        """Settle the task's open attempt (only attempt `attempt_number` when given), once."""
        with self._lock:
            attempt = self._attempts.get(task_id)
            if attempt is None or attempt_number not in (None, attempt.attempt):
                return
            del self._attempts[task_id]
            account = self._accounts.get(attempt.reservation.budget)
        usage = Usage(
            task_id=task_id,
            project=attempt.project,
            rule=attempt.rule,
            pool=attempt.pool,
            budget=attempt.reservation.budget,
            provider=attempt.provider,
            instance_id=self._instance_of(attempt.agent_id) if attempt.agent_id else "",
            instance_seconds=max(0.0, ended - attempt.admitted_at),
            usd_per_hour=attempt.usd_per_hour,
            ended_at=utc(ended),
            outcome=outcome,
        )
        usd = self.ledger.settle(attempt.reservation, usage, account)
        self._forget_committed(attempt.reservation.budget)
        if outcome in self.TEACHING_OUTCOMES and self._on_completed_run is not None:
            self._on_completed_run(attempt.pool, usage.instance_seconds, attempt.frames)
        log.info(
            "cloud spend settled",
            task_id=task_id,
            budget=usage.budget,
            pool=usage.pool,
            usd=round(usd, 6),
            estimate_usd=round(attempt.reservation.estimate_usd, 6),
            instance_seconds=round(usage.instance_seconds, 3),
            outcome=outcome,
        )

    def open_attempts(self) -> dict[str, Attempt]:
        with self._lock:
            return dict(self._attempts)

    # ---- internals ---------------------------------------------------------------------------------
    def _forget_committed(self, budget: str) -> None:
        with self._lock:
            self._committed.pop(budget, None)
            self._room_changes += 1

    def _release_orphans_once(self) -> None:
        """First admit in this process (it just became leader): reservations of a previous leader
        belong to tasks that reconcile re-queued, so they would otherwise be counted twice."""
        if self._adopted:
            return
        self._adopted = True
        with self._lock:
            mine = {a.reservation.id for a in self._attempts.values()}
        orphans = [r for r in self.ledger.open_reservations() if r.id not in mine]
        for reservation in orphans:
            self.ledger.release(reservation)
        if orphans:
            log.info("released reservations of a previous leader", count=len(orphans))
            with self._lock:
                self._committed.clear()
                self._room_changes += 1
