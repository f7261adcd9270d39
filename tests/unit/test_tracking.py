"""Tracking details that need no MLflow server."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException


def test_a_dataset_a_concurrent_run_created_first_is_logged_again_not_failed(monkeypatch) -> None:
    """A sweep's trials start together and log the same lake version: SQLite refuses the second insert of the
    dataset row (UNIQUE constraint, seen in CI); the retry links the row the other run created."""
    import mlflow

    from pipeline.tracking import runs

    calls = []

    def log_input(dataset, context, tags=None):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")

    monkeypatch.setattr(mlflow, "log_input", log_input)
    runs._log_input(object(), "training")
    assert calls == ["training", "training"]

    def refused(dataset, context, tags=None):
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run gone")

    monkeypatch.setattr(mlflow, "log_input", refused)
    with pytest.raises(MlflowException, match="run gone"):  # any other error is not retried
        runs._log_input(object(), "training")


def test_system_metrics_of_another_node_go_under_its_name(tmp_path, mlflow_store) -> None:
    import time

    from mlflow import MlflowClient

    from pipeline.tracking.loggers import start_system_metrics

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("nodes")).info.run_id
    monitor = start_system_metrics(uri, run_id, node_id="node1", sampling_interval=0.2)
    assert monitor is not None
    deadline = time.monotonic() + 30  # the monitor logs every sampling interval: wait for its first samples
    while not client.get_run(run_id).data.metrics and time.monotonic() < deadline:
        time.sleep(0.2)
    monitor.finish()
    names = sorted(client.get_run(run_id).data.metrics)
    assert "system/node1/cpu_utilization_percentage" in names, names
    assert all(name.startswith("system/node1/") for name in names), names
