"""The byte-moving hot path: ``storage._fastio`` when compiled, else the fallback.

``NATIVE`` tells which one runs.  ``STORAGE_PROXY_PURE_PYTHON=1`` forces the
fallback (tests run both).  Both raise ``OSError(errno, ...)``; a loop that
fails part-way puts the bytes it moved before the failure in ``exc.written``.
Every function blocks: call them from the pool.
"""

from __future__ import annotations

import os
from types import ModuleType

IMPLEMENTATIONS = (
    "copy_range", "fdatasync", "pwrite_all", "sendfile", "splice_receive", "sync_file_range",
)


def _load() -> tuple[ModuleType, bool]:
    if os.environ.get("STORAGE_PROXY_PURE_PYTHON") != "1":
        try:
            from storage import _fastio  # type: ignore[attr-defined]

            return _fastio, True
        except ImportError:
            pass
    from storage import _fastio_py

    return _fastio_py, False


implementation, NATIVE = _load()

copy_range = implementation.copy_range
fdatasync = implementation.fdatasync
pwrite_all = implementation.pwrite_all
sendfile = implementation.sendfile
splice_receive = implementation.splice_receive
sync_file_range = implementation.sync_file_range
RECEIVED_ALL: int = implementation.RECEIVED_ALL
RECEIVED_EOF: int = implementation.RECEIVED_EOF
RECEIVED_WAITED: int = implementation.RECEIVED_WAITED
RECEIVED_STOPPED: int = implementation.RECEIVED_STOPPED

__all__ = [
    "NATIVE", "RECEIVED_ALL", "RECEIVED_EOF", "RECEIVED_STOPPED", "RECEIVED_WAITED", "implementation", *IMPLEMENTATIONS,
]
