"""The project's S3 layer as a pyarrow file system, for Ray Train's run storage (checkpoints, run state).

Ray Train reads and writes its storage through a `pyarrow.fs.FileSystem`. pyarrow's own
`S3FileSystem` emulates directories: it writes empty `prefix/` marker objects and, after every
delete, recreates the parent's marker so the "directory" survives. On S3-compatible servers that
keep objects as files (rclone serve s3 on a disk, MinIO in FS mode) a marker is a file that blocks
every key below it: the first checkpoint rotation broke every later upload. It also reads its
checksum and endpoint settings from each process's environment, which Ray's controller and
workers on other nodes do not share.

`s3_filesystem()` wraps `S3Storage` (boto3, with the project's retries, checksum defaults and
multipart uploads) instead: directories exist only as key prefixes, nothing ever writes a marker
(old markers are ignored), deleting a folder deletes exactly the objects below it, an object
appears only once its upload is complete, and the file system carries the S3 settings it was made
with to whichever process unpickles it.
"""

from __future__ import annotations

import io
import os
import tempfile

import pyarrow
import pyarrow.fs

from ingest.storage import ObjectInfo, S3Storage, s3_settings

# Below this an object is sent in one PUT; above, boto3's multipart upload (parts of 8 MiB).
SPOOL_IN_MEMORY = 8 * 2**20


def s3_filesystem(settings: dict[str, str] | None = None) -> pyarrow.fs.PyFileSystem:
    """A pyarrow file system over S3 whose paths are `bucket/key`; `settings` default to this process's.

    A profile (`AWS_PROFILE`) names a file of this machine: its credentials are resolved here and travel
    instead, since the file system is unpickled on other nodes.
    """
    settings = dict(s3_settings() if settings is None else settings)
    profile = settings.pop("AWS_PROFILE", None)
    if profile and "AWS_ACCESS_KEY_ID" not in settings:
        import boto3

        credentials = boto3.session.Session(profile_name=profile).get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            settings["AWS_ACCESS_KEY_ID"], settings["AWS_SECRET_ACCESS_KEY"] = frozen.access_key, frozen.secret_key
            if frozen.token:
                settings["AWS_SESSION_TOKEN"] = frozen.token
    return pyarrow.fs.PyFileSystem(S3Handler(settings))


