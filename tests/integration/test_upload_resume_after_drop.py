"""A client whose PATCH connection dropped resumes at once (issue 9), on a
real daemon: it sends most of a PATCH, closes, half-closes or resets the
socket, and immediately HEADs and PATCHes again.  The daemon stops the PATCH
it is still draining, records what it received and answers with that
offset: everything the client sent (all of it reached the daemon's kernel)
for close and half-close, for a reset what was in the staging file -- never
behind it, never a 409 -- and the resumed upload completes byte-exact."""

from __future__ import annotations

import fcntl
import random
import socket
import struct
import time

from support.upload_client import UploadFixture, open_patch

from storage.uploads import staging_path

SIZE = 12 << 20
ROUNDS = 2  # per way of dropping; each round is one upload
SIOCOUTQ = 0x5411  # bytes the peer has not acknowledged yet


def unacknowledged(s: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]


def drop(s: socket.socket, how: str) -> None:
    if how == "close":
        s.close()
    elif how == "half-close":
        s.shutdown(socket.SHUT_WR)  # the client still listens; closed at the end
    else:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST


def test_resume_right_after_the_connection_dropped(storage_proxy):
    uploads = UploadFixture(storage_proxy)
    rng = random.Random(9)
    data = rng.randbytes(SIZE)
    started = time.monotonic()
    for n, how in enumerate([h for h in ("close", "half-close", "reset") for _ in range(ROUNDS)]):
        assert time.monotonic() - started < 60, "bounded"
        relpath = f"d/{n}.bin"
        token = uploads.token(relpath, SIZE)
        session = next(p.name for p in (uploads.vfolder / ".upload").iterdir() if "." not in p.name)
        staged = staging_path(uploads.vfolder, session)
        sent = rng.randrange(SIZE // 4, SIZE - (1 << 20))
        s = open_patch(storage_proxy.client_port, token, 0, SIZE)
        s.sendall(data[:sent])
        deadline = time.monotonic() + 10
        while unacknowledged(s):  # every byte sent is in the daemon's kernel
            assert time.monotonic() < deadline
            time.sleep(0.001)
        in_file = staged.stat().st_size
        drop(s, how)
        offset = uploads.offset(token)  # at once: the daemon may still be draining
        if how == "reset":
            # A reset throws away what the daemon's kernel held unread: the
            # offset is what reached the staging file, at least what was
            # there before the reset.
            assert in_file <= offset <= sent, (how, in_file, offset, sent)
        else:
            assert offset == sent, (how, in_file, offset, sent)
        assert staged.stat().st_size == offset, "the offset is what the daemon holds"
        r = uploads.patch(token, offset, data[offset:])
        assert r.status_code == 204, (how, r.status_code, r.text)
        assert (uploads.vfolder / relpath).read_bytes() == data, how
        s.close()
    log = storage_proxy.log
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 600):][:3000]

