"""Without [redis], upstream's [etcd] table: the Redis settings come from etcd's config/redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from support.etcd import ETCD, EtcdServer
from support.etcd import SKIP_REASON as ETCD_SKIP
from support.redis import FAULT_SUITE, REDIS_SERVER, SKIP_REASON, RedisServer, stream_entries
from test_events_redis import create_vfolder, manager_call, new_vfid, wait_for

pytestmark = [FAULT_SUITE, pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON),
              pytest.mark.skipif(ETCD is None, reason=ETCD_SKIP)]


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def etcd(tmp_path: Path):
    server = EtcdServer(tmp_path / "etcd")
    yield server
    server.stop()


def daemon_with_etcd(factory: Any, etcd: EtcdServer, **extra: Any) -> Any:
    return factory(extra_config={"etcd": {"namespace": "local", "addr": etcd.addr, **extra}})


def test_redis_settings_from_etcd(storage_proxy_factory: Any, redis_server: RedisServer, etcd: EtcdServer) -> None:
    etcd.start()
    etcd.put("/sorna/local/config/redis/addr", redis_server.addr)
    etcd.put("/sorna/other/config/redis/addr", "127.0.0.1:1")  # another namespace: not ours
    daemon = daemon_with_etcd(storage_proxy_factory, etcd, **{"event-format": "26.8"})
    assert "no [redis] or [etcd] table" not in daemon.log
    vfid = new_vfid()
    create_vfolder(daemon, vfid)
    assert manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": vfid})[0] == 202
    with redis_server.client() as c:
        [entry] = wait_for(lambda: stream_entries(c), what="the event")
    assert entry[b"name"] == b"vfolder_deletion_success"
    assert msgpack.unpackb(entry[b"args"], raw=False) == [vfid]
    assert f"redis {redis_server.addr}, db 4, event format 26.8" in daemon.log


def test_etcd_down_at_start_blocks_nothing(storage_proxy_factory: Any, redis_server: RedisServer,
                                           etcd: EtcdServer) -> None:
    daemon = daemon_with_etcd(storage_proxy_factory, etcd)  # etcd not started yet
    vfid = new_vfid()
    path = create_vfolder(daemon, vfid)
    status, body = manager_call(daemon, "/folder/delete", {"volume": "local", "vfid": vfid})
    assert status == 202
    wait_for(lambda: not path.exists(), what="the delete")
    wait_for(lambda: "cannot read the Redis settings from etcd" in daemon.log, what="the warning")
    etcd.start()
    etcd.put("/sorna/local/config/redis/addr", redis_server.addr)
    with redis_server.client() as c:
        [entry] = wait_for(lambda: stream_entries(c), timeout=40, what="the event once etcd answers")
        assert json.loads(entry[b"payload"]) == {"vfid": vfid}
        done = wait_for(lambda: c.command("GET", f"bgtask.{body['bgtask_id']}"), what="the bgtask end")
    assert json.loads(done)["name"] == "bgtask_done"
