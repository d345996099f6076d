"""The privileged XFS quota helper: ``python -m backends.xfs.helper``.

It runs as root, owns the project registry and every ``xfs_quota`` call,
and answers AMP commands (``protocol``) on a UNIX socket.  It accepts a
connection only from the allowed uids (``SO_PEERCRED``), validates every
argument, and never runs a shell.  At start it repairs what a crash left
half done (``ProjectKeeper.reconcile``) before it listens.

``--supervise`` runs a tiny supervisor instead, which keeps one worker
(this same command without ``--supervise``) running with
``twisted.runner.procmon``: root restarts root even after the proxy that
spawned the supervisor has dropped its privileges.  ``--exit-with-parent``
makes it exit when its stdin (a pipe from the parent) closes, so a killed
proxy leaves no helper behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, stdio, threads
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.protocols import amp

from . import protocol as p
from . import quota_tool, registry, validate
from .projects import ProjectKeeper, crash_checkpoint_from_env

log = Logger()


def peer_uid(transport: Any) -> int:
    """The uid of the process at the other end of a UNIX stream socket."""
    sock = transport.getHandle()
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _translate(failure):
    """Map the keeper's exceptions onto the declared AMP errors."""
    exc = failure.value
    if isinstance(exc, validate.InvalidValue):
        raise p.InvalidArgument(str(exc))
    if isinstance(exc, registry.ProjectNotFound):
        raise p.ProjectNotFound(str(exc))
    if isinstance(exc, registry.ProjectConflict):
        raise p.ProjectConflict(str(exc))
    if isinstance(exc, quota_tool.CommandFailed):
        raise p.CommandFailed(str(exc))
    if isinstance(exc, (registry.RegistryError, OSError)):
        raise p.RegistryFailed(str(exc))
    log.failure("unexpected helper error", failure)
    raise p.RegistryFailed(f"internal error: {exc!r}")


class HelperProtocol(amp.AMP):
    def __init__(self, keeper: ProjectKeeper, allowed_uids: frozenset[int]) -> None:
        super().__init__()
        self.keeper = keeper
        self.allowed_uids = allowed_uids
        self.refused = False

    def connectionMade(self) -> None:
        try:
            uid = peer_uid(self.transport)
        except OSError as exc:
            uid, why = -1, str(exc)
        else:
            why = f"uid {uid} is not allowed"
        if uid not in self.allowed_uids:
            self.refused = True
            log.warn("refused a connection: {why}", why=why)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().dataReceived(data)

    def _run(self, f, *args):
        return threads.deferToThread(f, *args).addErrback(_translate)

    @p.Ping.responder
    def ping(self):
        return {"version": p.PROTOCOL_VERSION}

    @p.CreateProject.responder
    def create_project(self, name: str, path: str, limit_bytes: int):
        return self._run(self.keeper.create, name, path, limit_bytes).addCallback(
            lambda i: {"project_id": i}
        )

    @p.SetLimit.responder
    def set_limit(self, name: str, limit_bytes: int):
        return self._run(self.keeper.set_limit, name, limit_bytes).addCallback(
            lambda i: {"project_id": i}
        )

    @p.Report.responder
    def report(self, name: str):
        def fields(r):
            return {
                "project_id": r.project_id,
                "used_bytes": r.used_bytes,
                "soft_limit_bytes": r.soft_limit_bytes,
                "hard_limit_bytes": r.hard_limit_bytes,
                "inodes_used": r.inodes_used,
                "inode_soft_limit": r.inode_soft_limit,
                "inode_hard_limit": r.inode_hard_limit,
            }

        return self._run(self.keeper.report, name).addCallback(fields)

    @p.RemoveProject.responder
    def remove_project(self, name: str):
        return self._run(self.keeper.remove, name).addCallback(lambda i: {"project_id": i})


class HelperFactory(protocol.Factory):
    def __init__(self, keeper: ProjectKeeper, allowed_uids: frozenset[int]) -> None:
        self.keeper = keeper
        self.allowed_uids = allowed_uids

    def buildProtocol(self, addr):
        return HelperProtocol(self.keeper, self.allowed_uids)


