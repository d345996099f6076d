"""Plain Linux filesystem backend (placeholder: being written)."""

from __future__ import annotations

from .base import AbstractVolume, Capability


class VfsVolume(AbstractVolume):
    backend_name = "vfs"
    capabilities = frozenset({Capability.VFOLDER})
