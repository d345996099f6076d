"""Shared helpers of the benchmarks (not tests): start the real daemon, read
a process's CPU time, RSS and I/O from /proc, prepare the page cache, time
curl, and summarise repetitions.

Import from a benchmark script run as ``python bench/<name>.py``: this
directory is then first on ``sys.path``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import storage

GiB = 1 << 30
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
MANAGER_SECRET = "bench-manager-secret-0123456789abcdef"
SECRET = "bench-client-secret-0123456789abcdef0"
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
_LISTEN_RE = re.compile(r"(manager|client) API listening on (\S+):(\d+)")


# -- /proc ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live children (e.g. nginx master + workers)."""
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def tree_rss_bytes(pid: int) -> int:
    """The RSS of ``pid`` and its children (a daemon and its num-proc workers)."""
    total = rss_bytes(pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                total += rss_bytes(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return total


def peak_rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmHWM") * 1024


def io_bytes(pid: int) -> dict[str, int]:
    """/proc/PID/io: read_bytes, write_bytes... (needs the same user or root)."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


# -- files and the page cache -------------------------------------------------------


def write_payload(path: Path, size: int) -> None:
    """A file of ``size`` bytes that no filesystem can compress or dedupe."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])
        f.write(block[: size % MiB])


def warm(path: Path) -> None:
    """Read a file once so it sits in the page cache for every contender."""
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def scratch_write(directory: Path, size: int) -> None:
    """Write and delete a scratch file of ``size`` bytes, so the next timed
    write meets the page cache in the same state as the others did."""
    path = directory / f".scratch-{uuid.uuid4().hex}"
    block = b"\xa5" * MiB
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    path.unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the daemon -------------------------------------------------------------------------


class Daemon:
    """``twistd -n storage-proxy`` with a generated config: one vfs volume
    ``local`` under ``workdir``, loopback ports chosen by the kernel."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, io_threads: int = 16,
                 extra: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.extra = extra or {}
        self.volume = workdir / "volume"
        self.volume.mkdir(parents=True, exist_ok=True)
        self.env = env or {}
        self.io_threads = io_threads
        self.process: subprocess.Popen[bytes] | None = None
        self.manager_port = self.client_port = 0

    def start(self, timeout: float = 30.0) -> Daemon:
        import tomli_w

        config = {
            "storage-proxy": {"node-id": "bench", "secret": SECRET, "io-threads": self.io_threads},
            "api": {
                "manager": {"service-addr": {"host": "127.0.0.1", "port": 0}, "secret": MANAGER_SECRET},
                "client": {"service-addr": {"host": "127.0.0.1", "port": 0}},
            },
            "volume": {"local": {"backend": "vfs", "path": str(self.volume)}},
            "logging": {"level": "WARNING"},
        }
        for section, values in self.extra.items():
            _merge(config.setdefault(section, {}), values)
        path = self.workdir / "storage-proxy.toml"
        path.write_text(tomli_w.dumps(config))
        env = dict(os.environ)
        root = str(Path(storage.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.update(self.env)
        self.log_path = self.workdir / "daemon.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "storage-proxy", "--config", str(path)],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = {label: int(port) for label, _, port in _LISTEN_RE.findall(self.log_path.read_text())}
            if len(ports) == 2:
                self.manager_port, self.client_port = ports["manager"], ports["client"]
                return self
            if self.process.poll() is not None:
                raise SystemExit(f"the daemon exited at start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.stop()
        raise SystemExit(f"the daemon did not start in {timeout}s:\n{self.log_path.read_text()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def manager(self, method: str, path: str, body: dict[str, Any]) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.manager_port, timeout=60)
        try:
            conn.request(method, path, json.dumps(body).encode(),
                         {"X-BackendAI-Storage-Auth-Token": MANAGER_SECRET, "Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status >= 300:
            raise SystemExit(f"manager {method} {path}: {response.status} {data[:300]!r}")
        return json.loads(data) if data else None

    def create_vfolder(self) -> tuple[str, Path]:
        """A new vfolder through the manager API: its vfid and its directory."""
        vfid = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
        self.manager("POST", "/folder/create", {"volume": "local", "vfid": vfid})
        mount = self.manager("GET", "/folder/mount", {"volume": "local", "vfid": vfid})
        return vfid, Path(mount["path"])

    def upload_tokens(self, vfid: str, files: list[tuple[str, int]]) -> list[str]:
        """Upload tokens for (relpath, size) pairs, over one keep-alive connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.manager_port, timeout=60)
        tokens = []
        try:
            for relpath, size in files:
                body = {"volume": "local", "vfid": vfid, "relpath": relpath, "size": size}
                conn.request("POST", "/folder/file/upload", json.dumps(body).encode(),
                             {"X-BackendAI-Storage-Auth-Token": MANAGER_SECRET, "Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    raise SystemExit(f"manager upload token: {response.status} {data[:300]!r}")
                tokens.append(json.loads(data)["token"])
        finally:
            conn.close()
        return tokens

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def _merge(into: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


# -- timing --------------------------------------------------------------------------


@dataclass
class Transfer:
    seconds: float
    nbytes: int
    cpu: float  # server CPU-seconds spent during the transfer

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / (self.nbytes / GiB)


def curl_get(url: str, server_cpu: Any, extra: list[str] | None = None) -> Transfer:
    """``curl -o /dev/null`` the URL; ``server_cpu()`` is read before and after."""
    before = server_cpu()
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", *(extra or []), url],
        capture_output=True, text=True,
    )
    after = server_cpu()
    if result.returncode != 0:
        raise SystemExit(f"curl {url}: {result.stderr.strip()}")
    seconds, nbytes = result.stdout.split()
    return Transfer(float(seconds), int(nbytes), after - before)


def median(values: list[float]) -> float:
    return statistics.median(values)
