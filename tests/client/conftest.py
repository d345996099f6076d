"""Fixtures for the tus client tests: a fake tus server on 127.0.0.1:0."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_twisted
from fake_tus_server import FakeTusServer
from twisted.internet import reactor as global_reactor

from storage.tus_client import RetryPolicy, TusClient

FAST_RETRY = RetryPolicy(retries=4, base_delay=0.01, max_delay=0.05, checksum_attempts=3)


@pytest.fixture
def reactor():
    return global_reactor


@pytest_twisted.async_yield_fixture
async def fake_factory(reactor) -> AsyncIterator[Callable[..., FakeTusServer]]:
    servers: list[FakeTusServer] = []

    def make(**kwargs) -> FakeTusServer:
        fake = FakeTusServer(**kwargs).listen(reactor)
        servers.append(fake)
        return fake

    yield make
    for fake in servers:
        await fake.port.stopListening()


@pytest_twisted.async_yield_fixture
async def fake(fake_factory) -> AsyncIterator[FakeTusServer]:
    yield fake_factory()


@pytest_twisted.async_yield_fixture
async def make_client(reactor) -> AsyncIterator[Callable[..., TusClient]]:
    clients: list[TusClient] = []

    def make(**kwargs) -> TusClient:
        kwargs.setdefault("retry", FAST_RETRY)
        client = TusClient(reactor, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def payload_file(tmp_path: Path) -> Callable[[int], tuple[Path, bytes]]:
    def make(size: int, name: str = "payload.bin") -> tuple[Path, bytes]:
        data = os.urandom(size)
        path = tmp_path / name
        path.write_bytes(data)
        return path, data

    return make
