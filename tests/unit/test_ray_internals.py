"""The Ray internals the project leans on, checked against the installed Ray: on an upgrade this fails loudly,
naming what changed, instead of a rerun silently losing its checkpoint record or a log going noisy.

- `pipeline.train.checkpoint_store` reads and rewrites Ray Train's private checkpoint record
  (`checkpoint_manager_snapshot.json`) to repair a run whose checkpoints went missing or to adopt a newer one.
- `pipeline.train.worker.quiet_report_log` finds Ray Train's report logger by the path of its source file.
- `pipeline.train.trainer.trainer_class` leaves Ray Train's Ray Data callback out of `_create_default_callbacks`
  (no `DatasetManager` actor a worker group) when no Ray Dataset is given, and its placement group cleaner when
  asked (a run whose driver's job ends with it).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import ray

from pipeline.train.checkpoint_store import RAY_CHECKED, RESULT_FIELDS, SNAPSHOT_FIELDS, SNAPSHOT_FILE
from pipeline.train.worker import REPORT_LOGGER_SOURCE, quiet_report_log

UPGRADE = (f"these Ray internals were checked against Ray {RAY_CHECKED}: read Ray's checkpoint manager and "
           "execution context, fix pipeline.train.checkpoint_store / worker, then RAY_CHECKED and the pin in "
           "pyproject.toml")  # fmt: skip


def test_the_installed_ray_is_the_release_line_the_internals_were_checked_against() -> None:
    assert ray.__version__.split(".")[:2] == RAY_CHECKED.split("."), f"Ray {ray.__version__}: {UPGRADE}"


def test_ray_trains_checkpoint_record_has_the_fields_the_repair_reads_and_writes() -> None:
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    assert CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == SNAPSHOT_FILE, UPGRADE
    assert set(_CheckpointManagerState.model_fields) == SNAPSHOT_FIELDS, UPGRADE
    assert set(_TrainingResultState.model_fields) == RESULT_FIELDS, UPGRADE


def test_a_record_the_repair_writes_is_one_ray_train_reads() -> None:
    """The record `adopt_newer` makes from nothing (a run whose driver stopped before Ray wrote one) parses as Ray
    Train's own state."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    entry = {"version": 0, "checkpoint_dir_name": "checkpoint_2026-12-07_10-00-00.000000", "metrics": {"step": 2}}
    scalars = {"ray_version": ray.__version__, "latest_checkpoint_result": entry, "current_report_index": 1}
    record = scalars | {field: [] for field in SNAPSHOT_FIELDS - scalars.keys()}
    record["checkpoint_results"], record["checkpoint_report_indices"] = [entry], [0]
    state = _CheckpointManagerState.model_validate(record)
    assert state.latest_checkpoint_result.checkpoint_dir_name == entry["checkpoint_dir_name"]


def test_the_report_logger_is_named_by_a_source_file_that_exists() -> None:
    source = Path(ray.__file__).parent.parent.joinpath(*REPORT_LOGGER_SOURCE)
    assert source.is_file(), f"{source} is gone: {UPGRADE}"
    importlib.import_module("ray.train.v2._internal.execution.context")

    quiet_report_log("ERROR")
    quieted = [name for name in logging.root.manager.loggerDict if name.endswith(str(Path(*REPORT_LOGGER_SOURCE)))]
    assert quieted and all(logging.getLogger(name).level == logging.ERROR for name in quieted), UPGRADE


def test_the_trainer_leaves_out_only_the_ray_data_callback_without_datasets_and_the_cleaner_when_asked() -> None:
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from pipeline.train.trainer import trainer_class

    def kinds(trainer) -> list[str]:
        return [type(callback).__name__ for callback in trainer._create_default_callbacks()]

    scaling = ray.train.ScalingConfig(num_workers=1)
    ray_own = kinds(TorchTrainer(lambda: None, scaling_config=scaling))
    # What the override takes out is still what Ray adds.
    assert {DatasetsCallback.__name__, PlacementGroupCleanerCallback.__name__} <= set(ray_own), UPGRADE
    ours = kinds(trainer_class()(lambda: None, scaling_config=scaling))
    assert ours == [kind for kind in ray_own if kind != DatasetsCallback.__name__], UPGRADE
    driven = kinds(trainer_class(placement_group_cleaner=False)(lambda: None, scaling_config=scaling))
    left_out = (DatasetsCallback.__name__, PlacementGroupCleanerCallback.__name__)
    assert driven == [kind for kind in ray_own if kind not in left_out], UPGRADE
    with_data = trainer_class()(lambda: None, scaling_config=scaling, datasets={"train": ray.data.range(1)})
    assert kinds(with_data) == ray_own  # given Ray Datasets, Ray Train's own plumbing stays
