"""``[storage-proxy] num-proc = 2``: the real daemon (``twistd -n storage-proxy``) with two
client-API worker processes on one listening socket, on loopback.

Which worker answered is read from the daemon's own ``/metrics`` (every
worker's requests, labelled ``worker``) and, for a PATCH in flight, from
``/proc/locks`` (the pid holding the staging file's flock).  The workers are
found in ``/proc`` as the daemon's children running ``storage.worker``.

These start several processes each: they run once, in ``tox -e workers``
(``STORAGE_PROXY_WORKERS=1``; scripts/test), not in every Python env.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support.redis import REDIS_SERVER, RedisServer
from support.redis import SKIP_REASON as REDIS_SKIP
from support.upload_client import UploadFixture

pytestmark = pytest.mark.skipif(
    not os.environ.get("STORAGE_PROXY_WORKERS"),
    reason="the worker-process suite runs once, in tox -e workers (STORAGE_PROXY_WORKERS=1)",
)

WORKERS = {"storage-proxy": {"num-proc": 2, "shutdown-grace": "3s"}}


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``Z``: a zombie), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def worker_pids(daemon_pid: int) -> set[int]:
    """The live ``storage.worker`` children of the daemon, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"storage.worker" in cmdline and alive(int(entry.name)):
            found.add(int(entry.name))
    return found


def all_storage_workers() -> set[int]:
    """Every live ``storage.worker`` process whose daemon pid is in its command line."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"storage.worker" in cmdline and alive(int(entry.name)):
                found.add(int(entry.name))
    return found


def metrics(daemon: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(daemon.manager_url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def worker_counts(daemon: Any, method: str, status: str) -> dict[str, float]:
    """Client-API requests answered per worker, as /metrics says."""
    out: dict[str, float] = {}
    for (name, labels), value in metrics(daemon).items():
        d = dict(labels)
        if name == "storage_proxy_client_requests_total" and d.get("method") == method and d.get("status") == status:
            out[d["worker"]] = value
    return out


def workers_up(daemon: Any) -> dict[str, float]:
    return {dict(labels)["worker"]: v for (name, labels), v in metrics(daemon).items()
            if name == "storage_proxy_worker_up"}


def ready(daemon: Any) -> None:
    wait_for(lambda: workers_up(daemon) == {"0": 1.0, "1": 1.0}, what="both workers ready")


@pytest.fixture
def workers_daemon(storage_proxy_factory: Any) -> Any:
    daemon = storage_proxy_factory(extra_config=WORKERS)
    ready(daemon)
    return daemon


def staging_lock_pid(vfolder: Path, token: str, timeout: float = 20.0) -> int:
    """The pid holding the flock of this upload's staging file (read from /proc/locks)."""
    import jwt

    claims = jwt.decode(token, options={"verify_signature": False})
    st = (vfolder / ".upload" / claims["session"]).stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"

    def holder() -> int | None:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
                return int(fields[4])
        return None

    return wait_for(holder, timeout, "a worker to hold the upload's lock")


