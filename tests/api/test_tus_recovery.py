"""Crash recovery of staged bytes (issue 9): bytes a killed daemon left past
the offset of record are adopted on the same boot, dropped after a reboot,
and never for an unverified (checksummed) PATCH."""

from __future__ import annotations

import json
import os

from support.tus_harness import TusHarness

from storage.uploads import current_boot_id, read_state, staging_path, state_path


def leave_unrecorded_bytes(h: TusHarness, session: str, data: bytes) -> None:
    """What a daemon SIGKILLed mid-PATCH leaves: bytes in the staging file, none recorded."""
    with open(staging_path(h.vfolder, session), "ab") as f:
        f.write(data)


def set_state_extra(h: TusHarness, session: str, **extra) -> None:
    path = state_path(h.vfolder, session)
    doc = json.loads(path.read_bytes())
    doc["extra"].update(extra)
    path.write_text(json.dumps(doc))


def test_the_state_records_the_boot_id(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(10)
    assert current_boot_id()
    assert read_state(h.vfolder, session).extra["boot_id"] == current_boot_id()


def test_same_boot_bytes_left_by_a_killed_writer_are_reported_and_kept(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(10)
    assert h.patch(token, 0, b"ab").status == 204
    leave_unrecorded_bytes(h, session, b"cdef")
    assert h.head(token).header("Upload-Offset") == "6"
    assert read_state(h.vfolder, session).offset == 6
    assert h.patch(token, 6, b"ghij").status == 204
    assert h.target().read_bytes() == b"abcdefghij"


def test_a_resuming_patch_at_the_staged_size_is_accepted_without_head(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(6)
    leave_unrecorded_bytes(h, session, b"abc")
    assert h.patch(token, 3, b"def").status == 204
    assert h.target().read_bytes() == b"abcdef"


def test_after_a_reboot_only_the_recorded_offset_counts(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(10)
    assert h.patch(token, 0, b"ab").status == 204
    leave_unrecorded_bytes(h, session, b"cdef")
    set_state_extra(h, session, boot_id="another-boot")
    assert h.head(token).header("Upload-Offset") == "2"
    assert staging_path(h.vfolder, session).read_bytes() == b"ab"


def test_never_an_offset_beyond_the_bytes_there(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(10)
    assert h.patch(token, 0, b"abcd").status == 204
    os.truncate(staging_path(h.vfolder, session), 1)  # lost from under the state
    assert h.head(token).header("Upload-Offset") == "1"
    leave_unrecorded_bytes(h, session, b"x" * 20)  # more than the upload's length
    assert h.head(token).header("Upload-Offset") == "10"
    # All ten bytes are there: that HEAD completed the upload with them, no more.
    assert h.target().read_bytes() == b"a" + b"x" * 9


def test_bytes_of_an_unverified_checksummed_patch_are_not_adopted(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(10)
    assert h.patch(token, 0, b"ab").status == 204
    set_state_extra(h, session, unverified_from=2)  # a checksummed PATCH was running
    leave_unrecorded_bytes(h, session, b"cdef")
    assert h.head(token).header("Upload-Offset") == "2"
    assert staging_path(h.vfolder, session).read_bytes() == b"ab"
    assert "unverified_from" not in read_state(h.vfolder, session).extra


def test_state_temps_of_a_dead_daemon_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess

    from storage.uploads import remove_dead_temps, state_path

    dead = subprocess.Popen(["true"])
    dead.wait()
    final = state_path(tmp_path, "s1")
    final.parent.mkdir(parents=True, exist_ok=True)
    stale = final.with_name(f"{final.name}.{dead.pid}.abcd1234.7.tmp")
    live = final.with_name(f"{final.name}.{os.getpid()}.abcd1234.8.tmp")
    other = state_path(tmp_path, "s2").with_name(f"{final.name[:-8]}x.state.{dead.pid}.ab.1.tmp")
    for p in (stale, live, other):
        p.write_bytes(b"{}")
    remove_dead_temps(tmp_path, "s1")
    assert not stale.exists()
    assert live.exists() and other.exists()
