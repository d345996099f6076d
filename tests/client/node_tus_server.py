"""``@tus/server`` + ``@tus/file-store`` (the tus project's own Node server) as a
subprocess on 127.0.0.1, for testing the client against a server nobody here wrote.

The npm packages are installed once into a cache directory outside the repo
(``$STORAGE_PROXY_NODE_CACHE``, default ``~/.cache/storage-proxy-tests/tus-node``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGES = {"@tus/server": "2.4.5", "@tus/file-store": "2.1.1"}

SERVER_JS = """
import { Server } from "@tus/server";
import { FileStore } from "@tus/file-store";

const directory = process.argv[2];
const server = new Server({ path: "/files", datastore: new FileStore({ directory }) });
const listener = server.listen({ host: "127.0.0.1", port: 0 }, () => {
  console.log("LISTENING " + listener.address().port);
});
"""


class NodeUnavailable(Exception):
    pass


def cache_dir() -> Path:
    if os.environ.get("STORAGE_PROXY_NODE_CACHE"):
        return Path(os.environ["STORAGE_PROXY_NODE_CACHE"])
    try:
        base = Path.home() / ".cache"
    except (RuntimeError, KeyError):
        base = Path(tempfile.gettempdir())
    return base / "storage-proxy-tests" / "tus-node"


def install() -> Path:
    """Install the pinned packages (once) and the server script; returns the dir."""
    try:
        return _install()
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise NodeUnavailable(f"cannot install @tus/server: {exc}") from exc


def _install() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise NodeUnavailable("node and npm are not installed")
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / "installed.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != PACKAGES:
        (directory / "package.json").write_text(json.dumps(
            {"private": True, "type": "module", "dependencies": PACKAGES}))
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=directory, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise NodeUnavailable(f"npm install failed: {result.stderr.strip()[-500:]}")
        stamp.write_text(json.dumps(PACKAGES))
    (directory / "server.mjs").write_text(SERVER_JS)
    return directory


class NodeTusServer:
    def __init__(self, install_dir: Path, store: Path) -> None:
        self.store = store
        self.process = subprocess.Popen(
            [shutil.which("node") or "node", str(install_dir / "server.mjs"), str(store)],
            cwd=install_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line.startswith("LISTENING "):
            self.stop()
            err = self.process.stderr.read() if self.process.stderr else ""
            raise NodeUnavailable(f"the node tus server did not start: {line!r} {err[-500:]}")
        self.port = int(line.split()[1])

    @property
    def creation_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/files"

    def stored(self, upload_url: str) -> bytes:
        return (self.store / upload_url.rstrip("/").rsplit("/", 1)[-1]).read_bytes()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
