"""The upload janitor: a TimerService sweeping expired uploads off every volume."""

from __future__ import annotations

import fcntl
import os
import time

from support.tus_harness import TUS, FakeVolume, FakeVolumes, InlinePool, TusHarness
from twisted.internet.task import Clock

from storage.janitor import ORPHAN_GRACE, UploadJanitor, sweep_volume
from storage.uploads import completion_records_dir, create_upload, staging_path, state_path


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


def _without_user_xattrs(monkeypatch):
    import errno

    def no_xattrs(*args, **kwargs):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", no_xattrs)
    monkeypatch.setattr(os, "getxattr", no_xattrs)


def test_without_user_xattrs_a_completed_upload_leaves_nothing_in_the_folder(tmp_path, monkeypatch):
    _without_user_xattrs(monkeypatch)
    h = TusHarness(tmp_path)
    token, session = h.new_upload(3, expire=100)
    assert h.patch(token, 0, b"abc").status == 204
    # The folder holds the user's file and nothing else ...
    assert sorted(p.name for p in h.vfolder.iterdir()) == ["data"]
    assert h.target().read_bytes() == b"abc"
    # ... and a client that lost the last answer still learns it is done.
    head = h.head(token)
    assert (head.status, head.header("Upload-Offset"), head.header("Upload-Length")) == (200, "3", "3")
    assert sweep_volume(tmp_path, time.time()) == 0
    assert h.head(token).status == 200
    # Once the token has expired the record goes too.
    assert sweep_volume(tmp_path, time.time() + 200) == 1
    assert list(completion_records_dir(tmp_path).iterdir()) == []
    assert sorted(p.name for p in h.vfolder.iterdir()) == ["data"]


def test_without_user_xattrs_a_record_does_not_vouch_for_a_file_that_went(tmp_path, monkeypatch):
    _without_user_xattrs(monkeypatch)
    h = TusHarness(tmp_path)
    token, session = h.new_upload(3, expire=100)
    assert h.patch(token, 0, b"abc").status == 204
    h.target().unlink()
    assert h.head(token).status == 404
    h.target().write_bytes(b"other content")  # another file of another size at the same path
    assert h.head(token).status == 404


def test_without_user_xattrs_a_concatenated_upload_leaves_nothing_in_the_folder(tmp_path, monkeypatch):
    _without_user_xattrs(monkeypatch)
    h = TusHarness(tmp_path)
    token, session = h.new_upload(6, expire=100)
    parts = []
    for chunk in (b"abc", b"def"):
        r = h.request("POST", f"/upload?token={token}",
                      dict(TUS, **{"Upload-Length": str(len(chunk)), "Upload-Concat": "partial"}), b"")
        assert r.status == 201
        rest = r.header("Location").split("?")[0].split("/", 1)[1]
        assert h.patch(token, 0, chunk, rest=rest).status == 204
        parts.append("/upload/" + rest)
    r = h.request("POST", f"/upload?token={token}", dict(TUS, **{"Upload-Concat": "final;" + " ".join(parts)}), b"")
    assert r.status == 201
    assert h.target().read_bytes() == b"abcdef"
    assert sorted(p.name for p in h.vfolder.iterdir()) == ["data"]  # the user's dir, nothing else
    head = h.head(token)
    assert head.header("Upload-Offset") == "6"
    assert head.header("Upload-Concat").startswith("final;")


def test_stale_temps_of_completion_records_go_after_the_grace_period(tmp_path):
    records = completion_records_dir(tmp_path)
    records.mkdir(parents=True)
    tmp = records / ("f" * 32 + ".state.1.x.tmp")
    tmp.write_text("{}")
    sweep_volume(tmp_path, time.time())
    assert tmp.exists()
    sweep_volume(tmp_path, time.time() + ORPHAN_GRACE + 10)
    assert not tmp.exists()


def test_tus_offers_the_janitor_and_socket_threads_as_services(tmp_path):
    h = TusHarness(tmp_path)
    names = {s.name for s in h.tus.services()}
    assert names == {"upload-janitor", "upload-socket-threads"}
