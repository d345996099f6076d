"""Replicas over one shared volume, behind a real HAProxy (Debian's ``/usr/sbin/haproxy``).

``HAProxy(workdir, clients=[...], managers=[...]).start()`` balances two
frontends round robin without stickiness over the daemons' client and
manager ports, tells in ``X-Served-By`` which server answered, checks the
servers every 200 ms and re-dispatches a request whose server refuses the
connection (a replica just killed) to another one.

``replica(factory, shared, node_id, ...)`` starts one daemon whose volume
``local`` is ``shared`` (a directory every replica sees: a local dir, or
each replica its own ceph-fuse mount of one CephFS) under its own node id.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from support.redis import free_port

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
HAPROXY_SKIP = "haproxy is not installed (Debian package haproxy, see scripts/system-packages)"
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason=HAPROXY_SKIP)


class HAProxy:
    def __init__(self, workdir: Path, clients: list[tuple[str, int]], managers: list[tuple[str, int]]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.clients = clients
        self.managers = managers
        self.client_port = free_port()
        self.manager_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def config(self) -> str:
        def backend(name: str, servers: list[tuple[str, int]]) -> str:
            lines = [f"backend {name}", "    balance roundrobin",
                     "    http-response set-header X-Served-By %s"]
            lines += [f"    server {n} 127.0.0.1:{p} check inter 200ms fall 1 rise 1" for n, p in servers]
            return "\n".join(lines)

        return "\n".join([
            "global",
            "    maxconn 4000",
            "defaults",
            "    mode http",
            "    timeout connect 1s",
            "    timeout client 120s",
            "    timeout server 120s",
            "    retries 3",
            "    option redispatch 1",
            f"frontend client\n    bind 127.0.0.1:{self.client_port}\n    default_backend client",
            backend("client", self.clients),
            f"frontend manager\n    bind 127.0.0.1:{self.manager_port}\n    default_backend manager",
            backend("manager", self.managers),
            "",
        ])

    def start(self, timeout: float = 10.0) -> HAProxy:
        assert HAPROXY is not None, HAPROXY_SKIP
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(self.config())
        log = open(self.workdir / "haproxy.log", "ab")
        self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited: {(self.workdir / 'haproxy.log').read_text()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=2)
                conn.request("OPTIONS", "/upload")
                if conn.getresponse().status == 204:
                    conn.close()
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("haproxy did not answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def replica(factory: Any, shared: Path, node_id: str, redis: Any = None, backend: str = "vfs",
            extra: dict[str, Any] | None = None, start: bool = True) -> Any:
    config: dict[str, Any] = {
        "storage-proxy": {"node-id": node_id},
        "volume": {"local": {"backend": backend, "path": str(shared)}},
        "logging": {"level": "INFO"},
    }
    if redis is not None:
        config["redis"] = {"addr": redis.addr}
    for key, value in (extra or {}).items():
        config.setdefault(key, {}).update(value)
    return factory(extra_config=config, start=start)


def manager_call(port: int, secret: str, path: str, body: dict[str, Any], method: str = "POST") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=json.dumps(body), headers={"X-BackendAI-Storage-Auth-Token": secret})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (json.loads(data) if data else None)


def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition", step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")
