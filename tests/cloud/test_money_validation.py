"""Money-validation corpus: every bad amount, at every place one enters, is refused the same way.

Each case runs the real entry point (the CLI as a user types it, the Admin RPC over gRPC against a
real file rule source) and checks: exit code 1, one `error:` line naming the file or flag and the
field, a `hint:`, no traceback, and nothing changed (files byte-identical, caps unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from facefleet.cli import app
from facefleet.grpc_server import SERVICE_NAMES, ServerHandle, build_server
from facefleet.money import USD, AmountError
from facefleet.scheduler.admin_service import AdminServicer
from facefleet.scheduler.rules_source.files import FileRuleSource
from facefleet.security.audit import AuditLog
from facefleet.security.roles import RoleGate
from facefleet.v1 import admin_pb2, admin_pb2_grpc
from tests.cloud.burst_policy import BURST_RULES

runner = CliRunner()

RULES = BURST_RULES
BUDGETS = "budgets:\n  - {name: burst, monthly_cap_usd: 1, alert_pct: 80}\n"
WORLD = """
pools:
  - {name: onprem-a, provider: onprem, trust_zone: private, free_slots: 1, sec_per_frame: 0.1}
  - {name: cloud-a, provider: aws, trust_zone: cloud, free_slots: 4, sec_per_frame: 0.1, price_per_hour: 7.2}
budgets:
  - {name: burst, monthly_cap_usd: 1, spent_usd: 0}
"""
WORKLOAD = """
duration_s: 60
tasks:
  - {at: 1, project: p, sensitivity: public, priority: urgent, frames: 10}
