"""Properties of storage.paths on arbitrary input (the backend-level property
test, with real operations, is tests/backends/test_vfs_paths_property.py)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.errors import InvalidPath
from storage.paths import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    is_inside,
    resolve_rel,
    validate_name,
    validate_relpath,
)

hostile = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(["..", ".", "", "a", "/", "\\", "\x00", "ü", "n" * 256, "...", "..a"]),
             max_size=10).map("/".join),
)


@settings(max_examples=500)
@given(relpath=hostile)
def test_validated_paths_are_relative_and_clean(relpath: str) -> None:
    try:
        rel = validate_relpath(relpath)
    except InvalidPath as exc:
        assert exc.status == 400
        return
    assert not rel.is_absolute()
    assert ".." not in rel.parts
    assert "\x00" not in str(rel)
    assert len(str(rel).encode()) <= MAX_PATH_BYTES
    assert all(len(p.encode()) <= MAX_NAME_BYTES for p in rel.parts)
    assert validate_relpath(str(rel)) == rel  # normalization is idempotent


@settings(max_examples=300)
@given(name=hostile)
def test_validated_names_are_single_components(name: str) -> None:
    try:
        out = validate_name(name)
    except InvalidPath:
        return
    assert PurePosixPath(out).parts == (out,) and out not in (".", "..")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tree")
    root = base / "root"
    (root / "a" / "b").mkdir(parents=True)
    (base / "outside").mkdir()
    os.symlink(base / "outside", root / "abs")
    os.symlink("../outside", root / "rel")
    os.symlink("..", root / "a" / "up")
    os.symlink("b", root / "a" / "down")
    os.symlink("/", root / "slash")
    os.symlink("l2", root / "l1")
    os.symlink("l1", root / "l2")
    return root


segments = st.lists(st.sampled_from(["a", "b", "abs", "rel", "up", "down", "slash", "l1", ".", "..", "x", ""]),
                    max_size=6).map("/".join)


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(relpath=segments, follow=st.booleans())
def test_resolved_paths_are_inside(tree: Path, relpath: str, follow: bool) -> None:
    try:
        rel = resolve_rel(tree, relpath, follow_final=follow)
    except InvalidPath:
        return
    real_root = os.path.realpath(tree)
    assert ".." not in rel.parts and not rel.is_absolute()
    joined = os.path.join(real_root, str(rel))
    # Everything but (maybe) the final name is a real directory path inside the root.
    assert is_inside(real_root, os.path.realpath(os.path.dirname(joined)) if str(rel) != "." else real_root)
    if follow:
        assert is_inside(real_root, os.path.realpath(joined))
