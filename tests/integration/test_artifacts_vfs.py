"""The /v1 VFS artifact-storage routes on the real daemon, over real sockets."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import StorageProxyProcess

BOUNDARY = "----artifact-test-boundary"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StorageProxyProcess, Path]]:
    work = tmp_path_factory.mktemp("artifacts")
    base = work / "models"
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    daemon = StorageProxyProcess(work / "proxy", extra_config={
        "artifact-storages": {
            "models": {"type": "vfs_storage", "vfs-storage": {"base-path": str(base)}},
            "small": {"type": "vfs_storage", "vfs-storage": {"base-path": str(work / "small"), "max-file-size": 1000}},
        },
    })
    daemon.start()
    yield daemon, base
    daemon.stop(timeout=10)
    assert "Traceback" not in daemon.log, daemon.log[-4000:]


def call(daemon: StorageProxyProcess, method: str, path: str, body: object = None, *,
         raw: bytes | None = None, headers: dict[str, str] | None = None, token: bool = True) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=60)
    hdrs = {"X-BackendAI-Storage-Auth-Token": daemon.manager_secret} if token else {}
    hdrs.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=hdrs)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def multipart(content: bytes, fields: dict[str, str] | None = None, filename: str = "blob.bin") -> bytes:
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
              "Content-Type: application/octet-stream\r\n\r\n".encode())
    out.write(content)
    out.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


MP = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def test_upload_meta_list_download_delete(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, base = proxy
    name = uuid.uuid4().hex
    content = os.urandom(300_000) + b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n"  # a near-boundary inside
    status, _, body = call(daemon, "POST", "/v1/storages/vfs/models/upload", raw=multipart(
        content, {"filepath": f"{name}/weights/model.bin"}), headers=MP)
    assert status == 201, body
    assert json.loads(body) == {"filepath": f"{name}/weights/model.bin"}
    assert (base / name / "weights" / "model.bin").read_bytes() == content
    assert not [p for p in (base / name / "weights").iterdir() if p.name != "model.bin"]  # no staging left

    status, headers, body = call(daemon, "GET", "/v1/storages/vfs/models/meta", {"filepath": f"{name}/weights/model.bin"})
    assert status == 200 and headers["content-type"] == "application/json"
    meta = json.loads(body)
    assert meta["content_length"] == len(content) and meta["is_directory"] is False
    assert set(meta) == {"filepath", "content_length", "content_type", "last_modified", "created", "is_directory", "metadata"}

    (base / name / "config.json").write_text("{}")
    status, _, body = call(daemon, "GET", "/v1/storages/vfs/models/files", {"directory": name})
    assert status == 200
    files = {f["path"]: f for f in json.loads(body)["files"]}
    assert set(files) == {f"{name}/config.json", f"{name}/weights", f"{name}/weights/model.bin"}
    assert files[f"{name}/weights"]["type"] == "directory" and files[f"{name}/weights"]["size"] is None
    assert files[f"{name}/weights/model.bin"]["size"] == len(content)

    status, headers, body = call(daemon, "POST", "/v1/storages/vfs/models/download", {"filepath": f"{name}/weights/model.bin"})
    assert status == 200 and body == content
    assert headers["content-length"] == str(len(content))

    status, headers, body = call(daemon, "POST", "/v1/storages/vfs/models/download", {"filepath": name})
    assert status == 200 and headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        member = tar.extractfile("weights/model.bin")
        assert member is not None and member.read() == content
        assert sorted(tar.getnames()) == ["config.json", "weights", "weights/model.bin"]

    status, _, body = call(daemon, "DELETE", "/v1/storages/vfs/models", {"filepath": name})
    assert status == 200 and json.loads(body) == {"filepath": name}
    assert not (base / name).exists()
    # Deleting what is not there is not an error (as upstream, and S3).
    assert call(daemon, "DELETE", "/v1/storages/vfs/models", {"filepath": name})[0] == 200


def test_filepath_in_the_query_and_overwrite(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, base = proxy
    name = uuid.uuid4().hex
    for content in (b"first version", b""):
        status, _, body = call(daemon, "POST", f"/v1/storages/vfs/models/upload?filepath={name}.txt",
                               raw=multipart(content), headers=MP)
        assert status == 201, body
        assert (base / f"{name}.txt").read_bytes() == content


@pytest.mark.parametrize("bad", ["../outside/secret.txt", "/etc/passwd", "a/../../outside/x", "nul\x00byte"])
def test_paths_are_confined(proxy: tuple[StorageProxyProcess, Path], bad: str) -> None:
    daemon, base = proxy
    for method, route, body in (
        ("GET", "meta", {"filepath": bad}),
        ("POST", "download", {"filepath": bad}),
        ("GET", "files", {"directory": bad}),
    ):
        status, headers, payload = call(daemon, method, f"/v1/storages/vfs/models/{route}", body)
        assert status == 400, (route, payload)
        assert headers["content-type"] == "application/problem+json"
    status, headers, _ = call(daemon, "DELETE", "/v1/storages/vfs/models", {"filepath": bad})
    assert status == 400
    status, _, _ = call(daemon, "POST", "/v1/storages/vfs/models/upload", raw=multipart(b"x", {"filepath": bad}), headers=MP)
    assert status == 400
    assert (base.parent / "outside" / "secret.txt").read_text() == "not yours"


def test_symlinks_out_of_the_storage_are_refused(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, base = proxy
    link = f"link-{uuid.uuid4().hex}"
    (base / link).symlink_to(base.parent / "outside")
    assert call(daemon, "POST", "/v1/storages/vfs/models/download", {"filepath": f"{link}/secret.txt"})[0] == 400
    status, _, _ = call(daemon, "POST", "/v1/storages/vfs/models/upload",
                        raw=multipart(b"evil", {"filepath": f"{link}/planted.txt"}), headers=MP)
    assert status == 400
    assert not (base.parent / "outside" / "planted.txt").exists()
    # Deleting the link removes the link only.
    assert call(daemon, "DELETE", "/v1/storages/vfs/models", {"filepath": link})[0] == 200
    assert (base.parent / "outside" / "secret.txt").exists()


def test_errors_are_problems(proxy: tuple[StorageProxyProcess, Path]) -> None:
    daemon, _ = proxy
    status, headers, body = call(daemon, "GET", "/v1/storages/vfs/nope/meta", {"filepath": "x"})
    assert status == 404 and headers["content-type"] == "application/problem+json"
    status, _, _ = call(daemon, "GET", "/v1/storages/vfs/models/meta", {"filepath": "missing.bin"})
    assert status == 404
    assert call(daemon, "GET", "/v1/storages/vfs/models/meta", {})[0] == 400
    assert call(daemon, "GET", "/v1/storages/vfs/models/meta", {"filepath": 5})[0] == 400
    assert call(daemon, "GET", "/v1/storages/vfs/models/meta", {"filepath": "x"}, token=False)[0] == 403
    status, _, _ = call(daemon, "POST", "/v1/storages/vfs/models/upload", raw=multipart(b"x"), headers=MP, token=False)
    assert status == 403
    status, headers, _ = call(daemon, "POST", "/v1/storages/vfs/models/upload?filepath=a.bin", raw=b"raw bytes",
                              headers={"Content-Type": "application/octet-stream"})
    assert status == 415 and headers["content-type"] == "application/problem+json"
    # A body without a file part, and one cut inside the file part.
    no_file = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"filepath\"\r\n\r\nx.bin\r\n--{BOUNDARY}--\r\n"
    assert call(daemon, "POST", "/v1/storages/vfs/models/upload", raw=no_file.encode(), headers=MP)[0] == 400
    cut = multipart(b"y" * 1000, {"filepath": "cut.bin"})[:-30]
    assert call(daemon, "POST", "/v1/storages/vfs/models/upload", raw=cut, headers=MP)[0] == 400
    assert call(daemon, "GET", "/v1/storages/vfs/models/meta", {"filepath": "cut.bin"})[0] == 404
    # max-file-size
    status, headers, _ = call(daemon, "POST", "/v1/storages/vfs/small/upload?filepath=big.bin",
                              raw=multipart(b"z" * 2000), headers=MP)
    assert status == 413 and headers["content-type"] == "application/problem+json"


def test_a_large_upload_and_download_stream(proxy: tuple[StorageProxyProcess, Path]) -> None:
    """64 MiB each way through a manager API whose JSON bodies are capped at 1 MiB."""
    daemon, base = proxy
    block = os.urandom(1 << 20)
    count = 64
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big"\r\n\r\n').encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=120)
    conn.putrequest("POST", "/v1/storages/vfs/models/upload?filepath=large/big.bin")
    conn.putheader("X-BackendAI-Storage-Auth-Token", daemon.manager_secret)
    conn.putheader("Content-Type", MP["Content-Type"])
    conn.putheader("Content-Length", str(len(head) + count * len(block) + len(tail)))
    conn.endheaders()
    conn.send(head)
    for _ in range(count):
        conn.send(block)
    conn.send(tail)
    response = conn.getresponse()
    assert response.status == 201, response.read()
    response.read()
    conn.close()
    expected = hashlib.sha256(block * count).hexdigest()
    assert (base / "large" / "big.bin").stat().st_size == count << 20

    conn = http.client.HTTPConnection("127.0.0.1", daemon.manager_port, timeout=120)
    conn.request("POST", "/v1/storages/vfs/models/download", body=json.dumps({"filepath": "large/big.bin"}),
                 headers={"X-BackendAI-Storage-Auth-Token": daemon.manager_secret})
    response = conn.getresponse()
    digest = hashlib.sha256()
    while chunk := response.read(1 << 20):
        digest.update(chunk)
    conn.close()
    assert digest.hexdigest() == expected
