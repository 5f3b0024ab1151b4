"""`facefleet up --keep-running` serves the console and prints its sign-in address (Jupyter style)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


@pytest.mark.slow
def test_up_keep_running_prints_a_console_address_that_signs_in_and_refuses_without_its_token(
    tmp_path: Path,
) -> None:
    demo_dir = tmp_path / "demo"
    process = subprocess.Popen(
        [sys.executable, "-m", "facefleet", "up", "--dir", str(demo_dir), "--keep-running", "--timeout", "150"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "400"},
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 240
        url = ""
        while not url and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.match(r"^console: (http://127\.0\.0\.1:\d+/\?token=\S+)$", line.strip())
            url = match.group(1) if match else ""
        assert url, "no console line:\n" + "".join(lines[-40:])
        base = url.split("?", 1)[0].rstrip("/")
        assert requests.get(base + "/tasks", timeout=10).status_code == 401
        assert requests.get(base + "/?token=not-the-token", timeout=10).status_code == 401
        with requests.Session() as session:
            page = session.get(url, timeout=10)  # 303 to the first page, token gone from the address
            assert page.status_code == 200 and "token=" not in page.url
            tasks = session.get(base + "/tasks", timeout=10).text
            assert "film-x" in tasks and "succeeded" in tasks  # the demo's workload, through the console
            assert session.get(base + "/fleet", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    leftover = subprocess.run(["pgrep", "-f", str(demo_dir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left running: {leftover.stdout}"
