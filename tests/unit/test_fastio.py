"""``storage._fastio`` (Cython) and ``storage._fastio_py`` give the same results.

Every test runs against both implementations; the compiled one is skipped
(with the reason) when it was not built.
"""

from __future__ import annotations

import errno
import importlib
import os
import socket
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import storage._fastio_py


def _native():
    try:
        return importlib.import_module("storage._fastio")
    except ImportError:
        return None


NATIVE_MODULE = _native()
IMPLS = [
    pytest.param(
        NATIVE_MODULE,
        id="native",
        marks=pytest.mark.skipif(NATIVE_MODULE is None, reason="storage._fastio is not compiled"),
    ),
    pytest.param(storage._fastio_py, id="python"),
]


@pytest.fixture(params=IMPLS)
def fio(request):
    return request.param


def _file(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDWR)


@pytest.fixture
def fds():
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def _payload(n: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


# -- sendfile ---------------------------------------------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def test_sendfile_sends_the_range(fio, tmp_path, fds):
    data = _payload(100_000)
    src = _file(tmp_path / "src", data)
    fds.append(src)
    a, b = socket.socketpair()
    with a, b:
        sent = fio.sendfile(a.fileno(), src, 1000, 5000)
        assert sent == 5000
        assert _recv_exactly(b, sent) == data[1000:6000]


def test_sendfile_short_count_at_eof_and_zero_past_it(fio, tmp_path, fds):
    data = _payload(3000)
    src = _file(tmp_path / "src", data)
    fds.append(src)
    a, b = socket.socketpair()
    with a, b:
        assert fio.sendfile(a.fileno(), src, 2500, 10_000) == 500
        assert _recv_exactly(b, 500) == data[2500:]
        assert fio.sendfile(a.fileno(), src, 3000, 10) == 0
        assert fio.sendfile(a.fileno(), src, 9000, 10) == 0


def test_sendfile_raises_blocking_when_the_socket_is_full(fio, tmp_path, fds):
    src = _file(tmp_path / "src", _payload(1 << 22))
    fds.append(src)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        total = 0
        with pytest.raises(BlockingIOError) as info:
            for _ in range(10_000):
                total += fio.sendfile(a.fileno(), src, total, (1 << 22) - total)
        assert info.value.errno == errno.EAGAIN
        assert 0 < total < (1 << 22)


def test_sendfile_broken_pipe(fio, tmp_path, fds):
    src = _file(tmp_path / "src", _payload(1000))
    fds.append(src)
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(BrokenPipeError):
        fio.sendfile(a.fileno(), src, 0, 1000)


def test_bad_fd_and_negative_arguments_raise_oserror(fio, tmp_path, fds):
    src = _file(tmp_path / "src", b"abc")
    fds.append(src)
    with pytest.raises(OSError) as info:
        fio.sendfile(-1, src, 0, 3)
    assert info.value.errno == errno.EBADF
    for call in (
        lambda: fio.sendfile(src, src, -1, 3),
        lambda: fio.copy_range(src, src, -5, 0, 3),
        lambda: fio.pwrite_all(src, [b"x"], -1),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EINVAL


# -- copy_range ------------------------------------------------------------


def test_copy_range_same_filesystem(fio, tmp_path, fds):
    data = _payload(3 * (1 << 20) + 17)
    src = _file(tmp_path / "src", data)
    dst = _file(tmp_path / "dst", b"")
    fds += [src, dst]
    assert fio.copy_range(src, dst, 0, 0, len(data)) == len(data)
    assert (tmp_path / "dst").read_bytes() == data


def test_copy_range_short_count_at_eof(fio, tmp_path, fds):
    data = _payload(10_000)
    src = _file(tmp_path / "src", data)
    dst = _file(tmp_path / "dst", b"")
    fds += [src, dst]
    assert fio.copy_range(src, dst, 9000, 5, 1 << 30) == 1000
    assert (tmp_path / "dst").read_bytes() == b"\0" * 5 + data[9000:]
    assert fio.copy_range(src, dst, 20_000, 0, 100) == 0
    assert fio.copy_range(src, dst, 0, 0, 0) == 0


@pytest.fixture
def shm_file():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm tmpfs here")
    path = Path("/dev/shm") / f"fastio-test-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


def test_copy_range_falls_back_across_filesystems(fio, tmp_path, fds, shm_file):
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm and the test directory are the same filesystem")
    data = _payload(2 * (1 << 20) + 5)
    src = _file(shm_file, data)
    dst = _file(tmp_path / "dst", b"")
    fds += [src, dst]
    try:
        os.copy_file_range(src, dst, 1, 0, 0)
        refused = False
    except OSError as exc:
        refused = exc.errno in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP)
    os.ftruncate(dst, 0)
    assert fio.copy_range(src, dst, 3, 1, len(data)) == len(data) - 3
    assert (tmp_path / "dst").read_bytes() == b"\0" + data[3:]
    if refused:
        # The kernel refused the direct copy, so the loop really ran.
        with pytest.raises(OSError) as info:
            os.copy_file_range(src, dst, 10, 0, 0)
        assert info.value.errno in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP)


