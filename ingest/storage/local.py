"""A store in a local (or network-mounted) folder: writes are a hidden temporary file renamed (or linked) into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ingest import faults
from ingest.storage.base import AlreadyExistsError, ObjectInfo, StorageError


class LocalWriteError(StorageError, OSError):
    """A local file could not be written (no permission, a file where a folder should be, a full disk): one line
    naming it. An OSError too, so callers that pass over a failed write of theirs still do."""

    def __init__(self, message: str, errno: int | None = None):
        OSError.__init__(self, errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotARegularFile(OSError):
    """A name that is not a regular file (a FIFO, a socket, a device, a symlink loop): never opened for reading."""


def _version(info: os.stat_result) -> str:
    """What changes when a file's content may have: mtime and ctime in ns, and the inode (a copy that kept the
    mtime, `cp -p` or `rsync -a`, still gets a new ctime or inode)."""
    return f"{info.st_mtime_ns}.{info.st_ctime_ns}.{info.st_ino}"


class LocalStorage:
    """A folder on a local (or network-mounted) file system."""

    def __init__(self, root: Path):
        self.root = root.expanduser().absolute()
        self.root_uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def uri(self, key: str) -> str:
        if key and "//" not in key and "/./" not in key and not key.startswith(("/", "./")) and key[-1] not in "/.":
            return f"{self.root_uri.rstrip('/')}/{key}"  # a plain key (as listings give): no pathlib round trip
        return str(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        self._check_regular(key)
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
        except IsADirectoryError:
            raise StorageError(f"{self.uri(key)} is a folder, not a file") from None

    def open_read(self, key: str) -> BinaryIO:
        self._check_regular(key)
        return open(self._path(key), "rb")

    def _check_regular(self, key: str) -> None:
        """Refuse what is not a regular file before opening it: a FIFO would block the reader forever, a device
        read without end; a symlink loop says so."""
        try:
            mode = os.stat(self._path(key)).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
        except OSError as e:  # a symlink loop (ELOOP), a name too long, no permission
            raise NotARegularFile(f"{self.uri(key)} cannot be read: {e.strerror or e}") from None
        if stat.S_ISDIR(mode):
            raise StorageError(f"{self.uri(key)} is a folder, not a file")
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise NotARegularFile(f"{self.uri(key)} is {kind}, not a regular file")

    def _publish(self, key: str, fill, place) -> None:
        """Write a hidden temporary file beside the target with `fill(temp)`, then `place(temp, target)`.

        The temporary file sits in the same folder so the rename (or link) is atomic on every POSIX
        file system: readers see the whole file or nothing.
        """
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where the folder should be, no permission: not a race to retry
            raise LocalWriteError(f"{self.uri(key)} cannot be written: its folder {path.parent} cannot be made "
                                  f"({e.strerror or e})", e.errno) from None  # fmt: skip
        temp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            fill(temp)
            faults.maybe_fail("upload_partial")
            place(temp, path)
        except FileExistsError:
            raise  # put_if_absent's answer: another writer was first
        except LocalWriteError:
            raise
        except OSError as e:
            if isinstance(e, NotARegularFile | faults.InjectedFault) or (
                    e.filename is not None and str(e.filename) not in (str(temp), str(path))):  # fmt: skip
                raise  # a drill's fault, or the source of an upload that cannot be read: not this write's
            raise LocalWriteError(f"{self.uri(key)} cannot be written: {e.strerror or e}", e.errno) from None
        finally:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)

    @staticmethod
    def _writer(data: bytes):
        def fill(temp: Path) -> None:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        return fill

    def write_bytes(self, key: str, data: bytes) -> None:
        self._publish(key, self._writer(data), os.replace)

    def upload_file(self, key: str, local_path: str | Path) -> None:
        def fill(temp: Path) -> None:
            try:
                os.link(local_path, temp)  # same file system: no copy of a 64 MiB shard
            except OSError:
                shutil.copyfile(local_path, temp)

        self._publish(key, fill, os.replace)

    def put_if_absent(self, key: str, data: bytes) -> None:
        try:
            # link() fails if the name exists: an atomic create-exclusive of a complete file.
            self._publish(key, self._writer(data), os.link)
        except FileExistsError:
            raise AlreadyExistsError(f"{self.uri(key)} already exists") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def info(self, key: str) -> ObjectInfo | None:
        """The file's size and modification time, or None when there is no such file."""
        try:
            info = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, info.st_size, info.st_mtime, version=_version(info))

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def list(self, prefix: str = "", include_partial: bool = False, follow_links: bool = True) -> Iterator[ObjectInfo]:
        """Every file below `prefix` (a folder key), recursively, sorted.

        Temporary files of unfinished writes are skipped unless `include_partial` (for `lake gc`). Links to folders
        below `prefix` are never followed (as `os.walk`); with `follow_links=False` (every listing that leads to
        deletes) neither is `prefix` when it, or a folder on its way, is a link: nothing is listed there.
        """
        base = self._path(prefix)
        if not follow_links and self._crosses_link(prefix):
            return
        if base.is_file():
            info = base.stat()
            yield ObjectInfo(prefix, info.st_size, info.st_mtime, version=_version(info))
            return
        if not base.is_dir():
            return
        yield from self._walk(str(base), base.relative_to(self.root).as_posix() if base != self.root else "",
                              include_partial)  # fmt: skip

    def _walk(self, folder: str, key: str, include_partial: bool) -> Iterator[ObjectInfo]:
        """A folder's files (sorted), then its sub-folders' (sorted), as `os.walk` orders them; plain strings,
        no pathlib: a listing of ImageNet's 1.28M files spends its time here."""
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            return
        prefix = f"{key}/" if key else ""
        folders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not entry.is_symlink():  # like os.walk: links to folders are not followed
                    folders.append(entry)
                continue
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp") and not include_partial:
                continue
            try:
                info = os.stat(entry.path)
            except OSError as e:
                if isinstance(e, FileNotFoundError) and not entry.is_symlink():
                    continue  # removed while listing
                # A link to nowhere, a symlink loop: listed, so that reading it refuses it with its reason.
                yield ObjectInfo(prefix + name, 0, 0.0, symlink=True)
                continue
            yield ObjectInfo(prefix + name, info.st_size, info.st_mtime, version=_version(info),
                             symlink=entry.is_symlink())  # fmt: skip
        for entry in folders:
            yield from self._walk(entry.path, prefix + entry.name, include_partial)

    def list_children(self, prefix: str = "", follow_links: bool = True) -> list[str]:
        """Names of the sub-folders directly below `prefix`, sorted; with `follow_links=False`, links to folders are
        not among them, and a `prefix` reached through a link has none."""
        base = self._path(prefix)
        if (not follow_links and self._crosses_link(prefix)) or not base.is_dir():
            return []
        return sorted(
            p.name
            for p in base.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (follow_links or not p.is_symlink())
        )

    def _crosses_link(self, key: str) -> bool:
        """Whether a folder on the way from the root to `key` (the key itself included) is a symbolic link."""
        path = self.root
        for part in key.split("/") if key else ():
            path = path / part
            if path.is_symlink():
                return True
        return False

    def delete(self, key: str) -> None:
        """Remove the file `key`; refused when a folder on its way is a symbolic link (which could lead anywhere:
        a delete never leaves the store). A key that is itself a link loses the link, never its target."""
        parent = key.rpartition("/")[0]
        if self._crosses_link(parent):
            raise StorageError(f"refusing to delete {self.uri(key)}: a folder on its path is a symbolic link")
        self._path(key).unlink(missing_ok=True)

    def check_access(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root} is a file, not a folder")

    def check_writable(self) -> None:
        """Fail early, before any work, on a folder this process cannot create or write into (a file in the way,
        permissions, a read-only mount), judged from its nearest existing folder: nothing is created here."""
        self.check_access()
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"{self.root} cannot be written: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(
                f"{self.root} cannot be written: {existing} is not writable (permissions or a read-only file system)"
            )


@contextlib.contextmanager
def replaced_on_success(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A hidden temporary path beside `path` (one folder, one file system: the rename is atomic): what the block
    writes there replaces `path` in one rename when the block ends without an error, and is removed when it does
    not, so no reader ever sees a half-written `path`. `suffix` ends the temporary name (writers that pick a format
    by extension need it). `LocalStorage` writes its objects the same way, with a fault drill and a link(2) for
    create-exclusive writes in between (`_publish`); the shard cache adds an fsync and a checksum beside the file.
    """
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
