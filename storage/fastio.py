"""The byte-moving hot path: ``storage._fastio`` when compiled, else the fallback.

``NATIVE`` tells which one runs.  ``STORAGE_PROXY_PURE_PYTHON=1`` forces the
fallback (tests run both).  Every function blocks: call them from the pool.
"""

from __future__ import annotations

import os

NATIVE = False
if os.environ.get("STORAGE_PROXY_PURE_PYTHON") != "1":
    try:
        from storage._fastio import copy_file_range, copy_range, pwrite_all, sendfile  # type: ignore[import-not-found]

        NATIVE = True
    except ImportError:
        pass

if not NATIVE:
    from storage._fastio_py import copy_file_range, copy_range, pwrite_all, sendfile

__all__ = ["NATIVE", "copy_file_range", "copy_range", "pwrite_all", "sendfile"]
