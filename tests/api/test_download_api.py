"""``/download`` and ``/download-archive``, socket-free: the real ClientAPI
routes and vfs volume, reached through treq's StubTreq, with a pool that runs
blocking work inline (so every response is complete when a request returns).

Over StubTreq there is no socket, so bodies go through the pread fallback
(``ChunkProducer``); the sendfile path is tested over real sockets in
tests/integration/test_download_sockets.py.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
import zipfile
from email.utils import formatdate
from pathlib import Path
from urllib.parse import quote

import jwt
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Site

from backends.base import VolumeContext
from storage.api.client import ClientAPI
from storage.api.downloads import content_disposition
from storage.config import parse_config
from storage.tokens import issue_archive_token, issue_download_token, issue_upload_token
from storage.vfid import VFolderID
from storage.volumes import VolumeRegistry
from storage.web import producers

SECRET = "download-test-secret-0123456789abcdef0123"
BASE = "http://proxy.invalid"


class InlinePool:
    def run(self, f, *args, **kwargs):
        return maybeDeferred(f, *args, **kwargs)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.volume_root = tmp_path / "vol"
        self.volume_root.mkdir()
        config = parse_config({
            "storage-proxy": {"secret": SECRET},
            "api": {"manager": {"secret": "manager-secret"}},
            "volume": {"local": {"backend": "vfs", "path": str(self.volume_root)}},
        })
        pool = InlinePool()
        clock = Clock()
        self.volumes = VolumeRegistry.from_config(config.volumes, VolumeContext(pool=pool, reactor=clock))
        self.api = ClientAPI(config, self.volumes, pool, clock)
        self.stub = StubTreq(self.api.app.resource())
        self.vfid = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")
        self.vfolder = self.volumes.get("local").vfolder_path(self.vfid)
        self.vfolder.mkdir(parents=True)

    def token(self, relpath: str, **kw) -> str:
        return issue_download_token(SECRET, 600, volume=kw.get("volume", "local"),
                                    vfid=kw.get("vfid", self.vfid), relpath=relpath)

    def archive_token(self, files, filename=None) -> str:
        return issue_archive_token(SECRET, 600, volume="local", vfid=self.vfid, files=files, filename=filename)

    async def get(self, relpath=None, *, token=None, method="GET", path="/download", headers=None, **params):
        if token is None:
            token = self.token(relpath)
        query = "&".join([f"token={quote(token)}"] + [f"{k}={quote(str(v))}" for k, v in params.items()])
        response = await self.stub.request(method, f"{BASE}{path}?{query}", headers=headers or {})
        body = await self.stub.content(response)
        response.body = body
        return response

    def raw(self, method: str, relpath: str, headers=None, **params) -> RawResponse:
        """One request as HTTP/1.1 bytes through a real Site over a StringTransport."""
        query = "&".join([f"token={quote(self.token(relpath))}"] + [f"{k}={v}" for k, v in params.items()])
        site = Site(self.api.app.resource())
        proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        proto.makeConnection(transport)
        lines = [f"{method} /download?{query} HTTP/1.1", "Host: proxy", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        proto.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
        return RawResponse(transport.value())


def header(response, name):
    if name == "content-length" and not isinstance(response, RawResponse):
        # twisted's HTTP client moves Content-Length out of the headers.
        return None if response.length == UNKNOWN_LENGTH else str(response.length)
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class RawResponse:
    """A response read off the wire bytes (for what treq hides: HEAD's Content-Length)."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.code = int(lines[0].split()[1])
        self.headers = Headers()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.addRawHeader(name.strip(), value.strip())


def problem_type(response):
    assert header(response, "content-type") == "application/problem+json"
    return json.loads(response.body)["type"].rsplit("/", 1)[1]


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


DATA = bytes(range(256)) * 40  # 10240 bytes


def put(h, relpath, data=DATA):
    path = h.vfolder / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- whole files ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_a_file(h):
    put(h, "dir/hello.bin")
    before = producers.stats["pread_responses"]
    r = await h.get("dir/hello.bin")
    assert r.code == 200
    assert r.body == DATA
    assert header(r, "content-type") == "application/octet-stream"
    assert header(r, "content-disposition") == "attachment;filename=\"hello.bin\"; filename*=UTF-8''hello.bin"
    assert header(r, "accept-ranges") == "bytes"
    assert header(r, "content-length") == str(len(DATA))
    st = (h.vfolder / "dir/hello.bin").stat()
    assert header(r, "etag") == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    assert header(r, "last-modified") == formatdate(int(st.st_mtime), usegmt=True)
    assert header(r, "cache-control") is None
    assert producers.stats["pread_responses"] == before + 1


@pytest_twisted.ensureDeferred
async def test_head_answers_like_get_without_a_body(h):
    put(h, "f.bin")
    r = h.raw("HEAD", "f.bin")
    assert r.code == 200
    assert r.body == b""
    assert header(r, "content-length") == str(len(DATA))
    assert header(r, "accept-ranges") == "bytes"
    assert header(r, "etag")


@pytest_twisted.ensureDeferred
async def test_no_cache_and_empty_file(h):
    put(h, "empty", b"")
    r = await h.get("empty", no_cache="true")
    assert r.code == 200 and r.body == b""
    assert header(r, "cache-control") == "no-store"
    assert header(r, "content-length") == "0"


def test_content_disposition_matches_upstream():
    assert content_disposition("x.txt") == "attachment;filename=\"x.txt\"; filename*=UTF-8''x.txt"
    assert content_disposition('데이터 "q".bin') == (
        "attachment;filename=\" \\\"q\\\".bin\"; "
        "filename*=UTF-8''%EB%8D%B0%EC%9D%B4%ED%84%B0%20%22q%22.bin"
    )
    assert "\r" not in content_disposition("a\r\nb") and "\n" not in content_disposition("a\r\nb")
    assert content_disposition("bad\udcff.bin").endswith("filename*=UTF-8''bad%FF.bin")


@pytest_twisted.ensureDeferred
async def test_unicode_name_in_content_disposition(h):
    put(h, "데이터.csv")
    r = await h.get("데이터.csv")
    assert r.code == 200
    assert header(r, "content-disposition") == content_disposition("데이터.csv")


@pytest_twisted.ensureDeferred
async def test_dst_dir_prefixes_the_relpath(h):
    put(h, "out/sub/f.bin")
    r = await h.get("sub/f.bin", dst_dir="out")
    assert r.code == 200 and r.body == DATA


# -- ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [("bytes=2-5", 2, 5), ("bytes=-3", len(DATA) - 3, len(DATA) - 1), ("bytes=10000-", 10000, len(DATA) - 1),
     ("bytes=0-99999", 0, len(DATA) - 1), ("bytes=0-9,5-19", 0, 19)],
)
@pytest_twisted.ensureDeferred
async def test_single_range(h, range_header, start, end):
    put(h, "f.bin")
    r = await h.get("f.bin", headers={"Range": range_header})
    assert r.code == 206
    assert r.body == DATA[start:end + 1]
    assert header(r, "content-range") == f"bytes {start}-{end}/{len(DATA)}"
    assert header(r, "content-length") == str(end - start + 1)


