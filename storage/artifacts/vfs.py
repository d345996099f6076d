"""A VFS artifact storage: files below one directory, confined to it.

Every method here blocks (run it in the pool).  Paths are checked as the
vfolder routes check theirs (``storage.paths``): ``..``, absolute paths and
NUL bytes are refused, symlinks are resolved and must stay inside, and
writes walk the resolved path again from a descriptor of the root without
following symlinks.  Uploads go to a hidden ``.NAME.<random>.part`` beside
the target and are renamed over it once the whole body came.
"""

from __future__ import annotations

import errno
import mimetypes
import os
import secrets
import shutil
import stat as stat_module
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from storage.artifact_config import VFSStorageConfig
from storage.artifacts.errors import ArtifactFileNotFound, FileTooLarge
from storage.errors import InvalidAPIParameters, InvalidPath, no_space
from storage.fs.tree import remove_at
from storage.paths import open_dir_beneath, open_root, resolve_rel, validate_relpath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PART_SUFFIX = ".part"


def content_type_of(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def _is_part_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(PART_SUFFIX)


class VFSArtifactStorage:
    def __init__(self, config: VFSStorageConfig) -> None:
        self.config = config
        self.name = config.name

    # -- set-up ---------------------------------------------------------------

    def prepare(self) -> None:
        """Blocking: create the root; empty it if the storage is ``temporary``."""
        root = self.config.root
        root.mkdir(parents=True, exist_ok=True)
        if self.config.temporary:
            for entry in os.scandir(root):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)

    @property
    def root(self) -> str:
        return os.path.realpath(self.config.root)

    def _rel(self, filepath: Any, field: str = "filepath", follow_final: bool = True) -> PurePosixPath:
        try:
            return resolve_rel(self.root, filepath, field=field, follow_final=follow_final)
        except InvalidPath as exc:
            # Say "the storage", not "the vfolder".
            raise InvalidPath(str(exc).replace("vfolder", "storage"), data=exc.data) from None

    def _abs(self, rel: PurePosixPath) -> str:
        return self.root if str(rel) == "." else os.path.join(self.root, str(rel))

    # -- reads ------------------------------------------------------------------

    def meta(self, filepath: str) -> dict[str, Any]:
        path = self._abs(self._rel(filepath))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ArtifactFileNotFound(f"no such file: {filepath}") from None
        is_dir = stat_module.S_ISDIR(st.st_mode)
        return {
            "filepath": filepath,
            "content_length": st.st_size,
            "content_type": None if is_dir else content_type_of(path),
            "last_modified": st.st_mtime,
            "created": st.st_ctime,
            "is_directory": is_dir,
            "metadata": {"mode": oct(st.st_mode), "uid": str(st.st_uid), "gid": str(st.st_gid)},
        }

    def list_files(self, directory: str) -> list[dict[str, Any]]:
        """Every entry below ``directory``, depth first, as upstream's ``VFSFileInfo``.

        Symlinks are listed, never followed; upload staging files are hidden.
        """
        rel = self._rel(directory, "directory")
        top = self._abs(rel)
        try:
            st = os.stat(top)
        except FileNotFoundError:
            raise ArtifactFileNotFound(f"no such directory: {directory}") from None
        if not stat_module.S_ISDIR(st.st_mode):
            raise InvalidAPIParameters.field("directory", "is not a directory")
        base = directory.strip("/") if directory not in (".", "./") else ""
        files: list[dict[str, Any]] = []
        stack: list[tuple[str, str]] = [(top, base)]
        while stack:
            path, relbase = stack.pop()
            try:
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed while we walked
            subdirs = []
            for entry in entries:
                if _is_part_file(entry.name):
                    continue
                try:
                    est = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                is_dir = stat_module.S_ISDIR(est.st_mode)
                relpath = f"{relbase}/{entry.name}" if relbase else entry.name
                files.append({
                    "name": entry.name,
                    "type": "directory" if is_dir else "file",
                    "size": None if is_dir else est.st_size,
                    "modified": est.st_mtime,
                    "created": est.st_ctime,
                    "path": relpath,
                })
                if is_dir:
                    subdirs.append((entry.path, relpath))
            stack.extend(reversed(subdirs))
        return files

    def open_download(self, filepath: str) -> tuple[str, int | None, Any]:
        """``(content type, length or None, source)`` for a file or a directory.

        A file's source is a descriptor; a directory's is an iterator of tar
        chunks (length unknown), as upstream answers a directory.
        """
        path = self._abs(self._rel(filepath))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArtifactFileNotFound(f"no such file: {filepath}") from None
        try:
            st = os.fstat(fd)
            if stat_module.S_ISDIR(st.st_mode):
                return "application/x-tar", None, tar_stream(fd)
            if not stat_module.S_ISREG(st.st_mode):
                raise InvalidAPIParameters.field("filepath", "is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return content_type_of(path), st.st_size, fd

    # -- writes -------------------------------------------------------------------

    def delete(self, filepath: str) -> None:
        rel = self._rel(filepath, follow_final=False)
        if str(rel) == ".":
            raise InvalidAPIParameters.field("filepath", "the storage root itself cannot be deleted")
        root_fd = open_root(self.root)
        try:
            try:
                parent = open_dir_beneath(root_fd, rel.parent)
            except (FileNotFoundError, NotADirectoryError):
                return  # nothing there, as upstream (and S3)
            try:
                remove_at(parent, rel.name)  # a symlink itself, never its target
            finally:
                os.close(parent)
        finally:
            os.close(root_fd)

    def start_upload(self, filepath: str) -> Upload:
        rel = self._rel(filepath, follow_final=False)
        if str(rel) == ".":
            raise InvalidAPIParameters.field("filepath", "names the storage root")
        return Upload(self, rel, filepath)


def _open_dirs_beneath(root_fd: int, rel: PurePosixPath) -> int:
    """Open (creating as needed) each directory of ``rel`` below ``root_fd``, never following symlinks."""
    fd = os.dup(root_fd)
    try:
        for part in rel.parts:
            if part in ("", "."):
                continue
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except NotADirectoryError:
        os.close(fd)
        raise InvalidAPIParameters.field("filepath", "a parent is not a directory") from None
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.ELOOP:
            raise InvalidPath("filepath: leads outside the storage", data={"filepath": "leads outside the storage"}) from None
        raise no_space(exc) from exc
    return fd


class Upload:
    """One file arriving: a staging file beside the target, renamed over it at the end."""

    def __init__(self, storage: VFSArtifactStorage, rel: PurePosixPath, filepath: str) -> None:
        self.storage = storage
        self.rel = rel
        self.filepath = filepath
        self.dir_fd = -1
        self.fd = -1
        self.part_name = f".{rel.name[:200]}.{secrets.token_hex(8)}{PART_SUFFIX}"
        self.size = 0

    def open(self) -> None:
        root_fd = open_root(self.storage.root)
        try:
            self.dir_fd = _open_dirs_beneath(root_fd, self.rel.parent)
        finally:
            os.close(root_fd)
        try:
            self.fd = os.open(self.part_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                              0o644, dir_fd=self.dir_fd)
        except OSError as exc:
            raise no_space(exc) from exc

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            self.open()
        limit = self.storage.config.max_file_size
        self.size += len(data)
        if limit is not None and self.size > limit:
            raise FileTooLarge(f"the file is larger than max-file-size ({limit} bytes)")
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            raise no_space(exc) from exc

    def finish(self) -> str:
        """The whole file came: move it into place (an empty file is still a file)."""
        if self.fd < 0:
            self.open()
        try:
            os.fsync(self.fd)
            try:
                st = os.stat(self.rel.name, dir_fd=self.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat_module.S_ISDIR(st.st_mode):
                raise InvalidAPIParameters.field("filepath", "is a directory")
            os.rename(self.part_name, self.rel.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            self.abort()
            raise
        self._close()
        return self.filepath

    def abort(self) -> None:
        if self.dir_fd >= 0:
            try:
                os.unlink(self.part_name, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
        self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


# -- a directory as a streamed tar ------------------------------------------------

TAR_CHUNK = 1 << 18


def tar_stream(dir_fd: int, chunk: int = TAR_CHUNK) -> Iterator[bytes]:
    """A ustar/pax archive of the tree under ``dir_fd``, produced as it is read.

    Never follows symlinks (they are archived as symlinks); memory is one
    chunk.  Closes ``dir_fd`` when exhausted or closed.
    """
    pending: list[bytes] = []
    size = 0
    try:
        for piece in _tar_dir(dir_fd, "", chunk):
            pending.append(piece)
            size += len(piece)
            if size >= chunk:  # one pool hop per chunk, not per header
                yield b"".join(pending)
                pending, size = [], 0
        pending.append(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        yield b"".join(pending)
    finally:
        os.close(dir_fd)


def _tar_dir(fd: int, prefix: str, chunk: int) -> Iterator[bytes]:
    for name in sorted(os.listdir(fd)):
        if _is_part_file(name):
            continue
        arcname = f"{prefix}{name}"
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        info = tarfile.TarInfo(arcname)
        info.mode = stat_module.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        if stat_module.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            yield info.tobuf(tarfile.PAX_FORMAT)
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                yield from _tar_dir(sub, arcname + "/", chunk)
            finally:
                os.close(sub)
        elif stat_module.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(name, dir_fd=fd)
            yield info.tobuf(tarfile.PAX_FORMAT)
        elif stat_module.S_ISREG(st.st_mode):
            try:
                ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                continue
            try:
                size = os.fstat(ffd).st_size
                info.size = size
                yield info.tobuf(tarfile.PAX_FORMAT)
                left = size
                while left > 0:
                    data = os.read(ffd, min(chunk, left))
                    if not data:  # shrank while we read: pad with zeros to the size announced
                        data = tarfile.NUL * min(chunk, left)
                    left -= len(data)
                    yield data
                pad = (-size) % tarfile.BLOCKSIZE
                if pad:
                    yield tarfile.NUL * pad
            finally:
                os.close(ffd)


def validate_filepath(value: Any, field: str = "filepath") -> str:
    """A request's path: a string that ``validate_relpath`` accepts, returned as sent."""
    if not isinstance(value, str):
        raise InvalidAPIParameters.field(field, "expected a string")
    validate_relpath(value, field)
    return value

