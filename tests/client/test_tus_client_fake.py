"""The tus client against the in-process fake server, with injected faults."""

from __future__ import annotations

import base64
import io
import os

import pytest
import pytest_twisted
from fake_tus_server import Drop, Offset, Status, corrupt_checksums
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater

from storage.tus_client import (
    BytesSource,
    ChecksumMismatch,
    ConnectionFailed,
    InsufficientStorage,
    InvalidToken,
    OffsetConflict,
    ProtocolViolation,
    ServerError,
    StreamSource,
    UnsupportedByServer,
    UploadLengthMismatch,
    UploadNotFound,
    UploadTooLarge,
)

ensure = pytest_twisted.ensureDeferred


def patch_offsets(fake, key=None):
    return [offset for k, offset, _ in fake.patches if key is None or k == key]


@ensure
async def test_creation_upload_in_one_patch(fake, make_client, payload_file):
    path, data = payload_file(300_000)
    client = make_client()
    result = await client.upload(fake.creation_url, path, metadata={"filename": "ü.bin"})
    assert fake.data(result.url) == data
    assert len(fake.patches) == 1
    post = [h for m, _, h in fake.requests if m == "POST"][0]
    assert post["upload-length"] == str(len(data))
    key, value = post["upload-metadata"].split(" ")
    assert key == "filename" and base64.b64decode(value).decode() == "ü.bin"
    assert result.url.startswith("http://127.0.0.1:")  # relative Location resolved


@ensure
async def test_absolute_location(fake_factory, make_client):
    fake = fake_factory(relative_location=False)
    result = await make_client().upload(fake.creation_url, b"x" * 1000)
    assert fake.data(result.url) == b"x" * 1000


@ensure
async def test_existing_url_heads_first_and_resumes(fake, make_client, payload_file):
    path, data = payload_file(200_000)
    url = fake.precreate(len(data))
    fake.uploads["token:tok"].data += data[:70_000]  # an earlier, interrupted client
    await make_client().upload(url, path)
    assert fake.data(url) == data
    methods = [m for m, _, _ in fake.requests]
    assert methods[:3] == ["OPTIONS", "HEAD", "PATCH"]
    assert "POST" not in methods
    assert patch_offsets(fake) == [70_000]  # bytes the server had were not re-sent
    assert fake.patches[0][2] == len(data) - 70_000


@ensure
async def test_resume_later_from_url(fake, make_client):
    data = os.urandom(50_000)
    url = fake.precreate(len(data))
    fake.uploads["token:tok"].data += data[:12_345]
    result = await make_client().resume(url, data)
    assert result.url == url and fake.data(url) == data


@ensure
async def test_chunks_share_one_keepalive_connection(fake, make_client, payload_file):
    path, data = payload_file(1_000_000)
    url = fake.precreate(len(data))
    await make_client(chunk_size=100_000).upload(url, path)
    assert fake.data(url) == data
    assert patch_offsets(fake) == list(range(0, 1_000_000, 100_000))
    assert fake.connections == 1


@ensure
async def test_dropped_patch_resumes_from_kept_bytes(fake, make_client, payload_file):
    path, data = payload_file(3_000_000)
    url = fake.precreate(len(data))
    fake.add_faults("PATCH", Drop(1_000_000), Drop(500_000))
    await make_client().upload(url, path)
    assert fake.data(url) == data
    assert patch_offsets(fake) == [0, 1_000_000, 1_500_000]


@ensure
async def test_dropped_patch_resent_when_server_discards(fake_factory, make_client, payload_file):
    fake = fake_factory(keep_partial=False)  # upstream: an interrupted PATCH is lost whole
    path, data = payload_file(1_000_000)
    url = fake.precreate(len(data))
    fake.add_faults("PATCH", Drop(300_000))
    await make_client(chunk_size=400_000).upload(url, path)
    assert fake.data(url) == data
    assert patch_offsets(fake) == [0, 0, 400_000, 800_000]


@pytest.mark.parametrize("code", [500, 503, 409, 423])
@ensure
async def test_transient_statuses_are_retried(fake, make_client, code):
    data = os.urandom(10_000)
    url = fake.precreate(len(data))
    fake.add_faults("PATCH", Status(code), Status(code))
    await make_client().upload(url, data)
    assert fake.data(url) == data
    heads = [m for m, _, _ in fake.requests].count("HEAD")
    assert heads == 3  # the offset is re-read after each failure


@ensure
async def test_persistent_409_is_offset_conflict(fake, make_client):
    url = fake.precreate(100)
    fake.add_faults("PATCH", *[Status(409, {"title": "upload-offset-mismatch"})] * 10)
    with pytest.raises(OffsetConflict) as info:
        await make_client().upload(url, b"a" * 100)
    assert info.value.status == 409
    assert info.value.problem["title"] == "upload-offset-mismatch"
    assert len(fake.patches) == 5  # the first try and 4 retries


