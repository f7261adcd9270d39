"""What every Ray Train worker (DDP rank) runs: `train_loop_per_worker`, Ray Train's entry point.

It opens the credentials, picks the checkpoint to resume from (`pipeline.train.checkpoint_store.resume_payload`),
builds the rank's `ColorizerTrainer` (`pipeline.train.loop`) with Ray's device and `prepare_model`, and reports
to Ray Train through `ray_reporter` (checkpoint uploads: `pipeline.train.checkpoint_store.upload_checkpoint`). On a
worker, `ray.train` is used here (context, device, reports) and in `pipeline.train.checkpoint_store` (the run's
storage); the trainer itself gets what it needs as arguments, so it runs without Ray in unit tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import numpy as np
import torch

from ingest.cluster import open_environment
from pipeline.checkpoint import save_checkpoint
from pipeline.config import TrainConfig
from pipeline.data.plan import DataPlan
from pipeline.train.checkpoint_store import (
    METRICS_FILE,
    resume_payload,
    upload_checkpoint,
    upload_finished,
    upload_started,
    wait_for_uploads,
)
from pipeline.train.loop import ColorizerTrainer

log = logging.getLogger(__name__)


REPORT_LOGGER_SOURCE = ("ray", "train", "v2", "_internal", "execution", "context.py")  # Ray 2.60's (RAY_CHECKED)


def quiet_report_log(level: str) -> None:
    """Ray Train logs every report with all its metrics at INFO, from a logger named by its source file (so not
    under `ray.train`, which `LoggingConfig` sets): the progress bar says it better."""
    marker = os.path.join(*REPORT_LOGGER_SOURCE)
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(marker):
            logging.getLogger(name).setLevel(level)


def prepare_ddp(module):
    """Ray's `prepare_model` (device, DDP) without DDP's buffer broadcast before each forward: the discriminator
    runs twice before one backward, and that in-place broadcast between the two breaks autograd on torch releases
    before pytorch#175851. The trainer aligns buffers itself (`_sync_buffers`) before validation and checkpoints."""
    import ray.train.torch

    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})


def ray_reporter(upload_mode: str = "async"):
    """Ray Train's report for `ColorizerTrainer`: every rank calls it equally often (it is a barrier); rank 0 adds
    the checkpoint payload, saved to a local folder at once (the live weights) and uploaded by `upload_checkpoint`.

    With `upload_mode="async"` the upload runs in Ray's upload thread while training goes on: the checkpoint is
    recorded (and older ones rotated out) only once its upload has completed, in report order, and a worker does
    not finish before its last upload has. At most one upload waits behind the one in flight, so a store slower
    than `checkpoint_every` slows training instead of filling the local disk.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    mode = CheckpointUploadMode.ASYNC if upload_mode == "async" else CheckpointUploadMode.SYNC
    remove_orphan_checkpoints()

    def report(metrics: dict, payload: dict | None) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        if payload is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=mode)
            return
        if mode == CheckpointUploadMode.ASYNC:
            wait_for_uploads(at_most=1)
        directory = tempfile.mkdtemp(prefix=f"{LOCAL_CHECKPOINT_PREFIX}{os.getpid()}-")
        try:
            save_checkpoint(directory, payload)
            with open(os.path.join(directory, METRICS_FILE), "w") as file:  # for a rerun's `adopt_newer`
                json.dump(metrics, file)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        upload_started()
        # Ray deletes the local folder once the upload succeeded (upload_checkpoint does after the last failure).
        try:
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_upload_mode=mode,
                delete_local_checkpoint_after_upload=True,
                checkpoint_upload_fn=upload_checkpoint,
            )
        except BaseException:  # the report itself failed (a stopped group): no upload will delete the folder
            upload_finished()
            shutil.rmtree(directory, ignore_errors=True)
            raise

    return report


LOCAL_CHECKPOINT_PREFIX = "recolor-checkpoint-"  # + the worker's pid: a folder whose process is gone is an orphan


def remove_orphan_checkpoints(folder: str | None = None) -> list[str]:
    """Delete the local checkpoint folders (`recolor-checkpoint-<pid>-*`) that workers which died before their
    upload finished left in the temporary folder (6 MB and more each); returns the paths removed. Folders of a
    live process are its own, and are left alone."""
    import glob

    import psutil

    removed = []
    for path in glob.glob(os.path.join(folder or tempfile.gettempdir(), LOCAL_CHECKPOINT_PREFIX + "*")):
        pid = os.path.basename(path).removeprefix(LOCAL_CHECKPOINT_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point on every worker."""
    import ray
    import ray.train
    import ray.train.torch

    # The driver's settings and credentials first: boto3, MLflow, failpoints and the knobs below read them.
    open_environment(loop_config["environment"])
    config = TrainConfig.from_dict(loop_config["train"])
    plan = DataPlan.from_dict(loop_config["data_plan"])
    quiet_report_log(os.environ.get("RECOLOR_TRAIN_LOG_LEVEL", "WARNING"))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    payload = resume_payload(ray.train.get_checkpoint(), rank)
    if payload is not None:
        log.info("rank %d resuming at %s", rank, payload["position"])
    logger = None
    node_monitor = None
    tracking = loop_config.get("tracking")
    # System metrics: one monitor a node, on its first worker. Over several nodes each is named node<k>.
    node_id = f"node{context.get_node_rank()}" if world_size > context.get_local_world_size() else None
    if rank == 0 and loop_config.get("logger_factory") is not None:
        logger = loop_config["logger_factory"](config, plan, payload)
    elif rank == 0 and tracking:
        from pipeline.tracking.loggers import MlflowLogger

        # MLFLOW_TRACKING_URI is set by the driver's shipment.
        logger = MlflowLogger(os.environ["MLFLOW_TRACKING_URI"], tracking["run_id"], node_id=node_id)
    elif tracking and context.get_local_rank() == 0:
        from pipeline.tracking.loggers import start_system_metrics

        node_monitor = start_system_metrics(os.environ["MLFLOW_TRACKING_URI"], tracking["run_id"], node_id)
    trainer = ColorizerTrainer(
        config,
        plan,
        rank,
        world_size,
        ray.train.torch.get_device(),
        prepare=prepare_ddp,
        logger=logger,
        report=ray_reporter(config.checkpoint_upload),
        checkpoint_payload=payload,
    )
    try:
        trainer.run()
        if loop_config.get("on_worker_end") is not None:
            loop_config["on_worker_end"](trainer)
    finally:
        trainer.logger.close()
        if node_monitor is not None:
            node_monitor.finish()
