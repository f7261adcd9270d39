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

    def log_input(dataset, context):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")

    monkeypatch.setattr(mlflow, "log_input", log_input)
    runs._log_input(object(), "training")
    assert calls == ["training", "training"]

    def refused(dataset, context):
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run gone")

    monkeypatch.setattr(mlflow, "log_input", refused)
    with pytest.raises(MlflowException, match="run gone"):  # any other error is not retried
        runs._log_input(object(), "training")
