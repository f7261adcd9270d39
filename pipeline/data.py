"""Reading training data straight from lake shards (local or S3): the stages from a rank's segments to batches.

Which segments a rank reads, and in what order, is `pipeline.epochs`'s; the run's dataset versions are
`pipeline.dataplan`'s. Stages are small generator functions (read -> check -> decode -> shuffle -> flip ->
batch), each testable on plain lists; with `data.loader_workers` N > 1, N loader processes fill each shuffle window
together from the shards each owns (`pipeline.loader_processes`), or N threads take a window each. Shards
are parsed by `ingest.shards.iter_members`, a streaming USTAR reader about 3x faster than webdataset's
tarfile-based iterator on these shards (webdataset reads them as well), which hands out the arrays of mapped
files and downloaded shards as views, not copies; each sample is checked, decoded and written to its shuffled
place in one pass while it is in the core's cache.

About 650 lines on purpose: the stages share one contract (what `read_segments` yields, in an order a resume can
skip exactly, whatever the number of loader workers) that reads best in one place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ingest.storage import StorageError
from pipeline.dataplan import DataError, DataPlan
from pipeline.epochs import (
    Segment,
    plan_mixture,
    plan_rank_epoch,
    plan_train_epoch,
    plan_validation,
    round_robin,
    window_draws,
)

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
    """Yield (shard uri, key, lab.npy bytes or None when unreadable) for the samples of `segments`; with
    `verify=False`, (shard uri, key, lab.npy bytes or None, json bytes or None), the checksum left to the caller
    (`verified`), so that loader workers check samples in parallel.

    With `interleave` K > 1, segments are read K at a time, a sample from each in turn (round robin; a shorter
    segment drops out when done), so consecutive samples come from K shards; with 1, one segment after another.
    Either way the order is a pure function of the segments, which makes `skip` exact.

    A sample whose bytes do not match the CRC-32 its metadata recorded at ingest is unreadable (None).

    The first `skip` samples are passed over: whole groups of segments without opening them, the rest of the
    way by reading tar headers and bytes but decoding nothing. Shards on S3 are downloaded whole,
    `readahead` shards ahead in background threads (default: 2 for s3://, or K when interleaving; 0 for local
    files, which the OS reads ahead by itself), so network time overlaps decoding and training. On S3 a rank
    then holds up to K + readahead shards in memory (8 x 64 MB with the default 4), and the shards whose samples
    windows still hold (read as views of the download: about K more). With a `cache`
    (`pipeline.shard_cache.ShardCache`), s3:// shards are read from (and fetched ahead into) the node's cache.
    """
    pending = reading_plan(segments, skip, interleave)
    uris = [segment.shard.uri for group, _, offsets in pending for segment, start in zip(group, offsets, strict=True)
            if start < segment.stop]  # fmt: skip
    openers = shard_openers(uris, segments, opener, readahead, interleave, cache)
    for group, order, offsets in pending:
        streams = [
            _segment_samples(segment, start, next(openers), verify) if start < segment.stop else _nothing()
            for segment, start in zip(group, offsets, strict=True)
        ]
        if len(streams) == 1:
            yield from streams[0]
            continue
        for index in order:
            yield next(streams[index])
        for stream in streams:  # each is done: let its shard (a whole download on S3) go before the next group
            stream.close()


def reading_plan(segments: list[Segment], skip: int, interleave: int) -> list[tuple[list[Segment], list, list]]:
    """How `read_segments` reads: (group of up to `interleave` segments, which segment each of its samples comes
    from, the first sample to read of each segment) for the groups left after the first `skip` samples. A pure
    function of its arguments: every loader process reading an epoch sees the same stream."""
    interleave = max(1, interleave)
    groups = [segments[i : i + interleave] for i in range(0, len(segments), interleave)]
    pending = []
    for group in groups:
        total = sum(segment.length for segment in group)
        if skip >= total:
            skip -= total
            continue
        order = round_robin(group)
        offsets = [segment.start for segment in group]
        for index in order[:skip]:
            offsets[index] += 1
        pending.append((group, order[skip:], offsets))
        skip = 0
    return pending


def shard_openers(uris: list[str], segments: list[Segment], opener: Callable, readahead: int | None, interleave: int,
                  cache) -> Iterator[Callable]:  # fmt: skip
    """A context-manager factory per URI of `uris`, in order (see `read_segments` for `readahead` and `cache`)."""
    fetch = fetch_shard
    if cache is not None and uris and uris[0].startswith("s3://") and opener is open_shard:
        sizes = {segment.shard.uri: segment.shard.size for segment in segments}
        opener = fetch = lambda uri: cache.open(uri, sizes[uri])  # noqa: E731 - one function, two roles
        readahead = readahead if readahead is not None else min(max(2, interleave), 8)
    if readahead is None:
        readahead = min(max(2, interleave), 8) if uris and uris[0].startswith("s3://") and opener is open_shard else 0
    return _open_ahead(uris, opener, readahead, fetch)


def _nothing() -> Iterator:
    yield from ()


def _segment_samples(segment: Segment, start: int, open_stream: Callable, verify: bool = True) -> Iterator[tuple]:
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


class BadSampleCounter:
    """Counts corrupt samples and stops the run when there are too many."""

    def __init__(self, max_fraction: float, expected: int, what: str = "data.max_bad_fraction",
                 scope: str = "on this worker"):  # fmt: skip
        self.max_fraction = max_fraction
        self.what = what
        self.scope = scope
        self.expected = max(expected, 1)
        self.bad = 0
        self.seen = 0

    def record(self, uri: str, key: str, ok: bool) -> None:
        self.seen += 1
        if ok:
            return
        self.bad += 1
        log.warning("skipping corrupt sample %s in shard %s", key, uri)
        if self.bad > self.max_fraction * self.expected:
            raise DataError(
                f"{self.bad} corrupt samples (of {self.expected} expected {self.scope}) exceed "
                f"{self.what}={self.max_fraction}; last: {key} in {uri}. `recolor lake check NAME --deep` lists the "
                "damaged shards and `recolor lake repair NAME` rebuilds them into a new version"
            )


def windows(items: Iterable, size: int) -> Iterator[list]:
    window: list = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def train_blocks(raw: Iterator[tuple], size: int, window: int, seed: int, epoch: int, rank: int, first_window: int,
                 skip_in_window: int, flip: bool, counter: BadSampleCounter, rotate: float = 0.0,
                 loader_workers: int = 1, cache=None, generation: int = 0,
                 pool: BlockPool | None = None) -> Iterator[np.ndarray]:  # fmt: skip
    """Decode, shuffle within windows, flip, rotate (within +-`rotate` degrees; 0: never), a window at a time: one
    contiguous uint8 array (n, 3, size, size) per shuffle window. Corrupt samples are replaced by a good one of the
    same window (and counted), so the rank still yields exactly as many samples as planned. Every draw comes from
    the window's seeded generator: a resumed epoch repeats them.

    With `loader_workers` N > 1, N threads each take a whole window (checksums, decoding, the shuffle, flips and
    rotations, written into the window's array: zlib-ng, numpy and PIL release the GIL for that work) while this
    thread reads the next ones, and the windows come back in their order: the samples are the same, in the same
    order, whatever N. Up to N windows are in flight (N x `shuffle_window` samples in memory). The processes of
    `pipeline.loader_processes` make the same windows (`window_blocks`) without sharing one interpreter's lock."""
    pool = pool or BlockPool(window * 3 * size * size)

    def work(number: int, items: list[tuple]):
        start = skip_in_window if number == first_window else 0
        _, storage = pool.take()
        return _window_block(items, size, seed, epoch, rank, number, start, flip, rotate, generation,
                             lambda rows: shaped(storage, rows, size))  # fmt: skip

    jobs = enumerate(windows(raw, window), start=first_window)
    return checked_blocks(ordered_map(work, jobs, loader_workers), counter, cache)


def checked_blocks(made: Iterable[tuple], counter: BadSampleCounter, cache=None) -> Iterator[np.ndarray]:
    """The blocks of `_window_block` results, in order, each window's samples counted (good or corrupt) first."""
    for records, block, first_shard in made:
        for record in records:
            if cache is not None and not record[2] and record[0].startswith("s3://"):
                cache.drop(record[0])  # maybe damaged on this disk: the next epoch fetches it again
            counter.record(*record)
        if block is None:
            raise DataError(f"a whole window of {len(records)} samples was corrupt (first shard: {first_shard})")
        yield block


class BlockPool:
    """Storage for window blocks, reused once nothing refers to a block: a fresh 50 MB array a window costs its
    page faults (the kernel zeroes every page), a third of a sample's time on one core (bench/loader.py).

    A storage is free when its reference count says only the pool holds it. Every block and every batch cut from
    one is a numpy view whose base is its storage (`torch.from_numpy` keeps the view, so the storage too): a batch
    the consumer keeps, for however long, keeps its storage out of reuse, and the pool grows instead.
    """

    def __init__(self, nbytes: int, allocate: Callable[[int], np.ndarray] | None = None):
        self.nbytes = nbytes
        self._allocate = allocate or (lambda n: np.empty(n, dtype=np.uint8))
        self._storages: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self) -> tuple[int, np.ndarray]:
        """(index, storage): a 1-D uint8 storage of `nbytes` that nothing refers to, the caller's until it lets go
        of it and of every view of it; the index names it to a loader process."""
        with self._lock:
            for index in range(len(self._storages)):
                if sys.getrefcount(self._storages[index]) == 2:  # the list's reference and the call's argument
                    return index, self._storages[index]
            self._storages.append(self._allocate(self.nbytes))
            return len(self._storages) - 1, self._storages[-1]

    def __len__(self) -> int:
        return len(self._storages)


