"""Training data straight from lake shards (local or S3), split exactly across DDP ranks.

Exact epochs. The manifest knows how many samples each shard holds, so the split is done on
sample counts, not on shard files: each epoch the shard order is shuffled (seeded by seed and
epoch) and laid end to end, every rank takes its own contiguous range of `steps * batch_size`
samples, and `steps = total // (world_size * batch_size)`. Every rank therefore runs the same
number of steps whatever the shard sizes (DDP cannot hang at an epoch's end), every sample is
used at most once per epoch, and at most `world_size * batch_size - 1` samples (the remainder,
less than one global batch) sit out an epoch; which ones changes with the shuffle. A range may
start or end inside a shard, and with more ranks than shards several ranks read one shard.

Shuffling. Within a rank's range, samples are read in order and shuffled in windows of
`shuffle_window` samples with a generator seeded by (seed, epoch, rank, window). Because the
order is a pure function of those numbers, resuming mid-epoch skips the samples already trained
on without decoding them: whole shards are not even opened.

Stages are small generator functions (read -> decode -> shuffle -> flip -> batch), each testable
on plain lists. Shards are parsed by `ingest.shards.iter_members`, a streaming USTAR reader about
3x faster than webdataset's tarfile-based iterator on these shards; webdataset reads them as well.

About 400 lines on purpose: the epoch plan, the stages and the prefetch thread share one
contract (exact, resumable epochs) that reads best in one place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ingest.errors import RecolorError
from ingest.storage import StorageError

log = logging.getLogger(__name__)


class DataError(RecolorError):
    """The training data cannot be used as configured (too many corrupt samples, empty split, ...)."""


@dataclass(frozen=True)
class ShardInfo:
    uri: str
    count: int
    size: int | None = None  # bytes, as the version records (what a cached copy must have); None: unknown
    source: int = 0  # which of the plan's datasets (an index into `DataPlan.refs`)


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard; with `picks` (ascending sample indices of the shard), the samples
    picks[start:stop] (what is left of a shuffle window that an epoch re-split across another number of workers
    did not finish)."""

    shard: ShardInfo
    start: int
    stop: int
    picks: tuple[int, ...] | None = None

    @property
    def length(self) -> int:
        return self.stop - self.start

    def sample(self, position: int) -> int:
        """The shard's sample index at `position` (start <= position < stop)."""
        return self.picks[position] if self.picks is not None else position


@dataclass
class DataPlan:
    """The pinned dataset versions of a run and their shards, resolved once on the driver."""

    refs: list[str]  # "name@version"
    digests: dict[str, str]  # ref -> manifest SHA-256
    uris: dict[str, str]  # ref -> URI of the version record
    size: int  # sample side in pixels
    train: list[ShardInfo] = field(default_factory=list)
    resize: str = "cover"  # how ingest fit photos to the side ("cover": short side, centre crop; "squash")
    val: list[ShardInfo] = field(default_factory=list)
    weights: list[float] | None = None  # a mixture: each dataset's share of an epoch (by `refs`); None: all, once
    epoch_samples: int | None = None  # a mixture's epoch length (None: the datasets' training samples)

    def to_dict(self) -> dict:
        return {
            "refs": self.refs,
            "digests": self.digests,
            "uris": self.uris,
            "size": self.size,
            "resize": self.resize,
            "train": [[s.uri, s.count, s.size, s.source] for s in self.train],
            "val": [[s.uri, s.count, s.size, s.source] for s in self.val],
            "weights": self.weights,
            "epoch_samples": self.epoch_samples,
        }

    @classmethod
    def from_dict(cls, values: dict) -> DataPlan:
        return cls(
            refs=list(values["refs"]),
            digests=dict(values["digests"]),
            uris=dict(values["uris"]),
            size=int(values["size"]),
            resize=str(values.get("resize", "cover")),
            train=[_shard_info(*shard) for shard in values["train"]],
            val=[_shard_info(*shard) for shard in values["val"]],
            weights=values.get("weights"),
            epoch_samples=values.get("epoch_samples"),
        )

    def count(self, split: str) -> int:
        return sum(s.count for s in (self.train if split == "train" else self.val))

    def epoch_length(self) -> int:
        """Training samples an epoch draws: a mixture's `epoch_samples`, else every training sample once."""
        return self.epoch_samples or self.count("train")

    def source(self, index: int) -> DataPlan:
        """The plan of one of its datasets alone (`refs[index]`): per-dataset validation."""
        ref = self.refs[index]
        return DataPlan(refs=[ref], digests={ref: self.digests.get(ref, "")}, uris={ref: self.uris.get(ref, "")},
                        size=self.size, resize=self.resize, train=[s for s in self.train if s.source == index],
                        val=[s for s in self.val if s.source == index])  # fmt: skip


