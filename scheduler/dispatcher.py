"""Leader-only dispatch loop: queue -> placement -> agent session -> progress -> completion.

One loop thread runs dispatch passes: the pass planner (`scheduler.pass_planner`, the same one
`facefleet simulate` runs) plans each pass over a world snapshot (queue order with aging, project
limits, placement, the budget gate, slot accounting), and the dispatcher applies its plan: records
decisions, re-checks residency, reserves an agent slot of the chosen pool and the ledger's budget,
and sends the pass's launches to each agent's session (`scheduler.agent_sessions`) as one message
of assignments per agent. The agent's batched updates and refusals arrive on the sessions' inbox
thread: running marks and progress of a batch are one store transaction, ending states go to the
completion batcher. An agent that only heartbeats (no session: an older agent during a rolling
upgrade) gets one RunTask stream per task on the agent-streams event loop
(`scheduler.agent_streams`) instead. Terminal states go to the completion
batcher (`scheduler.completion_batch`: one commit for every completion pending, recorded once: the
store ignores a second completion). Failures go back to the queue with an
exponential backoff (tenacity's wait strategy computes `not_before`) and resume from the latest
checkpoint any agent reported.

Exactly-once outcomes (with the agents' run journals, `agent.run_journal`): every RunTask carries
the attempt and this leader's term (raised in the store each time leadership is gained); agents
refuse older terms. A run whose stream ends without an outcome (scheduler restart, broken
stream, agent restart) is *unresolved*, not re-queued: the dispatcher asks the agent that holds it,
through the inventory its heartbeats carry (runs going, outcomes not yet acknowledged). Reported
running: re-attach (same attempt); reported finished: record the outcome; not reported in an
inventory built after the run went unresolved, or the agent lost: re-queue. An outcome reported
for a superseded run is a duplicate: audited and counted, never a second completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Protocol

import grpc
import structlog
import tenacity

from facefleet import loop_calls
from facefleet.domain import (
    CANCELLED,
    DISPATCHED,
    FAILED,
    IN_FLIGHT,
    PLACED,
    PREEMPTED,
    QUEUED,
    RUN_LIMIT,
    RUN_LIMIT_REACHED,
    RUNNING,
    TERMINAL,
    state_from_proto,
    state_to_proto,
)
from facefleet.grpc_server import LoopThread
from facefleet.rpc_errors import field_of
from facefleet.scheduler import metrics, queue
from facefleet.scheduler.agent_sessions import AgentSession, AgentSessions
from facefleet.scheduler.agent_streams import AgentStreams, AioChannelFactory
from facefleet.scheduler.completion_batch import Completion, CompletionBatcher
from facefleet.scheduler.group_commit import GroupCommitter, Offered
from facefleet.scheduler.leader import DEFAULT_LOCK_NAME
from facefleet.scheduler.pass_planner import (
    MAX_MISSES_PER_PASS,
    MAX_TASKS_PER_PASS,
    Action,
    PassPlanner,
    PassRules,
    PassWorld,
    Planned,
    Waiting,
)
from facefleet.scheduler.placement.model import World
from facefleet.scheduler.placement.proto_codec import task_spec_from_proto
from facefleet.scheduler.placement_gateway import PlacementResult, Placer, WorldSnapshot, residency_violation
from facefleet.scheduler.queue_read import READ_AHEAD, Marks, QueueRead, ReadAhead, still_valid
from facefleet.scheduler.store import (
    Change,
    IllegalTransition,
    Placement,
    Step,
    TaskRecord,
    TaskStore,
)
from facefleet.security.audit import Entry
from facefleet.v1 import agent_pb2, scheduler_pb2, types_pb2

log = structlog.get_logger()


class AgentDirectory(Protocol):
    """What the dispatcher needs from scheduler.capacity.AgentRegistry."""

    def reserve(self, pool: str, task_id: str, now: float) -> Any: ...  # AgentRecord | None
    def note_finished(self, agent_id: str, task_id: str) -> None: ...
    def sweep(self, now: float) -> list[Any]: ...
    def lost_since(self, agent_id: str) -> float | None: ...
    def get(self, agent_id: str) -> Any: ...
    def request_cancel(self, agent_id: str, task_id: str) -> None: ...
    def raise_run_limit(self, task_id: str, attempt: int, max_run_s: float) -> None: ...
    def set_leader_term(self, term: int) -> None: ...
    def inventory(self, agent_id: str) -> tuple[int, dict[str, types_pb2.RunReport]] | None: ...
    def take_outcomes(self) -> list[tuple[str, types_pb2.RunReport]]: ...
    def acknowledge(self, agent_id: str, task_id: str, attempt: int) -> None: ...
    def control(self, agent_id: str) -> scheduler_pb2.HeartbeatResponse: ...
    def note_session(self, agent_id: str, is_open: bool) -> None: ...


class PassRecords(Protocol):
    """The audit records a launch commits with (`audit_trail.AuditTrail`)."""

    def launch_records(self, task: TaskRecord, decision: PlacementResult) -> list[Entry]: ...
    def staged(self, row_id: str, records: Sequence[Entry]) -> None: ...  # committed as store row `row_id`
    # Staged rows nobody writes (staged before `staged_before`, None = all): a leader starts with these.
    def write_leftovers(self, staged_before: float | None = None) -> int: ...


_Staged = tuple[str, list[Entry]] | None  # a commit's staged audit row and its records


class DispatchListener(Protocol):
    """Hook for the cloud budget ledger and the audit log. Optional hooks, looked up by name:
    `on_run_ended(task)` (an agent reported the run's end; before its slot frees and before the
    store records it) and `on_requeued(task, reason)`. (A launch's audit records are `PassRecords`.)"""

    def on_dispatched(self, task: TaskRecord, decision: PlacementResult) -> None: ...
    def on_finished(self, task: TaskRecord) -> None: ...


class DispatchGate(Protocol):
    """The last word before a launch (cloud budget reservation) and the provisioning trigger."""

    def admit(self, task: TaskRecord, decision: PlacementResult, now: float) -> str: ...  # "" = go, else why not
    def withdraw(self, task_id: str) -> None: ...  # an admitted launch that did not happen after all
    def no_agent(self, task: TaskRecord, decision: PlacementResult, now: float) -> None: ...  # pool chosen, no agent
    def run_limit_s(self, task_id: str) -> float: ...  # the run bound an admitted launch reserved (0 = none)


AuditHook = Callable[[str, dict[str, Any]], None]


class AdmissionGate(Protocol):
    """Live residency check right before the RPC (scheduler.lock_enforcement.LockGate).

    `admitting()` is held from the check until the agent answered (or the call failed), so a lock
    change waits for admissions decided on the old locks and then sees them as in flight."""

    def admitting(self) -> Any: ...  # context manager
    def project_locked(self, project: str) -> bool: ...


@dataclass(frozen=True)
class DispatcherSettings:
    project_limits: Mapping[str, int]
    aging_s: float = queue.DEFAULT_AGING_S
    lost_grace_s: float = 20.0
    max_attempts: int = 10
    workers: int = 256
    batch: int = MAX_TASKS_PER_PASS  # queued tasks one pass considers at most
    idle_sleep_s: float = 0.05
    max_misses_per_pass: int = MAX_MISSES_PER_PASS  # tasks in a row that did not launch before a pass ends
    # After gaining leadership, capacity knows only agents that have heartbeated since: a `reject`
    # ("no known pool may run this") is not final until every live agent has had time to report.
    warmup_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    rpc_connect_timeout_s: float = 5.0
    # Completions wait this long for company before their commit: fewer, larger commits (and audit
    # batches) while work flows; what a watcher sees as finished lags by at most this much. (The
    # agent's slot is free at once; at 100 tasks/s, 0.05 s made 178 commits of 1,050 completions
    # instead of 585 with 0.01 s, and took 0.5 ms of scheduler CPU off each task.)
    completion_linger_s: float = 0.05
    # Under per-project limits a project's count drops only when its completions commit: shorter.
    completion_linger_limited_s: float = 0.01
    # A submit offered while a pass runs waits for the next pass (stored with its launch) if this
    # pass began less than this long ago; otherwise the intake stores it at once (`offer`).
    offer_while_busy_s: float = 0.02
    # Recording a batch of completions waits at most this long for the dispatch path to go quiet.
    completion_give_way_s: float = 0.02
    # A run went unresolved on an agent this leader has not heard from: re-queue after this long.
    inventory_wait_s: float = 15.0
    leader_lock_name: str = DEFAULT_LOCK_NAME
    # A leader writes the audit records left staged this long or longer (their log write failed)
    # this often; at leadership it writes all that are left (`PassRecords.write_leftovers`).
    leftover_records_s: float = 60.0


def backoff_until(attempt: int, now: float, settings: DispatcherSettings) -> float:
    """When a task that failed its `attempt`-th try may run again (exponential, jittered)."""
    wait = tenacity.wait_exponential_jitter(
        multiplier=settings.backoff_initial_s, max=settings.backoff_max_s, jitter=settings.backoff_initial_s
    )
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, attempt)
    return now + float(wait(state))


