"""The TOML config: upstream's keys, clear one-line errors, the embedded default."""

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.config import (
    ConfigError,
    default_config,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    tomllib,
)


def minimal(**overrides):
    root = {
        "storage-proxy": {"secret": "s" * 32},
        "api": {"manager": {"secret": "m" * 32}},
        "volume": {"local": {"backend": "vfs", "path": "/tmp/x"}},
    }
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    return root


def test_upstream_sample_config_parses(tmp_path):
    path = tmp_path / "storage-proxy.toml"
    path.write_text(
        """
[etcd]
namespace = "local"
addr = { host = "127.0.0.1", port = 2379 }

[storage-proxy]
node-id = "i-storage-proxy-local"
num-proc = 2
pid-file = "./storage-proxy.pid"
event-loop = "asyncio"
scandir-limit = 500
max-upload-size = "10g"
secret = "some-secret-private-for-storage-proxy"
session-expire = "12h"

[api.client]
service-addr = { host = "0.0.0.0", port = 6021 }
ssl-enabled = false

[api.manager]
service-addr = { host = "127.0.0.1", port = 6022 }
ssl-enabled = false
secret = "some-secret-shared-with-manager"

[debug]
enabled = false

[logging]
level = "debug"

[volume.local]
backend = "vfs"
path = "/vfroot/local"

[volume.xfs1]
backend = "xfs"
path = "/vfroot/xfs"
fsprefix = "data"
options = { projects-path = "/etc/projects" }
"""
    )
    config = load_config(path)
    assert config.node_id == "i-storage-proxy-local"
    assert config.scandir_limit == 500
    assert config.max_upload_size == 10 << 30
    assert config.session_expire == 12 * 3600
    assert config.client.service_addr.host == "0.0.0.0"
    assert config.manager.secret == "some-secret-shared-with-manager"
    assert config.log_level == "DEBUG"
    assert config.pid_file == Path("./storage-proxy.pid")
    assert set(config.volumes) == {"local", "xfs1"}
    assert config.volumes["xfs1"].fsprefix == "data"
    assert config.volumes["xfs1"].options == {"projects-path": "/etc/projects"}
    assert config.client.endpoint_description() == "tcp:6021:interface=0.0.0.0:backlog=4096"


def test_listen_backlog_is_configurable_per_api():
    root = minimal(**{"api.client.listen-backlog": 123})
    config = parse_config(root)
    assert config.client.listen_backlog == 123
    assert config.manager.listen_backlog == 4096
    assert config.client.endpoint_description().endswith(":backlog=123")


def test_num_proc_upstream_key_and_bounds():
    # Upstream's key (either spelling), 1 .. the CPU count; ours defaults to 1 (no workers).
    assert parse_config(minimal()).num_proc == 1
    cpus = os.cpu_count() or 1
    assert parse_config(minimal(**{"storage-proxy.num-proc": cpus})).num_proc == cpus
    assert parse_config(minimal(**{"storage-proxy.num_proc": 1})).num_proc == 1
    with pytest.raises(ConfigError, match=rf"num-proc: must be from 1 to {cpus} \(this machine's CPUs\), got 0"):
        parse_config(minimal(**{"storage-proxy.num-proc": 0}))
    # The document the workers are handed is the one validated.
    root = minimal(**{"storage-proxy.num-proc": 1})
    assert parse_config(root).document == root


