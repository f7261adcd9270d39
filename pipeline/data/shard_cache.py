"""A node-local cache of lake shards: one download per shard per node, then local-disk reads every epoch.

Training streams its shards; from S3 that is a whole-lake download every epoch. The cache keeps shards in a
folder on the node's local disk, shared by every rank (every process) of the node:

- **One download per shard per node.** A fill holds an exclusive `flock` on the shard's lock file: a second rank
  that wants the same shard waits for that fill and then reads the file, instead of downloading it again.
- **Never wrong.** A shard is downloaded to a temporary file and renamed into place whole, so a name in the
  cache is always a complete download (a process killed mid-fill leaves a temporary file that nothing trusts,
  removed by the next cache that finds it old). A cached shard must have the size the version records; one that
  does not is dropped and fetched again, with one warning. Samples are still checked against their CRC-32 by the
  reader, as from any store; a shard with a sample that fails is dropped from the cache (`drop`), so the next
  epoch fetches it again.
- **Trusted only as the lake recorded it.** The cache folder is the user's own and private: created 0700; one
  owned by another user, or a link, is refused (the cache is off, with one warning); one of the user's that
  others could write is emptied and made private. A cached shard is used only if its SHA-256 is the one its
  version records (`sha256`, written at ingest), checked once a process; for lakes written before digests, the
  one the cache recorded when it downloaded the shard (`<shard>.sha256` beside it, in the private folder).
  A shard planted by another local user is never read: validation samples cannot leak into training.
- **Bounded.** At most `capacity` bytes: a fill first evicts the least recently used shards that no reader holds
  open (readers hold a shared `flock` while they read). A shard that cannot fit is streamed as before.
- **Never a crash.** A cache folder that cannot be created or written (read-only, full disk) turns the cache off
  for the process with one warning: shards are streamed from the store, as without a cache.

Counters (`stats`) say how many bytes came from the store and from the cache, for the epoch's metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

DEFAULT_DIR_NAME = "recolor-shard-cache"
STALE_TEMP_S = 3600.0  # a temporary file this old is a killed fill's


def default_cache_dir() -> str:
    """Under the node's local temp space (`$TMPDIR`, else /tmp): what Ray nodes have for scratch; one a user."""
    return str(Path(tempfile.gettempdir()) / f"{DEFAULT_DIR_NAME}-{os.geteuid()}")


@dataclass
class CacheStats:
    store_bytes: int = 0  # bytes downloaded from the store (fills, and streams when the cache is off or full)
    cache_bytes: int = 0  # bytes read from shards that were already cached (hits)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, store: int = 0, cache: int = 0) -> None:
        with self.lock:
            self.store_bytes += store
            self.cache_bytes += cache

    def take(self) -> tuple[int, int]:
        """(store bytes, cache bytes) since the last `take`."""
        with self.lock:
            taken = (self.store_bytes, self.cache_bytes)
            self.store_bytes = self.cache_bytes = 0
            return taken


