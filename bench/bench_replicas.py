"""Parallel tus uploads through HAProxy to two replicas vs direct to one daemon.

    python bench/bench_replicas.py [--reps 3] [--uploads 16] [--size-mib 16] [--patch-mib 4]
                                   [--dir DIR] [--dir2 DIR2]

Two daemons (node ids ``a`` and ``b``) serve one volume: ``DIR`` (default a
temporary directory) for A and ``DIR2`` for B, the same filesystem seen
twice (e.g. two ceph-fuse mounts of one CephFS; default: ``DIR`` itself).
A real HAProxy (``/usr/sbin/haproxy``, round robin, no stickiness) is in
front of both.  Each rep times the same load twice, in alternating order:
``--uploads`` uploads of ``--size-mib`` at once, each as PATCHes of
``--patch-mib`` on a fresh connection each (so consecutive PATCHes of one
upload land on alternating replicas), once through HAProxy and once
straight to daemon A.  Every upload's bytes are checked (SHA-256 of the
file at its target) after each timed run.  Prints MB/s of both and their
ratio, rep by rep, then the medians.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import Daemon, MiB, free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_config(port: int, servers: list[tuple[str, int]]) -> str:
    lines = ["global", "    maxconn 4000", "defaults", "    mode http", "    timeout connect 2s",
             "    timeout client 120s", "    timeout server 120s", "    retries 3", "    option redispatch 1",
             f"frontend client\n    bind 127.0.0.1:{port}\n    default_backend client",
             "backend client", "    balance roundrobin", "    http-response set-header X-Served-By %s"]
    lines += [f"    server {n} 127.0.0.1:{p} check inter 500ms" for n, p in servers]
    return "\n".join(lines) + "\n"


def upload(port: int, token: str, data: bytes, patch: int, served: dict[str, int]) -> None:
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("PATCH", f"/upload?token={token}", body=view[offset:offset + patch],
                         headers={"Tus-Resumable": "1.0.0", "Upload-Offset": str(offset),
                                  "Content-Type": "application/offset+octet-stream"})
            r = conn.getresponse()
            r.read()
        finally:
            conn.close()
        if r.status != 204:
            raise SystemExit(f"PATCH at {offset}: {r.status}")
        by = r.getheader("X-Served-By") or "direct"
        served[by] = served.get(by, 0) + 1
        offset = int(r.getheader("Upload-Offset") or 0)


def run(daemon: Daemon, port: int, vfolder: Path, payloads: list[bytes], patch: int, label: str,
        rep: int) -> tuple[float, dict[str, int]]:
    files = [(f"{label}-{rep}/f{i}.bin", len(p)) for i, p in enumerate(payloads)]
    vfid = daemon_vfid[0]
    tokens = daemon.upload_tokens(vfid, files)
    served: dict[str, int] = {}
    errors: list[BaseException] = []

    def one(token: str, data: bytes) -> None:
        try:
            upload(port, token, data, patch, served)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(t, p)) for t, p in zip(tokens, payloads, strict=True)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    if errors:
        raise SystemExit(f"{label}: {errors[0]!r}")
    for (relpath, _), data in zip(files, payloads, strict=True):
        got = (vfolder / relpath).read_bytes()
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            raise SystemExit(f"{label}: {relpath} differs from what was sent")
        (vfolder / relpath).unlink()
    return sum(len(p) for p in payloads) / seconds / 1e6, served


daemon_vfid: list[str] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--uploads", type=int, default=16)
    ap.add_argument("--size-mib", type=int, default=16)
    ap.add_argument("--patch-mib", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None, help="the shared volume as replica A sees it")
    ap.add_argument("--dir2", type=Path, default=None, help="the same volume as replica B sees it")
    args = ap.parse_args()
    if not os.path.exists(HAPROXY):
        raise SystemExit("haproxy is not installed (Debian package haproxy)")
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    shared_a = args.dir or (work / "shared")
    shared_a.mkdir(parents=True, exist_ok=True)
    sub = f"bench-replicas-{os.getpid()}"
    (shared_a / sub).mkdir()
    vol_a = shared_a / sub
    vol_b = (args.dir2 / sub) if args.dir2 else vol_a
    deadline = time.monotonic() + 10
    while not vol_b.is_dir():
        if time.monotonic() > deadline:
            raise SystemExit(f"{vol_b} does not appear: is --dir2 the same filesystem as --dir?")
        time.sleep(0.05)
    backend = "cephfs" if _is_cephfs(vol_a) else "vfs"
    daemons: list[Daemon] = []
    lb = None
    try:
        for name, vol in (("a", vol_a), ("b", vol_b)):
            d = Daemon(work / name, extra={"storage-proxy": {"node-id": name},
                                           "volume": {"local": {"backend": backend, "path": str(vol)}}})
            daemons.append(d.start())
        a = daemons[0]
        port = free_port()
        cfg = work / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, [("a", daemons[0].client_port), ("b", daemons[1].client_port)]))
        lb = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        vfid, vfolder = a.create_vfolder()
        daemon_vfid.append(vfid)
        size, patch = args.size_mib * MiB, args.patch_mib * MiB
        payloads = [os.urandom(size) for _ in range(args.uploads)]
        print(f"{args.uploads} parallel uploads of {args.size_mib} MiB in {args.patch_mib} MiB PATCHes, "
              f"a connection per PATCH; volume {backend} at {vol_a}" + (f" / {vol_b}" if vol_b != vol_a else ""))
        print(f"{'rep':>3}  {'haproxy+2 MB/s':>14}  {'direct 1 MB/s':>13}  {'ratio':>6}  PATCHes per replica")
        ratios, lbs, directs = [], [], []
        for rep in range(args.reps):
            order = ["lb", "direct"] if rep % 2 == 0 else ["direct", "lb"]
            got: dict[str, tuple[float, dict[str, int]]] = {}
            for what in order:
                got[what] = run(a, port if what == "lb" else a.client_port, vfolder, payloads, patch, what, rep)
            ratio = got["lb"][0] / got["direct"][0]
            ratios.append(ratio)
            lbs.append(got["lb"][0])
            directs.append(got["direct"][0])
            print(f"{rep:>3}  {got['lb'][0]:>14.1f}  {got['direct'][0]:>13.1f}  {ratio:>6.2f}  {got['lb'][1]}")
        print(f"median: haproxy+2 {statistics.median(lbs):.1f} MB/s, direct {statistics.median(directs):.1f} MB/s, "
              f"ratio {statistics.median(ratios):.2f}")
    finally:
        if lb is not None:
            lb.kill()
            lb.wait()
        for d in daemons:
            d.stop()
        shutil.rmtree(vol_a, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _is_cephfs(path: Path) -> bool:
    try:
        os.getxattr(path, "ceph.dir.rbytes")
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
