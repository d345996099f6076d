"""Quota scenarios against running daemons (support.daemon), shared by the
vfs (emulated quota), CephFS and XFS tests: the same HTTP requests and the
same assertions on every backend, with the backend's own bookkeeping slack
(``slack``: what the uploads' state files and directories may take of the
scope; on XFS they take whole blocks).

Every scenario makes its own vfolder in its own quota scope.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import requests

from storage.quota import RECORD_MARGIN
from support.upload_client import TUS, UploadFixture

MiB = 1 << 20


class Scope:
    """A vfolder in its own quota scope on a running daemon; ``root`` is the
    volume's directory (the vfolders' parent) as the test sees it."""

    def __init__(self, daemon: Any, root: Path, volume: str = "local") -> None:
        self.up = UploadFixture(daemon, volume)
        self.volume = volume
        self.qsid = str(self.up.vfid.quota_scope_id)
        self.vfolder = root / self.up.vfid.relative_path()

    def on(self, daemon: Any) -> UploadFixture:
        """The same vfolder through another daemon over the same volume."""
        other = UploadFixture.__new__(UploadFixture)
        other.__dict__.update(self.up.__dict__, daemon=daemon)
        return other

    def set_limit(self, limit: int) -> None:
        r = self.up.manager("PATCH", "/quota-scope",
                            {"volume": self.volume, "qsid": self.qsid, "options": {"limit_bytes": limit}})
        assert r.status_code == 204, r.text

    def usage(self) -> dict[str, Any]:
        r = self.up.manager("GET", "/quota-scope", {"volume": self.volume, "qsid": self.qsid})
        assert r.status_code == 200, r.text
        return r.json()

    def request_upload(self, relpath: str, size: int) -> requests.Response:
        return self.up.manager("POST", "/folder/file/upload", {
            "volume": self.volume, "vfid": str(self.up.vfid), "relpath": relpath, "size": size})

    def staged(self, token: str) -> bytes:
        session = jwt.decode(token, options={"verify_signature": False})["session"]
        return (self.vfolder / ".upload" / session).read_bytes()


def assert_quota_problem(r: requests.Response, scope: Scope) -> dict[str, Any]:
    """A 507 problem+json naming the scope, the size asked for and what is left."""
    assert r.status_code == 507, (r.status_code, r.text)
    assert r.headers["Content-Type"] == "application/problem+json"
    body = r.json()
    assert body["type"].endswith("/insufficient-storage")
    assert body["quota_scope_id"] == scope.qsid
    assert "size" in body and "left" in body, body
    assert isinstance(body["size"], int) and isinstance(body["left"], int)
    assert body["size"] > body["left"] >= 0
    assert scope.qsid in body["msg"] and str(body["left"]) in body["msg"]
    return body


def session_that_cannot_fit(scope: Scope, slack: int, margin: int = RECORD_MARGIN) -> None:
    scope.set_limit(1 * MiB)
    r = scope.request_upload("big.bin", 2 * MiB)
    body = assert_quota_problem(r, scope)
    assert body["error_code"] == "vfolder_execute_unavailable"  # the manager's VFolderOperationFailed
    assert body["size"] == 2 * MiB
    assert MiB - margin - slack <= body["left"] <= MiB - margin
    assert not (scope.vfolder / ".upload").exists()
    assert os.listdir(scope.vfolder) == []
    assert scope.request_upload("small.bin", MiB // 2).status_code == 200


def patch_cut_at_the_limit(scope: Scope, limit: int, size: int, sized: bool, slack: int,
                           margin: int = RECORD_MARGIN) -> None:
    """One PATCH of ``size`` bytes into a scope that has ``limit``: cut there."""
    data = os.urandom(size)
    scope.set_limit(4 * size)
    token = scope.up.token("data/file.bin", len(data))
    scope.set_limit(limit)  # lowered after the session was made
    step = 256 << 10
    body: Any = data if sized else iter([data[i:i + step] for i in range(0, len(data), step)])
    r = scope.up.patch(token, 0, body)
    problem = assert_quota_problem(r, scope)
    offset = scope.up.offset(token)
    assert limit - margin - slack <= offset <= limit - margin, offset
    assert problem["left"] <= RECORD_MARGIN
    assert scope.staged(token) == data[:offset]  # byte-exact prefix, recorded
    # Nothing more fits: refused before a byte is read, the offset stays.
    r = scope.up.patch(token, offset, data[offset:])
    assert_quota_problem(r, scope)
    assert scope.up.offset(token) == offset
    # Once the limit is raised the client resumes where it was and finishes.
    scope.set_limit(4 * size)
    r = scope.up.patch(token, offset, data[offset:])
    assert r.status_code == 204, r.text
    assert (scope.vfolder / "data" / "file.bin").read_bytes() == data


def _slow_body(data: bytes, chunk: int = 64 << 10, pause: float = 0.002):
    for i in range(0, len(data), chunk):
        yield data[i:i + chunk]
        time.sleep(pause)


def race_for_the_last_bytes(scope: Scope, clients: list[UploadFixture], limit: int, size: int,
                            slack: int, grants_dir: Path | None = None, margin: int = RECORD_MARGIN) -> None:
    """Two uploads of ``size`` (each fits, both do not) PATCH at once."""
    scope.set_limit(limit)
    datas = [os.urandom(size), os.urandom(size)]
    tokens = [scope.up.token(f"f{i}.bin", size) for i in range(2)]
    barrier = threading.Barrier(2)
    results: list[requests.Response | None] = [None, None]

    def run(i: int) -> None:
        barrier.wait(10)
        results[i] = clients[i].patch(tokens[i], 0, _slow_body(datas[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    statuses = sorted(r.status_code for r in results if r is not None)
    assert 507 in statuses and set(statuses) <= {204, 507}, statuses
    offsets = [scope.up.offset(t) for t in tokens]
    for i, r in enumerate(results):
        assert r is not None
        if r.status_code == 204:
            assert offsets[i] == size
            assert (scope.vfolder / f"f{i}.bin").read_bytes() == datas[i]
        else:
            assert_quota_problem(r, scope)
            assert scope.staged(tokens[i]) == datas[i][:offsets[i]]
    # Together they took what was left of the scope, less the record margin:
    # never more; less only by the bookkeeping, which counts too.
    total = sum(offsets)
    assert limit - margin - slack <= total <= limit - margin, (total, offsets)
    if grants_dir is not None:
        assert not any(grants_dir.glob("*.grants/*"))  # no grant outlives its PATCH


def lowered_limit_refuses_writes(scope: Scope) -> None:
    scope.set_limit(8 * MiB)
    data = os.urandom(2 * MiB)
    token = scope.up.token("file.bin", len(data))
    assert scope.up.patch(token, 0, data[:MiB]).status_code == 204
    scope.set_limit(MiB // 2)
    r = scope.up.patch(token, MiB, data[MiB:])
    body = assert_quota_problem(r, scope)
    assert body["left"] == 0
    assert scope.up.offset(token) == MiB
    assert_quota_problem(scope.request_upload("more.bin", 1), scope)
    # An empty PATCH asks for nothing and is not refused.
    assert scope.up.patch(token, MiB, b"").status_code == 204


def concatenation_needs_room(scope: Scope, client_url: str) -> None:
    scope.set_limit(3 * MiB)
    halves = [os.urandom(MiB), os.urandom(MiB)]
    token = scope.up.token("joined.bin", 2 * MiB)
    urls = []
    for half in halves:
        r = requests.post(scope.up.upload_url(token), timeout=30,
                          headers=dict(TUS, **{"Upload-Length": str(len(half)), "Upload-Concat": "partial"}))
        assert r.status_code == 201, r.text
        url = f"{client_url}/{r.headers['Location']}"
        r = requests.patch(url, data=half, timeout=30, headers=dict(
            TUS, **{"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}))
        assert r.status_code == 204, r.text
        urls.append(url)
    final = {"Upload-Concat": "final;" + " ".join(urls)}
    # The parts hold 2 MiB of the 3; joining them needs 2 MiB more.
    r = requests.post(scope.up.upload_url(token), headers=dict(TUS, **final), timeout=30)
    body = assert_quota_problem(r, scope)
    assert body["size"] == 2 * MiB
    assert not (scope.vfolder / "joined.bin").exists()
    for url in urls:  # the parts are kept, so the client can retry
        assert requests.head(url, headers=TUS, timeout=30).headers["Upload-Offset"] == str(MiB)
    scope.set_limit(6 * MiB)
    r = requests.post(scope.up.upload_url(token), headers=dict(TUS, **final), timeout=30)
    assert r.status_code == 201, r.text
    assert (scope.vfolder / "joined.bin").read_bytes() == b"".join(halves)
