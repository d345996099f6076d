"""The FlashBlade REST client against the fake array (contract tests, not hardware)."""

from __future__ import annotations

import pytest
import pytest_twisted
from fake_flashblade import API_TOKEN
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer

from backends.purestorage.purity import (
    PurityClient,
    PurityError,
    PurityUnauthorized,
    _error_messages,
)


def client_for(fb, **kw) -> PurityClient:
    kw.setdefault("api_version", "1.8")
    kw.setdefault("ssl_verify", False)
    kw.setdefault("timeout", 10)
    return PurityClient(fb.endpoint, kw.pop("api_token", API_TOKEN), **kw)


@pytest_twisted.ensureDeferred
async def test_hwinfo_metadata_has_upstreams_fields(fake_fb):
    client = client_for(fake_fb)
    try:
        meta = await client.get_metadata()
    finally:
        await client.close()
    assert meta == {
        "id": "a1b2c3",
        "name": "fb-test",
        "os": "Purity//FB",
        "revision": "201908.10",
        "version": "3.3.2",
        "blade_count": "1",
        "console_url": fake_fb.endpoint,
    }
    assert fake_fb.logins == 1
    # The session header went on the request and the version is in the path.
    assert ("GET", "/api/1.8/arrays", {"items_returned": ["10"], "token": [""]}) in fake_fb.requests


@pytest_twisted.ensureDeferred
async def test_fs_usage_is_provisioned_and_total_physical(fake_fb):
    client = client_for(fake_fb)
    try:
        capacity, used = await client.get_fs_usage("backendai")
    finally:
        await client.close()
    assert capacity == 100 * 2**40
    assert used == 5 * 2**30


@pytest_twisted.ensureDeferred
async def test_nfs_metric_of_the_named_fs(fake_fb):
    client = client_for(fake_fb)
    try:
        item = await client.get_nfs_metric("backendai")
    finally:
        await client.close()
    assert item["reads_per_sec"] == 1200.0
    method, path, args = fake_fb.requests[-1]
    assert path == "/api/1.8/file-systems/performance"
    assert args["names"] == ["backendai"] and args["protocol"] == ["NFS"]


@pytest_twisted.ensureDeferred
async def test_session_is_reused_then_renewed_after_expiry(fake_fb):
    client = client_for(fake_fb)
    try:
        await client.get_fs_usage("backendai")
        await client.get_fs_usage("backendai")
        assert fake_fb.logins == 1  # kept, not one login per call
        fake_fb.expire_sessions()
        assert (await client.get_fs_usage("backendai"))[1] == 5 * 2**30
        assert fake_fb.logins == 2
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_after_expiry_share_one_login(fake_fb):
    client = client_for(fake_fb)
    try:
        await client.get_metadata()
        fake_fb.expire_sessions()
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(client.get_fs_usage("backendai")) for _ in range(6)]
        )
        assert len(results) == 6
        assert fake_fb.logins == 2
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_wrong_api_token_is_unauthorized_with_the_arrays_message(fake_fb):
    client = client_for(fake_fb, api_token="wrong")
    try:
        with pytest.raises(PurityUnauthorized) as info:
            await client.get_fs_usage("backendai")
    finally:
        await client.close()
    assert info.value.http_status == 401
    assert "invalid API token" in str(info.value)
    assert info.value.status == 502  # to our own client: the upstream service failed


@pytest_twisted.ensureDeferred
async def test_unknown_fs_is_a_400_with_context(fake_fb):
    client = client_for(fake_fb)
    try:
        with pytest.raises(PurityError) as info:
            await client.get_fs_usage("nope")
    finally:
        await client.close()
    assert info.value.http_status == 400
    assert info.value.errors == ["File system does not exist. (nope)"]


@pytest_twisted.ensureDeferred
async def test_unsupported_api_version(fake_fb):
    client = client_for(fake_fb, api_version="9.9")
    try:
        with pytest.raises(PurityError) as info:
            await client.get_metadata()
    finally:
        await client.close()
    assert info.value.http_status == 404


@pytest_twisted.ensureDeferred
async def test_pagination_collects_every_page(fake_fb):
    fake_fb.arrays = [
        {"id": f"id{i}", "name": f"n{i}", "os": "Purity//FB", "revision": "r", "version": "v"} for i in range(23)
    ]
    client = client_for(fake_fb)
    try:
        items, _ = await client.get_all("arrays")
    finally:
        await client.close()
    assert [i["id"] for i in items] == [f"id{i}" for i in range(23)]
    pages = [r for r in fake_fb.requests if r[1] == "/api/1.8/arrays"]
    assert len(pages) == 3


@pytest_twisted.ensureDeferred
async def test_unreachable_endpoint_is_an_external_error():
    client = PurityClient("http://127.0.0.1:1", API_TOKEN, ssl_verify=False, timeout=5)
    try:
        with pytest.raises(PurityError, match="cannot reach"):
            await client.get_metadata()
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_tls_without_verification_accepts_a_self_signed_array(fake_fb_tls):
    client = client_for(fake_fb_tls, ssl_verify=False)
    try:
        assert (await client.get_fs_usage("backendai"))[0] == 100 * 2**40
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_tls_verification_rejects_a_self_signed_array(fake_fb_tls):
    client = client_for(fake_fb_tls, ssl_verify=True)
    try:
        with pytest.raises(PurityError, match="cannot reach"):
            await client.get_fs_usage("backendai")
    finally:
        await client.close()
    assert fake_fb_tls.logins == 0


@pytest_twisted.ensureDeferred
async def test_tls_with_the_arrays_ca_file(fake_fb_tls):
    client = client_for(fake_fb_tls, ssl_verify=str(fake_fb_tls.ca_file))
    try:
        assert (await client.get_fs_usage("backendai"))[1] == 5 * 2**30
    finally:
        await client.close()


@given(st.binary(max_size=300))
def test_error_body_parsing_never_raises(body):
    messages = _error_messages(body)
    assert isinstance(messages, list) and all(isinstance(m, str) for m in messages)


@given(st.lists(st.fixed_dictionaries({"message": st.text(min_size=1), "context": st.none() | st.text()})))
def test_error_messages_keep_every_message(errors):
    import json

    messages = _error_messages(json.dumps({"errors": errors}).encode())
    assert len(messages) == len(errors)
    for item, message in zip(errors, messages, strict=True):
        assert message.startswith(item["message"])
