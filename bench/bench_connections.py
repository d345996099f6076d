"""Many slow uploads on one daemon: resets, memory per connection, manager latency.

One asyncio process opens ``--clients`` tus PATCHes (``--size`` bytes each)
to a daemon this script starts, in waves of ``--wave`` connections every
``--wave-gap`` seconds, each client sending at ``--rate`` bytes/s (a WAN
user).  Meanwhile a separate prober process sends manager ``GET /`` every
``--probe-interval`` seconds.  Printed:

* completed / reset / failed uploads (every completed upload's file is
  compared byte for byte with what was sent);
* the daemon's RSS growth at the peak of open connections, per connection
  (socket buffers are kernel memory, not in RSS);
* manager ``GET /`` latency percentiles under load (the prober runs with
  real-time priority when permitted, the load niced), and as ratios against the
  same probe on the idle daemon measured first in the same run;
* the deltas of ``TcpExtTCPAbortOnData``, ``TcpExtListenOverflows`` and
  ``TcpExtListenDrops`` (``/proc/net/netstat``; machine-wide, so other
  traffic on the host counts too).

Bounded: at most ``--clients`` connections, and the whole load stops after
``--timeout`` seconds (clients still sending then count as failed).

    python bench/bench_connections.py [--clients 1000] [--size 2m] [--rate 128k]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import Daemon, tree_rss_bytes

from storage.config import parse_size

PROBER = r"""
import http.client, os, sys, time
try:  # what is measured is the daemon, not how long the prober waits for a CPU
    os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
except (OSError, AttributeError):
    pass
port, interval, duration = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
end = time.monotonic() + duration
while time.monotonic() < end:
    t0 = time.perf_counter()
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        print("error", flush=True)
        continue
    print(f"{time.perf_counter() - t0:.6f}@{time.monotonic():.3f}", flush=True)
    time.sleep(interval)
