"""CLI: `facefleet budget show | set | report | history` — the finance commands (issue #6).

show/report/history read the spend ledger straight from the store (`--store`, default
scheduler.store_url); `set` is a finance-role call to the Admin service, audited there.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from facefleet.cli.output import JSON_OPTION, console, fail, print_json, styled

CONFIG_OPTION = typer.Option(None, "--config", help="facefleet.toml to read.")
STORE_OPTION = typer.Option(None, "--store", help="Store URL (default: scheduler.store_url from the config).")
SINCE_OPTION = typer.Option("30d", "--since", help="Window start: 30d, 12h, 90m, or a date 2026-11-01.")
REPORT_COLUMNS = (
    "ended_at", "task_id", "project", "rule", "pool", "budget", "provider", "instance_id",
    "instance_seconds", "usd_per_hour", "usd", "estimate_usd", "outcome",
)  # fmt: skip


def parse_since(value: str, now: datetime) -> datetime:
    """'30d' / '12h' / '90m' before `now`, or an ISO date/time (UTC when no zone is given)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhm])\s*", value)
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        return now - timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[unit]: amount})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since {value!r}: use a duration like 30d, 12h, 90m or a date like 2026-11-01") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _settings(config: Path | None) -> Any:
    from facefleet.config import load_settings

    try:
        return load_settings(config)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error), hint="fix the config file or the FACEFLEET_* environment variables")


def _ledger(store: str | None, config: Path | None) -> Any:
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError, OperationalError

    from facefleet.scheduler.ledger import SpendLedger
    from facefleet.scheduler.store import StoreUnusable, check_store

    url = store or _settings(config).scheduler.store_url
    try:
        parsed = sa.engine.make_url(url)
        check_store(url)
    except (ArgumentError, StoreUnusable) as error:
        fail(str(error), hint="e.g. --store sqlite:///var/facefleet.db or postgresql+psycopg://USER@HOST/DB")
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        fail(
            f"no store at {parsed.database}: nothing has been recorded there",
            hint="pass --store with the scheduler's store URL (scheduler.store_url)",
        )
    try:
        return SpendLedger(sa.create_engine(url))
    except OperationalError as error:  # reachable a moment ago
        fail(f"cannot open the store {parsed.render_as_string(hide_password=True)}: {error.orig}",
             hint="check that the database is reachable and the URL is right")  # fmt: skip


def _money(value: float | None) -> str:
    return "—" if value is None else f"${value:,.2f}"


def show_data(ledger: Any, now: datetime) -> dict[str, Any]:
    from facefleet.scheduler.ledger import month_of

    month = month_of(now)
    accounts = []
    for status in ledger.status(now):
        cap = status.monthly_cap_usd
        accounts.append(
            {
                "budget": status.name,
                "monthly_cap_usd": cap,
                "alert_pct": status.alert_pct,
                "spent_usd": round(status.spent_usd, 4),
                "reserved_usd": round(status.reserved_usd, 4),
                "remaining_usd": None if status.remaining_usd is None else round(status.remaining_usd, 4),
                "pct_used": round(100 * status.spent_usd / cap, 2) if cap else None,
                "forecast_month_end_usd": round(status.forecast_usd, 4),
                "alert": bool(cap and status.alert_pct and status.spent_usd >= cap * status.alert_pct / 100),
                "by_project": {k: round(v, 4) for k, v in ledger.by_project(month, status.name).items()},
                "by_pool": {k: round(v, 4) for k, v in ledger.by_pool(month, status.name).items()},
            }
        )
    return {"month": month, "as_of": now.isoformat(), "accounts": accounts}


def report_rows(ledger: Any, since: datetime, until: datetime) -> list[dict[str, Any]]:
    rows = []
    for record in ledger.records(since, until):
        row = {key: record[key] for key in REPORT_COLUMNS}
        row["ended_at"] = record["ended_at"].isoformat()
        row["usd"] = round(float(record["usd"]), 6)
        rows.append(row)
    return rows


