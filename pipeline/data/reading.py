"""Reading a rank's samples from lake shards (local, or S3 whole or through the node's shard cache), and making
shuffle windows of them: the layer under `pipeline.data.batches`'s stages, shared with the loader processes
(`pipeline.data.loader_processes`), which fill windows together from the shards each reads.

Shards are parsed by `ingest.shards.iter_members`, a streaming USTAR reader about 3x faster than webdataset's
tarfile-based iterator on these shards, which hands out the arrays of mapped files and downloaded shards as views,
not copies. `read_segments` gives a rank's samples in the order `epochs.read_stream` defines, a pure function of
its segments, so a resume skips exactly. An `EpochStream` is one rank's read of an epoch (its segments, where it
starts, its `Shuffle`): the thread path and every loader process read by it, so they agree on every window's layout.
A `Window` writes each sample, checked and decoded, to its shuffled row of a block while its bytes are in the core's
cache, mirrored and rotated as the window's seeded draws say; a `BlockPool` lends the blocks again once no batch
refers to them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from ingest.storage import StorageError
from pipeline.data.epochs import ReadGroup, Segment, read_stream, window_draws
from pipeline.data.plan import DataError

log = logging.getLogger(__name__)


def open_shard(uri: str):
    from ingest.storage import open_uri

    return open_uri(uri)


def fetch_shard(uri: str) -> io.BytesIO:
    """A whole shard in memory (object stores: one large GET beats many small reads)."""
    from ingest.storage import read_uri

    return io.BytesIO(read_uri(uri))


def _open_ahead(uris: list[str], opener: Callable, readahead: int, fetch: Callable = fetch_shard) -> Iterator:
    """Yield a context manager per URI; with `readahead`, the next shards are fetched (`fetch`: downloaded whole,
    or into the shard cache) in background threads."""
    if readahead <= 0:
        for uri in uris:
            yield lambda uri=uri: opener(uri)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=readahead, thread_name_prefix="recolor-shard") as pool:
        futures = [pool.submit(fetch, uri) for uri in uris[:readahead]]
        for index in range(len(uris)):
            if index + readahead < len(uris):
                futures.append(pool.submit(fetch, uris[index + readahead]))
            yield futures[index].result
        for future in futures:
            if not future.cancel() and future.done() and future.exception() is None:
                with contextlib.suppress(Exception):
                    future.result().close()  # fetched ahead, never read: let its cache lock go


def read_segments(
    segments: list[Segment],
    skip: int = 0,
    opener: Callable = open_shard,
    readahead: int | None = None,
    interleave: int = 1,
    verify: bool = True,
    cache=None,
) -> Iterator[tuple]:
    """Yield (shard uri, key, lab.npy bytes or None when unreadable) for the samples of `segments`, in the order
    `pipeline.data.epochs.read_stream` gives; with `verify=False`, (shard uri, key, lab.npy bytes or None, json
    bytes or None), the checksum left to the caller (`verified`), so that loader workers check samples in parallel.

    With `interleave` K > 1, segments are read K at a time, a sample from each in turn, so consecutive samples come
    from K shards; with 1 (the default here: validation, tools and benchmarks; training passes
    `data.interleave`), one segment after another. The order is a pure function of the segments, which makes
    `skip` exact.

    A sample whose bytes do not match the CRC-32 its metadata recorded at ingest is unreadable (None).

    The first `skip` samples are passed over: whole groups of segments without opening them, the rest of the
    way by reading tar headers and bytes but decoding nothing. Shards on S3 are downloaded whole,
    `readahead` shards ahead in background threads (default: 2 for s3://, or K when interleaving; 0 for local
    files, which the OS reads ahead by itself), so network time overlaps decoding and training. On S3 a rank
    then holds up to K + readahead shards in memory (8 x 64 MB with the default 4), and the shards whose samples
    windows still hold (read as views of the download: about K more). With a `cache`
    (`pipeline.data.shard_cache.ShardCache`), s3:// shards are read from (and fetched ahead into) the node's cache.
    """
    pending = read_stream(segments, interleave, skip)
    uris = [segment.shard.uri for group in pending for segment, start in zip(group.segments, group.offsets, strict=True)
            if start < segment.stop]  # fmt: skip
    openers = shard_openers(uris, segments, opener, readahead, interleave, cache)
    for group in pending:
        streams = [
            segment_samples(segment, start, next(openers), verify) if start < segment.stop else no_samples()
            for segment, start in zip(group.segments, group.offsets, strict=True)
        ]
        if len(streams) == 1:
            yield from streams[0]
            continue
        for index in group.order:
            yield next(streams[index])
        for stream in streams:  # each is done: let its shard (a whole download on S3) go before the next group
            stream.close()


def shard_openers(uris: list[str], segments: list[Segment], opener: Callable, readahead: int | None, interleave: int,
                  cache) -> Iterator[Callable]:  # fmt: skip
    """A context-manager factory per URI of `uris`, in order (see `read_segments` for `readahead` and `cache`)."""
    fetch = fetch_shard
    if cache is not None and uris and uris[0].startswith("s3://") and opener is open_shard:
        shards = {segment.shard.uri: segment.shard for segment in segments}
        opener = fetch = lambda uri: cache.open(uri, shards[uri].size, shards[uri].sha256)  # noqa: E731 - two roles
        readahead = readahead if readahead is not None else min(max(2, interleave), 8)
    if readahead is None:
        readahead = min(max(2, interleave), 8) if uris and uris[0].startswith("s3://") and opener is open_shard else 0
    return _open_ahead(uris, opener, readahead, fetch)


def no_samples() -> Iterator:
    """An iterator of no samples: a segment read to its end before a resume."""
    yield from ()


def segment_samples(segment: Segment, start: int, open_stream: Callable, verify: bool = True) -> Iterator[tuple]:
    """Samples [start, segment.stop) of one shard: exactly that many items, None for each unreadable one (see
    `read_segments` for `verify`)."""
    from ingest.shards import checksum_matches, iter_samples

    emitted = 0
    picks = None if segment.picks is None else set(segment.picks[start : segment.stop])
    first, stop = start, segment.stop
    if segment.picks is not None:  # read from the first pick to the last, passing over the others
        first, stop = segment.picks[start], segment.picks[segment.stop - 1] + 1
    try:
        stream = open_stream()
        with stream:
            for position, sample in enumerate(iter_samples(stream, views=True)):
                if position < first or (picks is not None and position not in picks):
                    continue
                if position >= stop:
                    break
                lab = sample.get("lab.npy")
                if not verify:
                    yield segment.shard.uri, sample["__key__"], lab, sample.get("json")
                    emitted += 1
                    continue
                if lab is not None and not checksum_matches(lab, sample.get("json")):
                    lab = None  # bytes changed since ingest: a corrupt sample
                yield segment.shard.uri, sample["__key__"], lab
                emitted += 1
    except StorageError:
        raise  # the store is unreachable (after its retries): not the shard's fault, nothing to skip
    except Exception as e:  # noqa: BLE001 - a broken shard costs its remaining samples, named below
        log.warning("shard %s is unreadable after %d samples: %s", segment.shard.uri, start + emitted, e)
    # A truncated or short shard: its missing samples count as unreadable.
    for missing in range(segment.stop - start - emitted):
        key = f"<missing #{segment.sample(start + emitted + missing)}>"
        yield (segment.shard.uri, key, None) if verify else (segment.shard.uri, key, None, None)


def verified(item: tuple) -> bytes | None:
    """The lab.npy bytes of an unverified item (`read_segments(verify=False)`), or None when they do not match the
    CRC-32 their metadata recorded at ingest."""
    from ingest.shards import checksum_matches

    lab = item[2]
    if len(item) > 3 and lab is not None and not checksum_matches(lab, item[3]):
        return None
    return lab


def decode_sample(data: bytes | None, size: int) -> np.ndarray | None:
    """A stored Lab array (uint8, (3, size, size)), or None when the bytes are not one. Never unpickles."""
    from ingest.shards import decode_lab_npy

    if data is None:
        return None
    try:
        return decode_lab_npy(data, size)
    except Exception:  # noqa: BLE001 - garbage bytes, pickled objects, truncated headers, wrong shapes
        return None


class Window:
    """One shuffle window's draws, applied: which row of the block each item goes to, mirrored and rotated how.
    `fill` may run in parts (each loader process fills the rows of the items it read), `finish` once."""

    def __init__(self, count: int, start: int, size: int, flip: bool, draws: tuple):
        order, self.flips, self.angles = draws
        self.start, self.size, self.flip = start, size, flip
        self.places = np.full(count, -1, dtype=np.int64)  # item -> its row in the block (-1: before `start`)
        self.places[order[start:]] = np.arange(count - start)

    def put(self, block: np.ndarray, index: int, array: np.ndarray) -> None:
        row = int(self.places[index])
        position = self.start + row
        angle = None if self.angles is None else float(self.angles[position])
        _augment_into(block[row], array, self.flip and bool(self.flips[position]), angle)

    def fill(self, block: np.ndarray, items: Iterable[tuple[int, tuple]]) -> list[tuple[int, str, str, bool]]:
        """Check, decode and write each (index in the window, item) to its row; (index, uri, key, ok) of each."""
        records = []
        for index, item in items:
            array = decode_sample(verified(item), self.size)
            records.append((index, item[0], item[1], array is not None))
            if array is not None and self.places[index] >= 0:
                self.put(block, index, array)
        return records

    def finish(self, block: np.ndarray, records: list[tuple], items_of: Callable[[set[int]], Mapping[int, tuple]]):
        """([(uri, key, ok)] in item order, the block or None when every item was corrupt, the first item's
        shard), after filling each corrupt item's row with the (i mod good)-th good item. `items_of(indexes)` gives
        the good items needed (index in the window -> item), all at once."""
        records = sorted(records)
        good = [index for index, _, _, ok in records if ok]
        plain = [(uri, key, ok) for _, uri, key, ok in records]
        if not good:
            return plain, None, records[0][1]
        replaced = {index: good[index % len(good)] for index, _, _, ok in records if not ok and self.places[index] >= 0}
        items = items_of(set(replaced.values())) if replaced else {}
        for index, source in replaced.items():
            array = decode_sample(verified(items[source]), self.size)
            if array is None:
                _, uri, key, _ = records[source]
                raise DataError(f"sample {key} of shard {uri} read differently twice")
            self.put(block, index, array)
        return plain, block, records[0][1]


@dataclass(frozen=True)
class Shuffle:
    """How one rank's epoch is shuffled and augmented, a window at a time: each window's draws (`window_draws`)
    come from the seed, the epoch, the rank, the window's number and the worker group's generation alone."""

    size: int  # the samples' side
    seed: int
    epoch: int
    rank: int
    flip: bool
    rotate: float = 0.0
    generation: int = 0

    def window(self, number: int, length: int, start: int = 0) -> Window:
        """Window `number` of `length` samples, the first `start` of which were trained before."""
        draws = window_draws(self.seed, self.epoch, self.rank, number, length, self.rotate, self.generation)
        return Window(length, start, self.size, self.flip, draws)


@dataclass(frozen=True)
class EpochStream:
    """One rank's read of an epoch from a step on: what the thread path and every loader process go by, alike.

    Its `segments` are read in `read_stream`'s order, `interleave` at a time, and cut into shuffle windows of `window`
    samples; reading starts at window `first_window` (the ones before are passed over without decoding),
    `skip_in_window` of whose samples were trained before the resume."""

    segments: list[Segment]
    interleave: int
    window: int
    first_window: int
    skip_in_window: int
    shuffle: Shuffle

    @property
    def skip(self) -> int:
        """Samples passed over without decoding: the windows before `first_window`."""
        return self.first_window * self.window

    @property
    def block_bytes(self) -> int:
        """The bytes of one window's block: `window` samples of 3 x side x side uint8."""
        return self.window * 3 * self.shuffle.size**2

    def groups(self) -> list[ReadGroup]:
        return read_stream(self.segments, self.interleave, self.skip)

    def shuffle_window(self, number: int, length: int) -> Window:
        return self.shuffle.window(number, length, self.skip_in_window if number == self.first_window else 0)


