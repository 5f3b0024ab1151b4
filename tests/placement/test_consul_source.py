"""The Consul rules source (py-consul) against the faithful double, and against a real agent.

Tests taking the `consul` fixture run once per target: the double always, and a real agent too
when CONSUL_HTTP_ADDR is set (reached with the CONSUL_* environment, as the consul CLI would,
under a fresh prefix that is deleted afterwards). Faults a test cannot provoke on a real agent
(injected 500/429, a proxy page, a snapshot restore, ACL tokens, TLS) run against the double only.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from facefleet.config import AuditConfig, PolicyConfig, SchedulerConfig, Settings, TLSConfig
from facefleet.scheduler.rules_source import (
    ActiveConfig,
    ConsulEndpoint,
    ConsulError,
    ConsulRuleSource,
    SourceError,
    resolve_endpoint,
)
from facefleet.security import certs
from tests.consul_double import ConsulKVDouble, DoubleTLS
from tests.placement.watching import errors_metric, reason_count, wait_for

RULES_V1 = "rules:\n- {id: default, match: {}, allow: ['onprem-*']}\n"
RULES_V2 = (
    "rules:\n- {id: burst, match: {priority: [urgent]}, allow: ['*']}\n"
    "- {id: default, match: {}, allow: ['onprem-*']}\n"
)
RULES_BAD = "rules:\n- {id: default, match: {}, allow: ['onprem-*'], prefer: cheapest}\n"
BUDGET = json.dumps({"monthly_cap_usd": 100, "alert_pct": 80})
TARGETS = ["double", "agent"] if os.environ.get("CONSUL_HTTP_ADDR") else ["double"]


def rule_ids(active: ActiveConfig) -> list[str]:
    return [rule.id for rule in active.ruleset.rules]


@dataclass
class Target:
    """A Consul to test against: how the source reaches it, and plain HTTP to arrange its keys."""

    endpoint: ConsulEndpoint
    prefix: str
    double: ConsulKVDouble | None
    http: requests.Session

    def url(self, key: str) -> str:
        return f"{self.endpoint.address}/v1/kv/{key}"

    def put(self, key: str, value: str) -> requests.Response:
        reply = self.http.put(self.url(self.prefix + key), data=value, timeout=5)
        assert reply.status_code == 200 and reply.json() is True, reply.text
        return reply

    def source(self, **options: object) -> ConsulRuleSource:
        return ConsulRuleSource(self.endpoint, self.prefix, **options)  # type: ignore[arg-type]


def session_for(endpoint: ConsulEndpoint) -> requests.Session:
    http = requests.Session()
    http.trust_env = False  # REQUESTS_CA_BUNDLE would replace the session's CA
    if endpoint.token:
        http.headers["X-Consul-Token"] = endpoint.token
    http.verify = str(endpoint.ca) if endpoint.verify and endpoint.ca else endpoint.verify
    if endpoint.client_cert and endpoint.client_key:
        http.cert = (str(endpoint.client_cert), str(endpoint.client_key))
    return http


@pytest.fixture(params=TARGETS)
def consul(request: pytest.FixtureRequest) -> Iterator[Target]:
    prefix = f"facefleet-test-{uuid.uuid4().hex[:8]}/"
    if request.param == "agent":
        endpoint = resolve_endpoint()  # CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...
        http = session_for(endpoint)
        yield Target(endpoint, prefix, None, http)
        http.delete(f"{endpoint.address}/v1/kv/{prefix}", params={"recurse": "true"}, timeout=5)
        return
    with ConsulKVDouble() as double:
        endpoint = resolve_endpoint(double.address, environ={})
        yield Target(endpoint, prefix, double, session_for(endpoint))


@pytest.fixture
def double() -> Iterator[ConsulKVDouble]:
    with ConsulKVDouble() as running:
        yield running


def plain(double: ConsulKVDouble, prefix: str = "ff/", token: str | None = None) -> Target:
    endpoint = resolve_endpoint(double.address, token=token, environ={})
    return Target(endpoint, prefix, double, session_for(endpoint))


# -- Consul's own answers (both targets) ---------------------------------------------------------


def test_kv_semantics(consul: Target) -> None:
    reply = consul.put("a", "1")
    assert reply.text.strip() == "true"  # `true\n` from a dev agent (pretty JSON), `true` otherwise
    if consul.double is not None:
        assert reply.text == "true\n"  # the double answers as `consul agent -dev` does
    got = consul.http.get(consul.url(consul.prefix), params={"recurse": "true"}, timeout=5)
    index = int(got.headers["X-Consul-Index"])
    assert got.json()[0]["Value"] == "MQ=="  # base64 of "1"
    modify = got.json()[0]["ModifyIndex"]
    key = consul.url(consul.prefix + "a")
    assert consul.http.put(key, data="2", params={"cas": modify + 1000}, timeout=5).json() is False
    assert consul.http.put(key, data="2", params={"cas": modify}, timeout=5).json() is True
    started = time.monotonic()
    blocked = consul.http.get(
        consul.url(consul.prefix), params={"recurse": "true", "index": str(index + 1000), "wait": "300ms"}, timeout=5
    )
    assert time.monotonic() - started >= 0.25 and blocked.status_code == 200
    missing = consul.http.get(consul.url(consul.prefix + "missing"), timeout=5)
    assert missing.status_code == 404 and int(missing.headers["X-Consul-Index"]) > 0
    assert "X-Consul-Results-Filtered-By-ACLs" not in missing.headers
    no_unit = consul.http.get(consul.url(consul.prefix), params={"recurse": "1", "index": "1", "wait": "5"}, timeout=5)
    assert no_unit.status_code == 400 and "Invalid wait time" in no_unit.text  # time.ParseDuration("5") fails


def test_valid_change_applies_within_a_second(consul: Target) -> None:
    consul.put("rules", RULES_V1)
    consul.put("budgets/marketing", BUDGET)
    source = consul.source(wait="5s")
    seen: list[ActiveConfig] = []
    source.subscribe(seen.append)
    source.start()
    try:
        first = source.current()
        assert rule_ids(first) == ["default"] and first.budgets["marketing"].monthly_cap_usd == 100
        time.sleep(0.2)  # the watcher is now parked in a blocking query
        consul.put("rules", RULES_V2)
        assert wait_for(lambda: rule_ids(source.current()) == ["burst", "default"]) < 1.0
        source.set_lock("film-x", "talent contract", "compliance")
        wait_for(lambda: source.current().locks.get("film-x") == "talent contract")
        source.set_budget("marketing", 250, 90)
        wait_for(lambda: source.current().budgets["marketing"].monthly_cap_usd == 250)
        source.remove_lock("film-x")
        wait_for(lambda: "film-x" not in source.current().locks)
        wait_for(lambda: bool(seen) and seen[-1].version == source.current().version)
        assert not source.current().errors and source.current().error_reason == ""
    finally:
        source.stop()


def test_invalid_change_keeps_last_known_good(consul: Target) -> None:
    consul.put("rules", RULES_V1)
    source = consul.source(wait="5s")
    source.start()
    try:
        good = source.current()
        before, invalid = errors_metric(), reason_count(SourceError.INVALID)
        consul.put("rules", RULES_BAD)
        wait_for(lambda: bool(source.current().errors))
        now = source.current()
        assert now.version == good.version and now.ruleset is good.ruleset
        assert any("prefer" in e and "rules" in e for e in now.errors) and now.error_reason == "invalid"
        assert errors_metric() == before + 1 and reason_count(SourceError.INVALID) == invalid + 1
    finally:
        source.stop()


def test_missing_rules_key_is_reported_as_missing(consul: Target) -> None:
    active = consul.source().reload()
    assert active.is_fallback and active.error_reason == "missing"
    assert "key missing" in active.errors[0]


# -- faults (double) -----------------------------------------------------------------------------


def test_unreachable_keeps_last_known_good() -> None:
    double = ConsulKVDouble().start()
    target = plain(double)
    target.put("rules", RULES_V2)
    source = target.source(wait="1s", request_timeout_s=0.5)
    good = source.reload()
    assert not good.errors and len(good.ruleset.rules) == 2
    double.stop()
    before = reason_count(SourceError.UNREACHABLE)
    after = source.reload()
    assert after.ruleset is good.ruleset and after.version == good.version
    assert after.error_reason == "unreachable" and "unreachable" in after.errors[0]
    assert reason_count(SourceError.UNREACHABLE) == before + 1


def test_never_loaded_uses_private_only_fallback() -> None:
    source = ConsulRuleSource(resolve_endpoint("127.0.0.1:9", environ={}), "ff/", request_timeout_s=0.3)
    active = source.current()
    assert active.is_fallback and active.ruleset.rules[0].trust_zones == ("private",)


def test_proxy_login_page_never_escapes_and_keeps_last_known_good(double: ConsulKVDouble) -> None:
    target = plain(double)
    target.put("rules", RULES_V1)
    page = "<html><body>Sign in to continue</body></html>"
    double.inject(200, page, content_type="text/html")
    source = target.source(wait="5s")
    source.start()  # the page answers the start-up read: no exception, fallback rules, reason given
    try:
        assert source.current().is_fallback or rule_ids(source.current()) == ["default"]
        wait_for(lambda: rule_ids(source.current()) == ["default"] and not source.current().errors, 2.0)
        good = source.current()
        double.inject(200, page, content_type="text/html")
        double.inject(200, "[1, 2]")  # JSON, but not a KV listing
        before = reason_count(SourceError.BAD_REPLY)
        target.put("rules", RULES_V2)  # wakes the watch; its next reads get the pages
        wait_for(lambda: reason_count(SourceError.BAD_REPLY) == before + 2, 3.0)
        assert source.current().error_reason == "bad_reply" and "not a KV list" in source.current().errors[0]
        wait_for(lambda: not source.current().errors, 3.0)  # the next good answer clears the reason
        assert rule_ids(source.current()) == ["burst", "default"] and good.version != source.current().version
    finally:
        source.stop()


def test_proxy_page_at_startup_is_a_reason_not_an_exception(double: ConsulKVDouble) -> None:
    double.inject(200, "<html>login</html>", content_type="text/html")
    active = plain(double).source().reload()
    assert active.is_fallback and active.error_reason == "bad_reply"
    assert "not JSON" in active.errors[0] and "login" in active.errors[0]


def test_scheduler_start_up_never_raises_on_a_bad_consul_answer(double: ConsulKVDouble, tmp_path: Path) -> None:
    from facefleet.scheduler.assembly import build_scheduler

    double.inject(200, "<html>login</html>", content_type="text/html")
    settings = Settings(
        tls=TLSConfig(insecure=True),
        scheduler=SchedulerConfig(listen="127.0.0.1:0", store_url=f"sqlite:///{tmp_path}/s.db", metrics_port=-1),
        policy=PolicyConfig(source="consul", consul_addr=double.address, consul_prefix="ff/"),
        audit=AuditConfig(path=tmp_path / "audit.jsonl"),
    )
    before = reason_count(SourceError.BAD_REPLY)
    app = build_scheduler(settings).start()
    try:
        assert reason_count(SourceError.BAD_REPLY) == before + 1  # the page was read, and refused
        active = app.rules.current()
        assert active.is_fallback and active.error_reason in ("bad_reply", "missing")  # ff/ holds no rules
        assert active.ruleset.rules[0].trust_zones == ("private",)  # private-only until Consul answers
    finally:
        app.stop()


def test_bad_token_is_forbidden() -> None:
    acl_double = ConsulKVDouble(acl={"ops": {"ff/": "write"}}).start()
    try:
        plain(acl_double, token="ops").put("rules", RULES_V1)
        before = reason_count(SourceError.FORBIDDEN)
        active = plain(acl_double, token="stolen").source().reload()
        assert active.is_fallback and active.error_reason == "forbidden"
        assert "403" in active.errors[0] and "ACL not found" in active.errors[0]
        assert reason_count(SourceError.FORBIDDEN) == before + 1
        with pytest.raises(ConsulError) as refused:  # a write without permission: 403, said so
            plain(acl_double, token="stolen").source().set_lock("p", "r", "b")
        assert refused.value.reason is SourceError.FORBIDDEN
    finally:
        acl_double.stop()


def test_acl_filtered_prefix_is_not_key_missing() -> None:
    with ConsulKVDouble(acl={"ops": {"": "write"}, "other-team": {"other/": "read"}, "empty": {"ff/": "read"}}) as kv:
        plain(kv, token="ops").put("rules", RULES_V1)
        filtered = kv_get(kv, "ff/", token="other-team")
        assert filtered.status_code == 404 and filtered.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
        active = plain(kv, token="other-team").source().reload()
        assert active.is_fallback and active.error_reason == "acl_filtered"
        assert "may not read" in active.errors[0] and "key missing" not in active.errors[0]
        anonymous = kv_get(kv, "ff/")  # Consul hides the header from the anonymous token
        assert anonymous.status_code == 404 and "X-Consul-Results-Filtered-By-ACLs" not in anonymous.headers
        forbidden_one = kv_get(kv, "ff/rules", token="other-team", recurse=False)
        assert forbidden_one.status_code == 403 and "Permission denied" in forbidden_one.text
        nothing = plain(kv, prefix="ff-empty/", token="empty").source().reload()
        assert nothing.error_reason == "missing"  # a readable, empty prefix: the rules key is missing


def kv_get(double: ConsulKVDouble, key: str, token: str | None = None, recurse: bool = True) -> requests.Response:
    headers = {"X-Consul-Token": token} if token else {}
    params = {"recurse": "1"} if recurse else {}
    return requests.get(f"{double.url}/v1/kv/{key}", params=params, headers=headers, timeout=5)


def test_partly_filtered_answer_is_not_applied() -> None:
    """A token that lost read on budgets/ must not make the caps vanish: the whole answer is refused."""
    with ConsulKVDouble(acl={"ops": {"": "write"}, "scheduler": {"ff/": "read"}}) as kv:
        ops = plain(kv, token="ops")
        ops.put("rules", RULES_V1)
        ops.put("budgets/marketing", BUDGET)
        source = plain(kv, token="scheduler").source(wait="5s")
        source.start()
        try:
            good = source.current()
            assert good.budgets["marketing"].monthly_cap_usd == 100
            assert kv.acl is not None
            kv.acl.tokens["scheduler"] = {"ff/": "read", "ff/budgets/": "deny"}
            ops.put("rules", RULES_V2)  # wakes the watch; the answer now lacks the budget
            wait_for(lambda: source.current().error_reason == "acl_filtered")
            now = source.current()
            assert now.version == good.version and now.budgets["marketing"].monthly_cap_usd == 100
            assert rule_ids(now) == ["default"]
        finally:
            source.stop()


def test_index_going_backwards_resets_the_watch(double: ConsulKVDouble) -> None:
    target = plain(double)
    for n in range(20):  # push the index up, so a restore (which renumbers from 2) lowers it
        target.put("noise", str(n))
    target.put("rules", RULES_V1)
    source = target.source(wait="5s")
    source.start()
    try:
        assert rule_ids(source.current()) == ["default"]
        time.sleep(0.2)
        before = reason_count(SourceError.INDEX_RESET)
        double.restore_snapshot()
        wait_for(lambda: reason_count(SourceError.INDEX_RESET) == before + 1)
        time.sleep(0.1)  # the watch is parked again, on the new (lower) index
        target.put("rules", RULES_V2)
        assert wait_for(lambda: rule_ids(source.current()) == ["burst", "default"]) < 1.0
        assert not source.current().errors
    finally:
        source.stop()


def test_server_errors_and_rate_limits_back_off_then_recover(double: ConsulKVDouble) -> None:
    target = plain(double)
    target.put("rules", RULES_V1)
    source = target.source(wait="5s")
    source.start()
    try:
        good = source.current()
        time.sleep(0.2)
        server, limited = reason_count(SourceError.SERVER_ERROR), reason_count(SourceError.RATE_LIMITED)
        double.inject(500, "rpc error making call: No cluster leader", times=2)
        double.inject(429, "rate limit exceeded", headers={"Retry-After": "1"})
        target.put("budgets/marketing", BUDGET)  # wakes the watch: it applies, then meets the faults
        started = time.monotonic()
        wait_for(lambda: reason_count(SourceError.SERVER_ERROR) == server + 2, 2.0)
        assert source.current().error_reason == "server_error" and "No cluster leader" in source.current().errors[0]
        assert source.current().budgets["marketing"].monthly_cap_usd == 100  # last good stays meanwhile
        wait_for(lambda: reason_count(SourceError.RATE_LIMITED) == limited + 1, 3.0)
        wait_for(lambda: not source.current().errors, 4.0)
        took = time.monotonic() - started
        # backoff: 0.2-0.4 s and 0.4-0.6 s after the 500s, at least Retry-After (1 s) after the 429
        assert took >= 1.5, f"recovered after {took:.2f}s: no backoff"
        assert source.current().version != good.version and "marketing" in source.current().budgets
    finally:
        source.stop()


def test_slow_answer_times_out_and_keeps_last_known_good(double: ConsulKVDouble) -> None:
    target = plain(double)
    target.put("rules", RULES_V1)
    source = target.source(request_timeout_s=0.3)
    good = source.reload()
    double.inject(200, "[]", delay_s=1.5)
    started = time.monotonic()
    slow = source.reload()
    assert time.monotonic() - started < 1.2
    assert slow.error_reason == "timeout" and slow.version == good.version


def test_datacenter_is_sent(double: ConsulKVDouble) -> None:
    plain(double).put("rules", RULES_V1)
    same = ConsulRuleSource(resolve_endpoint(double.address, dc="dc1", environ={}), "ff/").reload()
    assert not same.errors and rule_ids(same) == ["default"]
    other = ConsulRuleSource(resolve_endpoint(double.address, dc="eu-west", environ={}), "ff/").reload()
    assert other.error_reason == "server_error" and "No path to datacenter" in other.errors[0]
    assert "dc=eu-west" in other.errors[0]


# -- TLS (double with verify_incoming) -----------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("consul-pki")
    ca = certs.create_ca("consul test CA")
    certs.save_ca(ca, directory)
    certs.issue_to_files(ca, directory, "consul-server", hosts=["127.0.0.1", "localhost"], server=True)
    certs.issue_to_files(ca, directory, "scheduler", roles=["scheduler"])
    return directory


@pytest.fixture
def tls_double(pki: Path) -> Iterator[ConsulKVDouble]:
    tls = DoubleTLS(cert=pki / "consul-server.pem", key=pki / "consul-server-key.pem", ca=pki / certs.CA_CERT_FILE)
    with ConsulKVDouble(tls=tls) as running:
        yield running


def test_tls_with_client_certificate_reads_rules(tls_double: ConsulKVDouble, pki: Path) -> None:
    endpoint = resolve_endpoint(
        f"https://{tls_double.address}",
        ca=pki / "ca.pem",
        client_cert=pki / "scheduler.pem",
        client_key=pki / "scheduler-key.pem",
        environ={},
    )
    Target(endpoint, "ff/", tls_double, session_for(endpoint)).put("rules", RULES_V1)
    active = ConsulRuleSource(endpoint, "ff/").reload()
    assert not active.errors and rule_ids(active) == ["default"]


def test_tls_from_the_consul_cli_environment(
    tls_double: ConsulKVDouble, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", tls_double.address)  # no scheme: CONSUL_HTTP_SSL decides
    monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
    monkeypatch.setenv("CONSUL_CACERT", str(pki / "ca.pem"))
    monkeypatch.setenv("CONSUL_CLIENT_CERT", str(pki / "scheduler.pem"))
    monkeypatch.setenv("CONSUL_CLIENT_KEY", str(pki / "scheduler-key.pem"))
    endpoint = resolve_endpoint()
    Target(endpoint, "ff/", tls_double, session_for(endpoint)).put("rules", RULES_V2)
    active = ConsulRuleSource(None, "ff/").reload()
    assert not active.errors and rule_ids(active) == ["burst", "default"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no client certificate", SourceError.TLS),
        ("unknown CA", SourceError.TLS),
        ("plain http to https", SourceError.BAD_REQUEST),  # Go: 400 Client sent an HTTP request to an HTTPS server
    ],
)
def test_tls_failures_are_reasons(tls_double: ConsulKVDouble, pki: Path, case: str, expected: SourceError) -> None:
    options: dict[str, object] = {
        "no client certificate": {"ca": pki / "ca.pem"},
        "unknown CA": {"client_cert": pki / "scheduler.pem", "client_key": pki / "scheduler-key.pem"},
        "plain http to https": {},
    }[case]  # type: ignore[assignment]
    scheme = "http" if case == "plain http to https" else "https"
    endpoint = resolve_endpoint(f"{scheme}://{tls_double.address}", environ={}, **options)  # type: ignore[arg-type]
    active = ConsulRuleSource(endpoint, "ff/", request_timeout_s=2).reload()
    assert active.is_fallback and active.error_reason == expected.value, active.errors
    if case == "plain http to https":
        assert "Client sent an HTTP request to an HTTPS server" in active.errors[0]
