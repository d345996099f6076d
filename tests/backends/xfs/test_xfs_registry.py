"""The project registry: smallest free ID, atomic and serialized updates, crash leftovers."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.xfs.registry import (
    NameFile,
    ProjectConflict,
    ProjectNotFound,
    ProjectsFile,
    Registry,
    RegistryFiles,
    write_atomically,
)


def _files(tmp_path: Path) -> RegistryFiles:
    return RegistryFiles(tmp_path / "projects", tmp_path / "projid")


def _name(i: int) -> str:
    return f"{i:032x}"


@given(st.sets(st.integers(min_value=1, max_value=60), max_size=40))
def test_smallest_free_id_is_the_least_positive_unused(used):
    reg = Registry(ProjectsFile([f"{i}:/m/x{i}" for i in sorted(used)]), NameFile(), NameFile())
    expected = min(set(range(1, 102)) - used)
    assert reg.smallest_free_id() == expected


def test_ids_used_in_either_file_are_taken(tmp_path):
    files = _files(tmp_path)
    (tmp_path / "projects").write_text("1:/m/a\n# a comment\n")
    (tmp_path / "projid").write_text("someone:2\n")
    with files.locked() as reg:
        assert files.add_project(reg, _name(1), "/m/" + _name(1), 10) == (3, True)


def test_add_writes_all_three_files_and_keeps_foreign_lines(tmp_path):
    files = _files(tmp_path)
    (tmp_path / "projects").write_text("# admin's own\n7:/srv/other\n")
    (tmp_path / "projid").write_text("other:7\n")
    with files.locked() as reg:
        pid, new = files.add_project(reg, _name(5), "/m/" + _name(5), 1 << 20)
    assert (pid, new) == (1, True)
    assert (tmp_path / "projects").read_text() == f"# admin's own\n7:/srv/other\n1:/m/{_name(5)}\n"
    assert (tmp_path / "projid").read_text() == f"other:7\n{_name(5)}:1\n"
    assert (tmp_path / "projid.limits").read_text() == f"{_name(5)}:1048576\n"
    # no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projects", "projid", "projid.limits", "projid.lock"]


def test_add_is_idempotent_and_refuses_another_path(tmp_path):
    files = _files(tmp_path)
    with files.locked() as reg:
        assert files.add_project(reg, _name(1), "/m/" + _name(1), 5) == (1, True)
    with files.locked() as reg:
        assert files.add_project(reg, _name(1), "/m/" + _name(1), 9) == (1, False)
        assert reg.limits.mapping() == {_name(1): 9}
    with files.locked() as reg, pytest.raises(ProjectConflict):
        files.add_project(reg, _name(1), "/m/elsewhere", 9)


def test_remove_frees_the_id_for_the_next_add(tmp_path):
    files = _files(tmp_path)
    with files.locked() as reg:
        for i in range(1, 4):
            files.add_project(reg, _name(i), f"/m/{_name(i)}", 0)
    with files.locked() as reg:
        assert files.remove_project(reg, _name(2)) == 2
    with files.locked() as reg:
        assert files.add_project(reg, _name(9), f"/m/{_name(9)}", 0) == (2, True)
        with pytest.raises(ProjectNotFound):
            files.remove_project(reg, _name(2))
        with pytest.raises(ProjectNotFound):
            files.set_limit(reg, _name(2), 1)


def test_write_atomically_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "projid"
    target.write_text("old:1\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomically(target, "new:2\n")
    assert target.read_text() == "old:1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["projid"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["add:limits", "add:projects", "remove:projid", "remove:projects"])
def test_drop_orphans_finishes_an_interrupted_change(tmp_path, step):
    """A crash between two file renames leaves leftovers that drop_orphans removes."""
    files = _files(tmp_path)
    with files.locked() as reg:
        files.add_project(reg, _name(1), f"/m/{_name(1)}", 1)
    op = step.split(":")[0]

    def checkpoint(s):
        if s == step:
            raise Crash(s)

    files.checkpoint = checkpoint
    with files.locked() as reg, pytest.raises(Crash):
        if op == "add":
            files.add_project(reg, _name(2), f"/m/{_name(2)}", 2)
        else:
            files.remove_project(reg, _name(1))
    files.checkpoint = lambda s: None
    with files.locked() as reg:
        files.drop_orphans(reg, lambda p: p.startswith("/m/"))
    reg = files.read()
    names = reg.projid.mapping()
    # projid is the commit point: what it holds is complete, nothing else is left.
    expected = {} if op == "remove" and step == "remove:projects" else {_name(1): 1}
    if op == "remove" and step == "remove:projid":
        expected = {}
    assert names == expected
    assert {i for i, _ in reg.projects.entries()} == set(names.values())
    assert set(reg.limits.mapping()) == set(names)


def _allocate_in_child(base: Path, i: int) -> int:
    """Fork a process that registers one project; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            files = RegistryFiles(base / "projects", base / "projid")
            with files.locked() as reg:
                files.add_project(reg, _name(i), f"/m/{_name(i)}", i)
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def test_fifty_processes_allocate_fifty_distinct_ids(tmp_path):
    children = [_allocate_in_child(tmp_path, i) for i in range(1, 51)]
    for child in children:
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    reg = _files(tmp_path).read()
    assert len(reg.projects.lines) == len(reg.projid.lines) == len(reg.limits.lines) == 50
    assert {_name(i): i for i in range(1, 51)}.keys() == reg.limits.mapping().keys()
    by_name = reg.projid.mapping()
    assert sorted(by_name.values()) == list(range(1, 51))
    for name, pid in by_name.items():
        assert reg.projects.paths_of(pid) == [f"/m/{name}"]


def _run_ops(files, model, ops):
    for op, i, limit in ops:
        name = _name(i)
        with files.locked() as reg:
            if op == "add":
                files.add_project(reg, name, f"/m/{name}", limit)
                model[name] = limit
            elif op == "remove":
                if name in model:
                    files.remove_project(reg, name)
                    del model[name]
                else:
                    with pytest.raises(ProjectNotFound):
                        files.remove_project(reg, name)
            elif name in model:
                files.set_limit(reg, name, limit)
                model[name] = limit


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "limit"]), st.integers(1, 12), st.integers(0, 99)), max_size=30))
def test_random_operations_keep_the_files_consistent(tmp_path_factory, ops):
    base = tmp_path_factory.mktemp("reg")
    files = _files(base)
    model: dict[str, int] = {}
    with mock.patch("os.fsync"):  # durability is not what this checks; keep it fast
        _run_ops(files, model, ops)
    reg = files.read()
    assert reg.limits.mapping() == model
    ids = reg.projid.mapping()
    assert set(ids) == set(model)
    assert len(set(ids.values())) == len(ids)
    assert sorted(i for i, _ in reg.projects.entries()) == sorted(ids.values())
