"""The real-browser suite (tox -e browser): it runs the real daemon too."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support.fixtures import storage_proxy, storage_proxy_factory  # noqa: E402,F401
