"""Scheduling priority for the reactor thread.

Under heavy upload load the reactor thread competes for the CPU with the
daemon's own bulk threads (the I/O pool, the upload socket threads), the
clients and the kernel's loopback work; measured here, it then ran up to
150 ms late although it was busy less than a tenth of the time, and the
manager API's latency followed.  Giving that one thread the lowest
real-time priority lets it run as soon as it has work.

``SCHED_RESET_ON_FORK`` makes every thread and process created afterwards
(pool workers, socket threads, the XFS helper) start with the normal policy,
so only the reactor thread is real-time; the kernel's RT throttling still
keeps 5% of each second for everything else.
"""

from __future__ import annotations

import os


def prioritize_current_thread(priority: int = 1) -> bool:
    """Put the calling thread in ``SCHED_RR``; False where not permitted."""
    try:
        policy = os.SCHED_RR | os.SCHED_RESET_ON_FORK
        os.sched_setscheduler(0, policy, os.sched_param(priority))
    except (AttributeError, OSError):
        return False
    return True