@dataclass(frozen=True)
class _Unresolved:
    """A run whose stream ended without an outcome: wait for its agent's word before re-queuing."""

    record: TaskRecord  # as in the store (attempts counts this run)
    agent_id: str
    since: float
    inventories_at: int  # the agent's inventory count then: two more and one was built after


@dataclass
class _Assignment:
    """A run sent on an agent's session, until its ending update, refusal or the session's end."""

    record: TaskRecord  # as dispatched
    attempt: int
    placed_at: float
    admitting: Any  # the lock gate's admission, held until the agent's first word on it (None: released)
    running: bool  # the store has it RUNNING


@dataclass(frozen=True)
class _Launch:
    record: TaskRecord
    result: PlacementResult
    agent_id: str
    address: str
    request: agent_pb2.RunTaskRequest
    change: Change

    @cached_property
    def sent(self) -> TaskRecord:
        """The task as its launch sends it: on the chosen pool and agent."""
        return self.record.evolve(pool=self.result.pool, agent_id=self.agent_id)


@dataclass(frozen=True)
class _Queued:
    """A queued task as the pass read it (the planner's `Waiting.handle`)."""

    record: TaskRecord
    task: types_pb2.Task


class Dispatcher:
    def __init__(
        self,
        store: TaskStore,
        placer: Placer,
        agents: AgentDirectory,
        settings: DispatcherSettings,
        is_leader: Callable[[], bool] = lambda: True,
        channel_for: AioChannelFactory | None = None,
        listeners: Sequence[DispatchListener] = (),
        audit: AuditHook | None = None,
        records: PassRecords | None = None,
        clock: Callable[[], float] = time.time,
        gate: DispatchGate | None = None,
        admission: AdmissionGate | None = None,
        loop: LoopThread | None = None,
    ) -> None:
        self.store = store
        self.placer = placer
        self.agents = agents
        self.settings = settings
        self.is_leader = is_leader
        self.listeners = list(listeners)
        self.audit = audit
        self.records = records
        self.clock = clock
        self.gate = gate
        self.admission = admission
        self._streams = AgentStreams(channel_for or grpc.aio.insecure_channel, loop)
        # Agents' sessions (the gRPC service serves them; this dispatcher listens on their inbox).
        self.sessions = AgentSessions(self)
        self._session_agents: set[str] = set()  # agents that opened one: never sent a RunTask
        # task id -> (RunTask call or _Assignment, agent id): the runs this dispatcher follows.
        self._calls: dict[str, tuple[Any, str]] = {}
        self._stopping: dict[str, str] = {}  # task id -> why: its CANCELLED report re-queues it (stop_run)
        self._calls_lock = threading.Lock()
        self._lost_agents: dict[str, float] = {}
        self._workers = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="dispatch")
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when a slot frees up: run the next pass now
        self._cut_short = False  # the last pass stopped at its size limit (`PassPlanner.cut_short`)
        # A slot freed by a completion is worth a pass only when tasks are waiting: the last pass
        # left some in the queue (or did not read all of it). A queue the last pass emptied gets
        # new tasks only through paths that wake the loop themselves (intake, requeues).
        self._queue_waiting = True
        # The queue the last pass read but did not take (`queue_read`; an empty one that reached the
        # end of the queue spares the next pass its store read too), and whether store reads fetch
        # `READ_AHEAD` tasks (the last read-ahead was still valid when the next pass came).
        self._read_ahead: ReadAhead | None = None
        self._read_wide = False
        self._not_committed = 0  # passes whose launches or queue decisions did not commit (tasks as before)
        self._intake_commits = 0  # intake commits that stored queued tasks (`queue_grew`)
        self._slot_freed = False  # a completion freed a slot since the pass began
        # A slot is free as soon as its stream ends (which wakes the loop). A recorded completion
        # wakes it only under per-project limits (counted in the store); what else it changes (a
        # budget settled) the next pass sees, at most `idle_sleep_s` later.
        self._completions = CompletionBatcher(
            store.apply_changes,
            self._completion_recorded,
            self._wake.set if settings.project_limits else lambda: None,
            linger_s=settings.completion_linger_limited_s if settings.project_limits else settings.completion_linger_s,
            on_refused=self._completion_refused,
            give_way=self.wait_quiet,
        )
        self.term = 0  # this leader's term; 0 while not leading
        self._unresolved: dict[str, _Unresolved] = {}  # task id -> run; workers add, the loop settles
        self._unresolved_lock = threading.Lock()
        # Tasks of pipelined passes whose commit has not finished: id -> project ("" = not launched).
        self._uncommitted: dict[str, str] = {}
        self._uncommitted_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._was_leader = False
        self._leader_since = 0.0
        self._leftovers_due = 0.0  # when this leader next looks for audit records left staged
        # Launches with their intake (`take_intake`): submits offered while the loop leads (`offer`).
        self.committer: GroupCommitter | None = None
        self._offer_lock = threading.Lock()
        self._quiet = threading.Condition(self._offer_lock)  # notified as the loop goes idle
        self._accepting = False  # leading with an intake to take from (`offer`)
        self._idle = False  # the loop waits for a wake-up
        self._busy_since = 0.0  # when the running pass began (monotonic)
        self._offered: list[Offered] = []

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._offer_lock:
            self._accepting = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._hand_back(self._take_offered())  # offered but not stored: the intake stores them
        self._streams.close()  # cancels every stream; their clean-up hands work to the pool
        self.sessions.close()  # ends the sessions; what agents sent so far is handled first
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._completions.close()  # records what the streams handed over

    def wake(self) -> None:
        """Run the next pass now (new tasks were stored), instead of after the idle sleep."""
        self._wake.set()

    def queue_grew(self) -> None:
        """The intake committed queued tasks (its own commit, not a launch's): the next pass reads
        the queue, and runs now."""
        self._intake_commits += 1
        self._wake.set()

    def _queue_marks(self) -> Marks:
        """What this process has done to the queue (stored new tasks, re-queued, taken out other
        than by launching, planned what then did not commit) and the leader term: a read of the
        queue stays good only while these stay the same."""
        return self._intake_commits, self.store.requeues, self.store.unqueued, self._not_committed, self.term

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._set_idle(False)  # a pass begins: offers join the next one only while it is young
            try:
                worked = self.step(pipelined=True)
            except Exception:
                log.exception("dispatcher pass failed; retrying")
                worked = 0
            # Straight on only when the pass stopped at its size limit with launches: otherwise the
            # next pass has nothing new to find until something wakes the loop (a submit, a freed
            # slot), and an eager one would only compete with this pass's commit for the GIL.
            if (not worked or not self._cut_short) and not (self._slot_freed and self._queue_waiting):
                self._set_idle(True)
                self._wake.wait(self.settings.idle_sleep_s)
                self._wake.clear()

    def step(self, pipelined: bool = False) -> int:
        """One pass (leader only): reconcile on gaining leadership, handle lost agents, dispatch."""
        self._slot_freed = False  # seen by this pass (and never by a standby's or a failing loop's)
        offered = self._take_offered()
        try:
            return self._step(pipelined, offered)
        finally:
            self._hand_back(offered)  # whatever the pass did not store (it empties the list when it does)

    def _step(self, pipelined: bool, offered: list[Offered]) -> int:
        leader = self.is_leader()
        metrics.LEADER.set(1 if leader else 0)
        if not leader:
            if self._was_leader:
                self.term = 0
                self.agents.set_leader_term(0)
            self._was_leader = False
            return 0
        now = self.clock()
        if not self._was_leader:
            self.term = self.store.next_leader_term(self.settings.leader_lock_name, now)
            self.agents.set_leader_term(self.term)
            for agent_id in list(self._session_agents):  # the new term now: their next inventories count
                self._push_control(agent_id)
            log.info("leading", leader_term=self.term)
            self._was_leader = True
            self._leader_since = now
            if self.records is not None:  # audit records a crash left staged go to the log first
                self.records.write_leftovers()
            self._leftovers_due = now + self.settings.leftover_records_s
            self.reconcile(now)
        elif now >= self._leftovers_due and self.records is not None:  # a failed log write's, retried
            self.records.write_leftovers(staged_before=now - self.settings.leftover_records_s)
            self._leftovers_due = now + self.settings.leftover_records_s
        self.handle_lost_agents(now)
        self.handle_outcomes(now)
        self.resolve(now)
        return self.dispatch_pass(now, pipelined, offered)

    # ---- launches with their intake -------------------------------------------------------------

    def take_intake(self, committer: GroupCommitter) -> None:
        """Take submits from `committer` (`offer`), to store each with its launch."""
        self.committer = committer
        committer.launcher = self

    def offer(self, submit: Offered) -> bool:
        """A submit the intake offers. Taken (True) while the loop leads and idles, or runs a pass
        that began at most `offer_while_busy_s` ago: the next pass plans it with the queue (merged
        in queue order) and stores it with its launch in one commit (`GroupCommitter.insert_with`),
        instead of an intake commit, a pass that reads it back from the store and a launch commit.
        Declined otherwise (a long pass: the submit would wait for it): the intake commits it and
        wakes the loop."""
        with self._offer_lock:
            if not self._accepting:
                return False
            if not self._idle and time.monotonic() - self._busy_since > self.settings.offer_while_busy_s:
                return False
            self._offered.append(submit)
        self._wake.set()
        return True

    def _set_idle(self, idle: bool) -> None:
        with self._offer_lock:
            self._accepting = self.committer is not None and self._was_leader and not self._stop.is_set()
            self._idle = idle
            if not idle:
                self._busy_since = time.monotonic()
            elif not self._offered:
                self._quiet.notify_all()

    def wait_quiet(self) -> None:
        """Wait until no pass runs and no offered submit waits for one, or `completion_give_way_s`
        at most (never while not leading or stopping): background work goes when the dispatch path
        does not need the GIL."""
        with self._quiet:
            self._quiet.wait_for(self._is_quiet, self.settings.completion_give_way_s)

    def _is_quiet(self) -> bool:
        return not self._accepting or (self._idle and not self._offered)

    def _take_offered(self) -> list[Offered]:
        with self._offer_lock:
            offered, self._offered = self._offered, []
        return offered

    def _hand_back(self, offered: list[Offered]) -> None:
        if offered:
            assert self.committer is not None
            self.committer.hand_back(offered)
            offered.clear()

    def _offered_waiting(self, offered: Sequence[Offered], now: float) -> list[Waiting]:
        """Offered submits as the planner sees queued tasks (stored at `now` if the pass commits)."""
        waiting = []
        for submit in offered:
            record = submit.insert.queued_record(now)
            task = submit.insert.stored_task
            waiting.append(Waiting(task_spec_from_proto(task), record.priority, now, _Queued(record, task)))
        return sorted(waiting, key=self._queue_order)

    def _queue_order(self, waiting: Waiting) -> tuple[float, str]:
        """The store's queue order (`runnable`): order key, then id."""
        return queue.order_key(waiting.priority, waiting.submitted_at, self.settings.aging_s), waiting.task.id

    # ---- reconciliation and agent loss ----------------------------------------------------------

    def reconcile(self, now: float) -> int:
        """After a (re)start or a leadership change: every task a previous leader left in flight is
        unresolved until the agent that holds it has reported (see `resolve`); none is re-queued
        before its agent has answered or been declared lost."""
        count = 0
        for record in self.store.in_flight():
            with self._calls_lock:
                if record.id in self._calls:
                    continue
            self._unresolve(record, record.agent_id or "", now)
            count += 1
        if count:
            log.info("reconciling in-flight tasks with their agents", tasks=count)
        return count

    def _unresolve(self, record: TaskRecord, agent_id: str, now: float) -> None:
        inventory = self.agents.inventory(agent_id) if agent_id else None
        seen = inventory[0] if inventory is not None else 0
        with self._unresolved_lock:
            self._unresolved[record.id] = _Unresolved(record, agent_id, now, seen)

    def resolve(self, now: float) -> int:
        """Settle unresolved runs from their agents' inventories; returns how many were settled."""
        with self._unresolved_lock:
            pending = list(self._unresolved.values())
        settled = 0
        for entry in pending:
            inventory = self.agents.inventory(entry.agent_id) if entry.agent_id else None
            lost_at = self.agents.lost_since(entry.agent_id) if entry.agent_id else None
            if inventory is not None and inventory[0] >= entry.inventories_at + 2:
                report = inventory[1].get(entry.record.id)
            elif (
                not entry.agent_id
                or (lost_at is not None and now - lost_at >= self.settings.lost_grace_s)
                or (inventory is None and now - entry.since >= self.settings.inventory_wait_s)
            ):
                report = None
            else:
                continue
            with self._unresolved_lock:
                if self._unresolved.get(entry.record.id) is not entry:
                    continue  # replaced or settled meanwhile
                del self._unresolved[entry.record.id]
            settled += 1
            self._settle(entry, report, now)
        return settled

    def _settle(self, entry: _Unresolved, report: types_pb2.RunReport | None, now: float) -> None:
        record, agent_id = entry.record, entry.agent_id
        if report is None or report.attempt != record.attempts:
            if agent_id:  # fence a late delivery of the old dispatch: the agent refuses it for a while
                self.agents.request_cancel(agent_id, record.id)
            self._requeue(record, f"agent {agent_id or '?'} does not hold the run", "reconcile", now, agent_id)
            return
        if report.finished:
            self._record_outcome(agent_id, record, report, now)
            return
        agent = self.agents.get(agent_id)
        if agent is None:
            self._requeue(record, f"agent {agent_id} is unknown", "reconcile", now, agent_id)
            return
        log.info("re-attaching to a run its agent reports", task_id=record.id, agent_id=agent_id)
        request = self._request(record, record.attempts)
        self._launch_all([(_as_dispatched(record), agent_id, agent.address, request)], now)

    def handle_outcomes(self, now: float) -> int:
        """Outcomes agents reported in their inventories (each once): record the ones whose stream
        was lost, acknowledge the ones recorded, audit the ones of superseded runs."""
        outcomes = self.agents.take_outcomes()
        if not outcomes:
            return 0
        records = self.store.get_many([report.task_id for _agent, report in outcomes])
        for agent_id, report in outcomes:
            record = records.get(report.task_id)
            this_run = record is not None and record.agent_id == agent_id and record.attempts == report.attempt
            if record is not None and this_run and record.state in IN_FLIGHT:
                with self._calls_lock:
                    streaming = record.id in self._calls
                # Else the stream delivers it (or goes unresolved if it breaks), or delivered it and
                # its completion waits for the batch commit (which acknowledges it).
                if not streaming and not self._completions.holds(record.id):
                    with self._unresolved_lock:
                        self._unresolved.pop(record.id, None)
                    self._record_outcome(agent_id, record, report, now)
                continue
            if not (this_run and record is not None and record.state in TERMINAL):
                self._duplicate(agent_id, report.task_id, report.attempt, report.outcome.state)
            self.agents.acknowledge(agent_id, report.task_id, report.attempt)
        return len(outcomes)

    def _record_outcome(self, agent_id: str, record: TaskRecord, report: types_pb2.RunReport, now: float) -> None:
        self._on_progress(_as_dispatched(record), agent_id, report.outcome, now, report.attempt)

    def _duplicate(self, agent_id: str, task_id: str, attempt: int, state: int) -> None:
        """An outcome of a superseded run (a later attempt or another agent owns the task)."""
        name = state_from_proto(state) if state else "unknown"
        if name in (PREEMPTED, CANCELLED):
            return  # a run stopped on purpose (preempted, recalled, budget stop): the re-queue is its record
        metrics.DUPLICATE_OUTCOMES.labels(state=name).inc()
        log.warning("duplicate outcome of a superseded run", task_id=task_id, agent_id=agent_id, attempt=attempt)
        if self.audit is not None:
            _safe(
                self.audit,
                "duplicate_outcome",
                {"task_id": task_id, "agent_id": agent_id, "attempt": attempt, "state": name},
            )

    def handle_lost_agents(self, now: float) -> int:
        for record in self.agents.sweep(now):
            self._lost_agents.setdefault(record.agent_id, now)
        requeued = 0
        for agent_id, lost_at in list(self._lost_agents.items()):
            if self.agents.lost_since(agent_id) is None:  # it came back within the grace period
                del self._lost_agents[agent_id]
                continue
            if now - lost_at < self.settings.lost_grace_s:
                continue
            del self._lost_agents[agent_id]
            for task in self.store.in_flight(agent_id=agent_id):
                self._cancel_local_call(task.id)
                if self._requeue(task, f"agent {agent_id} lost (no heartbeat)", "agent_lost", now, agent_id):
                    requeued += 1
        return requeued

    # ---- dispatch ---------------------------------------------------------------------------------

    def dispatch_pass(self, now: float, pipelined: bool = False, offered: list[Offered] | None = None) -> int:
        """Plan one pass (`scheduler.pass_planner`, the planner `facefleet simulate` runs) over a
        snapshot of the world and apply the plan; commit every decision of the pass in one
        transaction, then start the RPCs.

        The plan is made lazily, one queued task at a time, from the queue read a few rows at a
        time: the pass ends when nothing is free anywhere or after `max_misses_per_pass` tasks in a
        row that did not launch (the rest of the queue waits for the next pass).

        `pipelined` (the loop's mode): the commit and the RPCs run on a worker while this thread
        places the next pass; tasks of passes not yet committed are left out of later passes (and
        counted against their project limits) until their commit is done.

        `offered`: submits not stored yet (`offer`); they join the queue in queue order and the pass
        commits them with its decisions (emptying the list), on this thread. Left in the list when
        nothing is free: the caller hands them back to the intake."""
        active, world = self.placer.world(now)
        state = PassWorld(world, self.settings.project_limits)
        free = state.free_anywhere()
        if free <= 0:
            self._queue_waiting = True  # whatever is queued waits for the next free slot
            return 0  # nothing can start anywhere: skip placing the whole queue again
        with self._uncommitted_lock:
            uncommitted = dict(self._uncommitted)
        if self.settings.project_limits:  # the in-flight count is a GROUP BY per pass: only when needed
            state.in_flight = self.store.in_flight_by_project()
            for project in uncommitted.values():
                if project:  # launches of uncommitted passes are in flight already
                    state.in_flight[project] = state.in_flight.get(project, 0) + 1
        rules = PassRules(
            max_misses=self.settings.max_misses_per_pass,
            max_tasks=self.settings.batch,
            warmup=now - self._leader_since < self.settings.warmup_s,
        )

        placed: Counter[tuple[str, str, str]] = Counter()  # counted once per pass: inc() takes a lock

        def place_live(waiting: Waiting, pass_world: World) -> PlacementResult:
            result = self.placer.decide(waiting.handle.task, now, WorldSnapshot(active, pass_world), waiting.task)
            placed[(result.pool or "-", result.rule or "-", result.outcome)] += 1
            return result

        reading = self._queue_read(now, free, uncommitted, self._queue_marks(), time.monotonic())
        head: Iterator[Waiting] = iter(reading)
        fresh = self._offered_waiting(offered, now) if offered else []
        if fresh:
            head = heapq.merge(head, fresh, key=self._queue_order)
        planner = PassPlanner(head, place_live, state, rules)
        changes: list[Change] = []
        queued: list[tuple[str, Placement]] = []
        launches: list[_Launch] = []
        dequeued: set[str] = set()  # out of the queue by this pass (dispatched, failed)
        replaced: dict[str, Waiting] = {}  # kept queued with a new decision, as the store will hold them
        left_waiting = False
        for planned in planner:
            if self._stop.is_set():
                break
            applied = self._apply(planned, now, planner)
            task_id = planned.waiting.task.id
            if isinstance(applied, _Launch):
                launches.append(applied)
                changes.append(applied.change)
                dequeued.add(task_id)
            elif isinstance(applied, Change):
                changes.append(applied)
                dequeued.add(task_id)
            else:
                left_waiting = True
                if applied is not None:
                    queued.append((planned.waiting.handle.record.id, applied))
                    replaced[task_id] = _with_decision(planned.waiting, applied)
        self._read_ahead = reading.ahead(dequeued, replaced)
        for labels, count in placed.items():
            metrics.child(metrics.PLACEMENTS, *labels).inc(count)
        self._cut_short = planner.cut_short
        self._queue_waiting = left_waiting or not reading.drained
        if offered:
            taken = list(offered)
            offered.clear()
            return self._commit_and_launch(changes, launches, queued, now, taken=taken)
        if not changes and not queued:
            return 0
        if not pipelined:
            return self._commit_and_launch(changes, launches, queued, now)
        launching = {launch.record.id for launch in launches}
        with self._uncommitted_lock:
            for change in changes:
                self._uncommitted[change.task_id] = ""
            for launch in launches:
                self._uncommitted[launch.record.id] = launch.record.project
            for task_id, _placement in queued:
                self._uncommitted[task_id] = ""
        if queued:  # its own job: lands in the same writer batch as the launches' commit
            self._workers.submit(self._record_queued, queued, now)
        if changes:
            self._workers.submit(self._commit_and_launch, changes, launches, [], now, True)
        return len(launching)

    def _queue_read(
        self, now: float, free: int, uncommitted: Mapping[str, str], marks: Marks, read_at: float
    ) -> QueueRead:
        """Runnable tasks in queue order (the store computes `queue.order_key` in SQL), read a few
        at a time: most passes fill one or two freed slots, so reading (and decoding) a long prefix
        of the queue every pass was wasted work. Ids first, then the records of those this pass may
        place (not the uncommitted ones of the passes before it), up to `batch` rows past those.

        The last pass's read-ahead comes first while it is valid (`queue_read`); while read-aheads
        are used, a read takes `READ_AHEAD` tasks or more, to leave the next passes some."""
        previous, self._read_ahead = self._read_ahead, None
        ahead = still_valid(previous, marks, self.settings.idle_sleep_s)
        if previous is not None:
            self._read_wide = ahead is not None
        step = self.settings.max_misses_per_pass  # records per read: free slots may be in pools these tasks cannot use
        want = min(free, self.settings.batch) + 2
        return QueueRead(
            self.store,
            self._waiting,
            now=now,
            aging_s=self.settings.aging_s,
            want=max(want, READ_AHEAD) if self._read_wide else want,
            limit=self.settings.batch,
            step=max(step, READ_AHEAD) if self._read_wide else step,
            uncommitted=uncommitted,
            ahead=ahead,
            marks=marks,
            read_at=read_at,
        )

    @staticmethod
    def _waiting(record: TaskRecord) -> Waiting:
        task = record.task()
        return Waiting(task_spec_from_proto(task), record.priority, record.submitted_at, _Queued(record, task))

    def _record_queued(self, queued: list[tuple[str, Placement]], now: float) -> None:
        try:
            self.store.record_queue_decisions(queued, now)
        except Exception:
            self._not_committed += 1
            log.exception("recording queue decisions failed; the next pass decides again", tasks=len(queued))
        finally:
            self._forget_uncommitted([task_id for task_id, _placement in queued])

    def _forget_uncommitted(self, task_ids: Sequence[str], wake: bool = True) -> None:
        with self._uncommitted_lock:
            for task_id in task_ids:
                self._uncommitted.pop(task_id, None)
        if wake:
            self._wake.set()

    def _commit_and_launch(
        self,
        changes: list[Change],
        launches: list[_Launch],
        queued: list[tuple[str, Placement]],
        now: float,
        background: bool = False,
        taken: Sequence[Offered] = (),
    ) -> int:
        """Commit a pass's decisions, then send its RunTask calls (placement durable before the RPC).
        `taken`: offered submits, stored in the same commit (even when nothing launches), their
        submitters answered once the launches are sent."""
        answers: list[Callable[[], None]] = []
        with loop_calls.gathered():  # the assignments, then the answers: one wake-up of the server's loop
            try:
                return self._commit_and_send(changes, launches, queued, now, background, taken, answers)
            finally:
                for answer in answers:
                    answer()

    def _commit_and_send(
        self,
        changes: list[Change],
        launches: list[_Launch],
        queued: list[tuple[str, Placement]],
        now: float,
        background: bool,
        taken: Sequence[Offered],
        answers: list[Callable[[], None]],
    ) -> int:
        results: dict[str, bool | Exception] = {}
        staged: _Staged = None
        try:
            if taken:
                results, staged = self._commit_with_intake(taken, changes, launches, queued, now, answers)
                if not changes:
                    return 0
            else:
                if queued:
                    self.store.record_queue_decisions(queued, now)
                if not changes:
                    return 0
                if not self.is_leader():  # lost the lock while placing: commit nothing, release reservations
                    return 0
                results, staged = self.store.write(lambda conn: self._apply_and_stage(conn, changes, launches, now))
        except Exception:
            if not background:
                raise
            log.exception("committing a dispatch pass failed; its tasks stay queued", tasks=len(changes))
            return 0
        finally:
            for launch in launches:
                if results.get(launch.record.id) is not True:  # not committed, cancelled or taken meanwhile
                    self._not_committed += 1  # it may still be queued: the next pass reads the queue
                    self.agents.note_finished(launch.agent_id, launch.record.id)
                    if self.gate is not None:
                        self.gate.withdraw(launch.record.id)
            if background:  # a pass runs again now only if some of this one's tasks are back in the queue
                committed = all(results.get(change.task_id) is True for change in changes)
                self._forget_uncommitted([change.task_id for change in changes], wake=not committed)
        sending: list[tuple[TaskRecord, _Launch]] = []
        for launch in launches:
            if results.get(launch.record.id) is not True:
                continue
            metrics.QUEUE_WAIT.observe(max(0.0, now - launch.record.submitted_at))
            sent = launch.sent
            for listener in self.listeners:
                _safe(listener.on_dispatched, sent, launch.result)
            sending.append((sent, launch))
        # The launches' audit records were committed with them (`_stage`): durable already.
        try:
            self._launch_all([(sent, launch.agent_id, launch.address, launch.request) for sent, launch in sending], now)
        finally:
            if staged is not None and self.records is not None:
                _safe(self.records.staged, *staged)  # on to the audit log, after the assignments went out
        for change in changes:
            if change.steps[-1].to_state == FAILED and results.get(change.task_id) is True:
                self._finished(change.task_id)
        return len(sending)

    def _commit_with_intake(
        self,
        taken: Sequence[Offered],
        changes: list[Change],
        launches: list[_Launch],
        queued: list[tuple[str, Placement]],
        now: float,
        answers: list[Callable[[], None]],
    ) -> tuple[dict[str, bool | Exception], _Staged]:
        """Store the offered submits and the pass's decisions in one commit; returns each change's
        result (none when leadership was lost meanwhile: then only the submits are stored) and the
        staged audit records. How to answer the submitters goes to `answers`."""
        assert self.committer is not None
        leading = self.is_leader()
        applying = changes if leading else []

        def decide(conn: Any, applied: list[bool | Exception]) -> tuple[dict[str, bool | Exception], _Staged]:
            self.store.record_queue_decisions_in(conn, queued, now)
            return self._stage(conn, applying, applied, launches, now) if leading else ({}, None)

        outcome, answer = self.committer.insert_with(taken, now, applying, decide)
        answers.append(answer)
        if isinstance(outcome, Exception):
            return {}, None
        return outcome

    def _apply_and_stage(
        self, conn: Any, changes: list[Change], launches: list[_Launch], now: float
    ) -> tuple[dict[str, bool | Exception], _Staged]:
        return self._stage(conn, changes, self.store.apply_changes_in(conn, changes, now), launches, now)

    def _stage(
        self, conn: Any, changes: list[Change], applied: list[bool | Exception], launches: list[_Launch], now: float
    ) -> tuple[dict[str, bool | Exception], _Staged]:
        """Each change's result (`applied`, in the transaction `conn`) and, in that transaction, the
        staged audit records of the launches that applied: they are durable exactly when those
        launches are, before any agent may start one, and a launch that does not commit leaves no
        record."""
        results = dict(zip([change.task_id for change in changes], applied, strict=True))
        if self.records is None:
            return results, None
        records = [
            record
            for launch in launches
            if results.get(launch.record.id) is True
            for record in self.records.launch_records(launch.sent, launch.result)
        ]
        if not records:
            return results, None
        return results, (self.store.stage_records_in(conn, records, now), records)

    def _apply(
        self, planned: Planned[PlacementResult], now: float, planner: PassPlanner[PlacementResult]
    ) -> _Launch | Change | Placement | None:
        """Apply one planned entry: a launch (agent reserved, ledger admitted), a failure (Change),
        a decision to record while the task stays queued (Placement), or nothing.

        A planned launch is re-checked for residency (a placement bug fails the task) and may
        deviate from the plan only through I/O races, each counted in
        `facefleet_pass_plan_deviations_total` and told to the planner, which plans the rest of the
        pass against the corrected World: no agent slot left on the pool after all (the task stays
        queued and asks for capacity, as any task that found its pool full), or the ledger's atomic
        reservation refused (the task stays queued with the ledger's reason recorded)."""
        if planned.action is Action.NOTHING or planned.placed is None:
            return None
        queued: _Queued = planned.waiting.handle
        record, task, result = queued.record, queued.task, planned.placed
        placement = Placement(result.pool, result.rule, result.summary, result.proto.SerializeToString())
        if planned.action is Action.REJECT:
            self._audit_placement(record, result)
            return Change(
                record.id, (Step(FAILED, f"rejected by placement: {result.reason}", placement=placement),), QUEUED
            )
        if planned.action is Action.KEEP:
            if planned.refusal:
                return _kept_queued(placement, planned.refusal, record)
            previous = record.placement or {}
            if (previous.get("outcome"), previous.get("reason")) == (result.outcome, result.reason):
                return None
            self._audit_placement(record, result)
            return placement
        violation = residency_violation(task, None, result.pool_trust_zone, result.project_locked)
        if violation:
            planner.not_launched(planned)
            if self.audit is not None:
                self.audit(
                    "residency_refused",
                    {"task_id": record.id, "project": record.project, "pool": result.pool, "detail": violation},
                )
            log.error("residency re-check refused a dispatch", task_id=record.id, pool=result.pool, detail=violation)
            return Change(record.id, (Step(FAILED, f"RESIDENCY_VIOLATION: {violation}", placement=placement),), QUEUED)
        if planned.provision:  # no free slot: the instance this launch needs is asked for; the task waits
            if self.gate is not None:
                self.gate.no_agent(record, result, now)
            return None
        agent = self.agents.reserve(result.pool, record.id, now)
        if agent is None:
            self._deviated(planned, "no_agent")
            planner.not_launched(planned, pool_full=True)
            if self.gate is not None:
                self.gate.no_agent(record, result, now)
            return None
        if self.gate is not None:
            refusal = self.gate.admit(record, result, now)
            if refusal:
                self.agents.note_finished(agent.agent_id, record.id)
                self._deviated(planned, "ledger")
                planner.not_launched(planned)
                return _kept_queued(placement, refusal, record)
        request = self._request(record, record.attempts + 1, result.project_locked, task)
        change = Change(
            record.id,
            (
                Step(PLACED, f"placed on {result.pool} by rule {result.rule}: {result.reason}", placement=placement),
                Step(DISPATCHED, f"sent to agent {agent.agent_id}", agent_id=agent.agent_id, count_attempt=True),
            ),
            QUEUED,
        )
        return _Launch(record, result, agent.agent_id, agent.address, request, change)

    @staticmethod
    def _deviated(planned: Planned[PlacementResult], race: str) -> None:
        metrics.PASS_PLAN_DEVIATIONS.labels(race=race).inc()
        log.debug("launch deviated from the pass plan", task_id=planned.waiting.task.id, race=race)

    def _request(
        self, record: TaskRecord, attempt: int, project_locked: bool = False, task: types_pb2.Task | None = None
    ) -> agent_pb2.RunTaskRequest:
        return agent_pb2.RunTaskRequest(
            task=task if task is not None else record.task(),
            attempt=attempt,
            resume_from_frame=record.checkpoint_frame,
            checkpoint_uri=record.checkpoint_uri,
            project_locked=project_locked,
            leader_term=self.term,
            # The run bound the gate reserved (a paid pool): the agent stops the run there, so the
            # reservation bounds what it bills (docs/finance.md). 0 = no limit (a free pool).
            max_run_s=self.gate.run_limit_s(record.id) if self.gate is not None else 0.0,
        )

    def _audit_placement(self, record: TaskRecord, result: PlacementResult) -> None:
        if self.audit is not None:
            _safe(
                self.audit,
                "placement",
                {
                    "task_id": record.id,
                    "project": record.project,
                    "rule": result.rule,
                    "pool": result.pool,
                    "trust_zone": result.pool_trust_zone,
                    "outcome": result.outcome,
                },
            )

    def _lock_race_refusal(self, record: TaskRecord, agent_id: str, request: agent_pb2.RunTaskRequest) -> str:
        """Re-read the project locks now (the pass used a snapshot): "" when the RPC may go."""
        assert self.admission is not None
        request.project_locked = request.project_locked or self.admission.project_locked(record.project)
        zone = getattr(self.agents.get(agent_id), "trust_zone", "") or "unknown"
        return residency_violation(request.task, None, zone, request.project_locked)

    def _launch_all(
        self, launches: Sequence[tuple[TaskRecord, str, str, agent_pb2.RunTaskRequest]], placed_at: float
    ) -> None:
        """Send committed launches: one message of assignments per session agent, a RunTask stream
        per task to an agent without a session. The lock gate's admission is taken for each (it
        may wait while a lock change is enforced) and released once the agent has answered."""
        batches: dict[str, tuple[AgentSession, list[agent_pb2.RunTaskRequest]]] = {}
        for record, agent_id, address, request in launches:
            session = self.sessions.get(agent_id)
            if session is None and agent_id not in self._session_agents:
                self._launch(record, agent_id, address, request, placed_at)
                continue
            admitting = self.admission.admitting() if self.admission is not None else contextlib.nullcontext()
            admitting.__enter__()
            if self.admission is not None and (violation := self._lock_race_refusal(record, agent_id, request)):
                admitting.__exit__(None, None, None)
                self._refuse_late(record, agent_id, violation)
                self.agents.note_finished(agent_id, record.id)
                continue
            assignment = _Assignment(record, request.attempt, placed_at, admitting, record.state == RUNNING)
            registered = False
            if session is not None:
                with session.lock:
                    if not session.closed:
                        session.runs[record.id] = assignment
                        registered = True
            if not registered:  # the session ended before this launch went out: nothing was sent
                self._release(assignment)
                self.agents.note_finished(agent_id, record.id)
                self._lost_stream(record.id, agent_id, request.attempt)
                continue
            assert session is not None
            with self._calls_lock:
                self._calls[record.id] = (assignment, agent_id)
            batches.setdefault(agent_id, (session, []))[1].append(request)
        for session, requests in batches.values():
            # If the session ends before this goes out, its end hands these runs to reconciliation.
            session.send(scheduler_pb2.SchedulerMessage(assignments=requests))

    @staticmethod
    def _release(assignment: _Assignment) -> None:
        """The agent answered an assignment (or its session ended): a lock change sees it now."""
        admitting, assignment.admitting = assignment.admitting, None
        if admitting is not None:
            admitting.__exit__(None, None, None)

    # ---- agent sessions (scheduler.agent_sessions calls these on its inbox thread) --------------

    def session_opened(self, session: AgentSession) -> None:
        self._session_agents.add(session.agent_id)
        self.agents.note_session(session.agent_id, True)

    def session_closed(self, session: AgentSession) -> None:
        """The runs of an ended session are unresolved: the agent's next inventory settles them."""
        self.agents.note_session(session.agent_id, False)
        with session.lock:
            runs, session.runs = dict(session.runs), {}
        for task_id, assignment in runs.items():
            self._end_assignment(session.agent_id, task_id, assignment)
            self._lost_stream(task_id, session.agent_id, assignment.attempt)
        self._wake.set()

    def session_messages(self, batch: list[tuple[AgentSession, scheduler_pb2.AgentMessage]]) -> None:
        """Updates and refusals of one or more agents: running marks and progress as one store
        transaction, ending states to the completion batcher, refusals as RunTask's errors were."""
        now = self.clock()
        marks: dict[str, Change] = {}  # running marks not yet written
        progress: dict[str, tuple[str, types_pb2.Progress]] = {}  # newest (agent, progress) per run
        requeued = freed = False  # a run went back to the queue (refused, stopped); a slot was freed
        for session, message in batch:
            agent_id = session.agent_id
            for update in message.updates:
                assignment = self._assignment(session, update.task_id, update.attempt)
                if assignment is None:
                    continue  # not followed here (cancelled, superseded): its inventory reports it
                task_id = update.task_id
                if assignment.admitting is not None:
                    self._release(assignment)
                    metrics.DISPATCH_LATENCY.observe(max(0.0, now - assignment.placed_at))
                state = update.progress.state
                if state in (types_pb2.TASK_STATE_RUNNING, types_pb2.TASK_STATE_UNSPECIFIED):
                    if not assignment.running:
                        assignment.running = True
                        step = Step(RUNNING, f"agent {agent_id} started")
                        marks[task_id] = Change(task_id, (step,), DISPATCHED, agent_id, update.progress)
                    elif task_id in marks:
                        marks[task_id] = replace(marks[task_id], progress=update.progress)
                    else:
                        progress[task_id] = (agent_id, update.progress)
                    continue
                progress.pop(task_id, None)
                mark = marks.pop(task_id, None)
                if state in _COMPLETES_THE_TASK:
                    started = mark.steps[0].reason if mark is not None else ""
                    completion = Completion(
                        assignment.record, agent_id, *_ending(update.progress), now, assignment.attempt, started
                    )
                    self._complete(completion)
                    freed = True
                else:  # a stopped run, a preemption: the store moves it back to the queue
                    if mark is not None:
                        self.store.apply_changes([mark], now)
                    self._on_progress(assignment.record, agent_id, update.progress, now, assignment.attempt)
                    requeued = True
                self._finish_assignment(session, task_id)
            for refusal in message.refusals:
                assignment = self._assignment(session, refusal.task_id, refusal.attempt)
                if assignment is None:
                    continue
                self._release(assignment)
                marks.pop(refusal.task_id, None)
                progress.pop(refusal.task_id, None)
                self._on_refusal(refusal, agent_id, now)
                self._finish_assignment(session, refusal.task_id)
                requeued = True
        if marks:
            self.store.apply_changes(list(marks.values()), now)
        if progress:
            self.store.record_progress_many([(task, agent, p) for task, (agent, p) in progress.items()], now)
        if freed:
            self._slot_freed = True
        if requeued or (freed and self._queue_waiting):
            self._wake.set()

    @staticmethod
    def _assignment(session: AgentSession, task_id: str, attempt: int) -> _Assignment | None:
        with session.lock:
            assignment = session.runs.get(task_id)
        return assignment if assignment is not None and assignment.attempt == attempt else None

    def _finish_assignment(self, session: AgentSession, task_id: str) -> None:
        with session.lock:
            assignment = session.runs.pop(task_id, None)
        if assignment is not None:
            self._end_assignment(session.agent_id, task_id, assignment)

    def _end_assignment(self, agent_id: str, task_id: str, assignment: _Assignment) -> None:
        self._release(assignment)
        with self._calls_lock:
            entry = self._calls.get(task_id)
            if entry is not None and entry[0] is assignment:
                del self._calls[task_id]
                self._stopping.pop(task_id, None)
        self.agents.note_finished(agent_id, task_id)

    def _on_refusal(self, refusal: scheduler_pb2.RunRefusal, agent_id: str, now: float) -> None:
        """An assignment the agent did not start: as RunTask's refusing status codes were handled."""
        record = self.store.get(refusal.task_id)
        if record.state in TERMINAL or record.agent_id != agent_id or record.attempts != refusal.attempt:
            return  # cancelled or moved on meanwhile
        reason = types_pb2.ErrorReason.Name(refusal.error.reason) if refusal.error.reason else "REFUSED"
        detail = f"agent {agent_id} refused: {reason}: {refusal.error.message}"
        if refusal.error.field == "checkpoint_uri":
            self._checkpoint_unreadable(record, agent_id, detail, now)
            return
        requeue_reason = ""
        if refusal.retry:
            requeue_reason = "stale_term" if refusal.error.reason == types_pb2.STALE_LEADER_TERM else "no_capacity"
        self._refused(record, agent_id, detail, requeue_reason, now)

    def _checkpoint_unreadable(self, record: TaskRecord, agent_id: str, detail: str, now: float) -> None:
        """The agent refused the task's checkpoint: ours, under a root it cannot read (a pool that
        does not share the one that wrote it). The task itself is fine and runs again from frame 0."""
        fresh = f"{detail}; re-queued to start from frame 0"
        self._requeue(record, fresh, "checkpoint_unreadable", now, agent_id, fresh_start=True)

    def _refused(self, record: TaskRecord, agent_id: str, detail: str, requeue_reason: str, now: float) -> None:
        """An agent did not start a run (a RunTask status or a session's RunRefusal): with a
        `requeue_reason` the task may run elsewhere now (full, draining, stale term), else the agent
        refuses the task itself (bad input, residency, models) and it fails."""
        if requeue_reason:
            self._requeue(record, detail, requeue_reason, now, agent_id)
        elif self.store.transition(record.id, FAILED, detail, now, expect_agent=agent_id):
            self._finished(record.id)

    def _launch(
        self, record: TaskRecord, agent_id: str, address: str, request: agent_pb2.RunTaskRequest, placed_at: float
    ) -> None:
        """Hand one committed launch to the agent-streams loop. The lock gate's admission is taken
        here (it may wait while a lock change is enforced; the loop must not) and released by the
        stream once the agent has answered."""
        admitting = self.admission.admitting() if self.admission is not None else contextlib.nullcontext()
        admitting.__enter__()
        try:
            self._streams.spawn(self._run_on_agent(record, agent_id, address, request, placed_at, admitting))
        except Exception:
            admitting.__exit__(None, None, None)
            raise

    async def _run_on_agent(
        self,
        record: TaskRecord,
        agent_id: str,
        address: str,
        request: agent_pb2.RunTaskRequest,
        placed_at: float,
        admitting: Any,
    ) -> None:
        """One task's RunTask stream, on the agent-streams loop. Store and audit work goes to the
        worker pool (`self._blocking`); a terminal state goes to the completion batcher."""
        task_id = record.id
        attempt = request.attempt
        held = True

        def admitted() -> None:  # the agent answered (or the call ended): a lock change sees it now
            nonlocal held
            if held:
                held = False
                admitting.__exit__(None, None, None)

        call: Any = None
        try:
            if self.admission is not None and (violation := self._lock_race_refusal(record, agent_id, request)):
                await self._blocking(self._refuse_late, record, agent_id, violation)
                return
            call = self._streams.stub(address).RunTask(request, wait_for_ready=False)
            with self._calls_lock:
                self._calls[task_id] = (call, agent_id)
            started = False
            running = False
            terminal = False
            async for message in call:
                admitted()
                now = self.clock()
                if not started:
                    metrics.DISPATCH_LATENCY.observe(max(0.0, now - placed_at))
                    started = True
                if message.state in (types_pb2.TASK_STATE_RUNNING, types_pb2.TASK_STATE_UNSPECIFIED) and not running:
                    running = await self._blocking(self._mark_running, task_id, agent_id, now)
                if message.state in _ENDS_THE_RUN and task_id not in self._stopping:
                    terminal = self._on_progress(record, agent_id, message, now, attempt)  # queues: no blocking
                else:
                    terminal = await self._blocking(self._on_progress, record, agent_id, message, now, attempt)
                if terminal:
                    break
            if not terminal:  # the agent may still hold the run: ask it (its inventory) first
                await self._blocking(self._lost_stream, task_id, agent_id, attempt)
        except grpc.RpcError as error:  # grpc.aio's AioRpcError included
            await self._blocking(self._on_rpc_error, task_id, agent_id, error, attempt)
        except asyncio.CancelledError:
            raise  # the dispatcher is stopping
        except Exception:
            log.exception("dispatch stream failed", task_id=task_id, agent_id=agent_id)
            await self._blocking(self._requeue_latest, task_id, "internal dispatcher error", "internal", agent_id)
        finally:
            admitted()
            if call is not None and not call.done():
                call.cancel()
            with self._calls_lock:
                self._calls.pop(task_id, None)
                self._stopping.pop(task_id, None)
            self.agents.note_finished(agent_id, task_id)
            self._wake.set()

    async def _blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        return await self._streams.blocking(self._workers, function, *args)

    def _mark_running(self, task_id: str, agent_id: str, now: float) -> bool:
        return self.store.transition(
            task_id, RUNNING, f"agent {agent_id} started", now, expect_from=DISPATCHED, expect_agent=agent_id
        )

    def _refuse_late(self, record: TaskRecord, agent_id: str, violation: str) -> None:
        """The locks changed between the pass and the RPC: audit, and place the task again."""
        if self.audit is not None:
            _safe(
                self.audit,
                "residency_refused",
                {"task_id": record.id, "project": record.project, "pool": record.pool, "detail": violation},
            )
        self._requeue_latest(record.id, f"re-placing: {violation}", "residency", agent_id)

    def _requeue_latest(self, task_id: str, why: str, reason: str, agent_id: str) -> None:
        self._requeue(self.store.get(task_id), why, reason, self.clock(), agent_id)

    def _lost_stream(self, task_id: str, agent_id: str, attempt: int) -> None:
        """The stream ended without an outcome: unresolved until the agent reports (see `resolve`)."""
        record = self.store.get(task_id)
        if record.state in IN_FLIGHT and record.agent_id == agent_id and record.attempts == attempt:
            self._unresolve(record, agent_id, self.clock())
            self._wake.set()

    def _on_progress(
        self, record: TaskRecord, agent_id: str, message: types_pb2.Progress, now: float, attempt: int
    ) -> bool:
        """Record one progress message; True when it ends the run on this agent."""
        task_id = record.id
        state = message.state
        if state == types_pb2.TASK_STATE_CANCELLED:
            # A user's cancel is recorded in the store before the agent hears of it, so an agent's
            # CANCELLED for a task still in flight is a stopped run, never the task's end: a budget
            # stop (stop_run), a fencing cancel that reached a later attempt, an agent shutting down.
            # The task goes back to the queue.
            self.store.record_progress(task_id, agent_id, message, now)
            current = self.store.get(task_id)
            if current.attempts == attempt:
                why = self._stopping.get(task_id)
                if why is not None:
                    self._requeue(current, why, "budget_stop", now, agent_id)
                elif message.message.startswith(RUN_LIMIT_REACHED):  # the agent's own stop at the run bound
                    self._requeue(current, f"{message.message} (agent {agent_id}); re-queued", RUN_LIMIT, now, agent_id)
                else:
                    stopped = f"agent {agent_id} stopped the run: {message.message or 'cancelled'}"
                    self._requeue(current, stopped, "run_cancelled", now, agent_id)
            self.agents.acknowledge(agent_id, task_id, attempt)
            return True
        if state == types_pb2.TASK_STATE_PREEMPTED:
            self.store.record_progress(task_id, agent_id, message, now)
            if self.store.transition(
                task_id,
                PREEMPTED,
                f"agent {agent_id} preempted: {message.message or 'spot interruption'}",
                now,
                expect_agent=agent_id,
            ):
                self._requeue(self.store.get(task_id), "resume after preemption", "preempted", now, agent_id)
            self.agents.acknowledge(agent_id, task_id, attempt)
            return True
        if state in _ENDS_THE_RUN:
            # Recorded by the completion batcher (one commit for many); this worker's `finally`
            # frees the agent slot now: the agent has said it is done.
            self._complete(Completion(record, agent_id, *_ending(message), now, attempt))
            return True
        self.store.record_progress(task_id, agent_id, message, now)
        return False

    def _complete(self, completion: Completion) -> None:
        """A run's ending, as the agent reported it: listeners with `on_run_ended` (the budget gate
        settles the attempt) hear it now, before the caller frees the run's slot, so the pass this
        ending wakes sees slot and budget room free together; the store records it with the batch."""
        hooks = [hook for listener in self.listeners if (hook := getattr(listener, "on_run_ended", None))]
        if hooks:
            ended = completion.finished_record
            for hook in hooks:
                _safe(hook, ended)
        self._completions.put(completion)

    def _completion_recorded(self, completion: Completion) -> None:
        """A completion the batcher committed: metrics and listeners get the record as committed."""
        record = completion.record
        self.agents.acknowledge(completion.agent_id, record.id, completion.attempt)
        metrics.child(metrics.TASKS_FINISHED, completion.to_state, record.pool or "").inc()
        if self.listeners:  # without reading it back
            final = completion.finished_record
            for listener in self.listeners:
                _safe(listener.on_finished, final)

    def _completion_refused(self, completion: Completion) -> None:
        """The store did not take a completion: the task finished already or moved on. Its outcome
        is acknowledged (the agent stops reporting it); unless it is the recorded one, a duplicate."""
        record = self.store.get(completion.record.id)
        recorded = record.state == completion.to_state and record.agent_id == completion.agent_id
        if not recorded:
            self._duplicate(completion.agent_id, record.id, completion.attempt, state_to_proto(completion.to_state))
        self.agents.acknowledge(completion.agent_id, record.id, completion.attempt)

    def _on_rpc_error(self, task_id: str, agent_id: str, error: grpc.RpcError, attempt: int) -> None:
        code_of, details_of = getattr(error, "code", None), getattr(error, "details", None)  # sync or aio error
        code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
        detail = details_of() if callable(details_of) else str(error)
        now = self.clock()
        record = self.store.get(task_id)
        if record.state in TERMINAL:
            return  # cancelled meanwhile: the call was cancelled on purpose
        refused = f"agent {agent_id} refused: {code.name}: {detail}"
        if code == grpc.StatusCode.INVALID_ARGUMENT and field_of(error) == "checkpoint_uri":
            self._checkpoint_unreadable(record, agent_id, refused, now)
            return
        if code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED,
        ):
            # The agent refuses the task itself (bad input, residency, model verification): no retry.
            self._refused(record, agent_id, refused, "", now)
            return
        if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED):  # refused before it started
            reason = "no_capacity" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else "stale_term"
            self._refused(record, agent_id, f"agent {agent_id}: {code.name}: {detail}", reason, now)
            return
        log.info("stream lost; asking the agent", task_id=task_id, agent_id=agent_id, code=code.name)
        self._lost_stream(task_id, agent_id, attempt)

    def _requeue(
        self, record: TaskRecord, why: str, reason: str, now: float, agent_id: str, fresh_start: bool = False
    ) -> bool:
        if record.state in TERMINAL or record.state == QUEUED:
            return False
        if record.attempts >= self.settings.max_attempts:
            moved = self.store.transition(
                record.id,
                FAILED,
                f"gave up after {record.attempts} attempts; last: {why}",
                now,
                expect_agent=agent_id,
            )
            if moved:
                self._finished(record.id)
            return moved
        try:
            moved = self.store.transition(
                record.id,
                QUEUED,
                why,
                now,
                expect_agent=agent_id,
                not_before=backoff_until(record.attempts, now, self.settings),
                fresh_start=fresh_start,
            )
        except IllegalTransition:
            return False
        if moved:
            metrics.REQUEUES.labels(reason=reason).inc()
            log.info("task re-queued", task_id=record.id, reason=reason, detail=why, attempts=record.attempts)
            for listener in self.listeners:
                hook = getattr(listener, "on_requeued", None)  # optional: the ledger settles the attempt
                if hook is not None:
                    _safe(hook, record, reason)
        return moved

    def _finished(self, task_id: str) -> None:
        final = self.store.get(task_id)
        metrics.TASKS_FINISHED.labels(state=final.state, pool=final.pool or "").inc()
        for listener in self.listeners:
            _safe(listener.on_finished, final)

    # ---- cancel -------------------------------------------------------------------------------

    def cancel_on_agent(self, task_id: str, agent_id: str | None, reason: str) -> bool:
        """Tell the agent running `task_id` to stop (RPC now, heartbeat as the fallback)."""
        if not agent_id:
            return False
        self.agents.request_cancel(agent_id, task_id)
        if agent_id in self._session_agents:  # pushed on its session now (and in each control after)
            reached = self._push_control(agent_id)
            self._cancel_local_call(task_id)
            return reached
        agent = self.agents.get(agent_id)
        reached = False
        if agent is not None and agent.address:
            try:
                self._streams.run(self._cancel_rpc(agent.address, task_id, reason), timeout=3.0)
                reached = True
            except (grpc.RpcError, TimeoutError, RuntimeError) as error:
                log.warning(
                    "cancel did not reach the agent; heartbeat will carry it",
                    task_id=task_id,
                    agent_id=agent_id,
                    error=repr(error),
                )
        self._cancel_local_call(task_id)
        return reached

    def stop_run(self, task_id: str, why: str) -> bool:
        """Stop the task's run but keep the task: the agent cancels the run and its CANCELLED report
        re-queues the task with `why` (spend enforcement). False when no run of it streams here."""
        with self._calls_lock:
            entry = self._calls.get(task_id)
            if entry is None:
                return False
            self._stopping[task_id] = why
        agent_id = entry[1]
        self.agents.request_cancel(agent_id, task_id)  # the heartbeat carries it if the RPC is lost
        if isinstance(entry[0], _Assignment):
            self._push_control(agent_id)
            return True
        agent = self.agents.get(agent_id)
        if agent is not None and agent.address:
            self._streams.spawn(self._stop_rpc(agent.address, task_id, why))
        return True

    def raise_run_limit(self, task_id: str, attempt: int, max_run_s: float) -> None:
        """A run's hard run-time limit was raised (spend enforcement extended its reservation): every
        control to its agent carries it; a session agent gets one at once."""
        self.agents.raise_run_limit(task_id, attempt, max_run_s)
        with self._calls_lock:
            entry = self._calls.get(task_id)
        if entry is not None and isinstance(entry[0], _Assignment):
            self._push_control(entry[1])

    def _push_control(self, agent_id: str) -> bool:
        """Send the agent its control now (pending cancels, run limits) on its session."""
        session = self.sessions.get(agent_id)
        control = scheduler_pb2.SchedulerMessage(control=self.agents.control(agent_id))
        return session is not None and session.send(control)

    async def _stop_rpc(self, address: str, task_id: str, why: str) -> None:
        try:
            await self._cancel_rpc(address, task_id, why)
        except (grpc.RpcError, TimeoutError) as error:
            log.warning("stop did not reach the agent; heartbeat will carry it", task_id=task_id, error=repr(error))

    async def _cancel_rpc(self, address: str, task_id: str, reason: str) -> None:
        request = agent_pb2.AgentCancelRequest(task_id=task_id, reason=reason)
        await self._streams.stub(address).CancelTask(request, timeout=2.0)

    def _cancel_local_call(self, task_id: str) -> None:
        """Stop following the task's run here (its stream, or its assignment on a session)."""
        with self._calls_lock:
            entry = self._calls.get(task_id)
        if entry is None:
            return
        if isinstance(entry[0], _Assignment):
            session = self.sessions.get(entry[1])
            if session is not None:
                self.sessions.call(lambda: self._finish_assignment(session, task_id))
            return
        self._streams.call_soon(entry[0].cancel)


