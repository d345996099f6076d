#!/usr/bin/env python
"""Browser upload benchmark: 64 MiB from a real headless Chromium with
tus-js-client 4.3.1 and the web UI's options (15 MiB chunks), against curl
sending the same size as one tus PATCH, into the same daemon in the same
run, reps in turn.  Uses tests/browser's driver (chromium, node, npm needed;
the pinned JS packages are installed into its cache dir).

    python bench/bench_browser_upload.py [--reps 3]

Not a test: it prints MB/s (the browser's as timed in the page, from the
first request to onSuccess) and the ratio browser/curl.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for sub in ("tests", "tests/browser"):
    sys.path.insert(0, str(ROOT / sub))

from support.daemon import StorageProxyProcess  # noqa: E402
from support.upload_client import UploadFixture  # noqa: E402
from test_webui_flows import BIG, run_browser  # noqa: E402


def curl_rate(uploads: UploadFixture, payload: Path) -> float:
    token = uploads.token(f"curl-{uuid.uuid4().hex}.bin", BIG)
    start = time.perf_counter()
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH",
         "-H", "Tus-Resumable: 1.0.0", "-H", "Content-Type: application/offset+octet-stream",
         "-H", "Upload-Offset: 0", "--data-binary", f"@{payload}", uploads.upload_url(token)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    elapsed = time.perf_counter() - start
    if out.stdout != "204":
        raise SystemExit(f"curl PATCH failed: {out.stdout} {out.stderr}")
    return BIG / 1e6 / elapsed


def browser_rate(uploads: UploadFixture, workdir: Path) -> float:
    url = uploads.upload_url(uploads.token(f"browser-{uuid.uuid4().hex}.bin", BIG))
    workdir.mkdir(parents=True, exist_ok=True)
    out = run_browser(workdir, {"urls": {"bigUpload": url, "bigDownload": url}, "steps": ["upload-only", "big"],
                                "bigSize": BIG, "resumeSize": 0})
    return float(out["bigMBps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("STORAGE_PROXY_BROWSER", "1")
    with tempfile.TemporaryDirectory(prefix="bench-browser-") as tmp:
        work = Path(tmp)
        payload = work / "payload.bin"
        payload.write_bytes(os.urandom(BIG))
        with StorageProxyProcess(work / "proxy") as daemon:
            uploads = UploadFixture(daemon)
            curl, browser = [], []
            for rep in range(max(1, min(args.reps, 10))):
                curl.append(curl_rate(uploads, payload))
                browser.append(browser_rate(uploads, work / f"browser-{rep}"))
                print(f"rep {rep + 1}: curl {curl[-1]:.0f} MB/s, browser {browser[-1]:.0f} MB/s")
    c, b = max(curl), max(browser)
    print(f"64 MiB upload, best of {len(curl)}: curl (one PATCH) {c:.0f} MB/s; "
          f"chromium + tus-js-client (15 MiB PATCHes) {b:.0f} MB/s = {b / c:.2f} x curl")


if __name__ == "__main__":
    main()
