"""Where Consul is and how to talk to it: settings first, then the consul CLI's environment variables.

The environment variables are the ones `consul` itself reads (hashicorp/consul `api/api.go`), applied
the same way, and an explicit facefleet setting always wins over them:

  CONSUL_HTTP_ADDR         `host:port`, `http://host:port` or `https://host:port` (default 127.0.0.1:8500)
  CONSUL_HTTP_TOKEN_FILE   file holding the ACL token (wins over CONSUL_HTTP_TOKEN, as in the CLI)
  CONSUL_HTTP_TOKEN        ACL token, sent as `X-Consul-Token`
  CONSUL_HTTP_SSL          `true`: use HTTPS; an `http://` address never turns TLS back off
  CONSUL_HTTP_SSL_VERIFY   `false`: do not verify the agent's certificate
  CONSUL_CACERT            CA bundle that signed the agent's certificate
  CONSUL_CAPATH            directory of CA certificates (c_rehash layout)
  CONSUL_CLIENT_CERT       client certificate, for agents with `verify_incoming`
  CONSUL_CLIENT_KEY        its key (both or neither)

An address without a scheme is plain HTTP unless TLS is asked for; without a port it is the scheme's
default port, as Go's HTTP client dials it. Unsupported forms (`unix://`, a reverse-proxy path) are
refused with a `ConsulSettingsError` that says what to change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import consul
import structlog

log = structlog.get_logger()

DEFAULT_ADDR = "127.0.0.1:8500"
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}  # Go's strconv.ParseBool
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


class ConsulSettingsError(ValueError):
    """The Consul settings cannot work as given (not a runtime failure: fix the config)."""


@dataclass(frozen=True)
class ConsulEndpoint:
    host: str
    port: int
    scheme: str = "http"
    token: str | None = None
    ca: Path | None = None  # CA bundle file or c_rehash directory
    client_cert: Path | None = None
    client_key: Path | None = None
    verify: bool = True
    dc: str | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def client(self, timeout_s: float) -> consul.Consul:
        """A py-consul client. `timeout_s` bounds connect and answer; blocking queries add their wait."""
        verify: bool | str = str(self.ca) if self.verify and self.ca else self.verify
        cert = (str(self.client_cert), str(self.client_key)) if self.client_cert and self.client_key else None
        client = consul.Consul(
            host=self.host,
            port=self.port,
            token=self.token,
            scheme=self.scheme,
            dc=self.dc,
            verify=verify,
            cert=cert,
            connections_timeout=timeout_s,
        )
        client.token = self.token  # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; ours wins
        return client


def _env_bool(environ: Mapping[str, str], name: str) -> bool | None:
    text = environ.get(name, "")
    if not text:
        return None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    log.warning("consul_env_ignored", variable=name, value=text, reason="not a boolean (true/false)")
    return None  # the consul CLI warns and goes on without it, too


def _path(explicit: Path | str | None, environ: Mapping[str, str], name: str) -> Path | None:
    if explicit:
        return Path(explicit)
    return Path(environ[name]) if environ.get(name) else None


def _token(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    if explicit:
        return explicit
    token_file = environ.get("CONSUL_HTTP_TOKEN_FILE")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise ConsulSettingsError(f"CONSUL_HTTP_TOKEN_FILE {token_file}: cannot read the token ({error})") from None
        if token:
            return token
    return environ.get("CONSUL_HTTP_TOKEN") or None


def resolve_endpoint(
    addr: str | None = None,
    *,
    token: str | None = None,
    ssl: bool | None = None,
    ca: Path | str | None = None,
    client_cert: Path | str | None = None,
    client_key: Path | str | None = None,
    verify: bool | None = None,
    dc: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConsulEndpoint:
    """Explicit settings, else the CONSUL_* environment, else the consul CLI's defaults."""
    env = os.environ if environ is None else environ
    text = (addr or env.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR).strip()
    where = "[policy] consul_addr" if addr else ("CONSUL_HTTP_ADDR" if env.get("CONSUL_HTTP_ADDR") else "default")
    use_ssl = ssl if ssl is not None else bool(_env_bool(env, "CONSUL_HTTP_SSL"))
    scheme = "https" if use_ssl else "http"
    if "://" in text:
        given, _, rest = text.partition("://")
        if given == "https":
            scheme = "https"
        elif given != "http":  # `unix://` too: py-consul speaks TCP only
            raise ConsulSettingsError(
                f"{where} {text!r}: unsupported scheme {given!r}; use host:port, http://host:port or https://host:port"
            )
    else:
        rest = text
    parts = urlsplit(f"//{rest}")
    if parts.path.strip("/") or parts.query:
        raise ConsulSettingsError(
            f"{where} {text!r}: a path after host:port (reverse-proxy prefix) is not supported; "
            "point it at the agent's own address"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host:
        raise ConsulSettingsError(f"{where} {text!r}: expected host:port, e.g. consul:8500")
    cert = _path(client_cert, env, "CONSUL_CLIENT_CERT")
    key = _path(client_key, env, "CONSUL_CLIENT_KEY")
    if bool(cert) != bool(key):
        raise ConsulSettingsError(
            "Consul client certificate and key go together: set both consul_client_cert and consul_client_key "
            "(or CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY), or neither"
        )
    env_verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY")
    return ConsulEndpoint(
        host=host,
        port=port or (443 if scheme == "https" else 80),
        scheme=scheme,
        token=_token(token, env),
        ca=_path(ca, env, "CONSUL_CACERT") or _path(None, env, "CONSUL_CAPATH"),
        client_cert=cert,
        client_key=key,
        verify=verify if verify is not None else env_verify is not False,
        dc=dc or None,
    )
