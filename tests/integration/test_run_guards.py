"""A run that cannot corrupt itself: diverged losses stop the run and are never registered. A real Ray Train run
(two CPU workers, `fixtures.training`'s tiny setup).

The other guards ride on runs that other tests make anyway: one run of a name at a time and the freed name in
`test_train_failures.py`'s stopped run, a resume that stays on the data it began with and a run that goes on from a
finished one in its failing-worker run."""

from __future__ import annotations

import pytest
from fixtures.training import tiny_config
from mlflow import MlflowClient

from pipeline.train.checkpoint_store import latest_recorded
from pipeline.train.driver import TrackingOptions, run_training
from pipeline.train.failures import NonFiniteLoss

pytestmark = pytest.mark.slow


def test_diverged_losses_stop_the_run_keep_the_finite_checkpoint_and_register_nothing(
    ray_local, quiet_env, train_lake, tmp_path, monkeypatch, mlflow_store
) -> None:
    lake, _ = train_lake
    monkeypatch.setenv("RECOLOR_FAILPOINT", "loss_nan:3:flag")  # every rank's third step turns NaN
    config = tiny_config(lake, tmp_path / "runs", "nan", checkpoint_every=2, max_failures=0)
    uri = mlflow_store(tmp_path)
    expected = r"not finite at step 3 \(loss_D_fake=nan, .*latest checkpoint \(taken while they were finite\) is kept"
    with pytest.raises(NonFiniteLoss, match=expected + r". Lower stages.0.lr"):
        run_training(config, tracking=TrackingOptions(tracking_uri=uri, model_name="colorizer"))
    _, metrics = latest_recorded(str(tmp_path / "runs" / "nan"))
    assert metrics["global_step"] == 2
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and "not finite" in run.data.tags["recolor.failure"]
    assert client.search_model_versions("name='colorizer'") == []
