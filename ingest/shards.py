"""WebDataset shards: plain tar files, two members per sample.

    <key>.lab.npy   uint8 (3, H, W) Lab, see `ingest.lab` for the encoding; a plain .npy file
                    readable with `numpy.load(f, allow_pickle=False)`
    <key>.json      the sample's metadata (key, split, sha256, class or COCO id, size, ...) and
                    `lab_crc32`, the CRC-32 of the whole .lab.npy member: the reader checks it, so garbage
                    bytes inside an array's data are a corrupt sample, not silently different metrics

Tar headers are deterministic (mtime 0, uid 0, sorted JSON), so the same images always give
byte-identical shards: a resumed ingest reproduces what a clean run writes.
"""

from __future__ import annotations

import functools
import io
import json
import mmap
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from stat import S_ISREG

import numpy as np

LAB_MEMBER = "lab.npy"
META_MEMBER = "json"
CHECKSUM_FIELD = "lab_crc32"
_CHECKSUM_KEY = CHECKSUM_FIELD.encode()  # looked for in every sample's metadata bytes on the read path

try:  # the same CRC-32 as zlib's, with the CPU's carry-less multiply: about 7x faster (bench/loader.py)
    from zlib_ng.zlib_ng import adler32, crc32
except ImportError:  # pragma: no cover - a dependency; zlib's is the fallback
    from zlib import adler32, crc32


def checksum_matches(lab: bytes, meta: bytes | None) -> bool:
    """Whether a sample's .lab.npy bytes have the CRC-32 its metadata records (True for samples ingested before
    checksums were recorded, and for metadata that names none)."""
    if isinstance(meta, memoryview):  # metadata over 4 KiB, read as a view (`iter_members`)
        meta = meta.tobytes()
    if meta is None or _CHECKSUM_KEY not in meta:
        return True
    try:
        recorded = json.loads(meta)[CHECKSUM_FIELD]
    except (ValueError, KeyError, TypeError):
        return False  # metadata that names a checksum but cannot be read: not to be trusted either
    return crc32(lab) == recorded


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Decode a .npy member; pickled object arrays are refused, never unpickled."""
    return np.load(io.BytesIO(data), allow_pickle=False)


_NPY_HEADERS: dict[tuple, bytes] = {}


def decode_lab_npy(data: bytes, size: int) -> np.ndarray:
    """Decode a stored Lab member, expected uint8 (3, size, size), without copying.

    The header np.save writes for that array is always the same bytes: compare and view the rest.
    Anything else goes through `numpy.load(allow_pickle=False)`.

    Raises:
        ValueError: not a uint8 (3, size, size) array (or not a .npy file at all).
    """
    shape = (3, size, size)
    header = _NPY_HEADERS.get(shape)
    if header is None:
        header = _NPY_HEADERS[shape] = encode_npy(np.zeros(shape, dtype=np.uint8))[: -3 * size * size]
    if len(data) == len(header) + 3 * size * size and data[: len(header)] == header:
        return np.frombuffer(data, dtype=np.uint8, offset=len(header)).reshape(shape)
    array = decode_npy(data)
    if array.dtype != np.uint8 or array.shape != shape:
        raise ValueError(f"expected a uint8 array of shape {shape}, got {array.dtype} {array.shape}")
    return array


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes samples to one local tar file; `close()` returns the sample count.

    Members are written straight to the file (header, bytes, padding), the Lab array from its own
    memory: the same bytes `tarfile` writes, without its copies through intermediate buffers.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._offset = 0
        self.count = 0

    def write(self, key: str, lab8: np.ndarray, meta: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits keys at dots)")
        lab8 = np.ascontiguousarray(lab8)
        header, data = npy_header(lab8), memoryview(lab8).cast("B")
        meta = {**meta, CHECKSUM_FIELD: crc32(data, crc32(header))}
        self._add(f"{key}.{LAB_MEMBER}", header, data)
        self._add(f"{key}.{META_MEMBER}", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
        self.count += 1

    def write_raw(self, name: str, data: bytes) -> None:
        self._add(name, data)

    def copy_sample(self, members: list[tuple[str, bytes]]) -> None:
        """Append one sample as the members another shard holds (name, bytes): byte for byte."""
        for name, data in members:
            self._add(name, data)
        self.count += 1

    def _add(self, name: str, *parts) -> None:
        size = sum(len(part) for part in parts)
        self._file.write(_tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        for part in parts:
            self._file.write(part)
        padding = -size % 512
        if padding:
            self._file.write(b"\0" * padding)
        self._offset += 512 + size + padding

    def close(self) -> int:
        if not self._file.closed:
            # End of archive: two zero blocks, then zeros up to a whole record, as tarfile does.
            end = 1024 + (-(self._offset + 1024) % tarfile.RECORDSIZE)
            self._file.write(b"\0" * end)
            self._file.close()
        return self.count

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_HEADERS: dict[tuple, bytes] = {}


def npy_header(array: np.ndarray) -> bytes:
    """The bytes `numpy.save` writes before the data of an array of this shape and dtype (cached)."""
    signature = (array.shape, array.dtype.str)
    header = _HEADERS.get(signature)
    if header is None:
        header = encode_npy(np.zeros(array.shape, dtype=array.dtype))[: -array.nbytes or None]
        _HEADERS[signature] = header
    return header


class TarFormatError(ValueError):
    """The stream is not a well-formed tar file (bad checksum, truncated member)."""


def _octal(field: bytes) -> int:
    """A header's octal number field; anything else (a sign, base-256, garbage) is a malformed header."""
    field = field.strip(b"\0 ")
    if not field:
        return 0
    if field.strip(b"01234567"):  # a character that is not an octal digit is left
        raise TarFormatError(f"tar header field {field[:12]!r} is not an octal number")
    return int(field, 8)


