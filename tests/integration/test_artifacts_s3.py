"""The /v1 object-storage routes against a REAL S3 (Ceph's radosgw).

Needs ``RGW_ENDPOINT``, ``RGW_ACCESS_KEY`` and ``RGW_SECRET_KEY`` (from
``../shared/cephfs/rgw-up.sh``; ``.ci/cephfs-tests`` brings it up); skipped
without them.  Presigned URLs are used by plain curl.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import StorageProxyProcess

pytestmark = [
    pytest.mark.rgw,
    pytest.mark.skipif(not os.environ.get("RGW_ENDPOINT"), reason="no radosgw: set RGW_ENDPOINT/RGW_ACCESS_KEY/"
                       "RGW_SECRET_KEY (../shared/cephfs/rgw-up.sh)"),
]

BOUNDARY = "s3-test-boundary-7e1"
MP = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def s3_client() -> Any:
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=os.environ["RGW_ENDPOINT"], region_name="us-east-1",
        aws_access_key_id=os.environ["RGW_ACCESS_KEY"], aws_secret_access_key=os.environ["RGW_SECRET_KEY"],
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CuttableProxy:
    """A loopback TCP relay in front of radosgw; ``cut()`` drops every connection
    and refuses new ones (radosgw gone mid-transfer), ``restore()`` undoes it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_now = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_now.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.cut_now.set()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.shutdown(socket.SHUT_RDWR)  # wakes the relay threads blocked in recv
                c.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.cut_now.clear()


RELAY: CuttableProxy | None = None


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StorageProxyProcess, str]]:
    global RELAY
    bucket = f"art-{uuid.uuid4().hex[:12]}"
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    endpoint = os.environ["RGW_ENDPOINT"]
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    relay = RELAY = CuttableProxy((parts.hostname or "127.0.0.1", parts.port or 80))
    good = {"endpoint": endpoint, "access-key": os.environ["RGW_ACCESS_KEY"],
            "secret-key": os.environ["RGW_SECRET_KEY"], "region": "us-east-1", "buckets": [bucket, "no-such-bucket-here"]}
    daemon = StorageProxyProcess(tmp_path_factory.mktemp("s3") / "proxy", extra_config={"artifact-storages": {
        "rgw": {"type": "object_storage", "object-storage": good},
        "badcreds": {"type": "object_storage", "object-storage": dict(good, **{"secret-key": "wrong-secret-0123456789"})},
        "flaky": {"type": "object_storage", "object-storage": dict(good, endpoint=f"http://127.0.0.1:{relay.port}")},
        "down": {"type": "object_storage",
                 "object-storage": dict(good, endpoint=f"http://127.0.0.1:{closed_port()}")},
    }})
    daemon.start()
    yield daemon, bucket
    daemon.stop(timeout=10)
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)
    assert os.environ["RGW_SECRET_KEY"] not in daemon.log
    assert "wrong-secret-0123456789" not in daemon.log


def call(daemon: StorageProxyProcess, method: str, path: str, body: object = None, *,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=120)
    hdrs = {"X-BackendAI-Storage-Auth-Token": daemon.manager_secret, **(headers or {})}
    conn.request(method, path, body=raw if raw is not None else json.dumps(body).encode(), headers=hdrs)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def form(content: bytes, fields: dict[str, str]) -> bytes:
    out = b""
    for k, v in fields.items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'.encode()
    return out + content + f"\r\n--{BOUNDARY}--\r\n".encode()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=60)


