"""Sign-in and CSRF over plain HTTP against the served console and the real scheduler."""

from __future__ import annotations

import re
import time

import requests

from facefleet.console import tokens
from facefleet.security.audit import query
from facefleet.v1 import admin_pb2
from tests.console.conftest import ConsoleStack


def locked_projects(stack: ConsoleStack) -> set[str]:
    reply = stack.cluster.admin("auditor").ListLocks(admin_pb2.ListLocksRequest(), timeout=10)
    return {lock.project for lock in reply.locks}


def test_missing_forged_and_expired_tokens_are_refused(stack: ConsoleStack, http: requests.Session) -> None:
    for path in ("/", "/tasks", "/finance", "/compliance", "/fleet"):
        reply = http.get(stack.url + path, allow_redirects=False)
        assert reply.status_code == 401, path
        assert "Sign in" in reply.text
    good = tokens.mint(stack.secret, "mallory", ["finance"], ttl_s=600)
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    other_console = tokens.mint(b"another-console-secret", "mallory", ["finance"], ttl_s=600)
    expired = tokens.mint(stack.secret, "mallory", ["finance"], ttl_s=60, now=time.time() - 120)
    for token, why in ((forged, "signature"), (other_console, "signature"), (expired, "expired"), ("x", "signature")):
        reply = http.get(f"{stack.url}/finance", params={"token": token}, allow_redirects=False)
        assert reply.status_code == 401 and why in reply.text, (token, reply.text[:300])
        assert "facefleet_console" not in reply.cookies
    # The valid token signs in once and leaves the address bar (303 to the page without it).
    reply = http.get(f"{stack.url}/finance", params={"token": good, "x": "1"}, allow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/finance?x=1"
    assert http.get(f"{stack.url}/finance").status_code == 200
    assert "no-referrer" in http.get(f"{stack.url}/finance").headers["referrer-policy"]


def test_post_without_the_csrf_token_is_refused_and_changes_nothing(
    stack: ConsoleStack, http: requests.Session
) -> None:
    http.get(stack.sign_in_url("compliance", subject="carol", path="/compliance"))
    page = http.get(f"{stack.url}/compliance")
    assert page.status_code == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf is not None

    def lock_acts() -> list[dict[str, object]]:
        return [r for r in query(stack.settings.audit.path, kind="admin") if r["act"] == "lock_project"]

    before = len(lock_acts())
    for data, headers in (
        ({"project": "csrf-target", "reason": "no token"}, {}),
        ({"project": "csrf-target", "reason": "wrong token", "csrf_token": "guess"}, {}),
        ({"project": "csrf-target", "reason": "wrong header"}, {"X-CSRF-Token": "guess"}),
    ):
        reply = http.post(f"{stack.url}/compliance/lock", data=data, headers=headers, allow_redirects=False)
        assert reply.status_code == 403 and "CSRF" in reply.text
    assert "csrf-target" not in locked_projects(stack)
    assert len(lock_acts()) == before  # nothing reached the scheduler
    # Without a session at all, a POST is a 401 (a cross-site form has no cookie: SameSite=Strict).
    anonymous = requests.post(f"{stack.url}/compliance/lock", data={"project": "csrf-target", "reason": "x"})
    assert anonymous.status_code == 401
    # With the token (form field) the same POST goes through, as carol, audited.
    reply = http.post(
        f"{stack.url}/compliance/lock",
        data={"project": "csrf-target", "reason": "test", "csrf_token": csrf.group(1)},
        allow_redirects=False,
    )
    assert reply.status_code == 303
    assert "csrf-target" in locked_projects(stack)
    record = lock_acts()[-1]
    assert record["actor"] == "console:carol" and record["outcome"] == "ok"
    http.post(
        f"{stack.url}/compliance/unlock",
        data={"project": "csrf-target", "reason": "test done"},
        headers={"X-CSRF-Token": csrf.group(1)},
    )
    assert "csrf-target" not in locked_projects(stack)
