"""Fake RapidFile Toolkit executables (``pdu``, ``pcp``/``pcopy``, ``prm``).

They accept the invocations the backend uses and print what the real tools
document: ``pdu`` prints du-style ``SIZE<TAB>PATH`` records (``-0``: NUL
terminated; ``-b``: apparent bytes; ``-a``: every entry, directories with
their subtree totals, the path itself last; ``-s``: only the path's total);
``--version`` prints the generation's banner.  ``pcp``/``pcopy -r -p SRC DST``
copy like ``cp -rp``.  Each call is appended to ``$FAKE_RAPIDFILE_LOG``;
``$FAKE_RAPIDFILE_SLEEP`` delays them (to test time limits) and
``$FAKE_RAPIDFILE_FAIL`` makes the named tool exit 1 with a message.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

BANNERS = {
    1: "{tool} (RapidFile Toolkit) 1.3.0\nCopyright Pure Storage",
    2: "version {tool} (RapidFile) 2.1.0\nCopyright Pure Storage",
}

_COMMON = r'''
import json, os, shutil, stat, sys, time
TOOL = os.path.basename(sys.argv[0])
GENERATION = int(os.environ.get("FAKE_RAPIDFILE_GENERATION", "2"))
BANNERS = __BANNERS__
log = os.environ.get("FAKE_RAPIDFILE_LOG")
if log:
    with open(log, "a") as f:
        f.write(json.dumps(sys.argv) + "\n")
if os.environ.get("FAKE_RAPIDFILE_SLEEP"):
    time.sleep(float(os.environ["FAKE_RAPIDFILE_SLEEP"]))
if os.environ.get("FAKE_RAPIDFILE_FAIL") == TOOL:
    sys.stderr.write(TOOL + ": simulated failure\n")
    sys.exit(1)
if sys.argv[1:] == ["--version"]:
    print(BANNERS[GENERATION].format(tool=TOOL))
    sys.exit(0)
'''

_PDU = r'''
flags = [a for a in sys.argv[1:] if a.startswith("-")]
paths = [a for a in sys.argv[1:] if not a.startswith("-")]
sep = "\0" if "-0" in flags else "\n"
if "-b" not in flags or len(paths) != 1:
    sys.stderr.write("fake pdu: only -0 -b [-a|-s] PATH is implemented\n")
    sys.exit(2)
root = paths[0]
records = []
def walk(path):
    st = os.lstat(path)
    total = st.st_size
    if stat.S_ISDIR(st.st_mode):
        for entry in sorted(os.listdir(path)):
            total += walk(os.path.join(path, entry))
        if "-a" in flags or path == root:
            records.append((total, path))
    elif "-a" in flags:
        records.append((total, path))
    return total
try:
    walk(root)
except FileNotFoundError:
    sys.stderr.write("pdu: cannot access '%s': No such file or directory\n" % root)
    sys.exit(1)
if "-s" in flags:
    records = [r for r in records if r[1] == root]
out = sys.stdout.buffer
for size, path in records:
    out.write(b"%d\t%s%s" % (size, os.fsencode(path), sep.encode()))
'''

_COPY = r'''
args = [a for a in sys.argv[1:] if not a.startswith("-")]
if len(args) != 2 or "-r" not in sys.argv or "-p" not in sys.argv:
    sys.stderr.write("fake copy: only -r -p SRC DST is implemented\n")
    sys.exit(2)
src, dst = args
if os.path.isdir(dst):
    dst = os.path.join(dst, os.path.basename(src.rstrip("/")))
shutil.copytree(src, dst, symlinks=True)
'''

_PRM = r'''
args = [a for a in sys.argv[1:] if not a.startswith("-")]
for p in args:
    shutil.rmtree(p, ignore_errors=True)
'''


def install(bin_dir: Path, tools: tuple[str, ...] = ("pdu", "pcp", "pcopy", "prm")) -> Path:
    """Write the fake tools into ``bin_dir`` (to be put first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    common = _COMMON.replace("__BANNERS__", repr(BANNERS))
    bodies = {"pdu": _PDU, "pcp": _COPY, "pcopy": _COPY, "prm": _PRM}
    for tool in tools:
        script = bin_dir / tool
        script.write_text(f"#!{sys.executable}\n{common}\n{bodies[tool]}")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def read_log(log: Path) -> list[list[str]]:
    import json

    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


__all__ = ["BANNERS", "install", "read_log"]
