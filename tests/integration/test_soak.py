"""The soak of a long training run (see `soak.py`) with its run storage in a local folder.

`recolor train` runs as a real process that joins the session's Ray (`--ray-address`: the driver is not what is
killed here, a worker is; Ray's own start is `test_train_failures.py`'s). The lake is on a test-owned `rclone serve s3`,
so the outage reaches the workers' shard reads. The same soak with the run's storage on S3 (the outage reaching the
checkpoint uploads and Ray Train's run state too) is `test_stack.py`'s main job, a Ray job through the local stack:
the same checks, on the run the main job goes on to evaluate and colorize.
"""

from __future__ import annotations

import time

import pytest
import soak
from fixtures.training import REPO

from ingest.driver import IngestConfig, run_ingest
from ingest.lake import Lake

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def test_a_long_run_survives_rotation_a_killed_worker_and_an_outage_then_a_rerun_trains_nothing(
    own_s3, photo_writer, tmp_path, recolor, ray_address, mlflow_store
) -> None:
    from mlflow import MlflowClient

    photo_writer(tmp_path / "photos", range(3000, 3000 + soak.PHOTOS), width=80, height=64)
    lake = "s3://faults/lake"
    run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="soak", lake=lake, size=64,
                            shard_size=40_000, use_ray=False, progress=False))  # fmt: skip
    train_samples = Lake(lake).resolve("soak").record["counts"]["train"]
    storage = str(tmp_path / "runs")
    run_uri = f"{storage}/soak"

    tracking = mlflow_store(tmp_path)
    args = ["train", REPO / "configs" / "tiny.yaml", "--dataset", "soak", "--lake", lake, "--storage", storage,
            "--name", "soak", "--tracking-uri", tracking, "--ray-address", ray_address, *soak.OVERRIDES]  # fmt: skip
    env = soak.failpoint_env(tmp_path)
    outage = soak.Outage(run_uri, own_s3.stop, own_s3.start)
    try:
        result = recolor(*args, env=env, timeout=600)
        finished_at = time.monotonic()
    finally:
        outage.join()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    client = MlflowClient(tracking)
    marker = tmp_path / "killed-once"
    folders = soak.check_soaked_run(run_uri, train_samples, outage, finished_at, marker, client, "soak")
    soak.check_rerun(recolor(*args, env=env, timeout=300), run_uri, folders, client, "soak")
