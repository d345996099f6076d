"""The console entry points, run as subprocesses against the fake servers."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from fake_download_server import FakeDownloadServer
from fake_tus_server import Drop, Status
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

import storage
from storage.cli import download as download_cli
from storage.cli import upload as upload_cli

ensure = pytest_twisted.ensureDeferred


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(storage.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("COLUMNS", None)
    return env


async def run_cli(module: str, *args: str, cwd: Path | None = None) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", f"storage.cli.{module}", *args], env=cli_env(),
        path=str(cwd) if cwd else None)
    return out.decode(), err.decode(), code


@pytest_twisted.async_yield_fixture
async def downloads(reactor, tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    servers = []

    def make(**kwargs) -> FakeDownloadServer:
        fake = FakeDownloadServer(root, **kwargs).listen(reactor)
        servers.append(fake)
        return fake

    yield make
    for fake in servers:
        await fake.port.stopListening()


# -- upload ---------------------------------------------------------------

@ensure
async def test_upload_ok_with_plain_progress_lines(fake, payload_file):
    path, data = payload_file(3_000_000)
    url = fake.precreate(len(data))
    out, err, code = await run_cli("upload", url, str(path), "--chunk-size", "256k")
    assert code == 0, err
    assert fake.data(url) == data
    assert out.strip() == url
    lines = [line for line in err.splitlines() if line.startswith("upload payload.bin:")]
    assert 2 <= len(lines) <= 13
    assert "\r" not in err and lines[-1].startswith("upload payload.bin: 100%")
    assert "uploaded 3000000 bytes" in err


@ensure
async def test_upload_creates_with_metadata_parallel_and_checksum(fake, payload_file):
    path, data = payload_file(2 * 1024 * 1024 + 3)
    out, err, code = await run_cli("upload", fake.creation_url, str(path), "--parallel", "2",
                                   "--checksum", "sha256", "--metadata", "kind=test", "-q")
    assert code == 0, err
    assert fake.data(out.strip()) == data
    assert err == ""
    final_post = [h for m, _, h in fake.requests if m == "POST"][-1]
    assert final_post["upload-concat"].startswith("final;")


@ensure
async def test_upload_resumes_after_drops(fake, payload_file):
    path, data = payload_file(1_000_000)
    url = fake.precreate(len(data))
    fake.add_faults("PATCH", Drop(300_000))
    out, err, code = await run_cli("upload", url, str(path), "-q")
    assert code == 0, err
    assert fake.data(url) == data
    assert [offset for _, offset, _ in fake.patches] == [0, 300_000]


@ensure
async def test_upload_failure_exit_1_with_one_line(fake, payload_file):
    path, _ = payload_file(1000)
    url = fake.precreate(1000)
    fake.add_faults("PATCH", Status(507, {"title": "Insufficient Storage",
                                          "detail": "quota scope user:x is full"}))
    out, err, code = await run_cli("upload", url, str(path), "-q")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "upload failed: 507 Insufficient Storage: Insufficient Storage: quota scope user:x is full")


@ensure
async def test_upload_missing_file_exit_1(fake, tmp_path):
    out, err, code = await run_cli("upload", fake.precreate(10), str(tmp_path / "nope"))
    assert code == 1 and "upload failed: not a readable file" in err


@pytest.mark.parametrize("args", [
    [],
    ["http://x/"],
    ["http://x/", "f", "--chunk-size", "lots"],
    ["http://x/", "f", "--parallel", "0"],
    ["http://x/", "f", "--checksum", "crc32"],
    ["http://x/", "f", "--metadata", "novalue"],
    ["http://x/", "f", "--retries", "-1"],
    ["http://x/", "-"],
])
def test_upload_usage_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as info:
        upload_cli.main(args)
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


@ensure
async def test_usage_exit_code_of_the_real_process():
    out, err, code = await run_cli("upload", "http://x/", "f", "--parallel", "0")
    assert code == 2 and "usage:" in err


# -- download -------------------------------------------------------------

@ensure
async def test_download_to_output(downloads, tmp_path):
    server = downloads()
    data = os.urandom(2_000_000)
    (server.root / "blob.bin").write_bytes(data)
    target = tmp_path / "out.bin"
    out, err, code = await run_cli("download", f"{server.base_url}/files/blob.bin", "-o",
                                   str(target))
    assert code == 0, err
    assert target.read_bytes() == data
    lines = [line for line in err.splitlines() if line.startswith("download out.bin:")]
    assert 1 <= len(lines) <= 13 and "\r" not in err


@ensure
async def test_download_resumes_a_partial_file(downloads, tmp_path):
    server = downloads()
    data = os.urandom(500_000)
    (server.root / "blob.bin").write_bytes(data)
    target = tmp_path / "out.bin"
    target.write_bytes(data[:123_456])
    out, err, code = await run_cli("download", f"{server.base_url}/files/blob.bin", "-o",
                                   str(target))
    assert code == 0, err
    assert target.read_bytes() == data
    assert "ignored the range" not in err  # a 206 continued the file
    assert "120.6 KiB of 488.3 KiB" in err.splitlines()[0]  # started at byte 123456


@ensure
async def test_download_names_the_file_from_content_disposition(downloads, tmp_path):
    server = downloads()
    name = "résumé 2026.txt"
    data = b"hello " * 1000
    (server.root / name).write_bytes(data)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / name).write_bytes(data[:100])  # a partial earlier download
    from urllib.parse import quote

    out, err, code = await run_cli("download", f"{server.base_url}/files/{quote(name)}", "-q",
                                   cwd=workdir)
    assert code == 0, err
    assert (workdir / name).read_bytes() == data
    assert out.strip() == name


@ensure
async def test_download_restarts_when_range_is_ignored(downloads, tmp_path):
    server = downloads()
    data = os.urandom(100_000)
    (server.root / "blob.bin").write_bytes(data)
    target = tmp_path / "out.bin"
    target.write_bytes(b"x" * 50_000)
    out, err, code = await run_cli("download", f"{server.base_url}/norange/blob.bin", "-o",
                                   str(target))
    assert code == 0, err
    assert target.read_bytes() == data
    assert "ignored the range" in err


@ensure
async def test_download_already_complete(downloads, tmp_path):
    server = downloads()
    data = os.urandom(10_000)
    (server.root / "blob.bin").write_bytes(data)
    target = tmp_path / "out.bin"
    target.write_bytes(data)
    out, err, code = await run_cli("download", f"{server.base_url}/files/blob.bin", "-o",
                                   str(target))
    assert code == 0, err
    assert target.read_bytes() == data and "already complete" in err


@ensure
async def test_download_retries_a_dropped_connection_with_range(downloads, tmp_path):
    server = downloads(cut_after=40_000, cuts=2)
    data = os.urandom(100_000)
    (server.root / "blob.bin").write_bytes(data)
    target = tmp_path / "out.bin"
    # --retries 1: each cut made progress, so neither counts against the next
    out, err, code = await run_cli("download", f"{server.base_url}/cut/blob.bin", "-o",
                                   str(target), "-q", "--retries", "1")
    assert code == 0, err
    assert target.read_bytes() == data
    assert server.ranges == [None, "bytes=40000-", "bytes=80000-"]


@ensure
async def test_download_404_exit_1(downloads, tmp_path):
    server = downloads()
    out, err, code = await run_cli("download", f"{server.base_url}/missing", "-o",
                                   str(tmp_path / "x"))
    assert code == 1
    assert err.strip().splitlines()[-1] == "download failed: 404 Not Found: File not found"


@pytest.mark.parametrize("args", [[], ["http://x/", "--retries", "-2"], ["http://x/", "-o"]])
def test_download_usage_exit_2(args, capsys):
    with pytest.raises(SystemExit) as info:
        download_cli.main(args)
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


@ensure
async def test_upload_draws_a_bar_on_a_terminal(fake, payload_file, reactor):
    """stderr on a pseudo-terminal: the bar is redrawn in place with rate and ETA."""
    path, data = payload_file(2_000_000)
    url = fake.precreate(len(data))
    master, slave = pty.openpty()
    done: Deferred = Deferred()
    chunks: list[bytes] = []

    class Child(ProcessProtocol):
        def processEnded(self, reason):
            done.callback(reason.value.exitCode)

    def drain(_fd, _events=None):
        try:
            while True:
                piece = os.read(master, 65536)
                if not piece:
                    break
                chunks.append(piece)
        except (BlockingIOError, OSError):
            pass

    os.set_blocking(master, False)
    reader = LoopingCall(drain, master)
    reader.start(0.02)
    try:
        reactor.spawnProcess(
            Child(), sys.executable,
            [sys.executable, "-m", "storage.cli.upload", url, str(path), "--chunk-size", "200k"],
            env=cli_env(), childFDs={0: "w", 1: "r", 2: slave})
        code = await done
    finally:
        reader.stop()
        drain(master)
        os.close(slave)
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert code == 0, text
    assert fake.data(url) == data
    assert "\r" in text and "ETA" in text and "/s" in text
    assert "100.0%" in text and "uploaded 2000000 bytes" in text


@ensure
async def test_upload_interrupted_exit_1(payload_file, reactor):
    """Ctrl-C (SIGINT) cancels the upload: exit 1 and a hint to run it again."""
    path, _ = payload_file(1000)
    reached: Deferred = Deferred()

    class Silent(Protocol):  # accepts the request and never answers
        def connectionMade(self):
            if not reached.called:
                reached.callback(None)

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    done: Deferred = Deferred()
    err: list[bytes] = []

    class Child(ProcessProtocol):
        def errReceived(self, data):
            err.append(data)

        def processEnded(self, reason):
            done.callback(reason.value.exitCode)

    url = f"http://127.0.0.1:{port.getHost().port}/upload?token=t"
    process = reactor.spawnProcess(
        Child(), sys.executable, [sys.executable, "-m", "storage.cli.upload", url, str(path)],
        env=cli_env())
    try:
        await reached
        process.signalProcess("INT")
        code = await done
    finally:
        await port.stopListening()
    assert code == 1
    assert b"upload failed: interrupted" in b"".join(err)


@pytest.mark.parametrize("keep_partial", [True, False])
@ensure
async def test_upload_from_stdin_resumes(fake_factory, keep_partial):
    """stdin cannot seek, yet a PATCH cut in the middle is resumed: the stream
    keeps one chunk to rewind (the server keeps part of it, or none)."""
    fake = fake_factory(keep_partial=keep_partial)
    data = os.urandom(300_000)
    url = fake.precreate(len(data))
    fake.add_faults("PATCH", None, Drop(30_000))  # the second chunk is cut
    proc = await deferToThread(
        subprocess.run, [sys.executable, "-m", "storage.cli.upload", url, "-", "--size",
                         str(len(data)), "--chunk-size", "64k", "-q"],
        input=data, capture_output=True, env=cli_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert fake.data(url) == data
    offsets = [offset for _, offset, _ in fake.patches]
    assert offsets[:3] == [0, 65536, 65536 + 30_000 if keep_partial else 65536], fake.patches
