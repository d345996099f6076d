"""XFS backend: one XFS project (quota) per quota scope, via a privileged helper.

``XfsVolume`` is imported lazily so that the helper process
(``python -m backends.xfs.helper``, run as root) does not load the proxy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["XfsVolume"]


def __getattr__(name: str) -> Any:
    if name == "XfsVolume":
        from .volume import XfsVolume

        return XfsVolume
    raise AttributeError(name)
