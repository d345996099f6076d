"""Clone a 10 GiB vfolder on a loop-mounted XFS (reflink=1): the backend's clone vs a byte copy.

    sudo python bench/bench_clone.py [--size-gib 10] [--small-files 20000] [--workdir /var/tmp]

Makes a sparse image, ``mkfs.xfs -m reflink=1``, mounts it with ``-o loop``
(no quota needed: this measures the copy, not the limits), writes a vfolder
of real data (a few big files and many small ones: every byte written, no
holes), then times

* the backend's clone (``XfsVolume.clone_vfolder``, the vfs tree copy with
  ``copy_file_range``: a reflink within one XFS), and
* a plain byte copy, ``cp -r --reflink=never``,

printing the seconds and the space each used (statvfs before/after).  Page
cache is dropped before each copy when allowed.  Needs root (mount).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20


def run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def populate(root: Path, total: int, small_files: int, small_size: int) -> tuple[int, int]:
    """Write ``total`` bytes of real data: ``small_files`` files of ``small_size``, the rest in 4 big files."""
    block = bytearray(os.urandom(8 * MiB))
    files = written = 0
    for i in range(small_files):
        d = root / f"dir{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir()
        block[:8] = i.to_bytes(8, "little")  # no two files alike
        (d / f"file{i:05d}.bin").write_bytes(block[:small_size])
        files += 1
        written += small_size
    big_total = total - written
    for n in range(4):
        size = big_total // 4
        with open(root / f"big{n}.bin", "wb") as f:
            done = 0
            while done < size:
                block[:16] = (n * 1_000_000 + done).to_bytes(16, "little")
                chunk = min(len(block), size - done)
                f.write(block[:chunk])
                done += chunk
        files += 1
        written += size
    os.sync()
    return files, written


def clone_with_backend(mount: Path, src: str, dst: str) -> float:
    from twisted.internet import defer, reactor

    from backends.base import VolumeContext
    from backends.xfs import XfsVolume
    from storage.bgtasks import Progress
    from storage.blocking import BlockingPool
    from storage.config import VolumeConfig
    from storage.vfid import VFolderID

    elapsed: list[float] = []

    async def main(reactor) -> None:
        pool = BlockingPool(reactor, 4)
        options = {"spawn-helper": False, "require-pquota": False}
        vol = XfsVolume(VolumeConfig("bench", "xfs", mount, ".", options), VolumeContext(pool=pool, reactor=reactor))
        pool.startService()
        try:
            start = time.monotonic()
            await vol.clone_vfolder(VFolderID.parse(src), vol, VFolderID.parse(dst), Progress())
            elapsed.append(time.monotonic() - start)
        finally:
            await pool.stopService()

    outcome: list = []
    d = defer.ensureDeferred(main(reactor))
    d.addBoth(outcome.append).addBoth(lambda _: reactor.stop())
    reactor.run()  # once per process: the benchmark clones once
    if not elapsed:
        outcome[0].raiseException()
    return elapsed[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=10.0)
    ap.add_argument("--small-files", type=int, default=20000)
    ap.add_argument("--small-size-kib", type=int, default=100)
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_clone: needs root to mount a loop device", file=sys.stderr)
        return 2
    total = int(args.size_gib * GiB)
    work = Path(tempfile.mkdtemp(prefix="bench-clone-", dir=args.workdir))
    image, mount = work / "xfs.img", work / "mnt"
    mount.mkdir()
    try:
        with open(image, "wb") as f:
            f.truncate(int(total * 2.4) + 2 * GiB)  # sparse: room for the source and a byte copy
        run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
        run("mount", "-o", "loop", str(image), str(mount))
        try:
            return bench(mount, total, args)
        finally:
            run("umount", str(mount))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(mount: Path, total: int, args: argparse.Namespace) -> int:
    # Bare folder UUIDs: vfolders without a quota scope, so no helper is needed.
    src, dst = str(uuid.uuid4()), str(uuid.uuid4())
    from storage.vfid import VFolderID

    src_path = mount / VFolderID.parse(src).relative_path()
    src_path.mkdir(parents=True)
    t0 = time.monotonic()
    files, written = populate(src_path, total, args.small_files, args.small_size_kib * 1024)
    print(f"source: {files} files, {written / GiB:.2f} GiB of written data in {time.monotonic() - t0:.1f}s")

    dropped = drop_caches()
    before = used_bytes(mount)
    clone_s = clone_with_backend(mount, src, dst)
    os.sync()
    clone_used = used_bytes(mount) - before

    dropped = drop_caches() and dropped
    before = used_bytes(mount)
    t0 = time.monotonic()
    run("cp", "-r", "--preserve=mode,timestamps", "--reflink=never", str(src_path), str(mount / "bytecopy"))
    os.sync()
    copy_s = time.monotonic() - t0
    copy_used = used_bytes(mount) - before

    dst_path = mount / VFolderID.parse(dst).relative_path()
    for name in ("big0.bin", "dir000/file00000.bin"):
        run("cmp", str(src_path / name), str(dst_path / name))
    print(f"page cache dropped before each copy: {'yes' if dropped else 'no (not permitted)'}")
    print(f"{'method':<34} {'seconds':>8} {'space used':>12} {'GiB/s':>8}")
    for label, seconds, space in (
        ("backend clone (copy_file_range)", clone_s, clone_used),
        ("cp -r --reflink=never", copy_s, copy_used),
    ):
        print(f"{label:<34} {seconds:8.2f} {space / GiB:9.3f} GiB {written / GiB / seconds:8.2f}")
    print(f"speed-up: {copy_s / clone_s:.1f}x; space: {clone_used / max(copy_used, 1) * 100:.2f}% of the byte copy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