def _augment_into(out: np.ndarray, array: np.ndarray, flipped: bool, angle: float | None) -> None:
    """Write `array` (uint8 (3, S, S)) into `out`, mirrored left to right when `flipped`, then rotated by `angle`."""
    if angle is not None:
        out[...] = rotate_lab8(array[:, :, ::-1] if flipped else array, angle)
    elif flipped and array.shape[-1] % 8 == 0 and array.flags.c_contiguous:
        # A row of S bytes is S/8 words: their order reversed and each word's bytes swapped mirror it, 3x faster
        # than numpy's byte-by-byte reversed copy.
        out.view("<u8")[...] = array.view(">u8")[..., ::-1]
    elif flipped:
        out[...] = array[:, :, ::-1]
    else:
        out[...] = array


def rotate_lab8(array: np.ndarray, degrees: float) -> np.ndarray:
    """A stored Lab sample (uint8, (3, S, S)) rotated by `degrees` and zoomed so no empty corner shows (bilinear:
    the stored channels are linear in L, a and b)."""
    import math

    from PIL import Image

    if degrees == 0:
        return array
    side = array.shape[-1]
    image = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), "RGB").rotate(degrees, Image.BILINEAR)
    radians = math.radians(abs(degrees))
    inner = side / (math.cos(radians) + math.sin(radians))  # the largest upright square inside the rotated one
    margin = (side - inner) / 2 + 1.0  # a pixel more: bilinear samples at the rotated edge blend in the empty fill
    zoomed = image.resize((side, side), Image.BILINEAR, box=(margin, margin, side - margin, side - margin))
    return np.ascontiguousarray(np.asarray(zoomed).transpose(2, 0, 1))


