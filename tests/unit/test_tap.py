"""make_service composes the daemon; listeners bind, answer, and stop in order."""

import json
from pathlib import Path

import pytest
import pytest_twisted
import treq
from support.tls import self_signed
from twisted.internet import reactor

from storage.config import parse_config
from storage.tap import make_service


def config_for(tmp_path: Path):
    return parse_config(
        {
            "storage-proxy": {"secret": "s" * 32},
            "api": {
                "client": {"service-addr": {"host": "127.0.0.1", "port": 0}},
                "manager": {"service-addr": {"host": "127.0.0.1", "port": 0}, "secret": "m" * 32},
            },
            "volume": {"local": {"backend": "vfs", "path": str(tmp_path / "local")}},
        }
    )


def port_of(listener):
    return listener.port.getHost().port


@pytest_twisted.ensureDeferred
async def test_service_starts_answers_and_stops(tmp_path):
    (tmp_path / "local").mkdir()
    service = make_service(config_for(tmp_path), reactor)
    service.privilegedStartService()
    service.startService()
    try:
        for listener, kind in ((service.manager_listener, "manager-facing"), (service.client_listener, "client-facing")):
            resp = await treq.get(f"http://127.0.0.1:{port_of(listener)}/")
            assert resp.code == 200
            assert resp.headers.getRawHeaders("content-type") == ["application/json"]
            body = json.loads(await resp.content())
            assert body["type"] == kind and body["status"] == "ok"
    finally:
        await service.stopService()
    assert service.manager_listener.port is None
    assert not service.pool.threadpool.started


def test_unbindable_port_fails_with_one_line(tmp_path):
    (tmp_path / "local").mkdir()
    first = make_service(config_for(tmp_path), reactor)
    first.manager_listener.privilegedStartService()
    try:
        taken = port_of(first.manager_listener)
        config = config_for(tmp_path)
        from dataclasses import replace

        config = replace(config, manager=replace(config.manager, service_addr=replace(config.manager.service_addr, port=taken)))
        second = make_service(config, reactor)
        with pytest.raises(SystemExit) as info:
            second.manager_listener.privilegedStartService()
        message = str(info.value)
        assert message.startswith("storage-proxy: manager API: cannot listen on tcp:")
        assert "\n" not in message
    finally:
        first.manager_listener.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls_listener(tmp_path):
    from twisted.internet.ssl import CertificateOptions
    from twisted.web.client import Agent
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import implementer

    (tmp_path / "local").mkdir()
    cert, key = self_signed(tmp_path)
    raw = {
        "storage-proxy": {"secret": "s" * 32},
        "api": {
            "client": {"service-addr": {"host": "127.0.0.1", "port": 0}},
            "manager": {"service-addr": {"host": "127.0.0.1", "port": 0}, "secret": "m" * 32,
                        "ssl-enabled": True, "ssl-cert": str(cert), "ssl-privkey": str(key)},
        },
        "volume": {"local": {"backend": "vfs", "path": str(tmp_path / "local")}},
    }
    service = make_service(parse_config(raw), reactor)
    service.privilegedStartService()
    service.startService()

    @implementer(IPolicyForHTTPS)
    class TrustAnything:
        def creatorForNetloc(self, hostname, port):
            return CertificateOptions(verify=False)

    try:
        client = treq.client.HTTPClient(Agent(reactor, contextFactory=TrustAnything()))
        resp = await client.get(f"https://127.0.0.1:{port_of(service.manager_listener)}/")
        assert resp.code == 200
        assert json.loads(await resp.content())["type"] == "manager-facing"
    finally:
        await service.stopService()