def _read_exact(fileobj, size: int) -> bytes:
    data = fileobj.read(size)
    while len(data) < size:
        more = fileobj.read(size - len(data))
        if not more:
            raise TarFormatError(f"truncated tar: wanted {size} bytes, got {len(data)}")
        data += more
    return data


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, keyvalue = record.partition(" ")
        key, _, value = keyvalue.partition("=")
        if key == "path":
            return value
    return None


_BLANK_CHECKSUM = b" " * 8


def header_checksum(header: bytes) -> int:
    """The tar checksum of a 512-byte header: the sum of its bytes, the checksum field counted as 8 spaces.

    Summed in C by Adler-32, whose first half is 1 + the sum of the bytes modulo 65521: over 256 bytes the sum is
    at most 65,280, so each half's is exact (5x faster than `sum` over the bytes, a third of reading a shard).
    """
    first = adler32(header[:148] + _BLANK_CHECKSUM + header[156:256]) & 0xFFFF
    return first + (adler32(header[256:512]) & 0xFFFF) - 2


def _parse_header(header: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a 512-byte tar header.

    Raises:
        TarFormatError: its checksum does not match, or a number field is not octal.
    """
    if _octal(header[148:156]) != header_checksum(header):
        raise TarFormatError("tar header checksum mismatch (not a tar file, or corrupt)")
    name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
    if header[257:262] == b"ustar":
        prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
    return name, _octal(header[124:136]), header[156:157]


_ZERO_BLOCK = b"\0" * 512


def _archive_ends(header: bytes) -> bool:
    """Whether the block read where a header belongs ends the archive: no more data, or a zero block.

    Raises:
        TarFormatError: a partial block that is not all zeros (a truncated header).
    """
    if len(header) < 512:
        if header.strip(b"\0"):
            raise TarFormatError("truncated tar header")
        return True
    return header == _ZERO_BLOCK


def _stream_members(fileobj) -> Iterator[tuple[str, bytes, bytes]]:
    """(name, type flag, bytes) of every member of a tar stream read with `read(n)`, special members included."""
    while True:
        header = fileobj.read(512)
        if _archive_ends(header):
            return
        name, size, kind = _parse_header(header)
        data = _read_exact(fileobj, size) if size else b""
        padding = -size % 512
        if padding:
            _read_exact(fileobj, padding)
        yield name, kind, data


def _mapped_members(view: memoryview) -> Iterator[tuple[str, bytes, bytes]]:
    """`_stream_members` over a buffer: the same members and errors, walking offsets; members larger than
    `_SMALL` as views of it."""
    end, position = len(view), 0
    while True:
        header = view[position : position + 512].tobytes()
        if _archive_ends(header):
            return
        name, size, kind = _parse_header(header)
        start = position + 512
        position = start + size + (-size % 512)
        if start + size > end:
            raise TarFormatError(f"truncated tar: wanted {size} bytes, got {max(0, end - start)}")
        if position > end:
            raise TarFormatError(f"truncated tar: wanted {-size % 512} bytes, got {end - start - size}")
        data = view[start : start + size]
        yield name, kind, (data.tobytes() if size <= _SMALL else data)


def iter_members(fileobj, views: bool = False) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, bytes) of the regular files in a tar stream, in order.

    A small streaming USTAR reader (with pax and GNU long names): about 3x faster than `tarfile`
    on shards of many small members, and it reads from any object with `read(n)`, S3 bodies included.

    With `views`, members of a regular file on a local file system, or of an in-memory stream, larger than 4 KiB
    come as read-only memoryviews of it (a map of the file, or the stream's buffer) instead of copies: no
    allocation, no page to zero and no copy per sample, which cost more than checking and decoding it
    (bench/loader.py). The map lives as long as a view of it does; a shard is never truncated in place (lake and
    cache files are replaced whole). Files on network and FUSE mounts are read as before (see `_maps_safely`).

    Raises:
        TarFormatError: a header with a bad checksum, or a stream that ends inside a member.
    """
    long_name: str | None = None
    mapped = _mapped_view(fileobj) if views else None
    members = _stream_members(fileobj) if mapped is None else _mapped_members(mapped)
    for name, kind, data in members:
        if kind in (b"x", b"L"):  # pax extended header / GNU long name: applies to the next member
            data = bytes(data)  # parsed: a view when long
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"g", b"K"):
            continue
        if long_name:
            name, long_name = long_name, None
        if kind in (b"0", b"\0", b"7"):
            yield name, data


