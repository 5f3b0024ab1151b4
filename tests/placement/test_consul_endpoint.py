"""Where the scheduler finds Consul: facefleet settings first, then the consul CLI's CONSUL_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from facefleet.config import PolicyConfig, Settings
from facefleet.scheduler.assembly import rules_source_from
from facefleet.scheduler.rules_source import ConsulEndpoint, ConsulRuleSource, ConsulSettingsError, resolve_endpoint
from tests.consul_double import ConsulKVDouble


@pytest.mark.parametrize(
    ("addr", "env", "expected"),
    [
        (None, {}, ("http", "127.0.0.1", 8500)),
        ("consul:8500", {}, ("http", "consul", 8500)),  # no scheme: plain HTTP, as the CLI
        ("https://consul:8501", {}, ("https", "consul", 8501)),
        ("consul:8501", {"CONSUL_HTTP_SSL": "true"}, ("https", "consul", 8501)),
        ("http://consul:8501", {"CONSUL_HTTP_SSL": "1"}, ("https", "consul", 8501)),  # never back to http
        ("consul", {}, ("http", "consul", 80)),  # no port: the scheme's, as Go dials it
        ("https://consul", {}, ("https", "consul", 443)),
        ("[::1]:8500", {}, ("http", "::1", 8500)),
        (None, {"CONSUL_HTTP_ADDR": "https://kv.corp:8501"}, ("https", "kv.corp", 8501)),
        ("consul:8500", {"CONSUL_HTTP_ADDR": "elsewhere:1"}, ("http", "consul", 8500)),  # setting wins
        (None, {"CONSUL_HTTP_SSL": "yes-please"}, ("http", "127.0.0.1", 8500)),  # CLI: warn, ignore
    ],
)
def test_address_forms(addr: str | None, env: dict[str, str], expected: tuple[str, str, int]) -> None:
    endpoint = resolve_endpoint(addr, environ=env)
    assert (endpoint.scheme, endpoint.host, endpoint.port) == expected


def test_environment_fills_what_settings_leave_unset(tmp_path: Path) -> None:
    env = {
        "CONSUL_HTTP_TOKEN": "env-token",
        "CONSUL_CACERT": "/etc/consul/ca.pem",
        "CONSUL_CLIENT_CERT": "/etc/consul/client.pem",
        "CONSUL_CLIENT_KEY": "/etc/consul/client-key.pem",
        "CONSUL_HTTP_SSL_VERIFY": "false",
    }
    from_env = resolve_endpoint(environ=env)
    assert from_env.token == "env-token" and from_env.ca == Path("/etc/consul/ca.pem")
    assert from_env.client_cert == Path("/etc/consul/client.pem") and from_env.verify is False
    explicit = resolve_endpoint(token="mine", ca=tmp_path / "ca.pem", verify=True, dc="eu", environ=env)
    assert explicit.token == "mine" and explicit.ca == tmp_path / "ca.pem" and explicit.verify is True
    assert explicit.dc == "eu"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert resolve_endpoint(environ={**env, "CONSUL_HTTP_TOKEN_FILE": str(token_file)}).token == "from-file"
    assert resolve_endpoint(environ={"CONSUL_CAPATH": "/etc/consul/cas"}).ca == Path("/etc/consul/cas")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"addr": "unix:///var/run/consul.sock"}, "unsupported scheme 'unix'"),
        ({"addr": "ftp://consul:21"}, "unsupported scheme 'ftp'"),
        ({"addr": "https://proxy.corp/consul"}, "reverse-proxy prefix"),
        ({"addr": "consul:notaport"}, "expected host:port"),
        ({"client_cert": "/c.pem"}, "go together"),
        ({"environ": {"CONSUL_CLIENT_KEY": "/k.pem"}}, "go together"),
        ({"environ": {"CONSUL_HTTP_TOKEN_FILE": "/nonexistent/token"}}, "CONSUL_HTTP_TOKEN_FILE"),
    ],
)
def test_settings_that_cannot_work_say_what_to_change(kwargs: dict[str, object], message: str) -> None:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConsulSettingsError, match=message):
        resolve_endpoint(**kwargs)  # type: ignore[arg-type]


def test_explicit_token_wins_over_consul_http_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-consul itself prefers CONSUL_HTTP_TOKEN to the token it is given; the source must not."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "someone-elses")
    with ConsulKVDouble(acl={"scheduler": {"ff/": "write"}}) as kv:
        source = ConsulRuleSource(resolve_endpoint(kv.address, token="scheduler"), "ff/")
        source.set_budget("marketing", 10, 80)  # 403 "ACL not found" if the env token were sent
        active = source.reload()
        assert active.error_reason == "missing"  # read with the right token: only the rules are missing


def test_policy_settings_reach_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_SSL_VERIFY", "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY"):
        monkeypatch.delenv(name, raising=False)
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem"
    settings = Settings(
        policy=PolicyConfig(
            source="consul",
            consul_addr="consul.service:8501",
            consul_prefix="studio/",
            consul_token="t",
            consul_dc="eu-west",
            consul_ssl=True,
            consul_ca=ca,
            consul_client_cert=cert,
            consul_client_key=key,
        )
    )
    source = rules_source_from(settings)
    assert isinstance(source, ConsulRuleSource) and source.prefix == "studio/"
    assert source.endpoint == ConsulEndpoint(
        host="consul.service",
        port=8501,
        scheme="https",
        token="t",
        ca=ca,
        client_cert=cert,
        client_key=key,
        dc="eu-west",
    )
    with pytest.raises(ConsulSettingsError):
        rules_source_from(Settings(policy=PolicyConfig(source="consul", consul_client_key=key)))
