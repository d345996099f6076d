"""The upload janitor: a TimerService sweeping expired uploads off every volume."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "web"))

from tus_harness import FakeVolume, FakeVolumes, InlinePool, TusHarness  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from storage.janitor import ORPHAN_GRACE, UploadJanitor, sweep_volume  # noqa: E402
from storage.uploads import create_upload, staging_path, state_path  # noqa: E402


def test_janitor_sweeps_on_start_and_then_every_interval(tmp_path):
    h = TusHarness(tmp_path)
    create_upload(h.vfolder, "a" * 32, "f", 10, expire=-1)  # already expired
    clock = Clock()
    janitor = UploadJanitor(FakeVolumes(FakeVolume(tmp_path)), InlinePool(), interval=60, clock=clock)
    janitor.startService()
    assert not staging_path(h.vfolder, "a" * 32).exists()
    create_upload(h.vfolder, "b" * 32, "f", 10, expire=30)
    clock.advance(60)
    assert staging_path(h.vfolder, "b" * 32).exists()  # not expired yet by the wall clock
    janitor.stopService()


def test_an_upload_being_written_is_left_for_the_next_sweep(tmp_path):
    h = TusHarness(tmp_path)
    create_upload(h.vfolder, "c" * 32, "f", 10, expire=-1)
    fd = os.open(staging_path(h.vfolder, "c" * 32), os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert sweep_volume(tmp_path, time.time()) == 0
        assert staging_path(h.vfolder, "c" * 32).exists()
    finally:
        os.close(fd)
    assert sweep_volume(tmp_path, time.time()) == 1
    assert not (h.vfolder / ".upload").exists()


def test_orphans_and_stale_temp_files_go_after_the_grace_period(tmp_path):
    h = TusHarness(tmp_path)
    create_upload(h.vfolder, "d" * 32, "f", 10)
    state_path(h.vfolder, "d" * 32).unlink()  # a crash between the two creates
    tmp = h.vfolder / ".upload" / ("e" * 32 + ".state.1.x.tmp")
    tmp.write_text("{}")
    assert sweep_volume(tmp_path, time.time()) == 0
    assert staging_path(h.vfolder, "d" * 32).exists()
    later = time.time() + ORPHAN_GRACE + 10
    assert sweep_volume(tmp_path, later) == 1
    assert not tmp.exists()
    assert not (h.vfolder / ".upload").exists()


def test_a_completed_upload_leaves_the_janitor_nothing_and_head_still_answers(tmp_path):
    h = TusHarness(tmp_path)
    token, session = h.new_upload(3, expire=100)
    assert h.patch(token, 0, b"abc").status == 204
    assert not (h.vfolder / ".upload").exists()
    assert sweep_volume(tmp_path, time.time() + 200) == 0
    assert h.head(token).header("Upload-Offset") == "3"
    assert h.target().read_bytes() == b"abc"


def test_without_user_xattrs_completed_uploads_keep_their_state_until_the_token_expires(tmp_path, monkeypatch):
    import errno
    import os

    def no_xattrs(*args, **kwargs):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", no_xattrs)
    h = TusHarness(tmp_path)
    token, session = h.new_upload(3, expire=100)
    assert h.patch(token, 0, b"abc").status == 204
    assert sweep_volume(tmp_path, time.time()) == 0
    assert h.head(token).status == 200
    assert sweep_volume(tmp_path, time.time() + 200) == 1
    assert not (h.vfolder / ".upload").exists()
    assert h.target().read_bytes() == b"abc"


def test_tus_offers_the_janitor_and_socket_threads_as_services(tmp_path):
    h = TusHarness(tmp_path)
    names = {s.name for s in h.tus.services()}
    assert names == {"upload-janitor", "upload-socket-threads"}
