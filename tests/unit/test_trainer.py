"""How a failed training run is described: one line naming the error a worker raised, never a secret."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from ray.train import ControllerError, WorkerGroupError

from ingest.errors import ConfigError
from ingest.faults import InjectedFault
from pipeline.checkpoint import CheckpointError
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.data.plan import DataError, DataPlan, ShardInfo
from pipeline.train.driver import check_before_start
from pipeline.train.failures import Stopped, TrainingError, describe_failure, is_transient


def test_a_worker_group_error_is_described_by_the_workers_own_error_not_rays_wrapper() -> None:
    # Rank 0 only died because rank 1 failed; rank 1's error is the one that says why.
    error = WorkerGroupError(
        "rank 0: actor died\nrank 1: Traceback ...", {0: ActorDiedError(), 1: InjectedFault("injected fault at 'x'")}
    )
    assert str(error).splitlines()[0] == "Training failed due to worker errors:"
    assert describe_failure(error) == "InjectedFault: injected fault at 'x'"


def test_workers_that_only_died_are_described_by_the_first_death() -> None:
    error = WorkerGroupError("...", {1: ActorDiedError(), 0: RayActorError(error_msg="node lost\nmore")})
    assert describe_failure(error) == "RayActorError: node lost"


def test_a_task_error_and_a_controller_error_are_described_by_their_cause() -> None:
    task_error = RayTaskError("read_shard", "Traceback (most recent call last): ...", ValueError("bad shard\ndetails"))
    assert describe_failure(task_error) == "ValueError: bad shard"
    assert describe_failure(task_error.as_instanceof_cause()) == "ValueError: bad shard"
    assert describe_failure(ControllerError(RuntimeError("no placement group"))) == "RuntimeError: no placement group"


def test_a_description_masks_credentials_and_url_passwords_and_stays_short(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    error = WorkerGroupError("...", {0: OSError("denied with wJalrXUtnFEMI at https://ann:hunter2@minio:9000/b")})
    assert describe_failure(error) == "OSError: denied with *** at https://ann:***@minio:9000/b"
    long = describe_failure(RuntimeError("x" * 1000))
    assert len(long) == 500 and long.endswith("...")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KeyboardInterrupt(), "stopped by SIGINT"),
        (Stopped("SIGTERM"), "stopped by SIGTERM"),
        (RuntimeError(), "RuntimeError"),
        (ValueError("  \nsecond"), "ValueError: second"),
    ],
)
def test_plain_errors_are_described_by_type_and_first_line(error, expected) -> None:
    assert describe_failure(error) == expected


def plan_of(train: int, val: int, size: int = 256) -> DataPlan:
    return DataPlan(refs=["photos@3"], digests={}, uris={}, size=size, train=[ShardInfo("a.tar", train)],
                    val=[ShardInfo("b.tar", val)] if val else [])  # fmt: skip


def test_the_driver_refuses_data_too_small_to_train_before_any_worker_starts(monkeypatch) -> None:
    config = TrainConfig(workers=2, data=DataConfig(batch_size=4))
    check_before_start(config, plan_of(8, 1))  # exactly one global batch: fine
    too_few = r"^photos@3: the training split has 7 samples, fewer than one global batch \(8: 2 workers x batch 4"
    with pytest.raises(DataError, match=too_few):
        check_before_start(config, plan_of(7, 1))
    with pytest.raises(DataError, match=r"^photos@3: the validation split has no samples.*--val-fraction above 0"):
        check_before_start(config, plan_of(100, 0))
    with pytest.raises(DataError, match=r"^photos@3: no training samples \(every sample is in the validation split.*"
                                        r"recolor evaluate"):  # fmt: skip
        check_before_start(config, plan_of(0, 40))  # a scoring-only dataset (--val-fraction 1)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=r"--gpu with 2 workers needs 2 GPUs, and this machine has 0: drop --gpu"):
        check_before_start(TrainConfig(workers=2, use_gpu=True, data=DataConfig(batch_size=4)), plan_of(100, 4))
    check_before_start(TrainConfig(workers=2, use_gpu=True), plan_of(100, 4), ray_address="ray://gpus:10001")


def test_a_unet_deeper_than_its_samples_allow_is_refused_before_any_worker_starts() -> None:
    config = TrainConfig(workers=2, data=DataConfig(batch_size=4))
    with pytest.raises(ValueError, match=r"model.num_downs=8 needs samples of at least 256 px, and photos@3 holds "
                                         r"64 px: use model.num_downs <= 6"):  # fmt: skip
        check_before_start(config, plan_of(100, 4, size=64))
    check_before_start(TrainConfig(workers=2, model=ModelConfig(num_downs=6)), plan_of(100, 4, size=64))


def test_sync_batch_norm_on_cpu_workers_is_refused_when_the_config_is_read() -> None:
    with pytest.raises(ValueError, match=r"model.norm=sync_batch needs GPU workers \(--gpu\).*model.norm=batch"):
        TrainConfig(workers=2, model=ModelConfig(norm="sync_batch"))
    TrainConfig(workers=1, model=ModelConfig(norm="sync_batch"))  # one rank: plain BatchNorm statistics
    TrainConfig(workers=2, use_gpu=True, model=ModelConfig(norm="sync_batch"))


@pytest.mark.parametrize(
    ("cause", "transient"),
    [
        (ActorDiedError(), True),
        (InjectedFault("x"), True),  # an OSError: what a store or network raises
        (CheckpointError("upload failed 4 times"), True),
        (MemoryError(), True),
        (ValueError("bad option"), False),
        (RuntimeError("SyncBatchNorm layers only work with GPU modules"), False),
        (TypeError("x"), False),
    ],
)
def test_only_failures_that_can_pass_by_themselves_are_called_rerunnable(cause, transient) -> None:
    assert is_transient(cause) is transient


def test_the_cli_says_rerun_only_when_a_rerun_can_succeed(monkeypatch, capsys) -> None:
    import pipeline.train.cli
    from pipeline.cli import main

    def failing(reason: str, rerunnable: bool):
        def handler(args):
            raise TrainingError(reason, "abc123", rerunnable)

        return handler

    monkeypatch.setattr(pipeline.train.cli, "run_train_command", failing("ValueError: bad option", False))
    assert main(["train", "configs/tiny.yaml"]) == 1
    assert capsys.readouterr().err.strip() == (
        "recolor: error: training failed: ValueError: bad option; MLflow run abc123 marked FAILED; "
        "a rerun would fail the same way: fix the cause (config, data or code), then rerun to resume"
    )
    monkeypatch.setattr(pipeline.train.cli, "run_train_command", failing("ActorDiedError: node lost", True))
    assert main(["train", "configs/tiny.yaml"]) == 1
    assert capsys.readouterr().err.strip().endswith("marked FAILED; rerun the same command to resume")


def test_an_unreachable_tracking_server_is_named_in_one_line(tmp_path) -> None:
    from infra.stack.s3_server import free_port
    from pipeline.cli import exit_code_and_message
    from pipeline.tracking.uri import TrackingUnreachable, check_tracking_server

    port = free_port()  # nothing listens there
    with pytest.raises(TrackingUnreachable) as error:
        check_tracking_server(f"http://ann:hunter2@127.0.0.1:{port}", timeout_s=2)
    assert exit_code_and_message(error.value) == (
        2,
        f"recolor: error: the MLflow tracking server http://ann:***@127.0.0.1:{port} does not answer "
        "(ConnectionError): start it, fix --tracking-uri / $MLFLOW_TRACKING_URI, or unset it to track in ./mlflow.db",
    )
    check_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a file store: nothing to ask


def test_a_resume_keeps_the_runs_global_batch_and_refuses_a_count_that_cannot_split_it(caplog) -> None:
    from pipeline.train.driver import check_resumed_batch

    recorded = {"global_batch": 12.0, "global_step": 40.0}
    check_resumed_batch(TrainConfig(workers=3, data=DataConfig(batch_size=4)), recorded)  # 12 = 3 x 4: as it was
    with caplog.at_level("WARNING"):
        check_resumed_batch(TrainConfig(workers=2, data=DataConfig(batch_size=4)), recorded)
    assert "resumes with its global batch of 12 samples a step" in caplog.text and "6 a worker on 2" in caplog.text
    with pytest.raises(ConfigError, match=r"run 'colorizer''s global batch=12 does not split evenly over 5 workers: "
                                          r"use --workers 1 / 2 / 3 / 4 / 6 / 12"):  # fmt: skip
        check_resumed_batch(TrainConfig(workers=5, data=DataConfig(batch_size=4)), recorded)
    check_resumed_batch(TrainConfig(workers=[2, 5], data=DataConfig(batch_size=4)), recorded)  # elastic: 3/3/2/2/2
    with pytest.raises(ConfigError, match=r"too few for 16 workers: cap the group at 12 \(--workers 2-12\)"):
        check_resumed_batch(TrainConfig(workers=[2, 16], data=DataConfig(batch_size=8)), recorded)
    check_resumed_batch(TrainConfig(workers=7), {"global_step": 3.0})  # a checkpoint older than elastic groups
