"""WebDataset shards: plain tar files, two members per sample.

    <key>.lab.npy   uint8 (3, H, W) Lab, see `ingest.lab` for the encoding; a plain .npy file
                    readable with `numpy.load(f, allow_pickle=False)`
    <key>.json      the sample's metadata (key, split, sha256, class or COCO id, size, ...)

Tar headers are deterministic (mtime 0, uid 0, sorted JSON), so the same images always give
byte-identical shards: a resumed ingest reproduces what a clean run writes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

LAB_MEMBER = "lab.npy"
META_MEMBER = "json"


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Decode a .npy member; pickled object arrays are refused, never unpickled."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes samples to one local tar file; `close()` returns the sample count."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, lab8: np.ndarray, meta: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits keys at dots)")
        self._add(f"{key}.{LAB_MEMBER}", encode_npy(lab8))
        self._add(f"{key}.{META_MEMBER}", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
        self.count += 1

    def write_raw(self, name: str, data: bytes) -> None:
        self._add(name, data)

    def _add(self, name: str, data: bytes) -> None:
        self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))

    def close(self) -> int:
        self._tar.close()
        return self.count

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._tar.close()


def iter_members(fileobj) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, bytes) from a tar stream, in order (streaming: works on S3 bodies)."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            handle = tar.extractfile(info)
            yield info.name, handle.read() if handle else b""


def iter_samples(fileobj) -> Iterator[dict]:
    """Group a shard's members into samples: {"__key__": key, "lab.npy": bytes, "json": bytes}."""
    current: dict | None = None
    for name, data in iter_members(fileobj):
        key, _, suffix = name.partition(".")
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        current[suffix] = data
    if current is not None:
        yield current


def filter_shard(source, destination: str | Path, keep_keys: set[str]) -> int:
    """Copy the samples whose key is in `keep_keys` from a tar stream into a new local shard."""
    writer = ShardWriter(destination)
    with writer:
        for name, data in iter_members(source):
            if name.partition(".")[0] in keep_keys:
                writer.write_raw(name, data)
    return len(keep_keys)
