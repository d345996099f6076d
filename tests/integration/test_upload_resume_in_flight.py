"""Resume without waiting (issue 9), on a real daemon: a client whose PATCH
connection is still open (the daemon still receiving, in a socket thread)
resumes with HEAD + PATCH from another connection; the old PATCH is stopped,
its bytes are recorded and reported, the resume is never 409."""

from __future__ import annotations

import time

from support.upload_client import UploadFixture, open_patch

from storage.uploads import staging_path

SIZE = 8 << 20
SENT = 3 << 20


def test_head_stops_a_patch_in_flight_and_reports_its_bytes(storage_proxy):
    uploads = UploadFixture(storage_proxy)
    data = bytes(range(256)) * (SIZE // 256)
    token = uploads.token("r/file.bin", SIZE)
    session = next(p.name for p in (uploads.vfolder / ".upload").iterdir() if not p.name.endswith(".state"))
    staged = staging_path(uploads.vfolder, session)
    old = open_patch(storage_proxy.client_port, token, 0, SIZE)
    old.sendall(data[:SENT])
    deadline = time.monotonic() + 10
    while staged.stat().st_size < SENT:
        assert time.monotonic() < deadline, staged.stat().st_size
        time.sleep(0.02)
    try:
        started = time.monotonic()
        offset = uploads.offset(token)
        assert time.monotonic() - started < 3  # bounded: about a second at most
        assert offset == SENT  # without the fix: 0 (nothing recorded yet)
        r = uploads.patch(token, offset, data[offset:])
        assert r.status_code == 204, r.text
    finally:
        old.close()
    assert (uploads.vfolder / "r/file.bin").read_bytes() == data
