"""The tus routes through the real client API (storage.api.client) with
treq's StubTreq: discovery, HEAD, creation, termination.  StubTreq builds its
own Site, so a PATCH there bypasses the streaming body handler: it must be
refused cleanly, never buffered and written."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from support.tus_harness import TUS, TusHarness
from treq.testing import StubTreq

from storage.api.client import ClientAPI
from storage.uploads import staging_path


def stub(tmp_path: Path) -> tuple[StubTreq, TusHarness]:
    h = TusHarness(tmp_path)
    api = ClientAPI(h.config, h.tus.volumes, h.pool, h.clock)
    return StubTreq(api.app.resource()), h


@pytest_twisted.ensureDeferred
async def test_options_through_the_client_api(tmp_path):
    treq, _ = stub(tmp_path)
    r = await treq.request("OPTIONS", "http://proxy/upload")
    assert r.code == 204
    assert r.headers.getRawHeaders("Tus-Version") == ["1.0.0"]
    assert "concatenation" in r.headers.getRawHeaders("Tus-Extension")[0]


@pytest_twisted.ensureDeferred
async def test_head_creation_and_termination_through_the_client_api(tmp_path):
    treq, h = stub(tmp_path)
    token, session = h.new_upload(10)
    r = await treq.head(f"http://proxy/upload?token={token}", headers=TUS)
    assert r.code == 200
    assert r.headers.getRawHeaders("Upload-Offset") == ["0"]
    r = await treq.post(f"http://proxy/upload?token={token}", headers=dict(TUS, **{"Upload-Length": "10"}))
    assert r.code == 201
    r = await treq.post(f"http://proxy/upload?token={token}",
                        headers=dict(TUS, **{"Upload-Length": "4", "Upload-Concat": "partial"}))
    assert r.code == 201
    partial = r.headers.getRawHeaders("Location")[0].split("?")[0]
    r = await treq.head(f"http://proxy/{partial}?token={token}", headers=TUS)
    assert r.code == 200 and r.headers.getRawHeaders("Upload-Concat") == ["partial"]
    r = await treq.delete(f"http://proxy/upload?token={token}", headers=TUS)
    assert r.code == 204
    r = await treq.head(f"http://proxy/upload?token={token}", headers=TUS)
    assert r.code == 404


@pytest_twisted.ensureDeferred
async def test_a_patch_that_bypassed_the_streaming_site_writes_nothing(tmp_path):
    treq, h = stub(tmp_path)
    token, session = h.new_upload(10)
    r = await treq.patch(f"http://proxy/upload?token={token}", data=b"abc",
                         headers=dict(TUS, **{"Content-Type": "application/offset+octet-stream",
                                              "Upload-Offset": "0"}))
    assert r.code == 415
    assert (await r.json())["type"].endswith("tus-unsupported-media-type")
    assert staging_path(h.vfolder, session).read_bytes() == b""


@pytest_twisted.ensureDeferred
async def test_get_is_not_a_tus_method(tmp_path):
    treq, h = stub(tmp_path)
    token, _ = h.new_upload(10)
    r = await treq.get(f"http://proxy/upload?token={token}", headers=TUS)
    assert r.code == 405
