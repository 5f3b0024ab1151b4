"""Spend enforced while a cloud run goes on (the budget's hard cap, invariant 3; cf. Slurm GrpTRESMins).

Every `step_s` of its own, counted from its reservation, the enforcer looks at each open cloud
attempt (scheduler.cloud.budget_gate): when a run's limit is checked and grown does not depend on
when other runs started, and `facefleet simulate` steps each run the same way. Its
reservation is price x (its hard run-time limit + slack), and its agent stops the run at that
limit (RunTaskRequest.max_run_s). The limit should stay ahead of the run: by what the run still
needs (two steps, or less when the agent's progress says the run ends sooner: remaining frames at
the pace so far) plus `limit_lead_s`, the time a raised limit takes to reach the agent (a
heartbeat interval). When it is not, the enforcer extends the reservation in the ledger under the
same atomic cap check as a new reservation, which raises the limit by the seconds the added dollars
buy, and sends the new limit to the agent (`raise_limit`: the heartbeat reply's `run_limits`).

When the account has no room left, the agent stops the run itself at its limit (CANCELLED, "run-time
limit reached"; the dispatcher re-queues the task: on-prem may take it, placement's budget filter
keeps it off the paid pool while the cap is full). Backstop, for an agent that does not stop: once
the run has accrued its whole reservation the enforcer stops it (CancelTask, heartbeat fallback);
its CANCELLED report re-queues the task with the reason, audited (`budget_stop`) and recorded in
the task's history, which `facefleet explain` shows.

Bound (docs/finance.md): reservations never exceed the cap, and a run bills from its reservation
to its recorded end: at most its limit plus the latency its agent's clock does not see (dispatch
before the start, stop and report after), which the reservation's slack covers. Beyond the slack,
the backstop stops it within one step plus its stop time: spend <= cap + sum over running cloud
tasks of price x min(max(0, dispatch + stop latency - slack), step + stop time).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import structlog

from facefleet.domain import RUN_LIMIT_REACHED
from facefleet.scheduler.cloud.budget_gate import BudgetGate

log = structlog.get_logger()

BUDGET_STOP = "budget stop"  # how a stop's reason begins (history, explain)
# How the history of a run stopped for money begins (`facefleet explain` shows the latest): its
# agent reached the run's limit (the reservation could not grow), or this backstop stopped it.
MONEY_STOPS = (RUN_LIMIT_REACHED, BUDGET_STOP)
StopRun = Callable[[str, str], bool]  # (task id, why) -> stop sent (False: no live run of it here)
RaiseLimit = Callable[[str, int, float], None]  # (task id, attempt, new max_run_s) -> sent to its agent
AuditHook = Callable[[str, dict[str, Any]], None]
ProgressOf = Callable[[str], tuple[int, int] | None]  # task id -> (frames done, frames total) of its run
STEP_WAKES = 50  # the enforcer wakes at most this many times a step (runs due close together share one)


def run_ahead_s(step_s: float, elapsed_s: float, progress: tuple[int, int] | None) -> float:
    """Seconds of run the reservation must cover beyond now: two steps, or the remaining frames at
    the pace so far when the agent has reported progress (frames done, total) and that is less."""
    ahead = 2 * step_s
    if progress is not None:
        done, total = progress
        if 0 < done <= total:
            ahead = min(ahead, elapsed_s * (total - done) / done)
    return ahead


def limit_shortfall_usd(
    max_run_s: float, usd_per_hour: float, elapsed_s: float, ahead_s: float, lead_s: float
) -> float:
    """What a run's limit lacks to stay ahead of the run by `ahead_s` + `lead_s`, in dollars (> 0: extend)."""
    return (elapsed_s + ahead_s + lead_s - max_run_s) * usd_per_hour / 3600.0


def extension_tries_usd(short_usd: float, step_s: float, usd_per_hour: float) -> tuple[float, float]:
    """The extensions to try in turn: a few steps at once (fewer ledger transactions), else what is short."""
    return max(short_usd, 4 * step_s * usd_per_hour / 3600.0), short_usd