def open_patch(port: int, token: str, offset: int, length: int, first: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(
        f"PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        f"Content-Length: {length}\r\n\r\n".encode() + first
    )
    return s


def test_both_workers_serve_the_patches_of_one_upload(workers_daemon: Any) -> None:
    daemon = workers_daemon
    pids = worker_pids(daemon.pid)
    assert len(pids) == 2, pids
    uploads = UploadFixture(daemon)
    chunk = 64 << 10
    data = os.urandom(chunk * 48)
    token = uploads.token("big/one.bin", len(data))
    # One PATCH per connection (requests opens a new one each time); the kernel hands each
    # connection to whichever worker accepts first.  Bounded: at most 48 PATCHes.
    offset = 0
    while offset < len(data):
        r = uploads.patch(token, offset, data[offset:offset + chunk])
        assert r.status_code == 204, (r.status_code, r.text)
        offset += chunk
        if offset >= 16 * chunk and len(worker_counts(daemon, "PATCH", "204")) == 2:
            break
    per_worker = worker_counts(daemon, "PATCH", "204")
    assert set(per_worker) == {"0", "1"} and all(v >= 1 for v in per_worker.values()), per_worker
    # The rest in one PATCH, then the file is byte-exact whichever worker wrote what.
    assert uploads.patch(token, offset, data[offset:]).status_code == 204
    assert uploads.offset(token) == len(data)
    assert (uploads.vfolder / "big" / "one.bin").read_bytes() == data
    # The daemon (its manager API) is not one of the workers, and took no client request.
    assert daemon.pid not in pids


def refusals_by_worker(daemon: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for status in ("409", "423"):
        for w, v in worker_counts(daemon, "PATCH", status).items():
            out[w] = out.get(w, 0) + v
    return out


def heads_by_worker(daemon: Any) -> dict[str, float]:
    return worker_counts(daemon, "HEAD", "200")


def run_until_crossed(daemon: Any, uploads: UploadFixture, second: Any, counted: Any) -> list[str]:
    """PATCH A holds an upload on one worker (the flock holder, from /proc/locks); ``second``
    comes on new connections until one is answered by the *other* worker (per-worker counts
    in /metrics).  Each attempt is a new upload, the file checked byte-exact.  Bounded: 8."""
    size = 1 << 20
    outcomes = []
    for attempt in range(8):
        data = os.urandom(size)
        relpath = f"race/{attempt}.bin"
        token = uploads.token(relpath, size)
        a = open_patch(daemon.client_port, token, 0, size, data[:1000])
        try:
            holder = _writer_index(daemon, staging_lock_pid(uploads.vfolder, token))
            assert holder is not None
            before = counted(daemon)
            outcome = second(uploads, token, data)
            after = counted(daemon)
            answered_by = {w for w, v in after.items() if v > before.get(w, 0)}
            assert len(answered_by) == 1, (before, after)
        finally:
            a.close()
        # Whichever worker wrote what, the upload completes byte-exact from its durable offset.
        offset = uploads.offset(token)
        if offset < size:
            assert offset <= 1000  # nothing of a second writer's body was taken
            assert uploads.patch(token, offset, data[offset:]).status_code == 204
        assert (uploads.vfolder / relpath).read_bytes() == data
        outcomes.append(outcome)
        if answered_by != {holder}:
            return outcomes
    raise AssertionError(f"the second request never reached the other worker in 8 uploads ({outcomes})")


def test_a_second_patch_on_the_other_worker_never_interleaves(workers_daemon: Any) -> None:
    """Two PATCHes of one upload at once on two workers: the one streaming stops, keeping
    its bytes (as within one process: the newer request supersedes it), and the second, sent
    at a stale offset, is refused 409 (or 423 while the first still records): never two writers."""

    def stale_patch(uploads: UploadFixture, token: str, data: bytes) -> int:
        r = uploads.patch(token, 0, data)
        assert r.status_code in (409, 423), (r.status_code, r.text)
        # The first writer's bytes are on record: exactly what it sent, nothing of the second.
        return r.status_code

    outcomes = run_until_crossed(workers_daemon, UploadFixture(workers_daemon), stale_patch, refusals_by_worker)
    assert outcomes[-1] == 409, outcomes


def test_a_resume_on_the_other_worker_is_never_refused(workers_daemon: Any) -> None:
    """A client resuming (HEAD, then PATCH) while its old PATCH still streams in another
    worker: the HEAD stops that PATCH there and reports its bytes, the PATCH from that offset
    succeeds at once (issue 9's resume without waiting, across worker processes)."""

    def resume(uploads: UploadFixture, token: str, data: bytes) -> int:
        offset = uploads.offset(token)
        assert offset == 1000, offset  # the old PATCH's bytes, recorded before HEAD answered
        r = uploads.patch(token, offset, data[offset:])
        assert r.status_code == 204, (r.status_code, r.text)
        return offset

    run_until_crossed(workers_daemon, UploadFixture(workers_daemon), resume, heads_by_worker)


def _writer_index(daemon: Any, pid: int) -> str | None:
    """The ``worker`` label of ``pid`` (``storage_proxy_worker_pid`` in /metrics)."""
    for (name, labels), value in metrics(daemon).items():
        if name == "storage_proxy_worker_pid" and int(value) == pid:
            return dict(labels)["worker"]
    return None


def test_a_killed_worker_is_restarted_and_the_other_serves_meanwhile(workers_daemon: Any) -> None:
    daemon = workers_daemon
    pids = worker_pids(daemon.pid)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    # While it restarts, the client API answers (the other worker accepts on the same socket).
    for _ in range(20):
        r = requests.get(daemon.client_url + "/", timeout=10)
        assert r.status_code == 200
    wait_for(lambda: len(worker_pids(daemon.pid)) == 2 and victim not in worker_pids(daemon.pid),
             what="a new worker in place of the killed one")
    ready(daemon)
    restarts = {dict(labels)["worker"]: v for (name, labels), v in metrics(daemon).items()
                if name == "storage_proxy_worker_restarts_total"}
    assert sorted(restarts.values()) == [0.0, 1.0], restarts
    assert "restarting in 0.5s" in daemon.log
    # Kill the restarted one again right away: the backoff doubles.
    again = worker_pids(daemon.pid) - (pids - {victim})
    (new_pid,) = again
    os.kill(new_pid, signal.SIGKILL)
    wait_for(lambda: "restarting in 1.0s" in daemon.log, what="the doubled backoff")
    ready(daemon)
    uploads = UploadFixture(daemon)
    data = os.urandom(300_000)
    token = uploads.token("after.bin", len(data))
    assert uploads.patch(token, 0, data).status_code == 204
    assert (uploads.vfolder / "after.bin").read_bytes() == data
    health = requests.get(daemon.manager_url + "/health", timeout=10).json()
    checks = {c["component_id"]: c for c in health["connectivity"]["connectivity_checks"]}
    assert checks["client-workers"]["is_healthy"] is True
    # Both killed: until one is back, /readyz says the client API has no worker.
    both = worker_pids(daemon.pid)
    assert len(both) == 2, both
    for pid in both:
        os.kill(pid, signal.SIGKILL)
    seen = []

    def not_ready() -> Any:
        r = requests.get(daemon.manager_url + "/readyz", timeout=10)
        seen.append((r.status_code, r.text[-300:]))
        return r.json() if r.status_code == 503 else None  # (a Response is falsy when not ok)

    try:
        r = wait_for(not_ready, timeout=10, what="/readyz 503 with both workers down")
    except AssertionError:
        raise AssertionError(f"/readyz never 503 with both workers down: {seen[:3]}") from None
    checks = {c["component_id"]: c for c in r["connectivity"]["connectivity_checks"]}
    assert checks["client-workers"]["is_healthy"] is False
    assert checks["client-workers"]["error_message"].startswith("no client-API worker is running")
    ready(daemon)
    assert requests.get(daemon.manager_url + "/readyz", timeout=10).status_code == 200


def test_a_worker_killed_mid_patch_loses_nothing(workers_daemon: Any) -> None:
    """SIGKILL the worker a PATCH streams into: its flock dies with it, so the client's next
    HEAD and PATCH (on whichever worker takes them) resume at once from the durable offset."""
    daemon = workers_daemon
    uploads = UploadFixture(daemon)
    for round_ in range(3):  # bounded: three uploads, each killed at a different point
        data = os.urandom(4 << 20)
        token = uploads.token(f"killed/{round_}.bin", len(data))
        sent = (round_ + 1) * (1 << 20)
        a = open_patch(daemon.client_port, token, 0, len(data), data[:sent])
        holder = staging_lock_pid(uploads.vfolder, token)
        assert holder in worker_pids(daemon.pid)
        time.sleep(0.2)  # let it take some of the bytes
        os.kill(holder, signal.SIGKILL)
        a.close()
        started = time.monotonic()
        offset = uploads.offset(token)
        assert 0 <= offset <= sent
        r = uploads.patch(token, offset, data[offset:])
        assert r.status_code == 204, (r.status_code, r.text)
        assert time.monotonic() - started < 10  # no lease to wait out
        assert (uploads.vfolder / "killed" / f"{round_}.bin").read_bytes() == data
        wait_for(lambda h=holder: h not in worker_pids(daemon.pid) and len(worker_pids(daemon.pid)) == 2,
                 what="the killed worker replaced")
        ready(daemon)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_worker_is_left_behind(storage_proxy_factory: Any, how: str) -> None:
    daemon = storage_proxy_factory(extra_config=WORKERS)
    ready(daemon)
    pids = worker_pids(daemon.pid)
    assert len(pids) == 2
    # An upload in flight on a worker: its bytes so far are kept whatever stops it.
    uploads = UploadFixture(daemon)
    data = os.urandom(1 << 20)
    token = uploads.token("inflight.bin", len(data))
    s = open_patch(daemon.client_port, token, 0, len(data), data[:200_000])
    staging_lock_pid(uploads.vfolder, token)
    started = time.monotonic()
    os.kill(daemon.pid, getattr(signal, how))
    daemon.wait(30)
    # The daemon SIGKILLed: the workers notice (their control channel closes; PR_SET_PDEATHSIG)
    # and stop within shutdown-grace (3 s) plus start-up slack.
    wait_for(lambda: not any(alive(p) for p in pids), timeout=15, what=f"the workers to exit after {how}")
    s.close()
    assert time.monotonic() - started < 15
    assert not (all_storage_workers() & pids)
    if how != "SIGKILL":
        assert daemon.returncode in (0, -signal.SIGTERM, -signal.SIGINT, 1), daemon.returncode
    # Restarted (one worker now): the upload resumes from what the killed worker made durable.
    daemon.extra_config = {}
    daemon.start()
    offset = uploads.offset(token)
    assert 0 < offset <= 200_000
    assert uploads.patch(token, offset, data[offset:]).status_code == 204
    assert (uploads.vfolder / "inflight.bin").read_bytes() == data


@pytest.mark.skipif(REDIS_SERVER is None, reason=REDIS_SKIP)
def test_tasks_and_events_once_with_workers(storage_proxy_factory: Any, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        daemon = storage_proxy_factory(extra_config={**WORKERS, "redis": {"addr": redis.addr}})
        ready(daemon)
        uploads = UploadFixture(daemon)
        for i in range(3):
            (uploads.vfolder / f"f{i}").write_bytes(b"x" * 10)
        r = uploads.manager("POST", "/folder/delete", {"volume": "local", "vfid": str(uploads.vfid)})
        assert r.status_code == 202, r.text
        task_id = r.json()["bgtask_id"]
        wait_for(lambda: uploads.manager("GET", f"/bgtask/{task_id}", None).json()["status"] == "done",
                 what="the delete task to finish")
        assert not uploads.vfolder.exists()

        def stream() -> list[Any]:
            with redis.client() as c:
                return c.command("XRANGE", "events", "-", "+") or []

        entries = wait_for(stream, what="the deletion event")
        time.sleep(1.0)  # a second owner, if there were one, would have sent its copy by now
        entries = stream()
        names = [dict(zip(e[1][::2], e[1][1::2], strict=True))[b"name"] for e in entries]
        assert names == [b"vfolder_deletion_success"], names
        # The task journal and the outbox are the daemon's, once: the daemon has them open,
        # no worker has anything of the state dir open.
        state = (daemon.volume_path() / ".storage-proxy" / "state" / "test-proxy").resolve()

        def open_in_state(pid: int) -> set[str]:
            names = set()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = Path(os.readlink(fd))
                except OSError:
                    continue
                if target.parent == state:
                    names.add(target.name)
            return names

        assert {"events.outbox", "tasks.journal"} <= open_in_state(daemon.pid)
        workers = worker_pids(daemon.pid)
        assert len(workers) == 2
        for pid in workers:
            assert open_in_state(pid) == set(), pid
        # /metrics counts the events once.
        sent = {dict(labels).get("name"): v for (name, labels), v in metrics(daemon).items()
                if name == "storage_proxy_events_sent_total"}
        assert sent.get("vfolder_deletion_success") == 1.0
    finally:
        redis.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop privileges")
def test_workers_run_as_the_configured_user(tmp_path: Path) -> None:
    """Workers start after the drop, so they run as ``user`` -- or, where that user cannot run
    this interpreter (here: pyenv under a 0700 /root), the daemon refuses to start in one line."""
    import pwd
    import shutil
    import subprocess
    import tempfile

    from support.daemon import TWISTD, daemon_env

    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="storage-proxy-workers-priv-"))
    os.chmod(shared, 0o755)
    vol = shared / "vol"
    vol.mkdir()
    os.chown(vol, nobody.pw_uid, nobody.pw_gid)
    config = tmp_path / "c.toml"
    config.write_text(
        '[storage-proxy]\nsecret = "x"\nuser = "nobody"\nnum-proc = 2\nshutdown-grace = "2s"\n'
        '[api.manager]\nsecret = "y"\nservice-addr = {host = "127.0.0.1", port = 0}\n'
        '[api.client]\nservice-addr = {host = "127.0.0.1", port = 0}\n'
        f'[volume.local]\nbackend = "vfs"\npath = "{vol}"\n'
    )
    env = daemon_env()
    try:
        can_run = subprocess.run([sys.executable, "-c", "import storage.worker"], user=nobody.pw_uid,
                                 group=nobody.pw_gid, extra_groups=[], env=env, cwd="/",
                                 capture_output=True).returncode == 0
    except PermissionError:
        can_run = False
    try:
        if not can_run:
            out = subprocess.run([*TWISTD, "-n", "--pidfile=", "storage-proxy", "--config", str(config)],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert out.returncode == 1, out
            lines = [ln for ln in out.stderr.splitlines() if ln.startswith("storage-proxy: ")]
            assert len(lines) == 1 and lines[0].startswith(
                "storage-proxy: config: [storage-proxy] num-proc: workers run as uid "
                f"{nobody.pw_uid}, who cannot start {sys.executable}"), out.stderr
            return
        log = tmp_path / "log"
        with open(log, "wb") as out_file:
            proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "storage-proxy", "--config", str(config)],
                                    stdout=out_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            wait_for(lambda: log.read_text().count(") ready") == 2, 60, "both workers ready")
            for pid in [proc.pid, *worker_pids(proc.pid)]:
                status = Path(f"/proc/{pid}/status").read_text()
                uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
                assert set(uids) == {str(nobody.pw_uid)}, (pid, uids)
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_each_worker_counts_and_limits_its_own_connections(workers_daemon: Any) -> None:
    daemon = workers_daemon

    def open_by_worker() -> dict[str, float]:
        return {dict(labels)["worker"]: v for (name, labels), v in metrics(daemon).items()
                if name == "storage_proxy_connections_open" and dict(labels).get("api") == "client"}

    held = [socket.create_connection(("127.0.0.1", daemon.client_port), timeout=30) for _ in range(6)]
    try:
        # Both workers report (labelled worker=N); together they hold every connection.
        wait_for(lambda: set(open_by_worker()) == {"0", "1"} and sum(open_by_worker().values()) == 6,
                 what="the workers to count the 6 open connections")
        limits = {dict(labels)["worker"]: v for (name, labels), v in metrics(daemon).items()
                  if name == "storage_proxy_connections_limit" and dict(labels).get("api") == "client"}
        assert set(limits) == {"0", "1"} and all(v >= 64 for v in limits.values())
    finally:
        for s in held:
            s.close()
    wait_for(lambda: sum(open_by_worker().values()) == 0, what="the connections to close")


def test_tls_client_api_on_workers(storage_proxy_factory: Any, tmp_path: Path) -> None:
    """``[api.client] ssl-enabled``: each worker wraps the shared socket in TLS with the
    configured certificate (the one the client sees), every PATCH is answered, the file is exact."""
    import ssl

    from support.tls import self_signed

    cert, key = self_signed(tmp_path)
    daemon = storage_proxy_factory(extra_config={
        **WORKERS, "api": {"client": {"ssl-enabled": True, "ssl-cert": str(cert), "ssl-privkey": str(key)}}})
    ready(daemon)
    uploads = UploadFixture(daemon)
    chunk = 64 << 10
    data = os.urandom(chunk * 32)
    token = uploads.token("tls/file.bin", len(data))
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False  # the certificate names localhost; we dial 127.0.0.1
    offset = 0
    while offset < len(data):  # one TLS connection per PATCH
        with socket.create_connection(("127.0.0.1", daemon.client_port), timeout=30) as raw, \
                context.wrap_socket(raw) as s:
            assert s.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(cert.read_text())
            s.sendall(
                f"PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nTus-Resumable: 1.0.0\r\n"
                f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
                f"Content-Length: {chunk}\r\nConnection: close\r\n\r\n".encode() + data[offset:offset + chunk])
            reply = b""
            while b"\r\n\r\n" not in reply:
                part = s.recv(4096)
                if not part:
                    break
                reply += part
            assert reply.startswith(b"HTTP/1.1 204"), reply[:200]
        offset += chunk
    assert (uploads.vfolder / "tls" / "file.bin").read_bytes() == data
    per_worker = worker_counts(daemon, "PATCH", "204")
    assert sum(per_worker.values()) == 32, per_worker  # all through the workers' TLS
