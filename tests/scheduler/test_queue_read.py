"""The dispatcher's read-ahead (`scheduler.queue_read`): a pass starts from the tasks the last pass
read and did not take. Checked from outside, on a real scheduler and a hollow agent with one slot
(one pass per freed slot): the agent starts tasks in the store's queue order, a task submitted or
cancelled here meanwhile is honoured at once, one stored by another process within
`idle_sleep_s`, and the store's queue is read far less often than once per pass."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from facefleet.scheduler.app import SchedulerApp
from facefleet.scheduler.store import NewTask, TaskStore
from facefleet.v1 import scheduler_pb2, types_pb2
from tests.scheduler.conftest import FAST_DISPATCH
from tests.scheduler.fake_agents import HollowAgent, wait_for
from tests.scheduler.test_launch_with_intake import make_task, queue_reads

PRIORITIES = (types_pb2.PRIORITY_LOW, types_pb2.PRIORITY_NORMAL, types_pb2.PRIORITY_HIGH)


class OrderedAgent(HollowAgent):
    """A hollow agent that notes the order (and time) in which its runs start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[tuple[str, float]] = []
        self._order_lock = threading.Lock()

    def on_start(self, task: types_pb2.Task) -> None:
        with self._order_lock:
            self.started.append((task.id, time.monotonic()))

    def order(self) -> list[str]:
        with self._order_lock:
            return [task_id for task_id, _at in self.started]


def queue_up(stub: Any, count: int) -> list[str]:
    items = [scheduler_pb2.SubmitTaskRequest(task=make_task(PRIORITIES[i % 3])) for i in range(count)]
    reply = stub.SubmitTasks(scheduler_pb2.SubmitTasksRequest(items=items), timeout=10)
    return [result.submitted.task_id for result in reply.results]


def store_order(app: SchedulerApp) -> list[str]:
    """The store's own queue order (`runnable_ids`, the order the dispatcher must keep)."""
    return app.store.runnable_ids(time.time() + 1, 1000, app.dispatcher.settings.aging_s)


def test_tasks_start_in_queue_order_and_changes_made_here_count_at_once(
    start_scheduler: Callable[..., SchedulerApp],
    start_agent: Callable[..., HollowAgent],
    client: Callable[[int], Any],
) -> None:
    # A long idle sleep: a read-ahead could live for seconds, so only the queue marks keep it honest.
    app = start_scheduler(dispatch=replace(FAST_DISPATCH, idle_sleep_s=5.0))
    stub = client(app.port)
    queued = queue_up(stub, 60)
    expected = store_order(app)
    assert sorted(expected) == sorted(queued)
    reads = queue_reads(app.store)
    agent = OrderedAgent(f"127.0.0.1:{app.port}", "onprem-1", "onprem-a", "private", slots=1, frame_s=0.02)
    agent.start()
    try:
        wait_for(lambda: len(agent.order()) >= 10, 20, what="ten runs")
        # A cancel here: the task leaves the queue, and no later pass sends it from what it held.
        cancelled = expected[-5]
        stub.CancelTask(scheduler_pb2.CancelTaskRequest(task_id=cancelled, reason="not needed"), timeout=10)
        # An urgent submit here: it goes before every task still queued.
        at = len(agent.order())
        urgent = stub.SubmitTask(
            scheduler_pb2.SubmitTaskRequest(task=make_task(types_pb2.PRIORITY_URGENT)), timeout=10
        ).task_id
        wait_for(lambda: len(agent.order()) >= len(queued), 30, what="every task to run")
        order = agent.order()
        assert order.index(urgent) <= at + 2  # behind at most the runs already sent when it came
        rest = [task_id for task_id in order if task_id != urgent]
        assert rest == [task_id for task_id in expected if task_id != cancelled]  # the store's order, each once
        assert app.store.get(cancelled).state == "cancelled" and agent.executions[cancelled] == 0
        # One pass per freed slot; without the read-ahead each pass read the store's queue at least once.
        assert len(reads) <= len(queued) // 3, f"{len(reads)} queue reads for {len(queued)} passes or more"
    finally:
        agent.kill()


def test_a_task_stored_by_another_process_waits_at_most_the_idle_sleep(
    start_scheduler: Callable[..., SchedulerApp], client: Callable[[int], Any], tmp_path: Any
) -> None:
    app = start_scheduler(dispatch=replace(FAST_DISPATCH, idle_sleep_s=0.3))
    stub = client(app.port)
    queue_up(stub, 90)
    agent = OrderedAgent(f"127.0.0.1:{app.port}", "onprem-1", "onprem-a", "private", slots=1, frame_s=0.03)
    agent.start()
    elsewhere = TaskStore(app.store.url)  # another replica's intake: this dispatcher hears nothing of it
    try:
        wait_for(lambda: len(agent.order()) >= 5, 20, what="five runs")
        stored_at = time.monotonic()
        urgent = elsewhere.insert_batch([NewTask(make_task(types_pb2.PRIORITY_URGENT), "")], time.time())[0].task_id
        wait_for(lambda: urgent in agent.order(), 20, what="the urgent task to start")
        started_at = dict(agent.started)[urgent]
        # seen by the first pass that reads the store (at most idle_sleep_s later), then one run ahead of it
        assert started_at - stored_at <= 0.3 + 0.03 + 0.5, f"{started_at - stored_at:.2f} s"
        assert len(agent.order()) < 90  # long before the queue it was stored behind ran out
    finally:
        agent.kill()
        elsewhere.close()
