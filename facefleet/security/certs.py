"""A small local CA for the demo: EC P-256 keys, server certs with SANs, client certs with role URIs.

Production deployments use an existing CA instead: point `[tls] ca/cert/key` at its files and put
the role URIs (`urn:facefleet:role:<role>`) in the client certificates' SAN (docs/security.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from facefleet.security.identity import role_uri
from facefleet.security.roles import COMPONENT_ROLES, HUMAN_ROLES

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
EMAIL_PROTECTION_OID = ObjectIdentifier("1.3.6.1.5.5.7.3.4")  # id-kp-emailProtection: on C2PA's default EKU list
DOCUMENT_SIGNING_OID = ObjectIdentifier("1.3.6.1.5.5.7.3.36")  # id-kp-documentSigning
C2PA_SIGNER_NAME = "c2pa-signer"
# A certificate name is its CN and its file name (<dir>/<name>.pem): no path separators, no "..",
# no control characters, nothing a shell or a log line would misread.
CERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


class CertificateError(RuntimeError):
    """Certificate material missing, present when it should not be, or unusable."""


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class IssuedFiles:
    name: str
    cert: Path
    key: Path
    roles: tuple[str, ...]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "facefleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(common_name: str = "facefleet demo CA", days: int = 3650) -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def check_name(name: str) -> str:
    """A certificate name that is safe as CN and file name; CertificateError otherwise."""
    if not CERT_NAME.fullmatch(name):
        raise CertificateError(
            f"certificate name {name!r} is not allowed: use 1-64 letters, digits, '.', '_', '-', starting with a "
            "letter or digit (it is the CN and the file name <dir>/<name>.pem)"
        )
    return name


def _subject_alt_names(hosts: Iterable[str], roles: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not DNS_NAME.fullmatch(host):
                raise CertificateError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    names.extend(x509.UniformResourceIdentifier(role_uri(role)) for role in roles)
    return names


def issue(
    ca: CertificateAuthority,
    common_name: str,
    roles: Sequence[str] = (),
    hosts: Sequence[str] = (),
    days: int = 825,
    server: bool = False,
    usages: Sequence[ObjectIdentifier] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue a leaf certificate. `server=True` adds serverAuth (needs `hosts` for the SAN)."""
    if not 0 < len(common_name) <= 64 or not common_name.isprintable():
        raise CertificateError(f"certificate CN {common_name!r} must be 1-64 printable characters")
    unknown = sorted(set(roles) - set(HUMAN_ROLES) - set(COMPONENT_ROLES))
    if unknown:
        raise CertificateError(f"unknown role(s) {unknown}; known roles: {sorted({*HUMAN_ROLES, *COMPONENT_ROLES})}")
    if server and not hosts:
        raise CertificateError(f"server certificate {common_name!r} needs at least one --host for its SAN")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    eku = list(usages) or ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    san = _subject_alt_names(hosts, roles)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def save_ca(ca: CertificateAuthority, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CA_CERT_FILE).write_bytes(_cert_pem(ca.cert))
    _write_private(directory / CA_KEY_FILE, _key_pem(ca.key))


def load_ca(directory: Path, cert_path: Path | None = None, key_path: Path | None = None) -> CertificateAuthority:
    cert_file = cert_path or directory / CA_CERT_FILE
    key_file = key_path or directory / CA_KEY_FILE
    for path in (cert_file, key_file):
        if not path.is_file():
            raise CertificateError(
                f"CA file {path} not found; run `facefleet certs init --dir {directory}` first "
                "(or pass --ca/--ca-key for an existing CA)"
            )
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"CA files {cert_file} / {key_file} are not an unencrypted PEM pair: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_file} is not an EC private key; the demo CA uses EC P-256")
    return CertificateAuthority(cert=cert, key=key)


def issue_to_files(
    ca: CertificateAuthority,
    directory: Path,
    name: str,
    roles: Sequence[str] = (),
    hosts: Sequence[str] = (),
    server: bool = False,
    days: int = 825,
    usages: Sequence[ObjectIdentifier] = (),
    chain: bool = False,
) -> IssuedFiles:
    """Write `<name>.pem` and `<name>-key.pem` (0600). `chain=True` appends the CA cert to the cert file."""
    check_name(name)
    cert, key = issue(ca, name, roles=roles, hosts=hosts, days=days, server=server, usages=usages)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(_cert_pem(cert) + (_cert_pem(ca.cert) if chain else b""))
    _write_private(key_path, _key_pem(key))
    return IssuedFiles(name=name, cert=cert_path, key=key_path, roles=tuple(roles))


def init_demo_pki(directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS, force: bool = False) -> list[IssuedFiles]:
    """Create the demo CA and every certificate the one-machine demo needs.

    scheduler (server + client, role scheduler: it calls agents), agent (server + client, role agent:
    it heartbeats), one client cert per human role, `admin` with all human roles, and a C2PA
    document-signing cert (`c2pa-signer.pem`, chain included) for provenance manifests.
    """
    if (directory / CA_CERT_FILE).exists() and not force:
        raise CertificateError(
            f"{directory / CA_CERT_FILE} already exists; pass --force to replace the whole demo PKI "
            "(every certificate it issued stops working)"
        )
    ca = create_ca()
    save_ca(ca, directory)
    issued = [
        issue_to_files(ca, directory, "scheduler", roles=["scheduler"], hosts=hosts, server=True),
        issue_to_files(ca, directory, "agent", roles=["agent"], hosts=hosts, server=True),
    ]
    issued += [issue_to_files(ca, directory, role, roles=[role]) for role in HUMAN_ROLES]
    issued.append(issue_to_files(ca, directory, "admin", roles=list(HUMAN_ROLES)))
    issued.append(
        issue_to_files(ca, directory, C2PA_SIGNER_NAME, usages=[EMAIL_PROTECTION_OID, DOCUMENT_SIGNING_OID], chain=True)
    )
    return issued