@pytest_twisted.ensureDeferred
async def test_unsatisfiable_range(h):
    put(h, "f.bin")
    r = await h.get("f.bin", headers={"Range": "bytes=20000-"})
    assert r.code == 416
    assert header(r, "content-range") == f"bytes */{len(DATA)}"
    assert problem_type(r) == "range-not-satisfiable"
    assert header(r, "content-disposition") is None


@pytest.mark.parametrize("range_header", ["bytes=0-1,100-200", "bytes=5-1", "lines=1-2", "bytes=abc"])
@pytest_twisted.ensureDeferred
async def test_multiple_or_invalid_ranges_serve_the_whole_file(h, range_header):
    put(h, "f.bin")
    r = await h.get("f.bin", headers={"Range": range_header})
    assert r.code == 200
    assert r.body == DATA
    assert header(r, "content-range") is None


@pytest_twisted.ensureDeferred
async def test_head_with_range(h):
    put(h, "f.bin")
    r = h.raw("HEAD", "f.bin", headers={"Range": "bytes=0-9"})
    assert r.code == 206 and r.body == b""
    assert header(r, "content-range") == f"bytes 0-9/{len(DATA)}"
    assert header(r, "content-length") == "10"


# -- conditional requests ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_if_none_match_and_if_modified_since(h):
    put(h, "f.bin")
    first = await h.get("f.bin")
    etag, last_modified = header(first, "etag"), header(first, "last-modified")
    r = await h.get("f.bin", headers={"If-None-Match": etag})
    assert r.code == 304 and r.body == b""
    assert header(r, "etag") == etag
    raw = h.raw("GET", "f.bin", headers={"If-None-Match": etag})
    assert raw.code == 304 and raw.body == b""
    assert header(raw, "content-length") is None
    r = await h.get("f.bin", headers={"If-Modified-Since": last_modified})
    assert r.code == 304
    r = await h.get("f.bin", headers={"If-None-Match": '"stale"'})
    assert r.code == 200 and r.body == DATA


