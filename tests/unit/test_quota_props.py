"""The arithmetic and the on-disk state of the daemon's quota grants
(storage.quota), as a hypothesis state machine over real files: writers
(each holding its staging file's flock, as an UploadWriter does) acquire,
write, extend, finish or die; the limit moves; a lagging usage figure
settles now and then.  Checked against a model after every step."""

from __future__ import annotations

import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from storage import quota
from storage.quota import RECORD_MARGIN, ScopeFigure, ScopeWriter
from storage.uploads import _split_bytes
from storage.vfid import QuotaScopeID

KiB = 1 << 10


class FakeVolume:
    """A volume whose scope usage is the bytes of its staging files plus a
    base, either live or as of the last ``settle`` (a lagging figure)."""

    def __init__(self, root: Path, limit: int, base: int, live: bool) -> None:
        self.root = root
        self.name = "fake"
        self.limit = limit
        self.base = base
        self.live = live
        self.settled = base

    def true_used(self) -> int:
        return self.base + sum(p.stat().st_size for p in (self.root / "staging").iterdir())

    def settle(self) -> None:
        self.settled = self.true_used()

    def read_scope_quota(self, qsid: QuotaScopeID) -> ScopeFigure | None:
        if self.limit is None:
            return None
        if self.live:
            return ScopeFigure(limit=self.limit, used=self.true_used())
        # Lagging: the ledger must cover everything since the settle; a lag
        # bound of an hour means no entry expires during the test.
        return ScopeFigure(limit=self.limit, used=self.settled, live=False, lag=3600.0)


@dataclass
class Writer:
    sw: ScopeWriter
    fd: int
    path: Path
    want_end: int

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size


class QuotaGrants(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        (self.root / "staging").mkdir()
        self.qsid = QuotaScopeID.parse("user:" + "0" * 8 + "-0000-0000-0000-" + "0" * 12)
        self.writers: dict[str, Writer] = {}
        self.uncounted = 0
        self.count = 0

    def teardown(self) -> None:
        for w in self.writers.values():
            os.close(w.fd)
        self.tmp.cleanup()

    @initialize(limit=st.integers(64 * KiB, 1024 * KiB), base=st.integers(0, 256 * KiB), live=st.booleans())
    def setup(self, limit: int, base: int, live: bool) -> None:
        self.volume = FakeVolume(self.root, limit, base, live)

    # -- the model's view ------------------------------------------------------------

    def committed(self) -> int:
        """True usage plus what live writers may still write under their grants."""
        return self.volume.true_used() + sum(max(0, w.sw.until - w.size) for w in self.writers.values())

    def check_grant(self, w: Writer, before: int, want: int) -> None:
        granted = w.sw.until - before
        assert 0 <= granted <= want
        if granted > 0:
            # Never more than the scope holds, once its record margin is kept
            # (less what killed writers left that a lagging figure cannot show yet).
            assert self.committed() - self.uncounted <= self.volume.limit - RECORD_MARGIN
        if granted < want and self.volume.live:
            # Short only when the scope is full: it got everything that was left.
            assert self.committed() >= self.volume.limit - RECORD_MARGIN

    # -- rules --------------------------------------------------------------------

    @precondition(lambda self: len(self.writers) < 4)
    @rule(want=st.integers(0, 512 * KiB))
    def start(self, want: int) -> None:
        self.count += 1
        session = f"{self.count:032x}"
        path = self.root / "staging" / session
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        w = Writer(ScopeWriter(self.volume, self.qsid, session, path), fd, path, want)
        w.sw.acquire(0, want)
        self.writers[session] = w
        self.check_grant(w, 0, want)

    @precondition(lambda self: self.writers)
    @rule(data=st.data(), n=st.integers(1, 256 * KiB))
    def write(self, data: st.DataObject, n: int) -> None:
        w = self.writers[data.draw(st.sampled_from(sorted(self.writers)))]
        size = w.size
        if size >= w.sw.until and size < w.want_end:
            before = w.sw.until
            w.sw.extend(size, w.want_end - size)
            self.check_grant(w, before, w.want_end - size)
        n = min(n, w.sw.until - size)
        if n > 0:
            os.pwrite(w.fd, b"x" * n, size)

    @precondition(lambda self: self.writers)
    @rule(data=st.data(), killed=st.booleans())
    def end(self, data: st.DataObject, killed: bool) -> None:
        session = data.draw(st.sampled_from(sorted(self.writers)))
        w = self.writers.pop(session)
        if not killed:
            w.sw.release(w.size - w.sw.start)  # as UploadWriter.close does
        else:
            # Known limit: a killed writer's bytes are in no ledger; a lagging
            # figure shows them only once it settles.
            self.uncounted += w.size
        os.close(w.fd)  # the lock goes; a killed writer's grant file stays behind

    @rule(limit=st.integers(16 * KiB, 1024 * KiB))
    def set_limit(self, limit: int) -> None:
        self.volume.limit = limit

    @rule()
    def settle(self) -> None:
        self.volume.settle()
        self.uncounted = 0

    @rule(size=st.integers(1, 128 * KiB))
    def check_a_copy(self, size: int) -> None:
        """``check_fits`` (a copy, a clone, an upload session) agrees with the grants."""
        r = quota.room(self.volume, self.qsid)
        assert r is not None
        try:
            quota.check_fits(self.volume, self.qsid, size, "the copy")
        except quota.InsufficientStorage as exc:
            assert size > r.grantable
            assert exc.extra["size"] == size and exc.extra["left"] == r.grantable
            assert exc.extra["quota_scope_id"] == str(self.qsid)
        else:
            assert size <= r.grantable

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def counted_usage_never_below_the_truth(self) -> None:
        if not hasattr(self, "volume"):
            return
        r = quota.room(self.volume, self.qsid)
        assert r is not None
        # What the daemon counts covers every byte on disk (lagging or not) and
        # every byte a live writer may still write.
        assert r.used + r.reserved >= self.committed() - (0 if self.volume.live else self.uncounted)
        if self.volume.live:
            assert r.used + r.reserved == self.committed()

    @invariant()
    def only_live_writers_have_grant_files(self) -> None:
        if not hasattr(self, "volume"):
            return
        quota.room(self.volume, self.qsid)  # drops stale grants
        gdir = quota.grants_dir(self.volume, self.qsid)
        names = set(os.listdir(gdir)) if gdir.is_dir() else set()
        assert names <= set(self.writers)


QuotaGrants.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_quota_grants = QuotaGrants.TestCase


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 5, 9, 10])
def test_split_bytes_cuts_buffers_at_any_byte(cut):
    buffers = [b"abc", b"", b"defg", b"hij"]
    head, tail = _split_bytes(buffers, cut)
    assert b"".join(bytes(b) for b in head) == b"abcdefghij"[:cut]
    assert b"".join(bytes(b) for b in tail) == b"abcdefghij"[cut:]


