"""Ray Train runs under faults: a checkpoint upload that fails once, a corrupt shard.

The runs are `fixtures.training`'s tiny deterministic setup. The run whose one upload fails and is retried is
`reference_run` (run U): it never restarts, so it is also the uninterrupted reference that `test_train_ray`'s resumed
runs must match (a corrupt latest checkpoint is one of them). What the workers log is read back from the Ray session's
Ray Train application logs (one JSON record per line), where every worker's Python logging goes.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from fixtures.training import (
    BATCH,
    WORKERS,
    checkpoint_dirs,
    metric_recorder,
    starts,
    tiny_config,
    worker_log,
)

from pipeline.checkpoint import load_checkpoint
from pipeline.config import DataConfig
from pipeline.data.plan import DataError, resolve_data
from pipeline.train.driver import run_training

pytestmark = pytest.mark.slow  # on one xdist worker with the other readers of `reference_run` (SHARED)


# --- a checkpoint upload that fails once ----------------------------------------------------------------


def test_a_failed_checkpoint_upload_is_retried_without_restarting_the_workers(reference_run, ray_local) -> None:
    result, root, steps = reference_run.result, reference_run.root, reference_run.steps
    assert starts(root / "starts") == [0], "the workers were restarted"
    assert load_checkpoint(result.checkpoint)["position"]["global_step"] == steps == int(result.metrics["global_step"])
    run = reference_run.run
    retries = [m for m in worker_log(ray_local) if m.startswith(f"checkpoint upload to {run}/checkpoint_")]
    assert len(retries) == 1, retries
    assert "failed (attempt 1 of 4): injected fault at failpoint 'checkpoint_upload'; retrying in 1 s" in retries[0]
    # Every checkpoint is there and whole, the retried one (the first, step 2) included.
    kept = checkpoint_dirs(run)
    assert Path(retries[0].split()[3]) == kept[0]
    assert [load_checkpoint(path)["position"]["global_step"] for path in kept] == list(range(2, steps + 1, 2))


# --- a corrupt shard ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corrupt_lake(train_lake, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A copy of the train lake in which the first sample of each of two training shards holds zeros, not a Lab array.

    Two: one training sample may sit out the epoch (33 samples, 4 a step), not both. Returns (lake, {key: shard}).
    """
    lake, plan = train_lake
    copy = tmp_path_factory.mktemp("corrupt-lake") / "lake"
    shutil.copytree(lake, copy)  # real copies: the original's shards may be hard links to ingest's files
    corrupt = {}
    for original in plan.train[:2]:
        shard = copy / Path(original.uri).relative_to(lake)
        with tarfile.open(shard) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".lab.npy"))
        data = bytearray(shard.read_bytes())
        data[member.offset_data : member.offset_data + member.size] = b"\x00" * member.size
        shard.unlink()
        shard.write_bytes(bytes(data))
        corrupt[member.name.partition(".")[0]] = str(shard)
    assert [s.uri for s in resolve_data(["photos"], str(copy)).train[:2]] == list(corrupt.values())
    return str(copy), corrupt


def test_corrupt_samples_are_skipped_counted_and_named(corrupt_lake, quiet_env, ray_local, tmp_path) -> None:
    lake, corrupt = corrupt_lake
    data = DataConfig(datasets=["photos"], lake=lake, batch_size=BATCH, shuffle_window=8, max_bad_fraction=0.5)
    result = run_training(
        tiny_config(lake, tmp_path / "runs", "s", data=data), logger_factory=metric_recorder(tmp_path / "metrics")
    )
    steps = resolve_data(["photos"], lake).count("train") // (WORKERS * BATCH)
    assert int(result.metrics["global_step"]) == steps
    logged = [json.loads(line) for line in (tmp_path / "metrics").read_text().splitlines()]
    [bad] = [row["data/bad_samples"] for row in logged if "data/bad_samples" in row]  # one epoch, both ranks'
    assert bad == result.metrics["data/bad_samples"] >= 1
    messages = set(worker_log(ray_local))
    named = [key for key, shard in corrupt.items() if f"skipping corrupt sample {key} in shard {shard}" in messages]
    assert len(named) == bad


def test_too_many_corrupt_samples_stop_the_run_with_a_one_line_data_error(corrupt_lake, quiet_env, tmp_path) -> None:
    lake, corrupt = corrupt_lake
    with pytest.raises(DataError) as error:
        run_training(tiny_config(lake, tmp_path / "runs", "t", max_failures=0))  # data.max_bad_fraction 0.01
    message = str(error.value)
    assert "\n" not in message and "exceed data.max_bad_fraction=0.01; last: " in message, message
    assert any(f"last: {key} in {shard}. `recolor lake check NAME --deep`" in message for key, shard in corrupt.items())
