"""Shard ownership (`data.shard_ownership`): each rank reads the same shards every epoch, in another order, so a
node's shard cache holds them from epoch 2 on; epochs stay exact (same steps on every rank, no sample twice, less
than one global batch left out) for plain lakes and mixtures."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_data import ids_of, make_plan, write_shards

from pipeline.data.batches import LoaderOptions, train_batches
from pipeline.data.epochs import Mixture, mixture_quotas, owned_parts, plan_rank_epoch, rank_batches
from pipeline.data.plan import ShardInfo
from pipeline.data.shard_cache import ShardCache

COUNTS = [64] * 30 + [17, 40, 5, 64, 33, 64, 9]  # 37 shards, 2,032 samples: the uneven last shards of ingests


def fake_shards(counts: list[int], source: int = 0, prefix: str = "s3://lake/train") -> list[ShardInfo]:
    return [ShardInfo(f"{prefix}-{source}-{n:06d}.tar", count, source=source) for n, count in enumerate(counts)]


def samples(segments) -> list[tuple[str, int]]:
    return [(s.shard.uri, s.sample(p)) for s in segments for p in range(s.start, s.stop)]


def epoch(shards, number: int, world: int, global_batch: int, owned: bool, mixture=None):
    parts = [plan_rank_epoch(shards, number, 5, global_batch, [(world, 0)], rank, 4, 64, mixture, owned)
             for rank in range(world)]  # fmt: skip
    return parts


@pytest.mark.parametrize("world, global_batch", [(4, 16), (3, 16), (8, 64), (1, 16)])
def test_each_rank_reads_the_same_shards_every_epoch_in_another_order(world, global_batch) -> None:
    shards = fake_shards(COUNTS)
    total = sum(COUNTS)
    first = None
    for number in range(4):
        parts = epoch(shards, number, world, global_batch, owned=True)
        steps = total // global_batch
        assert {part.steps for part in parts} == {steps}
        drawn = [samples(part.segments) for part in parts]
        for rank, rank_samples in enumerate(drawn):
            assert len(rank_samples) == steps * rank_batches(global_batch, world)[rank]  # DDP cannot hang
        flat = [s for rank_samples in drawn for s in rank_samples]
        assert len(set(flat)) == len(flat), "a sample twice in one epoch"
        assert total - len(flat) < global_batch  # less than one global batch sits out
        owned = [{uri for uri, _ in rank_samples} for rank_samples in drawn]
        if first is None:
            first, first_order = owned, drawn
            assert set().union(*owned) == {s.uri for s in shards} or world * 64 > total
        else:
            # The same shards (a sample or so left out at the edges may differ), in another order.
            for rank in range(world):
                assert owned[rank] <= first[rank]
                assert len(owned[rank]) >= len(first[rank]) - 1
            assert drawn != first_order
    if world > 1:
        assert all(not (first[a] & first[b]) or len(first[a] & first[b]) <= 1  # a shard cut in two at a part's edge
                   for a in range(world) for b in range(a + 1, world))  # fmt: skip


def node_shards(parts, ranks) -> set[str]:
    return {uri for rank in ranks for uri, _ in samples(parts[rank].segments)}


def test_a_node_reads_no_shard_in_epoch_2_that_it_did_not_read_in_epoch_1() -> None:
    shards = fake_shards(COUNTS)
    nodes = [range(0, 2), range(2, 4)]  # 4 ranks on 2 nodes: Ray Train numbers a node's ranks together
    for owned, expect_new in ((True, False), (False, True)):
        one, two = epoch(shards, 0, 4, 16, owned), epoch(shards, 1, 4, 16, owned)
        new = [node_shards(two, ranks) - node_shards(one, ranks) for ranks in nodes]
        assert any(new) == expect_new, (owned, new)  # drawn over all ranks, a node reads shards it never cached


def test_mixtures_draw_each_ranks_quota_from_its_own_shards() -> None:
    shards = fake_shards([50] * 12, source=0) + fake_shards([30] * 5, source=1)  # 600 and 150 samples
    mixture = Mixture((0.5, 0.5), 480)
    by_epoch = [epoch(shards, number, 4, 16, True, mixture) for number in range(3)]
    groups = [[s for s in shards if s.source == source] for source in (0, 1)]
    own = [set() for _ in range(4)]
    for source, group in enumerate(groups):  # the parts owned_ranges cuts (the run's seed 5, plus the dataset)
        for rank, part in enumerate(owned_parts(group, 5 + source, rank_batches(16, 4))):
            own[rank] |= {segment.shard.uri for segment in part}
    for parts in by_epoch:
        for rank, part in enumerate(parts):
            assert part.steps == 480 // 16
            drawn = samples(part.segments)
            assert len(drawn) == part.steps * 4
            sources = Counter(uri.split("-")[1] for uri, _ in drawn)
            assert sources["0"] == sources["1"] == part.steps * 2  # half and half on every rank
            # The smaller dataset repeats (150 samples for a quota of 240): still only from this rank's own shards.
            assert {uri for uri, _ in drawn} <= own[rank]


def test_a_dataset_smaller_than_the_group_falls_back_to_the_shared_draw() -> None:
    shards = fake_shards([2, 1])  # 3 samples, 4 ranks: some part would be empty
    owned = epoch(shards, 0, 4, 1, True)
    assert [samples(p.segments) for p in owned] == [samples(p.segments) for p in epoch(shards, 0, 4, 1, False)]


@pytest.mark.s3
def test_two_nodes_caches_read_nothing_from_the_store_in_epoch_2(s3_env, tmp_path) -> None:
    # Real shards on a real S3 server and two node caches (each can hold the whole lake): the loader's own path.
    written = write_shards(s3_env.bucket_dir / "lake", [24, 24, 24, 24, 24, 24, 16, 8])
    plan = make_plan([ShardInfo(f"s3://{s3_env.bucket}/lake/{Path(s.uri).name}", s.count, os.path.getsize(s.uri))
                      for s in written])  # fmt: skip
    lake_bytes = sum(s.size for s in plan.train)
    caches = [ShardCache(tmp_path / f"node{n}", 2 * lake_bytes) for n in range(2)]
    store_by_epoch, trained = [], []
    for number in range(3):
        ids = []
        for rank in range(4):
            options = LoaderOptions(global_batch=16, shuffle_window=8, interleave=2, owned_shards=True)
            batches, _, _ = train_batches(plan, number, 3, rank, 4, options, cache=caches[rank // 2])
            ids += ids_of(list(batches))
        trained.append(ids)
        store_by_epoch.append([cache.stats.take()[0] for cache in caches])
    assert all(len(set(ids)) == len(ids) == 160 for ids in trained)  # 168 samples, 10 steps of 16
    assert 0 < sum(store_by_epoch[0]) <= lake_bytes + max(s.size for s in plan.train)  # shards cut in two: twice
    assert store_by_epoch[1] == [0, 0] and store_by_epoch[2] == [0, 0]
    assert trained[1] != trained[0]  # another order every epoch


def test_the_order_is_the_same_whatever_the_loader_workers(tmp_path) -> None:
    plan = make_plan(write_shards(tmp_path / "lake", [20, 13, 20, 7, 20]))
    for start in (0, 3):
        got = []
        for workers in (1, 3):
            options = LoaderOptions(global_batch=8, shuffle_window=6, interleave=2, loader_workers=workers,
                                    owned_shards=True)  # fmt: skip
            batches, _, _ = train_batches(plan, 2, 9, 1, 2, options, start_step=start)
            got.append(list(batches))
        assert len(got[0]) == len(got[1]) > 0
        for a, b in zip(*got, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_mixture_whose_quotas_fit_never_repeats_a_sample_within_an_epoch() -> None:
    # Each rank's quotas are rounded on their own; where a dataset's epoch quota fits in it, the rounding must not
    # make a rank draw more of it than it owns (a repeat). Found by review: 13 and 57 samples, weights 1 and 3.
    rng = np.random.default_rng(0)
    cases = [([13], [57], (1.0, 3.0), 5, 24)]
    for _ in range(300):
        world = int(rng.integers(1, 6))
        cases.append(([int(c) for c in rng.integers(world, 40, rng.integers(1, 4))],
                      [int(c) for c in rng.integers(world, 40, rng.integers(1, 4))],
                      tuple(float(w) for w in rng.integers(1, 5, 2)), world, int(rng.integers(world, 30))))  # fmt: skip
    checked = 0
    for first, second, weights, world, global_batch in cases:
        shards = fake_shards(first, source=0) + fake_shards(second, source=1)
        counts = [sum(first), sum(second)]
        if min(counts) < world or sum(counts) < global_batch:
            continue
        steps = sum(counts) // global_batch
        if any(want > count for want, count in zip(mixture_quotas(counts, weights, steps * global_batch), counts,
                                                         strict=True)):  # fmt: skip
            continue  # a dataset smaller than its quota repeats by design
        drawn = [s for part in epoch(shards, 0, world, global_batch, True, Mixture(weights)) for s in
                 samples(part.segments)]  # fmt: skip
        assert len(set(drawn)) == len(drawn), (first, second, weights, world, global_batch)
        checked += 1
    assert checked > 30
