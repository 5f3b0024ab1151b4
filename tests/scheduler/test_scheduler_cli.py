"""The task client commands against a live scheduler: submit, status, tasks, watch, cancel."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from facefleet.cli import app as cli
from tests.scheduler.fake_agents import wait_for

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and stdout (JSON only on stdout; warnings and errors go to stderr)."""
    result = runner.invoke(cli, list(args))
    return result.exit_code, result.stdout


def invoke_failing(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli, list(args))
    return result.exit_code, result.output


def test_submit_wait_status_tasks_and_cancel(start_scheduler, start_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    start_agent(app.port, "onprem-1", "onprem-a", "private", slots=2)
    wait_for(lambda: len(app.registry.agents()) == 1, 5, what="agent heartbeat")
    address = f"127.0.0.1:{app.port}"
    task_file = tmp_path / "task.yaml"
    task_file.write_text(
        "project: cli-demo\nsensitivity: private\npriority: high\nframes: 1\n"
        "source_uri: file:///data/face.jpg\ntarget_uri: file:///data/clip.jpg\noptions: {mask: box}\n"
    )
    code, out = invoke(
        "submit", str(task_file), "--scheduler", address, "--insecure", "--json", "--idempotency-key", "k1"
    )
    assert code == 0, out
    submitted = json.loads(out)
    task_id = submitted["task_id"]
    assert submitted["created"] is True
    code, out = invoke(
        "submit", str(task_file), "--scheduler", address, "--insecure", "--json", "--idempotency-key", "k1"
    )
    assert json.loads(out) == {**submitted, "created": False, "state": json.loads(out)["state"]}

    code, out = invoke("watch", task_id, "--scheduler", address, "--insecure")
    assert code == 0 and "succeeded" in out, out
    code, out = invoke("status", task_id, "--scheduler", address, "--insecure", "--json")
    status = json.loads(out)
    assert status["state"] == "TASK_STATE_SUCCEEDED" and status["pool"] == "onprem-a"
    assert status["task"]["options"]["mask"] == "box"
    code, out = invoke(
        "tasks", "--project", "cli-demo", "--state", "succeeded", "--scheduler", address, "--insecure", "--json"
    )
    assert [t["task"]["id"] for t in json.loads(out)["tasks"]] == [task_id]
    code, out = invoke("cancel", task_id, "--scheduler", address, "--insecure", "--json")
    assert json.loads(out)["state"] == "succeeded"  # already finished: cancel is a no-op


def test_errors_are_actionable(start_scheduler, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    address = f"127.0.0.1:{app.port}"
    bad = tmp_path / "bad.yaml"
    bad.write_text("project: demo\nsensitivity: private\nsource_uri: http://x/a.jpg\ntarget_uri: file:///t.jpg\n")
    code, out = invoke_failing("submit", str(bad), "--scheduler", address, "--insecure")
    assert code == 1 and "task.source_uri" in out and "INVALID_TASK" in out
    typo = tmp_path / "typo.yaml"
    typo.write_text("project: demo\nsensitivty: private\n")
    code, out = invoke_failing("submit", str(typo), "--scheduler", address, "--insecure")
    assert code == 1 and "sensitivty" in out
    code, out = invoke_failing("status", "no-such-task", "--scheduler", address, "--insecure")
    assert code == 1 and "NOT_FOUND" in out and "facefleet tasks" in out
    code, out = invoke_failing("tasks", "--state", "sleeping", "--scheduler", address, "--insecure")
    assert code == 1 and "queued" in out


def test_several_files_go_in_one_call_and_a_bad_file_refuses_only_itself(start_scheduler, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = start_scheduler()
    address = f"127.0.0.1:{app.port}"
    files = []
    for name, source in (("a", "file:///data/face.jpg"), ("[bold]b", "http://x/a.jpg"), ("c", "file:///data/face.jpg")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"project: bulk\nsensitivity: private\nsource_uri: {source}\ntarget_uri: file:///data/{len(files)}.jpg\n"
        )
        files.append(str(path))
    code, out = invoke_failing("submit", *files, "--scheduler", address, "--insecure", "--idempotency-key", "batch-7")
    assert code == 1
    assert f"{files[0]}: " in out and f"{files[2]}: " in out and out.count("created") == 2
    assert f"error: {files[1]}: task.source_uri" in out and "hint:" in out  # the file name printed as text
    code, out = invoke("submit", *files, "--scheduler", address, "--insecure", "--json", "--idempotency-key", "batch-7")
    rows = json.loads(out)
    assert [row.get("created") for row in rows] == [False, None, False]  # the keys KEY/1, KEY/3 named the same tasks
    assert rows[1]["field"] == "task.source_uri" and code == 1
    code, out = invoke("tasks", "--project", "bulk", "--scheduler", address, "--insecure", "--json")
    assert len(json.loads(out)["tasks"]) == 2
    code, out = invoke_failing("submit", files[0], files[2], "--wait", "--scheduler", address, "--insecure")
    assert code == 1 and "--wait follows one task" in out