def test_underscore_keys_are_accepted():
    root = minimal(**{"storage-proxy.max_upload_size": "1m", "storage-proxy.scandir_limit": 7})
    config = parse_config(root)
    assert (config.max_upload_size, config.scandir_limit) == (1 << 20, 7)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"storage-proxy.max-upload-size": "lots"}, "[storage-proxy] max-upload-size"),
        ({"storage-proxy.session-expire": "forever"}, "[storage-proxy] session-expire"),
        ({"storage-proxy.scandir-limit": "many"}, "[storage-proxy] scandir-limit"),
        ({"storage-proxy.scandir-limit": 0}, "[storage-proxy] scandir-limit"),
        ({"storage-proxy.secret": ""}, "[storage-proxy] secret"),
        ({"api.manager.secret": None}, "[api.manager] secret"),
        ({"api.client.service-addr": {"host": "127.0.0.1", "port": 70000}}, "[api.client] service-addr.port"),
        ({"api.client.service-addr": {"host": "127.0.0.1", "port": "x"}}, "[api.client] service-addr.port"),
        ({"api.client.ssl-enabled": "yes"}, "[api.client] ssl-enabled"),
        ({"api.client.listen-backlog": 0}, "[api.client] listen-backlog"),
        ({"api.manager.listen-backlog": "lots"}, "[api.manager] listen-backlog"),
        ({"api.client.ssl-enabled": True}, "[api.client] ssl-cert"),
        ({"volume.local.backend": "zfs"}, "[volume.local] backend"),
        ({"volume.local.path": ""}, "[volume.local] path"),
        ({"volume.local.fsprefix": "../up"}, "[volume.local] fsprefix"),
        ({"logging.level": "loud"}, "[logging] level"),
        ({"storage-proxy.num-proc": 0}, "[storage-proxy] num-proc"),
        ({"storage-proxy.num-proc": "2"}, "[storage-proxy] num-proc"),
        ({"storage-proxy.num-proc": True}, "[storage-proxy] num-proc"),
        ({"storage-proxy.num-proc": 1.5}, "[storage-proxy] num-proc"),
        ({"storage-proxy.num-proc": (os.cpu_count() or 1) + 1}, "[storage-proxy] num-proc"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    root = minimal()
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    with pytest.raises(ConfigError) as info:
        parse_config(root)
    assert info.value.key == key
    assert str(info.value).startswith(f"config: {key}: ")
    assert "\n" not in str(info.value)


def test_no_volumes_is_an_error():
    root = minimal()
    root["volume"] = {}
    with pytest.raises(ConfigError, match=r"\[volume\]"):
        parse_config(root)


def test_unreadable_and_invalid_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage-proxy\nsecret = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@given(st.integers(min_value=0, max_value=1 << 50), st.sampled_from(["", "k", "m", "g", "t", "K", "G"]))
def test_parse_size_units(number, unit):
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit.lower()]
    assert parse_size(f"{number}{unit}", "k") == number * scale


@given(st.text(max_size=12))
def test_parse_size_never_crashes(text):
    try:
        value = parse_size(text, "k")
    except ConfigError as exc:
        assert exc.key == "k"
    else:
        assert value >= 0


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["s", "m", "h", "d", "w", ""]))
def test_parse_duration_units(number, unit):
    scale = {"s": 1, "": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_duration(f"{number}{unit}", "k") == number * scale


@given(st.one_of(st.text(max_size=12), st.booleans(), st.floats(allow_nan=False), st.none()))
def test_parse_duration_never_crashes(value):
    try:
        parse_duration(value, "k")
    except ConfigError as exc:
        assert exc.key == "k"


def test_default_config_generates_secrets_once(tmp_path):
    first = default_config(tmp_path / "vfroot")
    assert first.generated_secrets
    assert (tmp_path / "vfroot" / "local").is_dir()
    secrets_file = tmp_path / "vfroot" / ".storage-proxy-secrets.toml"
    assert stat.S_IMODE(os.stat(secrets_file).st_mode) == 0o600
    assert tomllib.loads(secrets_file.read_text())["manager-secret"] == first.manager.secret
    second = default_config(tmp_path / "vfroot")
    assert not second.generated_secrets
    assert (second.secret, second.manager.secret) == (first.secret, first.manager.secret)
    assert first.secret != first.manager.secret
    assert second.volumes["local"].backend == "vfs"
    assert second.client.service_addr.port == 6021
    assert second.manager.service_addr.port == 6022
    assert second.manager.service_addr.host == "127.0.0.1"