@ensure
async def test_persistent_5xx_gives_up(fake, make_client):
    url = fake.precreate(100)
    fake.add_faults("PATCH", *[Status(502)] * 10)
    with pytest.raises(ServerError) as info:
        await make_client().upload(url, b"a" * 100)
    assert info.value.status == 502


@ensure
async def test_507_is_insufficient_storage_and_not_retried(fake, make_client):
    url = fake.precreate(100)
    fake.add_faults("PATCH", Status(507, {"title": "Insufficient Storage",
                                          "detail": "quota scope user:abc is full"}))
    with pytest.raises(InsufficientStorage) as info:
        await make_client().upload(url, b"a" * 100)
    assert str(info.value).startswith("507 Insufficient Storage: ")
    assert "quota scope user:abc is full" in str(info.value)
    assert len(fake.patches) == 1


@ensure
async def test_413_on_creation(fake_factory, make_client):
    fake = fake_factory()
    fake.add_faults("POST", Status(413))
    with pytest.raises(UploadTooLarge):
        await make_client().upload(fake.creation_url, b"a" * 100)


@ensure
async def test_max_size_is_checked_before_sending(fake_factory, make_client):
    fake = fake_factory(max_size=10)
    with pytest.raises(UploadTooLarge):
        await make_client().upload(fake.creation_url, b"a" * 100)
    assert not fake.patches


@pytest.mark.parametrize("code", [403, 404])
@ensure
async def test_token_rejected(fake, make_client, code):
    url = fake.precreate(100)
    fake.add_faults("HEAD", Status(code))  # a HEAD answer has no body to carry a problem
    with pytest.raises(InvalidToken) as info:
        await make_client().upload(url, b"a" * 100)
    assert info.value.status == code
    fake.add_faults("PATCH", Status(code, {"title": "token expired"}))
    with pytest.raises(InvalidToken) as info:
        await make_client().upload(url, b"a" * 100)
    assert info.value.problem["title"] == "token expired"
    assert "token expired" in str(info.value)


@ensure
async def test_unknown_plain_upload_is_not_found(fake, make_client):
    with pytest.raises(UploadNotFound):
        await make_client().resume(fake.base_url + "/files/nope", b"a")


@ensure
async def test_length_mismatch(fake, make_client):
    url = fake.precreate(99)
    with pytest.raises(UploadLengthMismatch):
        await make_client().upload(url, b"a" * 100)


@pytest.mark.parametrize("raw", [None, "garbage", "-5", "1e3", "999999"])
@ensure
async def test_bad_patch_offsets_are_protocol_violations(fake, make_client, raw):
    url = fake.precreate(100)
    fake.add_faults("PATCH", Offset(raw))
    with pytest.raises(ProtocolViolation):
        await make_client().upload(url, b"a" * 100)


@pytest.mark.parametrize("raw", [None, "x", "101"])
@ensure
async def test_bad_head_offsets_are_protocol_violations(fake, make_client, raw):
    url = fake.precreate(100)
    fake.add_faults("HEAD", Offset(raw))
    with pytest.raises(ProtocolViolation):
        await make_client().upload(url, b"a" * 100)


@ensure
async def test_offset_going_backwards(fake, make_client):
    url = fake.precreate(1000)
    # 400 bytes confirmed, then a 500; the re-read offset is below what was confirmed
    fake.add_faults("PATCH", Status(500))
    fake.add_faults("HEAD", None, Offset("100"))
    with pytest.raises(ProtocolViolation, match="backwards"):
        client = make_client(chunk_size=400)
        await client.upload(url, b"a" * 1000)


@ensure
async def test_offset_past_what_was_sent(fake, make_client):
    url = fake.precreate(1000)
    fake.add_faults("PATCH", Status(500))
    fake.add_faults("HEAD", None, Offset("900"))
    with pytest.raises(ProtocolViolation, match="past"):
        await make_client(chunk_size=400).upload(url, b"a" * 1000)


@ensure
async def test_checksum_sent_and_verified(fake, make_client, payload_file):
    path, data = payload_file(250_000)
    url = fake.precreate(len(data))
    result = await make_client(checksum="sha256", chunk_size=100_000).upload(url, path)
    assert result.checksum_algorithm == "sha256"
    assert fake.data(url) == data
    checksums = [h["upload-checksum"] for m, _, h in fake.requests if m == "PATCH"]
    assert len(checksums) == 3 and all(c.startswith("sha256 ") for c in checksums)


