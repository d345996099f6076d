"""Health probes, /metrics and the bgtask routes of the manager API (socket-free)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import pytest_twisted
from support.manager import StubManager, stub_manager_fixture
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from storage import API_VERSION


@pytest.fixture
def manager(tmp_path) -> Iterator[StubManager]:
    yield from stub_manager_fixture(tmp_path)


def check_health_shape(body: dict, status: str) -> None:
    assert body["status"] == status
    assert body["version"] == API_VERSION
    assert body["component"] == "storage-proxy"
    conn = body["connectivity"]
    assert set(conn) == {"overall_healthy", "connectivity_checks", "timestamp"}
    for check in conn["connectivity_checks"]:
        assert set(check) == {"service_group", "component_id", "is_healthy", "last_checked_at", "error_message"}


@pytest.mark.parametrize("path", ["/health", "/livez", "/readyz"])
@pytest_twisted.ensureDeferred
async def test_healthy(manager: StubManager, path: str) -> None:
    r = await manager.request("GET", path, auth=False)
    assert r.code == 200
    assert r.content_type == "application/json"
    body = r.json()
    check_health_shape(body, "ok")
    assert body["connectivity"]["overall_healthy"] is True
    [check] = body["connectivity"]["connectivity_checks"]
    assert check["component_id"] == "local" and check["is_healthy"] is True


@pytest_twisted.ensureDeferred
async def test_a_missing_volume_root_fails_the_probes(manager: StubManager) -> None:
    os.rename(manager.volume_path("local"), manager.volume_path("local") .with_name("gone"))
    r = await manager.request("GET", "/health", auth=False)
    assert r.code == 200  # /health is informational
    check_health_shape(r.json(), "degraded")
    [check] = r.json()["connectivity"]["connectivity_checks"]
    assert check["is_healthy"] is False and check["error_message"]
    for path in ("/livez", "/readyz"):
        r = await manager.request("GET", path, auth=False)
        assert r.code == 503
        check_health_shape(r.json(), "error")


@pytest_twisted.ensureDeferred
async def test_a_hung_volume_times_out_and_does_not_pile_up_threads(manager: StubManager, monkeypatch) -> None:
    import storage.health as health

    release = __import__("threading").Event()
    calls = []

    def hang(path: str) -> None:
        calls.append(path)
        release.wait(10)

    monkeypatch.setattr(health, "_stat_root", hang)
    manager.api.health.timeout = 0.2
    try:
        first = await manager.request("GET", "/readyz", auth=False)
        second = await manager.request("GET", "/readyz", auth=False)
        assert first.code == second.code == 503
        assert "no answer within" in first.json()["connectivity"]["connectivity_checks"][0]["error_message"]
        assert len(calls) == 1  # the second probe joined the check in flight
    finally:
        release.set()
    await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_by_route_and_status(manager: StubManager) -> None:
    await manager.request("GET", "/volumes")
    await manager.request("GET", "/volumes", auth=False)
    await manager.request("GET", "/folder/fs-usage", {"volume": "local"})
    r = await manager.request("GET", "/metrics", auth=False)
    assert r.code == 200
    assert r.content_type.startswith("text/plain")
    text = r.body.decode()
    assert 'storage_proxy_manager_requests_total{method="GET",route="/volumes",status="200"} 1.0' in text
    assert 'storage_proxy_manager_requests_total{method="GET",route="/volumes",status="403"} 1.0' in text
    assert "storage_proxy_manager_request_duration_seconds_bucket" in text
    assert 'storage_proxy_volume_capacity_bytes{volume="local"}' in text
    assert "storage_proxy_bgtasks" in text


@pytest_twisted.ensureDeferred
async def test_bgtask_state_and_cancel(manager: StubManager) -> None:
    gate: Deferred[None] = Deferred()

    async def slow(progress) -> str:
        progress.total = 2
        progress.advance()
        await gate
        progress.check()
        return "finished"

    task = manager.bgtasks.start("test-task", slow)
    state = await manager.client.bgtask(str(task.task_id))
    assert state["status"] == "running"
    assert state["progress"]["current"] == 1 and state["progress"]["total"] == 2
    cancel = await manager.request("POST", f"/bgtask/{task.task_id}/cancel")
    assert cancel.code == 202
    gate.callback(None)
    final = await manager.client.wait_bgtask(str(task.task_id), raise_on_failure=False)
    assert final["status"] == "cancelled"
    again = await manager.request("POST", f"/bgtask/{task.task_id}/cancel")
    assert again.code == 200 and again.json()["status"] == "cancelled"
    r = await manager.request("GET", f"/bgtask/{uuid.uuid4()}")
    assert r.code == 404
