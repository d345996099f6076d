"""Parse ``xfs_quota -x -c 'report -p -b -i -n -N'`` output.

One line per project::

    #42   10240   0   20480   00 [--------]   3   0   0   00 [--------]

that is: ``#ID``, then for blocks and for inodes ``used soft hard warnings
[grace]``.  Block figures are KiB.  The grace field is bracketed and may
contain spaces (``[6 days]``, ``[-none-]``), so it is matched as a unit.
Headers, blank lines and anything else that does not fit are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_GRACE = r"\[[^\]]*\]"
_LINE = re.compile(
    rf"^#(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+{_GRACE}"
    rf"(?:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+{_GRACE})?\s*$"
)


@dataclass(frozen=True)
class ProjectReport:
    project_id: int
    used_bytes: int
    soft_limit_bytes: int  # 0: none
    hard_limit_bytes: int  # 0: none
    inodes_used: int = 0
    inode_soft_limit: int = 0
    inode_hard_limit: int = 0


def parse_report(text: str) -> dict[int, ProjectReport]:
    out: dict[int, ProjectReport] = {}
    for raw in text.splitlines():
        m = _LINE.match(raw.strip())
        if not m:
            continue
        g = [int(x) if x is not None else 0 for x in m.groups()]
        out[g[0]] = ProjectReport(
            project_id=g[0],
            used_bytes=g[1] * 1024,
            soft_limit_bytes=g[2] * 1024,
            hard_limit_bytes=g[3] * 1024,
            inodes_used=g[5],
            inode_soft_limit=g[6],
            inode_hard_limit=g[7],
        )
    return out
