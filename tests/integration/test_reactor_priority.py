"""Only the reactor thread runs with real-time priority; every other thread
and child process the daemon starts keeps the normal policy."""

import json
import os
import urllib.request

import pytest

SCHED_OTHER, SCHED_RR = 0, 2

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="raising a thread's priority needs root")


def policies(pid: int) -> dict[int, int]:
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        found[int(tid)] = int(fields[38])  # field 41 of stat(5): policy
    return found


def use_the_pool(daemon) -> None:
    request = urllib.request.Request(
        f"{daemon.manager_url}/folder/fs-usage", data=json.dumps({"volume": "local"}).encode(), method="GET",
        headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200


def test_only_the_reactor_thread_is_real_time(storage_proxy):
    use_the_pool(storage_proxy)
    found = policies(storage_proxy.pid)
    assert found.pop(storage_proxy.pid) == SCHED_RR
    assert found, "the pool should have started worker threads"
    assert set(found.values()) == {SCHED_OTHER}


def test_reactor_realtime_can_be_turned_off(storage_proxy_factory):
    daemon = storage_proxy_factory(extra_config={"storage-proxy": {"reactor-realtime": False}})
    use_the_pool(daemon)
    assert set(policies(daemon.pid).values()) == {SCHED_OTHER}
