"""The daemon's life: graceful stop with a request in flight, and start-up
failures that say what is wrong in one line (no traceback)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import time
import uuid
from pathlib import Path

from support.daemon import CLEAN_EXIT, StorageProxyProcess

from storage.vfid import VFolderID

FILE_SIZE = 32 << 20


def manager_call(daemon: StorageProxyProcess, method: str, path: str, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=30)
    conn.request(method, path, body=json.dumps(body),
                 headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_sigterm_lets_an_inflight_fetch_finish(storage_proxy: StorageProxyProcess) -> None:
    daemon = storage_proxy
    vfid = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
    assert manager_call(daemon, "POST", "/folder/create", {"volume": "local", "vfid": vfid})[0] == 204
    payload = os.urandom(1 << 20) * (FILE_SIZE >> 20)
    (daemon.volume_path("local") / VFolderID.parse(vfid).relative_path() / "big.bin").write_bytes(payload)

    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=30)
    conn.request("POST", "/folder/file/fetch",
                 body=json.dumps({"volume": "local", "vfid": vfid, "relpath": "big.bin"}),
                 headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type") == "application/octet-stream"
    head = response.read(64 * 1024)  # the server is now paused on our full socket

    daemon.terminate()
    time.sleep(0.5)
    # The listener is closed at once: new connections are refused...
    with socket.socket() as probe:
        probe.settimeout(5)
        assert probe.connect_ex(("127.0.0.1", daemon.manager_port)) != 0
    # ...while the request in flight runs to its end.
    rest = response.read()
    conn.close()
    assert hashlib.sha256(head + rest).digest() == hashlib.sha256(payload).digest()
    assert daemon.wait(timeout=20) in CLEAN_EXIT
    assert "Server Shut Down." in daemon.log
    assert "Traceback" not in daemon.log


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_a_port_in_use_fails_fast_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = StorageProxyProcess(
            tmp_path, extra_config={"api": {"manager": {"service-addr": {"host": "127.0.0.1", "port": port}}}}
        )
        started = time.monotonic()
        result = daemon.run_to_completion()
    assert time.monotonic() - started < 15
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    line = one_line(result.stderr)
    assert "manager API" in line and str(port) in line and "in use" in line


def test_an_invalid_config_value_names_the_key(tmp_path: Path) -> None:
    daemon = StorageProxyProcess(tmp_path, extra_config={"storage-proxy": {"scandir-limit": "lots"}})
    result = daemon.run_to_completion()
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    line = one_line(result.stderr)
    assert "[storage-proxy] scandir-limit" in line and "'lots'" in line


def test_an_unknown_backend_names_the_key(tmp_path: Path) -> None:
    daemon = StorageProxyProcess(tmp_path, extra_config={"volume": {"local": {"backend": "floppy"}}})
    result = daemon.run_to_completion()
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "[volume.local] backend" in one_line(result.stderr)


def test_a_client_leaving_mid_fetch_is_harmless(storage_proxy: StorageProxyProcess) -> None:
    daemon = storage_proxy
    vfid = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
    assert manager_call(daemon, "POST", "/folder/create", {"volume": "local", "vfid": vfid})[0] == 204
    (daemon.volume_path("local") / VFolderID.parse(vfid).relative_path() / "big.bin").write_bytes(
        b"z" * FILE_SIZE)
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=30)
        conn.request("POST", "/folder/file/fetch",
                     body=json.dumps({"volume": "local", "vfid": vfid, "relpath": "big.bin"}),
                     headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
        response = conn.getresponse()
        assert response.read(1024) == b"z" * 1024
        conn.sock.close()  # leave without reading the rest
        conn.close()
    time.sleep(0.5)
    status, body = manager_call(daemon, "GET", "/folder/usage", {"volume": "local", "vfid": vfid})
    assert status == 200 and json.loads(body)["used_bytes"] >= FILE_SIZE
    assert daemon.stop() in CLEAN_EXIT
    assert "Traceback" not in daemon.log and "Unhandled" not in daemon.log, daemon.log[-3000:]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_fetch_memory_is_bounded_for_a_slow_reader(storage_proxy: StorageProxyProcess) -> None:
    """A 512 MiB (sparse) file fetched by a reader that takes its time: the
    daemon reads ahead only as far as the socket lets it (backpressure)."""
    daemon = storage_proxy
    assert daemon.pid is not None and os.path.exists(f"/proc/{daemon.pid}/status")
    vfid = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
    assert manager_call(daemon, "POST", "/folder/create", {"volume": "local", "vfid": vfid})[0] == 204
    size = 512 << 20
    with open(daemon.volume_path("local") / VFolderID.parse(vfid).relative_path() / "sparse.bin", "wb") as f:
        f.truncate(size)
    before = rss_bytes(daemon.pid)
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=60)
    conn.request("POST", "/folder/file/fetch",
                 body=json.dumps({"volume": "local", "vfid": vfid, "relpath": "sparse.bin"}),
                 headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    response = conn.getresponse()
    assert response.status == 200
    received = len(response.read(1 << 20))
    peak = 0
    for _ in range(10):  # stall: an unbounded server would buffer the whole file now
        time.sleep(0.1)
        peak = max(peak, rss_bytes(daemon.pid))
    while chunk := response.read(4 << 20):
        received += len(chunk)
    peak = max(peak, rss_bytes(daemon.pid))
    conn.close()
    assert received == size
    assert peak - before < 64 << 20, f"RSS grew by {(peak - before) >> 20} MiB"
