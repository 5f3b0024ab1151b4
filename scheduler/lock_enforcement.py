"""Compliance locks in the running scheduler: the live re-check before each RPC, and what happens
to tasks already on their way to the cloud when a project gets locked.

`LockGate` is a writer-preferring readers-writer lock around admissions. A dispatch worker holds it
shared from its live lock check (read from the rules source now, not the pass's snapshot) until the
agent has answered; applying a lock change holds it exclusively. So every admission decided on the
old locks has finished, and its task is visible in flight, before the lock is enforced; every later
admission sees the new lock.

`LockEnforcer` runs when the set of locked projects changes (rules source subscription: file watch,
Consul watch, or Admin.LockProject). It asks `residency.lock_actions` what to do:
- REPLACE (placed for a non-private pool, not yet sent): back to the queue, placed again with the lock.
- STOP_AND_RERUN_ONPREM (dispatched/running on a non-private agent): re-queued first (so the agent's
  CANCELLED answer cannot end the task), its checkpoint discarded, then cancelled on the agent. It
  re-runs on-prem from frame 0: a checkpoint written in the cloud is not trusted or moved.
Queued tasks need nothing: every dispatch pass places them again with the live locks.

After a scheduler (re)start the agents have not reported yet, so the zone of a task a previous
leader left on an agent is unknown for a while. Treating that as "not private" re-queued work that
was running on-prem and ran it twice; instead such a task waits up to `unknown_wait_s` (the time
an agent has to report before it is declared lost) and is checked again as agents report.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import structlog

from facefleet.domain import PLACED, PRIVATE_ZONE, QUEUED, state_to_proto
from facefleet.scheduler.dispatcher import AuditHook
from facefleet.scheduler.store import IllegalTransition, TaskRecord, TaskStore
from facefleet.security.residency import LockActionKind, TaskLocation, lock_actions

log = structlog.get_logger()

UNKNOWN_ZONE = "unknown"  # a pool or agent we cannot place in a zone counts as not private
WRITER_WAIT_S = 15.0


class LockSource(Protocol):
    def current(self) -> Any: ...  # ActiveConfig with .locks


class Canceller(Protocol):
    def cancel_on_agent(self, task_id: str, agent_id: str | None, reason: str) -> bool: ...


class ZoneDirectory(Protocol):
    def get(self, agent_id: str) -> Any: ...  # AgentRecord | None (.trust_zone, .pool)

    def request_cancel(self, agent_id: str, task_id: str) -> None: ...  # carried by its next control


class LockGate:
    """Writer-preferring readers-writer lock plus the live lock lookup the dispatcher uses."""

    def __init__(self, rules: LockSource) -> None:
        self.rules = rules
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def project_locked(self, project: str) -> bool:
        return project in (self.rules.current().locks or {})

    @contextmanager
    def admitting(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def enforcing(self, wait_s: float = WRITER_WAIT_S) -> Iterator[bool]:
        """Exclusive; yields False when admissions did not drain within `wait_s` (enforce anyway)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                exclusive = not (self._writer or self._readers)
                if exclusive:
                    self._writer = True
            finally:
                self._writers_waiting -= 1
        if not exclusive:
            log.error("lock_enforcement_not_exclusive", waited_s=wait_s, message="admissions still in flight")
        try:
            yield exclusive
        finally:
            with self._cond:
                if exclusive:
                    self._writer = False
                self._cond.notify_all()


def _proto_state(state: str) -> int:
    return state_to_proto(state)


