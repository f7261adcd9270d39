"""The driver side of training: pin the data, check what can be checked before a cluster starts, repair the
run's checkpoint record, run Ray Train (`pipeline.train.trainer`) until it finishes, fails or is stopped; then
log and register the generator.

`recolor train` and the Ray job entrypoint (`jobs/train.py`) both call `run_training`.

Every step above reads or guards the same run (its name, storage, lease, pinned data and MLflow run), in the order
of `run_training`; how a rerun is judged against the run before it (its pinned data, whether it has trained all, its
samples a step) is `pipeline.train.rerun`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import ConfigError
from pipeline.config import TrainConfig
from pipeline.data.plan import DataError, DataPlan, resolve_config_data
from pipeline.tracking.uri import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME
from pipeline.train.failures import (
    NonFiniteLoss,
    TrainingError,
    describe_failure,
    is_training_failure,
    is_transient,
    root_cause,
    worker_failures_of,
)
from pipeline.train.rerun import check_resumed_batch, pin_run_data, trained_all
from pipeline.train.trainer import fit

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "ray_results"
STORAGE_ENV = "RECOLOR_STORAGE"


@dataclass
class TrainResult:
    name: str
    storage: str  # where the run's checkpoints live
    checkpoint: str | None  # the latest checkpoint's path
    metrics: dict  # metrics reported with the latest checkpoint
    plan: DataPlan
    run_id: str | None = None  # the MLflow run
    model_version: str | None = None  # the registered generator's version


def resolve_storage(storage: str | None) -> str:
    """The run storage: the argument, else $RECOLOR_STORAGE, else ./ray_results (absolute: Ray needs it)."""
    storage = storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    if storage.startswith("s3://"):
        return storage
    return str(Path(storage).expanduser().absolute())


@dataclass
class TrackingOptions:
    """Where and how a training run is tracked."""

    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else ./mlflow.db
    experiment: str = DEFAULT_EXPERIMENT
    model_name: str | None = DEFAULT_MODEL_NAME  # registered model; None: log the model without registering
    preset: str | None = None  # the config file the run came from, for the run's description
    parent_run_id: str | None = None  # a sweep's run: this run is one of its trials (a child run in the UI)
    tags: dict[str, str] | None = None  # more tags of the run (a sweep's trial: its overrides)


def run_training(
    config: TrainConfig,
    ray_address: str | None = None,
    logger_factory=None,
    on_worker_end=None,
    tracking: TrackingOptions | None = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train `config` with Ray Train DDP; resumes when a run of the same name exists in the storage.

    Args:
        config: the run.
        ray_address: a Ray cluster; None uses $RAY_ADDRESS, else a local instance.
        logger_factory: called on rank 0 as `factory(config, plan, checkpoint_payload)` to make its logger.
        on_worker_end: called on every rank with its `ColorizerTrainer` after training (inspection, tests).
        tracking: MLflow settings; None means tracking off (the CLI turns it on by default).
        callbacks: Ray Train `UserCallback`s of the run (a sweep's trial passes the one that reports to Tune).

    Raises:
        LakeError, DataError: unknown or unusable datasets (before any worker starts), or a worker's DataError
            (too many corrupt samples) once the restarts are used up.
        TrainingError: training failed after `max_failures` restarts; its message names the root cause in one
            line. The MLflow run (when tracking) is then FAILED, tagged with that line; KILLED on Ctrl-C.
    """
    from pipeline.train.checkpoint_store import upload_attempts

    plan = resolve_config_data(config.data)
    check_before_start(config, plan, ray_address)
    storage = resolve_storage(config.storage)
    upload_attempts()  # a bad $RECOLOR_CHECKPOINT_UPLOAD_ATTEMPTS stops here, not at a worker's first checkpoint
    tracking_uri = None
    if tracking is not None and tracking.enabled:
        from pipeline.tracking.uri import check_tracking_server, resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(tracking.tracking_uri)
        check_tracking_server(tracking_uri)  # seconds, not minutes of MLflow's retries
    run_uri = run_location(storage, config.name)
    with _run_lease(run_uri, config.name):
        return _train_holding_lease(config, plan, storage, run_uri, tracking, tracking_uri, ray_address,
                                    logger_factory, on_worker_end, callbacks)  # fmt: skip


def run_location(storage: str, name: str) -> str:
    """Where the run `name` keeps its checkpoints and Ray Train's record of them, in the resolved `storage`."""
    return f"{storage.rstrip('/')}/{name}"


RUN_LEASE = ".recolor-run.lease"


