"""The proxy's upload bookkeeping never shows in the user's folder: after
uploads (with bytes, empty, under a dst_dir, one aborted then resumed) the
vfolder's listing, its zip and /download-archive hold only the user's files,
while HEAD after completion still answers offset = length.  All through the
real daemon's public APIs."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
import requests
from support.upload_client import TUS, UploadFixture


@pytest.fixture
def uploads(storage_proxy) -> UploadFixture:
    return UploadFixture(storage_proxy)


def listing(uploads: UploadFixture, relpath: str = ".") -> set[str]:
    r = uploads.manager("POST", "/folder/file/list",
                        {"volume": uploads.volume, "vfid": str(uploads.vfid), "relpath": relpath})
    assert r.status_code == 200, r.text
    return {item["name"] for item in r.json()["items"]}


def download_token(uploads: UploadFixture, relpath: str) -> str:
    r = uploads.manager("POST", "/folder/file/download",
                        {"volume": uploads.volume, "vfid": str(uploads.vfid), "relpath": relpath, "archive": True})
    assert r.status_code == 200, r.text
    return r.json()["token"]


def archive_token(uploads: UploadFixture, files: list[str]) -> str:
    r = uploads.manager("POST", "/folder/file/archive-download-token",
                        {"volume": uploads.volume, "virtual_folder_id": str(uploads.vfid), "files": files})
    assert r.status_code == 200, r.text
    return r.json()["token"]


def zip_names(body: bytes) -> set[str]:
    zf = zipfile.ZipFile(io.BytesIO(body))
    assert zf.testzip() is None
    return set(zf.namelist())


def test_completed_uploads_leave_nothing_in_the_folder(uploads):
    client = uploads.daemon.client_url
    data = os.urandom(100_000)
    whole = uploads.token("whole.bin", len(data))
    assert uploads.patch(whole, 0, data).status_code == 204

    empty_by_head = uploads.token("empty-head.bin", 0)
    assert uploads.offset(empty_by_head) == 0

    empty_by_post = uploads.token("empty-post.bin", 0)
    r = requests.post(uploads.upload_url(empty_by_post) + "&dst_dir=sub", timeout=30,
                      headers=dict(TUS, **{"Upload-Length": "0"}))
    assert r.status_code == 201, r.text

    resumed = uploads.token("dir/resumed.bin", len(data))
    assert uploads.patch(resumed, 0, data[:30_000]).status_code == 204
    # In progress: its bookkeeping may exist now ...
    assert uploads.offset(resumed) == 30_000
    assert uploads.patch(resumed, 30_000, data[30_000:]).status_code == 204

    # ... and none of it once every upload is done.
    assert listing(uploads) == {"whole.bin", "empty-head.bin", "sub", "dir"}
    assert listing(uploads, "sub") == {"empty-post.bin"}
    assert not (uploads.vfolder / ".upload").exists()

    r = requests.get(f"{client}/download", params={"token": download_token(uploads, "."), "archive": "true"},
                     timeout=30)
    assert r.status_code == 200, r.text
    names = zip_names(r.content)
    assert not [n for n in names if ".upload" in n], names
    assert {"whole.bin", "empty-head.bin", "sub/empty-post.bin", "dir/resumed.bin"} <= names

    r = requests.get(f"{client}/download-archive",
                     params={"token": archive_token(uploads, ["whole.bin", "sub", "dir", "empty-head.bin"])},
                     timeout=30)
    assert r.status_code == 200, r.text
    names = zip_names(r.content)
    assert not [n for n in names if ".upload" in n], names
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    assert zf.read("whole.bin") == data and zf.read("empty-head.bin") == b""

    # HEAD after completion answers as before; a PATCH with bytes is refused as
    # completed, an empty one repeating the end is a 204 that changes nothing.
    for token, length in ((whole, len(data)), (empty_by_head, 0), (resumed, len(data))):
        r = uploads.head(token)
        assert r.status_code == 200, r.text
        assert (r.headers["Upload-Offset"], r.headers["Upload-Length"]) == (str(length), str(length))
    r = requests.head(uploads.upload_url(empty_by_post) + "&dst_dir=sub", headers=TUS, timeout=30)
    assert (r.status_code, r.headers.get("Upload-Offset")) == (200, "0")
    assert uploads.patch(whole, len(data), b"x").status_code in (409, 413)
    r = uploads.patch(whole, len(data), b"")
    assert (r.status_code, r.headers.get("Upload-Offset")) == (204, str(len(data)))
    assert (uploads.vfolder / "whole.bin").read_bytes() == data
    assert (uploads.vfolder / "dir" / "resumed.bin").read_bytes() == data
    assert not (uploads.vfolder / ".upload").exists()


def test_a_terminated_upload_leaves_nothing_in_the_folder(uploads):
    token = uploads.token("gone.bin", 10)
    assert uploads.patch(token, 0, b"abc").status_code == 204
    assert requests.delete(uploads.upload_url(token), headers=TUS, timeout=30).status_code == 204
    assert listing(uploads) == set()
    assert uploads.head(token).status_code == 404