@ensure
async def test_checksum_mismatch_retried_then_ok(fake, make_client):
    data = os.urandom(5000)
    url = fake.precreate(len(data))
    corrupt_checksums(fake, 2)
    await make_client(checksum="md5").upload(url, data)
    assert fake.data(url) == data and len(fake.patches) == 3


@ensure
async def test_checksum_mismatch_persistent(fake, make_client):
    url = fake.precreate(5000)
    corrupt_checksums(fake, 10)
    with pytest.raises(ChecksumMismatch) as info:
        await make_client(checksum="sha1").upload(url, b"b" * 5000)
    assert info.value.status == 460 and len(fake.patches) == 3


@ensure
async def test_checksum_not_advertised(fake_factory, make_client):
    fake = fake_factory(extensions=("creation",))
    result = await make_client(checksum="sha256").upload(fake.creation_url, b"c" * 100)
    assert result.checksum_algorithm is None
    assert all("upload-checksum" not in h for _, _, h in fake.requests)
    with pytest.raises(UnsupportedByServer):
        await make_client(checksum="sha256", require_checksum=True).upload(
            fake.creation_url, b"c" * 100)


@ensure
async def test_checksum_auto_picks_the_best_offered(fake_factory, make_client):
    fake = fake_factory(checksum_algorithms=("md5", "sha1"))
    result = await make_client(checksum="auto").upload(fake.creation_url, b"c" * 100)
    assert result.checksum_algorithm == "sha1"


@ensure
async def test_parallel_concatenation(fake, make_client, payload_file):
    path, data = payload_file(3 * 1024 * 1024 + 7)
    result = await make_client(parallel=3, checksum="sha1").upload(fake.creation_url, path)
    assert len(result.partial_urls) == 3
    assert fake.data(result.url) == data
    posts = [h.get("upload-concat") for m, _, h in fake.requests if m == "POST"]
    assert posts[:3] == ["partial"] * 3
    assert posts[3].startswith("final;") and len(posts[3][len("final;"):].split()) == 3


@ensure
async def test_parallel_into_backendai_url(fake, make_client, payload_file):
    path, data = payload_file(2 * 1024 * 1024)
    url = fake.precreate(len(data))
    result = await make_client(parallel=2).upload(url, path)
    assert result.url == url and fake.data(url) == data


@ensure
async def test_parallel_part_survives_drops(fake, make_client, payload_file):
    path, data = payload_file(4 * 1024 * 1024)
    fake.add_faults("PATCH", Drop(300_000))
    result = await make_client(parallel=4).upload(fake.creation_url, path)
    assert fake.data(result.url) == data


@ensure
async def test_parallel_falls_back_to_sequential(fake_factory, make_client, payload_file):
    fake = fake_factory(extensions=("creation", "termination"))
    path, data = payload_file(3 * 1024 * 1024)
    result = await make_client(parallel=3).upload(fake.creation_url, path)
    assert result.partial_urls == [] and fake.data(result.url) == data
    assert len(fake.patches) == 1


@ensure
async def test_parallel_failure_terminates_partials(fake, make_client, payload_file):
    path, _ = payload_file(2 * 1024 * 1024)
    fake.add_faults("PATCH", Status(507))
    with pytest.raises(InsufficientStorage):
        await make_client(parallel=2).upload(fake.creation_url, path)
    assert fake.uploads == {}  # both partials were DELETEd


@ensure
async def test_terminate(fake, make_client):
    result = await make_client().upload(fake.creation_url, b"z" * 10)
    client = make_client()
    await client.terminate(result.url)
    with pytest.raises(UploadNotFound):
        await client.resume(result.url, b"z" * 10)


@ensure
async def test_progress_is_reported_while_the_body_streams(fake, make_client, payload_file):
    path, data = payload_file(4 * 1024 * 1024)
    url = fake.precreate(len(data))
    seen = []
    await make_client().upload(url, path, on_progress=seen.append)
    assert len(fake.patches) == 1
    assert len([p for p in seen if 0 < p.sent < len(data)]) >= 3
    assert seen[-1].sent == seen[-1].total == len(data)
    assert all(p.total == len(data) for p in seen)
    assert max(p.rate for p in seen) > 0


@ensure
async def test_progress_goes_back_to_the_server_offset_after_a_drop(fake_factory, make_client,
                                                                    payload_file):
    fake = fake_factory(keep_partial=False)
    path, data = payload_file(2 * 1024 * 1024)
    url = fake.precreate(len(data))
    fake.add_faults("PATCH", Drop(1024 * 1024))
    seen = []
    await make_client().upload(url, path, on_progress=seen.append)
    sent = [p.sent for p in seen]
    assert 0 in sent[1:]  # back to 0 once the server said it kept nothing
    assert sent[-1] == len(data)


