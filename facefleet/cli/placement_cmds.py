"""CLI commands: explain, policy test, policy validate, simulate (issue #3)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from facefleet.cli.output import JSON_OPTION, console, fail, line, print_json, styled
from facefleet.scheduler.placement.engine import place
from facefleet.scheduler.placement.explain import decision_dict, render_decision
from facefleet.scheduler.placement.model import Budget, RuleSet, TaskSpec, World
from facefleet.scheduler.placement.policy import PolicyError
from facefleet.scheduler.placement.policy_cases import find_case_files, run_case_file
from facefleet.scheduler.placement.world import WorldFileError, compose_world, load_world
from facefleet.scheduler.rules_source.files import default_policy_dir, read_policy_dir
from facefleet.yaml_input import YamlInputError, read_yaml_file

POLICY_OPTION = typer.Option(None, "--policy", help="Policy directory (rules.yaml, budgets.yaml, locks.yaml).")
WORLD_OPTION = typer.Option(..., "--world", help="World snapshot YAML (pools, budgets, locks).")


def _load_policy(directory: Path | None) -> tuple[RuleSet, dict[str, Budget], dict[str, str]]:
    directory = directory or default_policy_dir()
    try:
        return read_policy_dir(directory)
    except PolicyError as exc:
        fail(
            f"policy in {directory} is invalid:\n  " + "\n  ".join(str(e) for e in exc.errors),
            "fix the listed fields; `facefleet policy validate DIR` re-checks",
        )


def _load_world(path: Path, budgets: dict[str, Budget], locks: dict[str, str]) -> World:
    try:
        return compose_world(load_world(path), budgets, locks)
    except WorldFileError as exc:
        fail(str(exc), "see docs/policy.md#world-snapshots for the format")


def _explain_recorded(
    task_id: str, scheduler: str | None, insecure: bool, identity: str, config: Path | None, as_json: bool
) -> None:
    """Fetch the stored decision of a submitted task from the scheduler and render it."""
    import grpc

    from facefleet.config import load_settings
    from facefleet.scheduler.placement.proto_codec import decision_from_proto, task_spec_from_proto
    from facefleet.security.tls import TLSMaterialError, secure_channel
    from facefleet.v1 import scheduler_pb2, scheduler_pb2_grpc

    try:
        settings = load_settings(config)
        channel = secure_channel(
            scheduler or settings.scheduler.listen, settings.tls, identity, insecure=insecure or None
        )
    except (TLSMaterialError, FileNotFoundError, ValueError) as exc:
        fail(str(exc), "pass --config of the running stack, or --insecure against a development scheduler")
    with channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            status = stub.GetTask(scheduler_pb2.GetTaskRequest(task_id=task_id), timeout=10)
            recorded = stub.Explain(scheduler_pb2.ExplainRequest(task_id=task_id), timeout=10)
        except grpc.RpcError as exc:
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            fail(f"scheduler refused: {details}", "list task ids with `facefleet tasks`")
    task = task_spec_from_proto(status.task)
    decision = decision_from_proto(recorded)
    if as_json:
        print_json(decision_dict(task, decision))
    else:
        console.print(render_decision(task, decision))


def _load_tasks(path: Path) -> tuple[list[TaskSpec], bool]:
    """The tasks in a task file, and whether the file holds a list (else one task)."""
    try:
        data = read_yaml_file(path, "task file")
    except YamlInputError as exc:
        fail(str(exc), "a task file is YAML in UTF-8: one task mapping or a list of them")
    items = data if isinstance(data, list) else [data]
    tasks = []
    for i, item in enumerate(items):
        try:
            tasks.append(TaskSpec.from_dict(item, where=f"{path}[{i}]" if isinstance(data, list) else str(path)))
        except ValueError as exc:
            fail(str(exc), "a task has id, project, sensitivity, priority, sla_seconds, frames")
    return tasks, isinstance(data, list)


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def explain_cmd(
        task_file: Path | None = typer.Argument(None, help="YAML with one task or a list of tasks."),
        policy: Path | None = POLICY_OPTION,
        world: Path | None = typer.Option(None, "--world", help="World snapshot YAML (pools, budgets, locks)."),
        task_id: str | None = typer.Option(
            None, "--task-id", help="Explain a submitted task's recorded placement (asks the scheduler)."
        ),
        scheduler: str | None = typer.Option(None, "--scheduler", help="Scheduler host:port for --task-id."),
        insecure: bool = typer.Option(False, "--insecure", help="Plaintext gRPC to the scheduler (development)."),
        identity: str = typer.Option("operator", "--as", help="Client certificate name in the TLS dir."),
        config: Path | None = typer.Option(None, "--config", help="facefleet.toml to read."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Show where a task would go (TASK.yaml offline) or went (--task-id, live) and why.

        The matched rule, every candidate pool, the filter that dropped it with the compared
        values, and the scores.
        """
        if task_id:
            _explain_recorded(task_id, scheduler, insecure, identity, config, as_json)
            return
        if task_file is None or world is None:
            fail(
                "give TASK.yaml with --world (offline), or --task-id ID (a submitted task)",
                "e.g. facefleet explain task.yaml --policy policies/default --world policies/default/world.yaml",
            )
        ruleset, budgets, locks = _load_policy(policy)
        snapshot = _load_world(world, budgets, locks)
        tasks, is_list = _load_tasks(task_file)
        decisions = [(t, place(t, ruleset, snapshot)) for t in tasks]
        if as_json:
            items = [decision_dict(t, d) for t, d in decisions]
            print_json(items if is_list else items[0])
            return
        for t, d in decisions:
            console.print(render_decision(t, d))
            console.print()

    policy_app = typer.Typer(help="Check rule sets: validate files, run policy test cases.", no_args_is_help=True)
    app.add_typer(policy_app, name="policy")

    @policy_app.command("validate")
    def validate_cmd(
        directory: Path = typer.Argument(..., help="Policy directory (or a directory of them)."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Validate rules/budgets/locks; every problem is listed with file, rule and field."""
        dirs = (
            [directory]
            if (directory / "rules.yaml").exists()
            else sorted(p.parent for p in directory.rglob("rules.yaml"))
        )
        if not dirs:
            fail(f"no rules.yaml found under {directory}", "point at a policy directory such as policies/default")
        report: list[dict[str, Any]] = []
        for d in dirs:
            try:
                ruleset, budgets, locks = read_policy_dir(d)
                report.append(
                    {
                        "dir": str(d),
                        "valid": True,
                        "version": ruleset.version,
                        "rules": len(ruleset.rules),
                        "budgets": len(budgets),
                        "locks": len(locks),
                        "errors": [],
                    }
                )
            except PolicyError as exc:
                report.append(
                    {
                        "dir": str(d),
                        "valid": False,
                        "errors": [
                            {"file": e.file, "rule": e.rule_id, "field": e.field, "message": e.message}
                            for e in exc.errors
                        ],
                    }
                )
        if as_json:
            print_json(report)
        else:
            for item in report:
                if item["valid"]:
                    console.print(
                        line(styled("OK", "green"), f" {item['dir']}: {item['rules']} rules, version {item['version']}")
                    )
                else:
                    console.print(line(styled("INVALID", "red"), f" {item['dir']}:"))
                    for e in item["errors"]:
                        rule = f" rule {e['rule']!r}" if e["rule"] else ""
                        console.print(f"  {e['file']}:{rule} field {e['field']!r}: {e['message']}")
        if not all(item["valid"] for item in report):
            raise typer.Exit(1)

    @policy_app.command("test")
    def test_cmd(
        directory: Path = typer.Argument(..., help="Policy directory, or a directory of policy directories."),
        verbose: bool = typer.Option(False, "-v", "--verbose", help="Show the decision reason for every case."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Run policy test cases (<policy>/tests/*.yaml), like `opa test`; exit 1 on any failure."""
        files = find_case_files(directory)
        if not files:
            fail(f"no test cases under {directory}", "cases live in <policy dir>/tests/*.yaml (see docs/policy.md)")
        results = []
        loaded: dict[Path, Any] = {}
        for path in files:
            policy_dir = path.parent.parent
            if policy_dir not in loaded:
                try:
                    loaded[policy_dir] = read_policy_dir(policy_dir)
                except PolicyError as exc:
                    loaded[policy_dir] = exc
            policy = loaded[policy_dir]
            if isinstance(policy, PolicyError):
                from facefleet.scheduler.placement.policy_cases import CaseResult

                results.append(CaseResult(str(path), "<policy>", False, tuple(str(e) for e in policy.errors), None, 0))
                continue
            results.extend(run_case_file(path, *policy))
        passed = sum(r.passed for r in results)
        if as_json:
            print_json(
                {
                    "passed": passed,
                    "failed": len(results) - passed,
                    "results": [
                        {
                            "file": r.file,
                            "name": r.name,
                            "passed": r.passed,
                            "failures": list(r.failures),
                            "decision": r.decision.to_dict() if r.decision and verbose else None,
                        }
                        for r in results
                    ],
                }
            )
        else:
            current = None
            for r in results:
                if r.file != current:
                    current = r.file
                    console.print(f"{r.file}:")
                tag = styled("PASS", "green") if r.passed else styled("FAIL", "red")
                console.print(line("  ", tag, f": {r.name} ({r.elapsed_s * 1000:.2f}ms)"))
                for failure in r.failures:
                    console.print(f"        {failure}")
                if verbose and r.decision:
                    console.print(line("        ", styled(r.decision.reason, "dim")))
            console.print("-" * 80)
            console.print(
                f"PASS: {passed}/{len(results)}"
                + (f"\nFAIL: {len(results) - passed}/{len(results)}" if passed < len(results) else "")
            )
        if passed < len(results):
            raise typer.Exit(1)

    @app.command("simulate")
    def simulate_cmd(
        workload: Path = typer.Option(..., "--workload", help="Workload YAML (streams, tasks, price_traces)."),
        world: Path = WORLD_OPTION,
        policy: Path | None = POLICY_OPTION,
        sweep_spec: str | None = typer.Option(
            None,
            "--sweep",
            help="NAME=START:STOP:STEP; NAME: max_spot_price_per_hour, monthly_cap_usd[.<budget>], "
            "onprem_queue_wait_s_gt",
        ),
        plot: Path | None = typer.Option(None, "--plot", help="With --sweep: write the cost vs SLA-miss curve (PNG)."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Replay a workload through the real placement code on a simulated clock."""
        from facefleet.scheduler.simulate import WorkloadError, parse_sweep, simulate, sweep

        ruleset, budgets, locks = _load_policy(policy)
        snapshot = _load_world(world, budgets, locks)
        try:
            spec = read_yaml_file(workload, "workload")
        except YamlInputError as exc:
            fail(str(exc), "see the workload format in docs/policy.md#simulate")
        started = time.perf_counter()
        try:
            if sweep_spec is None:
                report = simulate(ruleset, snapshot, spec)
            else:
                name, values = parse_sweep(sweep_spec)
                points = sweep(ruleset, snapshot, spec, name, values)
        except WorkloadError as exc:
            fail(str(exc), "see the workload format in docs/policy.md#simulate")
        elapsed = time.perf_counter() - started
        if sweep_spec is None:
            if as_json:
                print_json(report.to_dict())
                return
            table = Table(title=f"simulation ({elapsed:.2f}s wall)")
            table.add_column("metric")
            table.add_column("value", justify="right")
            for key, value in report.to_dict().items():
                table.add_row(key, str(value))
            console.print(table)
            return
        rows = [{"value": v, **r.to_dict()} for v, r in points]
        if plot is not None:
            _plot_sweep(name, rows, plot)
        if as_json:
            print_json({"parameter": name, "points": rows})
            return
        table = Table(title=f"sweep {name} ({elapsed:.2f}s wall)")
        for column in (name, "cloud $", "sla misses", "p95 s", "unfinished", "residency violations"):
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(
                f"{row['value']:g}",
                f"{row['cloud_cost_usd']:.2f}",
                str(row["sla_misses"]),
                f"{row['completion_p95_s']:.0f}",
                str(row["unfinished"]),
                str(row["residency_violations"]),
            )
        console.print(table)
        if plot is not None:
            console.print(f"plot written to {plot}")


def _plot_sweep(name: str, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["cloud_cost_usd"] for r in rows], [r["sla_misses"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"{r['value']:g}", (r["cloud_cost_usd"], r["sla_misses"]), fontsize=8)
    ax.set_xlabel("cloud cost (USD)")
    ax.set_ylabel("SLA misses")
    ax.set_title(f"cost vs SLA misses, sweeping {name}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
