"""CLI commands: `certs init|issue`, `lock`, `unlock`, `audit verify|query|proof`."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from facefleet.cli.output import JSON_OPTION, console, fail, line, print_json, styled
from facefleet.config import Settings, load_settings
from facefleet.domain import CLOUD_ZONE
from facefleet.rpc_errors import reason_of
from facefleet.security import audit as audit_log
from facefleet.security import certs
from facefleet.security.tls import TLSMaterialError, secure_channel
from facefleet.v1 import admin_pb2, admin_pb2_grpc

CONFIG_OPTION = typer.Option(
    None, "--config", help="facefleet.toml to read (default: $FACEFLEET_CONFIG or ./facefleet.toml)."
)
SINCE_PATTERN = re.compile(r"^(\d+)([mhdw])$")
SINCE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), "fix the config file or its FACEFLEET_* environment variables")


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """`7d`, `12h`, `30m`, `2w` before now, or an ISO date/time (UTC when no zone is given)."""
    now = now or dt.datetime.now(dt.UTC)
    match = SINCE_PATTERN.match(value.strip())
    if match:
        try:
            return now - dt.timedelta(**{SINCE_UNITS[match.group(2)]: int(match.group(1))})
        except OverflowError:
            raise typer.BadParameter(f"{value!r} reaches back before the year 1") from None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a span like 7d/12h/30m/2w nor an ISO date") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _signer(key: Path | None, config: Path | None) -> audit_log.Signer | None:
    """The key from --key, else the configured [audit] signing_key, else none (unsigned logs only)."""
    key = key or _settings(config).audit.signing_key
    if key is None:
        return None
    try:
        return audit_log.Signer.from_file(key)
    except (OSError, ValueError) as exc:
        fail(str(exc), "pass the HMAC secret file or the Ed25519 key (private or public PEM) used for signing")


def _admin_call(
    config: Path | None, scheduler: str | None, cert_name: str, insecure: bool, call: str, request: Any
) -> Any:
    settings = _settings(config)
    address = scheduler or settings.scheduler.listen
    try:
        channel = secure_channel(address, settings.tls, cert_name, insecure=insecure or None)
    except TLSMaterialError as exc:
        fail(str(exc))
    with channel:
        try:
            return getattr(admin_pb2_grpc.AdminStub(channel), call)(request, timeout=15)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            hints = {
                grpc.StatusCode.PERMISSION_DENIED: f"the certificate {cert_name!r} lacks the role; use --cert-name "
                "with a certificate carrying it (compliance for locks)",
                grpc.StatusCode.UNAVAILABLE: f"is the scheduler running at {address}, and was its certificate issued "
                "by the same CA as yours? (`facefleet certs init` makes both)",
            }
            reason = reason_of(exc)
            fail(
                f"{call} failed: {code.name if code else 'error'}{f' ({reason})' if reason else ''}: {details}",
                hints.get(code, "") if code else "",
            )


def _configured_pool_zones(config: Path | None, world: Path | None) -> dict[str, str]:
    """Trust zone per pool as configured ([scheduler] pools, [cloud] pools, a world file): records
    are what the scheduler wrote, the configuration is what the pools really are."""
    settings = _settings(config)
    zones: dict[str, str] = {pool.name: pool.trust_zone for pool in settings.scheduler.pools}
    zones.update({pool.name: CLOUD_ZONE for pool in settings.cloud.pools})
    if world is not None:
        from facefleet.scheduler.placement.world import WorldFileError, load_world

        try:
            zones.update({pool.name: pool.trust_zone for pool in load_world(world).pools})
        except WorldFileError as exc:
            fail(str(exc), "see docs/policy.md#world-snapshots for the format")
    return zones


def _lock_json(lock: admin_pb2.ProjectLock) -> dict[str, Any]:
    return MessageToDict(lock, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def register(app: typer.Typer) -> None:
    certs_app = typer.Typer(
        help="Create the demo CA and certificates (mTLS identities and roles).", no_args_is_help=True
    )
    audit_app = typer.Typer(help="Verify and query the tamper-evident audit log.", no_args_is_help=True)
    app.add_typer(certs_app, name="certs")
    app.add_typer(audit_app, name="audit")

    @certs_app.command("init")
    def certs_init(
        directory: Path = typer.Option(None, "--dir", help="Where to write (default: [tls] dir, var/certs)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing demo CA and all its certificates."),
        host: list[str] = typer.Option(
            [], "--host", help="Extra DNS name or IP for the scheduler and agent certificates."
        ),
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Create a local CA and the demo certificates: scheduler, agent, one per role, admin, c2pa-signer."""
        target = directory or _settings(config).tls.dir
        try:
            issued = certs.init_demo_pki(target, hosts=[*certs.DEFAULT_HOSTS, *host], force=force)
        except certs.CertificateError as exc:
            fail(str(exc))
        table = Table(title=f"demo PKI in {target}")
        for column in ("name", "certificate", "roles"):
            table.add_column(column)
        for item in issued:
            table.add_row(item.name, str(item.cert), ", ".join(item.roles) or "-")
        console.print(table)
        console.print(f"CA: {target / certs.CA_CERT_FILE} (key {target / certs.CA_KEY_FILE}, keep it private)")

    @certs_app.command("issue")
    def certs_issue(
        name: str = typer.Argument(..., help="Certificate CN and file name (<dir>/<name>.pem)."),
        role: list[str] = typer.Option([], "--role", help="Role to carry (repeat for several)."),
        host: list[str] = typer.Option([], "--host", help="DNS name or IP: makes it a server certificate too."),
        directory: Path = typer.Option(None, "--dir", help="Directory with the CA and for the output."),
        ca: Path | None = typer.Option(None, "--ca", help="CA certificate (default <dir>/ca.pem)."),
        ca_key: Path | None = typer.Option(None, "--ca-key", help="CA private key (default <dir>/ca-key.pem)."),
        days: int = typer.Option(825, "--days", min=1, max=3650, help="Validity in days."),
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Issue one more certificate from the CA, e.g. `certs issue alice --role finance --role auditor`."""
        target = directory or _settings(config).tls.dir
        if not role and not host:
            fail("a certificate without roles or hosts can do nothing", "add --role ROLE and/or --host HOST")
        try:
            certs.check_name(name)
            authority = certs.load_ca(target, ca, ca_key)
            issued = certs.issue_to_files(authority, target, name, roles=role, hosts=host, server=bool(host), days=days)
        except certs.CertificateError as exc:
            fail(str(exc))
        console.print(f"issued {issued.cert} (key {issued.key}) roles: {', '.join(issued.roles) or '-'}")

    def lock_or_unlock(
        locked: bool, project: str, reason: str, scheduler: str | None, cert_name: str, insecure: bool,
        as_json: bool, config: Path | None,
    ) -> None:  # fmt: skip
        if locked:
            result = _admin_call(
                config, scheduler, cert_name, insecure, "LockProject",
                admin_pb2.LockProjectRequest(project=project, reason=reason),
            )  # fmt: skip
        else:
            result = _admin_call(
                config, scheduler, cert_name, insecure, "UnlockProject",
                admin_pb2.UnlockProjectRequest(project=project, reason=reason),
            )  # fmt: skip
        if as_json:
            print_json(_lock_json(result))
        elif locked:
            console.print(
                line(styled(result.project, "bold"), f" locked by {result.by}: its tasks run on-prem only ({reason})")
            )
        else:
            console.print(line(styled(result.project, "bold"), f" unlocked by {result.by} ({reason})"))

    scheduler_option = typer.Option(None, "--scheduler", help="Scheduler address (default: [scheduler] listen).")
    cert_option = typer.Option("compliance", "--cert-name", help="Client certificate <tls dir>/<name>.pem to use.")
    insecure_option = typer.Option(False, "--insecure", help="Plaintext, no certificate: local development only.")

    @app.command("lock")
    def lock_cmd(
        project: str = typer.Argument(..., help="Project to pin to the private zone."),
        reason: str = typer.Option(..., "--reason", help="Why (ticket, regulation); goes into the audit log."),
        scheduler: str | None = scheduler_option,
        cert_name: str = cert_option,
        insecure: bool = insecure_option,
        as_json: bool = JSON_OPTION,
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Compliance lock: the project's tasks run on-prem only; queued cloud work is re-placed, running
        cloud work is stopped and re-run on-prem."""
        lock_or_unlock(True, project, reason, scheduler, cert_name, insecure, as_json, config)

    @app.command("unlock")
    def unlock_cmd(
        project: str = typer.Argument(..., help="Project to release."),
        reason: str = typer.Option(..., "--reason", help="Why; goes into the audit log."),
        scheduler: str | None = scheduler_option,
        cert_name: str = cert_option,
        insecure: bool = insecure_option,
        as_json: bool = JSON_OPTION,
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Lift a compliance lock (private-sensitivity tasks stay on-prem regardless)."""
        lock_or_unlock(False, project, reason, scheduler, cert_name, insecure, as_json, config)

    def audit_path(path: Path | None, config: Path | None) -> Path:
        return path or _settings(config).audit.path

    @audit_app.command("verify")
    def audit_verify(
        path: Path | None = typer.Argument(None, help="Audit log (default: [audit] path)."),
        key: Path | None = typer.Option(
            None, "--key", help="Check signatures with this HMAC secret / Ed25519 key (default: [audit] signing_key)."
        ),
        anchor: str | None = typer.Option(None, "--anchor", help="A head hash noted earlier: detects truncation."),
        as_json: bool = JSON_OPTION,
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Check every record's seq, hash chain (and signature). Exit 1 naming the first bad record."""
        target = audit_path(path, config)
        report = audit_log.verify(target, _signer(key, config), anchor)
        if as_json:
            print_json({"path": str(target), **report.__dict__})
        if not report.ok:
            if not as_json:
                fail(
                    f"{target}: {report.problem}",
                    f"{report.records} record(s) before it verify; restore from backup and investigate",
                )
            raise typer.Exit(1)
        if not as_json:
            console.print(
                line(styled("OK", "green"), f" {target}: {report.records} records, chain intact; head {report.head}")
            )

    @audit_app.command("query")
    def audit_query(
        project: str | None = typer.Option(None, "--project", help="Only this project."),
        since: str | None = typer.Option(None, "--since", help="7d, 12h, 30m, 2w or an ISO date."),
        kind: str | None = typer.Option(
            None, "--kind", help=f"One of: {', '.join(k.value for k in audit_log.AuditKind)}."
        ),
        path: Path | None = typer.Option(None, "--path", help="Audit log (default: [audit] path)."),
        as_json: bool = JSON_OPTION,
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Records for a compliance review, oldest first."""
        target = audit_path(path, config)
        if not target.is_file():
            fail(f"audit log {target} does not exist", "pass --path or set [audit] path")
        if kind is not None and kind not in {k.value for k in audit_log.AuditKind}:
            fail(f"unknown kind {kind!r}", f"use one of: {', '.join(k.value for k in audit_log.AuditKind)}")
        records = audit_log.query(target, project=project, since=parse_since(since) if since else None, kind=kind)
        if as_json:
            print_json(records)
            return
        table = Table(title=f"{len(records)} audit record(s)")
        for column in ("seq", "at", "kind", "actor", "details"):
            table.add_column(column)
        skip = {"seq", "at", "kind", "actor", "prev", "hash", "sig"}
        for record in records:
            details = " ".join(f"{k}={v}" for k, v in record.items() if k not in skip)
            table.add_row(
                str(record.get("seq")),
                str(record.get("at")),
                str(record.get("kind")),
                str(record.get("actor")),
                details,
            )
        console.print(table)

    @audit_app.command("proof")
    def audit_proof(
        project: str = typer.Option(..., "--project", help="Project to prove residency for."),
        since: str | None = typer.Option(None, "--since", help="Only tasks with records since (7d, ISO date)."),
        path: Path | None = typer.Option(None, "--path", help="Audit log (default: [audit] path)."),
        key: Path | None = typer.Option(
            None, "--key", help="Check signatures with this key (default: [audit] signing_key)."
        ),
        world: Path | None = typer.Option(
            None, "--world", help="World snapshot YAML whose pools' trust zones override what records say."
        ),
        as_json: bool = JSON_OPTION,
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Residency proof: every task of the project, its pools and trust zones. PASS only if the chain
        verifies and every task ran in the private zone. Exit 1 on FAIL."""
        target = audit_path(path, config)
        if not target.is_file():
            fail(f"audit log {target} does not exist", "pass --path or set [audit] path")
        proof = audit_log.residency_proof(
            target,
            project,
            parse_since(since) if since else None,
            _signer(key, config),
            pool_zones=_configured_pool_zones(config, world),
        )
        if as_json:
            print_json(
                {
                    "project": project, "passed": proof.passed, "chain": proof.chain.__dict__,
                    "tasks": [{**t.__dict__, "private_only": t.private_only} for t in proof.tasks],
                    "locks": proof.locks, "seen": proof.seen, "zone_conflicts": proof.zone_conflicts,
                }
            )  # fmt: skip
        else:
            table = Table(title=f"residency proof for {project}")
            for column in ("task", "pools", "trust zones", "final state", "verdict"):
                table.add_column(column)
            for task in proof.tasks:
                verdict = styled("private", "green") if task.private_only else styled("LEFT PRIVATE ZONE", "red")
                table.add_row(task.task, ", ".join(task.pools) or "-", ", ".join(task.zones) or "(never ran)",
                              task.final_state or "-", verdict)  # fmt: skip
            console.print(table)
            for task in proof.tasks:
                for pool in task.withdrawn:
                    console.print(f"{task.task}: dispatch to {pool} withdrawn before it was sent (not committed)")
            for lock in proof.locks:
                console.print(f"{lock.get('at')} {lock.get('kind')} by {lock.get('actor')}: {lock.get('reason')}")
            for conflict in proof.zone_conflicts:
                console.print(line(styled("configured zone wins:", "yellow"), f" {conflict}"))
            if not proof.seen:
                console.print(
                    f"project {project!r} never appears in {target}: check the name (project names are lowercase)"
                )
            chain = "chain intact" if proof.chain.ok else f"chain BROKEN: {proof.chain.problem}"
            verdict = styled("PASS", "bold green") if proof.passed else styled("FAIL", "bold red")
            console.print(line(verdict, f" {len(proof.tasks)} task(s); {chain}"))
        if not proof.passed:
            raise typer.Exit(1)