class SpendEnforcer:
    def __init__(
        self,
        budgets: BudgetGate,
        stop_run: StopRun,
        step_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        audit: AuditHook | None = None,
        progress_of: ProgressOf = lambda _task_id: None,
        raise_limit: RaiseLimit = lambda _task_id, _attempt, _max_run_s: None,
        limit_lead_s: float = 0.0,
    ) -> None:
        self.budgets = budgets
        self._raise_limit = raise_limit
        self.limit_lead_s = limit_lead_s
        self._progress_of = progress_of
        self.step_s = step_s
        self._stop_run = stop_run
        self._clock = clock
        self._audit = audit
        self._stopping: dict[str, float] = {}  # task id -> when the stop was sent
        self._stepped: dict[str, int] = {}  # reservation id -> the last step of its own looked at
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="spend-enforcer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        wait = self.step_s
        while not self._halt.wait(wait):
            try:
                wait = self.steps_due(self._clock())
            except Exception:  # the ledger may blip; the next step tries again
                log.exception("spend enforcement tick failed")
                wait = self.step_s

    def steps_due(self, now: float) -> float:
        """Step the attempts that have reached a step of their own (admitted + k x `step_s`, k >= 1)
        since they were last looked at; returns the seconds until the next one is due."""
        attempts = self.budgets.open_attempts()
        steps = {a.reservation.id: math.floor((now - a.admitted_at) / self.step_s + 1e-9) for a in attempts.values()}
        self._stepped = {rid: k for rid, k in self._stepped.items() if rid in steps}
        due = [t for t, a in attempts.items() if steps[a.reservation.id] > self._stepped.get(a.reservation.id, 0)]
        if due:
            self.tick(now, due)
            self._stepped.update((attempts[t].reservation.id, steps[attempts[t].reservation.id]) for t in due)
        nexts = [a.admitted_at + (self._stepped.get(a.reservation.id, 0) + 1) * self.step_s for a in attempts.values()]
        # At most STEP_WAKES wake-ups a step however many runs are open (a step may come that much late).
        return min([self.step_s, *(max(self.step_s / STEP_WAKES, at - now) for at in nexts)])

    def tick(self, now: float, only: Collection[str] | None = None) -> list[str]:
        """One accrual step over every open attempt (or the tasks in `only`); returns the tasks told to stop."""
        attempts = self.budgets.open_attempts()
        for gone in set(self._stopping) - set(attempts):
            del self._stopping[gone]
        stopped: list[str] = []
        for task_id, attempt in attempts.items():
            if task_id in self._stopping or (only is not None and task_id not in only):
                continue
            rate = attempt.usd_per_hour / 3600.0
            elapsed = now - attempt.admitted_at  # >= the agent's own clock, which starts after this
            ahead = run_ahead_s(self.step_s, elapsed, self._progress_of(task_id))
            if attempt.max_run_s > 0:  # the limit must stay ahead, and a raise must reach the agent first
                short = limit_shortfall_usd(attempt.max_run_s, attempt.usd_per_hour, elapsed, ahead, self.limit_lead_s)
            else:
                short = attempt.accrued_usd(now) + ahead * rate - attempt.reservation.estimate_usd
            if short <= 0:
                continue
            if any(
                self.budgets.extend(task_id, usd)
                for usd in extension_tries_usd(short, self.step_s, attempt.usd_per_hour)
            ):
                grown = self.budgets.open_attempts().get(task_id)
                if grown is not None and grown.max_run_s > 0:
                    self._raise_limit(task_id, grown.attempt, grown.max_run_s)
                continue
            if attempt.accrued_usd(now) < attempt.reservation.estimate_usd:
                continue  # no room to grow, but the run may still end within its reservation
            why = (
                f"{BUDGET_STOP}: run on {attempt.pool} reached its reservation "
                f"${attempt.reservation.estimate_usd:.4f} (accrued ${attempt.accrued_usd(now):.4f}) and budget "
                f"{attempt.reservation.budget} has no room under its cap to extend it; re-queued, on-prem may take it"
            )
            if not self._stop_run(task_id, why):
                continue  # not launched yet or already ending: look again next step
            self._stopping[task_id] = now
            stopped.append(task_id)
            log.warning(
                "budget stop",
                task_id=task_id,
                budget=attempt.reservation.budget,
                pool=attempt.pool,
                reserved_usd=round(attempt.reservation.estimate_usd, 6),
                accrued_usd=round(attempt.accrued_usd(now), 6),
            )
            if self._audit is not None:
                self._audit(
                    "budget_stop",
                    {
                        "task_id": task_id,
                        "project": attempt.project,
                        "budget": attempt.reservation.budget,
                        "pool": attempt.pool,
                        "reserved_usd": round(attempt.reservation.estimate_usd, 6),
                        "accrued_usd": round(attempt.accrued_usd(now), 6),
                    },
                )
        return stopped
