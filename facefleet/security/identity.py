"""Who is calling: certificate CN plus role URIs (`urn:facefleet:role:<role>`) from the peer's cert."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

ROLE_URI_PREFIX = "urn:facefleet:role:"


@dataclass(frozen=True)
class Identity:
    subject: str
    roles: frozenset[str] = field(default_factory=frozenset)
    authenticated: bool = True

    def has_any(self, roles: frozenset[str]) -> bool:
        return bool(self.roles & roles)


ANONYMOUS = Identity(subject="anonymous", roles=frozenset(), authenticated=False)


def role_uri(role: str) -> str:
    return f"{ROLE_URI_PREFIX}{role}"


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """CN and the facefleet role URIs of `cert` (other SAN entries are ignored)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else cert.subject.rfc4514_string()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    roles = frozenset(uri[len(ROLE_URI_PREFIX) :] for uri in uris if uri.startswith(ROLE_URI_PREFIX))
    return Identity(subject=subject, roles=roles)


@lru_cache(maxsize=1024)
def _identity_from_pem(pem: bytes) -> Identity:
    return identity_from_certificate(x509.load_pem_x509_certificate(pem))


def peer_identity(context: grpc.ServicerContext) -> Identity:
    """The verified client certificate's identity, or ANONYMOUS when the peer sent none.

    gRPC fills `x509_pem_cert` only after the TLS layer verified the chain against our CA,
    so what is parsed here is already authenticated.
    """
    pems = list(context.auth_context().get("x509_pem_cert") or [])
    if not pems:
        return ANONYMOUS
    try:
        return _identity_from_pem(bytes(pems[0]))
    except ValueError:
        return ANONYMOUS
