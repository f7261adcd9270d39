"""An epoch resumed on another number of workers trains every remaining sample exactly once (`plan_rank_epoch`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_data import SIZE, ids_of, make_plan, write_shards

from pipeline.data.batches import LoaderOptions, train_batches
from pipeline.data.epochs import epoch_segments, plan_rank_epoch, rank_batches, read_order, remaining_segments
from pipeline.data.reading import read_segments

COUNTS = [7, 1, 13, 4, 9, 11, 3]  # 48 samples


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return make_plan(write_shards(tmp_path_factory.mktemp("elastic"), COUNTS))


def run(plan, splits, global_batch, stop_steps, *, window=5, interleave=3, epoch=2, seed=11, owned=False):
    """The batches each group of `splits` trains: group k from its start step to `stop_steps[k]` (the next group's
    start; the last runs to the epoch's end). Returns {group: {rank: batches}} and the epoch's steps."""
    trained = {}
    steps = None
    for generation in range(len(splits)):
        world, start = splits[generation]
        stop = stop_steps[generation] if generation < len(stop_steps) else None
        trained[generation] = {}
        for rank in range(world):
            options = LoaderOptions(global_batch=global_batch, shuffle_window=window, interleave=interleave,
                                    owned_shards=owned)  # fmt: skip
            iterator, steps, _ = train_batches(plan, epoch, seed, rank, world, options, start, splits[: generation + 1])
            batches = list(itertools.islice(iterator, None if stop is None else stop - start))
            trained[generation][rank] = batches
    return trained, steps


def all_ids(trained) -> list[int]:
    return [i for group in trained.values() for batches in group.values() for i in ids_of(batches)]


@pytest.mark.parametrize(
    "splits, global_batch",
    [
        ([(2, 0), (1, 3)], 8),  # 2 workers stopped mid-window, resumed on 1
        ([(1, 0), (3, 2)], 6),  # 1 resumed on 3
        ([(2, 0), (4, 1), (1, 4)], 8),  # twice, the second inside the first re-split
        ([(3, 0), (2, 2)], 9),  # 9 over 2 workers: 5 and 4 a step
        ([(2, 0), (2, 0)], 8),  # a restart on as many workers at the epoch's first step
        ([(2, 0), (3, 5)], 8),  # at the epoch's last step... 48 // 8 = 6 steps: one left
    ],
)
@pytest.mark.parametrize("window, interleave", [(5, 3), (4, 1), (100, 2)])
@pytest.mark.parametrize("owned", [False, True], ids=["drawn-over-all", "owned-shards"])
def test_a_resized_epoch_trains_each_sample_once_and_keeps_its_steps(plan, splits, global_batch, window,
                                                                     interleave, owned) -> None:  # fmt: skip
    uninterrupted, steps = run(plan, [splits[0]], global_batch, [], window=window, interleave=interleave, owned=owned)
    expected = sorted(all_ids(uninterrupted))
    assert steps == sum(COUNTS) // global_batch
    stops = [step for _, step in splits[1:]]
    trained, resized_steps = run(plan, splits, global_batch, stops, window=window, interleave=interleave, owned=owned)
    assert resized_steps == steps
    got = all_ids(trained)
    assert sorted(got) == expected, "a sample was trained twice or not at all"
    # Every step of every group trained the global batch, split as rank_batches says.
    for generation, (world, start) in enumerate(splits):
        end = stops[generation] if generation < len(stops) else steps
        for rank, batches in trained[generation].items():
            assert len(batches) == end - start
            assert all(len(batch) == rank_batches(global_batch, world)[rank] for batch in batches)


def test_the_first_group_reads_as_an_unchanging_one_does(plan) -> None:
    # A run that never changes size sees the same samples in the same order, flips included, as before re-splits.
    for rank in range(2):
        fixed, _, _ = train_batches(plan, 1, 3, rank, 2, LoaderOptions(batch_size=4, shuffle_window=5, interleave=3))
        options = LoaderOptions(global_batch=8, shuffle_window=5, interleave=3)
        split, _, _ = train_batches(plan, 1, 3, rank, 2, options, splits=[(2, 0)])
        for a, b in zip(fixed, split, strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_remainder_of_a_window_is_what_its_draw_had_not_reached(plan) -> None:
    segments, _ = epoch_segments(plan.train, 0, 0, 8)
    reads = read_order(segments, 2)
    assert len(reads) == 48
    for consumed in (0, 3, 5, 7, 10, 47, 48):
        left = remaining_segments(segments, 2, consumed, 5, 0, 0, 0)
        assert sum(s.length for s in left) == 48 - consumed
        picked = [(s.shard.uri, s.sample(p)) for s in left for p in range(s.start, s.stop)]
        assert len(set(picked)) == len(picked)


@pytest.mark.parametrize("interleave", [1, 2, 3, 5])
def test_the_read_order_the_re_split_uses_is_the_order_the_samples_are_read_in(plan, interleave) -> None:
    """`read_order` (the elastic re-split's) and `read_segments` (the threads' and, by `EpochStream`, the loader
    processes') both come from `read_stream`: sample for sample the same, from any skip."""
    segments, _ = epoch_segments(plan.train, 1, 0, 8)
    alone = [[key for _, key, _ in read_segments([segment])] for segment in segments]  # each segment by itself
    expected = []  # written out here: `interleave` segments at a time, a sample from each in turn
    for first in range(0, len(segments), interleave):
        group = alone[first : first + interleave]
        for turn in range(max(len(keys) for keys in group)):
            expected += [keys[turn] for keys in group if turn < len(keys)]
    ordered = [alone[index][position - segments[index].start] for index, position in read_order(segments, interleave)]
    assert ordered == expected
    for skip in (0, 1, 7, len(expected) - 1):
        got = [key for _, key, _ in read_segments(segments, skip=skip, interleave=interleave)]
        assert got == expected[skip:]


def test_uneven_rank_batches_add_up() -> None:
    assert rank_batches(9, 2) == [5, 4]
    assert rank_batches(8, 3) == [3, 3, 2]
    assert sum(rank_batches(64, 7)) == 64


def test_the_split_is_a_pure_function_of_seed_epoch_and_groups(plan) -> None:
    a = plan_rank_epoch(plan.train, 4, 9, 8, [(2, 0), (3, 2)], 1, 3, 5)
    b = plan_rank_epoch(plan.train, 4, 9, 8, [(2, 0), (3, 2)], 1, 3, 5)
    assert a == b and a.first_step == 2 and a.generation == 1 and a.batch == 3
    assert SIZE == 8
