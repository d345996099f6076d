"""tus over TLS: the body takes the reactor path (no socket hand-off under TLS)
and arrives intact."""

from __future__ import annotations

import os
import warnings

import requests
from support.tls import self_signed
from support.upload_client import UploadFixture


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
