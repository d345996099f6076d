"""schemathesis over both OpenAPI documents, against a live daemon (``tox -e schemathesis``).

A real ``twistd -n storage-proxy`` with a vfs volume on a tmp dir; vfolders (one
holding a file and a directory) made through the manager API first; the hooks
(``st_hooks.py``) put the real volume and vfolders into generated bodies and
give client-API cases fresh tokens.  Each run: every operation, the examples,
coverage (which includes the negative cases), fuzzing in positive and negative
modes and the stateful phase along the documents' links, a fixed number of
examples per operation, every check schemathesis has except those listed in
``EXCLUDED_CHECKS`` with the reason.  Then the filesystem is checked: nothing
was written outside the volume's vfolders (and the daemon's own state).

Gated by ``STORAGE_PROXY_SCHEMATHESIS=1`` (the tox env sets it): it needs the
schemathesis package, and takes about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import StorageProxyProcess

from storage.vfid import VFolderID

pytestmark = pytest.mark.skipif(
    os.environ.get("STORAGE_PROXY_SCHEMATHESIS") != "1",
    reason="the schemathesis contract run: tox -e schemathesis (STORAGE_PROXY_SCHEMATHESIS=1)")

HERE = Path(__file__).resolve().parent
AUTH = "X-BackendAI-Storage-Auth-Token"
MAX_EXAMPLES = int(os.environ.get("STORAGE_PROXY_SCHEMATHESIS_EXAMPLES", "8"))
# Every check but these, each for a reason:
EXCLUDED_CHECKS = {
    # Positive data a JSON Schema cannot tell from bad data: the converters check
    # more than the document can say (a relpath's "..", names counted in UTF-8
    # bytes), and most positive cases name a vfolder that does not exist (404).
    "positive_data_acceptance": "stricter checks than a schema can express, and ids of missing vfolders",
    # The manager API authenticates by a shared secret, not per user: there is
    # no object-level authorization to test.
    "object_level_authorization": "one shared secret; no users",
    # It deletes a resource and expects the link to find it gone (404); our
    # deletes are idempotent background tasks, as upstream's.
    "use_after_free": "deletes are idempotent background tasks",
    "ensure_resource_availability": "a vfolder made by one case may be deleted by another in the same run",
}


def _manager(daemon: StorageProxyProcess, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(daemon.manager_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={AUTH: daemon.manager_secret, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        data = response.read()
        return json.loads(data) if data else None


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[StorageProxyProcess]:
    artifacts = tmp_path / "daemon" / "artifacts"
    proc = StorageProxyProcess(tmp_path / "daemon", extra_config={"artifact-storages": {
        "models": {"type": "vfs_storage", "vfs-storage": {"base-path": str(artifacts)}}}})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(daemon: StorageProxyProcess, api: str, env: dict[str, str], report: Path) -> subprocess.CompletedProcess[str]:
    url = daemon.manager_url if api == "manager" else daemon.client_url
    args = [
        os.environ.get("STORAGE_PROXY_SCHEMATHESIS_BIN", str(Path(sys.executable).with_name("schemathesis"))),
        "--config-file", str(HERE / "schemathesis.toml"), "run", f"{url}/openapi.json",
        "--checks", "all", "--exclude-checks", ",".join(sorted(EXCLUDED_CHECKS)),
        "--max-examples", str(MAX_EXAMPLES), "--seed", os.environ.get("STORAGE_PROXY_SCHEMATHESIS_SEED", "1"),
        "--mode", "all", "--workers", "1", "--request-timeout", "30", "--no-color",
        "--suppress-health-check", "all", "--report", "ndjson", "--report-dir", str(report),
        "--max-failures", "25", "--continue-on-failure",
    ]
    if api == "manager":
        args += ["-H", f"{AUTH}: {daemon.manager_secret}"]
    # cwd: schemathesis keeps a .schemathesis/ cache where it runs.
    return subprocess.run(args, env=env, cwd=report.parent, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.parametrize("api", ["manager", "client"])
def test_schemathesis_finds_nothing(daemon: StorageProxyProcess, tmp_path: Path, api: str) -> None:
    volume_root = daemon.volume_path("local")
    vfids = [f"user:{uuid.uuid4()}/{uuid.uuid4().hex}" for _ in range(3)]
    for vfid in vfids:
        _manager(daemon, "/folder/create", {"volume": "local", "vfid": vfid})
    _manager(daemon, "/folder/file/mkdir", {"volume": "local", "vfid": vfids[0], "relpath": "dir/sub"})
    token = _manager(daemon, "/folder/file/upload", {"volume": "local", "vfid": vfids[0], "relpath": "data.bin",
                                                     "size": 11})["token"]
    upload = urllib.request.Request(
        f"{daemon.client_url}/upload?token={token}", data=b"hello world", method="PATCH",
        headers={"Tus-Resumable": "1.0.0", "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    with urllib.request.urlopen(upload, timeout=30) as response:
        assert response.status == 204
    # Siblings of the volume the daemon must never touch.
    outside = daemon.workdir / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    top_before = sorted(p.name for p in daemon.workdir.iterdir())

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "SCHEMATHESIS_HOOKS": "st_hooks",
        "ST_MANAGER_URL": daemon.manager_url,
        "ST_MANAGER_SECRET": daemon.manager_secret,
        "ST_VOLUME": "local",
        "ST_VFIDS": ",".join(vfids[1:]),
        "ST_FIXTURE_VFID": vfids[0],
        "ST_FILE": "data.bin",
        "ST_DIR": "dir",
        "ST_ARTIFACT_STORAGE": "models",
    }
    # STORAGE_PROXY_SCHEMATHESIS_REPORT=DIR keeps the run's NDJSON events there.
    report_dir = Path(os.environ.get("STORAGE_PROXY_SCHEMATHESIS_REPORT", tmp_path / "report")) / api
    report_dir.mkdir(parents=True, exist_ok=True)
    result = _run(daemon, api, env, report_dir)
    report = result.stdout[-20000:] + result.stderr[-5000:]
    print(result.stdout)  # the run's summary, in pytest's captured output
    assert result.returncode == 0, report
    assert " 0 passed" not in report  # it really ran

    # Nothing outside the volume changed; inside it, only vfolders (and their
    # .upload staging), the volume's version file and the daemon's own state.
    assert _tree(outside) == {"keep"} and (outside / "keep").read_text() == "x"
    assert sorted(p.name for p in daemon.workdir.iterdir()) == top_before
    assert sorted(p.name for p in daemon.volume_path("local").parent.iterdir()) == ["local"]
    for path in volume_root.rglob("*"):
        rel = path.relative_to(volume_root).parts
        if rel[0] in (".storage-proxy", "version.txt"):
            continue
        # <quota scope hex>/<2>/<2>/<rest> or the bare form <2>/<2>/<rest>; anything
        # deeper is inside a vfolder.  Both prefixes must look like vfolder paths.
        assert _is_vfolder_prefix(rel), path
    assert "Traceback" not in daemon.log, daemon.log[-5000:]
    if api == "client":  # the downloads' file: no case names its vfolder but through tokens
        fixture = volume_root / VFolderID.parse(vfids[0]).relative_path()
        assert (fixture / "data.bin").read_bytes() == b"hello world"


def _is_vfolder_prefix(parts: tuple[str, ...]) -> bool:
    hexchars = set("0123456789abcdef")

    def is_hex(s: str, n: int | None = None) -> bool:
        return set(s) <= hexchars and (n is None or len(s) == n)

    if len(parts) >= 1 and is_hex(parts[0], 32):  # <qs hex>/<2>/<2>/<28>/...
        layout = [(1, 2), (2, 2), (3, 28)]
    else:  # bare folder: <2>/<2>/<28>/...
        layout = [(0, 2), (1, 2), (2, 28)]
    return all(len(parts) <= i or is_hex(parts[i], n) for i, n in layout)
