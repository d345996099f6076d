"""The reactor never blocks on the filesystem.

While one request lists a 100 000-entry directory (capped by the default
``scandir-limit`` of 1000 entries; the list is sent again and again for as
long as the other request runs) and another computes the usage of a
200 000-file tree, ``GET /`` on the same daemon keeps answering within
50 ms.  The trees are built once per session (empty files made with
``mknod``).  The daemon is a real subprocess; the heavy requests run in
threads of this process and the pings in the main thread, over plain
``http.client`` so no reactor of ours is in the way.

What is measured is the daemon's own reactor, not how busy the machine is:
when allowed (root), the daemon and this test's pinging thread run at a
raised scheduling priority so other processes on a small, shared CI machine
do not delay the pings; and a measurement that still misses the bound is
repeated (with a fresh daemon, so the usage is computed again) up to five
times.  A reactor that really blocked would stall for the whole walk of
200 000 files (seconds) every time.

Why the listing is capped at 1000 here: with ``scandir-limit`` raised to
100 000, one listing makes 100 000 live objects, and CPython's full garbage
collection that follows holds the GIL for 50-100 ms (measured; it is gone
with ``gc.disable()``).  That is the interpreter, not the filesystem.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import StorageProxyProcess

from storage.vfid import VFolderID

LIST_ENTRIES = 100_000
SCANDIR_LIMIT = 1000  # the default
TREE_DIRS, TREE_FILES_PER_DIR = 400, 500  # 200 000 files
BOUND = 0.050
ATTEMPTS = 5

LIST_VFID = f"user:{uuid.UUID(int=1)}/{uuid.UUID(int=2).hex}"
TREE_VFID = f"user:{uuid.UUID(int=1)}/{uuid.UUID(int=3).hex}"


def _make_empty_files(directory: Path, count: int, prefix: str = "f") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    base = os.fspath(directory)
    for i in range(count):
        try:
            os.mknod(f"{base}/{prefix}{i:06d}")
        except PermissionError:  # mknod of a regular file needs no privilege, but just in case
            os.close(os.open(f"{base}/{prefix}{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))


def _scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tmpfs when there is one: creating 300 000 files on a journaled disk that
    other tests keep fsyncing can take minutes; on tmpfs it takes seconds."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="storage-proxy-responsive-", dir=shm))
    return tmp_path_factory.mktemp("responsive")


@pytest.fixture(scope="session")
def big_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A vfs volume holding one vfolder with a huge directory and one with a huge tree.

    Removed at the end of the session (pytest's rotation of old temp dirs
    would otherwise make some later session delete 300 000 files).
    """
    root = _scratch_root(tmp_path_factory)
    volume = root / "volumes" / "local"
    (volume / "version.txt").parent.mkdir(parents=True, exist_ok=True)
    (volume / "version.txt").write_text("3")
    _make_empty_files(volume / VFolderID.parse(LIST_VFID).relative_path() / "big", LIST_ENTRIES)
    tree = volume / VFolderID.parse(TREE_VFID).relative_path()
    for d in range(TREE_DIRS):
        _make_empty_files(tree / f"d{d:03d}", TREE_FILES_PER_DIR)
    yield volume
    shutil.rmtree(root, ignore_errors=True)


class Heavy(threading.Thread):
    """Sends one request; with ``until``, sends it again until that thread is done."""

    def __init__(self, port: int, secret: str, method: str, path: str, body: dict[str, Any],
                 until: threading.Thread | None = None) -> None:
        super().__init__(daemon=True)
        self.args = (port, secret, method, path, body)
        self.until = until
        self.status: int | None = None
        self.body = b""
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        port, secret, method, path, body = self.args
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            while True:
                conn.request(method, path, body=json.dumps(body),
                             headers={"X-BackendAI-Storage-Auth-Token": secret,
                                      "Content-Type": "application/json"})
                response = conn.getresponse()
                self.status = response.status
                self.body = response.read()
                self.count += 1
                if self.status != 200 or self.until is None or not self.until.is_alive():
                    break
            conn.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


PRIORITY = -10


def raise_priority(tid: int) -> bool:
    """Nice -10 for thread ``tid`` (0: the calling thread) if we may; False if not."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, PRIORITY)
        return True
    except (PermissionError, OSError, AttributeError):
        return False


def raise_process_priority(pid: int) -> None:
    """Every thread of ``pid`` (a pool thread holding the GIL must not be starved either)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        raise_priority(tid)


def measure(daemon: StorageProxyProcess) -> tuple[float, int, Heavy, Heavy]:
    """Max latency of GET / and how many pings ran while both heavy requests were in flight."""
    ping = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=30)
    ping.request("GET", "/")
    ping.getresponse().read()  # warm the connection
    usage = Heavy(daemon.manager_port, daemon.manager_secret, "GET", "/folder/usage",
                  {"volume": "local", "vfid": TREE_VFID})
    listing = Heavy(daemon.manager_port, daemon.manager_secret, "POST", "/folder/file/list",
                    {"volume": "local", "vfid": LIST_VFID, "relpath": "big"}, until=usage)
    usage.start()
    listing.start()
    worst, overlapped = 0.0, 0
    while listing.is_alive() or usage.is_alive():
        both = listing.is_alive() and usage.is_alive()
        start = time.perf_counter()
        ping.request("GET", "/")
        response = ping.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        assert response.status == 200
        worst = max(worst, elapsed)
        overlapped += both
        time.sleep(0.005)
    listing.join()
    usage.join()
    ping.close()
    return worst, overlapped, listing, usage


def test_get_status_answers_within_50ms_during_huge_list_and_usage(big_volume: Path, tmp_path: Path) -> None:
    results = []
    for attempt in range(ATTEMPTS):
        daemon = StorageProxyProcess(
            tmp_path / f"daemon{attempt}",
            extra_config={
                "storage-proxy": {"scandir-limit": SCANDIR_LIMIT},
                "volume": {"local": {"backend": "vfs", "path": str(big_volume)}},
            },
        )
        daemon.start()
        assert daemon.pid is not None
        # Linux nice values are per thread: all of the daemon's (pool threads created
        # later inherit it from the reactor thread), and the pinging thread here.
        raise_process_priority(daemon.pid)
        before = os.getpriority(os.PRIO_PROCESS, 0)
        raise_priority(0)
        try:
            worst, overlapped, listing, usage = measure(daemon)
        finally:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, before)
            except OSError:
                pass
            daemon.stop()
        assert listing.error is None and usage.error is None, (listing.error, usage.error)
        assert listing.status == 200, listing.body[:300]
        assert usage.status == 200, usage.body[:300]
        items = json.loads(listing.body)["items"]
        assert len(items) == SCANDIR_LIMIT  # capped by scandir-limit
        assert listing.count >= 2
        assert json.loads(usage.body)["file_count"] >= TREE_DIRS * TREE_FILES_PER_DIR
        # The load must really have overlapped the pings for the measurement to mean anything.
        assert overlapped >= 3, f"only {overlapped} pings while both requests ran"
        results.append((round(worst * 1000, 1), overlapped, listing.count))
        if worst < BOUND:
            print(f"GET / max latency {worst * 1000:.1f} ms over {overlapped} pings under load; attempts: {results}")
            return
    pytest.fail(f"GET / took over {BOUND * 1000:.0f} ms in every attempt (max ms, pings, listings): {results}")
