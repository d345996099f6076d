"""Apply ``[logging] level`` to the observers twistd installed.

twistd builds its log observer before the plugin's ``makeService`` runs and
offers no level setting, so once logging has begun we wrap each global
observer in a ``FilteringLogObserver``.  This reads the publisher's observer
list (a private attribute of Twisted's ``LogPublisher``); if that ever goes
away the daemon logs at every level rather than failing.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    globalLogPublisher,
)


def apply_log_level(level: str, publisher: LogPublisher = globalLogPublisher) -> int:
    """Filter every observer of ``publisher`` below ``level``; returns how many were wrapped."""
    name = {"warning": "warn", "critical": "critical"}.get(level.lower(), level.lower())
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(name))
    observers = list(getattr(publisher, "_observers", []))
    wrapped = 0
    for observer in observers:
        if isinstance(observer, FilteringLogObserver):
            continue
        publisher.removeObserver(observer)
        publisher.addObserver(FilteringLogObserver(observer, [predicate]))
        wrapped += 1
    return wrapped
