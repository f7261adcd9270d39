"""One storage layer for local folders and S3-compatible object stores.

A `Storage` is rooted at a URI (`/data/lake`, `file:///data/lake`, `s3://bucket/prefix`) and
addresses objects by relative POSIX keys (`imagenet/versions/000001.json`). Everything in the
project that reads or writes the lake, a source tree or a checkpoint goes through here, so S3
is configuration, not another code path.

S3 endpoints and credentials come from the standard environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, profiles), as boto3 reads
them; MinIO, rclone and AWS all work the same way.

Writes are atomic for readers: a local write goes to a hidden temporary file and is renamed
into place; an S3 PUT (single or multipart) only becomes visible once complete.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """A storage operation failed for a reason the user can act on (the message says how)."""


class AlreadyExistsError(StorageError):
    """`put_if_absent` lost: the key already exists."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Storage(Protocol):
    """What the project needs from a store. Keys are relative POSIX paths below the root."""

    root_uri: str

    def uri(self, key: str) -> str: ...
    def read_bytes(self, key: str) -> bytes: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload_file(self, key: str, local_path: str | Path) -> None: ...
    def put_if_absent(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def list_children(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def check_access(self) -> None: ...


def join_key(*parts: str) -> str:
    """Join key parts with `/`, ignoring empty parts."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def split_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/a/b.jpg` into (`s3://bucket/a`, `b.jpg`), a local path likewise.

    A bare name lies in the working directory (`b.jpg` -> (`.`, `b.jpg`)), `/b.jpg` in `/`.
    """
    uri = uri.rstrip("/")
    head, slash, tail = uri.rpartition("/")
    if not slash:
        head = "."
    elif not head:
        head = "/"
    return head, tail


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def open_storage(uri: str | Path) -> Storage:
    """Open the store rooted at `uri`: a local path, `file://` URI or `s3://bucket[/prefix]`.

    Raises:
        StorageError: the URI's scheme is not supported or its bucket is missing.
    """
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"bad S3 URI {uri!r}: expected s3://BUCKET[/PREFIX]")
        return S3Storage(parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise StorageError(
            f"unsupported URI scheme {parsed.scheme!r} in {uri!r}: use a local path or s3://BUCKET/PREFIX"
        )
    return LocalStorage(Path(uri))


def read_uri(uri: str) -> bytes:
    """Read one object given its full URI (local path or `s3://`)."""
    parent, name = split_uri(uri)
    return open_storage(parent or "/").read_bytes(name)


class LocalStorage:
    """A folder on a local (or network-mounted) file system."""

    def __init__(self, root: Path):
        self.root = root.expanduser().absolute()
        self.root_uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
        except IsADirectoryError:
            raise StorageError(f"{self.uri(key)} is a folder, not a file") from None

    def open_read(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def _publish(self, key: str, fill, place) -> None:
        """Write a hidden temporary file beside the target with `fill(temp)`, then `place(temp, target)`.

        The temporary file sits in the same folder so the rename (or link) is atomic on every POSIX
        file system: readers see the whole file or nothing.
        """
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            fill(temp)
            place(temp, path)
        finally:
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

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every file below `prefix` (a folder key), recursively, sorted, skipping temporary files."""
        base = self._path(prefix)
        if base.is_file():
            yield ObjectInfo(prefix, base.stat().st_size)
            return
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                path = Path(dirpath) / name
                try:
                    size = path.stat().st_size
                except FileNotFoundError:  # removed while listing
                    continue
                yield ObjectInfo(path.relative_to(self.root).as_posix(), size)

    def list_children(self, prefix: str = "") -> list[str]:
        """Names of the sub-folders directly below `prefix`, sorted."""
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check_access(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root} is a file, not a folder")


class S3Storage:
    """An S3 bucket and prefix (AWS, MinIO, rclone serve s3, ...)."""

    def __init__(self, bucket: str, prefix: str = ""):
        self.bucket = bucket
        self.prefix = prefix
        self.root_uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self._client = None

    @property
    def client(self):
        # Created lazily: a Storage is pickled into Ray tasks, a boto3 client cannot be.
        if self._client is None:
            self._client = make_s3_client()
        return self._client

    def __getstate__(self):
        return {"bucket": self.bucket, "prefix": self.prefix, "root_uri": self.root_uri, "_client": None}

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        import botocore.exceptions

        try:
            return fn(*args, **kwargs)
        except botocore.exceptions.ClientError as e:
            raise _translate_client_error(e, what, self.uri(key)) from None
        except botocore.exceptions.NoCredentialsError:
            raise StorageError(
                f"no S3 credentials to {what} {self.uri(key)}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and AWS_ENDPOINT_URL for MinIO or another S3-compatible store)"
            ) from None
        except botocore.exceptions.EndpointConnectionError as e:
            raise StorageError(
                f"cannot reach the S3 endpoint to {what} {self.uri(key)} ({e}): check AWS_ENDPOINT_URL and that "
                "the server is running"
            ) from None

    def read_bytes(self, key: str) -> bytes:
        response = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()

    def open_read(self, key: str) -> BinaryIO:
        response = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        # Tar parsing reads in small blocks: buffer the HTTP body in large reads.
        return io.BufferedReader(_RawBody(response["Body"]), buffer_size=READ_BUFFER)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, key: str, local_path: str | Path) -> None:
        # upload_file switches to multipart above 8 MiB; the object appears only when complete.
        self._call("upload", key, self.client.upload_file, str(local_path), self.bucket, self._key(key))

    def put_if_absent(self, key: str, data: bytes) -> None:
        """Create `key` only if absent.

        Uses a conditional PUT (`If-None-Match: *`), which AWS S3 and MinIO enforce atomically. Stores
        that ignore the header (rclone serve s3, older MinIO) get a check-then-put, which narrows the
        race to the PUT's round trip but cannot close it; the README documents that guarantee.
        """
        if self.exists(key):
            raise AlreadyExistsError(f"{self.uri(key)} already exists")
        import botocore.exceptions

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or _status(e) in (409, 412):
                raise AlreadyExistsError(f"{self.uri(key)} already exists") from None
            raise _translate_client_error(e, "write", self.uri(key)) from None

    def exists(self, key: str) -> bool:
        import botocore.exceptions

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except botocore.exceptions.ClientError as e:
            if _status(e) == 404:
                return False
            raise _translate_client_error(e, "check", self.uri(key)) from None

    def size(self, key: str) -> int:
        response = self._call("check", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(response["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(prefix)
        if full:
            full += "/"
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._call("list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        for page in pages:
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][strip:], int(item["Size"]))

    def list_children(self, prefix: str = "") -> list[str]:
        """Names of the "folders" (common prefixes) directly below `prefix`, sorted."""
        full = self._key(prefix)
        full = full + "/" if full else ""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            "list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"))
        )
        names = {p["Prefix"][len(full) :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])}
        return sorted(names)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def check_access(self) -> None:
        """Fail early, before anything is written, on a missing bucket or bad credentials."""
        self._call(
            "list",
            "",
            self.client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=self.prefix + "/" if self.prefix else "",
            MaxKeys=1,
        )


READ_BUFFER = 4 * 2**20


class _RawBody(io.RawIOBase):
    """botocore's StreamingBody as a raw stream, so io.BufferedReader can put a large buffer in front."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


_CLIENTS: dict[tuple, object] = {}


def make_s3_client():
    """A boto3 S3 client from the standard environment, with retries for flaky networks.

    One client per process and environment, shared (boto3 clients are thread-safe): creating one
    costs about 0.1 s, and ingest opens a store per source image.
    """
    environment = sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "RECOLOR_S3")))
    settings = (os.getpid(), tuple(environment))
    client = _CLIENTS.get(settings)
    if client is None:
        client = _CLIENTS[settings] = _new_s3_client()
    return client


