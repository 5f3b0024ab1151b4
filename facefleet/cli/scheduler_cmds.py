"""CLI: `facefleet scheduler run` and the task client commands submit, status, watch, cancel, tasks."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path
from typing import Any

import typer

from facefleet.cli.output import JSON_OPTION, console, fail, line, print_error, print_json
from facefleet.domain import state_name
from facefleet.long_running import freeze_startup_objects

SCHEDULER_OPTION = typer.Option(None, "--scheduler", help="Scheduler host:port (default: scheduler.listen).")
INSECURE_OPTION = typer.Option(False, "--insecure", help="Plaintext gRPC: local development only.")
CONFIG_OPTION = typer.Option(None, "--config", help="facefleet.toml to read.")
IDENTITY_OPTION = typer.Option("operator", "--as", help="Client certificate name in the TLS dir.")
STATE_NAMES = ("queued", "placed", "dispatched", "running", "succeeded", "failed", "cancelled", "preempted")


def _settings(config: Path | None, **overrides: Any) -> Any:
    from facefleet.config import load_settings

    try:
        return load_settings(config, **overrides)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error), hint="fix the config file or the FACEFLEET_* environment variables")


def task_from_mapping(data: Any, where: str) -> Any:
    """A Task proto from YAML: enums by short name (sensitivity: private, priority: high)."""
    from google.protobuf.json_format import ParseDict, ParseError

    from facefleet.v1 import types_pb2

    if not isinstance(data, dict):
        fail(f"{where}: expected a mapping with project, sensitivity, source_uri, target_uri")
    body = dict(data)
    for key, prefix in (("sensitivity", "SENSITIVITY_"), ("priority", "PRIORITY_")):
        if isinstance(body.get(key), str) and not body[key].upper().startswith(prefix):
            body[key] = prefix + body[key].upper()
    try:
        return ParseDict(body, types_pb2.Task())
    except ParseError as error:
        fail(f"{where}: {error}", hint="see docs/operations.md for the task file fields")


def _channel(scheduler: str | None, insecure: bool, config: Path | None, identity: str) -> Any:
    from facefleet.security.tls import TLSMaterialError, secure_channel
    from facefleet.structured_logs import configure_logging

    settings = _settings(config)
    configure_logging("warning", "console")  # logs to stderr: stdout stays clean for --json
    address = scheduler or settings.scheduler.listen
    try:
        return secure_channel(address, settings.tls, identity, insecure=insecure or None)
    except TLSMaterialError as error:
        fail(str(error), hint="or pass --insecure against a plaintext development scheduler")


def _call(channel: Any, method: str, request: Any, timeout: float | None = 30) -> Any:
    import grpc

    from facefleet.rpc_errors import reason_of
    from facefleet.v1 import scheduler_pb2_grpc

    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    try:
        return getattr(stub, method)(request, timeout=timeout)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        reason = reason_of(error)
        hint = (
            {
                grpc.StatusCode.UNAVAILABLE: "is the scheduler running at that address? check --scheduler and TLS",
                grpc.StatusCode.NOT_FOUND: "list task ids with `facefleet tasks`",
                grpc.StatusCode.INVALID_ARGUMENT: "fix the named field and submit again",
            }.get(code, "")
            if code is not None
            else ""
        )
        fail(f"{method} failed: {code.name if code else 'error'}{f' ({reason})' if reason else ''}: {details}", hint)


def _status_dict(status: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(status, preserving_proto_field_name=True)


def register(app: typer.Typer) -> None:
    scheduler_app = typer.Typer(help="Run the central scheduler.", no_args_is_help=True)
    app.add_typer(scheduler_app, name="scheduler")

    @scheduler_app.command("run")
    def run_cmd(
        config: Path | None = CONFIG_OPTION,
        listen: str | None = typer.Option(None, "--listen", help="gRPC address host:port."),
        store: str | None = typer.Option(None, "--store", help="sqlite:///path or postgresql+psycopg://..."),
        policy: Path | None = typer.Option(None, "--policy", help="Policy directory (rules, budgets, locks)."),
        metrics_port: int | None = typer.Option(None, "--metrics-port", help="/metrics port (0 = any free)."),
        insecure: bool = INSECURE_OPTION,
    ) -> None:
        """Run the scheduler: intake, durable queue, placement, dispatch (leader), /metrics."""
        from facefleet.scheduler import cpu_profile
        from facefleet.scheduler.assembly import build_scheduler
        from facefleet.scheduler.rules_source import ConsulSettingsError
        from facefleet.scheduler.store import StoreUnusable
        from facefleet.security.tls import TLSMaterialError
        from facefleet.structured_logs import configure_logging

        settings = _settings(config)
        scheduler_updates = {
            key: value
            for key, value in (("listen", listen), ("store_url", store), ("metrics_port", metrics_port))
            if value is not None
        }
        settings = settings.model_copy(
            update={
                "scheduler": settings.scheduler.model_copy(update=scheduler_updates),
                "policy": settings.policy.model_copy(update={"dir": policy}) if policy else settings.policy,
                "tls": settings.tls.model_copy(update={"insecure": insecure or settings.tls.insecure}),
            }
        )
        configure_logging(settings.log_level, settings.log_format)
        profile = cpu_profile.from_environment()  # FACEFLEET_PROFILE=out.pstats: bench profiling only
        try:
            scheduler = build_scheduler(settings).start()
        except TLSMaterialError as error:
            fail(str(error), hint="create certificates with `facefleet certs init` or pass --insecure")
        except ConsulSettingsError as error:
            fail(str(error), hint="fix the consul_* settings under [policy] or the CONSUL_* environment variables")
        except StoreUnusable as error:
            fail(str(error), hint="fix --store or [scheduler] store_url; is the database server running?")
        except (FileNotFoundError, ValueError) as error:
            fail(str(error), hint="fix [audit] signing_key (or remove it) in the config")
        except OSError as error:
            fail(f"could not start the scheduler: {error}", hint="is another process using the port or the store?")
        freeze_startup_objects()  # a full collection would stall every task in flight
        stopped = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopped.set())
        console.print(f"scheduler listening on port {scheduler.port} (metrics :{scheduler.metrics_port})")
        stopped.wait()
        scheduler.stop()
        if profile is not None:
            profile.stop()

    @app.command("submit")
    def submit_cmd(
        task_files: list[Path] = typer.Argument(
            ..., help="Task YAML files (project, sensitivity, source_uri, target_uri...); several go in one call."
        ),
        idempotency_key: str = typer.Option(
            "", "--idempotency-key", help="Repeat-safe key: same key, same task (with several files: KEY/1, KEY/2...)."
        ),
        wait: bool = typer.Option(False, "--wait", help="Follow the task until it finishes (one file only)."),
        scheduler: str | None = SCHEDULER_OPTION,
        insecure: bool = INSECURE_OPTION,
        identity: str = IDENTITY_OPTION,
        config: Path | None = CONFIG_OPTION,
        json_output: bool = JSON_OPTION,
    ) -> None:
        """Submit tasks; prints each id (durable once printed). Several files are sent with
        SubmitTasks, up to 1,000 per call: a refused file refuses only itself."""
        from facefleet.v1 import scheduler_pb2
        from facefleet.yaml_input import YamlInputError, read_yaml_file

        if wait and len(task_files) > 1:
            fail("--wait follows one task; several files were given", hint="submit them, then `facefleet status ID`")
        requests = []
        for number, task_file in enumerate(task_files, start=1):
            try:
                data = read_yaml_file(task_file, "task file")
            except YamlInputError as error:
                fail(str(error), hint="a task file is one YAML mapping in UTF-8 (see docs/operations.md)")
            key = idempotency_key if len(task_files) == 1 or not idempotency_key else f"{idempotency_key}/{number}"
            requests.append(
                scheduler_pb2.SubmitTaskRequest(task=task_from_mapping(data, str(task_file)), idempotency_key=key)
            )
        with _channel(scheduler, insecure, config, identity) as channel:
            if len(requests) == 1:
                reply = _call(channel, "SubmitTask", requests[0])
                if json_output and not wait:
                    print_json({"task_id": reply.task_id, "created": reply.created, "state": state_name(reply.state)})
                    return
                if not json_output:
                    console.print(f"{reply.task_id} {'created' if reply.created else 'already submitted'}")
                if wait:
                    _follow(channel, reply.task_id, json_output)
                return
            results = []
            for first in range(0, len(requests), SUBMIT_CALL_ITEMS):
                chunk = scheduler_pb2.SubmitTasksRequest(items=requests[first : first + SUBMIT_CALL_ITEMS])
                results.extend(_call(channel, "SubmitTasks", chunk).results)
        _report_submitted(task_files, results, json_output)

    @app.command("status")
    def status_cmd(
        task_id: str = typer.Argument(...),
        scheduler: str | None = SCHEDULER_OPTION,
        insecure: bool = INSECURE_OPTION,
        identity: str = IDENTITY_OPTION,
        config: Path | None = CONFIG_OPTION,
        json_output: bool = JSON_OPTION,
    ) -> None:
        """A task's state, placement, progress and transition history."""
        from facefleet.v1 import scheduler_pb2

        with _channel(scheduler, insecure, config, identity) as channel:
            status = _call(channel, "GetTask", scheduler_pb2.GetTaskRequest(task_id=task_id))
        if json_output:
            print_json(_status_dict(status))
            return
        console.print(
            f"{task_id} {state_name(status.state)} pool={status.pool or '-'} rule={status.rule or '-'} "
            f"agent={status.agent_id or '-'} attempts={status.attempts}"
        )
        for transition in status.transitions:
            console.print(
                f"  {transition.at.ToDatetime().isoformat()}  {state_name(transition.to_state):<10} {transition.reason}"
            )

    @app.command("watch")
    def watch_cmd(
        task_id: str = typer.Argument(...),
        scheduler: str | None = SCHEDULER_OPTION,
        insecure: bool = INSECURE_OPTION,
        identity: str = IDENTITY_OPTION,
        config: Path | None = CONFIG_OPTION,
        json_output: bool = JSON_OPTION,
    ) -> None:
        """Stream a task's state changes and progress until it finishes."""
        with _channel(scheduler, insecure, config, identity) as channel:
            _follow(channel, task_id, json_output)

    @app.command("cancel")
    def cancel_cmd(
        task_id: str = typer.Argument(...),
        reason: str = typer.Option("", "--reason"),
        scheduler: str | None = SCHEDULER_OPTION,
        insecure: bool = INSECURE_OPTION,
        identity: str = IDENTITY_OPTION,
        config: Path | None = CONFIG_OPTION,
        json_output: bool = JSON_OPTION,
    ) -> None:
        """Cancel a task (reaches the agent when it is running)."""
        from facefleet.v1 import scheduler_pb2

        with _channel(scheduler, insecure, config, identity) as channel:
            reply = _call(channel, "CancelTask", scheduler_pb2.CancelTaskRequest(task_id=task_id, reason=reason))
        if json_output:
            print_json({"task_id": task_id, "state": state_name(reply.state)})
        else:
            console.print(f"{task_id} {state_name(reply.state)}")

    @app.command("tasks")
    def tasks_cmd(
        project: str = typer.Option("", "--project"),
        state: str = typer.Option("", "--state", help=f"One of {', '.join(STATE_NAMES)}."),
        pool: str = typer.Option("", "--pool"),
        limit: int = typer.Option(100, "--limit", min=1, max=1000),
        page_token: str = typer.Option("", "--page-token"),
        scheduler: str | None = SCHEDULER_OPTION,
        insecure: bool = INSECURE_OPTION,
        identity: str = IDENTITY_OPTION,
        config: Path | None = CONFIG_OPTION,
        json_output: bool = JSON_OPTION,
    ) -> None:
        """List tasks, filtered by project, state and pool."""
        from rich.table import Table

        from facefleet.v1 import scheduler_pb2, types_pb2

        if state and state not in STATE_NAMES:
            fail(f"--state {state!r} is not a task state", hint=f"use one of {', '.join(STATE_NAMES)}")
        request = scheduler_pb2.ListTasksRequest(
            project=project,
            state=types_pb2.TaskState.Value(f"TASK_STATE_{state.upper()}") if state else 0,  # type: ignore[arg-type]
            pool=pool,
            limit=limit,
            page_token=page_token,
        )
        with _channel(scheduler, insecure, config, identity) as channel:
            reply = _call(channel, "ListTasks", request)
        if json_output:
            print_json({"tasks": [_status_dict(t) for t in reply.tasks], "next_page_token": reply.next_page_token})
            return
        table = Table("id", "project", "state", "pool", "agent", "attempts")
        for status in reply.tasks:
            table.add_row(
                status.task.id,
                status.task.project,
                state_name(status.state),
                status.pool,
                status.agent_id,
                str(status.attempts),
            )
        console.print(table)
        if reply.next_page_token:
            console.print(f"more: --page-token {reply.next_page_token}")


