"""`freeze_startup_objects`, as `scheduler run` and `agent run` call it once they have started: a
full collection no longer walks what start-up built, and what is made later is still collected.
Checked in a child process (freezing this test process would keep pytest's objects forever)."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import gc, json
import facefleet.agent.server, facefleet.scheduler.dispatcher  # what a server process imports
from facefleet.long_running import freeze_startup_objects

def full_collection_tracked():
    gc.collect()
    return len(gc.get_objects())

before = full_collection_tracked()
freeze_startup_objects()
frozen, after = gc.get_freeze_count(), full_collection_tracked()

class Node:
    pass
gc.disable()  # no automatic collection frees them before the one measured
for _ in range(1000):  # garbage made after start-up: cycles only the collector can free
    a, b = Node(), Node()
    a.other, b.other = b, a
del a, b
freed = gc.collect()
print(json.dumps({"before": before, "frozen": frozen, "after": after, "freed": freed}))
"""


def test_start_up_objects_leave_the_collectors_sight_and_later_garbage_is_still_freed() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    figures = json.loads(done.stdout)
    assert figures["frozen"] >= figures["before"] > 10_000  # the imported modules' objects
    assert figures["after"] < figures["before"] / 10  # a full collection walks almost nothing now
    assert figures["freed"] >= 2_000  # the 1,000 cycles made afterwards
