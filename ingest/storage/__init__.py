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

An unreachable S3 endpoint (connection refused or reset, timeouts, 5xx answers) is retried with
exponential backoff for up to `RECOLOR_S3_RETRY_SECONDS` (default 120) per operation, streaming
reads included (they resume at the byte they stopped at); past that, a `StorageError` says what
could not be reached and that rerunning resumes.

`put_if_absent` is a create-exclusive write. Local folders use link(2), atomic on POSIX file
systems. S3 stores that honour a conditional PUT (`If-None-Match: *`: AWS S3 since 2024, MinIO)
get exactly that; for stores that ignore it (rclone serve s3, older MinIO), found by a probe once
per process, a claim protocol on plain PUT/LIST/HEAD gives the same guarantee on stores with
read-after-write consistency (AWS, MinIO, rclone on a local disk): see `S3Storage.put_if_absent`.

The package: `base.py` (the protocol, errors, key helpers), `local.py`, `s3.py`, `retry.py` (what is
retried and for how long), `arrow.py` (the S3 store as a pyarrow file system, for Ray Train's run storage),
`cat.py` (one object to stdout: the `pipe:` form of a lake's shard URLs for webdataset).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from ingest.storage.base import (
    AlreadyExistsError,
    ObjectInfo,
    ObjectUnreadable,
    Storage,
    StorageError,
    is_s3,
    join_key,
    object_stamp,
    refuse_credentials_in_uri,
    split_uri,
)
from ingest.storage.local import LocalStorage
from ingest.storage.s3 import S3_SETTINGS, S3Storage, make_s3_client, s3_settings

__all__ = [
    "S3_SETTINGS",
    "AlreadyExistsError",
    "LocalStorage",
    "ObjectInfo",
    "ObjectUnreadable",
    "object_stamp",
    "S3Storage",
    "Storage",
    "StorageError",
    "is_s3",
    "join_key",
    "local_temp_dir",
    "make_s3_client",
    "open_storage",
    "open_uri",
    "read_uri",
    "refuse_credentials_in_uri",
    "s3_settings",
    "split_uri",
]


def open_storage(uri: str | Path) -> Storage:
    """Open the store rooted at `uri`: a local path, `file://` URI or `s3://bucket[/prefix]`.

    Raises:
        StorageError: the URI's scheme is not supported or its bucket is missing.
    """
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        refuse_credentials_in_uri(uri)
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


def local_temp_dir(prefix: str = "recolor-") -> str:
    """A private temporary folder for spooling shards before upload."""
    return tempfile.mkdtemp(prefix=prefix)


def open_uri(uri: str) -> BinaryIO:
    """Open one object for streaming reads given its full URI (local path or `s3://`)."""
    parent, name = split_uri(uri)
    return open_storage(parent or "/").open_read(name)
