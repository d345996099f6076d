"""A real ``redis-server`` on a loopback port, and a tiny synchronous RESP client.

``RedisServer(workdir).start()`` runs redis-server (no persistence) on a free
port; ``stop()``/``start()`` again keep the port, so a daemon configured
with it reconnects.  ``REDIS_SERVER`` is None when the binary is missing
(tests skip, naming the Debian package).  ``RespClient`` speaks just enough
RESP2 for the tests to read what the daemon wrote (XRANGE, GET, SUBSCRIBE).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
)
# The event bus's fault tests take seconds each (restarts, outages, thousands of
# files): the default envs skip them; `tox -e events` (scripts/test) runs them.
FAULT_SUITE = pytest.mark.skipif(
    not os.environ.get("STORAGE_PROXY_EVENT_FAULTS"),
    reason="the event-bus fault suite runs in tox -e events (STORAGE_PROXY_EVENT_FAULTS=1)",
)
SKIP_REASON = "redis-server is not installed (Debian package redis-server, see scripts/system-packages)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert REDIS_SERVER is not None, SKIP_REASON
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        log = open(self.workdir / "redis.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.client() as c:
                    if c.command("PING") in (b"PONG", "PONG"):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()}")
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def client(self, db: int = 4) -> RespClient:
        return RespClient(self.port, db=db, password=self.password)


class RespClient:
    def __init__(self, port: int, db: int = 0, password: str | None = None, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        if password:
            self.command("AUTH", password)
        if db:
            self.command("SELECT", str(db))

    def __enter__(self) -> RespClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, *args: str | bytes) -> None:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))

    def command(self, *args: str | bytes) -> Any:
        self.send(*args)
        reply = self.read()
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisReplyError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise ValueError(f"unexpected RESP reply {line!r}")


class RedisReplyError(Exception):
    pass


def stream_entries(client: RespClient, stream: str = "events") -> list[dict[bytes, bytes]]:
    """Every entry of ``stream`` as a field -> value dict, oldest first."""
    out = []
    for _id, flat in client.command("XRANGE", stream, "-", "+"):
        out.append({flat[i]: flat[i + 1] for i in range(0, len(flat), 2)})
    return out
