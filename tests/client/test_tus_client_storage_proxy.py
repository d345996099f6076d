"""The tus client and the CLIs against storage-proxy itself: the real daemon
(``twistd -n storage-proxy``) on loopback, upload tokens from the manager API.

Each test that needs a tus extension checks that the daemon advertises it
(OPTIONS Tus-Extension) and is skipped with that reason otherwise.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq
from dropping_proxy import DroppingProxy
from support.daemon import StorageProxyProcess
from test_tus_cli import run_cli
from twisted.internet.defer import CancelledError, succeed

from storage.manager_client import ManagerClient
from storage.tus_client import ChecksumMismatch, InvalidToken, RetryPolicy
from storage.tus_client.headers import ServerInfo
from storage.tus_client.sources import FileSource
from storage.vfid import VFolderID

ensure = pytest_twisted.ensureDeferred
VOLUME = "local"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageProxyProcess]:
    proc = StorageProxyProcess(tmp_path_factory.mktemp("tus-client-e2e"))
    proc.start()
    yield proc
    proc.stop()


class Proxy:
    """One vfolder on the daemon; upload/download tokens for it."""

    def __init__(self, daemon: StorageProxyProcess) -> None:
        self.daemon = daemon
        self.manager = ManagerClient(daemon.manager_url, daemon.manager_secret)
        self.vfid = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"

    async def setup(self) -> Proxy:
        await self.manager.create_folder(VOLUME, self.vfid)
        return self

    @property
    def vfolder(self) -> Path:
        return self.daemon.volume_path(VOLUME) / VFolderID.parse(self.vfid).relative_path()

    async def upload_url(self, relpath: str, size: int, base: str | None = None) -> str:
        token = await self.manager.upload_token(VOLUME, self.vfid, relpath, size)
        return f"{base or self.daemon.client_url}/upload?token={token}"

    async def download_url(self, relpath: str) -> str:
        token = await self.manager.download_token(VOLUME, self.vfid, relpath)
        return f"{self.daemon.client_url}/download?token={token}"

    async def server_info(self) -> ServerInfo:
        response = await treq.request("OPTIONS", f"{self.daemon.client_url}/upload")
        await response.content()
        return ServerInfo.from_headers(
            {k.decode(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()})

    async def require(self, *extensions: str) -> None:
        info = await self.server_info()
        missing = [e for e in extensions if not info.supports(e)]
        if missing:
            pytest.skip(f"storage-proxy does not advertise tus {', '.join(missing)} "
                        f"(Tus-Extension: {', '.join(info.extensions) or 'none'})")


@pytest.fixture
def proxy(daemon) -> Proxy:
    return Proxy(daemon)


# The daemon may take a moment to close a cut or cancelled PATCH (423 meanwhile):
# give the retries room on a loaded machine.
PATIENT = RetryPolicy(retries=10, base_delay=0.05, max_delay=1.0)


@pytest.fixture
def make_client(make_client):
    def make(**kwargs):
        kwargs.setdefault("retry", PATIENT)
        return make_client(**kwargs)

    return make


@ensure
async def test_upload_in_one_patch(proxy, make_client, payload_file):
    await proxy.setup()
    path, data = payload_file(5 * 1024 * 1024 + 17)
    url = await proxy.upload_url("dir/one.bin", len(data))
    result = await make_client().upload(url, path)
    assert result.url == url
    assert (proxy.vfolder / "dir" / "one.bin").read_bytes() == data


@ensure
async def test_empty_file(proxy, make_client):
    """A prepared upload of 0 bytes completes with one empty PATCH."""
    await proxy.setup()
    url = await proxy.upload_url("empty.bin", 0)
    await make_client().upload(url, b"")
    assert (proxy.vfolder / "empty.bin").read_bytes() == b""


@ensure
async def test_killed_connection_mid_patch_resumes(proxy, make_client, payload_file, reactor):
    await proxy.setup()
    path, data = payload_file(6 * 1024 * 1024)
    port = proxy.daemon.client_port
    cut = DroppingProxy(reactor, port, drops=[2_000_000, 1_500_000]).listen()
    try:
        url = await proxy.upload_url("cut.bin", len(data), base=cut.base_url)
        client = make_client()
        offsets: list[int] = []
        original = client.endpoint.patch

        async def patch(url, offset, *args):
            offsets.append(offset)
            return await original(url, offset, *args)

        client.endpoint.patch = patch
        await client.upload(url, path)
    finally:
        await cut.port.stopListening()
    assert cut.drops == 2
    assert (proxy.vfolder / "cut.bin").read_bytes() == data
    # storage-proxy keeps the bytes of an interrupted PATCH, so the client goes on
    # from inside the interrupted body.  (A HEAD that races the daemon's handling
    # of the cut may still report the older offset, or the PATCH after it may get
    # 423 while the cut one is being closed: the client then just tries again.)
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert any(0 < offset < len(data) for offset in offsets)
    assert len(offsets) <= 6


@ensure
async def test_cancel_then_resume_later(proxy, make_client, payload_file):
    await proxy.setup()
    path, data = payload_file(8 * 1024 * 1024)
    url = await proxy.upload_url("later.bin", len(data))
    holder = []

    def cancel_midway(progress):
        if progress.sent >= 3 * 1024 * 1024 and not holder[0].called:
            holder[0].cancel()

    holder.append(make_client(chunk_size=1024 * 1024).upload(url, path, on_progress=cancel_midway))
    with pytest.raises(CancelledError):
        await holder[0]
    assert not (proxy.vfolder / "later.bin").exists()
    await make_client().resume(url, path)
    assert (proxy.vfolder / "later.bin").read_bytes() == data


@ensure
async def test_parallel_upload_via_concatenation(proxy, make_client, payload_file):
    await proxy.setup()
    await proxy.require("concatenation")
    path, data = payload_file(8 * 1024 * 1024 + 5)
    url = await proxy.upload_url("parallel.bin", len(data))
    result = await make_client(parallel=4, checksum="sha256").upload(url, path)
    assert len(result.partial_urls) == 4
    assert (proxy.vfolder / "parallel.bin").read_bytes() == data


@ensure
async def test_checksummed_chunks(proxy, make_client, payload_file):
    await proxy.setup()
    await proxy.require("checksum")
    path, data = payload_file(3 * 1024 * 1024)
    url = await proxy.upload_url("sum.bin", len(data))
    result = await make_client(checksum="sha256", chunk_size=1024 * 1024).upload(url, path)
    assert result.checksum_algorithm == "sha256"
    assert (proxy.vfolder / "sum.bin").read_bytes() == data


class LyingSource(FileSource):
    """Claims a wrong digest for the first ``lies`` chunks (a corrupted transfer)."""

    def __init__(self, *args, lies: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lies = lies

    def digest(self, algorithm, start, end):
        if self.lies > 0:
            self.lies -= 1
            return succeed(b"\0" * 32 if algorithm == "sha256" else b"\0" * 20)
        return super().digest(algorithm, start, end)


@ensure
async def test_checksum_mismatch_is_retried(proxy, make_client, payload_file, reactor):
    await proxy.setup()
    await proxy.require("checksum")
    path, data = payload_file(2 * 1024 * 1024)
    url = await proxy.upload_url("mismatch.bin", len(data))
    source = LyingSource(path, reactor, lies=2)
    await make_client(checksum="sha256", chunk_size=1024 * 1024).upload(url, source)
    assert (proxy.vfolder / "mismatch.bin").read_bytes() == data


@ensure
async def test_checksum_mismatch_persistent(proxy, make_client, payload_file, reactor):
    await proxy.setup()
    await proxy.require("checksum")
    path, data = payload_file(1024 * 1024)
    url = await proxy.upload_url("bad.bin", len(data))
    source = LyingSource(path, reactor, lies=100)
    with pytest.raises(ChecksumMismatch) as info:
        await make_client(checksum="sha256").upload(url, source)
    assert info.value.status == 460
    assert isinstance(info.value.problem, dict)  # the daemon's problem+json
    assert not (proxy.vfolder / "bad.bin").exists()


@ensure
async def test_forged_token(proxy, make_client, daemon):
    with pytest.raises(InvalidToken) as info:
        await make_client().upload(f"{daemon.client_url}/upload?token=not-a-jwt", b"x" * 10)
    assert info.value.status in (400, 403)


@ensure
async def test_termination(proxy, make_client):
    await proxy.setup()
    await proxy.require("termination")
    url = await proxy.upload_url("gone.bin", 1000)
    client = make_client(chunk_size=100)
    holder = []

    def cancel_early(progress):
        if progress.sent >= 300 and not holder[0].called:
            holder[0].cancel()

    holder.append(client.upload(url, os.urandom(1000), on_progress=cancel_early))
    with pytest.raises(CancelledError):
        await holder[0]
    await client.terminate(url)
    with pytest.raises(InvalidToken) as info:
        await client.resume(url, os.urandom(1000))
    assert info.value.status == 404


@ensure
async def test_clis_upload_then_download(proxy, payload_file, tmp_path):
    await proxy.setup()
    path, data = payload_file(3 * 1024 * 1024, name="cli payload.bin")
    url = await proxy.upload_url("cli/é file.bin", len(data))
    out, err, code = await run_cli("upload", url, str(path), "--chunk-size", "1m")
    assert code == 0, err
    assert (proxy.vfolder / "cli" / "é file.bin").read_bytes() == data
    # download by the name in Content-Disposition, resuming a partial file
    workdir = tmp_path / "dl"
    workdir.mkdir()
    (workdir / "é file.bin").write_bytes(data[:1_000_000])
    out, err, code = await run_cli("download", await proxy.download_url("cli/é file.bin"),
                                   cwd=workdir)
    assert code == 0, err
    assert out.strip() == "é file.bin"
    assert (workdir / "é file.bin").read_bytes() == data
    assert "ignored the range" not in err


@ensure
async def test_cli_upload_expired_token_exit_1(daemon, payload_file):
    path, _ = payload_file(10)
    out, err, code = await run_cli("upload", f"{daemon.client_url}/upload?token=x.y.z", str(path))
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("upload failed: 4")


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("the daemon tests run on Linux")


# Runs a CLI module and, at exit, writes the process's own peak RSS (VmHWM, which
# counts only this program: the ru_maxrss that wait4 reports also counts the
# forking parent's memory, carried over by fork and exec).
MEASURE = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as status, open(os.environ["PEAK_RSS_FILE"], "w") as out:
        out.write(next(l for l in status if l.startswith("VmHWM:")).split()[1])
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run_measured(args: list[str], peak_file: Path) -> tuple[int, int, str]:
    """Run a CLI module; (exit code, peak RSS in KiB, stderr)."""
    import subprocess

    from test_tus_cli import cli_env

    env = dict(cli_env(), PEAK_RSS_FILE=str(peak_file))
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    return proc.returncode, int(peak_file.read_text()), proc.stderr.decode(errors="replace")


@ensure
async def test_cli_streams_a_large_file_in_bounded_memory(proxy, tmp_path):
    """128 MiB in one PATCH: the uploader's peak RSS stays far below the file size."""
    from twisted.internet.threads import deferToThread

    await proxy.setup()
    size = 128 * 1024 * 1024
    path = tmp_path / "large.bin"
    with open(path, "wb") as f:
        block = os.urandom(1024 * 1024)
        for _ in range(size // len(block)):
            f.write(block)
    url = await proxy.upload_url("large.bin", size)
    code, peak_kib, err = await deferToThread(
        _run_measured, ["storage.cli.upload", url, str(path), "-q"], tmp_path / "peak")
    assert code == 0, err
    assert (proxy.vfolder / "large.bin").stat().st_size == size
    # an idle CLI peaks at ~50 MiB (Python, Twisted, treq); the whole file would add 128
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB for a {size >> 20} MiB upload"
