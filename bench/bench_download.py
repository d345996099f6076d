#!/usr/bin/env python
"""Download benchmark: the daemon against nginx (``sendfile on``), both on
loopback, both serving the same file from the page cache, downloaded with
``curl -o /dev/null``, rep by rep in turn (the order swaps every rep) so
that drift hits both alike.

Figures per contender: MB/s and server CPU-seconds per GiB (utime+stime of
the daemon, of nginx's master and workers, from /proc), their medians, the
ratios to nginx, and the targets (>= 1.0x nginx's MB/s, <= 1.5x its
CPU-s/GiB).  Also the daemon's peak RSS.

    python bench/bench_download.py [--size-mib 1024] [--reps 5] [--dir DIR] [--pure-python]

Needs nginx (Debian: ``apt-get update && apt-get install -y nginx-light``)
and curl.  Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from common import (
    SECRET,
    Daemon,
    MiB,
    Transfer,
    curl_get,
    free_port,
    median,
    peak_rss_bytes,
    tree_cpu_seconds,
    warm,
    write_payload,
)

from storage.tokens import issue_download_token
from storage.vfid import VFolderID

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def start_nginx(workdir: Path, root: Path) -> tuple[subprocess.Popen[bytes], int]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        raise SystemExit("nginx is not installed; on Debian: apt-get update && apt-get install -y nginx-light")
    conf_dir = workdir / "nginx"
    conf_dir.mkdir()
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read the vfolder (mode 0700 dirs)
    (conf_dir / "nginx.conf").write_text(NGINX_CONF.format(dir=conf_dir, port=port, root=root, user=user))
    process = subprocess.Popen([nginx, "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        if process.poll() is not None:
            raise SystemExit(f"nginx exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            subprocess.run(["curl", "-sS", "-o", "/dev/null", f"http://127.0.0.1:{port}/"], check=True,
                           capture_output=True)
            return process, port
        except subprocess.CalledProcessError:
            time.sleep(0.05)
    raise SystemExit("nginx did not answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where the volume goes (default: a temp dir)")
    parser.add_argument("--pure-python", action="store_true", help="run the daemon with STORAGE_PROXY_PURE_PYTHON=1")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is not installed")

    workdir = Path(tempfile.mkdtemp(prefix="bench-download-", dir=args.dir))
    env = {"STORAGE_PROXY_PURE_PYTHON": "1"} if args.pure_python else {}
    daemon = Daemon(workdir, env=env).start()
    nginx = None
    try:
        vfid, vfolder = daemon.create_vfolder()
        size = args.size_mib * MiB
        payload = vfolder / "payload.bin"
        print(f"writing a {args.size_mib} MiB file into {vfolder} ...", flush=True)
        write_payload(payload, size)
        warm(payload)
        nginx, nginx_port = start_nginx(workdir, vfolder)
        token = issue_download_token(SECRET, 3600, volume="local", vfid=VFolderID.parse(vfid), relpath="payload.bin")
        urls = {
            "storage-proxy": f"http://127.0.0.1:{daemon.client_port}/download?token={quote(token)}",
            "nginx": f"http://127.0.0.1:{nginx_port}/payload.bin",
        }
        cpu = {"storage-proxy": lambda: tree_cpu_seconds(daemon.pid), "nginx": lambda: tree_cpu_seconds(nginx.pid)}
        for name in urls:  # one untimed warm-up each
            curl_get(urls[name], cpu[name])
        results: dict[str, list[Transfer]] = {name: [] for name in urls}
        print(f"{'rep':>3}  {'server':<14} {'MB/s':>8} {'CPU-s/GiB':>10}")
        for rep in range(args.reps):
            order = list(urls) if rep % 2 == 0 else list(reversed(urls))
            for name in order:
                t = curl_get(urls[name], cpu[name])
                if t.nbytes != size:
                    raise SystemExit(f"{name}: got {t.nbytes} bytes, expected {size}")
                results[name].append(t)
                print(f"{rep:>3}  {name:<14} {t.mb_per_s:>8.0f} {t.cpu_per_gib:>10.3f}", flush=True)
        ours = results["storage-proxy"]
        theirs = results["nginx"]
        mbs = median([t.mb_per_s for t in ours]), median([t.mb_per_s for t in theirs])
        cps = median([t.cpu_per_gib for t in ours]), median([t.cpu_per_gib for t in theirs])
        from storage import fastio

        print()
        print(f"download of {args.size_mib} MiB, {args.reps} reps, medians "
              f"(daemon fastio: {'pure Python' if args.pure_python else 'native' if fastio.NATIVE else 'pure Python'}):")
        print(f"  storage-proxy {mbs[0]:8.0f} MB/s  {cps[0]:.3f} CPU-s/GiB")
        print(f"  nginx         {mbs[1]:8.0f} MB/s  {cps[1]:.3f} CPU-s/GiB")
        speed, cost = mbs[0] / mbs[1], cps[0] / cps[1] if cps[1] > 0 else float("inf")
        print(f"  speed ratio {speed:.2f}x nginx (target >= 1.0x): {'ok' if speed >= 1.0 else 'MISSED'}")
        print(f"  CPU ratio   {cost:.2f}x nginx (target <= 1.5x): {'ok' if cost <= 1.5 else 'MISSED'}")
        print(f"  daemon peak RSS {peak_rss_bytes(daemon.pid) / MiB:.0f} MiB")
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
