"""Which samples each DDP rank trains on, in what order: exact epochs on any number of workers, and mixtures.

Exact epochs. The manifest knows how many samples each shard holds, so the split is done on
sample counts, not on shard files: each epoch the shard order is shuffled (seeded by seed and
epoch) and laid end to end (a mixture: each dataset's share, merged in proportion), cut at a whole
number of global batches, and every rank takes its own contiguous range of `steps * its batch`
samples, `steps = total // global batch`. Every rank therefore runs the same number of steps
whatever the shard sizes (DDP cannot hang at an epoch's end), every sample is used at most once
per epoch, and less than one global batch sits out an epoch; which samples changes with the
shuffle. A range may start or end inside a shard, and with more ranks than shards several ranks
read one shard.

Shuffling. Within a rank's range, samples are read in order (`interleave` shards at a time, one
from each in turn) and shuffled in windows of `shuffle_window` samples with a generator seeded by
(seed, epoch, rank, window). Because the order is a pure function of those numbers, resuming
mid-epoch skips the samples already trained on without decoding them: whole shards are not even
opened; and an epoch resumed on another number of workers knows, without any list, which samples
the old ranks had not reached (`plan_rank_epoch`).

Everything here is arithmetic on counts: no shard is opened (`pipeline.data.batches` reads the segments).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.data.plan import DataError, DataPlan, ShardInfo


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


def epoch_steps(total: int, global_batch: int) -> int:
    """An epoch's steps: whole global batches of its `total` samples.

    Raises:
        DataError: fewer samples than one global batch.
    """
    if total < global_batch:
        raise DataError(
            f"the training split has {total} samples, fewer than one global batch ({global_batch}): ingest more "
            "images or lower data.batch_size / data.global_batch_size"
        )
    return total // global_batch


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
    steps = epoch_steps(total, global_batch)
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
    by_source = [[Segment(s, 0, s.count) for s in shards if s.source == source] for source in sources]
    quotas = mixture_quotas([sum(s.length for s in group) for group in by_source], mixture.weights, mixture.samples)
    return _mix(by_source, quotas, [seed, epoch])


def _mix(groups: list[list[Segment]], quotas: list[int], key: list[int]) -> list[Segment]:
    """Each group's quota of samples, its segments shuffled (seeded by `key`, the group and the round) and laid end
    to end, round after round while the quota is not reached; the groups merged in proportion."""
    placed = []
    for source, (group, quota) in enumerate(zip(groups, quotas, strict=True)):
        drawn, round_number = 0, 0
        while drawn < quota and group:
            order = np.random.default_rng([*key, source, round_number]).permutation(len(group))
            for segment in _cut([group[i] for i in order], 0, quota - drawn):
                placed.append(((drawn + segment.length / 2) / quota, source, segment))
                drawn += segment.length
            round_number += 1
    placed.sort(key=lambda item: (item[0], item[1]))
    return [segment for _, _, segment in placed]


OWNERSHIP_KEY = 0x5EED0  # seeds the run's stable shard order (with the run's seed), apart from every epoch's draws


def owned_parts(shards: list[ShardInfo], seed: int, shares: list[int]) -> list[list[Segment]]:
    """The samples of `shards` cut into one part a rank, in proportion to `shares`, the same every epoch of the run:
    the shards in one order seeded by the run's seed alone, laid end to end and cut. A shard at a cut is read in two
    parts, each always by the same rank."""
    total = sum(s.count for s in shards)
    order = np.random.default_rng([seed, OWNERSHIP_KEY]).permutation(len(shards))
    sizes = mixture_quotas([], tuple(float(share) for share in shares), total) if total else [0] * len(shares)
    return _split(_segments(shards, order, 0, total), sizes)


def owned_ranges(shards: list[ShardInfo], epoch: int, seed: int, global_batch: int, world: int,
                 mixture: Mixture | None = None) -> tuple[list[list[Segment]], int] | None:  # fmt: skip
    """Each rank's samples of an epoch when ranks own their shards (`data.shard_ownership`): rank r reads only its
    part (`owned_parts`), whatever the epoch, its segments shuffled by (seed, epoch, r), cut to the epoch's steps
    times its batch; the samples left over (less than one global batch in all) change with each epoch's shuffle.
    A mixture draws each rank's quotas from its own part of each dataset, as `mixture_segments` does over all.

    Every rank still has the same number of steps and trains each sample at most once an epoch; every global batch
    still holds samples of every rank's part. Since a node's ranks read the same shards every epoch, its shard cache
    holds them from epoch 2 on. None when a dataset has fewer samples than ranks (some part would be empty).

    Raises:
        DataError: fewer samples than one global batch.
    """
    batches = rank_batches(global_batch, world)
    if mixture is None:
        groups = [shards]
        total = sum(s.count for s in shards)
    else:
        groups = [[s for s in shards if s.source == source] for source in range(len(mixture.weights))]
        total = mixture.samples or sum(s.count for s in shards)
    if any(sum(s.count for s in group) < world for group in groups):
        return None
    steps = epoch_steps(total, global_batch)
    parts = [owned_parts(group, seed + number, batches) for number, group in enumerate(groups)]
    if mixture is not None:
        quotas = [mixture_quotas([], mixture.weights, steps * batch) for batch in batches]
        counts = [sum(s.count for s in group) for group in groups]
        wanted = mixture_quotas(counts, mixture.weights, steps * global_batch)  # the epoch's draw of each dataset
        fitting = [want <= count for want, count in zip(wanted, counts, strict=True)]  # no repeat meant
        for rank, rank_quotas in enumerate(quotas):
            sizes = [sum(segment.length for segment in group_parts[rank]) for group_parts in parts]
            _fit_quotas(rank_quotas, sizes, fitting)
    ranges = []
    for rank, batch in enumerate(batches):
        key = [seed, epoch, OWNERSHIP_KEY, rank]
        if mixture is None:
            own = parts[0][rank]
            order = np.random.default_rng(key).permutation(len(own))
            ranges.append(_cut([own[i] for i in order], 0, steps * batch))
        else:
            ranges.append(_mix([group_parts[rank] for group_parts in parts], quotas[rank], key))
    return ranges, steps


def _fit_quotas(quotas: list[int], sizes: list[int], fitting: list[bool]) -> None:
    """A rank's quotas (in place) where rounding gave a dataset that fits its epoch quota more samples than this
    rank owns of it: the excess goes to the datasets with room left on this rank, so no sample repeats within an
    epoch that was not meant to (a dataset smaller than its quota repeats as in `mixture_segments`). The rank's
    total is kept."""
    for source, fits in enumerate(fitting):
        while fits and quotas[source] > sizes[source]:
            room = [(sizes[other] - quotas[other], other) for other in range(len(quotas))
                    if other != source and quotas[other] < sizes[other]]  # fmt: skip
            if not room:
                return
            space, other = max(room)
            moved = min(quotas[source] - sizes[source], space)
            quotas[source] -= moved
            quotas[other] += moved


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
                    rank: int, interleave: int, window: int, mixture: Mixture | None = None,
                    owned: bool = False) -> RankEpoch:  # fmt: skip
    """This rank's part of a training epoch that ran on `splits`: [(worker count, the epoch's step it started at),
    ...], the first at step 0; the last is the worker group now running.

    The first group splits the epoch's global order into contiguous ranges, one per rank (`rank_batches` samples
    a step each). When the group changes size at step s, every old rank's samples not yet trained on (those of its
    shuffle window in progress that the window's seeded order had not reached, then the rest of its range) are
    laid end to end in rank order and split again over the new group. So whatever the sizes, every sample of the
    epoch is trained on exactly once, the epoch has the same number of steps, and all of it is a pure function of
    (seed, epoch, splits): a resume needs no list of what was read.

    With `owned`, the first group's ranks read the shards they own (`owned_ranges`): the same every epoch, for the
    node's shard cache. A group that changes size mid-epoch re-splits what is left as above; the next epoch's
    ownership is drawn for the new size.
    """
    world, first_step = splits[0]
    owned_plan = owned_ranges(shards, epoch, seed, global_batch, world, mixture) if owned else None
    if owned_plan is not None:
        ranges, steps = owned_plan
    else:
        segments, steps = epoch_segments(shards, epoch, seed, global_batch, mixture)
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


class ReadGroup(NamedTuple):
    """Up to `interleave` consecutive segments of a rank, read together, a sample from each in turn."""

    segments: list[Segment]
    first: int  # the index of its first segment among the rank's segments
    order: list[int]  # which of `segments` each sample still to read comes from, in read order
    offsets: list[int]  # the first position still to read of each of `segments`


def read_stream(segments: list[Segment], interleave: int, skip: int = 0) -> list[ReadGroup]:
    """The one definition of the order a rank reads its samples in: `segments` taken `interleave` at a time, a
    sample from each in turn (`round_robin`; a shorter segment drops out when done), the groups one after another.
    The groups left after the first `skip` samples, with what of each is left.

    The threads (`reading.read_segments`), every loader process (`loader_processes.owned_items`) and the elastic
    re-split of an epoch (`read_order`, `remaining_segments`) all read it from here: it is a pure function of its
    arguments, so they agree on every sample's place, and a resume skips exactly."""
    interleave = max(1, interleave)
    groups = []
    for first in range(0, len(segments), interleave):
        group = segments[first : first + interleave]
        total = sum(segment.length for segment in group)
        if skip >= total:
            skip -= total
            continue
        order = round_robin(group)
        offsets = [segment.start for segment in group]
        for index in order[:skip]:
            offsets[index] += 1
        groups.append(ReadGroup(group, first, order[skip:], offsets))
        skip = 0
    return groups