def test_copy_range_enospc_reports_bytes_written_fallback(fio, tmp_path, fds, small_fs):
    data = _payload(3 * (1 << 20))
    src = _file(tmp_path / "src", data)
    dst = _file(small_fs / "dst", b"")
    fds += [src, dst]
    with pytest.raises(OSError) as info:
        fio.copy_range(src, dst, 0, 0, len(data))
    assert info.value.errno == errno.ENOSPC
    written = info.value.written
    assert 0 < written < len(data)
    on_disk = (small_fs / "dst").read_bytes()
    assert len(on_disk) == written
    assert on_disk == data[:written]


def test_copy_range_enospc_reports_bytes_written_in_kernel(fio, fds, small_fs):
    data = _payload(700 * 1024)
    src = _file(small_fs / "src", data)
    dst = _file(small_fs / "dst", b"")
    fds += [src, dst]
    with pytest.raises(OSError) as info:
        fio.copy_range(src, dst, 0, 0, len(data))
    assert info.value.errno == errno.ENOSPC
    written = info.value.written
    on_disk = (small_fs / "dst").read_bytes()
    assert len(on_disk) == written < len(data)
    assert on_disk == data[:written]


# -- pwrite_all -----------------------------------------------------------------


def test_pwrite_all_writes_in_order_at_offset(fio, tmp_path, fds):
    fd = _file(tmp_path / "f", b"0123456789")
    fds.append(fd)
    bufs = [b"ab", bytearray(b"cd"), memoryview(b"xxefxx")[2:4], b"", b"g"]
    assert fio.pwrite_all(fd, bufs, 3) == 7
    assert (tmp_path / "f").read_bytes() == b"012abcdefg"
    assert fio.pwrite_all(fd, [], 0) == 0


def test_pwrite_all_more_buffers_than_iov_max(fio, tmp_path, fds):
    fd = _file(tmp_path / "f", b"")
    fds.append(fd)
    bufs = [bytes([i % 256]) * (i % 7) for i in range(3000)]
    assert fio.pwrite_all(fd, bufs, 0) == sum(map(len, bufs))
    assert (tmp_path / "f").read_bytes() == b"".join(bufs)


def test_pwrite_all_rejects_non_buffers(fio, tmp_path, fds):
    fd = _file(tmp_path / "f", b"")
    fds.append(fd)
    with pytest.raises(TypeError):
        fio.pwrite_all(fd, ["text"], 0)


def test_pwrite_all_enospc_reports_bytes_written(fio, fds, small_fs):
    fd = _file(small_fs / "f", b"")
    fds.append(fd)
    bufs = [_payload(256 * 1024, seed=i) for i in range(8)]
    with pytest.raises(OSError) as info:
        fio.pwrite_all(fd, bufs, 0)
    assert info.value.errno == errno.ENOSPC
    written = info.value.written
    on_disk = (small_fs / "f").read_bytes()
    assert len(on_disk) == written < 8 * 256 * 1024
    assert on_disk == b"".join(bufs)[:written]


# -- the small helpers --------------------------------------------------------


def test_fdatasync(fio, tmp_path, fds):
    fd = _file(tmp_path / "f", b"abc")
    fds.append(fd)
    fio.fdatasync(fd)
    with pytest.raises(OSError):
        fio.fdatasync(1 << 20)  # not an open fd


# -- both implementations agree on random inputs ----------------------------------

impls_present = [m for m in (NATIVE_MODULE, storage._fastio_py) if m is not None]


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 70_000),
    src_off=st.integers(0, 80_000),
    dst_off=st.integers(0, 5000),
    count=st.integers(0, 90_000),
)
def test_copy_range_agrees_with_a_model(tmp_path_factory, size, src_off, dst_off, count):
    base = tmp_path_factory.mktemp("cr")
    data = _payload(size, seed=size % 13)
    (base / "src").write_bytes(data)
    expected = data[src_off:src_off + count]
    for impl in impls_present:
        dst_path = base / f"dst-{impl.__name__}"
        dst_path.write_bytes(b"")
        src = os.open(base / "src", os.O_RDONLY)
        dst = os.open(dst_path, os.O_RDWR)
        try:
            assert impl.copy_range(src, dst, src_off, dst_off, count) == len(expected)
        finally:
            os.close(src)
            os.close(dst)
        got = dst_path.read_bytes()
        assert got == (b"\0" * dst_off + expected if expected else b"")


@settings(max_examples=40, deadline=None)
@given(bufs=st.lists(st.binary(max_size=3000), max_size=40), offset=st.integers(0, 10_000))
def test_pwrite_all_agrees_with_a_model(tmp_path_factory, bufs, offset):
    base = tmp_path_factory.mktemp("pw")
    joined = b"".join(bufs)
    for impl in impls_present:
        path = base / f"f-{impl.__name__}"
        path.write_bytes(b"")
        fd = os.open(path, os.O_RDWR)
        try:
            assert impl.pwrite_all(fd, bufs, offset) == len(joined)
        finally:
            os.close(fd)
        assert path.read_bytes() == (b"\0" * offset + joined if joined else b"")


def test_fastio_picks_native_unless_forced(monkeypatch):
    import storage.fastio as fastio

    monkeypatch.setenv("STORAGE_PROXY_PURE_PYTHON", "1")
    module, native = fastio._load()
    assert module is storage._fastio_py and native is False
    monkeypatch.delenv("STORAGE_PROXY_PURE_PYTHON")
    module, native = fastio._load()
    assert native is (NATIVE_MODULE is not None)
    for name in fastio.IMPLEMENTATIONS:
        assert callable(getattr(module, name))
