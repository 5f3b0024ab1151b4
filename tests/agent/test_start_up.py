"""An agent's start-up stays short: a restarted agent must report its journal's outcomes before the
scheduler declares it lost (heartbeat timeout + grace), or those tasks run again elsewhere."""

from __future__ import annotations

import subprocess
import sys

from tests.scheduler.agent_process import REPO

# The modules a restarted agent loads before its first heartbeat (tests/scheduler/agent_process.py).
PROBE = """
import sys
import facefleet.agent.server, facefleet.security.tls, facefleet.config
print(",".join(sorted(name for name in ("onnx", "ml_dtypes") if name in sys.modules)))
"""


def test_the_agent_server_starts_without_importing_onnx() -> None:
    # onnx (and ml_dtypes under it) took ~3 of the agent's ~4.5 s of imports on the dev VM; only
    # model verification and the swapper need it, and they import it when they run.
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
    )
    assert done.stdout.strip() == "", f"imported at agent start-up: {done.stdout.strip()}"
