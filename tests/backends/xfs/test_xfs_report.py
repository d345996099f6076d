"""Parsing ``xfs_quota report -p -b -i -n -N``."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from backends.xfs.report import parse_report

# Captured in the xfs-vm guest (Debian 6.1 UML, xfsprogs 6.1).
REAL = """\
#0                   0          0          0     00 [--------]          3          0          0     00 [--------]
#1                   0      10240      10240     00 [--------]          1          0          0     00 [--------]
#3                3072          0          0     00 [--------]          2          0          0     00 [--------]

"""


def test_real_output():
    r = parse_report(REAL)
    assert sorted(r) == [0, 1, 3]
    assert r[1].hard_limit_bytes == r[1].soft_limit_bytes == 10240 * 1024
    assert r[3].used_bytes == 3072 * 1024 and r[3].inodes_used == 2
    assert r[0].hard_limit_bytes == 0


def test_blocks_only_and_headers():
    text = (
        "Project quota on /mnt/xfs (/dev/ubda)\n"
        "                               Blocks\n"
        "Project ID       Used       Soft       Hard    Warn/Grace\n"
        "---------- --------------------------------------------------\n"
        "#42                 8          0      10240     00 [--------]\n"
        "aa                  0          0      10240     00 [--------]\n"
    )
    r = parse_report(text)
    assert list(r) == [42]
    assert r[42].used_bytes == 8192 and r[42].inodes_used == 0


grace = st.sampled_from(["[--------]", "[6 days]", "[-none-]", "[0 days 01:02:03]", "[01:02:03]"])
num = st.integers(0, 2**53)
row = st.tuples(st.integers(0, 2**32 - 2), num, num, num, st.integers(0, 99), grace, num, num, num, st.integers(0, 99), grace)


@given(st.lists(row, max_size=20, unique_by=lambda r: r[0]), st.lists(st.text(max_size=40), max_size=5))
def test_rendered_rows_parse_back(rows, noise):
    lines = [f"#{r[0]} {r[1]} {r[2]} {r[3]} {r[4]:02d} {r[5]} {r[6]} {r[7]} {r[8]} {r[9]:02d} {r[10]}" for r in rows]
    # Noise that is not a row (headers, warnings) is ignored.
    noise = [n for n in noise if not n.strip().startswith("#")]
    parsed = parse_report("\n".join(noise + lines + noise))
    assert sorted(parsed) == sorted(r[0] for r in rows)
    for r in rows:
        p = parsed[r[0]]
        assert (p.used_bytes, p.soft_limit_bytes, p.hard_limit_bytes) == (r[1] * 1024, r[2] * 1024, r[3] * 1024)
        assert (p.inodes_used, p.inode_soft_limit, p.inode_hard_limit) == (r[6], r[7], r[8])


@given(st.text(max_size=200))
def test_never_raises(text):
    parse_report(text)
