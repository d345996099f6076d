"""ManagerClient's own behaviour: typed errors, non-JSON bodies, bgtask polling."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from support.manager import StubManager, stub_manager_fixture
from treq.testing import StringStubbingResource, StubTreq
from twisted.internet.defer import Deferred

from storage import manager_client as mc


@pytest.fixture
def manager(tmp_path) -> Iterator[StubManager]:
    yield from stub_manager_fixture(tmp_path)


@pytest.mark.parametrize("status,cls", [
    (400, mc.BadRequest), (403, mc.Forbidden), (404, mc.NotFound), (405, mc.MethodNotAllowed),
    (409, mc.Conflict), (413, mc.RequestTooLarge), (422, mc.Unprocessable), (500, mc.ServerError),
    (503, mc.ServiceUnavailable), (507, mc.InsufficientStorage), (502, mc.ServerError), (418, mc.ManagerAPIError),
])
def test_error_classes_by_status(status: int, cls: type) -> None:
    err = mc.error_for(status, {"type": "t", "title": "T", "msg": "m", "data": {"x": "y"}}, "GET", "/p")
    assert type(err) is cls
    assert isinstance(err, mc.ManagerAPIError)
    assert (err.status, err.problem_type, err.data) == (status, "t", {"x": "y"})
    assert "GET /p" in str(err) and "T - m" in str(err)


@pytest_twisted.ensureDeferred
async def test_a_non_json_error_body_is_kept_as_text() -> None:
    def answer(method, url, params, headers, data):
        return 502, {b"Content-Type": b"text/plain"}, b"bad gateway"

    stub = StubTreq(StringStubbingResource(answer))
    client = mc.ManagerClient("http://x", "secret", treq=stub)
    with pytest.raises(mc.ServerError) as info:
        await client.volumes()
    assert info.value.body == "bad gateway" and info.value.problem_type is None


@pytest_twisted.ensureDeferred
async def test_requests_carry_the_secret_and_a_json_body() -> None:
    seen = {}

    def answer(method, url, params, headers, data):
        seen.update(method=method, headers=headers, data=data)
        return 204, {}, b""

    stub = StubTreq(StringStubbingResource(answer))
    client = mc.ManagerClient("http://x/", "s3cret", treq=stub)
    assert await client.unset_quota("local", "user:00000000-0000-0000-0000-000000000001") is None
    assert seen["method"] == b"DELETE"
    assert seen["headers"][b"X-Backendai-Storage-Auth-Token"] == [b"s3cret"]
    assert b'"qsid": "user:00000000-0000-0000-0000-000000000001"' in seen["data"]


@pytest_twisted.ensureDeferred
async def test_wait_bgtask_times_out_and_reports_failures(manager: StubManager) -> None:
    gate: Deferred[None] = Deferred()

    async def stuck(progress):
        await gate

    task = manager.bgtasks.start("stuck", stuck)
    with pytest.raises(TimeoutError):
        await manager.client.wait_bgtask(str(task.task_id), interval=0.02, timeout=0.1)

    async def broken(progress):
        raise RuntimeError("nope")

    failing = manager.bgtasks.start("broken", broken)
    with pytest.raises(mc.BackgroundTaskFailed) as info:
        await manager.client.wait_bgtask(str(failing.task_id))
    assert info.value.state["status"] == "failed"
    state = await manager.client.wait_bgtask(str(failing.task_id), raise_on_failure=False)
    assert state["error"]["type"] == "internal"
    gate.callback(None)