class _ExitOnEOF(protocol.Protocol):
    """stdin is a pipe from the parent: its end means the parent is gone."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def connectionLost(self, reason=None) -> None:
        if self.reactor.running:
            log.info("parent gone (stdin closed); exiting")
            self.reactor.stop()


def _uid(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user: {value}") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m backends.xfs.helper", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="UNIX socket to listen on")
    ap.add_argument("--projects", default="/etc/projects")
    ap.add_argument("--projid", default="/etc/projid")
    ap.add_argument("--limits", default=None, help="limits file (default: PROJID.limits)")
    ap.add_argument("--lock", default=None, help="registry lock file (default: PROJID.lock)")
    ap.add_argument("--mount", action="append", required=True, help="an XFS mount point it manages (repeatable)")
    ap.add_argument("--allowed-uid", action="append", type=_uid, required=True, help="uid or user name (repeatable)")
    ap.add_argument("--xfs-quota", default=None, help="xfs_quota executable (default: from PATH, /usr/sbin, /sbin)")
    ap.add_argument("--supervise", action="store_true", help="run a supervisor that restarts the worker")
    ap.add_argument("--exit-with-parent", action="store_true", help="exit when stdin closes")
    return ap.parse_args(argv)


def _listen(reactor, path: str, factory, owner_uid: int) -> defer.Deferred:
    parent = Path(path).parent
    if not parent.is_dir():
        parent.mkdir(parents=True)
        os.chmod(parent, 0o755)  # the proxy must reach the socket in it
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by a dead helper; the lock file says whether it is alive
    except FileNotFoundError:
        pass
    endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=False)
    d = endpoint.listen(factory)

    def restrict(port):
        os.chown(path, owner_uid, -1)  # only the proxy (and root) may connect
        return port

    return d.addCallback(restrict)


def _start_logging() -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    # The keeper logs with the stdlib, straight to stderr as well.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")


def run_worker(args: argparse.Namespace, reactor) -> None:
    if os.geteuid() != 0:
        log.warn("running as uid {uid}, not root: xfs_quota -x will fail", uid=os.geteuid())
    files = registry.RegistryFiles(Path(args.projects), Path(args.projid), args.limits, args.lock)
    tool = quota_tool.XfsQuota(quota_tool.find_xfs_quota(args.xfs_quota), Path(args.projects), Path(args.projid))
    keeper = ProjectKeeper(files, tool, args.mount, crash_checkpoint_from_env())
    summary = keeper.reconcile()
    log.info(
        "reconciled: {r} repaired, {d} dropped (directory gone), {f} failed",
        r=len(summary.repaired), d=len(summary.dropped), f=len(summary.failed),
    )
    allowed = frozenset(args.allowed_uid)
    # The socket is born 0600 (no window before Twisted's chmod); every file
    # the helper writes sets its mode explicitly.
    os.umask(0o077)
    d = _listen(reactor, args.socket, HelperFactory(keeper, allowed), args.allowed_uid[0])

    def listening(_):
        log.info("listening on {path} for uids {uids}", path=args.socket, uids=sorted(allowed))

    def failed(f):
        log.failure("cannot listen on {path}", f, path=args.socket)
        reactor.stop()

    d.addCallbacks(listening, failed)


def run_supervisor(argv: list[str], reactor) -> None:
    from twisted.runner.procmon import ProcessMonitor

    worker = [a for a in argv if a != "--supervise"]
    if "--exit-with-parent" not in worker:
        worker.append("--exit-with-parent")
    monitor = ProcessMonitor(reactor=reactor)
    monitor.minRestartDelay = 1
    monitor.maxRestartDelay = 10
    monitor.addProcess("xfs-helper", [sys.executable, "-m", "backends.xfs.helper", *worker], env=dict(os.environ))
    monitor.startService()
    reactor.addSystemEventTrigger("before", "shutdown", monitor.stopService)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from twisted.internet import reactor

    _start_logging()
    if args.exit_with_parent:
        stdio.StandardIO(_ExitOnEOF(reactor), reactor=reactor)
    if args.supervise:
        run_supervisor(argv, reactor)
    else:
        try:
            run_worker(args, reactor)
        except (FileNotFoundError, SystemExit) as exc:
            print(f"xfs helper: {exc}", file=sys.stderr)
            return 1
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