def test_a_scope_without_a_limit_grants_everything_and_leaves_no_files(tmp_path):
    volume = FakeVolume(tmp_path, None, 0, True)  # type: ignore[arg-type]
    (tmp_path / "staging").mkdir()
    qsid = QuotaScopeID.parse("project:" + "1" * 8 + "-1111-1111-1111-" + "1" * 12)
    sw = ScopeWriter(volume, qsid, "a" * 32, tmp_path / "staging" / ("a" * 32))
    assert sw.acquire(10, 1 << 40) == 10 + (1 << 40)
    quota.check_fits(volume, qsid, 1 << 50, "the copy")
    sw.release(5)
    assert not (tmp_path / ".storage-proxy").exists()


def test_a_hold_reserves_its_bytes_until_released_and_not_after_its_holder_dies(tmp_path):
    """A copy or clone holds its size in the scope while it runs (quota.Hold)."""
    volume = FakeVolume(tmp_path, 1024 * KiB, 0, True)
    (tmp_path / "staging").mkdir()
    qsid = QuotaScopeID.parse("user:" + "2" * 8 + "-2222-2222-2222-" + "2" * 12)
    full = quota.room(volume, qsid)
    assert full is not None and full.grantable == 1024 * KiB - RECORD_MARGIN
    hold = quota.Hold(volume, qsid, 600 * KiB, "the clone").acquire()
    assert quota.room(volume, qsid).reserved == 600 * KiB  # type: ignore[union-attr]
    with pytest.raises(quota.InsufficientStorage, match="the copy needs 500000 bytes"):
        quota.Hold(volume, qsid, 500_000, "the copy").acquire()
    hold.release()
    assert quota.room(volume, qsid).reserved == 0  # type: ignore[union-attr]
    assert os.listdir(quota.grants_dir(volume, qsid)) == []
    # A holder that dies (its lock goes, its files stay) reserves nothing.
    dead = quota.Hold(volume, qsid, 600 * KiB, "the clone").acquire()
    os.close(dead.fd)
    assert quota.room(volume, qsid).reserved == 0  # type: ignore[union-attr]
    assert os.listdir(quota.grants_dir(volume, qsid)) == []