@contextlib.contextmanager
def _run_lease(run_uri: str, name: str):
    """Hold the run's lease (`ingest.lease`): a second `recolor train` of the same name and storage is refused while
    this one lives; the lease of a run that crashed expires (at once on the same host, else after its lifetime).

    Raises:
        ConfigError: the run is already running elsewhere, naming where.
    """
    from ingest.lease import Lease, LeaseHeld
    from ingest.storage import open_storage

    lease = Lease(open_storage(run_uri), RUN_LEASE, f"run {name}", exclusive=True)
    try:
        lease.__enter__()
    except LeaseHeld as held:
        raise ConfigError(
            f"run {name!r} is already running ({held.state.describe()}; lease {run_uri}/{RUN_LEASE}): wait for it "
            "to finish or stop it, or train under another --name"
        ) from None
    try:
        yield
    finally:
        lease.__exit__(None, None, None)


def _train_holding_lease(config, plan, storage, run_uri, tracking, tracking_uri, ray_address, logger_factory,
                         on_worker_end, callbacks) -> TrainResult:  # fmt: skip
    from pipeline.train.checkpoint_store import latest_recorded, repair_run_snapshot

    # A rerun after checkpoints were lost resumes from what is left (or starts over) instead of failing forever.
    repair_run_snapshot(run_uri)
    latest = latest_recorded(run_uri)
    resuming = latest is not None
    if resuming:
        check_resumed_batch(config, latest[1])
    pinned = pin_run_data(config, plan, run_uri, resuming)
    if pinned.refs != plan.refs:
        check_before_start(config, pinned, ray_address)
    plan = pinned
    finished = finished_earlier(config, plan, run_uri, tracking)
    if finished is not None:
        return finished
    run_info = None
    if tracking_uri is not None:
        from pipeline.tracking.runs import start_or_resume_run

        device = "cuda" if config.use_gpu else "cpu"
        extra_tags = dict(tracking.tags or {})
        if tracking.parent_run_id:
            extra_tags["mlflow.parentRunId"] = tracking.parent_run_id
        run_id, _ = start_or_resume_run(
            tracking_uri,
            tracking.experiment,
            config,
            plan,
            storage,
            device,
            preset=tracking.preset,
            extra_tags=extra_tags,
            continues_checkpoint=resuming,
        )
        run_info = {"uri": tracking_uri, "run_id": run_id}
    try:
        result = fit(config, plan, storage, ray_address, logger_factory, on_worker_end, run_info, callbacks)
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        if checkpoint and storage.startswith("s3://") and not checkpoint.startswith("s3://"):
            checkpoint = f"s3://{checkpoint}"
        train_result = TrainResult(
            name=config.name,
            storage=run_uri,
            checkpoint=checkpoint,
            metrics=dict(result.metrics or {}),
            plan=plan,
        )
        if run_info is not None:
            train_result.run_id = run_info["run_id"]
            train_result.model_version = _finish_tracking(run_info, tracking, train_result, result.checkpoint)
        return train_result
    except BaseException as error:
        # Whatever stops the run (workers out of restarts, Ctrl-C, an unreachable registry) ends its MLflow run:
        # left RUNNING it would look alive forever. A rerun of the same name sets it back to RUNNING.
        reason = describe_failure(error)
        if run_info is not None:
            from pipeline.tracking.runs import end_failed_run

            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            end_failed_run(run_info["uri"], run_info["run_id"], reason, status)
        if not is_training_failure(error):
            raise
        # Corrupt data is the user's to mend, not Ray's: say so in one line (the CLI's exit 2), not in tracebacks.
        data_errors = [e for e in worker_failures_of(error) if isinstance(e, DataError)]
        if data_errors:
            raise DataError(str(data_errors[0])) from error
        diverged = [e for e in worker_failures_of(error) if isinstance(e, NonFiniteLoss)]
        if diverged:
            raise NonFiniteLoss(str(diverged[0])) from error
        cause = root_cause(error)
        raise TrainingError(reason, run_info["run_id"] if run_info else None, is_transient(cause)) from error


