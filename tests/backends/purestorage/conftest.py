"""Fixtures: the fake FlashBlade on 127.0.0.1:0 (plain and TLS) and fake tools."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
import pytest_twisted
from fake_flashblade import API_TOKEN, FakeFlashBlade
from fake_rapidfile import install
from twisted.internet import reactor, ssl
from twisted.web.server import Site


@pytest.fixture
def fake_fb():
    fb = FakeFlashBlade(api_token=API_TOKEN)
    port = reactor.listenTCP(0, Site(fb.app.resource()), interface="127.0.0.1")
    fb.endpoint = f"http://127.0.0.1:{port.getHost().port}"
    yield fb
    pytest_twisted.blockon(port.stopListening())


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-flashblade")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path = tmp_path / "fb-cert.pem"
    key_path = tmp_path / "fb-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def fake_fb_tls(tmp_path):
    """The fake over HTTPS with a self-signed certificate for 127.0.0.1."""
    cert_path, key_path = _self_signed(tmp_path)
    fb = FakeFlashBlade(api_token=API_TOKEN)
    cert = ssl.PrivateCertificate.loadPEM(cert_path.read_bytes() + key_path.read_bytes())
    port = reactor.listenSSL(0, Site(fb.app.resource()), cert.options(), interface="127.0.0.1")
    fb.endpoint = f"https://127.0.0.1:{port.getHost().port}"
    fb.ca_file = cert_path
    yield fb
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """Fake RapidFile tools first on PATH; returns (bin dir, call log path)."""
    bin_dir = install(tmp_path / "rapidfile-bin")
    log = tmp_path / "rapidfile.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_RAPIDFILE_LOG", str(log))
    return bin_dir, log
