"""The configured volumes, as one service whose children are the backends."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService

from backends import backend_class
from backends.base import AbstractVolume, VolumeContext
from storage.config import VolumeConfig
from storage.errors import InvalidVolume


class VolumeRegistry(MultiService):
    name: str | None = "volumes"  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.volumes: dict[str, AbstractVolume] = {}

    @classmethod
    def from_config(cls, volumes: dict[str, VolumeConfig], context: VolumeContext) -> VolumeRegistry:
        registry = cls()
        for vconf in volumes.values():
            registry.add(backend_class(vconf.backend)(vconf, context))
        return registry

    def add(self, volume: AbstractVolume) -> None:
        self.volumes[volume.config.name] = volume
        volume.setServiceParent(self)

    def get(self, name: Any) -> AbstractVolume:
        if not isinstance(name, str) or name not in self.volumes:
            raise InvalidVolume(f"unknown volume: {name!r}", data={"volume": "unknown volume"})
        return self.volumes[name]

    def __iter__(self):
        return iter(self.volumes.values())
