"""Rule sources: watched files and Consul KV (blocking queries) keep last-known-good."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from facefleet.scheduler.metrics import RULES_LOAD_ERRORS
from facefleet.scheduler.rules_source import ActiveConfig, ConsulRuleSource, FileRuleSource, default_policy_dir
from tests.consul_double import ConsulKVDouble

RULES_V1 = "rules:\n- {id: default, match: {}, allow: ['onprem-*']}\n"
RULES_V2 = (
    "rules:\n- {id: burst, match: {priority: [urgent]}, allow: ['*']}\n"
    "- {id: default, match: {}, allow: ['onprem-*']}\n"
)
RULES_BAD = "rules:\n- {id: default, match: {}, allow: ['onprem-*'], prefer: cheapest}\n"


def errors_metric() -> float:
    return RULES_LOAD_ERRORS._value.get()  # type: ignore[attr-defined,no-any-return]


def wait_for(predicate: Callable[[], bool], timeout: float = 1.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def consul() -> Iterator[tuple[str, str]]:
    """(address, unique prefix): a real agent when CONSUL_HTTP_ADDR is set, else the test double."""
    prefix = f"facefleet-test-{uuid.uuid4().hex[:8]}/"
    real = os.environ.get("CONSUL_HTTP_ADDR")
    if real:
        addr = real if real.startswith("http") else f"http://{real}"
        yield addr, prefix
        requests.delete(f"{addr}/v1/kv/{prefix}", params={"recurse": "true"}, timeout=5)
        return
    with ConsulKVDouble() as double:
        yield double.url, prefix


def put(addr: str, key: str, value: str) -> None:
    assert requests.put(f"{addr}/v1/kv/{key}", data=value, timeout=5).text == "true"


def test_consul_double_semantics(consul: tuple[str, str]) -> None:
    addr, prefix = consul
    put(addr, prefix + "a", "1")
    got = requests.get(f"{addr}/v1/kv/{prefix}", params={"recurse": "true"}, timeout=5)
    index = int(got.headers["X-Consul-Index"])
    assert got.json()[0]["Value"] == "MQ=="  # base64 of "1"
    modify = got.json()[0]["ModifyIndex"]
    assert requests.put(f"{addr}/v1/kv/{prefix}a", data="2", params={"cas": modify + 1000}, timeout=5).text == "false"
    assert requests.put(f"{addr}/v1/kv/{prefix}a", data="2", params={"cas": modify}, timeout=5).text == "true"
    started = time.monotonic()
    blocked = requests.get(
        f"{addr}/v1/kv/{prefix}", params={"recurse": "true", "index": str(index + 1000), "wait": "300ms"}, timeout=5
    )
    assert time.monotonic() - started >= 0.25 and blocked.status_code == 200
    assert requests.get(f"{addr}/v1/kv/{prefix}missing", timeout=5).status_code == 404


def test_consul_valid_change_applies_within_a_second(consul: tuple[str, str]) -> None:
    addr, prefix = consul
    put(addr, prefix + "rules", RULES_V1)
    put(addr, prefix + "budgets/marketing", json.dumps({"monthly_cap_usd": 100, "alert_pct": 80}))
    source = ConsulRuleSource(addr, prefix, wait="5s")
    seen: list[ActiveConfig] = []
    source.subscribe(seen.append)
    source.start()
    try:
        first = source.current()
        assert [r.id for r in first.ruleset.rules] == ["default"] and first.budgets["marketing"].monthly_cap_usd == 100
        time.sleep(0.2)  # the watcher is now parked in a blocking query
        put(addr, prefix + "rules", RULES_V2)
        took = wait_for(lambda: [r.id for r in source.current().ruleset.rules] == ["burst", "default"])
        assert took < 1.0
        source.set_lock("film-x", "talent contract", "compliance")
        wait_for(lambda: source.current().locks.get("film-x") == "talent contract")
        source.remove_lock("film-x")
        wait_for(lambda: "film-x" not in source.current().locks)
        wait_for(lambda: bool(seen) and seen[-1].version == source.current().version)
    finally:
        source.stop()


def test_consul_invalid_change_keeps_last_known_good(consul: tuple[str, str]) -> None:
    addr, prefix = consul
    put(addr, prefix + "rules", RULES_V1)
    source = ConsulRuleSource(addr, prefix, wait="5s")
    source.start()
    try:
        good = source.current()
        before = errors_metric()
        put(addr, prefix + "rules", RULES_BAD)
        wait_for(lambda: bool(source.current().errors))
        now = source.current()
        assert now.version == good.version and now.ruleset is good.ruleset
        assert any("prefer" in e and "rules" in e for e in now.errors)
        assert errors_metric() == before + 1
    finally:
        source.stop()


def test_consul_outage_keeps_last_known_good() -> None:
    double = ConsulKVDouble().start()
    put(double.url, "ff/rules", RULES_V2)
    source = ConsulRuleSource(double.url, "ff/", wait="1s", request_timeout_s=0.5)
    good = source.reload()
    assert not good.errors and len(good.ruleset.rules) == 2
    double.stop()
    before = errors_metric()
    after = source.reload()
    assert after.ruleset is good.ruleset and after.version == good.version
    assert "unreachable" in after.errors[0] and errors_metric() > before


def test_consul_never_loaded_uses_private_only_fallback() -> None:
    source = ConsulRuleSource("http://127.0.0.1:9", "ff/", request_timeout_s=0.3)
    active = source.current()
    assert active.is_fallback and active.ruleset.rules[0].trust_zones == ("private",)


def test_file_source_watch_reload_and_writes(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    shutil.copytree(default_policy_dir(), policy)
    source = FileRuleSource(policy, poll_interval_s=0.05)
    source.start()
    try:
        good = source.current()
        assert not good.errors and good.budgets["marketing"].monthly_cap_usd == 1000
        before = errors_metric()
        (policy / "rules.yaml").write_text(RULES_BAD)
        wait_for(lambda: bool(source.current().errors))
        assert source.current().version == good.version and errors_metric() == before + 1
        (policy / "rules.yaml").write_text(RULES_V1)
        wait_for(lambda: [r.id for r in source.current().ruleset.rules] == ["default"])
        assert not source.current().errors
        source.set_budget("marketing", 250, 90)
        assert source.current().budgets["marketing"].monthly_cap_usd == 250
        source.set_lock("promo-z", "legal hold", "compliance")
        assert source.current().locks["promo-z"] == "legal hold"
        source.remove_lock("promo-z")
        assert "promo-z" not in source.current().locks and "film-x" in source.current().locks
    finally:
        source.stop()
