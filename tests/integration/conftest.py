"""Integration tests run the real daemon (``support.daemon``).

``tests/`` is on ``sys.path`` (pytest's rootdir-conftest insertion, since
``tests/`` has no ``__init__.py``); the insert below makes ``support``
importable however pytest was started.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support.fixtures import storage_proxy, storage_proxy_factory  # noqa: E402,F401
