"""The web UI's flows in a real headless Chromium (puppeteer-core drives the
system ``chromium``; tus-js-client 4.3.1 with the web UI's options), from a
page on another loopback origin, against the real daemon: a 64 MiB upload
fetched back with its SHA-256 checked in the page, ``<a download>``, Range
fetches (one preflighted), a readable 404 body, an upload aborted at ~20 MiB
and resumed by a new ``tus.Upload``, 1-byte and 0-byte files, a directory zip
and ``/download-archive``.

Slow (~20 s): only in ``tox -e browser`` (STORAGE_PROXY_BROWSER=1).  The JS
dependencies are pinned in package.json / package-lock.json beside this file
and installed with ``npm ci`` into a cache dir (``$STORAGE_PROXY_BROWSER_NODE_DIR``,
default ``~/.cache/storage-proxy-browser``), never committed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from support.upload_client import UploadFixture

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
BIG = 64 * MiB
RESUME = 40 * MiB

pytestmark = pytest.mark.skipif(
    os.environ.get("STORAGE_PROXY_BROWSER") != "1", reason="the browser suite runs in tox -e browser"
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (Debian package chromium, scripts/system-packages)")


def node_dir() -> Path:
    """The pinned JS dependencies, installed by ``npm ci`` when the lock file changed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the browser test")
    cache = Path(os.environ.get("STORAGE_PROXY_BROWSER_NODE_DIR", Path.home() / ".cache" / "storage-proxy-browser"))
    cache.mkdir(parents=True, exist_ok=True)
    lock = (HERE / "package-lock.json").read_bytes()
    if (cache / "package-lock.json").is_file() and (cache / "package-lock.json").read_bytes() == lock \
            and (cache / "node_modules" / "puppeteer-core").is_dir():
        return cache
    for name in ("package.json", "package-lock.json"):
        shutil.copy(HERE / name, cache / name)
    env = dict(os.environ, PUPPETEER_SKIP_DOWNLOAD="1")
    result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=cache, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"npm ci of the browser test's packages failed: {result.stderr[-800:]}")
    return cache


def run_browser(tmp_path: Path, config: dict[str, Any]) -> dict[str, Any]:
    modules = node_dir()
    config = dict(config, chromium=chromium(), downloadDir=str(tmp_path / "downloads"))
    (tmp_path / "downloads").mkdir(exist_ok=True)
    cfg_path = tmp_path / "browser.json"
    cfg_path.write_text(json.dumps(config))
    env = dict(os.environ, NODE_PATH=str(modules / "node_modules"))
    result = subprocess.run(["node", str(HERE / "run.js"), str(cfg_path)], env=env,
                            capture_output=True, text=True, timeout=150)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def webui_urls(uploads: UploadFixture) -> dict[str, str]:
    client = uploads.daemon.client_url

    def download(relpath: str, archive: bool = False) -> str:
        r = uploads.manager("POST", "/folder/file/download", {
            "volume": uploads.volume, "vfid": str(uploads.vfid), "relpath": relpath, "archive": archive})
        assert r.status_code == 200, r.text
        url = f"{client}/download?token={r.json()['token']}"
        return url + "&archive=true" if archive else url

    r = uploads.manager("POST", "/folder/file/archive-download-token", {
        "volume": uploads.volume, "virtual_folder_id": str(uploads.vfid),
        "files": ["dir/one.bin", "dir/empty.bin"], "filename": "picked.zip"})
    assert r.status_code == 200, r.text
    return {
        "bigUpload": uploads.upload_url(uploads.token("big.bin", BIG)),
        "bigDownload": download("big.bin"),
        "missingDownload": download("no-such-file.bin"),
        "resumeUpload": uploads.upload_url(uploads.token("resume.bin", RESUME)),
        "resumeDownload": download("resume.bin"),
        "oneUpload": uploads.upload_url(uploads.token("dir/one.bin", 1)),
        "oneDownload": download("dir/one.bin"),
        "emptyUpload": uploads.upload_url(uploads.token("dir/empty.bin", 0)),
        "emptyDownload": download("dir/empty.bin"),
        "dirZip": download("dir", archive=True),
        "archive": f"{client}/download-archive?token={r.json()['token']}",
    }


def zip_entries(b64: str) -> dict[str, bytes]:
    zf = zipfile.ZipFile(io.BytesIO(base64.b64decode(b64)))
    assert zf.testzip() is None
    return {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}


@pytest.fixture
def uploads(storage_proxy) -> UploadFixture:
    return UploadFixture(storage_proxy)


def test_the_web_uis_flows_in_chromium(uploads, tmp_path):
    steps = ["big", "range", "missing", "resume", "small", "zips", "anchor"]
    out = run_browser(tmp_path, {"urls": webui_urls(uploads), "steps": steps, "bigSize": BIG, "resumeSize": RESUME})
    vfolder = uploads.vfolder

    # 64 MiB upload, fetched back in the page: the same SHA-256, and on disk.
    assert out["bigFetchStatus"] == 200
    assert out["bigFetchSha"] == out["bigSha"]
    assert hashlib.sha256((vfolder / "big.bin").read_bytes()).hexdigest() == out["bigSha"]
    # <a download> saved the same bytes.
    assert out["anchorSaved"]
    assert hashlib.sha256((tmp_path / "downloads" / "big.bin").read_bytes()).hexdigest() == out["bigSha"]
    # Range fetches; bytes=-100 is preflighted.
    assert out["range1"] == {"status": 206, "contentRange": f"bytes 1000-1999/{BIG}", "equal": True}
    assert out["rangeSuffix"] == {"status": 206, "contentRange": f"bytes {BIG - 100}-{BIG - 1}/{BIG}", "equal": True}
    # The 404's problem body is readable by the page.
    assert out["missing"]["status"] == 404, out["missing"]
    assert out["missing"]["body"]["error_code"], out["missing"]
    # Aborted at ~20 MiB, resumed by a new tus.Upload from what was kept.
    assert 15 * MiB <= out["resumedAt"] < RESUME, out["resumedAt"]
    assert out["resume"] == {"status": 200, "equal": True}
    # 1-byte and 0-byte files.
    one = base64.b64decode(out["one"]["b64"])
    assert (out["one"]["status"], out["one"]["equal"]) == (200, True)
    assert (vfolder / "dir" / "one.bin").read_bytes() == one
    assert out["empty"] == {"status": 200, "length": 0}
    assert (vfolder / "dir" / "empty.bin").read_bytes() == b""
    # The directory's zip and /download-archive, every byte.
    assert out["dirZip"]["status"] == 200 and "dir.zip" in out["dirZip"]["disposition"]
    assert zip_entries(out["dirZip"]["b64"]) == {"one.bin": one, "empty.bin": b""}
    assert out["archive"]["status"] == 200 and "picked.zip" in out["archive"]["disposition"]
    assert zip_entries(out["archive"]["b64"]) == {"dir/one.bin": one, "dir/empty.bin": b""}
    # And the folder shows only what the user put there.
    assert not (vfolder / ".upload").exists()
    print(f"browser upload: {out['bigMBps']:.0f} MB/s ({BIG >> 20} MiB in {out['bigSeconds']:.2f} s)")
