"""Downloads over real sockets: the daemon's own service (``make_service``)
in-process on 127.0.0.1:0, driven by treq, curl and raw sockets.

Checks the bytes, that plain TCP really used sendfile (``producers.stats``)
and TLS the pread fallback, keep-alive after a sendfile body, and that a
client leaving mid-download leaks no descriptor and logs no error.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_twisted
import treq
from support.tls import self_signed
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, globalLogPublisher

from storage.config import parse_config
from storage.tap import make_service
from storage.tokens import issue_download_token
from storage.vfid import VFolderID
from storage.web import producers

SECRET = "integration-download-secret-0123456789abcd"
BIG = 64 << 20


class Proxy:
    def __init__(self, tmp_path: Path, tls: bool = False) -> None:
        (tmp_path / "local").mkdir()
        client: dict = {"service-addr": {"host": "127.0.0.1", "port": 0}}
        if tls:
            cert, key = self_signed(tmp_path)
            client.update({"ssl-enabled": True, "ssl-cert": str(cert), "ssl-privkey": str(key)})
        raw = {
            "storage-proxy": {"secret": SECRET, "io-threads": 4},
            "api": {"client": client,
                    "manager": {"service-addr": {"host": "127.0.0.1", "port": 0}, "secret": "m" * 32}},
            "volume": {"local": {"backend": "vfs", "path": str(tmp_path / "local")}},
        }
        self.service = make_service(parse_config(raw), reactor)
        self.service.privilegedStartService()
        self.service.startService()
        self.port = self.service.client_listener.port.getHost().port
        self.scheme = "https" if tls else "http"
        self.vfid = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")
        self.vfolder = self.service.volumes.get("local").vfolder_path(self.vfid)
        self.vfolder.mkdir(parents=True)

    def url(self, relpath: str, path: str = "/download", **params) -> str:
        token = issue_download_token(SECRET, 600, volume="local", vfid=self.vfid, relpath=relpath)
        query = "&".join([f"token={quote(token)}"] + [f"{k}={v}" for k, v in params.items()])
        return f"{self.scheme}://127.0.0.1:{self.port}{path}?{query}"

    def request_bytes(self, relpath: str) -> bytes:
        target = self.url(relpath).split(str(self.port), 1)[1]
        return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


@pytest_twisted.async_yield_fixture
async def proxy(tmp_path):
    p = Proxy(tmp_path)
    yield p
    await p.service.stopService()


@pytest_twisted.async_yield_fixture
async def tls_proxy(tmp_path):
    p = Proxy(tmp_path, tls=True)
    yield p
    await p.service.stopService()


@pytest.fixture(scope="module")
def big_payload():
    # Random-ish but cheap: a 1 MiB random block repeated with a counter.
    block = os.urandom(1 << 20)
    return b"".join(struct.pack("<Q", i) + block[8:] for i in range(BIG >> 20))


@pytest.fixture
def errors():
    """Error-level log events (and failures) emitted during the test."""
    seen = []

    def observer(event):
        if event.get("log_failure") is not None or event.get("log_level", LogLevel.info) >= LogLevel.error:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, 0.02, lambda: None)
    return True


# -- plain TCP: sendfile ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_big_file_with_treq_uses_sendfile(proxy, big_payload, errors):
    (proxy.vfolder / "big.bin").write_bytes(big_payload)
    before = producers.stats["sendfile_responses"], producers.stats["sendfile_bytes"]
    response = await treq.get(proxy.url("big.bin"))
    body = await response.content()
    assert response.code == 200
    assert hashlib.sha256(body).digest() == hashlib.sha256(big_payload).digest()
    assert producers.stats["sendfile_responses"] == before[0] + 1
    assert producers.stats["sendfile_bytes"] == before[1] + BIG
    assert not errors


@pytest_twisted.ensureDeferred
async def test_range_over_sendfile(proxy, big_payload):
    (proxy.vfolder / "big.bin").write_bytes(big_payload)
    start, end = 5_000_001, 40_000_000
    response = await treq.get(proxy.url("big.bin"), headers={"Range": f"bytes={start}-{end}"})
    body = await response.content()
    assert response.code == 206
    assert response.headers.getRawHeaders("content-range") == [f"bytes {start}-{end}/{BIG}"]
    assert body == big_payload[start:end + 1]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest_twisted.ensureDeferred
async def test_curl_downloads_two_files_on_one_connection(proxy, big_payload, tmp_path, errors):
    """Keep-alive: the second response's headers must follow the first
    sendfile body on the same socket, in order."""
    (proxy.vfolder / "big.bin").write_bytes(big_payload)
    (proxy.vfolder / "small.txt").write_bytes(b"small file\n")
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    before = producers.stats["sendfile_responses"]
    result = await threads.deferToThread(
        subprocess.run,
        ["curl", "-sS", "--fail", "-o", str(out1), proxy.url("big.bin"), "-o", str(out2), proxy.url("small.txt"),
         "-w", "%{num_connects}\n"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0"]  # the second transfer reused the connection
    assert hashlib.sha256(out1.read_bytes()).digest() == hashlib.sha256(big_payload).digest()
    assert out2.read_bytes() == b"small file\n"
    assert producers.stats["sendfile_responses"] == before + 2
    assert not errors


@pytest.mark.parametrize("spin_ms", [0, producers.SPIN_WAIT_MS])
@pytest_twisted.ensureDeferred
async def test_slow_reader_gets_every_byte(proxy, errors, monkeypatch, spin_ms):
    """A reader slower than the disk fills the socket buffer: sendfile hits
    EAGAIN and the producer waits for writability (briefly in the pool
    thread, then through the reactor), again and again, without losing or
    repeating a byte.  With no spin every wait goes through the reactor."""
    monkeypatch.setattr(producers, "SPIN_WAIT_MS", spin_ms)
    payload = os.urandom(32 << 20)
    (proxy.vfolder / "f.bin").write_bytes(payload)
    waits = producers.stats["sendfile_waits"]

    def slow_client() -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(proxy.request_bytes("f.bin"))
            received = bytearray()
            recvs = 0
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
                recvs += 1
                if recvs % 8 == 0:
                    time.sleep(0.002)
                if recvs % 128 == 0:
                    time.sleep(0.03)  # longer than the pool thread's own wait
                body_at = received.find(b"\r\n\r\n") + 4
                if body_at > 3 and len(received) - body_at >= len(payload):
                    return bytes(received[body_at:])
            return b""

    body = await threads.deferToThread(slow_client)
    assert body == payload
    # One wait flushes the headers; the others are EAGAIN waits.
    assert producers.stats["sendfile_waits"] - waits >= 3
    assert not errors


@pytest_twisted.ensureDeferred
async def test_client_disconnect_mid_download_leaks_nothing(proxy, big_payload, errors):
    (proxy.vfolder / "big.bin").write_bytes(big_payload)
    # Warm up the pool threads and any lazily opened descriptors first.
    await (await treq.get(proxy.url("big.bin"), headers={"Range": "bytes=0-9"})).content()
    baseline = _open_fds()
    for reset in (False, True):
        def leave_early(reset=reset) -> int:
            s = socket.create_connection(("127.0.0.1", proxy.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(proxy.request_bytes("big.bin"))
            got = len(s.recv(65536))
            while got < (1 << 20):
                got += len(s.recv(65536))
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            return got

        got = await threads.deferToThread(leave_early)
        assert got >= 1 << 20
        assert await _wait_for(lambda: _open_fds() <= baseline and not proxy.service.client_site.in_flight), (
            f"descriptors: {_open_fds()} now, {baseline} before"
        )
    assert not errors, [e.get("log_format") for e in errors]
    # The server still serves afterwards.
    response = await treq.get(proxy.url("big.bin"), headers={"Range": "bytes=-4"})
    assert await response.content() == big_payload[-4:]


@pytest_twisted.ensureDeferred
async def test_more_downloads_than_pool_threads(proxy, errors):
    """24 concurrent downloads on a 4-thread pool: a download waiting for its
    client holds no thread for long, so all of them finish, byte-exact."""
    payload = os.urandom(8 << 20)
    (proxy.vfolder / "f.bin").write_bytes(payload)
    digest = hashlib.sha256(payload).digest()

    async def one():
        response = await treq.get(proxy.url("f.bin"))
        return hashlib.sha256(await response.content()).digest()

    results = await gatherResults([Deferred.fromCoroutine(one()) for _ in range(24)])
    assert results == [digest] * 24
    assert not errors


@pytest.mark.parametrize("archive", [False, True], ids=["sendfile", "zip"])
@pytest_twisted.ensureDeferred
async def test_a_stalled_client_is_cut_off(proxy, monkeypatch, errors, archive):
    """A client that stops reading (but stays connected) loses the download
    after the idle timeout; its descriptors are released."""
    monkeypatch.setattr(producers, "IDLE_TIMEOUT", 0.5)
    (proxy.vfolder / "d").mkdir()
    (proxy.vfolder / "d" / "big.bin").write_bytes(os.urandom(48 << 20))
    await (await treq.get(proxy.url("d/big.bin"), headers={"Range": "bytes=0-9"})).content()
    baseline = _open_fds()
    aborts = producers.stats["idle_aborts"]
    client = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        target = "d" if archive else "d/big.bin"
        query = "&archive=true" if archive else ""
        request = proxy.request_bytes(target).replace(b" HTTP/1.1", query.encode() + b" HTTP/1.1", 1)
        client.sendall(request)
        first = await threads.deferToThread(client.recv, 65536)
        assert first.startswith(b"HTTP/1.1 200")
        assert await _wait_for(lambda: producers.stats["idle_aborts"] > aborts)
        assert await _wait_for(lambda: _open_fds() <= baseline + 1)  # + the client's own socket
    finally:
        client.close()
    assert not errors


@pytest_twisted.ensureDeferred
async def test_directory_zip_over_a_socket(proxy):
    (proxy.vfolder / "d" / "sub").mkdir(parents=True)
    payload = os.urandom(3 << 20)
    (proxy.vfolder / "d" / "sub" / "x.bin").write_bytes(payload)
    (proxy.vfolder / "d" / "y.txt").write_bytes(b"y")
    response = await treq.get(proxy.url("d", archive="true"))
    body = await response.content()
    assert response.code == 200
    assert response.length == len(body)
    zf = zipfile.ZipFile(io.BytesIO(body))
    assert zf.testzip() is None
    assert zf.read("sub/x.bin") == payload


# -- TLS: the pread fallback ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls_falls_back_to_pread(tls_proxy, tmp_path, errors):
    payload = os.urandom(8 << 20)
    (tls_proxy.vfolder / "f.bin").write_bytes(payload)
    before = producers.stats["pread_responses"], producers.stats["sendfile_responses"]
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = tmp_path / "out"
    result = await threads.deferToThread(
        subprocess.run, ["curl", "-sSk", "--fail", "-o", str(out), tls_proxy.url("f.bin")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == payload
    assert producers.stats["pread_responses"] == before[0] + 1
    assert producers.stats["sendfile_responses"] == before[1]
    assert not errors
