"""Aggregate upload MB/s with ``num-proc = 1`` against ``num-proc = 2``, in the same run.

Both daemons (``twistd -n storage-proxy``, one vfs volume each under the work
directory) run side by side; each rep sends 32 parallel tus uploads (one curl
PATCH each, niced: they are the load, not what is measured) to one daemon,
then the same to the other, the order alternating rep by rep.  For every rep
the ratio num-proc=2 / num-proc=1 of the aggregate MB/s is printed, then the
median ratio; also each daemon's CPU-s/GiB (the daemon and its workers) and
the manager API's ``GET /`` p99 while the uploads run.  One untimed round of 8
uploads goes to each daemon first.  Every upload is
checked: status 204 and the file's size and checksum.

    python bench/bench_workers.py [--reps 5] [--size-mib 32] [--count 32] [--workdir DIR]

This machine has 2 cores shared with the curl clients: the figures are ratios
of runs measured under the same conditions, not absolute speeds.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import Daemon, GiB, MiB, scratch_write, tree_cpu_seconds, warm, write_payload


def curl_patch(url: str, src: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["nice", "-n", "10", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH", "-H", "Expect:",
         "-H", "Tus-Resumable: 1.0.0", "-H", "Content-Type: application/offset+octet-stream",
         "-H", "Upload-Offset: 0", "-T", str(src), url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def workers_ready(daemon: Daemon, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        up = [line for line in text.splitlines() if line.startswith("storage_proxy_worker_up{")]
        if len(up) == count and all(line.endswith(" 1.0") for line in up):
            return
        time.sleep(0.1)
    raise SystemExit(f"the workers were not ready in {timeout}s")


def one_rep(daemon: Daemon, src: Path, digest: str, count: int, scratch_dir: Path) -> tuple[float, float, float]:
    """``count`` parallel uploads of ``src``: (MB/s, CPU-s/GiB, manager GET / p99 ms)."""
    size = src.stat().st_size
    vfid, folder = daemon.create_vfolder()
    tokens = daemon.upload_tokens(vfid, [(f"par/{i}.bin", size) for i in range(count)])
    url = f"http://127.0.0.1:{daemon.client_port}/upload?token="
    scratch_write(scratch_dir, size * count)  # the same page-cache state for every contender
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=30)
        while not stop.is_set():
            t0 = time.perf_counter()
            conn.request("GET", "/")
            conn.getresponse().read()
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
        conn.close()

    prober = threading.Thread(target=probe)
    cpu0 = tree_cpu_seconds(daemon.pid)
    prober.start()
    t0 = time.perf_counter()
    procs = [curl_patch(url + t, src) for t in tokens]
    results = [p.communicate() for p in procs]
    seconds = time.perf_counter() - t0
    stop.set()
    prober.join()
    cpu = tree_cpu_seconds(daemon.pid) - cpu0
    for out, err in results:
        if out.strip() != "204":
            raise SystemExit(f"an upload failed: HTTP {out!r} {err.strip()}")
    for i in range(count):
        path = folder / "par" / f"{i}.bin"
        if path.stat().st_size != size:
            raise SystemExit(f"{path}: {path.stat().st_size} bytes, expected {size}")
    for i in (0, count - 1):  # two whole files compared, the rest by size
        if hashlib.sha256((folder / "par" / f"{i}.bin").read_bytes()).hexdigest() != digest:
            raise SystemExit(f"upload {i}: the bytes differ from the source")
    daemon.manager("POST", "/folder/delete", {"volume": "local", "vfid": vfid})
    shutil.rmtree(folder, ignore_errors=True)
    total = size * count
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) >= 2 else float("nan")
    return total / seconds / 1e6, cpu / (total / GiB), p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=32, help="size of each upload")
    parser.add_argument("--count", type=int, default=32, help="parallel uploads per rep")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-workers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "payload.bin"
    write_payload(src, args.size_mib * MiB)
    warm(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    one = Daemon(workdir / "np1", extra={"storage-proxy": {"num-proc": 1}})
    two = Daemon(workdir / "np2", extra={"storage-proxy": {"num-proc": 2}})
    try:
        one.start()
        two.start()
        workers_ready(two, 2)
        for daemon in (one, two):  # untimed: the first uploads into a fresh daemon start its threads
            one_rep(daemon, src, digest, min(args.count, 8), workdir)
        print(f"{args.count} parallel uploads of {args.size_mib} MiB, {args.reps} reps, order alternating")
        ratios, rows = [], []
        for rep in range(args.reps):
            order = [("1", one), ("2", two)] if rep % 2 == 0 else [("2", two), ("1", one)]
            got = {}
            for label, daemon in order:
                got[label] = one_rep(daemon, src, digest, args.count, workdir)
            ratio = got["2"][0] / got["1"][0]
            ratios.append(ratio)
            rows.append(got)
            print(f"rep {rep + 1}: num-proc=1 {got['1'][0]:7.0f} MB/s {got['1'][1]:.2f} CPU-s/GiB p99 {got['1'][2]:5.1f} ms"
                  f" | num-proc=2 {got['2'][0]:7.0f} MB/s {got['2'][1]:.2f} CPU-s/GiB p99 {got['2'][2]:5.1f} ms"
                  f" | ratio {ratio:.2f}", flush=True)
        med = statistics.median
        print(f"median ratio (num-proc=2 / num-proc=1 aggregate MB/s): {med(ratios):.2f}"
              f" (reps: {', '.join(f'{r:.2f}' for r in ratios)})")
        for label in ("1", "2"):
            print(f"num-proc={label}: median {med([r[label][0] for r in rows]):.0f} MB/s,"
                  f" {med([r[label][1] for r in rows]):.2f} CPU-s/GiB,"
                  f" manager GET / p99 {med([r[label][2] for r in rows]):.1f} ms")
    finally:
        one.stop()
        two.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