def _shard_info(uri: str, count: int, size: int | None = None, source: int = 0) -> ShardInfo:
    return ShardInfo(uri, int(count), None if size is None else int(size), int(source))


def resolve_data(datasets: list[str], lake_uri: str | None, weights: list[float] | None = None,
                 epoch_samples: int | None = None) -> DataPlan:  # fmt: skip
    """Pin `NAME[@VERSION]` references to versions and list their shards (grayscale-free by construction); with
    `weights` (one a dataset), the plan of a mixture (`epoch_segments`).

    Raises:
        LakeError: an unknown dataset or version; DataError: no datasets, or mixed sample sizes.
    """
    from ingest.lake import Lake

    if not datasets:
        raise DataError("no training data: pass --dataset NAME[@VERSION] (or set data.datasets in the config)")
    lake = Lake(lake_uri)
    lake.check()
    plan = DataPlan(refs=[], digests={}, uris={}, size=0)
    for name in datasets:
        ref = lake.resolve(name)
        size = int(ref.record["size"])
        if plan.size and size != plan.size:
            raise DataError(f"{ref.ref} holds {size}px samples but {plan.refs[0]} holds {plan.size}px: mix one size")
        plan.size = size
        plan.resize = str(ref.record.get("resize", "cover"))
        plan.refs.append(ref.ref)
        plan.digests[ref.ref] = ref.record["manifest_sha256"]
        plan.uris[ref.ref] = lake.storage.uri(f"{ref.dataset}/versions/{ref.version:06d}.json")
        source = len(plan.refs) - 1
        plan.train += [ShardInfo(s["uri"], int(s["count"]), int(s["bytes"]), source) for s in lake.shards(ref, "train")]
        plan.val += [ShardInfo(s["uri"], int(s["count"]), int(s["bytes"]), source) for s in lake.shards(ref, "val")]
    if weights is not None:
        if len(plan.refs) != len(set(plan.refs)):
            raise DataError(f"a mixture names one dataset version twice ({', '.join(plan.refs)}): give it one weight")
        empty = [ref for index, ref in enumerate(plan.refs) if not any(s.source == index for s in plan.train)]
        if empty:
            raise DataError(f"{', '.join(empty)} has no training samples to draw its share of the mixture from")
        plan.weights = [float(w) for w in weights]
        plan.epoch_samples = epoch_samples
    return plan


def resolve_config_data(data, datasets: list[str] | None = None) -> DataPlan:
    """The plan of a run's `DataConfig` (`pipeline.config`): its datasets, and with `data.mix` their weights.
    `datasets` replaces the names with pinned versions (a resumed run's), in the same order."""
    weights = list(data.mix.values()) if data.mix else None
    return resolve_data(datasets or data.datasets, data.lake, weights, data.epoch_samples)


def steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    return total // (world_size * batch_size)