def finished_earlier(config: TrainConfig, plan: DataPlan, run_uri: str, tracking) -> TrainResult | None:
    """The result of a run that already trained all `config` asks for, and whose MLflow run is FINISHED; else None.

    Rerunning a finished command then trains nothing, starts no cluster and registers no second model version:
    it reports what the run left (its latest checkpoint, metrics, MLflow run and model version). A run whose
    config asks for more (more epochs, another stage) is resumed as usual.
    """
    from pipeline.train.checkpoint_store import latest_recorded

    latest = latest_recorded(run_uri)
    if latest is None or not trained_all(config, latest[1]):
        return None
    name, metrics = latest
    result = TrainResult(name=config.name, storage=run_uri, checkpoint=f"{run_uri}/{name}", metrics=metrics, plan=plan)
    if tracking is not None and tracking.enabled:
        from pipeline.tracking.runs import finished_run

        found = finished_run(tracking.tracking_uri, tracking.experiment, config.name, tracking.model_name)
        if found is None:  # stopped between the last checkpoint and registering the model: let the resume do that
            return None
        result.run_id, result.model_version = found
    log.warning(
        "run %s finished earlier at step %d: nothing to train (raise stages.N.epochs to train on, or pick another "
        "--name)",
        config.name,
        int(metrics.get("global_step", 0)),
    )
    return result


def check_before_start(config: TrainConfig, plan: DataPlan, ray_address: str | None = None) -> None:
    """What the driver can tell in seconds, before a cluster starts: data too small to train, backbone weights
    that do not load, devices missing.

    Raises:
        DataError: the training split is smaller than one global batch, or the validation split is empty.
        ConfigError: backbone weights that are not a resnet18 state dict; GPU workers asked of a local machine
            without that many GPUs.
    """
    if config.model.fusion == "inception" or config.model.arch == "inception_unet":  # the extra: one line now
        from pipeline.evaluation.fid import FidUnavailable, network_path

        setting = "model.arch=inception_unet" if config.model.arch == "inception_unet" else "model.fusion=inception"
        try:
            network_path()
        except FidUnavailable as e:
            raise ConfigError(f"{setting}: {e}") from None
    if config.model.backbone_weights:  # a wrong file: one line now, not a failed worker group later
        from pipeline.models import build_generator, load_backbone_weights
        from pipeline.train.loop import load_backbone

        try:
            load_backbone_weights(build_generator(config.model.arch), load_backbone(config.model.backbone_weights))
        except ValueError as e:
            raise ConfigError(f"model.backbone_weights {config.model.backbone_weights}: {e}") from None
    global_batch = config.global_batch
    train, val = plan.epoch_length(), plan.count("val")
    refs = ", ".join(plan.refs)
    if plan.count("train") == 0:
        raise DataError(
            f"{refs}: no training samples (every sample is in the validation split, as in a dataset ingested with "
            "--val-fraction 1 for scoring): score models on it with recolor evaluate, and train on a dataset "
            "with a training split"
        )
    if train < global_batch:
        raise DataError(
            f"{refs}: the training split has {train} samples, fewer than one global batch ({global_batch}: "
            f"{config.workers} workers x batch {config.data.batch_size}, or data.global_batch_size): ingest more "
            "images or lower data.batch_size / data.global_batch_size / --workers"
        )
    if val == 0:
        raise DataError(
            f"{refs}: the validation split has no samples, so the run could report no validation metrics: "
            "re-ingest with --val-fraction above 0, or add a dataset that has some"
        )
    if config.model.arch == "unet_256" and plan.size and 2**config.model.num_downs > plan.size:
        raise ConfigError(
            f"model.num_downs={config.model.num_downs} needs samples of at least {2**config.model.num_downs} px, and "
            f"{', '.join(plan.refs)} holds {plan.size} px: use model.num_downs <= {plan.size.bit_length() - 1}"
        )
    if config.model.arch == "inception_unet" and plan.size:
        from pipeline.models.inception_unet import MIN_SIDE

        if plan.size < MIN_SIDE:
            raise ConfigError(f"model.arch=inception_unet needs samples of at least {MIN_SIDE} px (its Inception "
                              f"encoder's unpadded stages), and {', '.join(plan.refs)} holds {plan.size} px: ingest "
                              "with --size 128 or more")  # fmt: skip
    if config.use_gpu and not (ray_address or os.environ.get("RAY_ADDRESS")):
        import torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < config.workers:  # an elastic group starts with its smallest size
            raise ConfigError(
                f"--gpu with {config.workers} workers needs {config.workers} GPUs, and this machine has {available}: "
                "drop --gpu, lower --workers, or pass --ray-address of a cluster with GPU nodes"
            )


def _finish_tracking(run_info: dict, tracking: TrackingOptions, result: TrainResult, checkpoint) -> str | None:
    """The run's generator from its latest checkpoint, handed to `pipeline.tracking.runs.finish_run`."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.tracking.runs import finish_run

    payload = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload = load_checkpoint(directory)
    return finish_run(
        run_info["uri"], run_info["run_id"], result.name, result.plan, result.metrics, payload, tracking.model_name
    )
