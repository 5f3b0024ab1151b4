"""The container health probe against real gRPC servers (plaintext and mTLS) on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from facefleet import healthcheck
from facefleet.grpc_server import ServerHandle, build_server

runner = CliRunner()
probe_app = typer.Typer()
probe_app.command()(healthcheck.probe)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _make_pki(tls_dir: Path, component: str) -> None:
    """A CA plus one leaf for `component`, valid for 127.0.0.1 as server and client (like our certs)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test-ca"))
        .issuer_name(_name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(component))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    tls_dir.mkdir(parents=True, exist_ok=True)
    (tls_dir / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tls_dir / f"{component}.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    _write_key(leaf_key, tls_dir / f"{component}-key.pem")


@pytest.fixture
def plaintext_server() -> Iterator[ServerHandle]:
    handle = build_server("127.0.0.1:0", [], credentials=None)
    yield handle
    handle.stop(0)


@pytest.fixture
def mtls_server(tmp_path: Path) -> Iterator[tuple[ServerHandle, Path]]:
    tls_dir = tmp_path / "certs"
    _make_pki(tls_dir, "scheduler")
    credentials = grpc.ssl_server_credentials(
        [((tls_dir / "scheduler-key.pem").read_bytes(), (tls_dir / "scheduler.pem").read_bytes())],
        root_certificates=(tls_dir / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    handle = build_server("127.0.0.1:0", [], credentials=credentials)
    yield handle, tls_dir
    handle.stop(0)


def test_serving_server_is_healthy(plaintext_server: ServerHandle) -> None:
    result = healthcheck.check_health(f"127.0.0.1:{plaintext_server.port}", None)
    assert result.serving, result.detail
    assert "SERVING" in result.detail


def test_not_serving_server_is_unhealthy(plaintext_server: ServerHandle) -> None:
    plaintext_server.set_serving(False)
    result = healthcheck.check_health(f"127.0.0.1:{plaintext_server.port}", None)
    assert not result.serving
    assert "NOT_SERVING" in result.detail


def test_unknown_service_is_unhealthy_not_a_crash(plaintext_server: ServerHandle) -> None:
    result = healthcheck.check_health(f"127.0.0.1:{plaintext_server.port}", None, service="no.such.Service")
    assert not result.serving
    assert "NOT_FOUND" in result.detail


def test_unreachable_server_is_unhealthy_with_reason(plaintext_server: ServerHandle) -> None:
    port = plaintext_server.port
    plaintext_server.stop(0)
    result = healthcheck.check_health(f"127.0.0.1:{port}", None, timeout_s=0.5)
    assert not result.serving
    assert "UNAVAILABLE" in result.detail or "DEADLINE_EXCEEDED" in result.detail


def test_mtls_probe_uses_settings_tls_dir(
    mtls_server: tuple[ServerHandle, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    handle, tls_dir = mtls_server
    monkeypatch.chdir(tmp_path)  # no stray facefleet.toml
    monkeypatch.setenv("FACEFLEET_TLS__DIR", str(tls_dir))
    monkeypatch.setenv("FACEFLEET_SCHEDULER__LISTEN", f"0.0.0.0:{handle.port}")
    result = runner.invoke(probe_app, ["scheduler"])
    assert result.exit_code == 0, result.output
    assert "healthy" in result.output


def test_plaintext_probe_against_mtls_server_fails(mtls_server: tuple[ServerHandle, Path]) -> None:
    handle, _ = mtls_server
    result = runner.invoke(probe_app, ["scheduler", "--address", f"127.0.0.1:{handle.port}", "--insecure"])
    assert result.exit_code == 1
    assert "unhealthy" in result.output


def test_missing_tls_material_is_actionable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FACEFLEET_TLS__DIR", str(tmp_path / "nowhere"))
    result = runner.invoke(probe_app, ["agent", "--address", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert "agent.pem" in result.output and "--insecure" in result.output


@pytest.mark.parametrize(
    ("listen", "target"),
    [("0.0.0.0:50051", "127.0.0.1:50051"), ("[::]:50061", "127.0.0.1:50061"), ("10.0.0.5:50061", "10.0.0.5:50061")],
)
def test_dial_target(listen: str, target: str) -> None:
    assert healthcheck.dial_target(listen) == target


def test_dial_target_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        healthcheck.dial_target("scheduler")
