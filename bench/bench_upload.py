#!/usr/bin/env python
"""Upload benchmark: tus PATCH into the real daemon over loopback with curl,
against two baselines measured in the same run, rep by rep in turn:

* ``cat``: ``cat src > new && sync new`` on the same filesystem;
* ``raw``: a minimal socket→file receiver (below, ~30 lines of Python) that
  accepts curl's PATCH, writes the body to a new file and fsyncs it.

Before every timed write a scratch file of the payload size is written and
deleted, so that every contender meets the page cache in the same state.

Figures: 1 GiB as one PATCH (MB/s, server CPU-s/GiB), 1 GiB as 64 MiB
PATCHes, peak RSS and bytes written (/proc/PID/io) of the daemon during a
4 GiB upload, 32 parallel uploads of 32 MiB (aggregate MB/s, and the p99
latency of the manager's ``GET /`` meanwhile).

    python bench/bench_upload.py [--dir DIR] [--reps 3] [--quick]

Not a test: it prints numbers and the targets they are held to.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import storage

GiB = 1 << 30
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
MANAGER_SECRET = "bench-manager-secret-0123456789abcdef"
SECRET = "bench-client-secret-0123456789abcdef0"

RAW_RECEIVER = r"""
import os, socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(128)
outdir = sys.argv[1]
print(srv.getsockname()[1], flush=True)

def handle(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(65536)
    head, _, body = head.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in lines[1:])}
    name = lines[0].split()[1].decode().strip("/").split("?")[0]
    left = int(headers[b"content-length"]) - len(body)
    pos = int(headers.get(b"upload-offset", b"0"))
    fd = os.open(os.path.join(outdir, name), os.O_WRONLY | os.O_CREAT, 0o644)
    pos += os.pwrite(fd, body, pos)
    buf = memoryview(bytearray(1 << 20))
    while left:
        n = conn.recv_into(buf[:min(left, len(buf))])
        if not n:
            break
        os.pwrite(fd, buf[:n], pos)
        pos += n
        left -= n
    os.fsync(fd)
    os.close(fd)
    conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    conn.close()

while True:
    conn, _ = srv.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""


# -- /proc ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def io_write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    return rss, hwm


