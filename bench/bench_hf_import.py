#!/usr/bin/env python
"""HuggingFace import benchmark: a model of many small files and a few large
ones, served by the local hub contract server (tests/support/hub.py), imported
by the daemon into a VFS artifact storage, against plain ``curl`` fetching the
same files 4 at a time (``xargs -P 4``, the importer's parallelism) into a
directory, in the same run, reps in turn.

    python bench/bench_hf_import.py [--reps 3] [--small 200] [--large 3] [--large-mib 64]

Not a test: it prints MB/s of each and the ratio import/curl.  The import
also hashes every byte (sha256 / git blob id) and fsyncs each file; curl does
neither.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.daemon import StorageProxyProcess  # noqa: E402
from support.hubserver import HubServer, _repo  # noqa: E402

MODEL = "bench/model"
TIMEOUT = 600.0  # one import at most


def call(daemon: StorageProxyProcess, method: str, path: str, body: object = None) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=60)
    conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                 headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else None


def import_once(daemon: StorageProxyProcess, prefix: str) -> float:
    start = time.perf_counter()
    status, answer = call(daemon, "POST", "/v1/registries/huggingface/import", {
        "registry_name": "hub", "models": [{"model_id": MODEL}], "storage_step_mappings": {"download": "models"},
        "storage_prefix": prefix})
    assert status == 202, answer
    task_id = answer["task_id"]  # type: ignore[index]
    while True:
        status, task = call(daemon, "GET", f"/bgtask/{task_id}")
        if task["status"] != "running":  # type: ignore[index]
            break
        if time.perf_counter() - start > TIMEOUT:
            raise SystemExit(f"import still running after {TIMEOUT}s")
        time.sleep(0.01)
    assert task["status"] == "done", task  # type: ignore[index]
    return time.perf_counter() - start


def curl_once(hub: HubServer, paths: list[str], dest: Path) -> float:
    urls = "\n".join(f"{hub.url}/{MODEL}/resolve/main/{p}" for p in paths)
    dest.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run(["xargs", "-P", "4", "-n", "1", "curl", "-sS", "-f", "-O", "--create-dirs"],
                   input=urls.encode(), cwd=dest, check=True, timeout=TIMEOUT)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small", type=int, default=200, help="files of 1-64 KiB")
    ap.add_argument("--large", type=int, default=3)
    ap.add_argument("--large-mib", type=int, default=64)
    args = ap.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed")
    work = Path(tempfile.mkdtemp(prefix="bench-hf-"))
    hub = HubServer(work / "hub")
    manifest = {MODEL: _repo()}
    paths = []
    for i in range(args.small):
        path = f"small/f{i:04d}.json"
        hub.add_file(manifest, MODEL, "main", path, os.urandom(1024 * (1 + i % 64)), lfs=False)
        paths.append(path)
    for i in range(args.large):
        path = f"weights-{i}.safetensors"
        hub.add_file(manifest, MODEL, "main", path, os.urandom(args.large_mib << 20), lfs=True)
        paths.append(path)
    total = sum(len(d) for d in hub.content[f"{MODEL}@main"].values())
    hub.start(manifest)
    daemon = StorageProxyProcess(work / "proxy", extra_config={
        "artifact-storages": {"models": {"type": "vfs_storage", "vfs-storage": {"base-path": str(work / "models")}}},
        "artifact-registries": {"hub": {"type": "huggingface", "huggingface": {"endpoint": hub.url}}},
    })
    daemon.start()
    try:
        print(f"{len(paths)} files, {total / 1e6:.1f} MB; {args.reps} reps")
        imports, curls = [], []
        for rep in range(args.reps):
            imports.append(import_once(daemon, f"rep{rep}"))
            curls.append(curl_once(hub, paths, work / f"curl{rep}"))
            shutil.rmtree(work / "models" / f"rep{rep}", ignore_errors=True)
            shutil.rmtree(work / f"curl{rep}", ignore_errors=True)
        best_import, best_curl = min(imports), min(curls)
        print(f"import: {total / best_import / 1e6:8.1f} MB/s (best of {args.reps}: {best_import:.2f} s)")
        print(f"curl:   {total / best_curl / 1e6:8.1f} MB/s (best of {args.reps}: {best_curl:.2f} s)")
        print(f"ratio import/curl: {best_curl / best_import:.2f}")
    finally:
        daemon.stop(timeout=10)
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
