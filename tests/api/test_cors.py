"""CORS on the client API over a real loopback socket: every answer, preflights, configured origins."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from storage.config import parse_config
from storage.tap import make_service

WEBUI = "http://127.0.0.1:8090"


def _config(tmp_path, client_api=None):
    (tmp_path / "local").mkdir(exist_ok=True)
    return parse_config(
        {
            "storage-proxy": {"secret": "s" * 32},
            "api": {"manager": {"secret": "m" * 32}, "client": client_api or {}},
            "volume": {"local": {"backend": "vfs", "path": str(tmp_path / "local")}},
        }
    )


@pytest.fixture
def serve(tmp_path):
    ports = []

    def start(client_api=None):
        service = make_service(_config(tmp_path, client_api), reactor)
        port = reactor.listenTCP(0, service.client_site, interface="127.0.0.1")
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        port.stopListening()


def h(resp, name):
    values = resp.headers.getRawHeaders(name)
    return None if values is None else ", ".join(values)


async def _get(url, **headers):
    resp = await treq.get(url, headers={k.replace("_", "-"): [v] for k, v in headers.items()})
    body = await resp.content()
    return resp, body


@pytest_twisted.ensureDeferred
async def test_success_and_error_answers_carry_cors_for_the_origin(serve):
    base = serve()
    ok, _ = await _get(base + "/", Origin=WEBUI)
    assert ok.code == 200
    # upstream: any origin, with credentials -> the origin is echoed, never "*"
    assert h(ok, "Access-Control-Allow-Origin") == WEBUI
    assert h(ok, "Access-Control-Allow-Credentials") == "true"
    assert "Origin" in h(ok, "Vary")
    err, body = await _get(base + "/download?token=bogus", Origin=WEBUI)
    assert err.code >= 400 and h(err, "Content-Type") == "application/problem+json"
    assert b"type" in body
    assert h(err, "Access-Control-Allow-Origin") == WEBUI
    exposed = h(err, "Access-Control-Expose-Headers")
    for name in ("Content-Range", "Content-Disposition", "Content-Length", "ETag", "Upload-Offset", "Location"):
        assert name in exposed
    missing, _ = await _get(base + "/no/such/route", Origin=WEBUI)
    assert missing.code == 404 and h(missing, "Access-Control-Allow-Origin") == WEBUI


@pytest_twisted.ensureDeferred
async def test_no_origin_gets_wildcard(serve):
    resp, _ = await _get(serve() + "/")
    assert h(resp, "Access-Control-Allow-Origin") == "*"
    assert h(resp, "Access-Control-Allow-Credentials") is None


@pytest.mark.parametrize("path", ["/download", "/download-archive", "/upload"])
@pytest_twisted.ensureDeferred
async def test_preflight(serve, path):
    resp = await treq.request("OPTIONS", serve() + path + "?token=x", headers={
        "Origin": [WEBUI],
        "Access-Control-Request-Method": ["PATCH" if path == "/upload" else "GET"],
        "Access-Control-Request-Headers": ["range, if-range, tus-resumable, upload-offset, x-custom"],
    })
    await resp.content()
    assert resp.code in (200, 204)
    assert h(resp, "Access-Control-Allow-Origin") == WEBUI
    assert h(resp, "Access-Control-Allow-Credentials") == "true"
    methods = h(resp, "Access-Control-Allow-Methods")
    assert "GET" in methods and "PATCH" in methods and "HEAD" in methods
    allowed = h(resp, "Access-Control-Allow-Headers").lower()
    for name in ("range", "if-range", "tus-resumable", "upload-offset", "upload-length",
                 "upload-metadata", "content-type", "x-http-method-override", "x-custom"):
        assert name in allowed
    if path == "/upload":  # tus discovery headers stay
        assert h(resp, "Tus-Version") == "1.0.0" and h(resp, "Tus-Extension")


@pytest_twisted.ensureDeferred
async def test_configured_origins_refuse_others(serve):
    base = serve({"cors-allowed-origins": [WEBUI]})
    ok, _ = await _get(base + "/", Origin=WEBUI)
    assert h(ok, "Access-Control-Allow-Origin") == WEBUI
    other, _ = await _get(base + "/", Origin="http://evil.example")
    assert h(other, "Access-Control-Allow-Origin") is None
    assert h(other, "Access-Control-Expose-Headers") is None


@pytest_twisted.ensureDeferred
async def test_without_credentials_any_origin_is_wildcard(serve):
    base = serve({"cors-allow-credentials": False})
    resp, _ = await _get(base + "/", Origin=WEBUI)
    assert h(resp, "Access-Control-Allow-Origin") == "*"
    assert h(resp, "Access-Control-Allow-Credentials") is None


def test_bad_origins_config(tmp_path):
    from storage.config import ConfigError
    with pytest.raises(ConfigError):
        _config(tmp_path, {"cors-allowed-origins": 5})