# -- files -----------------------------------------------------------------------------------


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def scratch(directory: Path, size: int) -> None:
    """Write and delete a file of ``size`` bytes: same page-cache state for every contender."""
    path = directory / "scratch.bin"
    block = b"\0" * (16 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


# -- the daemon --------------------------------------------------------------------------------


class Daemon:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.volume = workdir / "volume"
        self.volume.mkdir(parents=True, exist_ok=True)
        config = f"""
[storage-proxy]
node-id = "bench"
secret = "{SECRET}"
max-upload-size = "100g"

[api.client]
service-addr = {{ host = "127.0.0.1", port = 0 }}

[api.manager]
service-addr = {{ host = "127.0.0.1", port = 0 }}
secret = "{MANAGER_SECRET}"

[volume.local]
backend = "vfs"
path = "{self.volume}"
"""
        (workdir / "storage-proxy.toml").write_text(config)
        env = dict(os.environ)
        root = str(Path(storage.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.log = open(workdir / "daemon.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0]='twistd'; run()",
             "-n", "--pidfile=", "storage-proxy", "--config", str(workdir / "storage-proxy.toml")],
            cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while len(ports) < 2:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("the daemon did not start:\n" + (workdir / "daemon.log").read_text())
            text = (workdir / "daemon.log").read_text(errors="replace")
            for label, port in re.findall(r"(manager|client) API listening on \S+:(\d+)", text):
                ports[label] = int(port)
            time.sleep(0.05)
        self.manager_port, self.client_port = ports["manager"], ports["client"]
        self.pid = self.proc.pid
        self.vfid = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
        self.manager("POST", "/folder/create", {"volume": "local", "vfid": self.vfid})
        h = uuid.UUID(self.vfid.split("/")[1]).hex
        self.vfolder = self.volume / uuid.UUID(self.vfid.split(":")[1].split("/")[0]).hex / h[:2] / h[2:4] / h[4:]

    def manager(self, method: str, path: str, body: dict) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.manager_port, timeout=60)
        conn.request(method, path, json.dumps(body),
                     {"X-BackendAI-Storage-Auth-Token": MANAGER_SECRET, "Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        if r.status >= 300:
            raise SystemExit(f"manager {path}: {r.status} {data[:300]!r}")
        return json.loads(data) if data else {}

    def token(self, relpath: str, size: int) -> str:
        return self.manager("POST", "/folder/file/upload",
                            {"volume": "local", "vfid": self.vfid, "relpath": relpath, "size": size})["token"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class RawReceiver:
    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.proc = subprocess.Popen([sys.executable, "-c", RAW_RECEIVER, str(outdir)], stdout=subprocess.PIPE)
        self.port = int(self.proc.stdout.readline())
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- clients ------------------------------------------------------------------------------------


def curl_patch(url: str, src: Path, offset: int = 0, nice: bool = False) -> subprocess.Popen:
    # The 32 parallel clients run niced: they are the load, not what is measured.
    return subprocess.Popen(
        [*(["nice", "-n", "10"] if nice else []), "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH", "-H", "Expect:",
         "-H", "Tus-Resumable: 1.0.0", "-H", "Content-Type: application/offset+octet-stream",
         "-H", f"Upload-Offset: {offset}", "-T", str(src), url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate()
    if out.strip() != "204":
        raise SystemExit(f"curl: HTTP {out!r} {err}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Bench:
    def __init__(self, workdir: Path, reps: int) -> None:
        self.dir = workdir
        self.reps = reps
        self.daemon = Daemon(workdir / "daemon")
        self.raw_dir = workdir / "raw"
        self.raw_dir.mkdir(exist_ok=True)
        self.raw = RawReceiver(self.raw_dir)
        self.n = 0
        self.parallel_cpu = (0.0, 0.0)

    def close(self) -> None:
        self.daemon.stop()
        self.raw.stop()

    # one contender's single upload of ``src``; returns (seconds, server cpu seconds)

    def run_cat(self, src: Path) -> tuple[float, float]:
        dst = self.dir / "cat-out.bin"
        t = timed(lambda: subprocess.run(["sh", "-c", f"cat '{src}' > '{dst}' && sync '{dst}'"], check=True))
        dst.unlink()
        return t, float("nan")

    def run_raw(self, parts: list[Path]) -> tuple[float, float]:
        name = f"raw{self.n}.bin"
        self.n += 1
        cpu0 = cpu_seconds(self.raw.pid)

        def go() -> None:
            offset = 0
            for part in parts:
                finish(curl_patch(f"http://127.0.0.1:{self.raw.port}/{name}", part, offset))
                offset += part.stat().st_size

        t = timed(go)
        cpu = cpu_seconds(self.raw.pid) - cpu0
        (self.raw_dir / name).unlink()
        return t, cpu

    def run_daemon(self, parts: list[Path]) -> tuple[float, float]:
        size = sum(p.stat().st_size for p in parts)
        relpath = f"up{self.n}.bin"
        self.n += 1
        token = self.daemon.token(relpath, size)
        url = f"http://127.0.0.1:{self.daemon.client_port}/upload?token={token}"
        cpu0 = cpu_seconds(self.daemon.pid)

        def go() -> None:
            offset = 0
            for part in parts:
                finish(curl_patch(url, part, offset))
                offset += part.stat().st_size

        t = timed(go)
        cpu = cpu_seconds(self.daemon.pid) - cpu0
        target = self.daemon.vfolder / relpath
        if target.stat().st_size != size:
            raise SystemExit("the daemon's file has the wrong size")
        target.unlink()
        return t, cpu

    def compare(self, title: str, size: int, parts: list[Path], src: Path) -> dict[str, list[tuple[float, float]]]:
        results: dict[str, list[tuple[float, float]]] = {"cat": [], "raw": [], "daemon": []}
        for _ in range(self.reps):
            for name in results:
                scratch(self.dir, size)
                if name == "cat":
                    results[name].append(self.run_cat(src))
                elif name == "raw":
                    results[name].append(self.run_raw(parts))
                else:
                    results[name].append(self.run_daemon(parts))
        print(f"\n{title}")
        for name, runs in results.items():
            best = min(t for t, _ in runs)
            cpu = min(c for _, c in runs)
            cpu_txt = f"{cpu / (size / GiB):5.2f} CPU-s/GiB" if cpu == cpu else "      (client-side)"
            print(f"  {name:7s} {size / best / 1e6:8.0f} MB/s  {cpu_txt}   runs: "
                  + ", ".join(f"{size / t / 1e6:.0f}" for t, _ in runs))
        return results


def best_rate(runs: list[tuple[float, float]], size: int) -> float:
    return size / min(t for t, _ in runs) / 1e6


def best_cpu(runs: list[tuple[float, float]], size: int) -> float:
    return min(c for _, c in runs) / (size / GiB)


def split(src: Path, part_size: int, directory: Path) -> list[Path]:
    parts = []
    size = src.stat().st_size
    with open(src, "rb") as f:
        for i in range(0, size, part_size):
            part = directory / f"part{i // part_size:03d}.bin"
            if not (part.exists() and part.stat().st_size == min(part_size, size - i)):
                part.write_bytes(f.read(part_size))
            else:
                f.seek(i + part_size)
            parts.append(part)
    return parts


def parallel(bench: Bench, src: Path, count: int) -> tuple[float, float, float, list[float]]:
    """``count`` concurrent uploads of ``src`` to raw and daemon; manager GET / latencies meanwhile."""
    size = src.stat().st_size * count
    names = [f"par{bench.n}-{i}.bin" for i in range(count)]
    bench.n += 1

    def probing(work) -> tuple[float, list[float]]:
        latencies: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", bench.daemon.manager_port, timeout=30)
            while not stop.is_set():
                t0 = time.perf_counter()
                conn.request("GET", "/")
                conn.getresponse().read()
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.002)
            conn.close()

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            return timed(work), latencies
        finally:
            stop.set()
            prober.join()

    # The raw receiver takes the uploads while the idle daemon is probed: the
    # latency floor of this machine under that load.
    scratch(bench.dir, size)
    cpu0 = cpu_seconds(bench.raw.pid)
    t_raw, floor = probing(lambda: [finish(p) for p in [
        curl_patch(f"http://127.0.0.1:{bench.raw.port}/{n}", src, nice=True) for n in names]])
    cpu_raw = cpu_seconds(bench.raw.pid) - cpu0
    for n in names:
        (bench.raw_dir / n).unlink()
    scratch(bench.dir, size)
    tokens = [bench.daemon.token(f"par/{n}", src.stat().st_size) for n in names]
    url = f"http://127.0.0.1:{bench.daemon.client_port}/upload?token="
    cpu0 = cpu_seconds(bench.daemon.pid)
    t_daemon, latencies = probing(lambda: [finish(p) for p in [curl_patch(url + t, src, nice=True) for t in tokens]])
    bench.parallel_cpu = (cpu_raw / (size / GiB), (cpu_seconds(bench.daemon.pid) - cpu0) / (size / GiB))
    shutil.rmtree(bench.daemon.vfolder / "par")
    return size, t_raw, t_daemon, latencies, floor


def rss_and_io(workdir: Path, src: Path) -> tuple[int, int, int, int, int]:
    """On a fresh daemon: its RSS before, its peak RSS (sampled, and VmHWM) and
    the bytes it wrote to disk during one upload of ``src``."""
    size = src.stat().st_size
    daemon = Daemon(workdir / "daemon-rss")
    try:
        scratch(workdir, size)
        token = daemon.token("big.bin", size)
        idle = rss_kib(daemon.pid)[0]
        io0 = io_write_bytes(daemon.pid)
        peak = 0
        proc = curl_patch(f"http://127.0.0.1:{daemon.client_port}/upload?token={token}", src)
        while proc.poll() is None:
            peak = max(peak, rss_kib(daemon.pid)[0])
            time.sleep(0.02)
        finish(proc)
        written = io_write_bytes(daemon.pid) - io0
        hwm = rss_kib(daemon.pid)[1]
        (daemon.vfolder / "big.bin").unlink()
    finally:
        daemon.stop()
    return size, idle, peak, hwm, written


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, int(len(ordered) * q) - 1)] * 1000 if ordered else float("nan")


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None,
                        help="work directory, kept afterwards (default: a temp dir, removed); needs ~10 GiB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB / 1 GiB instead of 1 GiB / 4 GiB")
    parser.add_argument("--parallel-only", action="store_true",
                        help="only the 32 parallel uploads (and the manager latency), --reps times")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is required")
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="bench-upload-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(args, workdir)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run_parallel_only(args: argparse.Namespace, workdir: Path) -> None:
    small = workdir / "small.bin"
    make_file(small, 32 * MiB)
    bench = Bench(workdir, args.reps)
    try:
        for rep in range(args.reps):
            total, t_raw, t_daemon, lat, floor = parallel(bench, small, 32)
            agg_raw, agg_d = total / t_raw / 1e6, total / t_daemon / 1e6
            print(f"  rep {rep + 1}: 32 x 32 MiB {agg_d:6.0f} MB/s = {agg_d / agg_raw:.2f}x raw's {agg_raw:.0f}; "
                  f"manager GET / p50 {percentile(lat, 0.5):.1f} p99 {percentile(lat, 0.99):.1f} ms "
                  f"over {len(lat)}; idle daemon during the raw run: p99 {percentile(floor, 0.99):.1f} ms; "
                  "CPU-s/GiB raw {:.2f}, daemon {:.2f}".format(*bench.parallel_cpu),
                  flush=True)
    finally:
        bench.close()


def run(args: argparse.Namespace, workdir: Path) -> None:
    if args.parallel_only:
        run_parallel_only(args, workdir)
        return
    one = 256 * MiB if args.quick else GiB
    big = GiB if args.quick else 4 * GiB
    src = workdir / "payload.bin"
    make_file(src, one)
    parts_dir = workdir / "parts"
    parts_dir.mkdir(exist_ok=True)
    parts = split(src, 64 * MiB, parts_dir)
    small = workdir / "small.bin"
    make_file(small, 32 * MiB)
    print(f"storage-proxy upload benchmark: {workdir} (fastio native: {__import__('storage.fastio').fastio.NATIVE})")
    bench = Bench(workdir, args.reps)
    try:
        single = bench.compare(f"{one // MiB} MiB as one PATCH (best of {args.reps})", one, [src], src)
        chunked = bench.compare(f"{one // MiB} MiB as {len(parts)} PATCHes of 64 MiB", one, parts, src)
        # Best of the reps for both (raw and daemon alternate inside each
        # rep); the latencies of every rep are pooled.
        lat, floor = [], []
        t_raw = t_daemon = float("inf")
        for _ in range(args.reps):
            total, t_r, t_d, lat_rep, floor_rep = parallel(bench, small, 32)
            print(f"  32 x 32 MiB: raw {total / t_r / 1e6:.0f} MB/s, daemon {total / t_d / 1e6:.0f} MB/s; "
                  f"manager GET / p99 {percentile(lat_rep, 0.99):.1f} ms, max {max(lat_rep) * 1000:.1f} ms",
                  flush=True)
            t_raw, t_daemon = min(t_raw, t_r), min(t_daemon, t_d)
            lat += lat_rep
            floor += floor_rep
    finally:
        bench.close()
    src_big = workdir / "big.bin"
    make_file(src_big, big)
    big_size, idle, peak, hwm, written = rss_and_io(workdir, src_big)
    src_big.unlink()

    raw1, d1 = best_rate(single["raw"], one), best_rate(single["daemon"], one)
    rawc, dc = best_cpu(single["raw"], one), best_cpu(single["daemon"], one)
    d64 = best_rate(chunked["daemon"], one)
    raw64 = best_rate(chunked["raw"], one)
    p99 = percentile(lat, 0.99)
    p99_floor = percentile(floor, 0.99)
    agg_raw, agg_d = total / t_raw / 1e6, total / t_daemon / 1e6
    print("\nSummary (targets from issue 3)")
    print(f"  one PATCH:       {d1:6.0f} MB/s = {d1 / raw1:.2f}x raw (>= 0.9: {verdict(d1 >= 0.9 * raw1)}); "
          f"cat {best_rate(single['cat'], one):.0f} MB/s")
    print(f"  server CPU:      {dc:6.2f} CPU-s/GiB = {dc / rawc:.2f}x raw's {rawc:.2f} (<= 1.2: {verdict(dc <= 1.2 * rawc)})")
    print(f"  64 MiB PATCHes:  {d64:6.0f} MB/s = {d64 / raw1:.2f}x raw one-PATCH, {d64 / raw64:.2f}x raw 64 MiB "
          f"(>= 0.8: {verdict(d64 >= 0.8 * raw1)})")
    print(f"  {big // GiB} GiB upload:    peak RSS {peak / 1024:.0f} MiB sampled, VmHWM {hwm / 1024:.0f} MiB, "
          f"{idle / 1024:.0f} MiB before "
          f"(< 100: {verdict(max(peak, hwm) < 100 * 1024)}); wrote {written / big_size:.3f}x the upload "
          f"(<= 1.05: {verdict(written <= 1.05 * big_size)})")
    print(f"  32 x 32 MiB:     {agg_d:6.0f} MB/s (best of {args.reps}) = {agg_d / agg_raw:.2f}x raw's {agg_raw:.0f} "
          f"(>= 0.9: {verdict(agg_d >= 0.9 * agg_raw)}); manager GET / p99 {p99:.1f} ms over {len(lat)} "
          f"(< 15: {verdict(p99 < 15)}); idle daemon during the raw run: p99 {p99_floor:.1f} ms")


if __name__ == "__main__":
    main()
