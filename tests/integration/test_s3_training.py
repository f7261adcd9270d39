"""Training that streams its lake from a real S3 server: at load through an outage, and when the newest checkpoint
vanishes behind the server's back.

Both use the session's local Ray and a test-owned `rclone serve s3` (`own_s3`) that the outage test stops and
restarts: two CPU workers (gloo) stream the epoch through the outage; the vanished checkpoint is read back by one
(what falls back is the run's resume, and a second worker would cost each of its runs about 6 CPU seconds).
Credentials reach the workers as training always sends them (a Ray object, never the runtime env).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fixtures.training import BATCH, metric_recorder, tiny_config, worker_log

from ingest.driver import IngestConfig, run_ingest
from ingest.lake import Lake
from pipeline.config import DataConfig, ModelConfig
from pipeline.data.plan import resolve_data
from pipeline.train.driver import run_training

pytestmark = pytest.mark.slow


def read_metrics(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


LOAD_IMAGES = 2000


def test_two_thousand_images_into_s3_then_an_epoch_streamed_by_two_workers_through_an_outage(
    ray_local, quiet_env, own_s3, photo_writer, tmp_path
) -> None:
    """Load and an outage in one run: 2000 photos ingested into S3 by Ray tasks, then one epoch streamed by two
    workers; at its third step the server stops, for at least 5 s and until a read has met the outage, and the reads
    wait it out: no sample counted corrupt, every step trained."""
    photo_writer(tmp_path / "photos", range(10_000, 10_000 + LOAD_IMAGES), width=40, height=32)
    lake_uri = "s3://faults/load"
    summary = run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="load", lake=lake_uri,
                                      size=32, use_ray=True, progress=False))  # fmt: skip
    assert summary.ingested == LOAD_IMAGES and summary.version == 1
    lake = Lake(lake_uri)
    manifest = lake.manifest(lake.resolve("load"))
    in_train = sum(1 for split in manifest.column("split").to_pylist() if split == "train")

    barrier = tmp_path / "barrier"
    # Rank 0 waits before its third step until the test has stopped the server; the rest of the epoch and its
    # validation then read shards while the server is down. It stays down until a worker has said it waits (the
    # epoch's one training shard may be read ahead whole before the outage: then the validation's read meets it),
    # at most 60 s, well inside the reads' 120 s.
    quiet_env.setenv("RECOLOR_FAILPOINT", "train_step:3@0:barrier")
    quiet_env.setenv("RECOLOR_FAILPOINT_BARRIER", f"{barrier}:2")

    def waits() -> int:
        return sum("retrying for up to 120 s" in message for message in worker_log(ray_local))

    waits_before = waits()  # the session's earlier runs may have waited out outages of their own

    def outage() -> None:
        deadline = time.monotonic() + 180
        while not (barrier.exists() and any(barrier.iterdir())):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        own_s3.stop()
        (barrier / "test").touch()
        stopped = time.monotonic()
        while time.monotonic() - stopped < 5.0 or (waits() == waits_before and time.monotonic() - stopped < 60):
            time.sleep(0.2)
        own_s3.start()

    batch, workers = 16, 2
    config = tiny_config(
        lake_uri,
        tmp_path / "runs",
        "load",
        model=ModelConfig(base_filters=4, num_downs=5),
        data=DataConfig(datasets=["load"], lake=lake_uri, batch_size=batch, shuffle_window=64),
        deterministic=False,
        log_every=20,
    )
    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        result = run_training(config, logger_factory=metric_recorder(tmp_path / "metrics.jsonl"))
    finally:
        quiet_env.delenv("RECOLOR_FAILPOINT")
        thread.join()
    messages = worker_log(ray_local)
    assert waits() > waits_before  # the outage was met, and waited out
    remainder = in_train % (batch * workers)  # the documented remainder: less than one global batch
    [epoch_end] = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "data/epoch_samples" in m]
    assert epoch_end["data/epoch_samples"] == in_train - remainder
    assert result.metrics["global_step"] == in_train // (batch * workers)
    assert epoch_end["data/bad_samples"] == 0  # an outage is waited out, never a corrupt sample
    assert any(
        f"trained on {in_train - remainder} of {in_train} training samples ({remainder} left out" in message
        for message in messages
    )


def test_the_newest_checkpoint_deleted_behind_the_servers_back_the_first_rerun_finishes(
    ray_local, quiet_env, own_s3, photo_writer, tmp_path
) -> None:
    """A disk cleanup on the S3 host removes the newest checkpoint's files: `rclone serve s3` still lists them and
    answers 500 for their bytes while it answers everything else. That is one object failing, not an outage: the
    rerun falls back to the checkpoint before, without waiting out the retry deadline, and finishes."""
    import shutil

    from ingest.faults import InjectedFault
    from pipeline.train.failures import TrainingError

    photo_writer(tmp_path / "photos", range(760, 800), width=80, height=64)
    lake = "s3://faults/lake"
    run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="photos", lake=lake, size=64,
                            shard_size=40_000, use_ray=False, progress=False))  # fmt: skip
    config = tiny_config(lake, "s3://faults/runs", "vanish", checkpoint_every=2, max_failures=0, workers=1)
    quiet_env.setenv("RECOLOR_FAILPOINT", "train_step:6:raise")
    with pytest.raises((TrainingError, InjectedFault)):
        run_training(config)
    quiet_env.delenv("RECOLOR_FAILPOINT")
    run_dir = own_s3.root / "faults" / "runs" / "vanish"
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) >= 2, list(run_dir.iterdir())
    shutil.rmtree(checkpoints[-1])  # behind the server's back
    started = time.monotonic()
    result = run_training(config)
    assert result.metrics["global_step"] == result.plan.count("train") // BATCH
    assert time.monotonic() - started < 100  # well inside the 120 s an outage is waited out (a bound, not a speed test)


def test_the_shard_cache_makes_epoch_two_read_nothing_from_s3(s3_env, photo_writer, tmp_path) -> None:
    """Training's input path over an S3 lake through the node cache: epoch 1 downloads the lake once, epoch 2 reads
    nothing from S3, and the batches are those the uncached path gives, with 1 or 3 loader workers."""
    import numpy as np

    from pipeline.data.batches import LoaderOptions, train_batches
    from pipeline.data.shard_cache import ShardCache

    photo_writer(tmp_path / "photos", range(800, 830), width=80, height=64)
    lake = f"s3://{s3_env.bucket}/lake"
    run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="photos", lake=lake, size=64,
                            shard_size=40_000, val_fraction=0.0, use_ray=False, progress=False))  # fmt: skip
    plan = resolve_data(["photos"], lake)
    lake_bytes = sum(shard.size for shard in plan.train)
    cache = ShardCache(tmp_path / "cache", 10 * lake_bytes)

    def epoch(number: int, cache=None, loader_workers: int = 1) -> list:
        options = LoaderOptions(batch_size=4, shuffle_window=8, loader_workers=loader_workers)
        return list(train_batches(plan, number, 0, 0, 1, options, cache=cache)[0])

    from pipeline.data.epochs import plan_train_epoch

    seen: set[str] = set()
    for number in (0, 1, 2):
        plain = epoch(number)
        cached = epoch(number, cache=cache, loader_workers=3)
        assert all(np.array_equal(a, b) for a, b in zip(plain, cached, strict=True))
        store, local = cache.stats.take()
        touched = {segment.shard for segment in plan_train_epoch(plan.train, number, 0, 0, 1, 4)[0]}
        new = {shard for shard in touched if shard.uri not in seen}
        # Only shards this node never read come from S3 (each shard once, ever); the rest from its disk.
        assert store == sum(shard.size for shard in new)
        assert local == sum(shard.size for shard in touched - new)
        seen |= {shard.uri for shard in touched}
        if number:
            assert local > 0


def test_a_cached_shard_damaged_on_the_nodes_disk_is_dropped_and_fetched_again(s3_env, photo_writer,
                                                                              tmp_path) -> None:  # fmt: skip
    """Same size, a changed byte (the node's disk, not the store): the sample is a corrupt one that epoch, the cached
    copy is dropped, and the next epoch fetches the shard again and reads it whole."""
    from pipeline.data.batches import LoaderOptions, train_batches
    from pipeline.data.shard_cache import ShardCache

    photo_writer(tmp_path / "photos", range(840, 852), width=80, height=64)
    lake = f"s3://{s3_env.bucket}/lake"
    run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="photos", lake=lake, size=64,
                            shard_size=10**6, val_fraction=0.0, use_ray=False, progress=False))  # fmt: skip
    plan = resolve_data(["photos"], lake)
    assert len(plan.train) == 1
    cache = ShardCache(tmp_path / "cache", 10**8)

    def epoch() -> int:
        options = LoaderOptions(batch_size=4, shuffle_window=4, flip=False, max_bad_fraction=0.5)
        batches, _, counter = train_batches(plan, 0, 0, 0, 1, options, cache=cache)
        list(batches)
        return counter.bad

    assert epoch() == 0
    (cached,) = (tmp_path / "cache").glob("*.tar")
    data = bytearray(cached.read_bytes())
    data[512 + 400] ^= 0xFF  # inside the first sample's array
    cached.write_bytes(bytes(data))
    cache.stats.take()
    assert epoch() == 1 and not cached.exists()  # counted, and the copy is gone
    assert epoch() == 0  # fetched again from S3: whole
    assert cache.stats.take()[0] == plan.train[0].size