def register(app: typer.Typer) -> None:
    budget = typer.Typer(help="Cloud budgets: spend vs cap, set caps (finance), reports, replayable history.")
    app.add_typer(budget, name="budget")

    @budget.command("show")
    def show_cmd(
        store: str | None = STORE_OPTION, config: Path | None = CONFIG_OPTION, as_json: bool = JSON_OPTION
    ) -> None:
        """Spend vs cap per account this month, by project and pool, with a month-end forecast."""
        data = show_data(_ledger(store, config), datetime.now(UTC))
        if as_json:
            print_json(data)
            return
        if not data["accounts"]:
            console.print(f"No budget accounts or cloud spend recorded for {data['month']}.")
            return
        table = Table(title=f"cloud spend {data['month']} (month to date)")
        for column in ("account", "spent", "reserved", "cap", "used", "forecast"):
            table.add_column(column, justify="left" if column == "account" else "right")
        for a in data["accounts"]:
            used = "—" if a["pct_used"] is None else f"{a['pct_used']:.1f}%"
            name = styled(f"{a['budget']} (alert)", "bold red") if a["alert"] else a["budget"]
            table.add_row(name, _money(a["spent_usd"]), _money(a["reserved_usd"]), _money(a["monthly_cap_usd"]),
                          used, _money(a["forecast_month_end_usd"]))  # fmt: skip
        console.print(table)
        for a in data["accounts"]:
            for label, key in (("by project", "by_project"), ("by pool", "by_pool")):
                if a[key]:
                    console.print(f"{a['budget']} {label}: " + ", ".join(f"{k} {_money(v)}" for k, v in a[key].items()))
        if any(a["monthly_cap_usd"] is None for a in data["accounts"]):
            console.print("— cap: account not in the rules store (or the scheduler has not synced it yet)")

    @budget.command("set")
    def set_cmd(
        account: str = typer.Argument(..., help="Budget account name."),
        monthly_cap: float = typer.Option(..., "--monthly-cap", help="Hard cap in USD per calendar month (UTC)."),
        alert_pct: float = typer.Option(80.0, "--alert-pct", help="Alert when spend reaches this % of the cap."),
        reason: str = typer.Option(..., "--reason", help="Why (ticket, approval): written to the audit log."),
        create: bool = typer.Option(False, "--create", help="Add the account if no account has this name."),
        scheduler: str | None = typer.Option(
            None, "--scheduler", help="Scheduler host:port (default: scheduler.listen)."
        ),
        insecure: bool = typer.Option(False, "--insecure", help="Plaintext gRPC: local development only."),
        identity: str = typer.Option("finance", "--as", help="Client certificate name in the TLS dir (finance role)."),
        config: Path | None = CONFIG_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Set an account's monthly cap and alert percentage (finance role; audited)."""
        import grpc
        from google.protobuf.json_format import MessageToDict

        from facefleet.money import PERCENT, USD, AmountError
        from facefleet.rpc_errors import reason_of
        from facefleet.security.tls import TLSMaterialError, secure_channel
        from facefleet.v1 import admin_pb2, admin_pb2_grpc

        try:
            USD.check(monthly_cap, "--monthly-cap")
            PERCENT.check(alert_pct, "--alert-pct")
        except AmountError as error:
            fail(str(error), hint="amounts are finite USD figures; see docs/finance.md#limits")
        if alert_pct <= 0:
            fail(f"--alert-pct: must be > 0, got {alert_pct:g}", hint="e.g. --alert-pct 80")
        settings = _settings(config)
        address = scheduler or settings.scheduler.listen
        try:
            channel = secure_channel(address, settings.tls, identity, insecure=insecure or None)
        except TLSMaterialError as error:
            fail(str(error), hint="or pass --insecure against a plaintext development scheduler")
        request = admin_pb2.SetBudgetRequest(
            name=account, monthly_cap_usd=monthly_cap, alert_pct=alert_pct, reason=reason, create=create
        )
        try:
            with channel:
                result = admin_pb2_grpc.AdminStub(channel).SetBudget(request, timeout=30)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            hints = {
                grpc.StatusCode.PERMISSION_DENIED: "budget changes need the finance role: use a finance cert (--as)",
                grpc.StatusCode.UNAVAILABLE: "is the scheduler running at that address? check --scheduler and TLS",
                grpc.StatusCode.INVALID_ARGUMENT: "fix the named field and try again (--create adds a new account)",
            }
            why = reason_of(error)
            fail(f"SetBudget failed: {code.name if code else 'error'}{f' ({why})' if why else ''}: {details}",
                 hints.get(code, "") if code else "")  # fmt: skip
        if as_json:
            print_json(
                MessageToDict(result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            )
            return
        console.print(
            f"budget {result.name}: cap {_money(result.monthly_cap_usd)}/month, alert at "
            f"{result.alert_pct:g}%, spent {_money(result.spent_usd)} this month"
        )

    @budget.command("report")
    def report_cmd(
        since: str = SINCE_OPTION,
        fmt: str = typer.Option("csv", "--format", help="csv or json."),
        output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
        store: str | None = STORE_OPTION,
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Every recorded spend line (task, project, rule, pool, account, instance-seconds, price, usd)."""
        if fmt not in ("csv", "json"):
            fail(f"--format {fmt!r} is not supported", hint="use --format csv or --format json")
        now = datetime.now(UTC)
        try:
            start = parse_since(since, now)
        except ValueError as error:
            fail(str(error))
        rows = report_rows(_ledger(store, config), start, now)
        if fmt == "json":
            text = _json_text({"since": start.isoformat(), "until": now.isoformat(), "rows": rows,
                               "total_usd": round(sum(r["usd"] for r in rows), 6)})  # fmt: skip
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
        if output is None:
            sys.stdout.write(text)
        else:
            output.write_text(text)
            console.print(f"wrote {len(rows)} spend lines to {output}")

    @budget.command("history")
    def history_cmd(
        output: Path = typer.Option(..., "--output", "-o", help="Workload YAML to write."),
        since: str = SINCE_OPTION,
        store: str | None = STORE_OPTION,
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Turn recorded tasks and prices into a workload for `facefleet simulate --workload`."""
        import sqlalchemy as sa
        import yaml

        from facefleet.scheduler.history_workload import completed_runs, historic_tasks, history_workload
        from facefleet.scheduler.run_estimates import samples_before
        from facefleet.scheduler.store import TaskStore

        now = datetime.now(UTC)
        try:
            start = parse_since(since, now)
        except ValueError as error:
            fail(str(error))
        ledger = _ledger(store, config)
        settings = _settings(config)
        url = store or settings.scheduler.store_url
        frame_s = {pool.name: pool.sec_per_frame for pool in settings.scheduler.pools}
        task_store = TaskStore(url)
        try:
            engine = sa.create_engine(url)
            workload = history_workload(
                ledger, start, now, historic_tasks(task_store, start, now), sec_per_frame=frame_s,
                run_time_samples=samples_before(engine, start.timestamp()), runs=completed_runs(engine, start, now),
            )  # fmt: skip
        finally:
            task_store.close()
        output.write_text(yaml.safe_dump(workload, sort_keys=False))
        console.print(
            f"wrote {len(workload['tasks'])} tasks and {len(workload['price_traces'])} price traces to {output}; "
            f"replay: facefleet simulate --workload {output} --sweep max_spot_price_per_hour=0.2:1.0:0.1"
        )


def _json_text(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, default=str) + "\n"