# Progress states after which the agent runs nothing more for this attempt (handled without blocking).
_ENDS_THE_RUN = frozenset({types_pb2.TASK_STATE_SUCCEEDED, types_pb2.TASK_STATE_FAILED, types_pb2.TASK_STATE_CANCELLED})

# Ending states that finish the task (CANCELLED and PREEMPTED from an agent re-queue it).
_COMPLETES_THE_TASK = frozenset({types_pb2.TASK_STATE_SUCCEEDED, types_pb2.TASK_STATE_FAILED})


def _ending(message: types_pb2.Progress) -> tuple[str, str, types_pb2.Progress]:
    """(state, reason, message) of a Completion for an ending progress message."""
    to_state = state_from_proto(message.state)
    reason = message.message or (message.error.message if message.HasField("error") else "") or to_state
    return to_state, reason, message


def _as_dispatched(record: TaskRecord) -> TaskRecord:
    """A stored in-flight record as the launch path holds it (attempts before this run counted)."""
    return replace(record, attempts=max(0, record.attempts - 1))


def _with_decision(waiting: Waiting, placement: Placement) -> Waiting:
    """`waiting` as the store holds it once `placement` is recorded for it (`record_queue_decisions`)."""
    queued: _Queued = waiting.handle
    record = queued.record.evolve(placement=placement.summary, placement_proto=placement.decision, rule=placement.rule)
    return replace(waiting, handle=_Queued(record, queued.task))


def _kept_queued(placement: Placement, why: str, record: TaskRecord) -> Placement | None:
    """The placement as recorded when the gate refused the launch (None when already recorded)."""
    summary = {**placement.summary, "outcome": "queue", "reason": why}
    previous = record.placement or {}
    if (previous.get("outcome"), previous.get("reason")) == ("queue", why):
        return None
    decision = types_pb2.PlacementDecision()
    decision.ParseFromString(placement.decision)
    decision.outcome = types_pb2.PlacementDecision.QUEUE
    decision.reason = why
    return replace(placement, summary=summary, decision=decision.SerializeToString())


def _safe(hook: Callable[..., None], *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        log.exception("dispatch listener failed", hook=getattr(hook, "__qualname__", str(hook)))
