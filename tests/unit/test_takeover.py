"""Owner locks of state dirs, and the takeover of a dead replica's (storage.events.takeover).

Real processes hold the locks (a child that is SIGKILLed, several children
racing for one dead dir): a lock that can be taken means its owner is gone,
and exactly one survivor gets a dead replica's work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import storage
from storage.events import encoding as enc
from storage.events import takeover
from storage.events.jsonlines import encode_line

SOURCE_ROOT = str(Path(storage.__file__).resolve().parent.parent)

HOLD = """
import sys, time
from pathlib import Path
from storage.events.takeover import claim
fd = claim(Path(sys.argv[1]))
print("held" if fd is not None else "busy", flush=True)
time.sleep(60)
"""

RACE = """
import sys, time
from pathlib import Path
from storage.events.takeover import probe, settle
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
orphan = probe(Path(sys.argv[1]))
print("got" if orphan is not None else "none", flush=True)
if orphan is not None:
    time.sleep(0.3)  # hold it while the others probe, then empty it as a takeover does
    settle(orphan)
"""


def child(script: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=SOURCE_ROOT)
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env)


def dead_replica_dir(root: Path, name: str = "replica-a") -> tuple[Path, str, str]:
    """A state dir as a killed replica leaves it: a running delete, a finished task's
    start, and events of which one was acknowledged."""
    d = root / name
    d.mkdir(parents=True)
    running, finished = str(uuid.uuid4()), str(uuid.uuid4())
    (d / "tasks.journal").write_bytes(
        encode_line({"start": running, "name": "delete-vfolder", "context": {"volume": "v", "vfid": "x"}, "attempt": 1})
        + encode_line({"start": finished, "name": "delete-files", "context": {}, "attempt": 2})
        + encode_line({"end": finished})
    )
    events = [enc.bgtask_updated(running, 0, 0, "Task started"), enc.vfolder_deletion("x", finished, None),
              enc.bgtask_finished(finished, "done", "ok")]
    (d / "events.outbox").write_bytes(
        b"".join(encode_line({"seq": i + 1, "event": e.to_json()}) for i, e in enumerate(events))
        + encode_line({"ack": 1})
    )
    return d, running, finished


def test_a_state_dir_is_held_by_one_process_and_freed_when_it_is_killed(tmp_path: Path) -> None:
    state = tmp_path / "state" / "replica-a"
    holder = child(HOLD, str(state))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert takeover.claim(state) is None  # a second daemon with the same node id
        assert "pid" in (state / takeover.LOCK_NAME).read_text()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        t0 = time.monotonic()
        fd = takeover.claim(state)
        assert fd is not None and time.monotonic() - t0 < 1.0  # no lease to wait out
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()


def test_a_live_replica_is_left_alone_and_a_dead_ones_work_is_read(tmp_path: Path) -> None:
    d, running, finished = dead_replica_dir(tmp_path)
    holder = child(HOLD, str(d))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert takeover.probe(d) is None  # alive: not touched
        assert (d / "tasks.journal").stat().st_size > 0
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        orphan = takeover.probe(d)
        assert orphan is not None
        try:
            assert [r["start"] for r in orphan.tasks] == [running]
            assert [e.name for e in orphan.events] == ["vfolder_deletion_success", "bgtask_done"]
            assert orphan.ended == {finished}
            # While we hold it, the dead replica restarting cannot claim it, nor another survivor probe it.
            assert takeover.claim(d) is None
            assert takeover.probe(d) is None
        finally:
            takeover.settle(orphan)
        assert (d / "tasks.journal").stat().st_size == 0
        assert (d / "events.outbox").stat().st_size == 0
        assert takeover.probe(d) is None  # nothing left: not even locked again
        fd = takeover.claim(d)  # the restarted replica finds its dir free (and empty)
        assert fd is not None
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()


def test_a_dir_without_an_owner_lock_is_never_taken(tmp_path: Path) -> None:
    d, _, _ = dead_replica_dir(tmp_path)
    assert takeover.probe(d) is None  # a daemon of a version without owner locks may be running it


@pytest.mark.parametrize("survivors", [2, 4])
def test_exactly_one_survivor_takes_a_dead_replica_over(tmp_path: Path, survivors: int) -> None:
    for round_ in range(3):
        d, _, _ = dead_replica_dir(tmp_path / str(round_))
        os.close(os.open(d / takeover.LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600))  # it held it once
        start = time.time() + 0.5
        procs = [child(RACE, str(d), str(start)) for _ in range(survivors)]
        answers = []
        for p in procs:
            out, _ = p.communicate(timeout=30)
            answers.append(out.strip())
        assert sorted(answers) == ["got"] + ["none"] * (survivors - 1), answers


def test_peers_are_the_sibling_state_dirs(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    (tmp_path / "stray-file").write_text("x")
    assert takeover.peers(tmp_path / "b") == [tmp_path / "a", tmp_path / "c"]
    assert takeover.peers(tmp_path / "nowhere" / "x") == []
