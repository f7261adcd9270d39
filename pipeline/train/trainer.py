"""Ray Train's `TorchTrainer` as recolor runs it: the trainer class (without Ray Data's plumbing), the worker group
(fixed or elastic), the run storage Ray Train is given, and `fit` until the run finishes, fails or a signal stops
it. `pipeline.train.driver` decides whether and what to run; this module only runs it."""

from __future__ import annotations

import os

from pipeline.config import TrainConfig
from pipeline.data.plan import DataPlan
from pipeline.train.failures import Stopped


def storage_filesystem(storage: str):
    """The pyarrow file system Ray Train gets for s3:// run storage (see `ingest.storage.arrow`); None for local."""
    if not storage.startswith("s3://"):
        return None
    from ingest.storage.arrow import s3_filesystem

    return s3_filesystem()


def storage_path_for_ray(storage: str) -> str:
    # With an explicit file system Ray wants the path without the scheme.
    return storage[len("s3://") :] if storage.startswith("s3://") else storage


def fit(config: TrainConfig, plan: DataPlan, storage: str, ray_address, logger_factory, on_worker_end, run_info,
        callbacks=None):  # fmt: skip
    """Ray Train's `TorchTrainer.fit`: its `Result`, or Ray's `TrainingFailedError` once the restarts are used up."""
    import ray.train
    from ray.train.torch import TorchConfig

    from ingest.cluster import ensure_ray, ship_environment
    from pipeline.train.worker import train_loop_per_worker

    needed_cpus = (config.max_workers or config.workers) * config.cpus_per_worker
    with ensure_ray(ray_address, max(os.cpu_count() or 1, needed_cpus)):
        resources = {"CPU": config.cpus_per_worker}
        if config.use_gpu:
            resources["GPU"] = 1
        trainer = trainer_class(placement_group_cleaner=not called_by_a_driver())(
            train_loop_per_worker,
            train_loop_config={
                "train": config.to_dict(),
                "data_plan": plan.to_dict(),
                # Hooks of tests and tools (`run_training`'s arguments): absent from a production run's config.
                **({"logger_factory": logger_factory} if logger_factory is not None else {}),
                **({"on_worker_end": on_worker_end} if on_worker_end is not None else {}),
                # The run id only: the tracking URI (it may hold a password) travels in the shipped environment.
                "tracking": {"run_id": run_info["run_id"]} if run_info else None,
                # An object reference, not the values: Ray shows a run's config on its dashboard and logs runtime envs.
                "environment": ship_environment({"MLFLOW_TRACKING_URI": run_info["uri"]} if run_info else None),
            },
            scaling_config=scaling_config(config, resources),
            torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
            run_config=ray.train.RunConfig(
                name=config.name,
                storage_path=storage_path_for_ray(storage),
                storage_filesystem=storage_filesystem(storage),
                # Every worker error counts, a DataError too: Ray Train 2.60 has no public way to mark an error
                # as not worth a restart (its failure policy retries every WorkerGroupError up to max_failures).
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                # When the latest checkpoint cannot be read, the run resumes from the one before (config: >= 2).
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
                logging_config=ray.train.LoggingConfig(log_level=os.environ.get("RECOLOR_TRAIN_LOG_LEVEL", "WARNING")),
                callbacks=callbacks or None,
            ),
        )
        # Ray Train 2.60 raises when training fails (never a Result with `.error`).
        return _fit_until_stopped(trainer)


def trainer_class(placement_group_cleaner: bool = True):
    """Ray Train's `TorchTrainer`, less what a recolor run has no use for. `_create_default_callbacks` is private:
    `tests/unit/test_ray_internals.py` checks it on the installed Ray.

    - Its Ray Data plumbing when no Ray Dataset is given (recolor reads its lake itself): Ray Train 2.60 starts a
      `DatasetManager` actor with every worker group, a process of its own (about 2 CPU seconds to start and
      import), whether or not there are datasets to split.
    - With `placement_group_cleaner=False`, the `PlacementGroupCleaner`: a detached actor a run (about 3.5 CPU
      seconds: a process importing Ray Train, then polling the controller every second) that removes the run's
      placement group should the controller die while the Ray job goes on. See `called_by_a_driver`.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            left_out = () if self.datasets else (DatasetsCallback,)
            if not placement_group_cleaner:
                left_out += (PlacementGroupCleanerCallback,)
            return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, left_out)]

    return Trainer


def called_by_a_driver() -> bool:
    """Whether `fit` runs in a Ray driver (`recolor train`, a submitted job's entrypoint, a script), not inside a
    Ray actor or task (a sweep's trial runs in a Tune actor).

    A run's placement group belongs to its Ray job, and Ray removes it when the job ends. A driver's job ends with
    the run: `recolor train` and a job's entrypoint exit once `fit` returns or raises, the controller's death
    included. A trial's run can die with its Tune actor (ASHA stops it) while the sweep's job goes on, and its
    placement group would hold the trial's CPUs from the trials after it: there Ray Train's cleaner stays. (A
    Python session that calls `run_training` and lives on after a controller died holds that run's CPUs until it
    disconnects from Ray.)
    """
    import ray

    return ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE


def scaling_config(config: TrainConfig, resources: dict):
    """Ray Train's worker group: `config.workers` workers, or with `max_workers` an elastic group that starts with
    what the cluster can give (at least `workers`), restarts smaller from the latest checkpoint when workers are
    lost, and grows when the cluster has room again (looked at every `elastic_resize_s`)."""
    import ray.train

    if not config.elastic:
        return ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                       resources_per_worker=resources)  # fmt: skip
    return ray.train.ScalingConfig(num_workers=(config.workers, config.max_workers), use_gpu=config.use_gpu,
                                   resources_per_worker=resources,
                                   elastic_resize_monitor_interval_s=config.elastic_resize_s)  # fmt: skip


def _fit_until_stopped(trainer):
    """`trainer.fit()`, with SIGINT and SIGTERM raising `Stopped` in this (the main) thread.

    Ray's own handlers would not do: on SIGTERM its core worker prints a signal dump and aborts the process
    (the MLflow run then stays RUNNING), and Ray Train's SIGINT handler exits with `SystemExit`. `fit` runs in a
    thread of its own (Ray Train then installs no handler), and the handlers are installed after `ray.init`.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = error

    def stop(signum, frame) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.25)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