def _new_s3_client():
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": int(os.environ.get("RECOLOR_S3_MAX_ATTEMPTS", "8")), "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # Path-style addressing works for MinIO and rclone as well as AWS.
        s3={"addressing_style": os.environ.get("RECOLOR_S3_ADDRESSING", "path")},
        max_pool_connections=32,
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.session.Session().client("s3", region_name=region, config=config)


def _status(error) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _translate_client_error(error, what: str, uri: str) -> Exception:
    code = error.response.get("Error", {}).get("Code", "")
    if code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(f"{uri} does not exist")
    if code == "NoSuchBucket":
        bucket = uri.split("/")[2]
        return StorageError(f"S3 bucket {bucket!r} does not exist (while trying to {what} {uri}): create it first")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or _status(error) == 403:
        return StorageError(
            f"S3 refused to {what} {uri} ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the "
            "bucket's permissions"
        )
    return StorageError(f"S3 error {code or _status(error)} while trying to {what} {uri}: {error}")


def local_temp_dir(prefix: str = "recolor-") -> str:
    """A private temporary folder for spooling shards before upload."""
    return tempfile.mkdtemp(prefix=prefix)


def open_uri(uri: str) -> BinaryIO:
    """Open one object for streaming reads given its full URI (local path or `s3://`)."""
    parent, name = split_uri(uri)
    return open_storage(parent or "/").open_read(name)
