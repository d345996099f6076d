"""The client API's routing answers problem+json for what Klein would answer in HTML."""

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor

from storage.config import parse_config
from storage.tap import make_service


@pytest.fixture
def client(tmp_path):
    (tmp_path / "local").mkdir()
    config = parse_config(
        {
            "storage-proxy": {"secret": "s" * 32},
            "api": {"manager": {"secret": "m" * 32}},
            "volume": {"local": {"backend": "vfs", "path": str(tmp_path / "local")}},
        }
    )
    return StubTreq(make_service(config, reactor).client_site.resource)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/%ff", 400),
    ("GET", "/download/%c3%28", 400),
    ("GET", "/no/such/route", 404),
    ("PUT", "/download", 405),
])
@pytest_twisted.ensureDeferred
async def test_errors_are_problem_json(client, method, path, status):
    resp = await client.request(method, f"http://127.0.0.1{path}")
    assert resp.code == status
    assert resp.headers.getRawHeaders("content-type") == ["application/problem+json"]
    body = await resp.json()
    assert body["type"].startswith("https://api.backend.ai/probs/storage/")


@pytest_twisted.ensureDeferred
async def test_status_route(client):
    resp = await client.get("http://127.0.0.1/")
    assert resp.code == 200
    assert (await resp.json())["type"] == "client-facing"