class BlockPool:
    """Storage for window blocks, reused once nothing refers to a block: a fresh 100 MB array a window (512 samples
    at 256 px) costs its page faults (the kernel zeroes every page), a third of a sample's time on one core
    (bench/loader.py).

    A storage is lent out as a new array over its memory (`take`). Every block and every batch cut from it is a
    numpy view of that array (numpy makes it their base, the first array up the chain whose own base is no array;
    `torch.from_numpy` keeps the view), so the lent array lives exactly as long as the last of them. Its finalizer
    gives the storage back: a batch the consumer keeps, for however long, keeps its storage out of reuse, and the
    pool grows instead. Lifetimes are the ones the language gives objects, not reference counts read off the
    interpreter (which CPython does not promise from version to version).
    """

    def __init__(self, nbytes: int, allocate: Callable[[int], np.ndarray] | None = None):
        self.nbytes = nbytes
        self._allocate = allocate or (lambda n: np.empty(n, dtype=np.uint8))
        self._storages: list[np.ndarray] = []
        self._free: set[int] = set()
        # Reentrant: a finalizer may run in this thread while it holds the lock (a garbage collection inside take).
        self._lock = threading.RLock()

    def take(self) -> tuple[int, np.ndarray]:
        """(index, storage): a 1-D uint8 array of `nbytes` over a storage nothing else refers to, the caller's until
        it lets go of it and of every view of it; the index names the storage to a loader process."""
        with self._lock:
            if self._free:
                index = min(self._free)
                self._free.discard(index)
            else:
                self._storages.append(self._allocate(self.nbytes))
                index = len(self._storages) - 1
            lent = np.frombuffer(memoryview(self._storages[index]), dtype=np.uint8)
        weakref.finalize(lent, self._give_back, index)
        return index, lent

    def _give_back(self, index: int) -> None:
        with self._lock:
            self._free.add(index)

    def __len__(self) -> int:
        return len(self._storages)


def shaped(storage: np.ndarray, rows: int, size: int) -> np.ndarray:
    """The first `rows` samples' worth of a pool storage as a block (rows, 3, size, size): a view of it."""
    return storage[: rows * 3 * size * size].reshape(rows, 3, size, size)