SUBMIT_CALL_ITEMS = 1000  # the scheduler's SubmitTasks limit
ITEM_PATH = re.compile(r"^items\[\d+\]\.")  # a refusal's item index: the file name says which


def _report_submitted(task_files: list[Path], results: list[Any], json_output: bool) -> None:
    """One line per file (its id, or why it was refused); exit 1 when any was refused."""
    refused = [
        (path, result.error) for path, result in zip(task_files, results, strict=True) if result.HasField("error")
    ]
    if json_output:
        rows: list[dict[str, Any]] = []
        for path, result in zip(task_files, results, strict=True):
            if result.HasField("error"):
                error = result.error
                rows.append({"file": str(path), "error": error.message, "field": ITEM_PATH.sub("", error.field)})
            else:
                done = result.submitted
                rows.append(
                    {
                        "file": str(path),
                        "task_id": done.task_id,
                        "created": done.created,
                        "state": state_name(done.state),
                    }
                )
        print_json(rows)
    else:
        for path, result in zip(task_files, results, strict=True):
            if result.HasField("submitted"):
                done = result.submitted
                console.print(line(str(path), f": {done.task_id} {'created' if done.created else 'already submitted'}"))
        for path, error in refused:  # the file names the item: its index in the call adds nothing
            message = ITEM_PATH.sub("", error.message)
            print_error(f"{path}: {message}", hint="fix that field and submit this file again")
    if refused:
        raise typer.Exit(1)


def _follow(channel: Any, task_id: str, json_output: bool) -> None:
    import grpc

    from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc

    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    last = ""
    try:
        for event in stub.WatchTask(scheduler_pb2.WatchTaskRequest(task_id=task_id)):
            last = state_name(event.state)
            if json_output:
                print_json(_status_dict(event))
            elif event.HasField("progress"):
                p = event.progress
                console.print(f"  progress {p.frames_done}/{p.frames_total} {p.stage} {p.message}")
            else:
                console.print(f"{event.at.ToDatetime().isoformat()}  {last:<10} {event.pool or '':<14} {event.reason}")
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        fail(f"watch of {task_id} ended: {code.name if code else 'error'}: {details}")
    if last in ("failed", "cancelled"):
        raise typer.Exit(1)