def test_every_object_route(proxy: tuple[StorageProxyProcess, str], tmp_path: Path) -> None:
    daemon, bucket = proxy
    base = f"/v1/storages/s3/rgw/buckets/{bucket}/object"
    key = f"models/{uuid.uuid4().hex}/config.json"
    content = os.urandom(100_000)
    status, _, body = call(daemon, "POST", base + "/upload", raw=form(content, {"key": key}),
                           headers={**MP, "X-Content-Type": "application/json"})
    assert status == 204, body

    status, headers, body = call(daemon, "GET", base + "/meta", {"key": key})
    assert status == 200, body
    meta = json.loads(body)
    assert meta["content_length"] == len(content) and meta["content_type"] == "application/json"
    assert meta["etag"] and meta["last_modified"]
    assert set(meta) == {"content_length", "content_type", "last_modified", "etag", "metadata"}

    status, headers, body = call(daemon, "POST", base + "/download", {"key": key})
    assert status == 200 and body == content
    assert headers["content-type"] == "application/octet-stream"

    status, _, body = call(daemon, "POST", base + "/presigned/download", {"key": key, "expiration": 120})
    assert status == 200
    url = json.loads(body)["url"]
    out = tmp_path / "got"
    assert curl("-f", "-o", str(out), url).returncode == 0
    assert out.read_bytes() == content
    assert curl("-f", "-o", "/dev/null", url.replace("Signature=", "Signature=0")).returncode != 0  # tampered

    up_key = f"uploads/{uuid.uuid4().hex}.bin"
    status, _, body = call(daemon, "POST", base + "/presigned/upload", {"key": up_key})
    assert status == 200
    post = json.loads(body)
    assert set(post) == {"url", "fields"} and post["fields"]["key"] == up_key
    src = tmp_path / "src"
    src.write_bytes(os.urandom(50_000))
    args = [a for k, v in post["fields"].items() for a in ("-F", f"{k}={v}")]
    result = curl("-f", *args, "-F", f"file=@{src}", post["url"])
    assert result.returncode == 0, result.stderr
    status, _, body = call(daemon, "POST", base + "/download", {"key": up_key})
    assert status == 200 and body == src.read_bytes()

    status, _, _ = call(daemon, "DELETE", base, {"key": key})
    assert status == 204
    status, headers, _ = call(daemon, "GET", base + "/meta", {"key": key})
    assert status == 404 and headers["content-type"] == "application/problem+json"

    # A key ending with "/" deletes everything under it.
    prefix = f"tree/{uuid.uuid4().hex}/"
    for name in ("a", "b/c"):
        assert call(daemon, "POST", base + f"/upload?key={prefix}{name}", raw=form(b"x", {}), headers=MP)[0] == 204
    assert call(daemon, "DELETE", base, {"key": prefix})[0] == 204
    assert call(daemon, "GET", base + "/meta", {"key": prefix + "b/c"})[0] == 404


