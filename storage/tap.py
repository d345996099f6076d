"""``twistd storage-proxy``: its options and the one function that composes the daemon.

Start order: the I/O pool, the volumes (backends), then the manager and
client listeners.  Stop order is the reverse and sequential: listeners stop
accepting, in-flight requests get ``shutdown-grace`` seconds to finish, then
the API services (upload janitor, background tasks), the volumes and
finally the pool.
"""

from __future__ import annotations

import gc
import grp
import os
import pwd
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from backends.base import VolumeContext
from storage.bgtasks import BackgroundTaskRegistry
from storage.blocking import BlockingPool
from storage.config import Config, ConfigError, default_config, find_config_file, load_config
from storage.logsetup import apply_log_level
from storage.sched import prioritize_current_thread
from storage.volumes import VolumeRegistry
from storage.web.connections import ConnectionGuard, limits_for, raise_open_file_limit
from storage.web.site import StorageSite

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the storage proxy. Without --config it reads storage-proxy.toml from the current "
        "directory, ~/.config/backend.ai/ or /etc/backend.ai/, and failing that runs on an "
        "embedded default: one vfs volume under ./vfroot/local on loopback ports 6021/6022."
    )
    optParameters = [["config", "c", None, "The TOML configuration file."]]


def fail(message: str) -> SystemExit:
    """Start-up failures are one line on stderr and exit status 1, never a traceback."""
    line = f"storage-proxy: {message}"
    if sys.stderr is not sys.__stderr__ and sys.__stderr__ is not None:
        # twistd has already redirected sys.stderr into the log: say it on the real one too.
        print(line, file=sys.__stderr__, flush=True)
    return SystemExit(line)


def load(options: Options | dict[str, Any]) -> Config:
    path = options.get("config")
    try:
        if path:
            return load_config(Path(path))
        found = find_config_file()
        if found is not None:
            return load_config(found)
        return default_config()
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot prepare the default data directory: {exc}") from None


class SequentialMultiService(MultiService):
    """Like MultiService, but stops its children one after another, last first."""

    @defer.inlineCallbacks
    def stopService(self):
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("error stopping {service}", service=child.name or child)


class APIListener(Service):
    """Binds in ``privilegedStartService`` (before privileges drop); fails fast."""

    def __init__(self, label: str, description: str, site: StorageSite, reactor: Any, grace: float):
        self.name = f"{label}-listener"  # type: ignore[assignment]
        self.label = label
        self.description = description
        self.site = site
        self.reactor = reactor
        self.grace = grace
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is not None:
            return
        results: list[Any] = []
        serverFromString(self.reactor, self.description).listen(self.site).addBoth(results.append)
        if not results:
            raise fail(f"{self.label} API: listening on {self.description} did not complete")
        if isinstance(results[0], Failure):
            raise fail(f"{self.label} API: cannot listen on {self.description}: {results[0].getErrorMessage()}")
        self.port = results[0]
        # Connections wait in the kernel's backlog until the volumes are
        # prepared (see StorageProxy.startService).
        self.port.stopReading()
        addr = self.port.getHost()
        log.info("{label} API listening on {host}:{port}", label=self.label, host=addr.host, port=addr.port)

    def start_accepting(self) -> None:
        if self.port is not None:
            self.port.startReading()

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.port is not None:
            yield defer.maybeDeferred(self.port.stopListening)
            self.port = None
        drained = self.site.drain()
        timeout = self.reactor.callLater(self.grace, drained.cancel)
        try:
            yield drained
        except defer.CancelledError:
            log.warn("{label} API: {n} requests still running after {grace}s; stopping anyway",
                     label=self.label, n=len(self.site.in_flight), grace=self.grace)
        else:
            if timeout.active():
                timeout.cancel()


