"""Client-API worker processes (``[storage-proxy] num-proc`` > 1): the daemon's side.

The daemon binds every listener itself (as root when it starts as root, before
privileges drop), then starts ``num-proc`` worker processes (``python -m
storage.worker``) that accept on the client API's one listening socket: the
socket's file descriptor is handed to each worker as its fd 3
(``spawnProcess`` ``childFDs``) and adopted there (``adoptStreamPort``), so
the kernel spreads the connections over the workers' accept calls and a
worker that dies takes none of the queue with it.  Workers are started after
the drop, so they run as ``[storage-proxy] user`` too.

What stays in the daemon, once: the manager API (its own listener; the
control plane never queues behind upload bodies), background tasks, the
task journal and the event outbox (``state-dir``), the upload janitor and
``/metrics``.  Upload state is on disk and every PATCH locks its staging
file, so any worker serves any request of any upload.

Each worker also gets one end of a socketpair as its fd 4, an AMP channel:
the worker says when it is ready, the daemon asks it for its metrics (added to
``/metrics`` with a ``worker`` label).  Its end closing is how a worker learns
that the daemon is gone, even SIGKILLed (the worker also asks the kernel for
SIGTERM when its parent dies: ``PR_SET_PDEATHSIG``); it then stops accepting,
lets its requests finish for ``shutdown-grace`` and exits.

A worker that exits while the daemon runs is restarted after a backoff
(0.5 s, doubling to 30 s; back to 0.5 s once a worker lived 30 s).  At stop
every worker gets SIGTERM and ``shutdown-grace`` + 5 s to exit, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

import storage

log = Logger()

LISTEN_FD = 3  # the client API's listening socket, in the worker
CONTROL_FD = 4  # the worker's end of its AMP channel to the daemon


class WorkerReady(amp.Command):
    """Worker -> daemon: accepting on the shared socket now."""

    arguments = [(b"index", amp.Integer()), (b"pid", amp.Integer())]
    response = []  # type: ignore[var-annotated]


class WorkerMetrics(amp.Command):
    """Daemon -> worker: its metric families as JSON (AMP caps a value at 64 KiB: a few hundred samples)."""

    arguments = []  # type: ignore[var-annotated]
    response = [(b"families", amp.Unicode())]


class Supersede(amp.Command):
    """Either way: a PATCH of this upload streaming in a worker stops, keeping and recording its
    bytes (``TusUploads.supersede``).  Worker -> daemon: in every other worker; daemon -> worker: here."""

    arguments = [(b"vfolder", amp.Unicode()), (b"session", amp.Unicode())]
    response = []  # type: ignore[var-annotated]


# How long a worker's request waits for the others to supersede (tus's SUPERSEDE_WAIT + RECORD_WAIT, bounded).
SUPERSEDE_TIMEOUT = 12.0


class _DaemonSide(amp.AMP):
    def __init__(self, worker: Worker, pool: WorkerPool) -> None:
        super().__init__()
        self.worker = worker
        self.pool = pool

    @WorkerReady.responder
    def ready(self, index: int, pid: int) -> dict[str, Any]:
        self.worker.ready = True
        self.worker.ready_at = time.monotonic()
        log.info("worker {index} (pid {pid}) ready", index=index, pid=pid)
        self.pool._became_ready(self.worker)
        return {}

    @Supersede.responder
    def supersede(self, vfolder: str, session: str) -> Deferred[dict[str, Any]]:
        d = Deferred.fromCoroutine(self.pool.supersede_elsewhere(self.worker, vfolder, session))
        return d.addCallback(lambda _: {})

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.worker.control is self:
            self.worker.control = None


class _ControlFactory(protocol.Factory):
    def __init__(self, worker: Worker, pool: WorkerPool) -> None:
        self.worker = worker
        self.pool = pool

    def buildProtocol(self, addr: Any) -> _DaemonSide:
        proto = _DaemonSide(self.worker, self.pool)
        self.worker.control = proto
        return proto


@dataclass
class Worker:
    index: int
    pid: int | None = None
    transport: Any = None
    control: _DaemonSide | None = None
    ready: bool = False
    started_at: float = 0.0
    ready_at: float | None = None
    restarts: int = 0
    delay: float = 0.0
    restart_timer: Any = None
    ended: list[Deferred[None]] = field(default_factory=list)
    last_exit: str | None = None


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self.pool = pool
        self.worker = worker
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        # The whole config (secrets included) on a pipe only this child reads.
        self.transport.write(self.pool.config_text.encode("utf-8"))  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buffered = self._buffers.get(fd, b"") + data
        *lines, rest = buffered.split(b"\n")
        self._buffers[fd] = rest[-65536:]
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            log.info("worker {index}: {line}", index=self.worker.index, line=text)

    def processEnded(self, reason: Any) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self._emit(rest)
            self._buffers[fd] = b""
        value = reason.value
        status = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self.worker.last_exit = f"signal {sig}" if sig else f"status {status}"
        self.pool._ended(self.worker)


class WorkerPool(Service):
    """Starts, supervises and stops the client-API workers (a service of the daemon)."""

    name = "workers"  # type: ignore[assignment]

    restart_initial = 0.5
    restart_max = 30.0
    stable_after = 30.0  # a worker that lived this long restarts after restart_initial again
    kill_margin = 5.0  # beyond shutdown-grace, before SIGKILL

    def __init__(self, config: Any, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.count = int(config.num_proc)
        self.grace = float(config.shutdown_grace)
        self.workers = [Worker(i) for i in range(self.count)]
        self.listen_fd: int | None = None
        self.stopping = False
        self.families: dict[int, list[dict[str, Any]]] = {}  # by worker index: its last metrics
        self._ready_waiters: list[Deferred[None]] = []
        document = dict(config.document or {})
        self.config_text = tomli_w.dumps(document)
        env = dict(os.environ)
        source_root = str(Path(storage.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env

    # -- start ---------------------------------------------------------------

    def check_runnable_as(self, uid: int, gid: int | None) -> str | None:
        """Started as root with ``[storage-proxy] user``: can that user start a worker?

        Workers are started (and restarted) after the daemon dropped its
        privileges, so they run as that user and their interpreter and this
        package must be readable by it (a system or /opt install is; one under
        /root is not).  Blocking, before the reactor runs; None when it can.
        """
        import subprocess

        try:
            done = subprocess.run(
                [sys.executable, "-c", "import storage.worker"], user=uid, group=gid, extra_groups=[],
                env=self.env, cwd="/", capture_output=True, text=True, timeout=60,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"workers run as uid {uid}, who cannot start {sys.executable}: {exc}"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            return f"workers run as uid {uid}, who cannot start {sys.executable} -m storage.worker: {last}"
        return None

    def begin(self, listen_fd: int) -> None:
        """Start every worker on ``listen_fd`` (the daemon calls it once the volumes are ready)."""
        self.listen_fd = listen_fd
        if not self.running or self.stopping:
            return
        for worker in self.workers:
            self._spawn(worker)
        log.info("started {n} client-API worker processes sharing one listening socket", n=self.count)

    def _spawn(self, worker: Worker) -> None:
        worker.restart_timer = None
        if self.stopping or self.listen_fd is None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "storage.worker", "--index", str(worker.index), "--parent", str(os.getpid())]
        try:
            transport = self.reactor.spawnProcess(
                _WorkerProcess(self, worker), sys.executable, argv, env=self.env,
                childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: self.listen_fd, CONTROL_FD: theirs.fileno()},
            )
        except OSError as exc:
            ours.close()
            theirs.close()
            log.error("worker {index}: cannot start ({exc})", index=worker.index, exc=exc)
            worker.last_exit = f"cannot start: {exc}"
            self._schedule_restart(worker)
            return
        finally:
            if theirs.fileno() != -1:
                theirs.close()
        worker.transport = transport
        worker.pid = transport.pid
        worker.ready = False
        worker.started_at = time.monotonic()
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _ControlFactory(worker, self))
        ours.close()  # adoptStreamConnection keeps its own duplicate

    def _became_ready(self, worker: Worker) -> None:
        if all(w.ready for w in self.workers):
            waiting, self._ready_waiters = self._ready_waiters, []
            for d in waiting:
                d.callback(None)

    def all_ready(self) -> Deferred[None]:
        """Fires once every worker has said it is ready (for tests and the bench)."""
        if all(w.ready for w in self.workers):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    # -- supervision ---------------------------------------------------------

    def _ended(self, worker: Worker) -> None:
        pid, lived = worker.pid, time.monotonic() - worker.started_at
        worker.transport = None
        worker.pid = None
        worker.ready = False
        if worker.control is not None:
            worker.control.transport.loseConnection()  # type: ignore[union-attr]
            worker.control = None
        self.families.pop(worker.index, None)
        waiting, worker.ended = worker.ended, []
        for d in waiting:
            d.callback(None)
        if self.stopping or not self.running:
            log.info("worker {index} (pid {pid}) exited ({how})", index=worker.index, pid=pid, how=worker.last_exit)
            return
        worker.restarts += 1
        if lived >= self.stable_after or worker.delay == 0.0:
            worker.delay = self.restart_initial
        else:
            worker.delay = min(worker.delay * 2, self.restart_max)
        log.warn("worker {index} (pid {pid}) exited ({how}) after {lived:.1f}s; restarting in {delay}s",
                 index=worker.index, pid=pid, how=worker.last_exit, lived=lived, delay=worker.delay)
        self._schedule_restart(worker)

    def _schedule_restart(self, worker: Worker) -> None:
        if worker.delay == 0.0:
            worker.delay = self.restart_initial
        worker.restart_timer = self.reactor.callLater(worker.delay, self._spawn, worker)

    # -- stop ----------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        waits: list[Deferred[None]] = []
        for worker in self.workers:
            if worker.restart_timer is not None and worker.restart_timer.active():
                worker.restart_timer.cancel()
            worker.restart_timer = None
            if worker.transport is not None:
                d: Deferred[None] = Deferred()
                worker.ended.append(d)
                waits.append(d)
                self._signal(worker, "TERM")
        if not waits:
            return
        everyone = DeferredList(waits, consumeErrors=True)
        timer = self.reactor.callLater(self.grace + self.kill_margin, self._kill_all)
        await everyone
        if timer.active():
            timer.cancel()

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.transport is not None:
                log.warn("worker {index} (pid {pid}) did not stop in time: SIGKILL", index=worker.index, pid=worker.pid)
                self._signal(worker, "KILL")

    @staticmethod
    def _signal(worker: Worker, name: str) -> None:
        try:
            worker.transport.signalProcess(name)
        except Exception:  # already gone (ProcessExitedAlready)
            pass

    # -- one upload, several workers ---------------------------------------------

    async def supersede_elsewhere(self, asking: Worker, vfolder: str, session: str) -> None:
        """Every ready worker but ``asking`` supersedes its PATCH of this upload; bounded."""

        async def one(worker: Worker) -> None:
            control = worker.control
            if control is None or not worker.ready:
                return
            d = control.callRemote(Supersede, vfolder=vfolder, session=session)
            timer = self.reactor.callLater(SUPERSEDE_TIMEOUT, d.cancel)
            try:
                await d
            except Exception as exc:
                log.warn("worker {index}: supersede failed ({exc})", index=worker.index, exc=exc)
            finally:
                if timer.active():
                    timer.cancel()

        others = [w for w in self.workers if w is not asking]
        await DeferredList([Deferred.fromCoroutine(one(w)) for w in others], consumeErrors=True)

    # -- state for /metrics and /health ---------------------------------------

    def status(self) -> list[dict[str, Any]]:
        return [{"index": w.index, "pid": w.pid, "ready": w.ready, "restarts": w.restarts,
                 "last_exit": w.last_exit} for w in self.workers]

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self.workers if w.ready)

    async def collect_metrics(self, timeout: float = 2.0) -> None:
        """Ask every ready worker for its metrics (bounded); kept in ``families`` for the collector."""

        async def one(worker: Worker) -> None:
            control = worker.control
            if control is None or not worker.ready:
                self.families.pop(worker.index, None)
                return
            d = control.callRemote(WorkerMetrics)
            timer = self.reactor.callLater(timeout, d.cancel)
            try:
                answer = await d
            except Exception as exc:
                log.warn("worker {index}: no metrics ({exc})", index=worker.index, exc=exc)
                self.families.pop(worker.index, None)
                return
            finally:
                if timer.active():
                    timer.cancel()
            try:
                self.families[worker.index] = json.loads(answer["families"])
            except ValueError:
                self.families.pop(worker.index, None)

        await DeferredList([Deferred.fromCoroutine(one(w)) for w in self.workers], consumeErrors=True)
