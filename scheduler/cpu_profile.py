"""Opt-in CPU profile of every Python thread of a scheduler process (for `bench/`, never on by default).

`FACEFLEET_PROFILE=/path/out.pstats facefleet scheduler run ...` profiles each thread started after
`start()` with cProfile on that thread's own CPU clock (`time.thread_time`), so the figures are CPU
seconds, not wall time spent waiting. At `stop()` it writes all threads merged into that file, and
each kind of thread on its own beside it (`out.pstats.dispatcher`, `out.pstats.scheduler-loop`, ...).
Read it with `python -m pstats FILE` (sort by `tottime`). cProfile roughly doubles the CPU per call:
compare shares between functions, not absolute figures with an unprofiled run.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import re
import sys
import threading
import time
from types import FrameType
from typing import Any

ENV = "FACEFLEET_PROFILE"


class ThreadCpuProfile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._profiles: list[tuple[str, cProfile.Profile]] = []
        self._lock = threading.Lock()

    def start(self) -> ThreadCpuProfile:
        threading.setprofile(self._start_thread)  # every thread started from now on
        self._start_thread(None, "call", None)  # and this one
        return self

    def _start_thread(self, _frame: FrameType | None, _event: str, _arg: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        kind = re.sub(r"[-_]?\d+$", "", threading.current_thread().name) or "thread"  # dispatch_7 -> dispatch
        with self._lock:
            self._profiles.append((kind, profile))
        profile.enable()  # replaces this hook for the calling thread

    def stop(self) -> None:
        threading.setprofile(None)  # type: ignore[arg-type]
        sys.setprofile(None)
        with self._lock:
            profiles = list(self._profiles)
        merged: dict[str, pstats.Stats] = {}
        for kind, profile in profiles:
            profile.disable()  # stops only the calling thread's; the others' stats are read as they are
            try:
                profile.create_stats()
            except Exception:
                continue
            if not getattr(profile, "stats", None):
                continue
            for key in ("", kind):
                if key in merged:
                    merged[key].add(profile)
                else:
                    merged[key] = pstats.Stats(profile)
        for key, stats in merged.items():
            stats.dump_stats(f"{self.path}.{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}" if key else self.path)


def from_environment() -> ThreadCpuProfile | None:
    """Started when FACEFLEET_PROFILE names an output file; None otherwise."""
    path = os.environ.get(ENV, "")
    return ThreadCpuProfile(path).start() if path else None
