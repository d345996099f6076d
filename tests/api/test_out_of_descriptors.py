"""At its open-file limit the daemon says "busy, retry" (503 problem+json with
Retry-After), never a 500: for a tus PATCH whose staging file cannot be
opened, for a HEAD, and for any route (storage.errors.out_of_descriptors)."""

from __future__ import annotations

import errno
import json
import os

import pytest_twisted
from support.tus_harness import TusHarness

import storage.uploads


def _exhausted(monkeypatch, code: int = errno.EMFILE) -> None:
    real_open = os.open

    def open_(path, *args, **kwargs):
        if ".upload" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(storage.uploads.os, "open", open_)


def _assert_busy(response, *, body: bool = True) -> None:
    assert response.status == 503
    assert response.header("Retry-After") == "1"
    if body:  # a HEAD answer has none
        assert response.header("Content-Type") == "application/problem+json"
        assert json.loads(response.body)["error_code"] == "storage-proxy_generic_unavailable"


def test_a_patch_at_the_open_file_limit_is_503_retry_and_the_upload_goes_on_after(tmp_path, monkeypatch):
    h = TusHarness(tmp_path)
    token, _ = h.new_upload(6)
    with monkeypatch.context() as m:
        _exhausted(m)
        r = h.patch(token, 0, b"abc")
        _assert_busy(r)
        assert r.header("Tus-Resumable") == "1.0.0"
    assert h.head(token).header("Upload-Offset") == "0"  # nothing was taken
    assert h.patch(token, 0, b"abcdef").status == 204
    assert h.target().read_bytes() == b"abcdef"


def test_a_head_at_the_system_wide_file_limit_is_503(tmp_path, monkeypatch):
    h = TusHarness(tmp_path)
    token, _ = h.new_upload(6)
    _exhausted(monkeypatch, errno.ENFILE)
    _assert_busy(h.head(token), body=False)


@pytest_twisted.ensureDeferred
async def test_any_route_at_the_open_file_limit_is_503_not_500():
    from klein import Klein
    from treq.testing import StubTreq

    from storage.api.problems import add_error_handling

    app = Klein()
    add_error_handling(app)

    @app.route("/files")
    def files(request):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    resp = await StubTreq(app.resource()).get("http://127.0.0.1/files")
    assert resp.code == 503
    assert resp.headers.getRawHeaders("retry-after") == ["1"]
    assert (await resp.json())["error_code"] == "storage-proxy_generic_unavailable"
