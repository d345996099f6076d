"""Wire encodings of the manager's event bus (26.9 JSON, 26.8/26.4 msgpack) and the [redis] table."""

from __future__ import annotations

import base64
import json
import uuid

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.config import ConfigError, parse_config
from storage.events import encoding as enc
from storage.events.publisher import wire_vfid
from storage.events.settings import parse_redis

TID = str(uuid.UUID(int=7))
VFID = f"user:{uuid.UUID(int=1)}/{uuid.UUID(int=2).hex}"


def test_anycast_26_9_fields_in_upstream_order() -> None:
    event = enc.vfolder_clone(VFID, "project:" + str(uuid.UUID(int=3)) + "/" + "ab" * 16, TID, "boom")
    (cmd,) = enc.commands(event, "26.9")
    assert cmd[:6] == ["XADD", "events", "MAXLEN", "~", "128", "*"]
    pairs = dict(zip(cmd[6::2], cmd[7::2], strict=True))
    assert list(pairs) == [b"name", b"source", b"payload", b"metadata"]
    assert pairs[b"name"] == b"vfolder_clone_failure"
    assert pairs[b"source"] == b"storage"
    payload = json.loads(pairs[b"payload"])
    assert list(payload) == ["vfid", "dst_vfid", "message"]
    assert payload["message"] == "boom"
    assert b" " not in pairs[b"payload"]  # compact, as pydantic writes it
    assert json.loads(pairs[b"metadata"]) == {"request_id": None, "user": None, "triggered_user": None,
                                              "traceparent": None}


@pytest.mark.parametrize("fmt,meta", [("26.8", ["request_id", "user", "triggered_user"]),
                                      ("26.4", ["request_id", "user"])])
def test_anycast_msgpack_formats(fmt: str, meta: list[str]) -> None:
    (cmd,) = enc.commands(enc.vfolder_deletion(VFID, TID, "gone wrong"), fmt)
    pairs = dict(zip(cmd[6::2], cmd[7::2], strict=True))
    assert list(pairs) == [b"name", b"source", b"args", b"metadata"]
    assert msgpack.unpackb(pairs[b"args"], raw=False) == [VFID, "gone wrong"]
    assert list(json.loads(pairs[b"metadata"])) == meta


def test_broadcast_26_9_is_set_then_publish_with_json_strings() -> None:
    event = enc.bgtask_updated(TID, 3, 10, "step")
    set_cmd, pub_cmd = enc.commands(event, "26.9")
    assert set_cmd[:2] == ["SET", f"bgtask.{TID}"] and set_cmd[3:] == ["EX", "300"]
    assert pub_cmd[:2] == ["PUBLISH", "events_all"]
    assert set_cmd[2] == pub_cmd[2]
    message = json.loads(pub_cmd[2])
    assert list(message) == ["name", "source", "payload", "metadata"]
    assert isinstance(message["payload"], str) and isinstance(message["metadata"], str)
    body = json.loads(message["payload"])
    assert body == {"task_id": TID, "current_progress": 3.0, "total_progress": 10.0, "message": "step"}
    assert '"current_progress":3.0' in message["payload"]  # floats, as BgtaskUpdatedEvent declares


def test_broadcast_msgpack_is_base64_args() -> None:
    event = enc.bgtask_finished(TID, "failed", "OSError('x')")
    _, pub_cmd = enc.commands(event, "26.8")
    message = json.loads(pub_cmd[2])
    assert list(message) == ["name", "source", "args", "metadata"]
    assert message["name"] == "bgtask_failed"
    assert msgpack.unpackb(base64.b64decode(message["args"]), raw=False) == [TID, "OSError('x')"]


def test_partial_success_and_terminal_names() -> None:
    assert enc.bgtask_finished(TID, "done", "m").name == "bgtask_done"
    assert enc.bgtask_finished(TID, "cancelled", "m").name == "bgtask_cancelled"
    partial = enc.bgtask_finished(TID, "done", "m", errors=["a"])
    assert partial.name == "bgtask_partial_success"
    assert json.loads(enc.body_json(partial)) == {"task_id": TID, "message": "m", "errors": ["a"]}


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError):
        enc.commands(enc.vfolder_deletion(VFID, TID, None), "25.1")


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(message=st.one_of(st.none(), texts), cur=st.integers(0, 10**9), tot=st.integers(0, 10**9))
def test_event_roundtrips_through_the_outbox_json(message: str | None, cur: int, tot: int) -> None:
    event = enc.bgtask_updated(TID, cur, tot, message)
    again = enc.Event.from_json(json.loads(json.dumps(event.to_json())))
    assert again == event
    for fmt in enc.FORMATS:
        assert enc.commands(again, fmt) == enc.commands(event, fmt)