@ensure
async def test_cancel_stops_the_patch_and_retries(fake, make_client, reactor, payload_file):
    path, data = payload_file(8 * 1024 * 1024)
    url = fake.precreate(len(data))
    client = make_client(chunk_size=1024 * 1024)
    holder: list[Deferred] = []

    def on_progress(progress):
        if progress.sent >= 2 * 1024 * 1024 and not holder[0].called:
            holder[0].cancel()

    d = client.upload(url, path, on_progress=on_progress)
    holder.append(d)
    with pytest.raises(CancelledError):
        await d
    count = len(fake.requests)
    await deferLater(reactor, 0.3, lambda: None)
    assert len(fake.requests) == count  # nothing was retried after the cancel
    assert len(fake.uploads["token:tok"].data) < len(data)
    # and the upload resumes later from where the server is
    await make_client().resume(url, path)
    assert fake.data(url) == data


@ensure
async def test_cancel_during_backoff(fake, make_client, reactor):
    from storage.tus_client import RetryPolicy

    url = fake.precreate(100)
    fake.add_faults("PATCH", Status(503))
    client = make_client(retry=RetryPolicy(retries=3, base_delay=10, max_delay=10),
                         random=lambda: 1.0)
    d = client.upload(url, b"q" * 100)
    await deferLater(reactor, 0.2, lambda: None)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert len(fake.patches) == 1


@ensure
async def test_connection_refused(make_client):
    client = make_client()
    with pytest.raises(ConnectionFailed):
        await client.upload("http://127.0.0.1:9/upload?token=x", b"a")


@ensure
async def test_unseekable_stream(fake, make_client, reactor):
    read_fd, write_fd = os.pipe()
    data = os.urandom(200_000)

    def writer():
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(data)

    reactor.callInThread(writer)
    with os.fdopen(read_fd, "rb") as stream:
        url = fake.precreate(len(data))
        source = StreamSource(stream, len(data), reactor)
        await make_client(chunk_size=64_000).upload(url, source)
    assert fake.data(url) == data


@ensure
async def test_seekable_stream_resumes_after_drop(fake_factory, make_client, reactor):
    fake = fake_factory(keep_partial=False)
    data = os.urandom(300_000)
    url = fake.precreate(len(data))
    fake.add_faults("PATCH", Drop(100_000))
    await make_client().upload(url, StreamSource(io.BytesIO(data), len(data), reactor))
    assert fake.data(url) == data


@ensure
async def test_bytes_source_and_empty_upload(fake, make_client):
    result = await make_client().upload(fake.creation_url, BytesSource(b""))
    assert fake.data(result.url) == b"" and not fake.patches  # complete at creation
    url = fake.precreate(0)
    await make_client().upload(url, b"")
    assert [(offset, n) for _, offset, n in fake.patches] == [(0, 0)]  # one empty PATCH


@ensure
async def test_transient_failures_before_the_first_patch_are_retried(fake, make_client):
    """A 503 on OPTIONS must not make the client think the server has no checksum
    extension, and HEAD / creation are retried like PATCH."""
    fake.add_faults("OPTIONS", Status(503))
    fake.add_faults("POST", Status(502))
    result = await make_client(checksum="sha256", require_checksum=True).upload(
        fake.creation_url, b"d" * 1000)
    assert result.checksum_algorithm == "sha256" and fake.data(result.url) == b"d" * 1000
    url = fake.precreate(1000)
    fake.add_faults("HEAD", Status(503), Status(500))
    await make_client().upload(url, b"e" * 1000)
    assert fake.data(url) == b"e" * 1000


@ensure
async def test_concatenated_upload_is_checked(fake, make_client, payload_file):
    path, _ = payload_file(2 * 1024 * 1024)
    fake.add_faults("HEAD", None, Offset("5"))  # the creation URL's HEAD, then the final's
    with pytest.raises(ProtocolViolation, match="concatenated upload reports 5"):
        await make_client(parallel=2).upload(fake.creation_url, path)


@ensure
async def test_cancel_aborts_the_patch_in_flight(fake, make_client, reactor, payload_file):
    """One 16 MiB PATCH cancelled after 2 MiB: the body never reaches its end."""
    path, data = payload_file(16 * 1024 * 1024)
    url = fake.precreate(len(data))
    holder: list[Deferred] = []

    def on_progress(progress):
        if progress.sent >= 2 * 1024 * 1024 and not holder[0].called:
            holder[0].cancel()

    holder.append(make_client().upload(url, path, on_progress=on_progress))
    with pytest.raises(CancelledError):
        await holder[0]
    await deferLater(reactor, 0.3, lambda: None)
    assert fake.uploads["token:tok"].data == b""  # the fake applies a PATCH only when whole
    assert len(fake.patches) == 0  # and twisted.web never saw a complete request
