"""Pure parts of the CLIs: file names from Content-Disposition, Content-Range,
and the progress display in both modes."""

from __future__ import annotations

import io
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from storage.cli.disposition import (
    choose_filename,
    filename_from_disposition,
    filename_from_url,
    safe_name,
)
from storage.cli.download import parse_content_range
from storage.cli.progress import ProgressDisplay, human_duration

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@given(names)
def test_filename_star_round_trip(name):
    # the header upstream (and storage-proxy) sends
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    header = f"attachment;filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"
    assert filename_from_disposition(header) == (safe_name(name) or safe_name(ascii_name))


@given(names)
def test_chosen_names_are_safe(name):
    chosen = choose_filename(f'attachment; filename="{name}"', "http://h/download?token=x")
    assert chosen and "/" not in chosen and chosen not in (".", "..") and "\0" not in chosen


def test_disposition_examples():
    assert filename_from_disposition('attachment; filename="a b.txt"') == "a b.txt"
    assert filename_from_disposition("attachment; filename=plain.txt") == "plain.txt"
    assert filename_from_disposition(
        "attachment; filename=\"fallback\"; filename*=UTF-8''%E2%82%AC%20rates") == "€ rates"
    assert filename_from_disposition("attachment; filename*=bogus") is None
    assert filename_from_disposition('attachment; filename="../../etc/passwd"') == "passwd"
    assert filename_from_disposition('attachment; filename=".."') is None
    assert filename_from_url("http://h/dir/some%20file.bin?x=1") == "some file.bin"
    assert filename_from_url("http://h/download?token=abc") == "download"
    assert filename_from_url("http://h/") == "download"


@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**13))
def test_content_range(a, length, total):
    parsed = parse_content_range(f"bytes {a}-{a + length}/{total}")
    assert parsed == (a, a + length + 1, total)
    assert parse_content_range(f"bytes {a}-{a + length}/*") == (a, a + length + 1, None)
    assert parse_content_range(f"bytes {a + length + 1}-{a}/5") is None
    assert parse_content_range("items 1-2/3") is None


def test_plain_lines_every_ten_percent_or_interval():
    out = io.StringIO()
    now = [0.0]
    display = ProgressDisplay(out, "up", False, lambda: now[0], line_interval=5.0)
    for sent in range(0, 1001):
        display.update(sent, 1000, 100.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # 0%, 10%, ..., 100%
    assert lines[-1].startswith("up: 100% ")
    now[0] = 10.0
    display.update(1000, 1000, 0.0)  # nothing new but the interval passed
    assert len(out.getvalue().splitlines()) == 12


def test_bar_on_a_terminal_is_redrawn_sparingly():
    out = io.StringIO()
    now = [0.0]
    display = ProgressDisplay(out, "up", True, lambda: now[0], redraw=0.1)
    for step in range(100):
        now[0] = step * 0.01
        display.update(step * 10, 1000, 2048.0)
    display.update(1000, 1000, 2048.0, final=True)
    text = out.getvalue()
    draws = text.count("\r")
    assert 5 <= draws <= 12
    assert "[##############################] 100.0%" in text and text.endswith("\n")
    assert "2.0 KiB/s" in text and "ETA" in text


def test_duration():
    assert human_duration(None) == "--:--"
    assert human_duration(65) == "1:05"
    assert human_duration(3725) == "1:02:05"
