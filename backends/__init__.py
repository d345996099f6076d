"""Storage backends, by the name used in ``[volume.NAME] backend``."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import AbstractVolume

BACKENDS = {
    "vfs": "backends.vfs:VfsVolume",
    "xfs": "backends.xfs:XfsVolume",
    "cephfs": "backends.cephfs:CephFSVolume",
    "purestorage": "backends.purestorage:FlashBladeVolume",
}


def backend_class(name: str) -> type[AbstractVolume]:
    module_name, _, attr = BACKENDS[name].partition(":")
    return getattr(import_module(module_name), attr)