def read_order(segments: list[Segment], interleave: int) -> list[tuple[int, int]]:
    """(segment index, position in it) of each sample in the order it is read (`read_stream`)."""
    order = []
    for group in read_stream(segments, interleave):
        positions = list(group.offsets)
        for index in group.order:
            order.append((group.first + index, positions[index]))
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
    shards: list[ShardInfo], epoch: int, seed: int, rank: int, world_size: int, batch_size: int, owned: bool = False
) -> tuple[list[Segment], int]:
    """This rank's segments of one training epoch on an unchanging group of `world_size` workers of `batch_size`
    each, and the epoch's step count (the same on every rank).

    Raises:
        DataError: fewer samples than one global batch.
    """
    part = plan_rank_epoch(shards, epoch, seed, world_size * batch_size, [(world_size, 0)], rank, 1, 1, owned=owned)
    return part.segments, part.steps


def plan_validation(shards: list[ShardInfo], rank: int, world_size: int) -> list[Segment]:
    """This rank's share of the validation split: contiguous, in order; every sample exactly once overall."""
    total = sum(s.count for s in shards)
    base, extra = divmod(total, world_size)
    begin = rank * base + min(rank, extra)
    return _segments(shards, range(len(shards)), begin, begin + base + (1 if rank < extra else 0))


def round_robin(group: list[Segment]) -> list[int]:
    """Which segment of `group` each sample comes from, in read order: one from each in turn."""
    longest = max((segment.length for segment in group), default=0)
    return [i for turn in range(longest) for i, segment in enumerate(group) if turn < segment.length]


def window_draws(seed: int, epoch: int, rank: int, number: int, size: int, rotate: float = 0.0, generation: int = 0):
    """The seeded draws of one shuffle window: its order, its flips and (with `rotate`) its angles. `generation`:
    the worker group of the epoch (`plan_rank_epoch`); the first one's draws are seeded as they always were."""
    rng = np.random.default_rng([seed, epoch, rank, number] + ([generation] if generation else []))
    order = rng.permutation(size)
    flips = rng.random(size) < 0.5
    angles = rng.uniform(-rotate, rotate, size) if rotate else None  # after the flips: they stay as they were
    return order, flips, angles
