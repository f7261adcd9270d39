"""A rank's epoch as batches, read straight from lake shards (local or S3).

Which segments a rank reads, and in what order, is `pipeline.data.epochs`'s; the run's dataset versions are
`pipeline.data.plan`'s. One shuffle window at a time is filled in one pass by `Window.fill`
(`pipeline.data.reading`: read, check the CRC-32, decode, flip and rotate, straight into a reused block); with
`data.loader_workers` N > 1, N loader processes fill each window together from the shards each owns
(`pipeline.data.loader_processes`), or N threads take a window each (`train_blocks`). Here the filled blocks are
checked for corrupt samples (`checked_blocks`, `BadSampleCounter`) and cut into batches (`block_batches`), and
`prefetch` keeps batches ready. Every path reads the stream `epochs.read_stream` defines (threads through
`read_segments`, loader processes through `EpochStream`), in an order a resume can skip exactly, whatever the number of
loader workers.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.epochs import Segment, plan_mixture, plan_rank_epoch, plan_train_epoch, plan_validation, window_draws
from pipeline.data.plan import DataError, DataPlan
from pipeline.data.reading import (
    BlockPool,
    EpochStream,
    Shuffle,
    Window,
    decode_sample,
    open_shard,
    read_segments,
    shaped,
)

log = logging.getLogger(__name__)


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
                "damaged shards and `recolor lake repair NAME` rebuilds them into a new version; a training run "
                "then goes on from its checkpoint on the repaired version when rerun with the same command"
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


def train_blocks(raw: Iterator[tuple], stream: EpochStream, counter: BadSampleCounter, loader_workers: int = 1,
                 cache=None) -> Iterator[np.ndarray]:  # fmt: skip
    """Decode, shuffle within windows, flip, rotate, a window at a time, as `stream` says (`raw`: what `read_segments`
    yields for it): one contiguous uint8 array (n, 3, size, size) per shuffle window. Corrupt samples are replaced by
    a good one of the same window (and counted), so the rank still yields exactly as many samples as planned. Every
    draw comes from the window's seeded generator (`stream.shuffle`): a resumed epoch repeats them.

    With `loader_workers` N > 1, N threads each take a whole window (checksums, decoding, the shuffle, flips and
    rotations, written into the window's array: zlib-ng, numpy and PIL release the GIL for that work) while this
    thread reads the next ones, and the windows come back in their order: the samples are the same, in the same
    order, whatever N. Up to N windows are in flight (N x `shuffle_window` samples in memory). The processes of
    `pipeline.data.loader_processes` fill the same windows (`Window`) without sharing one interpreter's lock."""
    size = stream.shuffle.size
    pool = BlockPool(stream.block_bytes)

    def work(number: int, items: list[tuple]):
        _, storage = pool.take()
        return _window_block(items, stream.shuffle_window(number, len(items)), lambda rows: shaped(storage, rows, size))

    jobs = enumerate(windows(raw, stream.window), start=stream.first_window)
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


def _window_block(items: list[tuple], window: Window, block_for: Callable[[int], np.ndarray] | None = None):
    """One window's samples in training order from `window.start` on: ([(uri, key, ok)], one array of them or None
    when every sample is corrupt, the first item's shard). `block_for(rows)` gives the array to fill (default: a new
    one).

    One pass in reading order: each sample is checked, decoded and written to its shuffled place while its bytes are
    still in the core's cache (the shuffle is drawn before anything is read). A corrupt sample's place is filled
    afterwards by a good one of the window (item i by the (i mod good)-th good one)."""
    rows = len(items) - window.start
    block = block_for(rows) if block_for else np.empty((rows, 3, window.size, window.size), dtype=np.uint8)
    records = window.fill(block, enumerate(items))
    return window.finish(block, records, lambda wanted: {index: items[index] for index in wanted})


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
            (`pipeline.data.loader_processes`); False: threads in this process.
        max_bad_fraction: the share of corrupt samples past which the epoch stops with a `DataError`.
        owned_shards: each rank reads the shards it owns, every epoch (`pipeline.data.epochs.owned_ranges`).
    """

    # The defaults are the `data` config's own: one place says them.
    batch_size: int = 0
    global_batch: int | None = None
    shuffle_window: int = DataConfig.shuffle_window
    flip: bool = DataConfig.flip
    rotate: float = DataConfig.rotate_degrees
    interleave: int = DataConfig.interleave
    loader_workers: int = 1
    loader_processes: bool = DataConfig.loader_processes
    max_bad_fraction: float = DataConfig.max_bad_fraction
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
    processes or threads (`pipeline.data.loader_processes`, `train_blocks`). `splits` are the epoch's worker groups so
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
    first_window, skip_in_window = divmod((start_step - part.first_step) * part.batch, window)
    shuffle = Shuffle(plan.size, seed, epoch, rank, options.flip, options.rotate, part.generation)
    stream = EpochStream(part.segments, options.interleave, window, first_window, skip_in_window, shuffle)
    counter = BadSampleCounter(options.max_bad_fraction, (part.steps - part.first_step) * part.batch)
    if _loader_processes(options, part.segments, opener, cache):
        from pipeline.data import loader_processes

        job = {"stream": stream, "cache": None if cache is None else (str(cache.root), cache.capacity)}
        made = loader_processes.process_windows(job, options.loader_workers, cache)
        blocks = checked_blocks(made, counter, cache)
    else:
        raw = read_segments(stream.segments, skip=stream.skip, opener=opener, interleave=stream.interleave,
                            verify=False, cache=cache)  # fmt: skip
        blocks = train_blocks(raw, stream, counter, options.loader_workers, cache)
    return block_batches(blocks, part.batch), part.steps, counter


def _loader_processes(options: LoaderOptions, segments: list[Segment], opener: Callable, cache) -> bool:
    """Whether `options.loader_workers` run as processes (`pipeline.data.loader_processes`): more than one asked for,
    on Linux, each able to open the shards itself (local files, or S3 through the node's shard cache: without it
    every process would download every shard)."""
    from pipeline.data import loader_processes
    from pipeline.data.shard_cache import ShardCache

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