def test_s3_errors_are_problems(proxy: tuple[StorageProxyProcess, str]) -> None:
    daemon, bucket = proxy

    def problem(path: str, body: dict, expected: int, method: str = "GET") -> dict:
        status, headers, payload = call(daemon, method, path, body)
        assert status == expected, payload
        assert headers["content-type"] == "application/problem+json"
        return json.loads(payload)

    problem(f"/v1/storages/s3/rgw/buckets/{bucket}/object/meta", {"key": "no/such/key"}, 404)
    problem(f"/v1/storages/s3/rgw/buckets/{bucket}/object/download", {"key": "no/such/key"}, 404, "POST")
    problem("/v1/storages/s3/rgw/buckets/unlisted/object/meta", {"key": "k"}, 404)
    problem("/v1/storages/s3/rgw/buckets/no-such-bucket-here/object/meta", {"key": "k"}, 404)
    problem("/v1/storages/s3/nope/buckets/x/object/meta", {"key": "k"}, 404)
    problem(f"/v1/storages/s3/rgw/buckets/{bucket}/object/meta", {"key": ""}, 400)
    problem(f"/v1/storages/s3/rgw/buckets/{bucket}/object/presigned/download", {"key": "k", "expiration": 0}, 400, "POST")
    bad = problem(f"/v1/storages/s3/badcreds/buckets/{bucket}/object/meta", {"key": "k"}, 502)
    assert "wrong-secret" not in json.dumps(bad)
    problem(f"/v1/storages/s3/badcreds/buckets/{bucket}/object/download", {"key": "k"}, 502, "POST")
    status, _, payload = call(daemon, "POST", f"/v1/storages/s3/badcreds/buckets/{bucket}/object/upload?key=k",
                              raw=form(b"data", {}), headers=MP)
    assert status == 502, payload
    down = problem(f"/v1/storages/s3/down/buckets/{bucket}/object/meta", {"key": "k"}, 503)
    assert down["title"] == "Object Storage Unavailable"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_large_object_streams_both_ways_with_flat_memory(proxy: tuple[StorageProxyProcess, str]) -> None:
    daemon, bucket = proxy
    size_mib = int(os.environ.get("ARTIFACT_S3_LARGE_MIB", "256"))
    key = f"large/{uuid.uuid4().hex}.bin"
    base = f"/v1/storages/s3/rgw/buckets/{bucket}/object"
    block = os.urandom(1 << 20)
    pid = daemon.pid
    assert pid is not None
    before = _rss_kib(pid)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kib(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big"\r\n\r\n'.encode()
        tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=300)
        conn.putrequest("POST", f"{base}/upload?key={key}")
        conn.putheader("X-BackendAI-Storage-Auth-Token", daemon.manager_secret)
        conn.putheader("Content-Type", MP["Content-Type"])
        conn.putheader("Content-Length", str(len(head) + size_mib * len(block) + len(tail)))
        conn.endheaders()
        conn.send(head)
        for _ in range(size_mib):
            conn.send(block)
        conn.send(tail)
        response = conn.getresponse()
        assert response.status == 204, response.read()
        conn.close()

        after_upload = peak[0]
        head_obj = s3_client().head_object(Bucket=bucket, Key=key)
        assert head_obj["ContentLength"] == size_mib << 20
        assert "-" in head_obj["ETag"]  # it went up as a multipart upload

        conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=300)
        conn.request("POST", f"{base}/download", body=json.dumps({"key": key}),
                     headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
        response = conn.getresponse()
        assert response.status == 200
        digest = hashlib.sha256()
        got = 0
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            got += len(chunk)
        conn.close()
    finally:
        stop.set()
        sampler.join()
    assert got == size_mib << 20
    assert digest.hexdigest() == hashlib.sha256(block * size_mib).hexdigest()
    # Nothing holds the object: the growth stays under its size.  (Measured:
    # 150-230 MiB for 64 MiB to 1.5 GiB objects, a plateau: the pool threads'
    # malloc arenas keep their part-sized buffers; it does not grow with the size.)
    grew = f"daemon RSS grew by {(after_upload - before) >> 10} MiB uploading, {(peak[0] - before) >> 10} MiB in all"
    assert (peak[0] - before) < min(size_mib, 256) * 1024, grew


def test_radosgw_gone_mid_transfer(proxy: tuple[StorageProxyProcess, str]) -> None:
    daemon, bucket = proxy
    assert RELAY is not None
    RELAY.restore()
    base = f"/v1/storages/s3/flaky/buckets/{bucket}/object"
    key = f"flaky/{uuid.uuid4().hex}.bin"
    size = 48 << 20
    s3_client().put_object(Bucket=bucket, Key=key, Body=b"\x5a" * size)

    # A download: radosgw goes away after the first bytes; the client must not
    # mistake what it got for the whole object.
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=30)
    conn.request("POST", base + "/download", body=json.dumps({"key": key}),
                 headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    response = conn.getresponse()
    assert response.status == 200
    got = len(response.read(1 << 20))
    RELAY.cut()
    try:
        while chunk := response.read(1 << 20):
            got += len(chunk)
        complete = True
    except (http.client.IncompleteRead, ConnectionResetError):
        complete = False  # the daemon aborts the response: no short body that looks whole
    conn.close()
    assert not complete or got < size
    assert got < size

    # An upload while it is gone: a clear 5xx problem, nothing written.
    up_key = f"flaky/{uuid.uuid4().hex}.up"
    status, headers, body = call(daemon, "POST", base + f"/upload?key={up_key}",
                                 raw=form(os.urandom(12 << 20), {}), headers=MP)
    assert status in (502, 503, 504), body
    assert headers["content-type"] == "application/problem+json"

    # Back again: the daemon serves, and the failed upload left no object.
    RELAY.restore()
    assert call(daemon, "GET", base + "/meta", {"key": key})[0] == 200
    assert call(daemon, "GET", base + "/meta", {"key": up_key})[0] == 404
