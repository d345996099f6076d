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
            "res": {"type": "reservoir", "reservoir": {"endpoint": "http://peer:6022", "storage-name": "local"}},
        },
    })
    local = cfg.storages["local"]
    assert isinstance(local, VFSStorageConfig) and local.root == Path("/data/models/x")
    s3 = cfg.storages["s3"]
    assert isinstance(s3, ObjectStorageConfig)
    assert s3.buckets == ("models",) and s3.presigned_upload_expiration == 60 and s3.upload_chunk_size == 5 << 20
    assert "SK" not in repr(s3) and "AK" not in repr(s3)
    assert cfg.registries["hf"].endpoint == "http://127.0.0.1:1" and "'t'" not in repr(cfg.registries["hf"])
    assert cfg.registries["res"].storage_name == "local"


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
    ({"artifact-registries": {"r": {"type": "reservoir", "reservoir": {"endpoint": "http://x", "storage-name": "nope"}}}},
     "[artifact-registries.r] storage-name"),
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