def rank_batches(global_batch: int, world_size: int) -> list[int]:
    """Each rank's share of one global batch: equal when the worker count divides it, else the first ranks take one
    sample more (an elastic group of any size; the trainer weights each rank's loss so the update is the global
    batch's mean)."""
    base, extra = divmod(global_batch, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


def _cut(segments: Iterable[Segment], begin: int, end: int) -> list[Segment]:
    """The parts of `segments` (laid end to end) that fall in the sample range [begin, end)."""
    parts = []
    offset = 0
    for segment in segments:
        low, high = max(begin, offset), min(end, offset + segment.length)
        if low < high:
            parts.append(Segment(segment.shard, segment.start + low - offset, segment.start + high - offset,
                                 segment.picks))  # fmt: skip
        offset += segment.length
        if offset >= end:
            break
    return parts


def _segments(shards: list[ShardInfo], order: Iterable[int], begin: int, end: int) -> list[Segment]:
    """The parts of `shards` (laid end to end in `order`) that fall in the sample range [begin, end)."""
    return _cut((Segment(shards[index], 0, shards[index].count) for index in order), begin, end)


@dataclass(frozen=True)
class Mixture:
    """How an epoch draws from several datasets: `weights` by `ShardInfo.source`, `samples` an epoch (None: all)."""

    weights: tuple[float, ...]
    samples: int | None = None


def epoch_segments(shards: list[ShardInfo], epoch: int, seed: int, global_batch: int,
                   mixture: Mixture | None = None) -> tuple[list[Segment], int]:  # fmt: skip
    """One training epoch in its global order and its step count, whatever the number of workers: the shards
    shuffled by seed and epoch, laid end to end (a `mixture`: `mixture_segments`), cut at a whole number of global
    batches.

    Raises:
        DataError: fewer samples than one global batch.
    """
    if mixture is not None:
        segments = mixture_segments(shards, epoch, seed, mixture)
        total = sum(segment.length for segment in segments)
    else:
        total = sum(s.count for s in shards)
    steps = total // global_batch
    if steps == 0:
        raise DataError(
            f"the training split has {total} samples, fewer than one global batch ({global_batch}): ingest more "
            "images or lower data.batch_size / data.global_batch_size"
        )
    if mixture is not None:
        return _cut(segments, 0, steps * global_batch), steps
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return _segments(shards, order, 0, steps * global_batch), steps


def mixture_quotas(counts: list[int], weights: tuple[float, ...], samples: int | None) -> list[int]:
    """Each dataset's samples in one epoch of `samples` (default: all datasets' samples) drawn in proportion to
    `weights`: the largest-remainder rounding, so they add up exactly."""
    total = samples or sum(counts)
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    quotas = np.floor(shares).astype(int)
    for index in np.argsort(-(shares - quotas), kind="stable")[: total - int(quotas.sum())]:
        quotas[index] += 1
    return [int(q) for q in quotas]


def mixture_segments(shards: list[ShardInfo], epoch: int, seed: int, mixture: Mixture) -> list[Segment]:
    """A mixture's epoch: each dataset contributes its quota (`mixture_quotas`), its shards shuffled by (seed, epoch,
    dataset, round) and laid end to end, going round again with a new shuffle while its quota is not reached (a
    smaller dataset repeats); the datasets' segments are then merged in proportion (each placed by how far through
    its dataset's quota it sits), so every part of the epoch, and every rank's range, mixes them as the weights say."""
    sources = range(len(mixture.weights))
    by_source = [[s for s in shards if s.source == source] for source in sources]
    quotas = mixture_quotas([sum(s.count for s in group) for group in by_source], mixture.weights, mixture.samples)
    placed = []
    for source, (group, quota) in enumerate(zip(by_source, quotas, strict=True)):
        drawn, round_number = 0, 0
        while drawn < quota and group:
            order = np.random.default_rng([seed, epoch, source, round_number]).permutation(len(group))
            for segment in _segments(group, order, 0, quota - drawn):
                placed.append(((drawn + segment.length / 2) / quota, source, segment))
                drawn += segment.length
            round_number += 1
    placed.sort(key=lambda item: (item[0], item[1]))
    return [segment for _, _, segment in placed]


@dataclass(frozen=True)
class RankEpoch:
    """One rank's part of a training epoch: its segments in read order from the step the current worker group
    began at (`first_step`), its samples a step (`batch`), and the epoch's steps (the same on every rank)."""

    segments: list[Segment]
    steps: int
    first_step: int
    batch: int
    generation: int  # how many times the epoch was re-split over another worker count (it seeds the shuffles)


def plan_rank_epoch(shards: list[ShardInfo], epoch: int, seed: int, global_batch: int, splits: list[tuple[int, int]],
                    rank: int, interleave: int, window: int, mixture: Mixture | None = None) -> RankEpoch:  # fmt: skip
    """This rank's part of a training epoch that ran on `splits`: [(worker count, the epoch's step it started at),
    ...], the first at step 0; the last is the worker group now running.

    The first group splits the epoch's global order into contiguous ranges, one per rank (`rank_batches` samples
    a step each). When the group changes size at step s, every old rank's samples not yet trained on (those of its
    shuffle window in progress that the window's seeded order had not reached, then the rest of its range) are
    laid end to end in rank order and split again over the new group. So whatever the sizes, every sample of the
    epoch is trained on exactly once, the epoch has the same number of steps, and all of it is a pure function of
    (seed, epoch, splits): a resume needs no list of what was read.
    """
    segments, steps = epoch_segments(shards, epoch, seed, global_batch, mixture)
    world, first_step = splits[0]
    ranges = _split(segments, [steps * b for b in rank_batches(global_batch, world)])
    for generation, (world, step) in enumerate(splits[1:], start=1):
        previous_world, previous_step = splits[generation - 1]
        left: list[Segment] = []
        for old_rank, (part, batch) in enumerate(zip(ranges, rank_batches(global_batch, previous_world), strict=True)):
            left += remaining_segments(part, interleave, (step - previous_step) * batch, window, seed, epoch, old_rank,
                                       generation - 1)  # fmt: skip
        ranges = _split(left, [(steps - step) * b for b in rank_batches(global_batch, world)])
        first_step = step
    batch = rank_batches(global_batch, splits[-1][0])[rank]
    return RankEpoch(ranges[rank], steps, first_step, batch, len(splits) - 1)


def plan_mixture(plan: DataPlan) -> Mixture | None:
    return Mixture(tuple(plan.weights), plan.epoch_samples) if plan.weights else None


def _split(segments: list[Segment], lengths: list[int]) -> list[list[Segment]]:
    bounds = np.cumsum([0, *lengths])
    return [_cut(segments, int(begin), int(end)) for begin, end in zip(bounds[:-1], bounds[1:], strict=True)]


def read_order(segments: list[Segment], interleave: int) -> list[tuple[int, int]]:
    """(segment index, position in it) of each sample in the order `read_segments` reads them."""
    order = []
    for first in range(0, len(segments), max(1, interleave)):
        group = segments[first : first + max(1, interleave)]
        positions = [segment.start for segment in group]
        for index in _round_robin(group):
            order.append((first + index, positions[index]))
            positions[index] += 1
    return order


def remaining_segments(segments: list[Segment], interleave: int, consumed: int, window: int, seed: int, epoch: int,
                       rank: int, generation: int = 0) -> list[Segment]:  # fmt: skip
    """The samples of one rank's `segments` that training has not reached after `consumed` samples: the rest of the
    shuffle window in progress (in the order of its seeded draw, `window_draws`) as segments with `picks`, then the
    segments' unread ends."""
    reads = read_order(segments, interleave)
    window_number, into = divmod(consumed, window)
    begin = window_number * window
    if begin >= len(reads):
        return []
    end = min(begin + window, len(reads))
    loose: dict[int, list[int]] = {}
    if into:
        order, _, _ = window_draws(seed, epoch, rank, window_number, end - begin, generation=generation)
        for read in sorted(begin + int(i) for i in order[into:]):
            index, position = reads[read]
            loose.setdefault(index, []).append(segments[index].sample(position))
    else:
        end = begin  # the window had not begun: all of it is left, in read order
    left = [Segment(segments[i].shard, 0, len(picks), tuple(picks)) for i, picks in sorted(loose.items())]
    read_counts = [0] * len(segments)
    for index, _ in reads[:end]:
        read_counts[index] += 1
    for segment, count in zip(segments, read_counts, strict=True):
        if segment.start + count < segment.stop:
            left.append(Segment(segment.shard, segment.start + count, segment.stop, segment.picks))
    return left


def plan_train_epoch(
    shards: list[ShardInfo], epoch: int, seed: int, rank: int, world_size: int, batch_size: int
) -> tuple[list[Segment], int]:
    """This rank's segments of one training epoch on an unchanging group of `world_size` workers of `batch_size`
    each, and the epoch's step count (the same on every rank).

    Raises:
        DataError: fewer samples than one global batch.
    """
    part = plan_rank_epoch(shards, epoch, seed, world_size * batch_size, [(world_size, 0)], rank, 1, 1)
    return part.segments, part.steps


def plan_validation(shards: list[ShardInfo], rank: int, world_size: int) -> list[Segment]:
    """This rank's share of the validation split: contiguous, in order; every sample exactly once overall."""
    total = sum(s.count for s in shards)
    base, extra = divmod(total, world_size)
    begin = rank * base + min(rank, extra)
    return _segments(shards, range(len(shards)), begin, begin + base + (1 if rank < extra else 0))


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
    then holds up to K + readahead shards in memory (8 x 64 MB with the default 4). With a `cache`
    (`pipeline.shard_cache.ShardCache`), s3:// shards are read from (and fetched ahead into) the node's cache.
    """
    interleave = max(1, interleave)
    groups = [segments[i : i + interleave] for i in range(0, len(segments), interleave)]
    pending = []  # (group, sample order within it, start offsets)
    for group in groups:
        total = sum(segment.length for segment in group)
        if skip >= total:
            skip -= total
            continue
        order = _round_robin(group)
        offsets = [segment.start for segment in group]
        for index in order[:skip]:
            offsets[index] += 1
        pending.append((group, order[skip:], offsets))
        skip = 0
    # Segments that the skip used up (inside a group it entered) are not opened.
    uris = [
        segment.shard.uri
        for group, _, offsets in pending
        for segment, start in zip(group, offsets, strict=True)
        if start < segment.stop
    ]
    fetch = fetch_shard
    if cache is not None and uris and uris[0].startswith("s3://") and opener is open_shard:
        sizes = {segment.shard.uri: segment.shard.size for segment in segments}
        opener = fetch = lambda uri: cache.open(uri, sizes[uri])  # noqa: E731 - one function, two roles
        readahead = readahead if readahead is not None else min(max(2, interleave), 8)
    if readahead is None:
        readahead = min(max(2, interleave), 8) if uris and uris[0].startswith("s3://") and opener is open_shard else 0
    openers = _open_ahead(uris, opener, readahead, fetch)
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


def _nothing() -> Iterator:
    yield from ()


def _round_robin(group: list[Segment]) -> list[int]:
    """Which segment of `group` each sample comes from, in read order: one from each in turn."""
    longest = max((segment.length for segment in group), default=0)
    return [i for turn in range(longest) for i, segment in enumerate(group) if turn < segment.length]


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
            for position, sample in enumerate(iter_samples(stream)):
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
                 loader_workers: int = 1, cache=None, generation: int = 0) -> Iterator[np.ndarray]:  # fmt: skip
    """Decode, shuffle within windows, flip, rotate (within +-`rotate` degrees; 0: never), a window at a time: one
    contiguous uint8 array (n, 3, size, size) per shuffle window. Corrupt samples are replaced by a good one of the
    same window (and counted), so the rank still yields exactly as many samples as planned. Every draw comes from
    the window's seeded generator: a resumed epoch repeats them.

    With `loader_workers` N > 1, N threads each take a whole window (checksums, decoding, the shuffle, flips and
    rotations, written into the window's array: zlib, numpy and PIL release the GIL for that work) while this
    thread reads the next ones, and the windows come back in their order: the samples are the same, in the same
    order, whatever N. Up to N windows are in flight (N x `shuffle_window` samples in memory)."""

    def work(number: int, items: list[tuple]):
        start = skip_in_window if number == first_window else 0
        return _window_block(items, size, seed, epoch, rank, number, start, flip, rotate, generation)

    jobs = enumerate(windows(raw, window), start=first_window)
    for records, block, first_shard in ordered_map(work, jobs, loader_workers):
        for record in records:
            if cache is not None and not record[2] and record[0].startswith("s3://"):
                cache.drop(record[0])  # maybe damaged on this disk: the next epoch fetches it again
            counter.record(*record)
        if block is None:
            raise DataError(f"a whole window of {len(records)} samples was corrupt (first shard: {first_shard})")
        yield block


def _window_block(items: list[tuple], size: int, seed: int, epoch: int, rank: int, number: int, start: int,
                  flip: bool, rotate: float, generation: int = 0):  # fmt: skip
    """One window's samples in training order from `start` on: ([(uri, key, ok)], one array of them or None when
    every sample is corrupt, the first item's shard)."""
    arrays, records = [], []
    for item in items:
        array = decode_sample(verified(item), size)
        records.append((item[0], item[1], array is not None))
        arrays.append(array)
    good = [a for a in arrays if a is not None]
    if not good:
        return records, None, items[0][0]
    arrays = [a if a is not None else good[i % len(good)] for i, a in enumerate(arrays)]
    order, flips, angles = window_draws(seed, epoch, rank, number, len(arrays), rotate, generation)
    block = np.empty((len(arrays) - start, 3, size, size), dtype=np.uint8)
    for out, position in enumerate(range(start, len(arrays))):
        array = arrays[order[position]]
        if angles is not None:
            array = rotate_lab8(array[:, :, ::-1] if flip and flips[position] else array, float(angles[position]))
        elif flip and flips[position]:
            array = array[:, :, ::-1]
        block[out] = array  # one copy: the flip is a view until here
    return records, block, items[0][0]


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


def window_draws(seed: int, epoch: int, rank: int, number: int, size: int, rotate: float = 0.0, generation: int = 0):
    """The seeded draws of one shuffle window: its order, its flips and (with `rotate`) its angles. `generation`:
    the worker group of the epoch (`plan_rank_epoch`); the first one's draws are seeded as they always were."""
    rng = np.random.default_rng([seed, epoch, rank, number] + ([generation] if generation else []))
    order = rng.permutation(size)
    flips = rng.random(size) < 0.5
    angles = rng.uniform(-rotate, rotate, size) if rotate else None  # after the flips: they stay as they were
    return order, flips, angles


def epoch_keys(
    plan: DataPlan, epoch: int, seed: int, rank: int, world_size: int, batch_size: int, shuffle_window: int,
    interleave: int = 4, opener: Callable = open_shard,
) -> list[str]:  # fmt: skip
    """The sample keys of one rank's epoch in the order training sees them (what a batch mixes; benchmarks)."""
    segments, steps = plan_train_epoch(plan.train, epoch, seed, rank, world_size, batch_size)
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


def train_batches(
    plan: DataPlan,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    shuffle_window: int,
    flip: bool,
    start_step: int = 0,
    max_bad_fraction: float = 0.01,
    opener: Callable = open_shard,
    rotate: float = 0.0,
    interleave: int = 4,
    loader_workers: int = 1,
    cache=None,
    global_batch: int | None = None,
    splits: list[tuple[int, int]] | None = None,
) -> tuple[Iterator[np.ndarray], int, BadSampleCounter]:
    """One epoch of uint8 Lab batches (batch, 3, H, W) for this rank, from the epoch's step `start_step` on, read from
    `interleave` shards at a time, checked, decoded and augmented by `loader_workers` threads (`train_blocks`).

    `global_batch` (default `world_size * batch_size`) is split over the ranks by `rank_batches` (`batch_size` is
    then unused); `splits` are the epoch's worker groups so far (`plan_rank_epoch`; default: this one from step 0).

    Returns:
        (batch iterator, steps in the epoch, the corrupt-sample counter).
    """
    global_batch = global_batch or world_size * batch_size
    part = plan_rank_epoch(plan.train, epoch, seed, global_batch, splits or [(world_size, 0)], rank, interleave,
                           shuffle_window, plan_mixture(plan))  # fmt: skip
    skip = (start_step - part.first_step) * part.batch
    first_window, skip_in_window = divmod(skip, shuffle_window)
    counter = BadSampleCounter(max_bad_fraction, (part.steps - part.first_step) * part.batch)
    raw = read_segments(part.segments, skip=first_window * shuffle_window, opener=opener, interleave=interleave,
                        verify=False, cache=cache)  # fmt: skip
    blocks = train_blocks(
        raw, plan.size, shuffle_window, seed, epoch, rank, first_window, skip_in_window, flip, counter, rotate,
        loader_workers, cache, part.generation,
    )  # fmt: skip
    return block_batches(blocks, part.batch), part.steps, counter


def validation_batches(
    plan: DataPlan,
    rank: int,
    world_size: int,
    batch_size: int,
    max_batches: int | None = None,
    opener: Callable = open_shard,
    counter: BadSampleCounter | None = None,
    cache=None,
) -> Iterator[np.ndarray]:
    """This rank's validation share, in order, in batches (the last may be smaller); corrupt samples skipped.

    Args:
        counter: counts what was read and skipped (and stops past its limit); default: no limit.
    """
    segments = plan_validation(plan.val, rank, world_size)
    counter = counter or BadSampleCounter(1.0, sum(s.length for s in segments))

    def decoded():
        for uri, key, data in read_segments(segments, opener=opener, cache=cache):
            array = decode_sample(data, plan.size)
            counter.record(uri, key, array is not None)
            if array is not None:
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
