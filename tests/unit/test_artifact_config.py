"""The [artifact-storages] / [artifact-registries] tables and the legacy lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.artifact_config import ObjectStorageConfig, VFSStorageConfig, parse_artifact_config
from storage.config import ConfigError, parse_config

S3 = {"endpoint": "http://127.0.0.1:7480", "access-key": "AK", "secret-key": "SK", "region": "us-east-1",
      "buckets": ["models"]}


def test_upstream_layout() -> None:
    cfg = parse_artifact_config({
        "artifact-storages": {
            "local": {"type": "vfs_storage", "vfs_storage": {"base_path": "/data/models", "subpath": "x"}},
            "s3": {"type": "object_storage", "object-storage": dict(S3, **{"presigned-upload": {"expiration": 60}})},
        },
        "artifact-registries": {
            "hf": {"type": "huggingface", "huggingface": {"endpoint": "http://127.0.0.1:1/", "token": "t"}},
            "res": {"type": "reservoir", "reservoir": {
                "endpoint": "http://peer:6022", "storage-name": "models", "manager-endpoint": "http://mgr:8091/",
                "manager-access-key": "AKRES", "manager-secret-key": "SKRES", "manager-api-version": "v9.20250722"}},
            "direct": {"type": "reservoir", "reservoir": {
                "storage-proxy-endpoint": "http://peer:6021", "storage-proxy-token": "TOKEN", "storage-name": "m"}},
        },
    })
    local = cfg.storages["local"]
    assert isinstance(local, VFSStorageConfig) and local.root == Path("/data/models/x")
    s3 = cfg.storages["s3"]
    assert isinstance(s3, ObjectStorageConfig)
    assert s3.buckets == ("models",) and s3.presigned_upload_expiration == 60 and s3.upload_chunk_size == 5 << 20
    assert "SK" not in repr(s3) and "AK" not in repr(s3)
    assert cfg.registries["hf"].endpoint == "http://127.0.0.1:1" and "'t'" not in repr(cfg.registries["hf"])
    res = cfg.registries["res"]
    assert res.storage_name == "models" and res.manager_endpoint == "http://mgr:8091"  # the source's storage
    assert not {"AKRES", "SKRES"} & set(repr(res).replace("'", " ").split())
    direct = cfg.registries["direct"]
    assert direct.storage_proxy_endpoint == "http://peer:6021" and "TOKEN" not in repr(direct)
    assert direct.endpoint == "https://huggingface.co"  # upstream's default (its object-storage source)


RES = {"storage-proxy-endpoint": "http://peer:6021", "storage-proxy-token": "T", "storage-name": "m"}
MGR = {"manager-endpoint": "http://mgr", "manager-access-key": "a", "manager-secret-key": "s",
       "manager-api-version": "v9", "storage-name": "m"}


def _res(**kw: object) -> dict:
    return {"artifact-registries": {"r": {"type": "reservoir", "reservoir": kw}}}


@pytest.mark.parametrize(("root", "key"), [
    (_res(**{"storage-name": "m"}), "manager-endpoint"),
    (_res(**dict(RES, **{"manager-endpoint": "http://mgr"})), "storage-proxy-endpoint"),
    (_res(**dict(RES, **{"storage-proxy-endpoint": "peer:6021"})), "storage-proxy-endpoint"),
    (_res(**{k: v for k, v in RES.items() if k != "storage-proxy-token"}), "storage-proxy-token"),
    (_res(**dict(RES, **{"storage-proxy-token": 5})), "storage-proxy-token"),
    (_res(**{k: v for k, v in RES.items() if k != "storage-name"}), "storage-name"),
    (_res(**dict(RES, **{"storage-name": "../x"})), "storage-name"),
    (_res(**dict(RES, endpoint="s3.example")), "endpoint"),
    (_res(**dict(RES, **{"read-timeout": 0})), "read-timeout"),
    (_res(**{k: v for k, v in MGR.items() if k != "manager-secret-key"}), "manager-secret-key"),
    (_res(**{k: v for k, v in MGR.items() if k != "manager-access-key"}), "manager-access-key"),
    (_res(**dict(MGR, **{"manager-api-version": "9"})), "manager-api-version"),
    (_res(**dict(MGR, **{"manager-endpoint": "ftp://mgr"})), "manager-endpoint"),
    (_res(**dict(RES, **{"part-size": 4096})), "part-size"),
    (_res(**dict(RES, **{"part-size": "big"})), "part-size"),
])
def test_invalid_reservoir_values_name_the_key(root: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_artifact_config(root)
    assert info.value.key == f"[artifact-registries.r.reservoir] {key}"
    assert "\n" not in str(info.value)
    for secret in ("T", "s"):
        assert f"'{secret}'" not in str(info.value)


def test_part_size() -> None:
    def hf(**kw: object) -> int:
        return parse_artifact_config({"artifact-registries": {"h": {"type": "huggingface", "huggingface": kw}}}
                                     ).registries["h"].part_size

    assert hf() == 64 << 20 and hf(**{"part-size": 0}) == 0 and hf(**{"part-size": 1 << 20}) == 1 << 20
    with pytest.raises(ConfigError) as info:
        hf(**{"part-size": -1})
    assert info.value.key == "[artifact-registries.h.huggingface] part-size"
    # through a manager no Range reaches the source: no parts
    cfg = parse_artifact_config(_res(**dict(MGR, **{"part-size": 1 << 20})))
    assert cfg.registries["r"].part_size == 0


def test_flat_tables_and_legacy_lists() -> None:
    cfg = parse_artifact_config({
        "artifact-storages": {"v": {"type": "vfs", "base-path": "/srv/a"}},
        "storages": [dict(S3, name="legacy-s3")],
        "registries": [{"name": "old-hf", "config": {"type": "huggingface"}}],
    })
    assert isinstance(cfg.storages["v"], VFSStorageConfig)
    assert isinstance(cfg.storages["legacy-s3"], ObjectStorageConfig)
    assert cfg.registries["old-hf"].endpoint == "https://huggingface.co"


@pytest.mark.parametrize(("root", "key"), [
    ({"artifact-storages": {"a": {"type": "git_lfs"}}}, "[artifact-storages.a] type"),
    ({"artifact-storages": {"a": {"type": "vfs_storage", "vfs-storage": {}}}}, "[artifact-storages.a.vfs-storage] base-path"),
    ({"artifact-storages": {"a": {"type": "vfs", "base-path": "rel/path"}}}, "[artifact-storages.a] base-path"),
    ({"artifact-storages": {"a": {"type": "object_storage", "object-storage": dict(S3, endpoint="ftp://x")}}},
     "[artifact-storages.a.object-storage] endpoint"),
    ({"artifact-storages": {"a": {"type": "object_storage", "object-storage": {k: v for k, v in S3.items() if k != "secret-key"}}}},
     "[artifact-storages.a.object-storage] secret-key"),
    ({"artifact-storages": {"a": {"type": "object_storage", "object-storage": dict(S3, buckets=["Bad_Bucket"])}}},
     "[artifact-storages.a.object-storage] buckets"),
    ({"artifact-storages": {"a": {"type": "object_storage", "object-storage": dict(S3, **{"upload-chunk-size": 1024})}}},
     "[artifact-storages.a.object-storage] upload-chunk-size"),
    ({"artifact-registries": {"r": {"type": "gitlab"}}}, "[artifact-registries.r] type"),
    ({"registries": [{"name": "x", "config": {"type": "reservoir", "endpoint": "http://x"}}]},
     "[[registries]] #1 config manager-endpoint"),
    ({"storages": [dict(S3)]}, "[[storages]] #1 name"),
    ({"registries": [{"name": "x", "config": {"type": "nope"}}]}, "[[registries]] #1 config type"),
])
def test_invalid_values_name_the_key(root: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_artifact_config(root)
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_part_of_the_whole_config() -> None:
    root = {
        "storage-proxy": {"secret": "s"},
        "api": {"manager": {"secret": "m"}},
        "volume": {"local": {"backend": "vfs", "path": "/tmp"}},
        "artifact-storages": {"v": {"type": "vfs", "base-path": "/srv/a"}},
    }
    assert set(parse_config(root).artifacts.storages) == {"v"}
