"""Connection limits and timeouts of the real daemon (storage.web.connections):
a connection over a listener's limit, in total or from one client address,
gets a complete 503 problem+json and is closed; a request whose headers
dribble in gets 408; an idle keep-alive connection is closed; an upload body
slower than the header timeout is not cut; ``/metrics`` counts all of it."""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
import requests

from storage.vfid import VFolderID

MiB = 1 << 20


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.settimeout(10)
    return sock


def _read_all(sock: socket.socket, limit: float = 10.0) -> bytes:
    """Everything the server sends until it closes (bounded in time)."""
    deadline = time.monotonic() + limit
    chunks = []
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def _is_served(port: int, source: str = "127.0.0.1") -> bool:
    sock = _connect(port, source)
    try:
        sock.sendall(b"OPTIONS /upload HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
        status, _, _ = _response(_read_all(sock))
        return status == 204
    finally:
        sock.close()


def _metrics(daemon) -> str:
    r = requests.get(daemon.manager_url + "/metrics", timeout=10,
                     headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    assert r.status_code == 200, r.text
    return r.text


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_connection_over_the_total_limit_gets_503_and_a_freed_slot_is_served_again(storage_proxy_factory):
    daemon = storage_proxy_factory(extra_config={"api": {"client": {"max-connections": 3}}})
    held = [_connect(daemon.client_port) for _ in range(3)]
    try:
        assert _wait_until(lambda: _metric(_metrics(daemon), "storage_proxy_connections_open", api="client") == 3)
        over = _connect(daemon.client_port)
        status, headers, body = _response(_read_all(over))
        over.close()
        assert status == 503
        assert headers["content-type"] == "application/problem+json"
        assert headers["retry-after"] == "1"
        problem = json.loads(body)
        assert problem["error_code"] == "storage-proxy_check-limit_unavailable"
        assert "3 connections" in json.dumps(problem)
        held.pop().close()
        assert _wait_until(lambda: _is_served(daemon.client_port))
        text = _metrics(daemon)
        assert _metric(text, "storage_proxy_connections_refused_total", api="client", reason="total") >= 1
        assert _metric(text, "storage_proxy_connections_limit", api="client") == 3
        # The manager API has its own limit: it still answers while the client API is full.
        assert _metric(text, "storage_proxy_connections_refused_total", api="manager", reason="total") == 0
    finally:
        for sock in held:
            sock.close()


def test_one_client_address_cannot_take_every_connection(storage_proxy_factory):
    daemon = storage_proxy_factory(extra_config={"api": {"client": {"max-connections-per-address": 2}}})
    held = [_connect(daemon.client_port, "127.0.0.1") for _ in range(2)]
    try:
        assert _wait_until(lambda: _metric(_metrics(daemon), "storage_proxy_connections_open", api="client") == 2)
        over = _connect(daemon.client_port, "127.0.0.1")
        status, _, body = _response(_read_all(over))
        over.close()
        assert status == 503
        assert "127.0.0.1" in json.dumps(json.loads(body))
        assert _is_served(daemon.client_port, "127.0.0.2")  # another client is not refused
        text = _metrics(daemon)
        assert _metric(text, "storage_proxy_connections_refused_total", api="client", reason="per-address") == 1
    finally:
        for sock in held:
            sock.close()


def test_headers_that_dribble_in_get_408_but_a_slow_body_is_not_cut(storage_proxy_factory):
    daemon = storage_proxy_factory(extra_config={"api": {"client": {"request-header-timeout": "1s"}}})
    # Nothing at all after the connect.
    silent = _connect(daemon.client_port)
    start = time.monotonic()
    status, _, body = _response(_read_all(silent))
    silent.close()
    assert status == 408 and 0.8 < time.monotonic() - start < 8
    assert json.loads(body)["error_code"] == "storage-proxy_request_timeout"
    # A header line every 0.3 s: each byte resets twisted.web's idle timer, not this deadline.
    slow = _connect(daemon.client_port)
    slow.sendall(b"OPTIONS /upload HTTP/1.1\r\nHost: proxy\r\n")
    start = time.monotonic()
    got = b""
    for i in range(30):
        try:
            slow.sendall(b"X-Slow-%d: x\r\n" % i)
        except OSError:
            break
        time.sleep(0.3)
        slow.setblocking(False)
        try:
            got += slow.recv(65536)
        except BlockingIOError:
            pass
        except OSError:
            break
        finally:
            slow.setblocking(True)
        if got:
            break
    got += _read_all(slow, 5)
    slow.close()
    assert _response(got)[0] == 408
    assert time.monotonic() - start < 6

    # An upload body sent over ~2.5 s (headers at once) completes.
    vfid = VFolderID.parse(f"user:{uuid.uuid4()}/{uuid.uuid4().hex}")
    auth = {"X-BackendAI-Storage-Auth-Token": daemon.manager_secret}
    r = requests.post(daemon.manager_url + "/folder/create", json={"volume": "local", "vfid": str(vfid)},
                      headers=auth, timeout=10)
    assert r.status_code in (200, 201, 204), r.text
    size = 5 * 64 * 1024
    r = requests.post(daemon.manager_url + "/folder/file/upload", headers=auth, timeout=10,
                      json={"volume": "local", "vfid": str(vfid), "relpath": "slow.bin", "size": size})
    assert r.status_code == 200, r.text
    data = bytes(range(256)) * (size // 256)

    token = r.json()["token"]
    sock = _connect(daemon.client_port)
    sock.sendall(
        f"PATCH /upload?token={token} HTTP/1.1\r\nHost: proxy\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
    )
    for i in range(0, size, 64 * 1024):
        time.sleep(0.5)
        sock.sendall(data[i:i + 64 * 1024])
    status, headers, _ = _response(_read_all(sock))
    sock.close()
    assert status == 204 and headers["upload-offset"] == str(size)
    assert (daemon.volume_path("local") / vfid.relative_path() / "slow.bin").read_bytes() == data
    text = _metrics(daemon)
    assert _metric(text, "storage_proxy_connections_timed_out_total", api="client", phase="headers") == 2


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(storage_proxy_factory):
    daemon = storage_proxy_factory(extra_config={"api": {"client": {"idle-timeout": "1s"}}})
    sock = _connect(daemon.client_port)
    sock.sendall(b"OPTIONS /upload HTTP/1.1\r\nHost: proxy\r\n\r\n")
    start = time.monotonic()
    raw = _read_all(sock)  # the 204, then the close when the idle timeout ends the connection
    sock.close()
    assert _response(raw)[0] == 204
    assert 0.8 < time.monotonic() - start < 8


@pytest.mark.parametrize("key, value, message", [
    ("max-connections", 0, "must be at least 1"),
    ("max-connections-per-address", -1, "must be at least 0"),
    ("idle-timeout", "soon", "idle-timeout"),
    ("request-header-timeout", 0, "must be more than 0"),
])
def test_an_invalid_limit_is_one_line_naming_its_key(storage_proxy_factory, key, value, message):
    daemon = storage_proxy_factory(start=False, extra_config={"api": {"client": {key: value}}})
    result = daemon.run_to_completion()
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if f"[api.client] {key}" in line]
    assert errors and message in errors[0], result.stdout + result.stderr