def shaped(storage: np.ndarray, rows: int, size: int) -> np.ndarray:
    """The first `rows` samples' worth of a pool storage as a block (rows, 3, size, size): a view of it."""
    return storage[: rows * 3 * size * size].reshape(rows, 3, size, size)


def _window_block(items: list[tuple], size: int, seed: int, epoch: int, rank: int, number: int, start: int,
                  flip: bool, rotate: float, generation: int = 0,
                  block_for: Callable[[int], np.ndarray] | None = None):  # fmt: skip
    """One window's samples in training order from `start` on: ([(uri, key, ok)], one array of them or None when
    every sample is corrupt, the first item's shard). `block_for(rows)` gives the array to fill (default: a new one).

    One pass in reading order: each sample is checked, decoded and written to its shuffled place while its bytes are
    still in the core's cache (the shuffle is drawn before anything is read). A corrupt sample's place is filled
    afterwards by a good one of the window (item i by the (i mod good)-th good one)."""
    rows = len(items) - start
    window = Window(len(items), start, size, flip, window_draws(seed, epoch, rank, number, len(items), rotate,
                                                               generation))  # fmt: skip
    block = block_for(rows) if block_for else np.empty((rows, 3, size, size), dtype=np.uint8)
    records = window.fill(block, enumerate(items))
    return window.finish(block, records, lambda index: items[index])


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

    def finish(self, block: np.ndarray, records: list[tuple], item_of: Callable[[int], tuple]):
        """([(uri, key, ok)] in item order, the block or None when every item was corrupt, the first item's
        shard), after filling each corrupt item's row with the (i mod good)-th good item (`item_of(index)`)."""
        records = sorted(records)
        good = [index for index, _, _, ok in records if ok]
        plain = [(uri, key, ok) for _, uri, key, ok in records]
        if not good:
            return plain, None, records[0][1]
        for index, _, _, ok in records:
            if not ok and self.places[index] >= 0:
                array = decode_sample(verified(item_of(good[index % len(good)])), self.size)
                if array is None:
                    raise DataError(f"sample {records[good[index % len(good)]][2]} of shard "
                                    f"{records[good[index % len(good)]][1]} read differently twice")  # fmt: skip
                self.put(block, index, array)
        return plain, block, records[0][1]


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


