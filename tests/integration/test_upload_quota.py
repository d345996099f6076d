"""The daemon enforces quota-scope limits itself (storage.quota), here on a
vfs volume with the emulated quota (``quota = "emulated"``: the limit is the
daemon's alone, no filesystem would stop a byte), against the real daemon
over HTTP: the upload session's size, each PATCH cut at what is left, two
uploads (on one daemon or two over one shared volume) racing for the last
bytes, a lowered limit, concatenation, usage that lags, a killed writer.
The same scenarios run on a real CephFS and a real XFS
(tests/backends/cephfs, tests/backends/xfs)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from support import quota_scenarios as qs
from support.daemon import StorageProxyProcess
from support.quota_scenarios import MiB, Scope, assert_quota_problem

from storage.quota import RECORD_MARGIN

# The uploads' own state files (JSON, a few hundred bytes each) are in the
# vfolder, so they count as usage.
BOOKKEEPING = 4096


def emulated(shared: Path, lag: str = "0s") -> dict[str, Any]:
    return {"volume": {"local": {"backend": "vfs", "path": str(shared),
                                 "options": {"quota": "emulated", "quota-lag": lag}}}}


# Every test makes a scope of its own, so the daemons are shared by the module.

@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-volume")


@pytest.fixture(scope="module")
def daemons(shared: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two daemons over one shared volume with the emulated quota."""
    base = tmp_path_factory.mktemp("daemons")
    started = [StorageProxyProcess(base / f"proxy{i}", extra_config=emulated(shared)).start() for i in range(2)]
    yield started
    for daemon in started:
        daemon.stop(timeout=10)


@pytest.fixture
def daemon(daemons):
    return daemons[0]


def test_an_upload_session_that_cannot_fit_is_507_and_creates_nothing(daemon, shared):
    qs.session_that_cannot_fit(Scope(daemon, shared), BOOKKEEPING)


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_a_patch_writes_what_is_left_and_keeps_it(daemon, shared, sized):
    qs.patch_cut_at_the_limit(Scope(daemon, shared), 2 * MiB, 3 * MiB, sized, BOOKKEEPING)


@pytest.mark.parametrize("count", [1, 2], ids=["one-daemon", "two-daemons"])
def test_two_uploads_racing_for_the_last_bytes_write_exactly_what_was_left(daemons, shared, count):
    scope = Scope(daemons[0], shared)
    clients = [scope.on(daemons[0]), scope.on(daemons[count - 1])]
    qs.race_for_the_last_bytes(scope, clients, 3 * MiB, 2 * MiB, BOOKKEEPING, shared / ".storage-proxy" / "quota")
    assert scope.usage()["used_bytes"] <= 3 * MiB


def test_a_limit_lowered_below_the_usage_refuses_further_writes(daemon, shared):
    qs.lowered_limit_refuses_writes(Scope(daemon, shared))


def test_concatenation_needs_room_for_the_joined_file(daemon, shared):
    qs.concatenation_needs_room(Scope(daemon, shared), daemon.client_url)


def test_bytes_written_count_while_the_usage_lags(storage_proxy_factory, tmp_path):
    """The emulated usage is a walk cached for a minute (as CephFS's rbytes
    lag): the daemon counts what it wrote meanwhile itself."""
    shared = tmp_path / "lagging"
    shared.mkdir()
    daemon = storage_proxy_factory(extra_config=emulated(shared, lag="60s"))
    scope = Scope(daemon, shared)
    scope.set_limit(3 * MiB)
    first = os.urandom(2 * MiB)
    token = scope.up.token("first.bin", len(first))  # usage walked (and cached) here: ~0
    assert scope.up.patch(token, 0, first).status_code == 204
    assert scope.usage()["used_bytes"] < MiB  # the lagging figure has not seen it
    # Without its own count the daemon would think 3 MiB are left.
    body = assert_quota_problem(scope.request_upload("second.bin", 2 * MiB), scope)
    assert body["left"] <= MiB
    small = scope.request_upload("small.bin", MiB // 2)
    assert small.status_code == 200
    token = small.json()["token"]
    second = os.urandom(MiB // 2)
    assert scope.up.patch(token, 0, second).status_code == 204
    # The third session fits in what the figure says, but not after the two writes.
    assert_quota_problem(scope.request_upload("third.bin", MiB // 2 + RECORD_MARGIN), scope)


def test_a_killed_writer_reserves_nothing(storage_proxy_factory, tmp_path):
    """A daemon SIGKILLed in the middle of a PATCH leaves its grant file; the
    staging file is no longer locked, so the grant counts for nothing and
    the other daemon gives the whole room to the next upload."""
    shared = tmp_path / "volume"
    shared.mkdir()
    victim = storage_proxy_factory(extra_config=emulated(shared))
    other = storage_proxy_factory(extra_config=emulated(shared))
    scope = Scope(victim, shared)
    scope.set_limit(4 * MiB)
    data = os.urandom(3 * MiB)
    token = scope.up.token("first.bin", len(data))
    s = socket.create_connection(("127.0.0.1", victim.client_port))
    s.sendall(
        f"PATCH /upload?token={token} HTTP/1.1\r\nHost: a\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:MiB]
    )
    grants = shared / ".storage-proxy" / "quota" / f"{scope.up.vfid.quota_scope_id.pathname}.grants"
    deadline = time.monotonic() + 20
    while not (grants.is_dir() and os.listdir(grants)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.listdir(grants), "the PATCH never took its grant"
    victim.kill()
    s.close()
    # The 3 MiB the dead PATCH was granted are free again: only its staged bytes count.
    on_other = scope.on(other)
    staged = on_other.offset(token)  # recovers what the killed daemon staged
    assert staged <= MiB
    r = on_other.manager("POST", "/folder/file/upload", {
        "volume": "local", "vfid": str(scope.up.vfid), "relpath": "second.bin", "size": 4 * MiB - staged - 8192})
    assert r.status_code == 200, r.text
    assert not os.listdir(grants)  # the stale grant was removed
