"""PureStorage FlashBlade backend (``backend = "purestorage"``)."""

from .volume import FlashBladeVolume

__all__ = ["FlashBladeVolume"]
