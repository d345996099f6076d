"""tus over TLS: the body takes the reactor path (no socket hand-off under TLS)
and arrives intact."""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "web"))

from upload_client import UploadFixture  # noqa: E402


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509", reason="cryptography makes the test certificate")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_patch_over_tls(storage_proxy_factory, tmp_path):
    cert, key = self_signed(tmp_path)
    daemon = storage_proxy_factory(extra_config={
        "api": {"client": {"ssl-enabled": True, "ssl-cert": str(cert), "ssl-privkey": str(key)}}})
    uploads = UploadFixture(daemon)
    data = os.urandom(3 << 20)
    token = uploads.token("tls/file.bin", len(data))
    url = f"https://127.0.0.1:{daemon.client_port}/upload?token={token}"
    headers = {"Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = requests.patch(url, data=data[:1 << 20], headers=dict(headers, **{"Upload-Offset": "0"}),
                           verify=False, timeout=60)
        assert r.status_code == 204, r.text
        r = requests.patch(url, data=data[1 << 20:], headers=dict(headers, **{"Upload-Offset": str(1 << 20)}),
                           verify=False, timeout=60)
        assert r.status_code == 204, r.text
    assert (uploads.vfolder / "tls" / "file.bin").read_bytes() == data
