"""Weighted mixtures of datasets (`data.mix`): exact, deterministic, resumable epochs drawn in proportion."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from test_data import SIZE, ids_of, write_shards

from ingest.errors import ConfigError
from pipeline.config import DataConfig
from pipeline.data.batches import LoaderOptions, train_batches
from pipeline.data.epochs import Mixture, epoch_segments, mixture_quotas, plan_rank_epoch
from pipeline.data.plan import DataPlan, ShardInfo


def synthetic(counts: list[list[int]]) -> list[ShardInfo]:
    """Shards (no files) of each dataset: counts[source] are its shards' sample counts."""
    return [ShardInfo(f"s{source}-{n}", count, None, source) for source, group in enumerate(counts)
            for n, count in enumerate(group)]  # fmt: skip


def drawn(segments) -> Counter:
    return Counter({source: sum(s.length for s in segments if s.shard.source == source) for source in range(3)})


@pytest.mark.parametrize("weights, samples", [((0.8, 0.2), None), ((0.5, 0.3, 0.2), 3000), ((1, 1, 8), 1000)])
def test_an_epoch_draws_each_dataset_in_proportion_within_one_percent(weights, samples) -> None:
    shards = synthetic([[37] * 40, [23] * 11, [50] * 3][: len(weights)])
    mixture = Mixture(tuple(float(w) for w in weights), samples)
    segments, steps = epoch_segments(shards, 3, 5, 16, mixture)
    total = steps * 16
    assert total == (samples or sum(s.count for s in shards)) // 16 * 16
    counts = drawn(segments)
    for source, weight in enumerate(weights):
        assert abs(counts[source] / total - weight / sum(weights)) < 0.01, (counts, total)
    # Every rank's range mixes them too (the datasets' shards are merged in proportion, not laid one after another).
    # (At shard granularity: a dataset with a small share of big shards reaches some ranks only every few epochs.)
    largest = int(np.argmax(weights))
    for rank in range(4):
        part = plan_rank_epoch(shards, 3, 5, 16, [(4, 0)], rank, 4, 64, mixture).segments
        share = drawn(part)[largest] / sum(s.length for s in part)
        assert abs(share - weights[largest] / sum(weights)) < 0.15, (rank, share)


def test_quotas_add_up_exactly() -> None:
    assert mixture_quotas([100, 10], (0.8, 0.2), 1000) == [800, 200]
    assert sum(mixture_quotas([7, 7, 7], (1.0, 1.0, 1.0), 100)) == 100


def test_a_smaller_dataset_repeats_with_a_new_shuffle_each_time_round() -> None:
    shards = synthetic([[10] * 50, [10] * 5])  # 500 and 50 samples, drawn half and half: the small one 5 times over
    segments, _ = epoch_segments(shards, 0, 1, 10, Mixture((0.5, 0.5), 500))
    small = [s for s in segments if s.shard.source == 1]
    assert sum(s.length for s in small) == 250
    uses = Counter(s.shard.uri for s in small)
    assert set(uses.values()) == {5}  # every shard of it, equally often
    rounds = [[s.shard.uri for s in small][i : i + 5] for i in range(0, 25, 5)]
    assert all(sorted(r) == sorted(rounds[0]) for r in rounds) and len({tuple(r) for r in rounds}) > 1
    big = [s for s in segments if s.shard.source == 0]
    assert sum(s.length for s in big) == 250 and len({s.shard.uri for s in big}) == 25  # half of it, each once


def test_the_draw_is_a_pure_function_of_seed_and_epoch() -> None:
    shards = synthetic([[10] * 20, [7] * 3])
    mixture = Mixture((0.7, 0.3), 120)
    first, _ = epoch_segments(shards, 2, 9, 8, mixture)
    assert first == epoch_segments(shards, 2, 9, 8, mixture)[0]
    assert first != epoch_segments(shards, 3, 9, 8, mixture)[0]


@pytest.fixture(scope="module")
def mixed_plan(tmp_path_factory) -> DataPlan:
    folder = tmp_path_factory.mktemp("mix")
    big = write_shards(folder / "a", [9, 13, 7, 11, 10])  # ids 0..49
    small = [dataclasses.replace(s, source=1) for s in write_shards(folder / "b", [6, 4], first_id=1000)]  # 10
    return DataPlan(refs=["a@1", "b@1"], digests={}, uris={}, size=SIZE, train=big + small, weights=[0.6, 0.4],
                    epoch_samples=60)  # fmt: skip


def test_reading_a_mixture_trains_its_draw_and_a_resume_continues_it(mixed_plan) -> None:
    options = LoaderOptions(batch_size=4, shuffle_window=5, flip=False, interleave=3)
    full, steps, _ = train_batches(mixed_plan, 1, 4, 0, 1, options)
    full = list(full)
    assert steps == 15 and len(full) == 15
    ids = ids_of(full)
    from_small = [i for i in ids if i >= 1000]
    assert len(from_small) == 24 and len(ids) - len(from_small) == 36  # 0.4 and 0.6 of 60
    assert set(Counter(from_small).values()) <= {2, 3}  # 10 samples drawn 24 times: round after round
    assert len(set(i for i in ids if i < 1000)) == 36  # the larger one: no repeats
    for start in (3, 7, 14):  # a resume mid-epoch continues the same draw
        tail, _, _ = train_batches(mixed_plan, 1, 4, 0, 1, options, start_step=start)
        for got, expected in zip(tail, full[start:], strict=True):
            np.testing.assert_array_equal(got, expected)


def test_a_plan_with_weights_round_trips(mixed_plan) -> None:
    again = DataPlan.from_dict(mixed_plan.to_dict())
    assert again == mixed_plan and again.source(1).train == mixed_plan.train[5:]


def test_mix_config_names_the_bad_weight() -> None:
    config = DataConfig(mix={"imagenet": 0.8, "coco": 1})
    assert config.datasets == ["imagenet", "coco"] and config.mix == {"imagenet": 0.8, "coco": 1.0}
    with pytest.raises(ConfigError, match=r"data.mix.coco: the weight must be a positive number, got 0"):
        DataConfig(mix={"imagenet": 0.8, "coco": 0})
    with pytest.raises(ConfigError, match=r"data.epoch_samples sets the length of a mixture's epoch"):
        DataConfig(datasets=["a"], epoch_samples=100)
