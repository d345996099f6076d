"""One client-API worker process: ``python -m storage.worker`` (started by ``storage.workers``).

The daemon hands it the validated config as TOML on stdin, the client API's
listening socket as fd 3 and its control channel as fd 4 (see
``storage.workers``).  It serves the client API (downloads, tus uploads) with
its own I/O pool and volumes; the manager API, background tasks, events and
the upload janitor stay in the daemon.  It logs to stderr (the daemon relays
every line, prefixed ``worker N:``) and stops on SIGTERM/SIGINT, when the
daemon's end of the control channel closes, or (``PR_SET_PDEATHSIG``) when the
daemon dies: it stops accepting, gives in-flight requests ``shutdown-grace``,
and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, protocol
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import connectionDone
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner
from twisted.protocols import amp
from twisted.python.failure import Failure

from storage.metrics import ConnectionCollector
from storage.web.connections import ConnectionGuard, limits_for, raise_open_file_limit
from storage.workers import (
    CONTROL_FD,
    LISTEN_FD,
    SUPERSEDE_TIMEOUT,
    Supersede,
    WorkerMetrics,
    WorkerReady,
)

log = Logger()

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGTERM when the daemon dies (even SIGKILLed); exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the control channel still tells
        pass
    if os.getppid() != parent:
        sys.exit(0)


class _WorkerSide(amp.AMP):
    def __init__(self, worker: ClientWorker) -> None:
        super().__init__()
        self.worker = worker

    @WorkerMetrics.responder
    def metrics(self) -> dict[str, Any]:
        return {"families": json.dumps(self.worker.metric_families())}

    @Supersede.responder
    def supersede(self, vfolder: str, session: str) -> defer.Deferred[dict[str, Any]]:
        return self.worker.api.tus.supersede_key(vfolder, session).addCallback(lambda _: {})

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.worker.control_lost()


class ClientWorker(MultiService):
    """The pool, the volumes and the client API, on the adopted socket."""

    def __init__(self, config: Any, reactor: Any, index: int) -> None:
        super().__init__()
        from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

        from backends.base import VolumeContext
        from storage.api.client import ClientAPI
        from storage.blocking import BlockingPool
        from storage.volumes import VolumeRegistry

        self.config = config
        self.reactor = reactor
        self.index = index
        self.port: Any = None
        self.control: _WorkerSide | None = None
        self.stopping = False
        self.pool = BlockingPool(reactor, config.io_threads)
        self.pool.setServiceParent(self)
        # The daemon runs the xfs quota helper; a worker only connects to its socket.
        volumes = {name: (replace(v, options={**v.options, "spawn-helper": False}) if v.backend == "xfs" else v)
                   for name, v in config.volumes.items()}
        self.volumes = VolumeRegistry.from_config(volumes, VolumeContext(
            pool=self.pool, scandir_limit=config.scandir_limit, reactor=reactor, run_as_uid=None))
        self.volumes.setServiceParent(self)
        self.api = ClientAPI(config, self.volumes, self.pool, reactor)
        for extra in self.api.services():
            if extra is not self.api.tus.janitor:  # the daemon's janitor expires uploads, once
                extra.setServiceParent(self)
        self.site = self.api.site()
        # Each worker is a process with its own open-file limit: its own connection limits.
        guard = ConnectionGuard(limits_for(config.client, "client", raise_open_file_limit()), reactor, "client")
        self.site.guard_connections(guard)
        self.api.tus.elsewhere = self._supersede_elsewhere
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(ConnectionCollector({"client": guard}))
        self.requests = Counter("storage_proxy_client_requests", "Client API requests answered by this worker",
                                ["method", "status"], registry=self.registry)
        self.in_flight = Gauge("storage_proxy_client_in_flight", "Client API requests and bodies in flight",
                               registry=self.registry)
        self.in_flight.set_function(lambda: len(self.site.in_flight))
        try:
            ProcessCollector(registry=self.registry)
        except Exception:  # pragma: no cover - platforms without /proc
            pass
        self.site.finished_hooks.append(self._count)

    def _count(self, request: Any) -> None:
        method = request.method.decode("ascii", "replace") if isinstance(request.method, bytes) else str(request.method)
        self.requests.labels(method, str(getattr(request, "code", 0) or 0)).inc()

    def _supersede_elsewhere(self, vfolder: str, session: str) -> defer.Deferred[None]:
        """Through the daemon: the other workers stop their PATCH of this upload (bounded)."""
        if self.control is None:
            return defer.succeed(None)
        d = self.control.callRemote(Supersede, vfolder=vfolder, session=session)
        timer = self.reactor.callLater(SUPERSEDE_TIMEOUT + 1.0, d.cancel)

        def settle(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                log.warn("supersede in the other workers failed: {why}", why=result.getErrorMessage())

        d.addBoth(settle)
        return d

    def metric_families(self) -> list[dict[str, Any]]:
        out = []
        for family in self.registry.collect():
            out.append({"name": family.name, "type": family.type, "help": family.documentation,
                        "samples": [[s.name, dict(s.labels), s.value] for s in family.samples]})
        return out

    # -- life ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.reactor.adoptStreamConnection(CONTROL_FD, socket.AF_UNIX, _OneProtocol(self))
        os.close(CONTROL_FD)
        d = defer.Deferred.fromCoroutine(self._start())
        d.addErrback(self._failed)

    async def _start(self) -> None:
        for volume in self.volumes:
            await volume.prepare()
        if self.stopping:
            return
        factory: Any = self.site
        if self.config.client.ssl_enabled:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(_tls_options(self.config.client), False, self.site)
        family = socket.socket(fileno=os.dup(LISTEN_FD))
        try:
            address_family = family.family
        finally:
            family.close()
        self.port = self.reactor.adoptStreamPort(LISTEN_FD, address_family, factory)
        os.close(LISTEN_FD)
        gc.freeze()
        log.info("serving the client API (pid {pid})", pid=os.getpid())
        if self.control is not None:
            self.control.callRemote(WorkerReady, index=self.index, pid=os.getpid()).addErrback(lambda _: None)

    def _failed(self, failure: Any) -> None:
        log.failure("start-up failed", failure)
        if self.reactor.running:
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self.reactor.stop()

    def control_lost(self) -> None:
        self.control = None
        if not self.stopping and self.reactor.running:
            log.warn("the daemon's control channel closed (the daemon is gone): stopping")
            try:
                self.reactor.stop()
            except ReactorNotRunning:  # a SIGTERM (PR_SET_PDEATHSIG) began the stop already
                pass

    @defer.inlineCallbacks
    def stopService(self):
        self.stopping = True
        if self.port is not None:
            yield defer.maybeDeferred(self.port.stopListening)
            self.port = None
        drained = self.site.drain()
        timeout = self.reactor.callLater(self.config.shutdown_grace, drained.cancel)
        try:
            yield drained
        except defer.CancelledError:
            log.warn("{n} requests still running after {grace}s; stopping anyway",
                     n=len(self.site.in_flight), grace=self.config.shutdown_grace)
        else:
            if timeout.active():
                timeout.cancel()
        yield MultiService.stopService(self)


class _OneProtocol(protocol.Factory):
    def __init__(self, worker: ClientWorker) -> None:
        self.worker = worker

    def buildProtocol(self, addr: Any) -> _WorkerSide:
        proto = _WorkerSide(self.worker)
        self.worker.control = proto
        return proto


def _tls_options(api: Any) -> Any:
    """The same certificate (and chain) the daemon's ``ssl:`` endpoint serves."""
    import re

    from OpenSSL.crypto import FILETYPE_PEM, load_certificate, load_privatekey
    from twisted.internet.ssl import CertificateOptions

    pem = Path(api.ssl_cert).read_bytes()
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    certs = [load_certificate(FILETYPE_PEM, b) for b in blocks]
    key = load_privatekey(FILETYPE_PEM, Path(api.ssl_privkey).read_bytes())
    return CertificateOptions(privateKey=key, certificate=certs[0], extraCertChain=certs[1:])


def _observer(out: Any) -> FileLogObserver:
    return FileLogObserver(out, lambda event: (eventAsText(event, includeTimestamp=False) or "") + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="storage.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(args.parent)

    from storage.config import ConfigError, parse_config, tomllib

    try:
        config = parse_config(tomllib.loads(sys.stdin.read()))
    except (ConfigError, ValueError) as exc:  # the daemon validated it: not expected
        print(f"storage-proxy worker {args.index}: config: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)

    from twisted.internet import reactor

    from storage.logsetup import apply_log_level

    globalLogBeginner.beginLoggingTo([_observer(sys.stderr)], redirectStandardIO=False)
    apply_log_level(config.log_level)
    worker = ClientWorker(config, reactor, args.index)
    reactor.callWhenRunning(worker.startService)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", worker.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]  # SIGTERM/SIGINT stop it


if __name__ == "__main__":
    main()