@given(message=texts)
def test_payload_json_decodes_to_the_fields(message: str) -> None:
    event = enc.vfolder_deletion(VFID, TID, message)
    assert json.loads(enc.body_json(event)) == {"vfid": VFID, "message": message}
    assert msgpack.unpackb(enc.args_msgpack(event), raw=False) == [VFID, message]


def test_wire_vfid_is_upstreams_str() -> None:
    folder = uuid.uuid4()
    assert wire_vfid(str(folder)) == folder.hex  # a bare (22.03) id: hex, as str(VFolderID)
    assert wire_vfid(VFID) == VFID


# -- [redis] ----------------------------------------------------------------


def minimal(redis: dict | None = None) -> dict:
    root: dict = {
        "storage-proxy": {"secret": "s" * 32},
        "api": {"manager": {"secret": "m" * 32}},
        "volume": {"local": {"backend": "vfs", "path": "/tmp/x"}},
    }
    if redis is not None:
        root["redis"] = redis
    return root


def test_no_redis_table_means_no_events() -> None:
    assert parse_config(minimal()).redis is None


def test_redis_table_with_upstream_keys() -> None:
    cfg = parse_config(minimal({
        "addr": "redis.example:6380", "password": "pw", "use_tls": True, "tls-skip-verify": True,
        "redis-helper-config": {"socket-timeout": 3}, "some-future-key": 1, "request-timeout": 2500,
    }))
    r = cfg.redis
    assert (r.host, r.port, r.password, r.use_tls, r.tls_skip_verify) == ("redis.example", 6380, "pw", True, True)
    assert r.request_timeout == 2.5
    assert r.event_format == "26.9"
    assert "pw" not in r.describe()


def test_redis_sentinel_forms() -> None:
    a = parse_redis({"redis": {"sentinel": "s1:26379, s2:26380", "service-name": "mymaster"}})
    b = parse_redis({"redis": {"sentinel": ["s1:26379", {"host": "s2", "port": 26380}], "service_name": "mymaster"}})
    assert a is not None and b is not None
    assert a.sentinel == b.sentinel == (("s1", 26379), ("s2", 26380))
    assert a.host is None


@pytest.mark.parametrize("table,key", [
    ({}, "[redis] addr"),
    ({"addr": "nohost"}, "[redis] addr"),
    ({"addr": "h:99999"}, "[redis] addr"),
    ({"sentinel": "s:1"}, "[redis] service-name"),
    ({"addr": "h:1", "use-tls": "yes"}, "[redis] use-tls"),
    ({"addr": "h:1", "event-format": "25.0"}, "[redis] event-format"),
    ({"addr": "h:1", "request-timeout": 0}, "[redis] request-timeout"),
])
def test_bad_redis_values_name_the_key(table: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(table))
    assert info.value.key == key


@pytest.mark.parametrize("value", ["26.8", 26.8, "26.4", 26.4])
def test_event_format_may_be_a_toml_number(value: object) -> None:
    r = parse_redis({"redis": {"addr": "h:1", "event-format": value}})
    assert r is not None and r.event_format == str(value)


def test_state_dir_key(tmp_path) -> None:
    root = minimal()
    root["storage-proxy"]["state-dir"] = str(tmp_path)
    assert parse_config(root).state_dir == tmp_path


# -- [etcd] ---------------------------------------------------------------------


def test_etcd_table_only_counts_without_redis() -> None:
    from storage.events.settings import parse_etcd

    root = minimal()
    root["etcd"] = {"namespace": "prod", "addr": {"host": "etcd.example", "port": 2379}, "user": "u",
                    "password": "p"}
    e = parse_config(root).etcd
    assert (e.namespace, e.host, e.port, e.user, e.password, e.event_format) == (
        "prod", "etcd.example", 2379, "u", "p", "26.9")
    root["redis"] = {"addr": "r:6379"}
    assert parse_etcd(root) is None
    with pytest.raises(ConfigError) as info:
        parse_config(minimal() | {"etcd": {"addr": "nohost"}})
    assert info.value.key == "[etcd] addr"


def test_etcd_keys_nest_as_upstream() -> None:
    from storage.events.etcd import nest
    from storage.events.settings import redis_from_etcd

    prefix = "/sorna/local/config/redis/"
    tree = nest(prefix, [(prefix + "addr", "r:6380"), (prefix + "redis_helper_config/socket_timeout", "5"),
                         (prefix + "service%2Fname", "x"), (prefix + "use_tls", "true")])
    assert tree == {"addr": "r:6380", "redis_helper_config": {"socket_timeout": "5"}, "service/name": "x",
                    "use_tls": "true"}
    settings = redis_from_etcd(tree, "26.4")
    assert (settings.host, settings.port, settings.use_tls, settings.event_format) == ("r", 6380, True, "26.4")