# Mounts whose files are mapped: local file systems. On a network or FUSE mount a read error, or another client
# replacing the file in place, would end the process (SIGBUS) where a read raises an error the reader handles.
_LOCAL_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "bcachefs", "jfs", "reiserfs", "tmpfs", "ramfs", "overlay"}
)


@functools.lru_cache(maxsize=64)
def _maps_safely(device: int) -> bool:
    """Whether files on `device` (a `st_dev`) lie on a local file system: the type of its mount in
    /proc/self/mountinfo (Linux; elsewhere, and for mounts not found, False: files are read, not mapped)."""
    try:
        with open("/proc/self/mountinfo") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return False
    wanted = f"{os.major(device)}:{os.minor(device)}"
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[2] == wanted and "-" in fields:
            separator = fields.index("-")
            return separator + 1 < len(fields) and fields[separator + 1] in _LOCAL_FILESYSTEMS
    return False


_SMALL = 4096  # members up to this size are read as bytes (headers, metadata: parsed), larger ones as views


def _mapped_view(fileobj) -> memoryview | None:
    """The rest of `fileobj` as a read-only buffer without copying it (a regular file's map on a local file system,
    or a BytesIO's bytes), or None when it is neither."""
    if isinstance(fileobj, io.BytesIO):
        return memoryview(fileobj.getvalue())[fileobj.tell() :]  # its bytes, shared until written to
    try:
        fd = fileobj.fileno()
        stat = os.fstat(fd)
        position = fileobj.tell()
    except (AttributeError, OSError, ValueError):
        return None
    if not S_ISREG(stat.st_mode) or stat.st_size <= position or not _maps_safely(stat.st_dev):
        return None
    try:
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    return memoryview(mapped)[position:]


def iter_samples(fileobj, views: bool = False) -> Iterator[dict]:
    """Group a shard's members into samples: {"__key__": key, "lab.npy": bytes, "json": bytes} (with `views`, large
    members as memoryviews: see `iter_members`)."""
    current: dict | None = None
    for name, data in iter_members(fileobj, views):
        key, _, suffix = name.partition(".")
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        current[suffix] = data
    if current is not None:
        yield current


def filter_shard(source, destination: str | Path, keep_keys: set[str]) -> int:
    """Copy the samples whose key is in `keep_keys` from a tar stream into a new local shard; returns how many."""
    written: set[str] = set()
    with ShardWriter(destination) as writer:
        for name, data in iter_members(source):
            key = name.partition(".")[0]
            if key in keep_keys:
                writer.write_raw(name, data)
                written.add(key)
    return len(written)
