"""The daemon harness itself: start, answer, restart on the same ports, stop cleanly."""

from __future__ import annotations

import json
import urllib.request

from support.daemon import CLEAN_EXIT, StorageProxyProcess


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def test_starts_and_answers(storage_proxy: StorageProxyProcess) -> None:
    assert storage_proxy.manager_port and storage_proxy.client_port
    assert storage_proxy.manager_port != storage_proxy.client_port
    assert get_json(storage_proxy.manager_url + "/")["type"] == "manager-facing"
    assert get_json(storage_proxy.client_url + "/")["type"] == "client-facing"
    assert storage_proxy.volume_path("local").is_dir()


def test_restart_keeps_ports_and_stop_exits_zero(storage_proxy: StorageProxyProcess) -> None:
    ports = (storage_proxy.manager_port, storage_proxy.client_port)
    storage_proxy.restart()
    assert (storage_proxy.manager_port, storage_proxy.client_port) == ports
    assert get_json(storage_proxy.manager_url + "/")["status"] == "ok"
    assert storage_proxy.stop() in CLEAN_EXIT
    assert "Server Shut Down." in storage_proxy.log
    assert "Traceback" not in storage_proxy.log
