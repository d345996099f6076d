"""Start the real daemon, ``twistd -n storage-proxy``, as a subprocess.

``StorageProxyProcess`` writes a TOML config into a directory (vfs volumes
under it, loopback port 0 for both APIs, known secrets, plus whatever the
caller merges in), starts twistd, and reads the bound ports from the log
lines ``storage.tap`` writes ("manager API listening on HOST:PORT").  It is
synchronous on purpose: fixtures call it before a test's reactor work starts,
and a start takes well under a second.

The daemon is started with ``Path(storage.__file__).parent.parent`` first on
``PYTHONPATH``, so the installed package (or the source tree when it is an
editable install) and its ``twisted/plugins/storage_proxy.py`` are the ones
that run.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

import storage

MANAGER_SECRET = "test-manager-secret-0123456789abcdef"
SECRET = "test-client-secret-0123456789abcdefgh"

_LISTEN_RE = re.compile(r"(manager|client) API listening on (\S+):(\d+)")

# twistd itself (not `python -m twisted`, which is the `twist` runner).
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


# twistd re-raises the signal that stopped it once its shutdown is complete,
# so a clean stop on SIGTERM exits with -SIGTERM (0 if the tap clears it).
CLEAN_EXIT = (0, -signal.SIGTERM)


class DaemonError(Exception):
    """The daemon did not start (its output is in the message)."""


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def daemon_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    source_root = str(Path(storage.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra_env or {})
    return env


def base_config(workdir: Path, volumes: tuple[str, ...] = ("local",), manager_port: int = 0,
                client_port: int = 0) -> dict[str, Any]:
    return {
        "storage-proxy": {
            "node-id": "test-proxy",
            "secret": SECRET,
            "scandir-limit": 1000,
            "shutdown-grace": "10s",
        },
        "api": {
            "manager": {
                "service-addr": {"host": "127.0.0.1", "port": manager_port},
                "secret": MANAGER_SECRET,
            },
            "client": {"service-addr": {"host": "127.0.0.1", "port": client_port}},
        },
        "volume": {
            name: {"backend": "vfs", "path": str(workdir / "volumes" / name)} for name in volumes
        },
        "logging": {"level": "INFO"},
    }


def run_twistd(workdir: Path, config_path: Path, timeout: float = 20.0,
               extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the daemon to completion (for configs that must make it fail at start)."""
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "storage-proxy", "--config", str(config_path)],
        cwd=workdir, env=daemon_env(extra_env), capture_output=True, text=True, timeout=timeout,
    )


class StorageProxyProcess:
    """One daemon; ``start()`` it, drive ``manager_url``/``client_url``, ``stop()`` it."""

    def __init__(
        self,
        workdir: Path,
        *,
        volumes: tuple[str, ...] = ("local",),
        extra_config: dict[str, Any] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.volumes = volumes
        self.extra_config = extra_config or {}
        self.extra_env = extra_env
        self.manager_secret = MANAGER_SECRET
        self.secret = SECRET
        self.config_path = self.workdir / "storage-proxy.toml"
        self.stdout_path = self.workdir / "daemon.stdout"
        self.stderr_path = self.workdir / "daemon.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        self.manager_port = 0
        self.client_port = 0
        self.returncode: int | None = None
        for name in volumes:
            self.volume_path(name).mkdir(parents=True, exist_ok=True)

    # -- what tests use ---------------------------------------------------

    @property
    def manager_url(self) -> str:
        return f"http://127.0.0.1:{self.manager_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def volume_path(self, name: str = "local") -> Path:
        return self.workdir / "volumes" / name

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def log(self) -> str:
        """Everything the daemon wrote (twistd -n logs to stdout)."""
        return self.stdout + self.stderr

    def config(self) -> dict[str, Any]:
        cfg = base_config(self.workdir, self.volumes, self.manager_port, self.client_port)
        return deep_merge(cfg, self.extra_config)

    def write_config(self) -> Path:
        self.config_path.write_text(tomli_w.dumps(self.config()))
        return self.config_path

    def run_to_completion(self, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run the daemon in the foreground until it exits (for start-up failures)."""
        return run_twistd(self.workdir, self.write_config(), timeout, self.extra_env)

    # -- lifecycle --------------------------------------------------------

    def start(self, timeout: float = 20.0) -> StorageProxyProcess:
        if self.process is not None and self.process.poll() is None:
            raise DaemonError("already running")
        self.write_config()
        self.returncode = None
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            start_offset = out.tell()
            self.process = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "storage-proxy", "--config", str(self.config_path)],
                cwd=self.workdir, env=daemon_env(self.extra_env), stdout=out, stderr=err,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        ports: dict[str, int] = {}
        while time.monotonic() < deadline:
            text = self.stdout_path.read_bytes()[start_offset:].decode(errors="replace")
            for label, _host, port in _LISTEN_RE.findall(text):
                ports[label] = int(port)
            if len(ports) == 2:
                self.manager_port, self.client_port = ports["manager"], ports["client"]
                return self
            if self.process.poll() is not None:
                self.returncode = self.process.returncode
                raise DaemonError(f"storage-proxy exited with {self.returncode} at start:\n{self.log}")
            time.sleep(0.02)
        self.kill()
        raise DaemonError(f"storage-proxy did not report its ports within {timeout}s:\n{self.log}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it does not exit in time; returns the exit status."""
        if self.process is None:
            return self.returncode
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.returncode = self.process.returncode
        self.process = None
        return self.returncode

    def terminate(self) -> None:
        """Send SIGTERM without waiting (for tests of the graceful stop)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        self.returncode = self.process.wait(timeout)
        return self.returncode

    def kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.returncode = self.process.returncode
        self.process = None

    def restart(self, timeout: float = 20.0) -> StorageProxyProcess:
        """Stop and start again with the same config and the same ports."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> StorageProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
