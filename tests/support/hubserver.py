"""Drives ``hub.py`` (the local hub contract server) from a test: a subprocess on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HUB_SCRIPT = Path(__file__).resolve().parent / "hub.py"
MODEL = "acme/tiny-llm"
OTHER = "acme/other-model"


class HubServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.files = workdir / "blobs"
        self.files.mkdir(parents=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.content: dict[str, dict[str, bytes]] = {}

    def add_file(self, manifest: dict[str, Any], model_id: str, rev: str, path: str, data: bytes, lfs: bool) -> None:
        blob = self.files / hashlib.sha256(model_id.encode() + rev.encode() + path.encode()).hexdigest()
        blob.write_bytes(data)
        manifest[model_id]["revisions"][rev]["files"][path] = {"file": str(blob), "lfs": lfs}
        self.content.setdefault(f"{model_id}@{rev}", {})[path] = data

    def start(self, manifest: dict[str, Any]) -> None:
        path = self.workdir / "manifest.json"
        path.write_text(json.dumps(manifest))
        portfile = self.workdir / "port"
        log = open(self.workdir / "hub.log", "wb")
        self.process = subprocess.Popen([sys.executable, str(HUB_SCRIPT), str(path), str(portfile)],
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not portfile.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the hub server did not start: " + (self.workdir / "hub.log").read_text())
            time.sleep(0.05)
        self.port = int(portfile.read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: Any) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("POST", path, body=json.dumps(body))
        out = json.loads(conn.getresponse().read())
        conn.close()
        return out

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path)
        out = json.loads(conn.getresponse().read())
        conn.close()
        return out

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def _repo(**kw: Any) -> dict[str, Any]:
    return {"author": "acme", "tags": ["pytorch", "text-generation"], "created": "2025-01-02T03:04:05.000Z",
            "modified": "2025-06-07T08:09:10.000Z", "downloads": 10, "likes": 1, "gated": False,
            "revisions": {"main": {"sha": hashlib.sha1(os.urandom(8)).hexdigest(), "files": {}}}, **kw}


def tiny_hub(workdir: Path) -> HubServer:
    """A started hub with two models: MODEL (branches main and dev, tag v1.0; LFS and plain files) and OTHER."""
    server = HubServer(workdir)
    manifest = {MODEL: _repo(downloads=100, tags_refs={"v1.0": "main"}), OTHER: _repo(downloads=5, gated="auto")}
    manifest[MODEL]["revisions"]["dev"] = {"sha": hashlib.sha1(b"dev").hexdigest(), "files": {}}
    rnd = os.urandom
    server.add_file(manifest, MODEL, "main", "README.md", b"# tiny-llm\n\nA test model.\n", lfs=False)
    server.add_file(manifest, MODEL, "main", "config.json", json.dumps({"layers": 2}).encode(), lfs=False)
    server.add_file(manifest, MODEL, "main", "model.safetensors", rnd(3 * 1024 * 1024 + 17), lfs=True)
    server.add_file(manifest, MODEL, "main", "tokenizer/vocab.txt", b"a\nb\nc\n" * 1000, lfs=False)
    server.add_file(manifest, MODEL, "main", "shards/part-1.bin", rnd(700_000), lfs=True)
    server.add_file(manifest, MODEL, "main", "shards/part-2.bin", rnd(900_001), lfs=True)
    server.add_file(manifest, MODEL, "dev", "config.json", b"{}", lfs=False)
    server.add_file(manifest, OTHER, "main", "weights.bin", rnd(1000), lfs=True)
    server.start(manifest)
    return server


@contextmanager
def running_hub(workdir: Path) -> Iterator[HubServer]:
    """``tiny_hub`` for the length of a ``with`` block (a module fixture's body)."""
    server = tiny_hub(workdir)
    try:
        yield server
    finally:
        server.stop()


def model_import_config(base: Path, registries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Daemon config of a VFS artifact storage ``models`` under ``base`` and one
    HuggingFace registry per name (its ``[artifact-registries.NAME.huggingface]`` options)."""
    return {
        "artifact-storages": {"models": {"type": "vfs_storage", "vfs-storage": {"base-path": str(base)}}},
        "artifact-registries": {name: {"type": "huggingface", "huggingface": dict(options)}
                                for name, options in registries.items()},
    }
