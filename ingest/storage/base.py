"""What every store is: the `Storage` protocol, its errors and the key helpers (no I/O here)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from ingest.errors import RecolorError


class StorageError(RecolorError):
    """A storage operation failed for a reason the user can act on (the message says how)."""


class ObjectUnreadable(OSError):
    """One object fails to read while its store answers everything else: it is damaged or gone there. Not a
    `StorageError` (an unreachable store, worth waiting out): whoever has another copy or an older one uses that."""


class AlreadyExistsError(StorageError):
    """`put_if_absent` lost: the key already exists."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float = 0.0  # seconds since the epoch
    etag: str | None = None  # the store's content tag (S3 ETag), where it has one
    version: str | None = None  # local files: mtime and ctime in ns and the inode (`LocalStorage`)
    symlink: bool = False  # local files: the name is a symbolic link (never an object the project wrote)


def object_stamp(info: ObjectInfo) -> str:
    """What tells, without reading it, that an object changed: its ETag on S3; for a local file its mtime, ctime
    and inode; else its modification time."""
    if info.etag:
        return f"etag:{info.etag}"
    return f"file:{info.version}" if info.version else f"mtime:{round(info.modified * 1e6)}"


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
    def list(self, prefix: str = "", include_partial: bool = False, follow_links: bool = True
             ) -> Iterator[ObjectInfo]: ...  # fmt: skip
    def list_children(self, prefix: str = "", follow_links: bool = True) -> list[str]: ...  # links: local only
    def delete(self, key: str) -> None: ...
    def check_access(self) -> None: ...
    def check_writable(self) -> None: ...


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64MB', '1.5GiB', '500k', '1048576' to a byte count (powers of 1024).

    Raises:
        ValueError: not a size.
    """
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}: use e.g. 64MB, 1GB or a byte count")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))


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


def refuse_credentials_in_uri(uri: str) -> None:
    """Refuse an s3:// address that carries keys (`s3://AKID:Secret@bucket/prefix`): botocore would take
    `AKID:Secret@bucket` for a bucket name and print it in a traceback.

    Raises:
        StorageError: one line, the keys masked, saying where keys go.
    """
    text = str(uri)
    if is_s3(text) and "@" in text[5:].split("/", 1)[0]:
        bucket_part = text[5:].split("/", 1)
        masked = "s3://***@" + bucket_part[0].rsplit("@", 1)[1] + ("/" + bucket_part[1] if len(bucket_part) > 1 else "")
        raise StorageError(
            f"{masked} carries credentials in its address: refused. Give them in the standard variables "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the address as s3://BUCKET/PREFIX"
        )


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")
