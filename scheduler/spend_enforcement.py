"""Spend enforced while a cloud run goes on (the budget's hard cap, invariant 3; cf. Slurm GrpTRESMins).

Every `step_s` the enforcer looks at each open cloud attempt (scheduler.cloud.budget_gate): its
accrued cost is price x seconds since its reservation. The reservation should cover the accrued
cost plus what the run still needs: two steps ahead, or less when the agent's progress says the run
ends sooner (remaining frames at the pace so far). When it does not, the enforcer extends it in the
ledger under the same atomic cap check as a new reservation. When the account has no room left and
the run has used up its reservation, it stops the run (a run that may still end within its
reservation goes on): the agent is told to cancel (CancelTask), and its CANCELLED report re-queues the task with the
reason (on-prem may take it; placement's budget filter keeps it off the paid pool while the cap is
full). The stop is audited (`budget_stop`) and recorded in the task's history, which `facefleet
explain` shows.

Bound: reservations never exceed the cap, and a run is stopped at the first step at which its
accrued cost has reached its reservation, so it accrues beyond its reservation for at most one step
plus the time its agent takes to stop: spend <= cap + sum over running cloud tasks of price x (step
+ stop time) (docs/finance.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from facefleet.scheduler.cloud.budget_gate import BudgetGate

log = structlog.get_logger()

BUDGET_STOP = "budget stop"  # how a stop's reason begins (history, explain)
StopRun = Callable[[str, str], bool]  # (task id, why) -> stop sent (False: no live run of it here)
AuditHook = Callable[[str, dict[str, Any]], None]
ProgressOf = Callable[[str], tuple[int, int] | None]  # task id -> (frames done, frames total) of its run


class SpendEnforcer:
    def __init__(
        self,
        budgets: BudgetGate,
        stop_run: StopRun,
        step_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        audit: AuditHook | None = None,
        progress_of: ProgressOf = lambda _task_id: None,
    ) -> None:
        self.budgets = budgets
        self._progress_of = progress_of
        self.step_s = step_s
        self._stop_run = stop_run
        self._clock = clock
        self._audit = audit
        self._stopping: dict[str, float] = {}  # task id -> when the stop was sent
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
        while not self._halt.wait(self.step_s):
            try:
                self.tick(self._clock())
            except Exception:  # the ledger may blip; the next tick tries again
                log.exception("spend enforcement tick failed")

    def tick(self, now: float) -> list[str]:
        """One accrual step over every open attempt; returns the tasks told to stop."""
        attempts = self.budgets.open_attempts()
        for gone in set(self._stopping) - set(attempts):
            del self._stopping[gone]
        stopped: list[str] = []
        for task_id, attempt in attempts.items():
            if task_id in self._stopping:
                continue
            rate = attempt.usd_per_hour / 3600.0
            needed = attempt.accrued_usd(now) + self._ahead_s(task_id, now - attempt.admitted_at) * rate
            short = needed - attempt.reservation.estimate_usd
            if short <= 0:
                continue
            # Grow by a few steps at once (fewer ledger transactions for a long run), else by what is short.
            if self.budgets.extend(task_id, max(short, 4 * self.step_s * rate)) or self.budgets.extend(task_id, short):
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

    def _ahead_s(self, task_id: str, elapsed_s: float) -> float:
        """Seconds of run the reservation must cover beyond now: two steps, or the remaining frames
        at the pace so far when the agent has reported progress and that is less."""
        ahead = 2 * self.step_s
        progress = self._progress_of(task_id)
        if progress is not None:
            done, total = progress
            if 0 < done <= total:
                ahead = min(ahead, elapsed_s * (total - done) / done)
        return ahead