def ordered_map(function: Callable, jobs: Iterable[tuple], workers: int) -> Iterator:
    """`function(*job)` for each job, in the jobs' order; with `workers` > 1 that many run at once in threads,
    at most `workers` ahead of the consumer (the rest of the jobs are not drawn until there is room)."""
    if workers <= 1:
        for job in jobs:
            yield function(*job)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recolor-loader")
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(function, *job))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def epoch_keys(
    plan: DataPlan, epoch: int, seed: int, rank: int, world_size: int, batch_size: int, shuffle_window: int,
    interleave: int = 4, opener: Callable = open_shard, owned: bool = False,
) -> list[str]:  # fmt: skip
    """The sample keys of one rank's epoch in the order training sees them (what a batch mixes; benchmarks)."""
    segments, steps = plan_train_epoch(plan.train, epoch, seed, rank, world_size, batch_size, owned)
    keys = []
    for number, items in enumerate(windows(read_segments(segments, opener=opener, interleave=interleave),
                                           shuffle_window)):  # fmt: skip
        order, _, _ = window_draws(seed, epoch, rank, number, len(items))
        keys += [items[i][1] for i in order]
    return keys[: steps * batch_size]


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


def batches(arrays: Iterable[np.ndarray], batch_size: int, drop_last: bool) -> Iterator[np.ndarray]:
    for group in windows(arrays, batch_size):
        if len(group) == batch_size or not drop_last:
            yield np.stack(group)


