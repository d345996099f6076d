"""A hypothesis state machine drives one upload with PATCHes of random sizes and
offsets (right and wrong), checksums (good and bad), dropped connections,
HEADs and daemon restarts, and checks the server against a simple model:
the offset of record, the staged bytes, and the final file."""

from __future__ import annotations

import base64
import hashlib
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from support.tus_harness import OCTETS, Connection, TusHarness

from storage.uploads import read_state, staging_path

SIZE = 200


class UploadMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tus-sm-"))
        self.h = TusHarness(self.dir)
        self.data = bytes((i * 7 + 3) % 256 for i in range(SIZE))
        self.offset = 0  # the model's offset of record
        self.completed = False

    @initialize()
    def prepare(self) -> None:
        self.token, self.session = self.h.new_upload(SIZE)

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart_harness(self) -> None:
        fresh = TusHarness.__new__(TusHarness)
        fresh.__dict__.update(self.h.__dict__)
        other = TusHarness(self.dir / ".other")
        other.tus.volumes = self.h.tus.volumes
        fresh.tus, fresh.site = other.tus, other.site
        self.h = fresh

    @rule(size=st.integers(0, 80), skew=st.sampled_from([0, 0, 0, -1, 1, 5]),
          checksum=st.sampled_from([None, "good", "bad"]))
    def patch(self, size: int, skew: int, checksum: str | None) -> None:
        offset = max(0, self.offset + skew)
        body = self.data[offset:offset + size] if offset < SIZE else b""
        if offset + size > SIZE:
            body = body + b"!" * (offset + size - SIZE)  # goes past Upload-Length
        headers = {}
        if checksum == "good":
            headers["Upload_Checksum"] = "sha1 " + base64.b64encode(hashlib.sha1(body).digest()).decode()
        elif checksum == "bad":
            headers["Upload_Checksum"] = "sha1 " + base64.b64encode(hashlib.sha1(body + b"x").digest()).decode()
        r = self.h.patch(self.token, offset, body, **headers)
        if self.completed and offset == SIZE and not body:
            assert (r.status, r.header("Upload-Offset")) == (204, str(SIZE)), r  # repeats the end
        elif self.completed:
            assert r.status in (409, 413), r
        elif offset != self.offset:  # tus: the offset is checked before the body
            assert r.status == 409, r
            assert int(r.header("Upload-Offset")) == self.offset
        elif offset + len(body) > SIZE:
            assert r.status == 413, r
        elif checksum == "bad":
            assert r.status == 460, r
        else:
            assert r.status == 204, r
            self.offset += len(body)
            assert int(r.header("Upload-Offset")) == self.offset
            if self.offset == SIZE:
                self.completed = True

    @rule(size=st.integers(1, 80), sent=st.integers(0, 80), checksum=st.booleans())
    def interrupted_patch(self, size: int, sent: int, checksum: bool) -> None:
        if self.completed or self.offset + size > SIZE:
            return
        sent = min(sent, size - 1)
        body = self.data[self.offset:self.offset + size]
        headers = dict(OCTETS, **{"Upload-Offset": str(self.offset)})
        if checksum:
            headers["Upload-Checksum"] = "md5 " + base64.b64encode(hashlib.md5(body).digest()).decode()
        conn = Connection(self.h)
        conn.send_head("PATCH", f"/upload?token={self.token}", headers, size)
        conn.send(body[:sent])
        conn.drop()
        if not checksum:
            self.offset += sent  # bytes received before the drop are kept

    @rule()
    def restart(self) -> None:
        self.restart_harness()

    @rule()
    def head(self) -> None:
        r = self.h.head(self.token)
        assert r.status == 200
        assert int(r.header("Upload-Offset")) == (SIZE if self.completed else self.offset)
        assert r.header("Upload-Length") == str(SIZE)

    @invariant()
    def disk_matches_the_model(self) -> None:
        if not hasattr(self, "token"):
            return
        target = self.h.target()
        if self.completed:
            assert target.read_bytes() == self.data
            assert not staging_path(self.h.vfolder, self.session).exists()
        else:
            assert not target.exists()
            state = read_state(self.h.vfolder, self.session)
            assert state.offset == self.offset
            assert staging_path(self.h.vfolder, self.session).read_bytes()[:self.offset] == self.data[:self.offset]


UploadMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestUploadStateMachine = UploadMachine.TestCase
