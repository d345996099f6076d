"""Stopping the daemon (SIGTERM) mid-upload: it does not wait out the grace
period for the upload, and the bytes received are kept for the resume."""

from __future__ import annotations

import socket
import time

import jwt
from support.upload_client import UploadFixture


def test_sigterm_mid_patch_keeps_the_bytes_and_stops_promptly(storage_proxy):
    uploads = UploadFixture(storage_proxy)
    size = 8 << 20
    token = uploads.token("stop/file.bin", size)
    s = socket.create_connection(("127.0.0.1", storage_proxy.client_port))
    s.sendall(
        f"PATCH /upload?token={token} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {size}\r\n\r\n".encode() + b"q" * (3 << 20)
    )
    staging = uploads.vfolder / ".upload" / jwt.decode(token, options={"verify_signature": False})["session"]
    deadline = time.monotonic() + 20
    while staging.stat().st_size < 3 << 20 and time.monotonic() < deadline:
        time.sleep(0.02)  # until the daemon has written what was sent
    started = time.monotonic()
    storage_proxy.stop()
    assert time.monotonic() - started < 8  # the grace period is 10 s
    s.close()
    storage_proxy.start()
    assert uploads.offset(token) == 3 << 20
    assert uploads.patch(token, 3 << 20, b"q" * (5 << 20)).status_code == 204
    assert (uploads.vfolder / "stop" / "file.bin").read_bytes() == b"q" * size
