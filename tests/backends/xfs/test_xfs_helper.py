"""The privileged helper as a real subprocess, over its UNIX socket, with a fake xfs_quota.

What is checked here needs no quota kernel: the AMP commands and their
declared errors, argument validation, SO_PEERCRED, concurrent creations,
and crash repair at every step (``STORAGE_PROXY_XFS_HELPER_CRASH_AFTER``).
The same paths run against the real xfs_quota in test_xfs_quota_vm.py.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols import amp

from backends.xfs import protocol as p
from backends.xfs.client import HelperClient
from backends.xfs.projects import CRASH_ENV
from backends.xfs.registry import RegistryFiles
from storage.errors import ExecutionError, QuotaScopeNotFound

NAME = "0123456789abcdef0123456789abcdef"


def name(i: int) -> str:
    return f"{i:032x}"


async def connect(path: str) -> amp.AMP:
    return await connectProtocol(UNIXClientEndpoint(reactor, path), amp.AMP())


def make_dir(box, n: str) -> str:
    d = box.mount / n
    d.mkdir(exist_ok=True)
    return str(d)


@pytest_twisted.ensureDeferred
async def test_create_report_limit_remove(sandbox):
    sandbox.start_helper()
    client = HelperClient(reactor, sandbox.socket, timeout=20)
    client.startService()
    try:
        assert await client.ping() == p.PROTOCOL_VERSION
        path = make_dir(sandbox, NAME)
        assert await client.create_project(NAME, path, 10 << 20) == 1
        state = sandbox.fake_state()
        assert state["marked"] == {path: 1}
        assert state["limits"]["1"] == [10 << 20, 10 << 20]
        (sandbox.mount / NAME / "f").write_bytes(b"x" * 5000)
        r = await client.report(NAME)
        assert (r["project_id"], r["used_bytes"], r["hard_limit_bytes"]) == (1, 5120, 10 << 20)
        assert r["inodes_used"] == 2
        # Idempotent: the same name and path keep their ID.
        assert await client.create_project(NAME, path, 1 << 20) == 1
        assert await client.set_limit(NAME, 3000) == 1
        assert sandbox.fake_state()["limits"]["1"] == [3072, 3072]  # rounded up to whole KiB
        assert await client.remove_project(NAME) == 1
        assert sandbox.fake_state()["limits"]["1"] == [0, 0]
        assert sandbox.projid.read_text() == "" and sandbox.projects.read_text() == ""
        with pytest.raises(QuotaScopeNotFound):
            await client.report(NAME)
        with pytest.raises(QuotaScopeNotFound):
            await client.set_limit(NAME, 1)
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_every_argument_is_validated(sandbox):
    sandbox.start_helper()
    outside = sandbox.base / NAME
    outside.mkdir()
    (sandbox.mount / "link").symlink_to(outside)
    good = make_dir(sandbox, NAME)
    proto = await connect(sandbox.socket)
    bad_calls = [
        (p.CreateProject, {"name": "../etc", "path": good, "limit_bytes": 1}),
        (p.CreateProject, {"name": NAME.upper(), "path": good, "limit_bytes": 1}),
        (p.CreateProject, {"name": NAME + " 1", "path": good, "limit_bytes": 1}),
        (p.CreateProject, {"name": NAME, "path": str(outside), "limit_bytes": 1}),
        (p.CreateProject, {"name": NAME, "path": str(sandbox.mount / "link"), "limit_bytes": 1}),
        (p.CreateProject, {"name": NAME, "path": str(sandbox.mount / ".." / "mnt" / NAME), "limit_bytes": 1}),
        (p.CreateProject, {"name": NAME, "path": str(sandbox.mount / "other"), "limit_bytes": 1}),
        (p.CreateProject, {"name": NAME, "path": good + "\n5:/etc", "limit_bytes": 1}),
        (p.CreateProject, {"name": NAME, "path": good, "limit_bytes": -1}),
        (p.CreateProject, {"name": NAME, "path": good, "limit_bytes": 2**63}),
        (p.SetLimit, {"name": "x;rm -rf /", "limit_bytes": 1}),
        (p.Report, {"name": ""}),
        (p.RemoveProject, {"name": "a" * 33}),
    ]
    try:
        for command, kwargs in bad_calls:
            with pytest.raises(p.InvalidArgument):
                await proto.callRemote(command, **kwargs)
        # Nothing reached the registry or xfs_quota.
        assert not sandbox.projid.exists() or sandbox.projid.read_text() == ""
        assert sandbox.fake_state()["calls"] == []
    finally:
        proto.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_xfs_quota_failure_is_a_declared_error(sandbox):
    sandbox.start_helper({"FAKE_XFS_QUOTA_FAIL": "limit"})
    client = HelperClient(reactor, sandbox.socket, timeout=20)
    client.startService()
    try:
        with pytest.raises(ExecutionError, match="CommandFailed.*injected failure"):
            await client.create_project(NAME, make_dir(sandbox, NAME), 1 << 20)
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_creations_get_distinct_ids(sandbox):
    sandbox.start_helper()
    protos = [await connect(sandbox.socket) for _ in range(5)]
    try:
        calls = [
            protos[i % 5].callRemote(p.CreateProject, name=name(i), path=make_dir(sandbox, name(i)), limit_bytes=i << 20)
            for i in range(1, 51)
        ]
        results = await defer.gatherResults(calls, consumeErrors=True)
    finally:
        for proto in protos:
            proto.transport.loseConnection()
    ids = [r["project_id"] for r in results]
    assert sorted(ids) == list(range(1, 51))
    reg = RegistryFiles(sandbox.projects, sandbox.projid).read()
    by_name = reg.projid.mapping()
    assert len(by_name) == len(reg.projid.lines) == len(reg.projects.lines) == len(reg.limits.lines) == 50
    for i in range(1, 51):
        assert reg.projects.paths_of(by_name[name(i)]) == [str(sandbox.mount / name(i))]
        assert reg.limits.mapping()[name(i)] == i << 20
    assert sorted(sandbox.fake_state()["marked"].values()) == list(range(1, 51))


async def _crash_during(sandbox, step: str, command, **kwargs) -> None:
    proc = sandbox.start_helper({CRASH_ENV: step})
    proto = await connect(sandbox.socket)
    with pytest.raises((error.ConnectionDone, error.ConnectionLost)):
        await proto.callRemote(command, **kwargs)
    assert proc.wait(20) == 75


@pytest.mark.parametrize("step", ["add:limits", "add:projects", "add:projid", "project", "limit"])
@pytest_twisted.ensureDeferred
async def test_a_crash_during_creation_is_repaired_at_the_next_start(sandbox, step):
    path = make_dir(sandbox, NAME)
    await _crash_during(sandbox, step, p.CreateProject, name=NAME, path=path, limit_bytes=7 << 20)
    sandbox.start_helper()  # reconciles before it listens
    reg = RegistryFiles(sandbox.projects, sandbox.projid).read()
    state = sandbox.fake_state()
    if step in ("add:limits", "add:projects"):
        # Before the commit point (projid): the half-made entry is gone, the ID free.
        assert reg.projid.mapping() == {} and reg.projects.entries() == [] and reg.limits.mapping() == {}
    else:
        # After it: the registry is the intent, and the filesystem now matches it.
        assert reg.projid.mapping() == {NAME: 1}
        assert reg.projects.entries() == [(1, path)]
        assert state["marked"] == {path: 1}
        assert state["limits"]["1"] == [7 << 20, 7 << 20]
    # Either way the proxy's retry succeeds with the smallest ID.
    proto = await connect(sandbox.socket)
    try:
        r = await proto.callRemote(p.CreateProject, name=NAME, path=path, limit_bytes=7 << 20)
    finally:
        proto.transport.loseConnection()
    assert r["project_id"] == 1
    assert sandbox.fake_state()["limits"]["1"] == [7 << 20, 7 << 20]


@pytest.mark.parametrize("step", ["remove:limit", "remove:projid", "remove:projects"])
@pytest_twisted.ensureDeferred
async def test_a_crash_during_removal_is_repaired_at_the_next_start(sandbox, step):
    path = make_dir(sandbox, NAME)
    sandbox.start_helper()
    proto = await connect(sandbox.socket)
    await proto.callRemote(p.CreateProject, name=NAME, path=path, limit_bytes=7 << 20)
    proto.transport.loseConnection()
    sandbox.stop_all()
    await _crash_during(sandbox, step, p.RemoveProject, name=NAME)
    sandbox.start_helper()
    reg = RegistryFiles(sandbox.projects, sandbox.projid).read()
    if step == "remove:limit":
        # Not committed: the project is whole again, limit restored from the intent.
        assert reg.projid.mapping() == {NAME: 1}
        assert sandbox.fake_state()["limits"]["1"] == [7 << 20, 7 << 20]
    else:
        assert reg.projid.mapping() == {} and reg.projects.entries() == [] and reg.limits.mapping() == {}


@pytest_twisted.ensureDeferred
async def test_entries_whose_directory_is_gone_are_dropped(sandbox):
    path = make_dir(sandbox, NAME)
    (sandbox.projects).write_text(f"# admin\n1:{path}\n9:/elsewhere/{name(9)}\n")
    (sandbox.projid).write_text(f"{NAME}:1\n{name(9)}:9\nadmins:9\n")
    (sandbox.limits).write_text(f"{NAME}:1024\n")
    os.rmdir(path)
    sandbox.start_helper()
    reg = RegistryFiles(sandbox.projects, sandbox.projid).read()
    # Ours (under the mount) is dropped and its limit cleared; the others are untouched.
    assert reg.projid.mapping() == {name(9): 9, "admins": 9}
    assert sandbox.projects.read_text() == f"# admin\n9:/elsewhere/{name(9)}\n"
    assert sandbox.fake_state()["limits"]["1"] == [0, 0]


def _amp_ping_box() -> bytes:
    return amp.AmpBox(_command=b"Ping", _ask=b"1").serialize()


def _connect_as_nobody(path: str) -> int:
    """In a forked child that became nobody: 0 = connected but got no answer,
    1 = got an answer, 2 = could not connect (permissions)."""
    child = os.fork()
    if child == 0:
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(path)
            except PermissionError:
                os._exit(2)
            try:
                s.sendall(_amp_ping_box())
                code = 1 if s.recv(1000) else 0
            except (ConnectionResetError, BrokenPipeError):
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def test_other_uids_are_refused(sandbox):
    if os.geteuid() != 0:
        pytest.skip("needs root to become another uid")
    os.chmod(sandbox.base, 0o755)
    sandbox.start_helper()
    # The socket itself is 0600 and owned by the allowed uid ...
    st = os.stat(sandbox.socket)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    assert _connect_as_nobody(sandbox.socket) == 2
    # ... and with the file opened up, SO_PEERCRED still turns nobody away unanswered.
    os.chmod(sandbox.socket, 0o666)
    assert _connect_as_nobody(sandbox.socket) == 0
    # The allowed uid gets its answer on the same socket.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sandbox.socket)
    s.sendall(_amp_ping_box())
    deadline = time.monotonic() + 10
    data = b""
    while b"version" not in data and time.monotonic() < deadline:
        data += s.recv(1000)
    s.close()
    assert b"version" in data
