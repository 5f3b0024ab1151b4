"""`facefleet certs` and `facefleet lock/unlock` end to end against a real mTLS Admin server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from facefleet.cli import app
from facefleet.config import TLSConfig
from facefleet.grpc_server import SERVICE_NAMES, ServerHandle, build_server
from facefleet.scheduler.admin_service import AdminServicer
from facefleet.security.audit import AuditLog, query
from facefleet.security.identity import identity_from_certificate
from facefleet.security.roles import RoleGate
from facefleet.security.tls import server_credentials
from facefleet.v1 import admin_pb2_grpc
from tests.security.conftest import FakeRuleSource

runner = CliRunner()


def test_certs_init_issue_and_refuse_overwrite(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    result = runner.invoke(app, ["certs", "init", "--dir", str(directory), "--host", "sched.internal"])
    assert result.exit_code == 0, result.output
    for name in ("ca", "scheduler", "agent", "operator", "finance", "compliance", "auditor", "submitter", "admin",
                 "c2pa-signer"):  # fmt: skip
        assert (directory / f"{name}.pem").is_file() and (directory / f"{name}-key.pem").stat().st_mode & 0o077 == 0
    scheduler = x509.load_pem_x509_certificate((directory / "scheduler.pem").read_bytes())
    san = scheduler.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "sched.internal" in san.get_values_for_type(x509.DNSName)
    assert identity_from_certificate(scheduler).roles == {"scheduler"}

    again = runner.invoke(app, ["certs", "init", "--dir", str(directory)])
    assert again.exit_code == 1 and "--force" in " ".join(again.output.split())

    issued = runner.invoke(
        app, ["certs", "issue", "alice", "--role", "finance", "--role", "auditor", "--dir", str(directory)]
    )
    assert issued.exit_code == 0, issued.output
    alice = identity_from_certificate(x509.load_pem_x509_certificate((directory / "alice.pem").read_bytes()))
    assert (alice.subject, alice.roles) == ("alice", {"finance", "auditor"})

    unknown = runner.invoke(app, ["certs", "issue", "bob", "--role", "root", "--dir", str(directory)])
    assert unknown.exit_code == 1 and "unknown role" in unknown.output


@pytest.fixture
def admin_server(tls: TLSConfig, audit: AuditLog, rule_source: FakeRuleSource) -> Iterator[ServerHandle]:
    admin = AdminServicer(rule_source, audit, drain=lambda agent_id: False)
    handle = build_server(
        "127.0.0.1:0",
        [(SERVICE_NAMES["Admin"], lambda s: admin_pb2_grpc.add_AdminServicer_to_server(admin, s))],
        server_credentials(tls, "scheduler"),
        interceptors=[RoleGate(audit)],
        max_workers=4,
    )
    yield handle
    handle.stop(None)


def test_lock_and_unlock_cli_over_mtls(
    admin_server: ServerHandle, pki_dir: Path, audit: AuditLog, rule_source: FakeRuleSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("FACEFLEET_TLS__DIR", str(pki_dir))
    address = f"127.0.0.1:{admin_server.port}"
    locked = runner.invoke(app, ["lock", "alpha", "--reason", "GDPR-7", "--scheduler", address, "--json"])
    assert locked.exit_code == 0, locked.output
    assert json.loads(locked.stdout)["locked"] is True and rule_source.snapshot.locks == {"alpha": "GDPR-7"}

    denied = runner.invoke(app, ["unlock", "alpha", "--reason", "x", "--scheduler", address, "--cert-name", "operator"])
    assert denied.exit_code == 1 and "PERMISSION_DENIED" in denied.output
    assert rule_source.snapshot.locks == {"alpha": "GDPR-7"}

    unlocked = runner.invoke(app, ["unlock", "alpha", "--reason", "cleared", "--scheduler", address])
    assert unlocked.exit_code == 0 and rule_source.snapshot.locks == {}
    kinds = [r["kind"] for r in query(audit.path, project="alpha")]
    assert kinds.count("lock") == 1 and kinds.count("unlock") == 1
    assert [r["actor"] for r in query(audit.path, kind="denial")] == ["operator"]
