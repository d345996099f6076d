"""A real daemon SIGKILLed in the middle of a PATCH (issue 9): after the
restart on the same kernel, HEAD reports the bytes that were already in the
staging file, and the upload resumes from there byte-exact."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from support.upload_client import UploadFixture, open_patch

from storage.uploads import staging_path

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


def staging_of(uploads: UploadFixture) -> Path:
    session = next(p.name for p in (uploads.vfolder / ".upload").iterdir() if "." not in p.name)
    return staging_path(uploads.vfolder, session)


def kill_mid_patch(storage_proxy, uploads: UploadFixture, token: str, data: bytes, offset: int, send: int) -> None:
    """A PATCH from ``offset`` declaring the rest, ``send`` bytes of it sent
    and written to the staging file, then the daemon SIGKILLed and restarted."""
    staged = staging_of(uploads)
    s = open_patch(storage_proxy.client_port, token, offset, len(data) - offset)
    try:
        s.sendall(data[offset:offset + send])
        deadline = time.monotonic() + 10
        while staged.stat().st_size < offset + send:
            assert time.monotonic() < deadline, staged.stat().st_size
            time.sleep(0.01)
        storage_proxy.kill()
    finally:
        s.close()
    storage_proxy.start()


def test_repeated_kills_mid_patch_lose_nothing_staged(storage_proxy):
    """A bounded loop: killed in each of two PATCHes, the upload resumes each
    time from all it had staged, and completes byte-exact.  Its state was
    last written before a reboot (its first MiB then fdatasync'ed and
    recorded): what the PATCHes stage on this boot is this boot's and is kept
    (it was dropped: the state still named the earlier boot)."""
    uploads = UploadFixture(storage_proxy)
    rng = random.Random(4)
    data = rng.randbytes(SIZE)
    token = uploads.token("k/loop.bin", SIZE)
    offset = 1 << 20
    assert uploads.patch(token, 0, data[:offset]).status_code == 204
    state_file = staging_of(uploads).with_name(staging_of(uploads).name + ".state")
    state = json.loads(state_file.read_bytes())
    state["extra"]["boot_id"] = "an-earlier-boot"
    tmp = state_file.with_name("rewrite.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_file)
    for _ in range(2):
        send = rng.randrange(256 << 10, (SIZE - offset) // 2)
        kill_mid_patch(storage_proxy, uploads, token, data, offset, send)
        reported = uploads.offset(token)
        # Everything staged, never more than is there; without the boot fix
        # the first round reports 1 MiB.
        assert reported == offset + send, (reported, offset, send)
        offset = reported
    r = uploads.patch(token, offset, data[offset:])
    assert r.status_code == 204, r.text
    assert (uploads.vfolder / "k/loop.bin").read_bytes() == data


def test_a_killed_upload_whose_bytes_were_all_staged_is_completed_by_head(storage_proxy):
    """Killed after the last byte reached the staging file but before the
    file moved to its target (the staging file holds every byte, the state
    an older offset): HEAD reports the full length, so a client stops there;
    the file must then be at its target (it stayed in .upload/)."""
    uploads = UploadFixture(storage_proxy)
    data = bytes(range(256)) * (SIZE // 256)
    token = uploads.token("k/full.bin", SIZE)
    # What the killed daemon left (no writer holds the upload, as after a
    # restart): every byte in the staging file, none recorded.
    staging_of(uploads).write_bytes(data)
    assert uploads.offset(token) == SIZE
    assert (uploads.vfolder / "k/full.bin").read_bytes() == data
    assert uploads.offset(token) == SIZE  # and again, now from the completed upload
