"""Shards mix classes: ingest lays items into shards by a seeded permutation, and training reads several shards at
once, so a batch of 16 from an ImageNet-layout source holds many classes (a uniform shuffle: about 14.9 of 100)."""

from __future__ import annotations

import pytest
from fixtures.sources import build_imagenet

from ingest.driver import IngestConfig, run_ingest
from ingest.lake import Lake
from pipeline.data.batches import epoch_keys
from pipeline.data.plan import resolve_data

CLASSES = 100
PER_CLASS = 12
SIZE = 16
SAMPLE_BYTES = 3 * SIZE * SIZE + 1536  # what IngestConfig.images_per_chunk assumes


@pytest.fixture(scope="module")
def hundred_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet100")
    build_imagenet(root, {f"n{c:08d}": PER_CLASS for c in range(CLASSES)}, val_per_class=0, synsets=False)
    return root


def ingest(source, lake, order: str):
    config = IngestConfig(
        kind="imagenet", source=str(source), dataset="mixed", lake=str(lake), size=SIZE, order=order,
        val_fraction=0.1, shard_size=40 * SAMPLE_BYTES, use_ray=False, progress=False,
    )  # fmt: skip
    return run_ingest(config)


def mean_classes_per_batch(lake, world_size: int, interleave: int, batch: int = 16, window: int = 64,
                           owned: bool = False) -> float:  # fmt: skip
    plan = resolve_data(["mixed"], str(lake))
    manifest = Lake(str(lake)).manifest(Lake(str(lake)).resolve("mixed"))
    labels = dict(zip(manifest["key"].to_pylist(), manifest["label"].to_pylist(), strict=True))
    counts = []
    for rank in range(world_size):
        keys = epoch_keys(plan, 0, 7, rank, world_size, batch, window, interleave=interleave, owned=owned)
        counts += [len({labels[k] for k in keys[i : i + batch]}) for i in range(0, len(keys), batch)]
    return sum(counts) / len(counts)


@pytest.fixture(scope="module")
def lakes(hundred_classes, tmp_path_factory):
    made = {}
    for order in ("shuffled", "sorted"):
        lake = tmp_path_factory.mktemp(f"lake-{order}")
        summary = ingest(hundred_classes, lake, order)
        assert summary.ingested == CLASSES * PER_CLASS
        made[order] = lake
    return made


def test_shuffled_shards_give_batches_of_many_classes(lakes) -> None:
    record = Lake(str(lakes["shuffled"])).resolve("mixed").record
    assert len(record["shards"]["train"]) >= 20
    assert record["order"] == {"name": "shuffled", "method": "sha256(seed:uri)", "seed": 0}
    for world_size in (1, 2):
        for interleave in (1, 4):
            assert mean_classes_per_batch(lakes["shuffled"], world_size, interleave) >= 12
    # Ranks reading only the shards they own (data.shard_ownership, for the node cache) mix as many classes.
    for world_size in (2, 4):
        assert mean_classes_per_batch(lakes["shuffled"], world_size, 4, owned=True) >= 12


def test_path_sorted_shards_give_batches_of_few_classes(lakes) -> None:
    # The layout before the permutation, kept as --order sorted: what the test above guards against.
    assert Lake(str(lakes["sorted"])).resolve("mixed").record["order"]["name"] == "sorted"
    one_at_a_time = mean_classes_per_batch(lakes["sorted"], 1, interleave=1)
    interleaved = mean_classes_per_batch(lakes["sorted"], 1, interleave=4)
    assert one_at_a_time < 8 and one_at_a_time < interleaved < 12


def test_the_permutation_is_the_same_on_every_run(hundred_classes, lakes, tmp_path) -> None:
    again = tmp_path / "again"
    ingest(hundred_classes, again, "shuffled")
    first, second = (Lake(str(lake)) for lake in (lakes["shuffled"], again))
    rows = [lake.manifest(lake.resolve("mixed")).select(["key", "shard", "index_in_shard"]) for lake in (first, second)]
    assert rows[0].equals(rows[1])
