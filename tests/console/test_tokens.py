"""Console tokens and page gates, without a browser: signatures, expiry, the CLI, and RoleGate's table."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from facefleet.cli import app as cli_app
from facefleet.console import pages, tokens
from facefleet.security.roles import HUMAN_ROLES, METHOD_ROLES

SECRET = b"0" * 64


def test_a_token_names_its_person_until_it_expires() -> None:
    token = tokens.mint(SECRET, "fiona", ["finance", "auditor"], ttl_s=60, now=1000.0)
    person = tokens.read(SECRET, token, now=1059.0)
    assert (person.subject, person.roles, person.expires) == ("fiona", frozenset({"finance", "auditor"}), 1060.0)
    assert person.certificate_name == "console:fiona"
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.read(SECRET, token, now=1060.0)
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.read(b"1" * 64, token, now=1000.0)


@given(position=st.integers(min_value=0), replacement=st.sampled_from("AZaz09-_."))
def test_any_changed_character_is_refused(position: int, replacement: str) -> None:
    token = tokens.mint(SECRET, "carol", ["compliance"], ttl_s=600)
    index = position % len(token)
    changed = token[:index] + replacement + token[index + 1 :]
    if changed != token:
        with pytest.raises(tokens.TokenError):
            tokens.read(SECRET, changed)


@pytest.mark.parametrize(
    ("subject", "roles"),
    [("x y", ["finance"]), ("", ["finance"]), ("bob", []), ("bob", ["scheduler"]), ("bob", ["root"])],
)
def test_people_and_roles_a_token_may_not_carry(subject: str, roles: list[str]) -> None:
    with pytest.raises(tokens.TokenError):
        tokens.mint(SECRET, subject, roles, ttl_s=60)


def test_every_page_and_action_is_gated_by_rolegates_table() -> None:
    """The console asks RoleGate's own is_allowed for the RPC each page is built on."""
    for method in [page.method for page in pages.PAGES] + list(pages.ACTION_METHOD.values()):
        assert method in METHOD_ROLES, method
        for role in HUMAN_ROLES:
            person = tokens.Person("p", frozenset({role}), time.time() + 60)
            assert pages.may(person, method) == (role in METHOD_ROLES[method]), (method, role)
    submitter = tokens.Person("sam", frozenset({"submitter"}), time.time() + 60)
    assert [p.name for p in pages.PAGES if pages.may(submitter, p.method)] == ["tasks"]


def test_console_token_prints_a_sign_in_address_and_refuses_bad_roles(tmp_path: Path) -> None:
    config = tmp_path / "facefleet.toml"
    config.write_text(f'[tls]\ndir = "{tmp_path / "certs"}"\n\n[console]\nlisten = "127.0.0.1:9999"\n')
    runner = CliRunner()
    result = runner.invoke(
        cli_app, ["console", "token", "--role", "finance", "--subject", "fiona", "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    url = result.stdout.strip()
    assert url.startswith("http://127.0.0.1:9999/?token=")
    secret = (tmp_path / "certs" / "console-secret").read_bytes().strip()
    assert (tmp_path / "certs" / "console-secret").stat().st_mode & 0o777 == 0o600
    assert tokens.read(secret, url.split("token=", 1)[1]).roles == {"finance"}
    bad = runner.invoke(cli_app, ["console", "token", "--role", "admin", "--config", str(config)])
    assert bad.exit_code == 1 and "error:" in bad.output and "hint:" in bad.output and "Traceback" not in bad.output
