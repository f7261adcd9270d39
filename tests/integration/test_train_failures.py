"""`recolor train` when the workers fail: the MLflow run ends FAILED with the reason, the CLI says why in one line,
and a rerun of the same name takes the MLflow run up again and finishes it.

The run is `test_train_ray`'s tiny one (two CPU workers, U-Net of base width 4, 64 px, batch 2 per worker) on its
lake fixture, tracked in an embedded SQLite store in tmp_path. The `train_step:2:raise` failpoint makes every rank's
second step raise `InjectedFault` (an OSError); with `max_failures=0` Ray Train does not restart the workers.
The CLI runs in this process (`pipeline.cli.main`), on the session's Ray: a Ray started per command would take
more time than the training.
"""

from __future__ import annotations

import pytest
import test_train_ray as base
from test_train_ray import REPO

from pipeline.checkpoint import load_checkpoint
from pipeline.cli import main as recolor
from pipeline.tracking.runs import FAILURE_TAG, RUN_NAME_TAG

pytestmark = pytest.mark.slow

# Module-scoped there, so built again for this module.
train_lake = base.train_lake
quiet_env = base.quiet_env

FAULT = "InjectedFault: injected fault at failpoint 'train_step'"


def test_a_failing_worker_fails_the_mlflow_run_and_a_rerun_resumes_and_finishes_it(
    ray_local, quiet_env, train_lake, tmp_path, monkeypatch, capsys
) -> None:
    from mlflow import MlflowClient

    lake, plan = train_lake
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train", REPO / "configs" / "demo.yaml", "--dataset", "photos", "--lake", lake, "--storage", tmp_path / "runs",
        "--name", "f", "--tracking-uri", uri, "--workers", "2", "model.num_downs=6", "model.base_filters=4",
        "stages.0.epochs=1", "stages.0.decay_epochs=0", "checkpoint_every=1000", "max_failures=0",
    ]  # fmt: skip
    args = [str(arg) for arg in args]

    with monkeypatch.context() as patch:
        patch.setenv("RECOLOR_FAILPOINT", "train_step:2:raise")
        assert recolor(args) == 1
    stderr = capsys.readouterr().err
    client = MlflowClient(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("recolor").experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'f'"
    )
    assert stderr.strip().splitlines()[-1] == (
        f"recolor: error: training failed: {FAULT}; MLflow run {run.info.run_id} marked FAILED; "
        "rerun the same command to resume"
    ), stderr[-3000:]
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags[FAILURE_TAG] == FAULT

    assert recolor(args) == 0
    stdout = capsys.readouterr().out
    assert f"  MLflow run {run.info.run_id}; registered colorizer version 1 (alias candidate)" in stdout
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert FAILURE_TAG not in run.data.tags  # the run did not stop for that reason in the end
    [latest] = [line for line in stdout.splitlines() if line.startswith("  latest checkpoint: ")]
    steps = plan.count("train") // (base.WORKERS * base.BATCH)
    assert load_checkpoint(latest.removeprefix("  latest checkpoint: "))["position"]["global_step"] == steps
    # The failed attempt logged step 1 before it stopped; the rerun, without a checkpoint to resume from, all of them.
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_G")}) == list(range(1, steps + 1))
