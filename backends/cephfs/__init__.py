"""CephFS backend (``backend = "cephfs"``): quotas via ``ceph.quota.*`` xattrs,
usage via the MDS's recursive stats, moves that survive quota boundaries."""

from .volume import CephFSVolume

__all__ = ["CephFSVolume"]
