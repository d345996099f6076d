"""The tus client against the tus project's own server (@tus/server + @tus/file-store
from npm, run by node): creation, upload, resume after a killed connection,
termination, and how the client copes with the extensions FileStore lacks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from dropping_proxy import DroppingProxy
from node_tus_server import NodeTusServer, NodeUnavailable, install
from twisted.internet.defer import CancelledError

from storage.tus_client import RetryPolicy, UnsupportedByServer, UploadNotFound

ensure = pytest_twisted.ensureDeferred


@pytest.fixture(scope="session")
def node_install():
    try:
        return install()
    except NodeUnavailable as exc:
        pytest.skip(f"@tus/server unavailable: {exc}")


@pytest.fixture
def node_tus(node_install, tmp_path) -> Iterator[NodeTusServer]:
    store = tmp_path / "tus-store"
    store.mkdir()
    try:
        server = NodeTusServer(node_install, store)
    except NodeUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


PATIENT = RetryPolicy(retries=10, base_delay=0.05, max_delay=1.0)


@pytest.fixture
def make_client(make_client):
    def make(**kwargs):
        kwargs.setdefault("retry", PATIENT)
        return make_client(**kwargs)

    return make


def record_patches(client) -> list[int]:
    offsets: list[int] = []
    original = client.endpoint.patch

    async def patch(url, offset, *args):
        offsets.append(offset)
        return await original(url, offset, *args)

    client.endpoint.patch = patch
    return offsets


@ensure
async def test_options_advertise_creation(node_tus, make_client):
    info = await make_client().server_info(node_tus.creation_url)
    assert "1.0.0" in info.versions and info.supports("creation")


@pytest.mark.parametrize("chunk_size", [None, 256 * 1024])
@ensure
async def test_create_and_upload(node_tus, make_client, payload_file, chunk_size):
    path, data = payload_file(1_500_000)
    client = make_client(chunk_size=chunk_size)
    result = await client.upload(node_tus.creation_url, path, metadata={"filename": "p.bin"})
    assert node_tus.stored(result.url) == data
    status = await client.endpoint.head(result.url)
    assert status.offset == status.length == len(data)


@ensure
async def test_resume_after_killed_connection(node_tus, make_client, payload_file, reactor):
    path, data = payload_file(4 * 1024 * 1024)
    proxy = DroppingProxy(reactor, node_tus.port, drops=[1_500_000, 1_000_000]).listen()
    try:
        client = make_client()
        offsets = record_patches(client)
        result = await client.upload(f"{proxy.base_url}/files", path)
    finally:
        await proxy.port.stopListening()
    assert proxy.drops == 2
    assert node_tus.stored(result.url) == data
    assert len(offsets) == 3 and offsets[0] == 0
    assert 0 < offsets[1] < offsets[2] < len(data)  # the server kept what it got


@ensure
async def test_resume_later_from_the_url(node_tus, make_client, payload_file):
    path, data = payload_file(6 * 1024 * 1024)
    client = make_client(chunk_size=512 * 1024)
    holder = []

    def cancel_midway(progress):
        if progress.sent > 2 * 1024 * 1024 and not holder[0].called:
            holder[0].cancel()

    # create first, so the URL is known before cancelling
    url, _ = await client.endpoint.create(node_tus.creation_url, len(data), None)
    holder.append(client.resume(url, path, on_progress=cancel_midway))
    with pytest.raises(CancelledError):
        await holder[0]
    later = make_client()
    offsets = record_patches(later)
    await later.resume(url, path)
    assert node_tus.stored(url) == data
    assert offsets[0] >= 2 * 1024 * 1024 - 512 * 1024


@ensure
async def test_termination(node_tus, make_client):
    client = make_client()
    result = await client.upload(node_tus.creation_url, b"t" * 1000)
    await client.terminate(result.url)
    with pytest.raises(UploadNotFound):
        await client.resume(result.url, b"t" * 1000)


@ensure
async def test_checksum_when_supported_else_plain(node_tus, make_client, payload_file):
    path, data = payload_file(300_000)
    client = make_client(checksum="sha1")
    info = await client.server_info(node_tus.creation_url)
    result = await client.upload(node_tus.creation_url, path)
    assert node_tus.stored(result.url) == data
    if info.supports("checksum"):
        assert result.checksum_algorithm == "sha1"
    else:
        assert result.checksum_algorithm is None
        with pytest.raises(UnsupportedByServer):
            await make_client(checksum="sha1", require_checksum=True).upload(
                node_tus.creation_url, path)


@ensure
async def test_parallel_uses_concatenation_only_if_offered(node_tus, make_client, payload_file):
    path, data = payload_file(3 * 1024 * 1024)
    client = make_client(parallel=3)
    info = await client.server_info(node_tus.creation_url)
    result = await client.upload(node_tus.creation_url, path)
    assert len(result.partial_urls) == (3 if info.supports("concatenation") else 0)
    assert node_tus.stored(result.url) == data
