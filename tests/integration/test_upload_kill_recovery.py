"""A real daemon SIGKILLed in the middle of a PATCH (issue 9): after the
restart on the same kernel, HEAD reports the bytes that were already in the
staging file, and the upload resumes from there byte-exact."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "web"))

from test_upload_reliability import open_patch  # noqa: E402
from upload_client import UploadFixture  # noqa: E402

from storage.uploads import staging_path  # noqa: E402

SIZE = 8 << 20
SENT = 3 << 20


def test_bytes_staged_before_a_sigkill_are_reported_after_the_restart(storage_proxy):
    uploads = UploadFixture(storage_proxy)
    data = bytes(range(256)) * (SIZE // 256)
    token = uploads.token("k/file.bin", SIZE)
    session = next(p.name for p in (uploads.vfolder / ".upload").iterdir() if not p.name.endswith(".state"))
    staged = staging_path(uploads.vfolder, session)
    s = open_patch(storage_proxy.client_port, token, 0, SIZE)
    s.sendall(data[:SENT])
    deadline = time.monotonic() + 10
    while staged.stat().st_size < SENT:  # the daemon has written them (not recorded: no checkpoint yet)
        assert time.monotonic() < deadline, staged.stat().st_size
        time.sleep(0.02)
    storage_proxy.kill()
    s.close()
    storage_proxy.start()
    offset = uploads.offset(token)
    assert offset == SENT  # all that reached the staging file; without recovery: 0
    r = uploads.patch(token, offset, data[offset:])
    assert r.status_code == 204, r.text
    assert (uploads.vfolder / "k/file.bin").read_bytes() == data
