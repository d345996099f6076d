"""Two daemons over one shared volume directory serve the same uploads: the
state lives in the volume and the write lock (flock on the staging file)
holds across processes."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import jwt
from support.upload_client import UploadFixture


def staging_file(shared: Path, uploads: UploadFixture, token: str) -> Path:
    claims = jwt.decode(token, options={"verify_signature": False})
    return shared / uploads.vfid.relative_path() / ".upload" / claims["session"]


def wait_until_locked(path: Path, timeout: float = 20.0) -> None:
    """Until a daemon holds the upload's write lock (B's PATCH is in), read
    from /proc/locks so that the test never takes the lock itself."""
    st = path.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and inode in fields:
                return
        time.sleep(0.02)
    raise AssertionError("the PATCH on the second daemon never took the upload's lock")


def test_an_upload_begun_on_one_daemon_is_finished_on_the_other(storage_proxy_factory, tmp_path):
    shared = tmp_path / "shared-volume"
    shared.mkdir()
    config = {"volume": {"local": {"backend": "vfs", "path": str(shared)}}}
    a = storage_proxy_factory(extra_config=config)
    b = storage_proxy_factory(extra_config=config)
    on_a = UploadFixture(a)
    on_b = UploadFixture.__new__(UploadFixture)
    on_b.__dict__.update(on_a.__dict__, daemon=b)
    data = os.urandom(3 << 20)
    token = on_a.token("shared/file.bin", len(data))
    assert on_a.patch(token, 0, data[:1 << 20]).status_code == 204
    assert on_b.offset(token) == 1 << 20
    assert on_b.patch(token, 1 << 20, data[1 << 20:2 << 20]).status_code == 204
    assert on_a.offset(token) == 2 << 20

    # A PATCH in flight on B holds the upload: A refuses a second writer.
    s = socket.create_connection(("127.0.0.1", b.client_port))
    s.sendall(
        f"PATCH /upload?token={token} HTTP/1.1\r\nHost: b\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {2 << 20}\r\n"
        f"Content-Length: {1 << 20}\r\n\r\n".encode() + data[2 << 20:(2 << 20) + 1000]
    )
    wait_until_locked(staging_file(shared, on_a, token))
    r = on_a.patch(token, 2 << 20, data[2 << 20:])
    assert r.status_code in (409, 423), r.status_code
    s.sendall(data[(2 << 20) + 1000:])
    assert b" 204 " in s.recv(4096)
    s.close()
    assert on_a.offset(token) == 3 << 20
    assert (shared / on_a.vfid.relative_path() / "shared" / "file.bin").read_bytes() == data
