"""The durable outbox: events that must reach the manager, kept on disk until Redis took them.

One append-only file of JSON lines, ``<state-dir>/events.outbox``:

* ``{"seq": N, "event": {...}}`` -- written and fsync'ed *before* the event is
  sent, so neither Redis being down nor the daemon being killed loses it;
* ``{"ack": N}`` -- written once Redis accepted event N (not fsync'ed: a lost
  ack only means the event is sent again; delivery is at least once and the
  manager's handlers are idempotent).

At start the file is read (a torn last line from a kill mid-write is
skipped), the events without an ack are handed back in order, and the file
is rewritten with only those.  Once nothing is pending and the file has
grown past ``compact_size`` it is truncated.  Every file operation runs in
the blocking pool, one at a time and in order (a ``DeferredLock``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from storage.events.encoding import TERMINAL, Event
from storage.events.jsonlines import (
    LineFile,
    append,
    encode_line,
    open_append,
    rewrite_lines,
    truncate,
)

log = Logger()

FILE_NAME = "events.outbox"
TERMINAL_NAMES = frozenset(TERMINAL.values()) | {"bgtask_partial_success"}


def default_state_dir(config: Any) -> Path:
    """``[storage-proxy] state-dir``, else ``<first volume>/.storage-proxy/state/<node-id>``.

    The first volume's private directory (which the vfs layout already keeps
    away from users) is durable and writable by the daemon after it dropped
    privileges; the node id keeps two proxies over one shared volume apart.
    """
    if config.state_dir is not None:
        return Path(config.state_dir)
    first = next(iter(config.volumes.values()))
    return Path(first.path) / ".storage-proxy" / "state" / config.node_id


def _read(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], int, set[str]]:
    """Blocking: the unacknowledged records in order, the next sequence number, and the
    task ids whose terminal event the file holds (sent or not)."""
    events: dict[int, dict[str, Any]] = {}
    ended: set[str] = set()
    acked: set[int] = set()
    top = 0
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 1, ended
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "ack" in record:
                acked.add(int(record["ack"]))
            else:
                seq = int(record["seq"])
                events[seq] = record["event"]
                if record["event"].get("kind") == "broadcast" and record["event"].get("name") in TERMINAL_NAMES:
                    ended.add(str(record["event"].get("task_id")))
                top = max(top, seq)
        except (ValueError, KeyError, TypeError):
            log.warn("event outbox {path}: skipping a damaged line ({n} bytes)", path=str(path), n=len(line))
    pending = [(seq, events[seq]) for seq in sorted(events) if seq not in acked]
    return pending, top + 1, ended


def _rewrite(path: Path, pending: list[tuple[int, dict[str, Any]]]) -> None:
    rewrite_lines(path, [encode_line({"seq": seq, "event": event}) for seq, event in pending])


def _load(path: Path) -> tuple[list[tuple[int, Event]], int, int, int, set[str]]:
    """Blocking: read, keep only what is pending (rewritten), open for appending."""
    records, next_seq, ended = _read(path)
    kept: list[tuple[int, dict[str, Any]]] = []
    events: list[tuple[int, Event]] = []
    for seq, raw in records:
        try:
            events.append((seq, Event.from_json(raw)))
            kept.append((seq, raw))
        except (ValueError, KeyError, TypeError):
            log.warn("event outbox {path}: dropping an unreadable event {seq}", path=str(path), seq=seq)
    if path.exists():
        _rewrite(path, kept)
    fd = open_append(path)
    size = sum(len(encode_line({"seq": s, "event": e})) for s, e in kept)
    return events, next_seq, fd, size, ended


class Outbox(LineFile):
    def __init__(self, path: Path, pool: Any, compact_size: int = 1 << 20) -> None:
        super().__init__(path, pool)
        self.compact_size = compact_size
        self._next = 1
        self._pending: set[int] = set()
        self.ended_task_ids: set[str] = set()  # at load: tasks whose terminal event was written

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def load(self) -> list[tuple[int, Event]]:
        """Open the file; the events a former run did not deliver, oldest first."""
        if self.claimed is not None:
            try:
                await self.claimed()
            except OSError as exc:
                self.last_error = str(exc)
                raise
        await self._lock.acquire()
        try:
            records, self._next, self._fd, self._size, self.ended_task_ids = await self.pool.run(_load, self.path)
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror or exc}"
            raise
        finally:
            self._lock.release()
        out = [(seq, event) for seq, event in records]
        self._pending = {seq for seq, _ in out}
        self.last_error = None
        return out

    async def append(self, event: Event) -> int:
        """Write ``event`` durably; its sequence number (ack it once Redis has it)."""
        return (await self.append_many([event]))[0]

    async def append_many(self, events: list[Event]) -> list[int]:
        """Write ``events`` durably in one write and one fsync: all of them or (torn) a prefix."""
        await self._lock.acquire()
        try:
            if self._fd is None:
                raise OSError(f"event outbox {self.path} is not open")
            seqs = list(range(self._next, self._next + len(events)))
            data = b"".join(encode_line({"seq": seq, "event": e.to_json()}) for seq, e in zip(seqs, events, strict=True))
            try:
                await self.pool.run(append, self._fd, data, True)
            except OSError as exc:
                self.last_error = f"{self.path}: {exc.strerror or exc}"
                raise
            self.last_error = None
            self._next += len(events)
            self._size += len(data)
            self._pending.update(seqs)
            return seqs
        finally:
            self._lock.release()

    async def ack(self, seq: int) -> None:
        await self._lock.acquire()
        try:
            if seq not in self._pending or self._fd is None:
                return
            self._pending.discard(seq)
            if not self._pending and self._size >= self.compact_size:
                await self.pool.run(truncate, self._fd)
                self._size = 0
                return
            data = encode_line({"ack": seq})
            await self.pool.run(append, self._fd, data, False)
            self._size += len(data)
        except OSError as exc:
            # A lost ack re-sends the event after a restart: at least once.
            self.last_error = f"{self.path}: {exc.strerror or exc}"
        finally:
            self._lock.release()