class S3Handler(pyarrow.fs.FileSystemHandler):
    """`pyarrow.fs.FileSystemHandler` for `PyFileSystem`: paths are `bucket/key/...`."""

    def __init__(self, settings: dict[str, str]):
        self.settings = dict(settings)
        self._buckets: dict[str, S3Storage] = {}

    def __getstate__(self):
        return {"settings": self.settings, "_buckets": {}}

    def __eq__(self, other):
        return isinstance(other, S3Handler) and self.settings == other.settings

    def __hash__(self):
        return hash(tuple(sorted(self.settings.items())))

    def _split(self, path: str) -> tuple[S3Storage, str]:
        path = self.normalize_path(path)
        bucket, _, key = path.partition("/")
        if not bucket:
            raise ValueError(f"S3 path {path!r} names no bucket")
        storage = self._buckets.get(bucket)
        if storage is None:
            storage = self._buckets[bucket] = S3Storage(bucket, "", settings=self.settings)
        return storage, key

    # --- what pyarrow asks of a handler ------------------------------------------------------------

    def get_type_name(self) -> str:
        return "recolor-s3"

    def equals(self, other) -> bool:
        return self == getattr(other, "handler", other)

    def normalize_path(self, path: str) -> str:
        if path.startswith("s3://"):
            path = path[len("s3://") :]
        return path.strip("/")

    def get_file_info(self, paths):
        return [self._info(path) for path in paths]

    def _info(self, path: str) -> pyarrow.fs.FileInfo:
        storage, key = self._split(path)
        normalized = self.normalize_path(path)
        if not key:  # the bucket itself
            storage.check_access()
            return pyarrow.fs.FileInfo(normalized, pyarrow.fs.FileType.Directory)
        found = storage.info(key)
        if found is not None:
            return _file_info(f"{storage.bucket}/{found.key}", found)
        files, folders = storage.list_level(key)
        if any(not f.key.endswith("/") for f in files) or folders:
            return pyarrow.fs.FileInfo(normalized, pyarrow.fs.FileType.Directory)
        return pyarrow.fs.FileInfo(normalized, pyarrow.fs.FileType.NotFound)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector):
        storage, key = self._split(selector.base_dir)
        base = f"{storage.bucket}/{key}".rstrip("/")
        infos: list[pyarrow.fs.FileInfo] = []
        if selector.recursive:
            folders: set[str] = set()
            for item in storage.list(key):
                if item.key.endswith("/"):  # a directory marker someone else wrote
                    continue
                relative = item.key[len(key) :].lstrip("/") if key else item.key
                parts = relative.split("/")
                for depth in range(1, len(parts)):
                    folders.add("/".join(parts[:depth]))
                infos.append(_file_info(f"{storage.bucket}/{item.key}", item))
            infos.extend(pyarrow.fs.FileInfo(f"{base}/{name}", pyarrow.fs.FileType.Directory) for name in folders)
        else:
            files, names = storage.list_level(key)
            infos.extend(_file_info(f"{storage.bucket}/{f.key}", f) for f in files if not f.key.endswith("/"))
            infos.extend(pyarrow.fs.FileInfo(f"{base}/{name}", pyarrow.fs.FileType.Directory) for name in names)
        if not infos and not selector.allow_not_found and key:
            found = storage.info(key)
            if found is not None:
                raise NotADirectoryError(f"s3://{base} is a file, not a folder")
            raise FileNotFoundError(f"s3://{base} does not exist")
        return sorted(infos, key=lambda info: info.path)

    def create_dir(self, path: str, recursive: bool) -> None:
        pass  # a folder exists once something is stored below it

    def delete_dir(self, path: str) -> None:
        self._delete_below(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        if not self._delete_below(path) and not missing_dir_ok:
            raise FileNotFoundError(f"s3://{self.normalize_path(path)} does not exist")

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete every bucket's contents")

    def _delete_below(self, path: str) -> int:
        storage, key = self._split(path)
        if not key:
            raise PermissionError(f"refusing to delete the whole bucket {storage.bucket!r}")
        keys = [item.key for item in storage.list(key)]  # markers (`key/...x/`) included: they go too
        storage.delete_many(keys)
        return len(keys)

    def delete_file(self, path: str) -> None:
        storage, key = self._split(path)
        storage.delete(key)

    def move(self, src: str, dest: str) -> None:
        source, source_key = self._split(src)
        target, target_key = self._split(dest)
        if source.bucket != target.bucket:
            raise OSError(f"cannot move s3://{src} to another bucket ({dest})")
        if source.info(source_key) is not None:
            source.copy(source_key, target_key)
            source.delete(source_key)
            return
        items = list(source.list(source_key))
        if not items:
            raise FileNotFoundError(f"s3://{self.normalize_path(src)} does not exist")
        for item in items:
            source.copy(item.key, target_key + item.key[len(source_key) :])
        source.delete_many([item.key for item in items])

    def copy_file(self, src: str, dest: str) -> None:
        source, source_key = self._split(src)
        target, target_key = self._split(dest)
        if source.bucket != target.bucket:
            target.write_bytes(target_key, source.read_bytes(source_key))
            return
        source.copy(source_key, target_key)

    def open_input_stream(self, path: str):
        storage, key = self._split(path)
        return pyarrow.PythonFile(storage.open_read(key), mode="r")

    def open_input_file(self, path: str):
        storage, key = self._split(path)
        found = storage.info(key)
        if found is None:
            raise FileNotFoundError(f"s3://{self.normalize_path(path)} does not exist")
        return pyarrow.PythonFile(io.BufferedReader(_RangedReader(storage, key, found.size), 2**20), mode="r")

    def open_output_stream(self, path: str, metadata):
        storage, key = self._split(path)
        return pyarrow.PythonFile(_SpooledUpload(storage, key), mode="w")

    def open_append_stream(self, path: str, metadata):
        raise NotImplementedError("S3 objects cannot be appended to")


def _file_info(path: str, item: ObjectInfo) -> pyarrow.fs.FileInfo:
    return pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.File, size=item.size, mtime=item.modified or None)


class _RangedReader(io.RawIOBase):
    """A seekable view of one object: each read is a ranged GET (resumed by `S3Storage` on drops)."""

    def __init__(self, storage: S3Storage, key: str, size: int):
        self._storage, self._key, self._size = storage, key, size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer) -> int:
        data = self._storage.read_range(self._key, self._position, min(len(buffer), self._size - self._position))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class _SpooledUpload(io.RawIOBase):
    """A write stream that keeps its bytes (in memory, past `SPOOL_IN_MEMORY` in a temporary file) and
    stores the object when closed: readers never see part of it, and a failed upload raises from `close`."""

    def __init__(self, storage: S3Storage, key: str):
        self._storage, self._key = storage, key
        self._memory: io.BytesIO | None = io.BytesIO()
        self._file = None  # the temporary file, once the bytes outgrow memory
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self._memory is not None and self._written + len(data) > SPOOL_IN_MEMORY:
            self._file = tempfile.NamedTemporaryFile(prefix="recolor-upload-", delete=False)
            self._file.write(self._memory.getbuffer())
            self._memory = None
        (self._memory if self._memory is not None else self._file).write(data)
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def __del__(self):
        # Dropped without an explicit close (a copy that failed half way): publish nothing. IOBase's own
        # finalizer would call close() and upload the part written so far.
        if not self.closed:
            self._discard()

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            os.unlink(self._file.name)
            self._file = None
        self._memory = None
        super().close()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._memory is not None:
                self._storage.write_bytes(self._key, self._memory.getvalue())
            else:
                self._file.close()
                self._storage.upload_file(self._key, self._file.name)  # multipart: whole or nothing
        finally:
            self._discard()
