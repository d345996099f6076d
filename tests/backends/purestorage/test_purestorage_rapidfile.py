"""RapidFile Toolkit: version detection, pdu parsing, the bounded process runner."""

from __future__ import annotations

import os
import sys

import pytest
import pytest_twisted
from fake_rapidfile import BANNERS
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor

from backends.purestorage import rapidfile
from backends.purestorage.process import CommandOutputTooLarge, CommandTimeout, run_command


@pytest.mark.parametrize("generation", [1, 2])
@pytest.mark.parametrize("tool", ["pdu", "pcp"])
def test_version_banners(generation, tool):
    banner = BANNERS[generation].format(tool=tool).encode()
    assert rapidfile.parse_version(banner) == (generation, "1.3.0" if generation == 1 else "2.1.0")


@pytest.mark.parametrize(
    "output", [b"", b"du (GNU coreutils) 9.1\n", b"pdu: command not found", b"\xff\xfe garbage"]
)
def test_unknown_version_output(output):
    assert rapidfile.parse_version(output) is None


def test_pdu_all_counts_entries_and_takes_the_root_total():
    out = b"".join(
        [
            b"100\t/v/a/f1\0",
            b"4096\t/v/a/sub/x\0",
            b"8192\t/v/a/sub\0",  # already includes x
            b"12388\t/v/a\0",
        ]
    )
    assert rapidfile.parse_pdu_all(out, b"/v/a") == (3, 12388)
    assert rapidfile.parse_pdu_all(out, b"/v/a/") == (3, 12388)


def test_pdu_names_with_spaces_and_tabs():
    out = b"5\t/v/a/name with\ttab\x00" b"9\t/v/a\x00"
    assert rapidfile.parse_pdu_all(out, b"/v/a") == (1, 9)


def test_pdu_summary():
    assert rapidfile.parse_pdu_summary(b"12345\t/v/a\0", b"/v/a") == 12345
    with pytest.raises(rapidfile.PduOutputError):
        rapidfile.parse_pdu_summary(b"", b"/v/a")
    with pytest.raises(rapidfile.PduOutputError):
        rapidfile.parse_pdu_all(b"twelve\t/v/a\0", b"/v/a")


# A tree as nested dicts: name -> size (file) or dict (directory).
trees = st.recursive(
    st.integers(0, 10**9),
    lambda children: st.dictionaries(st.from_regex(r"[a-z ]{1,6}", fullmatch=True), children, max_size=4),
    max_leaves=20,
)


def _du(path: bytes, node, records: list) -> int:
    if isinstance(node, int):
        records.append(b"%d\t%s\0" % (node, path))
        return node
    total = 4096
    for name, child in node.items():
        total += _du(path + b"/" + name.encode(), child, records)
    records.append(b"%d\t%s\0" % (total, path))
    return total


def _count(node) -> int:
    if isinstance(node, int):
        return 0
    return sum(1 + _count(child) for child in node.values())


@given(st.dictionaries(st.from_regex(r"[a-z ]{1,6}", fullmatch=True), trees, max_size=5))
def test_pdu_all_property(tree):
    records: list[bytes] = []
    total = _du(b"/vol/vf", tree, records)
    assert rapidfile.parse_pdu_all(b"".join(records), b"/vol/vf") == (_count(tree), total)


# -- the process runner -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_run_command_collects_output_and_exit_code():
    result = await run_command(
        reactor, sys.executable, ["-c", "import sys; print('out'); sys.stderr.write('err'); sys.exit(3)"]
    )
    assert result.exit_code == 3 and not result.ok
    assert result.stdout == b"out\n" and result.stderr == b"err"


@pytest_twisted.ensureDeferred
async def test_run_command_passes_arguments_verbatim_without_a_shell(tmp_path):
    weird = "$(touch pwned); `x` 'q' \"d\" ; |"
    result = await run_command(reactor, sys.executable, ["-c", "import sys; print(sys.argv[1])", weird])
    assert result.stdout.decode().rstrip("\n") == weird
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


@pytest_twisted.ensureDeferred
async def test_run_command_kills_on_timeout():
    with pytest.raises(CommandTimeout):
        await run_command(reactor, sys.executable, ["-c", "import time; time.sleep(30)"], timeout=0.5)


@pytest_twisted.ensureDeferred
async def test_run_command_kills_on_too_much_output():
    with pytest.raises(CommandOutputTooLarge):
        await run_command(
            reactor, sys.executable, ["-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"],
            max_output=1 << 20,
        )


@pytest_twisted.ensureDeferred
async def test_cancelling_kills_the_process(tmp_path):
    marker = tmp_path / "still-running"
    code = f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(marker)!r}).touch()"
    d = run_command(reactor, sys.executable, ["-c", code], timeout=None)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await _sleep(2.5)
    assert not marker.exists()


def _sleep(seconds: float):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