price_traces: {cloud-a: [[0, 7.2]]}
"""
BAD = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf", "negative": "-100", "huge": "1.0e+300"}


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    directory = tmp_path / "policy"
    directory.mkdir()
    (directory / "rules.yaml").write_text(RULES)
    (directory / "budgets.yaml").write_text(BUDGETS)
    (directory / "locks.yaml").write_text("locks: []\n")
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def refused(args: list[str], *names: str) -> str:
    """Run the CLI; assert the refusal shape; return the output."""
    result = runner.invoke(app, args)
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "error:" in output and "hint:" in output, output
    flat = "".join(output.split())
    for name in names:
        assert name.replace(" ", "") in flat, f"{name!r} not named in: {output}"
    return output


def test_one_check_refuses_nan_infinities_negatives_and_the_ceiling() -> None:
    for value in (float("nan"), float("inf"), float("-inf"), -0.01, 1e300, USD.ceiling * 1.001, True, "5"):
        with pytest.raises(AmountError, match="cap"):
            USD.check(value, "cap")
    assert USD.check(0, "cap") == 0.0 and USD.check(USD.ceiling, "cap") == USD.ceiling


def policy_refused(tmp_path: Path, policy: Path, *names: str) -> None:
    """`policy validate` reports it; a command that loads the policy refuses it (error + hint)."""
    validate = runner.invoke(app, ["policy", "validate", str(policy)])
    assert validate.exit_code == 1 and "Traceback" not in validate.output
    assert all(name.replace(" ", "") in "".join(validate.output.split()) for name in names), validate.output
    (tmp_path / "world.yaml").write_text(WORLD)
    (tmp_path / "workload.yaml").write_text(WORKLOAD)
    refused(["simulate", "--workload", str(tmp_path / "workload.yaml"), "--world", str(tmp_path / "world.yaml"),
             "--policy", str(policy)], *names)  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_budgets_yaml_cap(tmp_path: Path, policy: Path, case: str) -> None:
    (policy / "budgets.yaml").write_text(f"budgets:\n  - {{name: burst, monthly_cap_usd: {BAD[case]}}}\n")
    before = snapshot(policy)
    policy_refused(tmp_path, policy, "budgets.yaml", "monthly_cap_usd")
    assert snapshot(policy) == before


@pytest.mark.parametrize("case", sorted(BAD))
def test_rule_max_spot_price(tmp_path: Path, policy: Path, case: str) -> None:
    rules = RULES.replace("budget: burst", f"budget: burst\n    max_spot_price_per_hour: {BAD[case]}")
    (policy / "rules.yaml").write_text(rules)
    policy_refused(tmp_path, policy, "rules.yaml", "max_spot_price_per_hour")


def test_a_running_scheduler_keeps_its_last_good_caps(policy: Path) -> None:
    rules = FileRuleSource(policy)
    rules.reload()
    (policy / "budgets.yaml").write_text("budgets:\n  - {name: burst, monthly_cap_usd: .nan}\n")
    rules.reload()
    assert rules.current().budgets["burst"].monthly_cap_usd == 1


@pytest.mark.parametrize(
    ("field", "case"),
    [("spent_usd", c) for c in sorted(BAD)]
    + [("monthly_cap_usd", "nan"), ("monthly_cap_usd", "huge")]
    + [("price_per_hour", c) for c in ("nan", "inf", "negative", "huge")]
    + [("provision_s", c) for c in ("negative", "nan", "huge")]
    + [("sec_per_frame", "nan"), ("queue_wait_s", "-inf")],
)
def test_world_file(tmp_path: Path, policy: Path, field: str, case: str) -> None:
    world = WORLD
    if field in ("spent_usd", "monthly_cap_usd"):
        world = world.replace(f"{field}: {'0' if field == 'spent_usd' else '1'}", f"{field}: {BAD[case]}")
    else:
        world = world.replace("price_per_hour: 7.2}", f"price_per_hour: 7.2, {field}: {BAD[case]}}}")
        if field == "price_per_hour":
            world = world.replace("price_per_hour: 7.2, ", "")
    (tmp_path / "world.yaml").write_text(world)
    (tmp_path / "workload.yaml").write_text(WORKLOAD)
    args = ["simulate", "--workload", str(tmp_path / "workload.yaml"), "--world", str(tmp_path / "world.yaml"),
            "--policy", str(policy)]  # fmt: skip
    refused(args, "world", field)


@pytest.mark.parametrize(
    ("workload", "named"),
    [
        (WORKLOAD.replace("[[0, 7.2]]", "[[0, .nan]]"), "price_traces.cloud-a[0][1]"),
        (WORKLOAD.replace("[[0, 7.2]]", "[[0, -1]]"), "price_traces.cloud-a[0][1]"),
        (WORKLOAD.replace("[[0, 7.2]]", "[[.inf, 7.2]]"), "price_traces.cloud-a[0][0]"),
        (WORKLOAD.replace("{at: 1,", "{at: .nan,"), "tasks[0].at"),
        (WORKLOAD.replace("frames: 10}", "frames: 10, sla_seconds: -5}"), "sla_seconds"),
        (WORKLOAD.replace("duration_s: 60", "duration_s: .inf"), "duration_s"),
        (
            "duration_s: 60\nstreams:\n  - {project: p, sensitivity: public, priority: low, per_hour: .nan}\n",
            "per_hour",
        ),
        (
            "duration_s: 2000000\nstreams:\n  - {project: p, sensitivity: public, priority: low, per_hour: 900000}\n",
            "arrivals",
        ),
    ],
)
def test_workload(tmp_path: Path, policy: Path, workload: str, named: str) -> None:
    (tmp_path / "world.yaml").write_text(WORLD)
    (tmp_path / "workload.yaml").write_text(workload)
    args = ["simulate", "--workload", str(tmp_path / "workload.yaml"), "--world", str(tmp_path / "world.yaml"),
            "--policy", str(policy)]  # fmt: skip
    refused(args, named)


@pytest.mark.parametrize(
    ("sweep", "named"),
    [
        ("monthly_cap_usd.burst=nan:1:0.5", "START"),
        ("monthly_cap_usd=0:inf:1", "STOP"),
        ("max_spot_price_per_hour=-1:1:0.5", "START"),
        ("max_spot_price_per_hour=0:1:nan", "STEP"),
        ("monthly_cap_usd=0:1e9:1e-3", "limit is 1000"),
        ("monthly_cap_usd=0:1e300:1e299", "ceiling"),
    ],
)
def test_sweep(tmp_path: Path, policy: Path, sweep: str, named: str) -> None:
    (tmp_path / "world.yaml").write_text(WORLD)
    (tmp_path / "workload.yaml").write_text(WORKLOAD)
    args = ["simulate", "--workload", str(tmp_path / "workload.yaml"), "--world", str(tmp_path / "world.yaml"),
            "--policy", str(policy), "--sweep", sweep]  # fmt: skip
    refused(args, "--sweep", named)


# ---- Admin.SetBudget and `budget set`, against a real file rule source --------------------------


@pytest.fixture
def admin(policy: Path, tmp_path: Path) -> Iterator[tuple[str, FileRuleSource]]:
    rules = FileRuleSource(policy)
    rules.reload()
    audit = AuditLog(tmp_path / "audit.jsonl")
    servicer = AdminServicer(rules, audit, drain=lambda agent_id: False)
    handle: ServerHandle = build_server(
        "127.0.0.1:0",
        [(SERVICE_NAMES["Admin"], lambda s: admin_pb2_grpc.add_AdminServicer_to_server(servicer, s))],
        None,
        interceptors=[RoleGate(audit, insecure=True)],
        max_workers=4,
    )
    yield f"127.0.0.1:{handle.port}", rules
    handle.stop(None)


CAP = "monthly_cap_usd"


@pytest.mark.parametrize(
    ("cap", "alert", "field"),
    [(float("nan"), 80.0, CAP), (float("inf"), 80.0, CAP), (-1.0, 80.0, CAP), (1e300, 80.0, CAP),
     (5.0, float("nan"), "alert_pct"), (5.0, 101.0, "alert_pct")],
)  # fmt: skip
def test_admin_set_budget_rpc(
    admin: tuple[str, FileRuleSource], policy: Path, cap: float, alert: float, field: str
) -> None:
    address, rules = admin
    before = snapshot(policy)
    request = admin_pb2.SetBudgetRequest(name="burst", monthly_cap_usd=cap, alert_pct=alert, reason="FIN-1")
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        admin_pb2_grpc.AdminStub(channel).SetBudget(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    assert snapshot(policy) == before and rules.current().budgets["burst"].monthly_cap_usd == 1


@pytest.mark.parametrize("cap", ["nan", "inf", "-inf", "-5", "1e300"])
def test_budget_set_cli_refuses_bad_caps(admin: tuple[str, FileRuleSource], policy: Path, cap: str) -> None:
    address, _rules = admin
    before = snapshot(policy)
    refused(["budget", "set", "burst", f"--monthly-cap={cap}", "--reason", "FIN-1", "--scheduler", address,
             "--insecure"], "--monthly-cap")  # fmt: skip
    assert snapshot(policy) == before


def test_budget_set_refuses_an_unknown_account_unless_create(admin: tuple[str, FileRuleSource], policy: Path) -> None:
    address, rules = admin
    before = snapshot(policy)
    common = ["--monthly-cap", "50", "--reason", "FIN-2", "--scheduler", address, "--insecure"]
    output = refused(["budget", "set", "brust", *common], "brust", "--create")
    assert "burst" in output  # the known accounts are listed: the typo is obvious
    assert snapshot(policy) == before and set(rules.current().budgets) == {"burst"}

    created = runner.invoke(app, ["budget", "set", "brust", "--create", *common])
    assert created.exit_code == 0, created.output
    rules.reload()
    assert rules.current().budgets["brust"].monthly_cap_usd == 50
    changed = runner.invoke(app, ["budget", "set", "burst", *common])
    assert changed.exit_code == 0, changed.output
    rules.reload()
    assert rules.current().budgets["burst"].monthly_cap_usd == 50
