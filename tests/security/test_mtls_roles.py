"""mTLS and role gate against a real gRPC server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from facefleet.config import TLSConfig
from facefleet.grpc_server import SERVICE_NAMES, ServerHandle, build_server
from facefleet.rpc_errors import FIELD_KEY, reason_of
from facefleet.scheduler import metrics
from facefleet.scheduler.admin_service import AdminServicer
from facefleet.security.audit import AuditLog, verify
from facefleet.security.roles import RoleGate, current_identity
from facefleet.security.tls import TLSMaterialError, channel_credentials, secure_channel, server_credentials
from facefleet.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, types_pb2
from tests.security.conftest import FakeRuleSource

TIMEOUT = 5


class EchoAgent(agent_pb2_grpc.AgentServicer):
    """Minimal agent: RunTask streams one Progress naming the caller (tests the streaming gate)."""

    def RunTask(self, request: agent_pb2.RunTaskRequest, context: grpc.ServicerContext) -> Iterator[types_pb2.Progress]:
        yield types_pb2.Progress(task_id="t1", message=f"caller={current_identity().subject}")


def start(
    audit: AuditLog, rules: FakeRuleSource, credentials: grpc.ServerCredentials | None, insecure: bool = False
) -> ServerHandle:
    admin = AdminServicer(rules, audit, drain=lambda agent_id: agent_id == "agent-1", spent_usd=lambda name: 12.5)
    return build_server(
        "127.0.0.1:0",
        [
            (SERVICE_NAMES["Admin"], lambda s: admin_pb2_grpc.add_AdminServicer_to_server(admin, s)),
            (SERVICE_NAMES["Agent"], lambda s: agent_pb2_grpc.add_AgentServicer_to_server(EchoAgent(), s)),
        ],
        credentials,
        interceptors=[RoleGate(audit, insecure=insecure, on_denial=metrics.count_denial)],
        max_workers=4,
    )


@pytest.fixture
def server(tls: TLSConfig, audit: AuditLog, rule_source: FakeRuleSource) -> Iterator[ServerHandle]:
    handle = start(audit, rule_source, server_credentials(tls, "scheduler"))
    yield handle
    handle.stop(None)


def admin_stub(handle: ServerHandle, tls: TLSConfig, identity: str) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(secure_channel(f"127.0.0.1:{handle.port}", tls, identity))


def records(audit: AuditLog, kind: str) -> list[dict]:
    return [json.loads(line) for line in audit.path.read_text().splitlines() if json.loads(line)["kind"] == kind]


def test_client_without_certificate_is_refused_at_handshake(server: ServerHandle, pki_dir: Path) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(pki_dir / "ca.pem").read_bytes())
    stub = admin_pb2_grpc.AdminStub(grpc.secure_channel(f"127.0.0.1:{server.port}", creds))
    with pytest.raises(grpc.RpcError) as caught:
        stub.WhoAmI(admin_pb2.WhoAmIRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(server: ServerHandle, pki_dir: Path, other_pki_dir: Path) -> None:
    # Trusts our server (our CA) but presents a compliance cert signed by an unrelated CA.
    mixed = TLSConfig(dir=other_pki_dir, ca=pki_dir / "ca.pem")
    stub = admin_stub(server, mixed, "compliance")
    with pytest.raises(grpc.RpcError) as caught:
        stub.LockProject(admin_pb2.LockProjectRequest(project="p", reason="r"), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_mtls_server(server: ServerHandle) -> None:
    stub = admin_pb2_grpc.AdminStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.WhoAmI(admin_pb2.WhoAmIRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_wrong_role_is_denied_audited_and_counted(
    server: ServerHandle, tls: TLSConfig, audit: AuditLog, rule_source: FakeRuleSource
) -> None:
    method = "/facefleet.v1.Admin/LockProject"
    before = REGISTRY.get_sample_value("facefleet_permission_denied_total", {"method": method}) or 0.0
    with pytest.raises(grpc.RpcError) as caught:
        admin_stub(server, tls, "finance").LockProject(
            admin_pb2.LockProjectRequest(project="alpha", reason="gdpr"), timeout=TIMEOUT
        )
    error = caught.value
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(error) == "PERMISSION_DENIED_ROLE"
    assert method in error.details() and "compliance" in error.details() and "finance" in error.details()
    assert rule_source.snapshot.locks == {}
    denials = records(audit, "denial")
    assert [(d["actor"], d["method"], d["required_roles"], d["roles"]) for d in denials] == [
        ("finance", method, ["compliance"], ["finance"])
    ]
    assert REGISTRY.get_sample_value("facefleet_permission_denied_total", {"method": method}) == before + 1
    assert verify(audit.path).ok


def test_right_role_locks_and_is_audited(
    server: ServerHandle, tls: TLSConfig, audit: AuditLog, rule_source: FakeRuleSource
) -> None:
    lock = admin_stub(server, tls, "compliance").LockProject(
        admin_pb2.LockProjectRequest(project="alpha", reason="GDPR-42"), timeout=TIMEOUT
    )
    assert (lock.project, lock.locked, lock.by) == ("alpha", True, "compliance")
    assert rule_source.snapshot.locks == {"alpha": "GDPR-42"}
    (locked,) = records(audit, "lock")
    assert (locked["actor"], locked["project"], locked["reason"]) == ("compliance", "alpha", "GDPR-42")
    (admin,) = records(audit, "admin")
    assert (admin["act"], admin["outcome"], admin["actor"]) == ("lock_project", "ok", "compliance")

    unlock = admin_stub(server, tls, "compliance").UnlockProject(
        admin_pb2.UnlockProjectRequest(project="alpha", reason="review done"), timeout=TIMEOUT
    )
    assert not unlock.locked and rule_source.snapshot.locks == {}
    assert len(records(audit, "unlock")) == 1


def test_admin_holds_every_human_role(server: ServerHandle, tls: TLSConfig) -> None:
    who = admin_stub(server, tls, "admin").WhoAmI(admin_pb2.WhoAmIRequest(), timeout=TIMEOUT)
    assert who.subject == "admin"
    assert sorted(who.roles) == ["auditor", "compliance", "finance", "operator", "submitter"]


NEW_BUDGET = admin_pb2.SetBudgetRequest(name="gpu", monthly_cap_usd=9, reason="q", create=True)


@pytest.mark.parametrize(
    ("identity", "call", "message", "allowed"),
    [
        ("finance", "SetBudget", NEW_BUDGET, True),
        ("operator", "SetBudget", NEW_BUDGET, False),
        ("auditor", "ListBudgets", admin_pb2.ListBudgetsRequest(), True),
        ("submitter", "ListBudgets", admin_pb2.ListBudgetsRequest(), False),
        ("operator", "DrainAgent", admin_pb2.DrainAgentRequest(agent_id="agent-1", reason="maint"), True),
        ("compliance", "DrainAgent", admin_pb2.DrainAgentRequest(agent_id="agent-1", reason="maint"), False),
        ("operator", "ReloadRules", admin_pb2.ReloadRulesRequest(), True),
        ("finance", "ReloadRules", admin_pb2.ReloadRulesRequest(), False),
        ("auditor", "ListLocks", admin_pb2.ListLocksRequest(), True),
        ("agent", "ListLocks", admin_pb2.ListLocksRequest(), False),
    ],
)
def test_role_matrix(
    server: ServerHandle, tls: TLSConfig, identity: str, call: str, message: object, allowed: bool
) -> None:
    method = getattr(admin_stub(server, tls, identity), call)
    if allowed:
        method(message, timeout=TIMEOUT)
    else:
        with pytest.raises(grpc.RpcError) as caught:
            method(message, timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_streaming_method_is_gated(server: ServerHandle, tls: TLSConfig, audit: AuditLog) -> None:
    address = f"127.0.0.1:{server.port}"
    ok = agent_pb2_grpc.AgentStub(secure_channel(address, tls, "scheduler"))
    (progress,) = list(ok.RunTask(agent_pb2.RunTaskRequest(), timeout=TIMEOUT))
    assert progress.message == "caller=scheduler"
    denied = agent_pb2_grpc.AgentStub(secure_channel(address, tls, "operator"))
    with pytest.raises(grpc.RpcError) as caught:
        list(denied.RunTask(agent_pb2.RunTaskRequest(), timeout=TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert records(audit, "denial")[0]["method"] == "/facefleet.v1.Agent/RunTask"


def test_unimplemented_method_without_role_entry_is_denied(server: ServerHandle, tls: TLSConfig) -> None:
    # Describe is mapped (scheduler, operator); the auditor role is not in it.
    stub = agent_pb2_grpc.AgentStub(secure_channel(f"127.0.0.1:{server.port}", tls, "auditor"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Describe(agent_pb2.DescribeRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_health_needs_only_a_valid_certificate(server: ServerHandle, tls: TLSConfig) -> None:
    channel = secure_channel(f"127.0.0.1:{server.port}", tls, "auditor")
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_validation_error_names_field_and_is_audited(server: ServerHandle, tls: TLSConfig, audit: AuditLog) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        admin_stub(server, tls, "compliance").LockProject(
            admin_pb2.LockProjectRequest(project="alpha", reason="  "), timeout=TIMEOUT
        )
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (FIELD_KEY, "reason") in tuple(error.trailing_metadata())
    (admin,) = records(audit, "admin")
    assert admin["outcome"] == "rejected" and admin["actor"] == "compliance"


def test_backend_failure_is_unavailable_and_audited(
    server: ServerHandle, tls: TLSConfig, audit: AuditLog, rule_source: FakeRuleSource
) -> None:
    rule_source.fail_next = ConnectionError("consul at 127.0.0.1:8500 refused the connection")
    with pytest.raises(grpc.RpcError) as caught:
        admin_stub(server, tls, "finance").SetBudget(
            admin_pb2.SetBudgetRequest(name="gpu", monthly_cap_usd=10, reason="q3", create=True), timeout=TIMEOUT
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "consul" in caught.value.details()
    assert records(audit, "admin")[0]["outcome"] == "failed"


def test_set_budget_reports_spend_and_lists(server: ServerHandle, tls: TLSConfig, rule_source: FakeRuleSource) -> None:
    budget = admin_stub(server, tls, "finance").SetBudget(
        admin_pb2.SetBudgetRequest(name="gpu-burst", monthly_cap_usd=250, alert_pct=90, reason="Q3 plan", create=True),
        timeout=TIMEOUT,
    )
    assert (budget.monthly_cap_usd, budget.alert_pct, budget.spent_usd) == (250, 90, 12.5)
    listed = admin_stub(server, tls, "finance").ListBudgets(admin_pb2.ListBudgetsRequest(), timeout=TIMEOUT)
    assert [(b.name, b.monthly_cap_usd) for b in listed.budgets] == [("gpu-burst", 250)]
    with pytest.raises(grpc.RpcError) as caught:
        admin_stub(server, tls, "finance").SetBudget(
            admin_pb2.SetBudgetRequest(name="gpu", monthly_cap_usd=-1, reason="x"), timeout=TIMEOUT
        )
    assert (FIELD_KEY, "monthly_cap_usd") in tuple(caught.value.trailing_metadata())


def test_insecure_mode_is_loud_and_grants_dev_identity(
    tls: TLSConfig, audit: AuditLog, rule_source: FakeRuleSource, capfd: pytest.CaptureFixture[str]
) -> None:
    handle = start(audit, rule_source, None, insecure=True)
    try:
        channel = secure_channel(f"127.0.0.1:{handle.port}", tls, "nobody", insecure=True)
        who = admin_pb2_grpc.AdminStub(channel).WhoAmI(admin_pb2.WhoAmIRequest(), timeout=TIMEOUT)
    finally:
        handle.stop(None)
    assert who.subject == "insecure-dev" and "compliance" in who.roles
    err = capfd.readouterr().err
    assert "INSECURE" in err and "plaintext" in err


def test_missing_certificate_file_error_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(TLSMaterialError) as caught:
        channel_credentials(TLSConfig(dir=tmp_path), "compliance")
    message = str(caught.value)
    assert str(tmp_path / "ca.pem") in message and "facefleet certs init" in message
