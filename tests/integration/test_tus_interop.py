"""Uploads from real tus clients into the real daemon (twistd, loopback):
tuspy, aiotusclient (Backend.AI's own client), tus-js-client under node, curl."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from support.upload_client import UploadFixture

SIZE = 3 * (1 << 20) + 12345


@pytest.fixture
def uploads(storage_proxy) -> UploadFixture:
    return UploadFixture(storage_proxy)


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "payload.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_tuspy_creation_and_chunked_patches(uploads, payload):
    tusclient = pytest.importorskip("tusclient.client", reason="tuspy is not installed (pip install tuspy)")
    token = uploads.token("tuspy/file.bin", SIZE)
    client = tusclient.TusClient(uploads.upload_url(token))
    uploader = client.uploader(str(payload), chunk_size=1 << 20, metadata={"filename": "file.bin"})
    uploader.upload()
    assert (uploads.vfolder / "tuspy" / "file.bin").read_bytes() == payload.read_bytes()
    assert uploads.offset(token) == SIZE


def test_tuspy_with_the_upload_url_and_checksums(uploads, payload):
    tusclient = pytest.importorskip("tusclient.client", reason="tuspy is not installed (pip install tuspy)")
    token = uploads.token("tuspy/url.bin", SIZE)
    client = tusclient.TusClient(uploads.upload_url(token))
    uploader = client.uploader(str(payload), url=uploads.upload_url(token), chunk_size=700_000,
                               upload_checksum=True)
    uploader.upload()
    assert (uploads.vfolder / "tuspy" / "url.bin").read_bytes() == payload.read_bytes()


def test_aiotusclient_as_backend_ai_uses_it(uploads, payload):
    client_mod = pytest.importorskip("aiotusclient.client", reason="aiotusclient is not installed")
    token = uploads.token("aiotus/file.bin", SIZE)
    client = client_mod.TusClient()
    uploader = client.async_uploader(file_path=str(payload), url=uploads.upload_url(token),
                                     upload_checksum=False, chunk_size=1 << 20, retries=0)

    asyncio.run(uploader.upload())
    assert (uploads.vfolder / "aiotus" / "file.bin").read_bytes() == payload.read_bytes()


def test_curl_one_patch(uploads, payload):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    token = uploads.token("curl/file.bin", SIZE)
    out = subprocess.run(
        [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH",
         "-H", "Tus-Resumable: 1.0.0", "-H", "Content-Type: application/offset+octet-stream",
         "-H", "Upload-Offset: 0", "--data-binary", f"@{payload}", uploads.upload_url(token)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.stdout == "204", out.stderr
    assert (uploads.vfolder / "curl" / "file.bin").read_bytes() == payload.read_bytes()


# -- tus-js-client under node ------------------------------------------------------------------

JS_UPLOAD = r"""
const tus = require('tus-js-client');
const fs = require('fs');
const [path, endpoint, uploadUrl, parallel] = process.argv.slice(2);
const file = fs.readFileSync(path);
const options = {
  chunkSize: 1024 * 1024,
  retryDelays: [0, 100, 500],
  metadata: { filename: 'file.bin' },
  onError: (err) => { console.error('ERROR ' + err); process.exit(1); },
  onSuccess: () => { console.log('OK'); process.exit(0); },
};
if (uploadUrl !== '-') options.uploadUrl = uploadUrl; else options.endpoint = endpoint;
if (parallel !== '1') { options.parallelUploads = Number(parallel); delete options.chunkSize; }
new tus.Upload(file, options).start();
"""


@pytest.fixture(scope="session")
def tus_js_dir() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the tus-js-client test")
    cache = Path(os.environ.get("TUS_JS_CLIENT_DIR", Path(tempfile.gettempdir()) / "storage-proxy-tus-js"))
    if not (cache / "node_modules" / "tus-js-client").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "package.json").write_text(json.dumps({"name": "tus-interop", "private": True}))
        result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "tus-js-client@4"], cwd=cache,
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.skip(f"npm install tus-js-client failed: {result.stderr[-500:]}")
    (cache / "upload.js").write_text(JS_UPLOAD)
    return cache


def run_js(tus_js_dir: Path, payload: Path, endpoint: str, upload_url: str, parallel: int) -> None:
    result = subprocess.run(["node", "upload.js", str(payload), endpoint, upload_url, str(parallel)],
                            cwd=tus_js_dir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_tus_js_client_with_the_upload_url(uploads, payload, tus_js_dir):
    token = uploads.token("js/url.bin", SIZE)
    run_js(tus_js_dir, payload, "-", uploads.upload_url(token), 1)
    assert (uploads.vfolder / "js" / "url.bin").read_bytes() == payload.read_bytes()


def test_tus_js_client_creation(uploads, payload, tus_js_dir):
    token = uploads.token("js/created.bin", SIZE)
    run_js(tus_js_dir, payload, uploads.upload_url(token), "-", 1)
    assert (uploads.vfolder / "js" / "created.bin").read_bytes() == payload.read_bytes()


def test_tus_js_client_parallel_uploads_use_concatenation(uploads, payload, tus_js_dir):
    token = uploads.token("js/parallel.bin", SIZE)
    run_js(tus_js_dir, payload, uploads.upload_url(token), "-", 3)
    assert (uploads.vfolder / "js" / "parallel.bin").read_bytes() == payload.read_bytes()
    assert not (uploads.vfolder / ".upload").exists()  # no part, state or staging dir left