class LockEnforcer:
    def __init__(
        self,
        store: TaskStore,
        rules: LockSource,
        gate: LockGate,
        canceller: Canceller,
        agents: ZoneDirectory,
        pool_zones: Callable[[], dict[str, str]],
        audit: AuditHook | None = None,
        clock: Callable[[], float] = time.time,
        unknown_wait_s: float = 0.0,
    ) -> None:
        self.store = store
        self.rules = rules
        self.gate = gate
        self.canceller = canceller
        self.agents = agents
        self.pool_zones = pool_zones
        self.audit = audit
        self.clock = clock
        self._known: frozenset[str] | None = None
        self._apply_lock = threading.Lock()
        self.unknown_wait_s = unknown_wait_s
        self._unknown_until = clock() + unknown_wait_s
        self._recheck: threading.Timer | None = None

    def on_rules(self, active: Any) -> None:
        """Rules-source subscriber: enforce when the set of locked projects changed."""
        locked = frozenset(active.locks or {})
        with self._apply_lock:
            if locked == self._known:
                return
            newly = sorted(locked - (self._known or frozenset()))
            self._known = locked
            if newly:
                log.info("projects_locked", projects=newly)
            self._enforce(locked)

    def enforce_now(self) -> int:
        """Apply the current locks (at start-up, and for tests); returns the number of actions."""
        with self._apply_lock:
            self._known = frozenset(self.rules.current().locks or {})
            return self._enforce(self._known)

    def _zone_of(self, record: TaskRecord, pools: dict[str, str]) -> str:
        if record.state in (PLACED, QUEUED):
            return pools.get(record.pool or "", UNKNOWN_ZONE) if record.pool else ""
        agent = self.agents.get(record.agent_id) if record.agent_id else None
        zone = getattr(agent, "trust_zone", "") or pools.get(record.pool or "", "")
        return zone or UNKNOWN_ZONE

    def _enforce(self, locked: Collection[str]) -> int:
        with self.gate.enforcing():
            pools = self.pool_zones()
            records = {record.id: record for record in self.store.in_flight()}
            locations = []
            waiting = self.clock() < self._unknown_until
            unknown = False
            for record in records.values():
                zone = self._zone_of(record, pools)
                if zone == UNKNOWN_ZONE and waiting and record.state not in (PLACED, QUEUED):
                    unknown = True  # its agent has not reported to this scheduler yet
                    continue
                sensitivity = record.task().sensitivity
                state = _proto_state(record.state)
                locations.append(TaskLocation(record.id, record.project, state, zone, record.pool or "", sensitivity))
            actions = lock_actions(locked, locations)
            stopped: list[tuple[TaskRecord, str]] = []
            for action in actions:
                record = records[action.task_id]
                if action.kind == LockActionKind.REPLACE:
                    self._replace(record, action.reason)
                elif self._stop(record, action.reason):
                    stopped.append((record, action.reason))
            # Every stop is queued for its agent before any is sent, so the first control an agent
            # gets recalls all of them at once: a slot freed by one recalled run never starts
            # another one the agent holds waiting (prefetch).
            for record, _reason in stopped:
                if record.agent_id:
                    self.agents.request_cancel(record.agent_id, record.id)
            for record, reason in stopped:
                self._recall(record, reason)
                if self.audit is not None:
                    try:
                        self.audit(
                            "lock_action",
                            {"task": action.task_id, "project": action.project, "action": action.kind.value,
                             "pool": action.pool, "reason": action.reason},
                        )  # fmt: skip
                    except Exception:
                        log.exception("audit_write_failed", task_id=action.task_id)
        if unknown:
            self._check_again()
        return len(actions)

    def stop(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()

    def _check_again(self, after_s: float = 0.5) -> None:
        """Enforce the current locks again soon: some tasks' agents have not reported yet."""
        if self._recheck is not None and self._recheck.is_alive():
            return

        def recheck() -> None:
            try:
                self.enforce_now()
            except Exception:
                log.exception("lock enforcement re-check failed")

        self._recheck = threading.Timer(after_s, recheck)
        self._recheck.daemon = True
        self._recheck.start()

    def _replace(self, record: TaskRecord, reason: str) -> None:
        moved = self.store.transition(
            record.id, QUEUED, f"re-placing: {reason}", self.clock(), expect_from=PLACED, agent_id=""
        )
        log.info("lock_replace", task_id=record.id, project=record.project, moved=moved)

    def _stop_and_rerun(self, record: TaskRecord, reason: str) -> None:
        if self._stop(record, reason):
            self._recall(record, reason)

    def _stop(self, record: TaskRecord, reason: str) -> bool:
        """Back to the queue, pinned on-prem by the lock; False when it finished or moved meanwhile."""
        now = self.clock()
        try:
            moved = self.store.transition(
                record.id,
                QUEUED,
                f"stopped to re-run on-prem from the start: {reason}",
                now,
                expect_agent=record.agent_id,  # not expect_from: it may have gone dispatched -> running meanwhile
                agent_id="",  # the old agent's late answers no longer match this task
                not_before=now,
                fresh_start=True,  # in the same commit: no pass may resume it from the cloud's checkpoint
            )
        except IllegalTransition:  # back in the queue meanwhile (reconciled, agent lost): placement pins it
            moved = False
        if not moved:
            log.info("lock_stop_skipped", task_id=record.id, reason="finished or moved to another agent meanwhile")
            return False
        return True

    def _recall(self, record: TaskRecord, reason: str) -> None:
        """Stop the run on its agent (the task is queued already)."""
        reached = self.canceller.cancel_on_agent(record.id, record.agent_id, f"compliance: {reason}")
        log.warning(
            "lock_stop_and_rerun",
            task_id=record.id,
            project=record.project,
            agent_id=record.agent_id,
            cancel_reached=reached,
            zone_required=PRIVATE_ZONE,
        )


class EnforcingRuleSource:
    """The rule source as the Admin service sees it: LockProject/UnlockProject return only after the
    lock actions ran (a watcher thread may have picked the change up first; this waits for it)."""

    def __init__(self, rules: Any, enforcer: LockEnforcer) -> None:
        self._rules = rules
        self._enforcer = enforcer

    def set_lock(self, project: str, reason: str, by: str) -> Any:
        result = self._rules.set_lock(project, reason, by)
        self._enforcer.on_rules(self._rules.current())
        return result

    def remove_lock(self, project: str) -> Any:
        result = self._rules.remove_lock(project)
        self._enforcer.on_rules(self._rules.current())
        return result

    def __getattr__(self, name: str) -> Any:  # current, reload, set_budget, ...
        return getattr(self._rules, name)
