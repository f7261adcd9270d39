"""Runs that cannot corrupt each other or themselves: one run of a name at a time, diverged losses stop the run
and are never registered, a resume stays on the data it began with, a run that goes on from a finished one says
so. Real Ray Train runs (two CPU workers, the tiny setup of `test_train_ray`) and `recolor train` processes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import test_train_ray as base
from mlflow import MlflowClient
from test_train_ray import tiny_config

from ingest.driver import IngestConfig, run_ingest
from ingest.errors import ConfigError
from pipeline.train.checkpoint_store import latest_recorded
from pipeline.train.driver import TrackingOptions, run_training
from pipeline.train.failures import NonFiniteLoss

pytestmark = pytest.mark.slow

quiet_env = base.quiet_env


@pytest.fixture
def own_lake(tmp_path, photo_writer) -> str:
    """A lake of its own (the pinning test grows it)."""
    photo_writer(tmp_path / "photos", range(40), width=80, height=64)
    lake = str(tmp_path / "lake")
    run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="photos", lake=lake, size=64,
                            shard_size=40_000, use_ray=False, progress=False))  # fmt: skip
    return lake


def tracking(tmp_path: Path) -> TrackingOptions:
    return TrackingOptions(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", model_name="colorizer")


def test_a_second_run_of_the_same_name_is_refused_in_seconds(own_lake, tmp_path, recolor, quiet_env,
                                                             ray_address) -> None:  # fmt: skip
    """`recolor train` parked at its first step holds the run; the same command again is refused with one line
    naming the running one, before Ray starts; once the first is over its lease is gone."""
    barrier = tmp_path / "barrier"
    args = ["train", Path(base.__file__).parents[2] / "configs" / "tiny.yaml", "--lake", own_lake, "--dataset",
            "photos", "--storage", tmp_path / "runs", "--name", "twice", "--no-tracking", "--workers", "1",
            "model.base_filters=4", "model.num_downs=6", "data.batch_size=2", "stages=[{name: gan, epochs: 1}]",
            "max_steps=2"]  # fmt: skip
    env = {"RECOLOR_FAILPOINT": "train_step:1@0:barrier", "RECOLOR_FAILPOINT_BARRIER": f"{barrier}:2",
           "RECOLOR_NO_PROGRESS": "1", "RAY_ADDRESS": ray_address}  # fmt: skip
    box: dict = {}
    first = threading.Thread(target=lambda: box.setdefault("r", recolor(*args, env=env, timeout=300)))
    first.start()
    deadline = time.monotonic() + 180
    while not (barrier.exists() and any(barrier.iterdir())):
        assert time.monotonic() < deadline and first.is_alive(), box
        time.sleep(0.1)
    started = time.monotonic()
    second = recolor(*args, env={"RECOLOR_NO_PROGRESS": "1"})
    assert time.monotonic() - started < 60  # refused before a cluster starts, not after the first finishes
    (barrier / "release").touch()
    first.join()
    assert second.returncode == 2, second.stderr
    assert "run 'twice' is already running (pid" in second.error_lines[-1]
    assert "train under another --name" in second.error_lines[-1]
    assert box["r"].returncode == 0, box["r"].stderr
    assert not (tmp_path / "runs" / "twice" / ".recolor-run.lease").exists()  # the first is over: the name is free


def test_diverged_losses_stop_the_run_keep_the_finite_checkpoint_and_register_nothing(
    ray_local, quiet_env, own_lake, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("RECOLOR_FAILPOINT", "loss_nan:3:flag")  # every rank's third step turns NaN
    config = tiny_config(own_lake, tmp_path / "runs", "nan", checkpoint_every=2, max_failures=0)
    expected = r"not finite at step 3 \(loss_D_fake=nan, .*latest checkpoint \(taken while they were finite\) is kept"
    with pytest.raises(NonFiniteLoss, match=expected + r". Lower stages.0.lr"):
        run_training(config, tracking=tracking(tmp_path))
    _, metrics = latest_recorded(str(tmp_path / "runs" / "nan"))
    assert metrics["global_step"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and "not finite" in run.data.tags["recolor.failure"]
    assert client.search_model_versions("name='colorizer'") == []


def test_a_resume_stays_on_its_dataset_versions_and_a_continued_run_is_linked(
    ray_local, quiet_env, own_lake, tmp_path, photo_writer, caplog
) -> None:
    first = run_training(tiny_config(own_lake, tmp_path / "runs", "pinned"), tracking=tracking(tmp_path))
    assert first.plan.refs == ["photos@1"] and str(first.model_version) == "1"
    photo_writer(tmp_path / "photos", range(40, 48), width=80, height=64)
    run_ingest(IngestConfig(kind="folder", source=str(tmp_path / "photos"), dataset="photos", lake=own_lake,
                            size=64, shard_size=40_000, use_ray=False, progress=False))  # fmt: skip

    # Asked for photos@2 by version: refused, naming both ways on.
    explicit = tiny_config(own_lake, tmp_path / "runs", "pinned", stages=[base.StageConfig(name="gan", epochs=2)])
    explicit.data.datasets = ["photos@2"]
    refusal = (
        r"run 'pinned' was trained on photos@1, and this command asks for photos@2: to train on that data "
        r"start a new run \(--dataset photos@2 --name NEW_NAME\); to go on with this one, pass --dataset photos@1"
    )
    with pytest.raises(ConfigError, match=refusal):
        run_training(explicit, tracking=tracking(tmp_path))

    # By name only: it goes on with photos@1, and says so.
    more = tiny_config(own_lake, tmp_path / "runs", "pinned", stages=[base.StageConfig(name="gan", epochs=2)])
    resumed = run_training(more, tracking=tracking(tmp_path))
    assert resumed.plan.refs == ["photos@1"]
    assert any("resumes on photos@1, the versions it started with (latest now: photos@2)" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    second = client.get_run(resumed.run_id)
    assert resumed.run_id != first.run_id
    assert second.data.tags["recolor.continues"] == first.run_id
    assert second.data.tags["mlflow.note.content"].startswith(f"Continues run {first.run_id} (FINISHED")
    assert second.data.tags["recolor.datasets"] == "photos@1"