class StorageProxy(SequentialMultiService):
    """The whole daemon; tests reach its parts through these attributes."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        from storage.api.client import ClientAPI
        from storage.api.manager import ManagerAPI

        self.config = config
        self.reactor = reactor
        # Only the twistd entry point turns this on: a test process that
        # composes the service in-process keeps its normal priority.
        self.realtime_reactor = False
        self.pool = BlockingPool(reactor, config.io_threads)
        self.pool.setServiceParent(self)
        # The event bus stops after the API services (whose cancelled tasks
        # still publish) and before the pool (the outbox writes through it).
        from storage.events import make_event_bus

        self.event_bus = make_event_bus(config, self.pool, reactor)
        self.events: Any = None  # storage.events.delivery.Delivery
        self.event_publisher: Any = None
        if self.event_bus is not None:
            self.events, self.event_publisher = self.event_bus.delivery, self.event_bus.publisher
            self.event_bus.owner.setServiceParent(self)  # holds the state dir until the journal is closed
            self.event_bus.journal_service.setServiceParent(self)  # stops after the bus
            self.events.setServiceParent(self)
        run_as_uid = _uid_gid(config)[0] if os.getuid() == 0 else None
        context = VolumeContext(
            pool=self.pool, scandir_limit=config.scandir_limit, reactor=reactor, run_as_uid=run_as_uid
        )
        self.volumes = VolumeRegistry.from_config(config.volumes, context)
        self.volumes.setServiceParent(self)
        self.bgtasks = BackgroundTaskRegistry()
        if self.event_publisher is not None:
            self.bgtasks.add_listener(self.event_publisher)
        self.manager_api = ManagerAPI(config, self.volumes, self.bgtasks, self.pool, reactor)
        if self.events is not None:
            self.manager_api.health.event_bus = self.events
            self.manager_api.events = self.events
            self.manager_api.metrics.add_event_bus(self.events)
        self.client_api = ClientAPI(config, self.volumes, self.pool, reactor)
        for api in (self.manager_api, self.client_api):
            for extra in api.services():
                extra.setServiceParent(self)
        self.manager_site = self.manager_api.site()
        self.client_site = self.client_api.site()
        open_files = raise_open_file_limit()
        for label, site, api_config in (
            ("manager", self.manager_site, config.manager), ("client", self.client_site, config.client),
        ):
            site.guard_connections(ConnectionGuard(limits_for(api_config, label, open_files), reactor, label))
        # With num-proc > 1 the workers serve the client API and count its
        # connections themselves (storage.worker): their /metrics carry worker=N.
        self.manager_api.metrics.add_connections(
            {"manager": self.manager_site.guard} if config.num_proc > 1
            else {"manager": self.manager_site.guard, "client": self.client_site.guard}
        )
        self.manager_listener = APIListener(
            "manager", config.manager.endpoint_description(), self.manager_site, reactor, config.shutdown_grace
        )
        self.client_listener = APIListener(
            "client", config.client.endpoint_description(), self.client_site, reactor, config.shutdown_grace
        )
        # Both listeners stop together (before anything else stops).
        listeners = MultiService()
        listeners.setName("listeners")
        self.manager_listener.setServiceParent(listeners)
        self.client_listener.setServiceParent(listeners)
        # [storage-proxy] num-proc > 1: worker processes serve the client API on its
        # socket (bound here); this process serves the manager API (storage.workers).
        self.workers: Any = None
        if config.num_proc > 1:
            from storage.workers import WorkerPool

            self.workers = WorkerPool(config, reactor)
            self.workers.setServiceParent(listeners)
            self.manager_api.workers = self.workers
            self.manager_api.health.workers = self.workers
            self.manager_api.metrics.add_workers(self.workers)
        listeners.setServiceParent(self)

    def privilegedStartService(self) -> None:
        # Before privileges drop: only root may raise a thread's priority.
        if self.realtime_reactor and self.config.reactor_realtime:
            if prioritize_current_thread():
                log.info("reactor thread runs with real-time priority (SCHED_RR 1)")
            else:
                log.info("reactor thread keeps the normal priority (not permitted to raise it)")
        if self.workers is not None and os.getuid() == 0:
            uid, gid = _uid_gid(self.config)
            problem = self.workers.check_runnable_as(uid, gid) if uid is not None else None
            if problem is not None:
                raise fail(f"config: [storage-proxy] num-proc: {problem}")
        super().privilegedStartService()

    def startService(self) -> None:
        # Logging has begun by now (twistd starts it before the services).
        apply_log_level(self.config.log_level)
        if self.events is None:
            log.warn("no [redis] or [etcd] table: no events are published on a manager's Redis, so a manager "
                     "will not see background tasks (vfolder delete, clone) finish")
        super().startService()
        self.ready = defer.Deferred.fromCoroutine(self._prepare_volumes())

    async def _prepare_volumes(self) -> None:
        """Await every backend's start-up checks, then let the listeners accept.

        Twisted ignores what ``startService`` returns, so a volume that cannot
        work (a cephfs volume on a plain directory, say) is reported here in
        one line and the daemon exits non-zero instead of serving errors.
        """
        for volume in self.volumes:
            try:
                await volume.prepare()
            except ConfigError as exc:
                self._abort(str(exc))
                return
            except Exception as exc:
                log.failure("volume {name}: start-up check failed", name=volume.config.name)
                self._abort(f"volume {volume.config.name}: start-up check failed: {exc}")
                return
        # What start-up allocated lives as long as the daemon: keep it out of
        # the collector's full passes, which hold the GIL for their length.
        if self.event_bus is not None:
            # Tasks a killed daemon left: a delete runs again, a clone removes its copy and fails.
            from storage.events.journal import resume_unfinished
            from storage.events.takeover import StateDirBusy, adopt_orphan

            try:
                await resume_unfinished(self.event_bus.journal, self.events, self.bgtasks,
                                        self.manager_api.task_runner)
            except StateDirBusy as exc:
                self._abort(f"{exc}: give each daemon its own [storage-proxy] node-id (or state-dir)")
                return
            except OSError as exc:
                log.error("task journal: cannot read it ({exc}); tasks of a former run are not resumed", exc=exc)
            # Replicas over one volume: a dead one's tasks and events are taken over by a live one.
            bus, api = self.event_bus, self.manager_api
            bus.owner.watch(lambda orphan: adopt_orphan(orphan, bus.delivery, bus.journal, self.bgtasks,
                                                        api.task_runner))
        gc.freeze()
        self.manager_listener.start_accepting()
        if self.workers is not None:
            self.workers.begin(self.client_listener.port.fileno())
        else:
            self.client_listener.start_accepting()
        log.info("storage-proxy ready: {n} volume(s)", n=len(self.volumes.volumes))

    def _abort(self, message: str) -> None:
        # twistd has replaced sys.stderr with a log file by now: write to fd 2.
        os.write(2, f"storage-proxy: {message}\n".encode())
        log.error("{message}", message=message)
        if self.reactor.running:
            # Stop cleanly (helpers, pool), then exit non-zero: twistd itself
            # has no way to report a failure that happens after start-up.
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self.reactor.stop()


def _uid_gid(config: Config) -> tuple[int | None, int | None]:
    uid = gid = None
    try:
        if config.user is not None:
            entry = pwd.getpwuid(config.user) if isinstance(config.user, int) else pwd.getpwnam(config.user)
            uid, gid = entry.pw_uid, entry.pw_gid
        if config.group is not None:
            gid = (grp.getgrgid(config.group) if isinstance(config.group, int) else grp.getgrnam(config.group)).gr_gid
    except KeyError as exc:
        raise fail(f"config: [storage-proxy] user/group: no such user or group: {exc}") from None
    return uid, gid


# Imported lazily by the stdlib and our dependencies on first use; once the
# daemon has dropped to [storage-proxy] user, an interpreter under a private
# directory (pyenv under /root) could no longer load them.
LAZY_IMPORTS = (
    "encodings.idna",
    "encodings.latin_1",
    "encodings.ascii",
    "encodings.utf_8",
    "werkzeug.routing",
    "werkzeug.exceptions",
    "werkzeug.http",
    "email.utils",
    "http.cookies",
    "mimetypes",
    "zipfile",
    "hashlib",
    "twisted.web.static",
    "twisted.internet.utils",
    "storage.zipstream",
)


def preload_lazy_imports() -> None:
    import importlib

    for name in LAZY_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import mimetypes

    mimetypes.init()


def make_service(config: Config, reactor: Any = None) -> StorageProxy:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return StorageProxy(config, reactor)


def makeService(options: Options) -> IService:
    config = load(options)
    service = make_service(config)
    service.realtime_reactor = True
    parent = getattr(options, "parent", None)
    if parent is not None:
        # Privileges drop after the listeners bind: twistd does it between
        # privilegedStartService and startService when uid/gid are set.
        if os.getuid() == 0:
            uid, gid = _uid_gid(config)
            if uid is not None:
                preload_lazy_imports()
            if uid is not None and not parent.get("uid"):
                parent["uid"] = uid
            if gid is not None and not parent.get("gid"):
                parent["gid"] = gid
        if config.pid_file is not None and parent.get("pidfile") in (None, "twistd.pid"):
            parent["pidfile"] = str(config.pid_file)
    where = config.source or "the embedded default config"
    print(f"storage-proxy: using {where}")
    if config.source is None:
        print(f"storage-proxy: manager API secret (X-BackendAI-Storage-Auth-Token): {config.manager.secret}")
    return service
