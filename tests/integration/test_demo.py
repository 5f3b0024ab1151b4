"""`facefleet up` from the command line, as the README runs it: real processes, mTLS, real outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest


@pytest.mark.slow
def test_up_runs_the_sample_workload_and_keeps_its_promises(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "facefleet", "up", "--dir", str(demo_dir), "--json", "--timeout", "150"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    rows = summary["tasks"]
    assert summary["problems"] == []
    assert all(row["state"] == "succeeded" for row in rows)
    private = [r for r in rows if r["sensitivity"] == "private"]
    locked = [r for r in rows if r["project"] == "film-x"]
    assert private and all(r["pool"] == "onprem-local" for r in private)
    assert locked and all(r["pool"] == "onprem-local" for r in locked)
    burst = [r for r in rows if r["pool"] == "cloud-local"]
    assert burst and all(r["sensitivity"] == "public" and r["project"].startswith("promo-") for r in burst)
    assert all(r["rule"] and r["why"] for r in rows)
    # Real output files that differ from their targets around the face.
    for row in rows:
        output = cv2.imread(row["output"])
        assert output is not None, f"{row['task']}: no readable output at {row['output']!r}"
        assert output.shape == (512, 512, 3)
        assert row["engine"] == "landmark"
        # Grace Hopper's face on the astronaut: dlib scores the untouched astronaut 0.30 against her.
        assert row["id_similarity"] is not None and row["id_similarity"] > 0.4, row  # dlib: same person
    first = next(r for r in rows if r["task"] == "hr-private-1")
    target = cv2.imread(str(demo_dir / "inputs" / "target-1.jpg")).astype(int)
    changed = np.abs(cv2.imread(first["output"]).astype(int) - target).sum(axis=2) > 40
    assert changed[60:180, 170:280].mean() > 0.05, "the face region did not change"
    assert changed[400:, :].mean() < 0.01, "pixels far from the face changed"
    # The audit chain verifies and proves the locked project ran only in the private zone.
    assert summary["audit"]["verified"] is True
    assert summary["audit"]["locked_project_proof"] is True
    # Everything the demo started has stopped.
    leftover = subprocess.run(["pgrep", "-f", str(demo_dir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left running: {leftover.stdout}"