"""


def netstat() -> dict[str, int]:
    """TcpExt counters from /proc/net/netstat."""
    out: dict[str, int] = {}
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        prefix, *keys = names.split()
        _, *vals = values.split()
        out.update({prefix.rstrip(":") + k: int(v) for k, v in zip(keys, vals, strict=True)})
    return out


COUNTERS = ("TcpExtTCPAbortOnData", "TcpExtListenOverflows", "TcpExtListenDrops")


def raise_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def payload(index: int, size: int, block: bytes) -> bytes:
    """Client ``index``'s body: a shared random block, its index stamped every 64 KiB."""
    stamp = index.to_bytes(8, "little")
    out = bytearray((block * (size // len(block) + 1))[:size])
    for pos in range(0, size - 7, 64 << 10):
        out[pos:pos + 8] = stamp
    return bytes(out)


@dataclass
class Outcome:
    completed: int = 0
    reset: int = 0
    failed: int = 0
    mismatched: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    open_now: int = 0
    open_peak: int = 0


async def upload(port: int, token: str, body: bytes, rate: int, tick: float, out: Outcome) -> bool:
    head = (
        f"PATCH /upload?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    step = max(1, int(rate * tick))
    writer = None
    stage = "connect"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out.open_now += 1
        out.open_peak = max(out.open_peak, out.open_now)
        stage = "body"
        writer.write(head)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n, pos in enumerate(range(0, len(body), step)):
            writer.write(body[pos:pos + step])
            await writer.drain()
            delay = start + (n + 1) * tick - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        stage = "response"
        status_line = await reader.readline()
        headers = await reader.readuntil(b"\r\n\r\n")
        ok = status_line.split()[1:2] == [b"204"] and f"upload-offset: {len(body)}".encode() in headers.lower()
        if ok:
            out.completed += 1
        else:
            out.failed += 1
            key = status_line.decode("latin-1").strip()[:60]
            out.errors[key] = out.errors.get(key, 0) + 1
        return ok
    except (ConnectionResetError, BrokenPipeError):
        out.reset += 1
        key = f"reset at {stage}"
        out.errors[key] = out.errors.get(key, 0) + 1
        return False
    except (OSError, asyncio.IncompleteReadError) as exc:
        out.failed += 1
        key = type(exc).__name__
        out.errors[key] = out.errors.get(key, 0) + 1
        return False
    finally:
        if writer is not None:
            out.open_now -= 1
            writer.close()


async def run_load(daemon: Daemon, tokens: list[str], bodies: list[bytes], args: argparse.Namespace,
                   out: Outcome, samples: list[int], timeline: list[tuple[float, int, int]]) -> list[bool]:
    async def sampler() -> None:
        while True:
            samples.append(tree_rss_bytes(daemon.pid))
            timeline.append((time.monotonic(), samples[-1], out.open_now))
            await asyncio.sleep(0.2)

    sampling = asyncio.create_task(sampler())
    tasks = []
    for i, (token, body) in enumerate(zip(tokens, bodies, strict=True)):
        tasks.append(asyncio.create_task(upload(daemon.client_port, token, body, args.rate, args.tick, out)))
        if (i + 1) % args.wave == 0:
            await asyncio.sleep(args.wave_gap)
    done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for task in pending:
        task.cancel()
    sampling.cancel()
    out.failed += len(pending)
    if pending:
        out.errors["timeout"] = len(pending)
    return [t.result() if t in done and not t.cancelled() else False for t in tasks]


def start_prober(port: int, interval: float, duration: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", PROBER, str(port), str(interval), str(duration)],
                            stdout=subprocess.PIPE, text=True)


def read_prober(proc: subprocess.Popen[str]) -> tuple[list[tuple[float, float]], int]:
    """(monotonic time, latency) of each probe, and the count of failed probes."""
    out, _ = proc.communicate()
    lines = out.split()
    samples = [x.split("@") for x in lines if x != "error"]
    return [(float(at), float(lat)) for lat, at in samples], lines.count("error")


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def run_once(args: argparse.Namespace, workdir: Path, env: dict[str, str], extra: dict, label: str) -> dict:
    """One daemon under the load; prints its figures and returns them."""
    base_nice = os.getpriority(os.PRIO_PROCESS, 0)
    daemon = Daemon(workdir, env=env, io_threads=args.io_threads, extra=extra).start()
    try:
        vfid, vfolder = daemon.create_vfolder()
        tokens = daemon.upload_tokens(vfid, [(f"c/{i}.bin", args.size) for i in range(args.clients)])
        block = os.urandom(1 << 20)
        bodies = [payload(i, args.size, block) for i in range(args.clients)]

        os.setpriority(os.PRIO_PROCESS, 0, base_nice + 10)  # the load yields to the daemon and the prober
        idle_probe = start_prober(daemon.manager_port, args.probe_interval, 3.0)
        idle_timed, idle_errors = read_prober(idle_probe)
        idle = [lat for _, lat in idle_timed]
        rss0 = tree_rss_bytes(daemon.pid)
        before = netstat()
        out = Outcome()
        samples: list[int] = []
        expected = args.size / args.rate + args.clients / args.wave * args.wave_gap
        prober = start_prober(daemon.manager_port, args.probe_interval, min(args.timeout, expected))
        spy = None
        if args.py_spy is not None:
            spy = subprocess.Popen(["py-spy", "record", "-p", str(daemon.pid), "-o", str(args.py_spy), "-f", "raw",
                                    *([] if "-d" in args.py_spy_args.split() else ["-d", str(int(expected))]),
                                    *args.py_spy_args.split()],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        timeline: list[tuple[float, int, int]] = []
        results = asyncio.run(run_load(daemon, tokens, bodies, args, out, samples, timeline))
        elapsed = time.monotonic() - t0
        loaded_timed, loaded_errors = read_prober(prober)
        loaded = [lat for _, lat in loaded_timed]
        slowest = sorted(loaded_timed, key=lambda x: -x[1])[:5]
        if spy is not None:
            spy.wait(60)
        after = netstat()
        for i, ok in enumerate(results):
            if ok:
                path = vfolder / "c" / f"{i}.bin"
                if not path.is_file() or path.read_bytes() != bodies[i]:
                    out.mismatched += 1
        peak = max(samples or [rss0])
        per_conn = (peak - rss0) / max(1, out.open_peak) / 1024
        # While every connection is open and sending (not the bursts of opening and ending).
        full = [rss for _, rss, n in timeline if n >= out.open_peak * 0.95] or [peak]
        steady = statistics.median(full)
        steady_per_conn = (steady - rss0) / max(1, out.open_peak) / 1024
        print(f"{label}: {args.clients} clients x {args.size} B at {args.rate} B/s, "
              f"waves of {args.wave} every {args.wave_gap * 1000:.0f} ms; {elapsed:.1f} s; peak open {out.open_peak}")
        print(f"  uploads: completed {out.completed}, reset {out.reset}, failed {out.failed}, "
              f"byte mismatch {out.mismatched} {out.errors or ''}")
        print(f"  daemon RSS (with its workers): {rss0 / 2**20:.0f} MiB idle, {steady / 2**20:.0f} MiB while all are open "
              f"({steady_per_conn:.1f} KiB per connection), peak {peak / 2**20:.0f} MiB "
              f"({per_conn:.1f} KiB per connection)")
        deltas = {name: after.get(name, 0) - before.get(name, 0) for name in COUNTERS}
        print("  " + ", ".join(f"{name} +{n}" for name, n in deltas.items()))
        step = max(1, len(timeline) // 8)
        print("  RSS over time: " + ", ".join(f"{at - t0:.0f} s {rss / 2**20:.0f} MiB ({n} open)"
                                              for at, rss, n in timeline[::step]))
        i50, i99 = pct(idle, 50), pct(idle, 99)
        l50, l99, lmax = pct(loaded, 50), pct(loaded, 99), max(loaded or [float("nan")])
        print(f"  manager GET / idle:   p50 {i50 * 1000:.1f} ms  p99 {i99 * 1000:.1f} ms  ({len(idle)} probes,"
              f" {idle_errors} errors)")
        print(f"  manager GET / loaded: p50 {l50 * 1000:.1f} ms  p99 {l99 * 1000:.1f} ms  max {lmax * 1000:.1f} ms"
              f"  ({len(loaded)} probes, {loaded_errors} errors); slowest at "
              + ", ".join(f"{lat * 1000:.0f} ms @ {at - t0:.1f} s" for at, lat in slowest))
        print(f"  loaded/idle: p50 x{l50 / i50:.1f}  p99 x{l99 / i99:.1f}"
              f"  (mean {statistics.fmean(loaded or [0]) * 1000:.1f} ms)")
        return {"completed": out.completed, "reset": out.reset, "failed": out.failed, "mismatched": out.mismatched,
                "kib_per_conn": per_conn, "steady_kib_per_conn": steady_per_conn, "p50": l50, "p99": l99, "max": lmax,
                "overflows": deltas["TcpExtListenOverflows"], "log": daemon.log_path}
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, base_nice)
        daemon.stop()


def baseline_tree(rev: str, where: Path) -> Path:
    """A detached git worktree of ``rev`` with this tree's compiled modules copied in."""
    repo = Path(__file__).resolve().parent.parent
    tree = where / f"baseline-{rev}"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)
    for built in (repo / "storage").glob("_fastio*.so"):
        shutil.copy2(built, tree / "storage" / built.name)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--size", default="2m")
    parser.add_argument("--rate", default="128k", help="bytes/s per client")
    parser.add_argument("--tick", type=float, default=0.1, help="seconds between a client's writes")
    parser.add_argument("--wave", type=int, default=50)
    parser.add_argument("--wave-gap", type=float, default=0.01)
    parser.add_argument("--probe-interval", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--io-threads", type=int, default=16)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE in the daemon's environment")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="first run the daemon of git revision REV (a temporary worktree), then this tree's, "
                             "and print this tree's figures as ratios of REV's")
    parser.add_argument("--py-spy", type=Path, default=None,
                        help="record the daemon's stacks under load (py-spy, collapsed format) into this file")
    parser.add_argument("--py-spy-args", default="-r 200 -t",
                        help="more py-spy record options (e.g. '--gil -d 3')")
    parser.add_argument("--config", action="append", default=[],
                        help="extra config as SECTION.KEY=INT, e.g. api.client.listen-backlog=50")
    args = parser.parse_args()
    args.size = parse_size(args.size, "--size")
    args.rate = parse_size(args.rate, "--rate")
    nofile = raise_nofile(args.clients * 2 + 256)  # the daemons inherit it
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="bench-conn-"))
    extra: dict = {}
    for item in args.config:
        key, _, value = item.partition("=")
        *sections, name = key.split(".")
        table = extra
        for s in sections:
            table = table.setdefault(s, {})
        table[name] = int(value) if value.isdigit() else value
    env = dict(item.split("=", 1) for item in args.env)
    print(f"storage-proxy connections benchmark (RLIMIT_NOFILE {nofile}, somaxconn "
          f"{Path('/proc/sys/net/core/somaxconn').read_text().strip()}; TcpExt counters are machine-wide)")
    figures = []
    tree = None
    try:
        if args.baseline:
            tree = baseline_tree(args.baseline, workdir)
            figures.append(run_once(args, workdir / "base", dict(env, PYTHONPATH=str(tree)), extra,
                                    f"baseline {args.baseline}"))
        figures.append(run_once(args, workdir / "this", env, extra, "this tree"))
        if len(figures) == 2:
            base, this = figures
            print("this tree / baseline: " + ", ".join(
                f"{k} x{this[k] / base[k]:.2f}" if base[k] else f"{k} {base[k]:.0f} -> {this[k]:.0f}"
                for k in ("reset", "steady_kib_per_conn", "kib_per_conn", "p50", "p99", "max", "overflows")))
        this = figures[-1]
        if this["completed"] != args.clients or this["mismatched"]:
            raise SystemExit(f"FAILED: {args.clients - this['completed']} uploads did not complete, "
                             f"{this['mismatched']} differ (daemon log: {this['log']})")
    finally:
        if tree is not None:
            subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "worktree", "remove", "--force",
                            str(tree)], capture_output=True)
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