class ShardCache:
    """A node's shard cache in `root`, at most `capacity` bytes (see the module's docstring)."""

    def __init__(self, root: str | Path, capacity: int, download=None):
        self.root = Path(root)
        self.capacity = int(capacity)
        self.stats = CacheStats()
        self._download = download or _download
        self._verified: set[tuple[int, int, int, str]] = set()  # (device, inode, size, digest) checked here
        self.enabled = True
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            refused = self._make_private()
            if refused:
                self._disable(refused)
                return
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            self._disable(f"the shard cache {self.root} cannot be written ({e.strerror or e})")
            return
        self._clean_stale()

    def _make_private(self) -> str | None:
        """Check that the cache folder is this user's and private; None when it is (made so), else why not."""
        info = os.lstat(self.root)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            return f"the shard cache {self.root} is not a folder (a link, or a file): refused"
        if info.st_uid != os.geteuid():
            return (f"the shard cache {self.root} belongs to user id {info.st_uid}, not to you ({os.geteuid()}): "
                    "refused, its shards could be anyone's; set data.cache_dir to a folder of your own")  # fmt: skip
        if info.st_mode & 0o077:
            dropped = 0
            for item in self.root.iterdir():
                if item.is_file() or item.is_symlink():
                    item.unlink(missing_ok=True)
                    dropped += 1
            os.chmod(self.root, 0o700)
            log.warning("the shard cache %s was open to other users (mode %o): its %d files were deleted and it is "
                        "private now (0700)", self.root, stat.S_IMODE(info.st_mode), dropped)  # fmt: skip
        return None

    def has_default_download(self) -> bool:
        """Whether it downloads as `node_cache`'s would (a loader process can make its own like it)."""
        return self._download is _download

    def _disable(self, why: str) -> None:
        if self.enabled:
            log.warning("%s: streaming shards from the store instead", why)
        self.enabled = False

    def _path(self, uri: str) -> Path:
        # The endpoint too: one bucket name on two S3 servers is two shards.
        from ingest.storage.s3 import s3_endpoint

        endpoint = (s3_endpoint() or "") if uri.startswith("s3://") else ""
        return self.root / f"{hashlib.sha256(f'{endpoint}|{uri}'.encode()).hexdigest()[:32]}.tar"

    def open(self, uri: str, size: int | None, sha256: str | None = None) -> BinaryIO:
        """The shard at `uri` as a readable file: from the cache, after filling it if needed; streamed from the
        store when the cache is off, the size is unknown or the shard cannot fit. `sha256`: the shard's digest
        as its version records (None for lakes written before digests)."""
        if not self.enabled or size is None or size > self.capacity:
            return self._stream(uri)
        path = self._path(uri)
        cached = self._open_cached(path, size, sha256)
        if cached is not None:
            return cached
        try:
            with _locked(path.with_suffix(".lock"), fcntl.LOCK_EX):
                cached = self._open_cached(path, size, sha256)  # another rank filled it while this one waited
                if cached is not None:
                    return cached
                temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
                reservation = temp.with_name(f"{temp.name[:-4]}.{size}.reserve")
                with _locked(self.root / ".space.lock", fcntl.LOCK_EX):  # room judged by one fill at a time
                    if not self._make_room(size):  # every cached shard is being read: no room now
                        return self._stream(uri)
                    reservation.touch()  # counted by fills running beside this one until it is in place
                try:
                    written = self._download(uri, temp)
                    self.stats.add(store=written)
                    if written != size:
                        raise ValueError(f"downloaded {written} bytes, the version records {size}")
                    digest = _file_sha256(temp)
                    if sha256 is not None and digest != sha256:  # the store's copy is not the one recorded
                        log.warning("%s has SHA-256 %s, not the %s its version records: not cached (its samples are "
                                    "checked as read; `recolor lake check --deep` and `lake repair`)", uri, digest,
                                    sha256)  # fmt: skip
                        return _memory(temp)
                    if sha256 is None:  # a lake from before digests: what this cache downloaded is the reference
                        sidecar = temp.with_name(temp.name + ".sha256")
                        sidecar.write_text(digest)
                        os.replace(sidecar, path.with_suffix(".sha256"))
                    os.replace(temp, path)
                    info = os.stat(path)
                    self._verified.add((info.st_dev, info.st_ino, info.st_size, digest))
                finally:
                    with contextlib.suppress(OSError):
                        temp.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        reservation.unlink(missing_ok=True)
        except CacheDiskError as e:  # a full or read-only disk: stream, as without a cache
            self._disable(f"the shard cache {self.root} failed to store {uri} ({e})")
            return self._stream(uri)
        except OSError as e:
            if not _local_error(e, self.root):
                raise  # the store's answer (a missing or unreadable object): the reader's to handle
            self._disable(f"the shard cache {self.root} failed to store {uri} ({e.strerror or e})")
            return self._stream(uri)
        opened = self._open_cached(path, size, sha256, hit=False)  # its bytes were counted as the store's
        return opened if opened is not None else self._stream(uri)

    def _open_cached(self, path: Path, size: int, sha256: str | None, hit: bool = True) -> BinaryIO | None:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)  # held while read: eviction passes it over
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # evicted (or replaced) between the open and the lock: as if it were not there
            handle.close()
            return None
        actual = os.fstat(handle.fileno()).st_size
        if actual != size:
            handle.close()
            log.warning("cached shard %s has %d bytes, not the %d recorded: dropped, fetching it again", path, actual,
                        size)  # fmt: skip
            path.unlink(missing_ok=True)
            return None
        why = self._untrusted(path, handle, sha256)
        if why is not None:
            handle.close()
            log.warning("cached shard %s %s: dropped, fetching it again", path, why)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
        if hit:
            self.stats.add(cache=size)
        return handle

    def _untrusted(self, path: Path, handle: BinaryIO, sha256: str | None) -> str | None:
        """Why the open cached shard cannot be trusted, or None: its digest must be the recorded one (the version's,
        else the one this cache wrote when it downloaded it); checked once a process for each file."""
        expected = sha256
        if expected is None:
            try:
                expected = path.with_suffix(".sha256").read_text().strip()
            except (OSError, UnicodeDecodeError):
                return "has no digest to check it by (not a download of this cache)"
        info = os.fstat(handle.fileno())
        key = (info.st_dev, info.st_ino, info.st_size, expected)
        if key in self._verified:
            return None
        from ingest.lake import stream_sha256

        digest = stream_sha256(handle)
        handle.seek(0)
        if digest != expected:
            return f"has SHA-256 {digest}, not the {expected} recorded"
        self._verified.add(key)
        return None

    def drop(self, uri: str) -> None:
        """Forget the cached copy of `uri` (a sample in it failed its checksum): the next read fetches it again,
        so a copy damaged on this disk heals, and damage in the store itself shows again. Warns once a shard."""
        path = self._path(uri)
        if path.exists():
            log.warning("a sample of the cached shard %s failed its checksum: dropped it, the next read fetches %s "
                        "again", path, uri)  # fmt: skip
            path.unlink(missing_ok=True)  # a reader holding it open reads on; the name is gone
            path.with_suffix(".sha256").unlink(missing_ok=True)

    def _stream(self, uri: str) -> BinaryIO:
        import io

        from ingest.storage import read_uri

        data = read_uri(uri)
        self.stats.add(store=len(data))
        return io.BytesIO(data)

    def _make_room(self, size: int) -> bool:
        """Evict least recently used shards no reader holds until `size` more bytes fit in `capacity`; False when
        they cannot (the shards left are all being read)."""
        entries = []
        for path in self.root.glob("*.tar"):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            entries.append((info.st_mtime, info.st_size, path))
        used = sum(size for _, size, _ in entries)
        for reserved in self.root.glob(".*.reserve"):  # fills under way: their shards are coming
            with contextlib.suppress(ValueError):
                used += int(reserved.name.rsplit(".", 2)[-2])
        for _, held, path in sorted(entries):
            if used + size <= self.capacity:
                return True
            try:
                with open(path, "rb") as handle:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # no reader holds it
                    path.unlink()
                    path.with_suffix(".sha256").unlink(missing_ok=True)
                used -= held
            except (BlockingIOError, FileNotFoundError):
                continue
        return used + size <= self.capacity

    def _clean_stale(self) -> None:
        cutoff = time.time() - STALE_TEMP_S
        for temp in [*self.root.glob(".*.tmp"), *self.root.glob(".*.reserve")]:
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
            except FileNotFoundError:
                continue


