"""The outbox and the task journal on disk: nothing written is lost, a torn tail is skipped."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred

from storage.events import encoding as enc
from storage.events.journal import TaskJournal
from storage.events.outbox import Outbox


class SyncPool:
    """Runs the blocking functions inline: every Deferred fires at once."""

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return maybeDeferred(f, *args, **kwargs)


def now(coro: Any) -> Any:
    results: list[Any] = []
    Deferred.fromCoroutine(coro).addBoth(results.append)
    assert results, "did not complete synchronously"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def event(i: int) -> enc.Event:
    return enc.vfolder_deletion(f"user:00000000-0000-0000-0000-{i:012d}/{i:032x}", str(i), None if i % 2 else "x")


ops = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(1, 3)), st.tuples(st.just("ack"), st.integers(0, 50))),
               max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=ops, cut=st.integers(0, 400), compact=st.sampled_from([1 << 20, 200]))
def test_reload_returns_every_unacked_event_fully_written(ops: list[tuple[str, int]], cut: int, compact: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.outbox"
        box = Outbox(path, SyncPool(), compact_size=compact)
        now(box.load())
        written: dict[int, enc.Event] = {}
        acked: set[int] = set()
        n = 0
        for op, arg in ops:
            if op == "append":
                batch = [event(n + i) for i in range(arg)]
                n += arg
                for seq, e in zip(now(box.append_many(batch)), batch, strict=True):
                    written[seq] = e
            elif written:
                seq = sorted(written)[arg % len(written)]
                now(box.ack(seq))
                acked.add(seq)
        now(box.close())
        pending = {seq: e for seq, e in written.items() if seq not in acked}

        again = Outbox(path, SyncPool())
        assert dict(now(again.load())) == pending  # in order, nothing lost, nothing acked comes back
        now(again.close())

        # A kill mid-write leaves a torn last line: the events before it survive.
        data = path.read_bytes()
        torn = data + b'{"seq": 99999, "event": {"kind": "anyc'[: cut % 40]
        path.write_bytes(torn)
        third = Outbox(path, SyncPool())
        assert dict(now(third.load())) == pending
        nxt = now(third.append(event(7)))
        assert nxt > max(pending, default=0)  # never the number of an event still pending
        now(third.close())


def test_journal_keeps_unfinished_tasks_and_counts_attempts(tmp_path: Path) -> None:
    j = TaskJournal(tmp_path / "tasks.journal", SyncPool())
    assert now(j.load()) == []
    now(j.started("a", "delete-vfolder", {"vfid": "v"}))
    now(j.started("b", "clone-vfolder", {}))
    now(j.ended("b"))
    now(j.close())
    with open(tmp_path / "tasks.journal", "ab") as f:
        f.write(b'{"start": "c", "na')  # torn
    j2 = TaskJournal(tmp_path / "tasks.journal", SyncPool())
    [record] = now(j2.load())
    assert record["start"] == "a" and record["context"] == {"vfid": "v"} and record["attempt"] == 1
    assert j2.attempt_of("a") == 2 and j2.attempt_of("new") == 1
    now(j2.started("a", "delete-vfolder", {"vfid": "v"}))
    now(j2.close())
    j3 = TaskJournal(tmp_path / "tasks.journal", SyncPool())
    assert [r["attempt"] for r in now(j3.load())] == [2]


def test_a_reload_removes_the_temp_files_of_an_interrupted_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "events.outbox"
    box = Outbox(path, SyncPool())
    now(box.load())
    now(box.append(event(1)))
    now(box.close())
    (tmp_path / "events.outbox.4242.abcd0123.0.tmp").write_bytes(b"half")
    (tmp_path / "events.outbox.tmp").write_bytes(b"older daemon")
    again = Outbox(path, SyncPool())
    assert [e.to_json() for _, e in now(again.load())] == [event(1).to_json()]
    now(again.close())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.outbox"]
