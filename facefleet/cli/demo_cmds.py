"""`facefleet up`: the one-command demo on the embedded defaults (see facefleet/demo.py)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import typer

from facefleet.cli.output import JSON_OPTION, console, err_console, fail, line, print_json, styled
from facefleet.domain import state_name


def register(app: typer.Typer) -> None:
    @app.command("up")
    def up_cmd(
        directory: Path = typer.Option(
            Path("facefleet-demo"), "--dir", help="Working directory for certs, policies, inputs, outputs, logs."
        ),
        keep_running: bool = typer.Option(False, "--keep-running", help="Leave the stack up until Ctrl-C."),
        timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for the workload to finish."),
        json_output: bool = JSON_OPTION,
    ) -> None:
        """Start a scheduler, an on-prem agent and a cloud-zone agent; run a sample workload; explain it.

        Embedded defaults: SQLite store, file policies, heartbeat capacity, a local CA (mTLS
        everywhere). Exits 0 when every promise held: private and locked work on-prem, public
        urgent work burst to the cloud-zone pool, every task succeeded.
        """
        import grpc
        from rich.live import Live

        from facefleet import demo

        started = time.monotonic()
        out = err_console if json_output else console  # --json keeps stdout for the JSON alone
        with out.status("preparing certificates, policies and sample inputs..."):
            try:
                layout = demo.prepare(directory)
            except (demo.DemoError, OSError) as error:
                fail(str(error), hint=f"check that {directory} is writable")
        stack = None
        try:
            with out.status("starting scheduler and agents..."):
                stack = demo.start_stack(layout)
                demo.wait_for_pools(stack)
            out.print(
                line(
                    styled("up", "green"),
                    f": scheduler {stack.scheduler_address} (mTLS), agents in pools ",
                    styled(demo.ONPREM_POOL, "bold"),
                    " (private) and ",
                    styled(demo.CLOUD_POOL, "bold"),
                    " (cloud zone)",
                )
            )
            demo.lock_project(stack, demo.LOCKED_PROJECT, "talent contract forbids third-party processing")
            out.print(line("compliance locked project ", styled(demo.LOCKED_PROJECT, "bold"), " on-prem (audited)"))
            ids = demo.submit_workload(stack)
            with Live(console=out, refresh_per_second=4, transient=json_output) as live:
                statuses = demo.follow(stack, ids, lambda s: live.update(_progress_table(demo, s)), timeout_s=timeout)
            rows = demo.summary_rows(layout, statuses)
            problems = demo.check_demo_promises(rows)
            audit_summary = _audit_summary(layout)
            if not audit_summary["verified"]:
                problems.append(f"audit chain broken: {audit_summary['problem']}")
            if not audit_summary["locked_project_proof"] or not audit_summary["locked_project_tasks"]:
                problems.append(f"no residency proof for {demo.LOCKED_PROJECT} in the audit log")
            if json_output:
                print_json({"tasks": rows, "audit": audit_summary, "problems": problems, "dir": str(layout.root)})
            else:
                console.print(_summary_table(rows))
                _print_next_steps(layout, stack, rows, audit_summary, time.monotonic() - started)
            if keep_running:
                out.print(f"console: {demo.start_console(stack)}", soft_wrap=True)
                out.print(line(styled("--keep-running", "bold"), ": the stack stays up; Ctrl-C stops it."))
                stop = threading.Event()
                signal.signal(signal.SIGINT, lambda *_: stop.set())
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                while not stop.wait(1.0):
                    stack.check_alive()
            if problems:
                fail("the demo did not keep its promises: " + "; ".join(problems), hint=f"logs: {layout.logs}")
        except demo.DemoError as error:
            fail(str(error), hint=f"process logs are in {layout.logs}")
        except grpc.RpcError as error:
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            fail(f"the scheduler refused a demo call: {details}", hint=f"process logs are in {layout.logs}")
        finally:
            if stack is not None:
                with out.status("stopping scheduler and agents..."):
                    stack.stop()


def _progress_table(demo: Any, statuses: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="workload", expand=False)
    for column in ("task", "state", "pool", "progress"):
        table.add_column(column)
    for name, status in statuses.items():
        progress = status.last_progress
        done = f"{progress.frames_done}/{progress.frames_total}" if progress.frames_total else ""
        state = state_name(status.state)
        table.add_row(name, state, status.pool or "-", done)
    return table


def _summary_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="facefleet demo: what went where, and why", show_lines=False)
    for column in ("task", "sensitivity", "project", "pool", "rule", "why", "output", "ID sim."):
        table.add_column(column, overflow="fold")
    for row in rows:
        pool_style = "green" if row["pool"] == "onprem-local" else "cyan"
        table.add_row(
            row["task"],
            row["sensitivity"],
            row["project"],
            styled(row["pool"], pool_style),
            row["rule"],
            row["why"],
            Path(row["output"]).name if row["output"] else styled(row["state"], "red"),
            "-" if row["id_similarity"] is None else f"{row['id_similarity']:.2f}",
        )
    return table


def _audit_summary(layout: Any) -> dict[str, Any]:
    from facefleet import demo
    from facefleet.security.audit import residency_proof, verify

    report = verify(layout.audit)
    proof = residency_proof(layout.audit, demo.LOCKED_PROJECT)
    return {
        "verified": report.ok,
        "records": report.records,
        "problem": report.problem,
        "locked_project_tasks": len(proof.tasks),
        "locked_project_proof": proof.passed,
    }


def _print_next_steps(layout: Any, stack: Any, rows: list[dict[str, Any]], audit: dict[str, Any], took: float) -> None:
    from facefleet import demo
    from facefleet.agent.pipeline.provenance import c2pa_available

    example = next((r for r in rows if r["pool"] == "cloud-local"), rows[0])
    broken = line(styled("BROKEN", "red"), f" ({audit['problem']})")
    verdict = styled("intact", "green") if audit["verified"] else broken
    proof = styled("PASS", "green") if audit["locked_project_proof"] else styled("FAIL", "red")
    console.print(
        line(
            f"\noutputs: {layout.outputs}\naudit log: {layout.audit} — {audit['records']} records, chain ",
            verdict,
            f"; residency proof for {demo.LOCKED_PROJECT}: ",
            proof,
            f" ({audit['locked_project_tasks']} task(s), all in the private zone)",
        )
    )
    console.print(
        f"engine: {example['engine'] or 'n/a'} (no ONNX weights installed: the landmark engine put Grace "
        "Hopper's face on the astronaut; drop verified models into models/ for the ONNX production path)\n"
        "ID similarity: dlib's recognizer, 1 - distance to the source face (>= 0.4: the same person to it; "
        "the untouched astronaut scores 0.30)\n"
        + (
            "provenance: every output carries a signed C2PA manifest (demo PKI's c2pa-signer)\n\n"
            if c2pa_available()
            else "provenance: outputs labelled (sidecar JSON), not C2PA-signed: "
            "pip install -e '.[provenance]' to sign them\n\n"
        )
        + "Ask why a task went where it did:\n"
        f"  facefleet explain --task-id {example['id']} --scheduler {stack.scheduler_address} "
        f"--config {layout.config}   (with --keep-running)\n"
        f"  facefleet explain {layout.root / 'tasks.yaml'} --policy {layout.policies} "
        f"--world {layout.policies / 'world.yaml'}   (offline, the same placement code)\n"
        "Prove the locked project stayed on-prem:\n"
        f"  facefleet audit proof --project film-x --path {layout.audit}\n"
        "Web console (finance, compliance, operators): `facefleet up --keep-running` prints\n"
        "  console: http://127.0.0.1:PORT/?token=...   or, beside a running stack:\n"
        f"  facefleet console serve --config {layout.config}  +  facefleet console token --role finance "
        f"--config {layout.config}\n"
        f"\ndone in {took:.0f} s"
    )
