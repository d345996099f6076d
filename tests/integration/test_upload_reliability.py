"""Reliability: 100 uploads into the real daemon while client connections drop
at random points and the daemon is SIGKILLed mid-PATCH and restarted; every
upload is resumed from its HEAD offset and every final file is checked byte
for byte."""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest
from support.upload_client import UploadFixture, open_patch

UPLOADS = 100
SEED = 20261124


def drop(s: socket.socket, rng: random.Random) -> None:
    if rng.random() < 0.5:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    s.close()


def read_status(s: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return 0
        data += chunk
    return int(data.split(b" ", 2)[1])


class Upload:
    def __init__(self, uploads: UploadFixture, index: int, rng: random.Random) -> None:
        self.relpath = f"r/{index:03d}.bin"
        self.data = rng.randbytes(rng.randint(1, 1 << 20))  # bodies over 256 KiB take the socket-thread path
        self.token = uploads.token(self.relpath, len(self.data))
        self.done = False


def current_offset(uploads: UploadFixture, up: Upload) -> int | None:
    for _ in range(50):
        r = uploads.head(up.token)
        if r.status_code == 200:
            return int(r.headers["Upload-Offset"])
        time.sleep(0.05)
    raise AssertionError(f"HEAD {up.relpath}: {r.status_code} {r.text}")


@pytest.mark.slow
def test_uploads_survive_dropped_connections_and_sigkill(storage_proxy):
    rng = random.Random(SEED)
    uploads = UploadFixture(storage_proxy)
    todo = [Upload(uploads, i, rng) for i in range(UPLOADS)]
    kills = drops = 0
    for round_no in range(40):
        pending = [u for u in todo if not u.done]
        if not pending:
            break
        if round_no % 2 == 0 and kills < 6:
            # Open PATCHes on many uploads, send part of each body, then SIGKILL the daemon.
            port = storage_proxy.client_port
            sockets = []
            for up in rng.sample(pending, min(20, len(pending))):
                offset = current_offset(uploads, up)
                if offset == len(up.data):
                    continue
                rest = up.data[offset:]
                s = open_patch(port, up.token, offset, len(rest))
                s.sendall(rest[: rng.randint(0, len(rest) - 1)])
                sockets.append(s)
            time.sleep(rng.uniform(0, 0.2))
            storage_proxy.kill()
            kills += 1
            for s in sockets:
                s.close()
            storage_proxy.start()
            continue
        for up in pending:
            offset = current_offset(uploads, up)
            if offset == len(up.data):
                up.done = True
                continue
            rest = up.data[offset:]
            s = open_patch(storage_proxy.client_port, up.token, offset, len(rest))
            if rng.random() < 0.6:
                s.sendall(rest[: rng.randint(0, len(rest) - 1)])
                drop(s, rng)
                drops += 1
                continue
            s.sendall(rest)
            status = read_status(s)
            s.close()
            # 423/409: a commit of the dropped PATCH before it still holds the upload.
            assert status in (204, 409, 423), status
            if status == 204:
                up.done = current_offset(uploads, up) == len(up.data)
    assert all(u.done for u in todo), [u.relpath for u in todo if not u.done]
    assert kills >= 5 and drops >= 50
    for up in todo:
        assert (uploads.vfolder / up.relpath).read_bytes() == up.data, up.relpath
    # Completed uploads leave no bookkeeping: at most the state of unfinished ones.
    bookkeeping = uploads.vfolder / ".upload"
    leftovers = [p.name for p in bookkeeping.iterdir() if not p.name.endswith(".state")] if bookkeeping.exists() else []
    assert leftovers == []
