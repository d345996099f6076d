"""Runs the helper as a child of the daemon, restarted if it dies.

``twisted.runner.procmon.ProcessMonitor`` spawns it in
``privilegedStartService``, i.e. while twistd is still root.  The command
runs the helper with ``--supervise``: a root supervisor that restarts the
worker itself, so a helper crash is repaired by root even after twistd has
dropped to ``[storage-proxy] user``.  ``--exit-with-parent`` makes both
exit with the daemon.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.runner.procmon import ProcessMonitor

log = Logger()


def _pythonpath() -> str:
    """The directory holding ``backends`` (source tree or site-packages) first."""
    import backends

    here = str(Path(backends.__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return here + (os.pathsep + rest if rest else "")


class HelperProcess(Service):
    def __init__(self, reactor: Any, name: str, argv: list[str]) -> None:
        self.reactor = reactor
        self.name = name  # type: ignore[assignment]
        self.process_name = name
        self.argv = argv
        self.monitor = ProcessMonitor(reactor=reactor)
        self.monitor.minRestartDelay = 1
        self.monitor.maxRestartDelay = 10
        env = dict(os.environ, PYTHONPATH=_pythonpath())
        self.monitor.addProcess(name, argv, env=env)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not self.monitor.running:
            if os.geteuid() != 0:
                log.warn("{name}: the daemon is not root, so the XFS helper is not either; "
                         "xfs_quota -x will fail unless helper-command gains the privilege itself",
                         name=self.name)
            self.monitor.startService()

    def startService(self) -> None:
        if not self.monitor.running:
            self.privilegedStartService()
        super().startService()

    def pid(self) -> int | None:
        proto = self.monitor.protocols.get(self.process_name)
        return proto.transport.pid if proto is not None and proto.transport else None

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        # Closing its stdin asks the helper (--exit-with-parent) to exit; this
        # works after twistd dropped root, when signalling a root child does not.
        for proto in list(self.monitor.protocols.values()):
            if proto.transport is not None:
                proto.transport.closeStdin()  # type: ignore[attr-defined]
        if self.monitor.running:
            try:
                self.monitor.stopService()  # TERM now, KILL after killTime
            except PermissionError:
                log.info("{name}: the helper is root and we are not; it exits as its stdin closed",
                         name=self.process_name)
        for _ in range(100):  # wait (bounded) for the child to be reaped
            if not self.monitor.protocols:
                return
            yield task.deferLater(self.reactor, 0.1, lambda: None)
