#!/usr/bin/env python
"""HuggingFace import benchmark: a model of many small files and a few large
ones, served by the local hub contract server (tests/support/hub.py), imported
by the daemon into a VFS artifact storage, against plain ``curl`` fetching the
same files 4 at a time (``xargs -P 4``, the importer's parallelism) into a
directory, in the same run, reps in turn.  The import runs twice per rep: each
file in one stream (``part-size = 0``), and the large files in ranged parts of
``--part-mib`` several at once (``part-size``, the default 64 MiB; so the large
files must be larger than a part to be split).

    python bench/bench_hf_import.py [--reps 3] [--small 200] [--large 3] [--large-mib 64] [--part-mib 16]
                                    [--conn-mb-s 0]

Not a test: it prints MB/s of each and the ratios to curl.  The import also
hashes every byte (sha256 / git blob id) and fsyncs each file; curl does
neither.  A ranged file is hashed after its parts are written (a second read).
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


def import_once(daemon: StorageProxyProcess, prefix: str, registry: str = "hub") -> float:
    start = time.perf_counter()
    status, answer = call(daemon, "POST", "/v1/registries/huggingface/import", {
        "registry_name": registry, "models": [{"model_id": MODEL}], "storage_step_mappings": {"download": "models"},
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
    ap.add_argument("--part-mib", type=int, default=16, help="ranged part size of the second import")
    ap.add_argument("--conn-mb-s", type=float, default=0,
                    help="the hub paces each download to this many MB/s (a CDN's per-connection cap); 0: off")
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
        "artifact-registries": {
            "hub": {"type": "huggingface", "huggingface": {"endpoint": hub.url, "part-size": 0}},
            "hub-parts": {"type": "huggingface", "huggingface": {"endpoint": hub.url,
                                                                 "part-size": args.part_mib << 20}},
        },
    })
    daemon.start()
    if args.conn_mb_s:
        conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
        conn.request("POST", "/_throttle", body=json.dumps({"rate": int(args.conn_mb_s * 1e6)}))
        assert conn.getresponse().status == 200
        conn.close()
    try:
        parted = sum(1 for p in paths if p.startswith("weights-")) if args.large_mib > args.part_mib else 0
        pace = f"; each download paced to {args.conn_mb_s:g} MB/s" if args.conn_mb_s else ""
        print(f"{len(paths)} files, {total / 1e6:.1f} MB; {parted} large files in {args.part_mib} MiB parts; "
              f"{args.reps} reps{pace}")
        imports, ranged, curls = [], [], []
        for rep in range(args.reps):
            imports.append(import_once(daemon, f"rep{rep}"))
            shutil.rmtree(work / "models" / f"rep{rep}", ignore_errors=True)
            ranged.append(import_once(daemon, f"ranged{rep}", "hub-parts"))
            shutil.rmtree(work / "models" / f"ranged{rep}", ignore_errors=True)
            curls.append(curl_once(hub, paths, work / f"curl{rep}"))
            shutil.rmtree(work / f"curl{rep}", ignore_errors=True)
        best_import, best_ranged, best_curl = min(imports), min(ranged), min(curls)
        print(f"import, one stream a file: {total / best_import / 1e6:8.1f} MB/s (best of {args.reps}: "
              f"{best_import:.2f} s)")
        print(f"import, ranged parts:      {total / best_ranged / 1e6:8.1f} MB/s (best of {args.reps}: "
              f"{best_ranged:.2f} s)")
        print(f"curl -P 4:                 {total / best_curl / 1e6:8.1f} MB/s (best of {args.reps}: "
              f"{best_curl:.2f} s)")
        print(f"ratio import/curl: {best_curl / best_import:.2f}; ranged/curl: {best_curl / best_ranged:.2f}")
    finally:
        daemon.stop(timeout=10)
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