def _file_sha256(path: Path) -> str:
    from ingest.lake import file_sha256

    return file_sha256(path)


def _memory(path: Path) -> BinaryIO:
    import io

    return io.BytesIO(path.read_bytes())


class _locked:
    def __init__(self, path: Path, mode: int):
        self.path, self.mode = path, mode

    def __enter__(self):
        self.handle = open(self.path, "a+b")
        fcntl.flock(self.handle.fileno(), self.mode)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()


class CacheDiskError(OSError):
    """Writing into the cache failed (a full or read-only disk), as opposed to reading the store."""


def _local_error(error: OSError, root: Path) -> bool:
    return str(root) in str(getattr(error, "filename", "") or "")


def _download(uri: str, target: Path) -> int:
    """Copy the object at `uri` into the local file `target`; returns the bytes written. Errors of the local disk
    are `CacheDiskError`; the store's propagate as they are."""
    from ingest.storage import open_uri

    with open_uri(uri) as source:
        try:
            out = open(target, "wb")
        except OSError as e:
            raise CacheDiskError(e.errno, f"{target}: {e.strerror or e}") from None
        with out:
            while chunk := source.read(4 * 2**20):
                try:
                    out.write(chunk)
                except OSError as e:
                    raise CacheDiskError(e.errno, f"{target}: {e.strerror or e}") from None
            try:
                out.flush()
            except OSError as e:
                raise CacheDiskError(e.errno, f"{target}: {e.strerror or e}") from None
            return out.tell()


_CACHES: dict[tuple[str, int], ShardCache] = {}
_CACHES_LOCK = threading.Lock()


def node_cache(root: str | None, capacity: int) -> ShardCache:
    """The process's cache at `root` (default: `default_cache_dir()`), made once."""
    root = root or default_cache_dir()
    with _CACHES_LOCK:
        cache = _CACHES.get((root, capacity))
        if cache is None:
            cache = _CACHES[(root, capacity)] = ShardCache(root, capacity)
        return cache
