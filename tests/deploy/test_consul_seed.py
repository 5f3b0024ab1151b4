"""deploy/consul/seed_kv.py: the keys it writes are the ones the scheduler's Consul source reads, and it
never overwrites a budget or lock (the CLI owns those) nor, with --no-rules, the rules (Terraform's)."""

from __future__ import annotations

import base64
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from facefleet.scheduler.rules_source import ConsulRuleSource, resolve_endpoint
from tests.consul_double import ConsulKVDouble

REPO_ROOT = Path(__file__).resolve().parents[2]
POLICIES = REPO_ROOT / "policies" / "default"


def _load_seed_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("seed_kv", REPO_ROOT / "deploy" / "consul" / "seed_kv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed_kv = _load_seed_module()


def test_documents_for_default_policies_parse_in_the_scheduler() -> None:
    documents = seed_kv.kv_documents(POLICIES)
    assert documents["facefleet/rules"] == (POLICIES / "rules.yaml").read_text()
    entries = [{"Key": key, "Value": base64.b64encode(value.encode()).decode()} for key, value in documents.items()]
    ruleset, budgets, locks = ConsulRuleSource()._parse(entries)
    assert ruleset is not None
    assert set(budgets) == {key.removeprefix("facefleet/budgets/") for key in documents if "/budgets/" in key}
    assert budgets, "policies/default has budgets; none were written"
    assert set(locks) == {key.removeprefix("facefleet/locks/") for key in documents if "/locks/" in key}
    assert locks, "policies/default has locks; none were written"


def test_missing_rules_is_actionable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"rules\.yaml not found"):
        seed_kv.kv_documents(tmp_path)


def test_malformed_budgets_is_actionable(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("rules: []\n")
    (tmp_path / "budgets.yaml").write_text("budgets: {marketing: 10}\n")
    with pytest.raises(ValueError, match="budgets"):
        seed_kv.kv_documents(tmp_path)


@pytest.fixture
def kv() -> Iterator[ConsulKVDouble]:
    with ConsulKVDouble() as double:
        yield double


def stored(double: ConsulKVDouble) -> dict[str, str]:
    return {key: entry.value.decode() for key, entry in double.store.entries.items()}


def test_main_puts_every_document(kv: ConsulKVDouble, capsys: pytest.CaptureFixture[str]) -> None:
    assert seed_kv.main([str(POLICIES), kv.address, "facefleet/"]) == 0  # host:port, no scheme
    assert stored(kv) == seed_kv.kv_documents(POLICIES)
    active = ConsulRuleSource(resolve_endpoint(kv.address, environ={}), "facefleet/").reload()
    assert not active.errors and active.budgets and active.locks
    assert "wrote" in capsys.readouterr().out


def test_rerun_keeps_caps_and_locks_set_with_the_cli(kv: ConsulKVDouble, capsys: pytest.CaptureFixture[str]) -> None:
    """Budgets and locks belong to `facefleet budget set` / `lock`: seeding again must not undo them."""
    assert seed_kv.main([str(POLICIES), kv.url]) == 0
    source = ConsulRuleSource(resolve_endpoint(kv.url, environ={}), "facefleet/")
    name = next(iter(source.reload().budgets))
    project = next(iter(source.reload().locks))
    source.set_budget(name, 12.5, 50)  # what `facefleet budget set` does through the Admin RPC
    source.set_lock(project, "extended by legal", "compliance")  # `facefleet lock`
    assert seed_kv.main([str(POLICIES), kv.url]) == 0
    again = source.reload()
    assert again.budgets[name].monthly_cap_usd == 12.5 and again.budgets[name].alert_pct == 50
    assert again.locks[project] == "extended by legal"
    assert "kept" in capsys.readouterr().out


def test_no_rules_leaves_the_rules_key_to_terraform(kv: ConsulKVDouble) -> None:
    terraform_rules = "rules:\n- {id: from-terraform, match: {}, allow: ['onprem-*']}\n"
    kv.store.put("facefleet/rules", terraform_rules.encode(), 0, None)
    assert seed_kv.main([str(POLICIES), kv.url, "facefleet/", "--no-rules"]) == 0
    assert stored(kv)["facefleet/rules"] == terraform_rules
    assert any(key.startswith("facefleet/budgets/") for key in stored(kv))


def test_token_and_datacenter_follow_the_consul_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    with ConsulKVDouble(acl={"seeder": {"facefleet/": "write"}}, datacenter="eu-west") as double:
        monkeypatch.setenv("CONSUL_HTTP_ADDR", double.address)
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "seeder")
        assert seed_kv.main([str(POLICIES), "--dc", "eu-west"]) == 0
        assert "facefleet/rules" in stored(double)
        assert seed_kv.main([str(POLICIES), "--dc", "us-east"]) == 1  # 500 No path to datacenter
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "stolen")
        assert seed_kv.main([str(POLICIES)]) == 1  # 403 ACL not found


def test_main_reports_unreachable_consul(capsys: pytest.CaptureFixture[str]) -> None:
    assert seed_kv.main([str(POLICIES), "http://127.0.0.1:1", "facefleet/"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("seed_kv: facefleet/rules: ") and "Traceback" not in err
