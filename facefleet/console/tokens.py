"""Session tokens: `facefleet console token --role ROLE` mints one, the console checks it.

A token is `{sub, roles, exp}` signed with the console secret (itsdangerous, HMAC-SHA256). Forged,
altered, expired or role-less tokens are refused; the secret is a 0600 file beside the certificates.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeSerializer

from facefleet.config import Settings
from facefleet.security.roles import HUMAN_ROLES

SALT = "facefleet-console-token"
SECRET_FILE = "console-secret"
SUBJECT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")


class TokenError(ValueError):
    """The token cannot be used; the message says why (forged, expired, malformed)."""


@dataclass(frozen=True)
class Person:
    """Who is signed in to the console, with which roles, until when (epoch seconds)."""

    subject: str
    roles: frozenset[str]
    expires: float

    @property
    def certificate_name(self) -> str:
        """The CN of the client certificate the console uses for this person: the audit's actor."""
        return f"console:{self.subject}"


def secret_path(settings: Settings) -> Path:
    return settings.console.secret_file or settings.tls.dir / SECRET_FILE


def load_secret(settings: Settings, create: bool = True) -> bytes:
    """The signing secret; created (32 random bytes, mode 0600) when missing and `create`."""
    path = secret_path(settings)
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"console secret {path} does not exist; `facefleet console token` creates it")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return path.read_bytes().strip()
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_hex(32).encode())
    return path.read_bytes().strip()


def check_person(subject: str, roles: list[str] | tuple[str, ...]) -> None:
    if not SUBJECT_PATTERN.match(subject):
        raise TokenError(f"subject {subject!r}: use 1-64 letters, digits, '_', '.', '@', '-'")
    unknown = sorted(set(roles) - set(HUMAN_ROLES))
    if not roles or unknown:
        raise TokenError(f"roles {unknown or '(none)'} are not console roles; use {', '.join(HUMAN_ROLES)}")


def mint(
    secret: bytes, subject: str, roles: list[str] | tuple[str, ...], ttl_s: float, now: float | None = None
) -> str:
    check_person(subject, roles)
    expires = (time.time() if now is None else now) + ttl_s
    return str(
        URLSafeSerializer(secret, salt=SALT).dumps({"sub": subject, "roles": sorted(set(roles)), "exp": expires})
    )


def read(secret: bytes, token: str, now: float | None = None) -> Person:
    """The person a token names; TokenError when it is forged, malformed or expired."""
    try:
        data = URLSafeSerializer(secret, salt=SALT).loads(token)
    except BadSignature:
        raise TokenError("the token's signature does not match this console (forged or from another one)") from None
    if not isinstance(data, dict) or not isinstance(data.get("exp"), int | float):
        raise TokenError("the token is malformed")
    subject, roles = data.get("sub"), data.get("roles")
    if not isinstance(subject, str) or not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise TokenError("the token is malformed")
    check_person(subject, roles)
    if data["exp"] <= (time.time() if now is None else now):
        raise TokenError("the token has expired; mint a new one with `facefleet console token`")
    return Person(subject=subject, roles=frozenset(roles), expires=float(data["exp"]))


def default_subject() -> str:
    """The local user name, reduced to what a console subject may hold."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = ""
    return re.sub(r"[^A-Za-z0-9_.@\-]", "-", name)[:64].lstrip("._@-") or "operator"


def sign_in_url(
    settings: Settings, roles: list[str] | tuple[str, ...], subject: str, ttl_s: float | None = None
) -> tuple[str, float]:
    """`http://<console listen>/?token=...` (the Jupyter convention) and when the token expires."""
    ttl = ttl_s or settings.console.token_ttl_s
    now = time.time()
    token = mint(load_secret(settings), subject, roles, ttl, now=now)
    return f"http://{settings.console.listen}/?token={token}", now + ttl
