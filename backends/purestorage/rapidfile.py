"""Pure Storage RapidFile Toolkit: detection, invocations, output parsing.

The toolkit's parallel ``du``/``cp`` work well against a FlashBlade over NFS.
We use the invocations upstream uses (and only flags it uses):

* ``pdu --version``: the first line tells the toolkit generation
  (1.x: ``pdu (RapidFile Toolkit) 1.2.3``; 2.x: ``version pdu (RapidFile) 2.1.0``).
* ``pdu -0 -b -a PATH``: du-style ``SIZE<TAB>PATH`` records, NUL-terminated,
  sizes in bytes, one per entry, each directory with the total below it and
  ``PATH`` itself last.
* ``pdu -0 -b -s PATH``: only the total of ``PATH``.
* ``pcp -r -p SRC DST`` (1.x) / ``pcopy -r -p SRC DST`` (2.x): a recursive copy
  keeping modes and times.  ``DST`` never exists beforehand here, so both
  generations create it as the copy of ``SRC`` (cp semantics).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field

V2_VERSION_RE = re.compile(r"version p[a-zA-Z\d]+ \(RapidFile\) (2\..+)")
V1_VERSION_RE = re.compile(r"p[a-zA-Z\d]+ \(RapidFile Toolkit\) (1\..+)")


@dataclass(frozen=True)
class Toolkit:
    """What is installed: the generation (1 or 2) and the tools' absolute paths."""

    generation: int
    version: str
    tools: dict[str, str] = field(default_factory=dict)

    @property
    def pdu(self) -> str:
        return self.tools["pdu"]

    @property
    def copy_tool(self) -> str | None:
        """``pcopy`` on 2.x, ``pcp`` on 1.x (None if missing)."""
        return self.tools.get("pcopy" if self.generation == 2 else "pcp")


def parse_version(output: bytes) -> tuple[int, str] | None:
    """``(generation, version)`` from ``pdu --version`` output, None if unknown."""
    lines = output.decode("utf-8", "replace").splitlines()
    if not lines:
        return None
    first = lines[0].strip()
    m = V2_VERSION_RE.match(first)
    if m:
        return 2, m.group(1).strip()
    m = V1_VERSION_RE.match(first)
    if m:
        return 1, m.group(1).strip()
    return None


def find_tools(search_path: str | None = None) -> dict[str, str]:
    """Absolute paths of the toolkit programs on PATH (blocking: stats files)."""
    found = {}
    for name in ("pdu", "pcp", "pcopy", "prm", "pls", "pfind"):
        path = shutil.which(name, path=search_path)
        if path:
            found[name] = os.path.abspath(path)
    return found


class PduOutputError(ValueError):
    pass


def _records(output: bytes) -> list[tuple[int, bytes]]:
    records = []
    for raw in output.split(b"\0"):
        line = raw.strip(b"\n")
        if not line:
            continue
        size, sep, name = line.partition(b"\t")
        if not sep:
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise PduOutputError(f"unexpected pdu record: {line[:200]!r}")
            size, name = parts
        try:
            records.append((int(size), name))
        except ValueError:
            raise PduOutputError(f"unexpected pdu size: {size[:50]!r}") from None
    return records


def _same_path(a: bytes, b: bytes) -> bool:
    return a.rstrip(b"/") == b.rstrip(b"/") or os.path.normpath(a) == os.path.normpath(b)


def parse_pdu_all(output: bytes, root: bytes) -> tuple[int, int]:
    """``(entries below root, bytes)`` from ``pdu -0 -b -a root``.

    Directory records already hold their subtree's total, so summing every
    record would count nested data several times (upstream does): the bytes
    are the root record's total and only the count sums records.
    """
    count = 0
    total: int | None = None
    summed = 0
    for size, name in _records(output):
        if _same_path(name, root):
            total = size
        else:
            count += 1
            summed += size
    return count, (total if total is not None else summed)


def parse_pdu_summary(output: bytes, root: bytes) -> int:
    """The byte total from ``pdu -0 -b -s root``."""
    records = _records(output)
    for size, name in records:
        if _same_path(name, root):
            return size
    if len(records) == 1:
        return records[0][0]
    raise PduOutputError("pdu printed no total for the path")


def usage_args(path: str | os.PathLike[str]) -> list[bytes]:
    return [b"-0", b"-b", b"-a", os.fsencode(path)]


def summary_args(path: str | os.PathLike[str]) -> list[bytes]:
    return [b"-0", b"-b", b"-s", os.fsencode(path)]


def copy_args(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[bytes]:
    return [b"-r", b"-p", os.fsencode(src), os.fsencode(dst)]