@pytest_twisted.ensureDeferred
async def test_if_range(h):
    path = put(h, "f.bin")
    first = await h.get("f.bin")
    etag = header(first, "etag")
    r = await h.get("f.bin", headers={"Range": "bytes=0-3", "If-Range": etag})
    assert r.code == 206 and r.body == DATA[:4]
    r = await h.get("f.bin", headers={"Range": "bytes=0-3", "If-Range": header(first, "last-modified")})
    assert r.code == 206
    os.utime(path, (time.time() + 100, time.time() + 100))
    r = await h.get("f.bin", headers={"Range": "bytes=0-3", "If-Range": etag})
    assert r.code == 200 and r.body == DATA


@pytest_twisted.ensureDeferred
async def test_if_match_fails_with_412(h):
    put(h, "f.bin")
    r = await h.get("f.bin", headers={"If-Match": '"other"'})
    assert r.code == 412
    assert problem_type(r) == "precondition-failed"


# -- tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_token",
    [
        lambda h: "",
        lambda h: "not-a-jwt",
        lambda h: issue_download_token("wrong-secret-0123456789abcdef0123456789", 600, volume="local", vfid=h.vfid, relpath="f.bin"),
        lambda h: issue_download_token(SECRET, -10, volume="local", vfid=h.vfid, relpath="f.bin"),
        lambda h: issue_upload_token(SECRET, 600, volume="local", vfid=h.vfid, relpath="f.bin", size=1,
                                     session="0" * 32),
        lambda h: h.archive_token(["f.bin"]),
        lambda h: jwt.encode({"op": "download", "volume": "local", "relpath": "f.bin",
                              "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_tokens_are_403(h, make_token):
    put(h, "f.bin")
    r = await h.get(token=make_token(h))
    assert r.code == 403
    assert problem_type(r) == "invalid-token"


@pytest_twisted.ensureDeferred
async def test_download_token_is_refused_by_download_archive(h):
    put(h, "f.bin")
    r = await h.get(token=h.token("f.bin"), path="/download-archive")
    assert r.code == 403


@pytest_twisted.ensureDeferred
async def test_unknown_volume_is_400(h):
    r = await h.get(token=h.token("f.bin", volume="nope"))
    assert r.code == 400
    assert problem_type(r) == "invalid"


@pytest_twisted.ensureDeferred
async def test_bad_boolean_is_400(h):
    put(h, "f.bin")
    r = await h.get("f.bin", archive="maybe")
    assert r.code == 400
    assert problem_type(r) == "invalid-api-params"


# -- paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("relpath", ["missing.bin", "../escape.bin", "/etc/passwd", "dir/../../x", "a\x00b"])
@pytest_twisted.ensureDeferred
async def test_missing_or_escaping_paths_are_404(h, relpath):
    put(h, "f.bin")
    (h.vfolder.parent / "escape.bin").write_bytes(b"secret")
    r = await h.get(relpath)
    assert r.code == 404
    assert problem_type(r) == "file-not-found"


@pytest_twisted.ensureDeferred
async def test_escaping_dst_dir_is_404(h):
    put(h, "f.bin")
    r = await h.get("f.bin", dst_dir="..")
    assert r.code == 404


@pytest_twisted.ensureDeferred
async def test_missing_vfolder_is_404(h):
    other = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")
    r = await h.get(token=h.token("f.bin", vfid=other))
    assert r.code == 404
    assert problem_type(r) == "file-not-found"


@pytest_twisted.ensureDeferred
async def test_symlinks(h, tmp_path):
    put(h, "real.bin")
    os.symlink("real.bin", h.vfolder / "inside-link")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    os.symlink(outside, h.vfolder / "outside-link")
    r = await h.get("inside-link")
    assert r.code == 200 and r.body == DATA
    assert header(r, "content-disposition").startswith('attachment;filename="inside-link"')
    r = await h.get("outside-link")
    assert r.code == 404


@pytest_twisted.ensureDeferred
async def test_a_fifo_is_not_served_and_does_not_block(h):
    os.mkfifo(h.vfolder / "pipe")
    r = await h.get("pipe")
    assert r.code == 400
    assert problem_type(r) == "invalid-api-params"


# -- directories as zip -------------------------------------------------------------


def make_tree(h):
    put(h, "data/a.txt", b"aaa")
    put(h, "data/sub/b.bin", DATA)
    (h.vfolder / "data" / "empty").mkdir()
    os.symlink("/etc/passwd", h.vfolder / "data" / "passwd-link")


@pytest_twisted.ensureDeferred
async def test_directory_without_archive_is_400(h):
    make_tree(h)
    r = await h.get("data")
    assert r.code == 400
    assert problem_type(r) == "invalid-api-params"


@pytest_twisted.ensureDeferred
async def test_directory_as_zip(h):
    make_tree(h)
    before = producers.stats["zip_responses"]
    r = await h.get("data", archive="true", no_cache="1")
    assert r.code == 200
    assert header(r, "content-type") == "application/zip"
    assert header(r, "content-disposition") == "attachment;filename=\"data.zip\"; filename*=UTF-8''data.zip"
    assert header(r, "content-length") == str(len(r.body))
    assert header(r, "cache-control") == "no-store"
    zf = zipfile.ZipFile(io.BytesIO(r.body))
    assert zf.testzip() is None
    assert sorted(zf.namelist()) == ["a.txt", "empty/", "passwd-link", "sub/", "sub/b.bin"]
    assert zf.read("sub/b.bin") == DATA
    assert zf.read("passwd-link") == b"/etc/passwd"  # the link itself, never its target
    assert producers.stats["zip_responses"] == before + 1
    head = h.raw("HEAD", "data", archive="true")
    assert head.code == 200 and head.body == b""
    assert header(head, "content-length") == str(len(r.body))


@pytest_twisted.ensureDeferred
async def test_download_archive(h):
    make_tree(h)
    put(h, "top.txt", b"top")
    r = await h.get(token=h.archive_token(["top.txt", "data/sub", "./top.txt"], "mine.zip"),
                    path="/download-archive")
    assert r.code == 200
    assert header(r, "content-disposition") == "attachment;filename=\"mine.zip\"; filename*=UTF-8''mine.zip"
    zf = zipfile.ZipFile(io.BytesIO(r.body))
    assert zf.namelist() == ["top.txt", "data/sub/", "data/sub/b.bin"]
    assert zf.read("top.txt") == b"top"
    r = await h.get(token=h.archive_token(["top.txt"]), path="/download-archive")
    assert header(r, "content-disposition").startswith('attachment;filename="archive.zip"')


@pytest_twisted.ensureDeferred
async def test_download_archive_errors(h):
    put(h, "top.txt", b"top")
    r = await h.get(token=h.archive_token(["top.txt", "nope.txt"]), path="/download-archive")
    assert r.code == 404
    assert problem_type(r) == "file-not-found"
    r = await h.get(token=h.archive_token(["../x"]), path="/download-archive")
    assert r.code == 400
    assert problem_type(r) == "invalid-api-params"
    os.symlink("/etc", h.vfolder / "etc-link")
    r = await h.get(token=h.archive_token(["etc-link"]), path="/download-archive")
    assert r.code == 400