def block_batches(blocks: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Full batches of `batch_size` samples cut from consecutive blocks (`train_blocks`): a view of a block where
    the batch lies inside one (no copy), a new array where it straddles two; the rest (less than a batch) is
    dropped."""
    carry: list[np.ndarray] = []
    held = 0
    for block in blocks:
        start = 0
        if held:
            start = min(batch_size - held, len(block))
            carry.append(block[:start])
            held += start
            if held < batch_size:
                continue
            yield np.concatenate(carry)
            carry, held = [], 0
        whole = start + (len(block) - start) // batch_size * batch_size
        for offset in range(start, whole, batch_size):
            yield block[offset : offset + batch_size]
        if whole < len(block):
            carry, held = [block[whole:]], len(block) - whole


@dataclass(frozen=True)
class LoaderOptions:
    """How a rank reads its share of an epoch: the `data` config's reading settings (`pipeline.config.DataConfig`).

    Attributes:
        batch_size: this rank's batch; unused when `global_batch` is given.
        global_batch: the run's batch over all ranks, split by `rank_batches`; None: `world_size * batch_size`.
        shuffle_window: samples shuffled together (one loader thread's job).
        flip: mirror half the samples, left to right (seeded).
        rotate: rotate by up to this many degrees either way (seeded); 0: never.
        interleave: shards read at a time.
        loader_workers: processes (or threads) checking, decoding and augmenting shuffle windows.
        loader_processes: with `loader_workers` > 1, processes where they can open the shards
            (`pipeline.loader_processes`); False: threads in this process.
        max_bad_fraction: the share of corrupt samples past which the epoch stops with a `DataError`.
        owned_shards: each rank reads the shards it owns, every epoch (`pipeline.epochs.owned_ranges`).
    """

    batch_size: int = 0
    global_batch: int | None = None
    shuffle_window: int = 256
    flip: bool = True
    rotate: float = 0.0
    interleave: int = 4
    loader_workers: int = 1
    loader_processes: bool = True
    max_bad_fraction: float = 0.01
    owned_shards: bool = False


def train_batches(
    plan: DataPlan,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    options: LoaderOptions,
    start_step: int = 0,
    splits: list[tuple[int, int]] | None = None,
    opener: Callable = open_shard,
    cache=None,
) -> tuple[Iterator[np.ndarray], int, BadSampleCounter]:
    """One epoch of uint8 Lab batches (batch, 3, H, W) for this rank, from the epoch's step `start_step` on, read from
    `options.interleave` shards at a time, checked, decoded and augmented by `options.loader_workers` loader
    processes or threads (`pipeline.loader_processes`, `train_blocks`). `splits` are the epoch's worker groups so
    far (`plan_rank_epoch`; default: this one from step 0); `cache` a node-local `ShardCache` or None.

    Raises:
        ValueError: `start_step` lies outside this worker group's steps of the epoch.

    Returns:
        (batch iterator, steps in the epoch, the corrupt-sample counter).
    """
    window = options.shuffle_window
    global_batch = options.global_batch or world_size * options.batch_size
    part = plan_rank_epoch(plan.train, epoch, seed, global_batch, splits or [(world_size, 0)], rank, options.interleave,
                           window, plan_mixture(plan), options.owned_shards)  # fmt: skip
    if not part.first_step <= start_step <= part.steps:
        raise ValueError(f"start_step {start_step} is outside this worker group's steps of the epoch, "
                         f"{part.first_step} to {part.steps}")  # fmt: skip
    skip = (start_step - part.first_step) * part.batch
    first_window, skip_in_window = divmod(skip, window)
    counter = BadSampleCounter(options.max_bad_fraction, (part.steps - part.first_step) * part.batch)
    processes = _loader_processes(options, part.segments, opener, cache)
    if processes:
        from pipeline import loader_processes

        job = {
            "segments": part.segments, "skip": first_window * window, "interleave": options.interleave,
            "window": window, "size": plan.size, "seed": seed, "epoch": epoch, "rank": rank,
            "first_window": first_window, "skip_in_window": skip_in_window, "flip": options.flip,
            "rotate": options.rotate, "generation": part.generation, "nbytes": window * 3 * plan.size**2,
            "cache": None if cache is None else (str(cache.root), cache.capacity),
        }  # fmt: skip
        made = loader_processes.process_windows(job, options.loader_workers, cache)
        blocks = checked_blocks(made, counter, cache)
    else:
        raw = read_segments(part.segments, skip=first_window * window, opener=opener, interleave=options.interleave,
                            verify=False, cache=cache)  # fmt: skip
        blocks = train_blocks(
            raw, plan.size, window, seed, epoch, rank, first_window, skip_in_window, options.flip, counter,
            options.rotate, options.loader_workers, cache, part.generation,
        )  # fmt: skip
    return block_batches(blocks, part.batch), part.steps, counter


def _loader_processes(options: LoaderOptions, segments: list[Segment], opener: Callable, cache) -> bool:
    """Whether `options.loader_workers` run as processes (`pipeline.loader_processes`): more than one asked for,
    on Linux, each able to open the shards itself (local files, or S3 through the node's shard cache: without it
    every process would download every shard)."""
    from pipeline import loader_processes
    from pipeline.shard_cache import ShardCache

    if options.loader_workers <= 1 or not options.loader_processes or not loader_processes.available():
        return False
    if opener is not open_shard:
        return False
    if all("://" not in segment.shard.uri for segment in segments):
        return True
    return type(cache) is ShardCache and cache.enabled and cache.has_default_download()


def validation_batches(
    plan: DataPlan,
    rank: int,
    world_size: int,
    batch_size: int,
    max_batches: int | None = None,
    opener: Callable = open_shard,
    counter: BadSampleCounter | None = None,
    cache=None,
    keys: list | None = None,
) -> Iterator[np.ndarray]:
    """This rank's validation share, in order, in batches (the last may be smaller); corrupt samples skipped.

    Args:
        counter: counts what was read and skipped (and stops past its limit); default: no limit.
        keys: given a list, (shard URI, sample key) of each sample yielded is appended to it, in order.
    """
    segments = plan_validation(plan.val, rank, world_size)
    counter = counter or BadSampleCounter(1.0, sum(s.length for s in segments))

    def decoded():
        for uri, key, data in read_segments(segments, opener=opener, cache=cache):
            array = decode_sample(data, plan.size)
            counter.record(uri, key, array is not None)
            if array is not None:
                if keys is not None:
                    keys.append((uri, key))
                yield array

    for number, batch in enumerate(batches(decoded(), batch_size, drop_last=False)):
        if max_batches is not None and number >= max_batches:
            return
        yield batch


def prefetch(iterator: Iterator, depth: int) -> Iterator:
    """Run `iterator` in a background thread, `depth` items ahead (shard I/O and decoding overlap compute)."""
    if depth <= 0:
        yield from iterator
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        # Never block for good: a consumer that stopped early takes nothing more (the thread must end).
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)

    thread = threading.Thread(target=produce, name="recolor-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
