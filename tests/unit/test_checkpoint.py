"""Checkpoints: one plain dict that survives save -> load, refuses foreign files, and resumes a trainer exactly.

The trainer runs in this process (no Ray, one rank, CPU) on a tiny U-Net over a lake ingested from
generated 64 px photos, so a whole multi-stage run takes a couple of seconds.

Long on purpose: the payload, its faults and a real trainer's resume share the tiny lake fixture.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ingest import faults
from ingest.driver import IngestConfig, run_ingest
from ingest.errors import ConfigError
from pipeline.checkpoint import CHECKPOINT_FILE, FORMAT, CheckpointError, Position, load_checkpoint, save_checkpoint
from pipeline.config import DataConfig, ModelConfig, StageConfig, TrainConfig
from pipeline.data.plan import DataPlan, resolve_data
from pipeline.train.checkpoint_store import (
    UPLOAD_ATTEMPTS_ENV,
    fallback_order,
    first_readable,
    repair_run_snapshot,
    upload_attempts,
    upload_with_retries,
)
from pipeline.train.loop import ColorizerTrainer, unwrap

# --- a tiny lake and config ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lake(tmp_path_factory, photo_writer) -> tuple[str, DataPlan]:
    """20 colourful photos ingested at 64 px (the validation split is a fifth of them, by content hash)."""
    root = tmp_path_factory.mktemp("tiny-lake")
    photo_writer(root / "photos", range(20), width=80, height=64)
    lake = str(root / "lake")
    run_ingest(
        IngestConfig(
            kind="folder",
            source=str(root / "photos"),
            dataset="tiny",
            lake=lake,
            size=64,
            use_ray=False,
            progress=False,
        )
    )
    plan = resolve_data(["tiny"], lake)
    assert plan.count("train") >= 12 and plan.count("val") >= 2
    return lake, plan


def tiny_config(lake: str, **overrides) -> TrainConfig:
    values = dict(
        name="tiny",
        model=ModelConfig(base_filters=4, num_downs=6),
        stages=[StageConfig(name="l1", epochs=1, gan_mode=None), StageConfig(name="gan", epochs=2, decay_epochs=1)],
        data=DataConfig(datasets=["tiny"], lake=lake, batch_size=2, shuffle_window=8, prefetch_batches=2),
        checkpoint_every=1,
        log_every=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def no_progress_bar(monkeypatch):
    monkeypatch.setenv("RECOLOR_NO_PROGRESS", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as a Ray worker of one CPU has: tiny convolutions gain nothing from more, and on a
    busy machine OpenMP's spinning threads make these runs ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """A `report` callback: keeps every report's metrics, and saves the payload of chosen global steps."""

    def __init__(self, folder: Path | None = None, save_at: tuple[int, ...] = ()):
        self.metrics: list[dict] = []
        self.folder = folder
        self.save_at = save_at
        self.saved: dict[int, Path] = {}

    def __call__(self, metrics: dict, payload: dict | None) -> None:
        assert payload is not None  # rank 0 always adds its checkpoint
        self.metrics.append(dict(metrics))
        step = int(metrics["global_step"])
        if step in self.save_at:
            # Saved at once, as ray_report does: the payload's tensors are the live parameters.
            directory = self.folder / f"step{step}"
            directory.mkdir()
            self.saved[step] = save_checkpoint(directory, payload)


def new_trainer(config: TrainConfig, plan: DataPlan, report=None, payload: dict | None = None) -> ColorizerTrainer:
    torch.manual_seed(config.seed)  # as train_loop_per_worker: the same initial weights on every rank
    return ColorizerTrainer(config, plan, 0, 1, torch.device("cpu"), report=report, checkpoint_payload=payload)


def states(trainer: ColorizerTrainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (BatchNorm running statistics included) of both networks."""
    generator = {f"G.{k}": v for k, v in unwrap(trainer.generator).state_dict().items()}
    discriminator = {f"D.{k}": v for k, v in unwrap(trainer.discriminator).state_dict().items()}
    return {name: tensor.detach().clone() for name, tensor in {**generator, **discriminator}.items()}


def assert_same_states(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- save and load ---------------------------------------------------------------------------------


def example_payload() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    model(torch.randn(2, 1, 5, 5)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {
        "format": FORMAT,
        "generator": model.state_dict(),
        "discriminator": {"weight": torch.arange(6.0).reshape(2, 3)},
        "opt_g": optimizer.state_dict(),
        "opt_d": optimizer.state_dict(),
        "sched_g": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "sched_d": {"last_epoch": 1},
        "position": Position(stage=1, epoch=2, step_in_epoch=3, global_step=40).to_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "config": TrainConfig(stages=[StageConfig(gan_mode=None), StageConfig()]).to_dict(),
        "data": {"refs": ["tiny@1"], "digests": {"tiny@1": "ab" * 32}},
    }


def assert_same_payload(loaded, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(loaded, torch.Tensor) and torch.equal(loaded, expected)
    elif isinstance(expected, dict):
        assert loaded.keys() == expected.keys()
        for key in expected:
            assert_same_payload(loaded[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(loaded) == len(expected)
        for a, b in zip(loaded, expected, strict=True):
            assert_same_payload(a, b)
    else:
        assert loaded == expected


def test_save_then_load_round_trips_every_part_of_the_payload(tmp_path) -> None:
    payload = example_payload()
    path = save_checkpoint(tmp_path, payload)
    assert path == tmp_path / CHECKPOINT_FILE
    for source in (tmp_path, path, str(path), path.read_bytes()):  # a directory, a file, bytes
        loaded = load_checkpoint(source)
        assert_same_payload(loaded, payload)
    loaded = load_checkpoint(path)
    assert TrainConfig.from_dict(loaded["config"]).stages[0].gan_mode is None
    assert Position(**loaded["position"]) == Position(1, 2, 3, 40)
    optimizer = torch.optim.Adam(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).parameters())
    optimizer.load_state_dict(loaded["opt_g"])  # loads back into a fresh optimizer
    assert optimizer.param_groups[0]["betas"] == (0.5, 0.999)


class Touch:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_corrupt_and_foreign_files_are_value_errors_naming_the_file(tmp_path) -> None:
    good = save_checkpoint(tmp_path, example_payload()).read_bytes()
    marker = tmp_path / "unpickled"
    code = io.BytesIO()
    torch.save({"format": FORMAT, "generator": Touch(marker)}, code)
    cases = {
        "garbage.pt": (b"\x00\x01 definitely not a zip or a pickle" * 10, "not a readable checkpoint"),
        "truncated.pt": (good[: len(good) // 2], "not a readable checkpoint"),
        "empty.pt": (b"", "not a readable checkpoint"),
        "plain-pickle.pt": (pickle.dumps({"format": FORMAT, "generator": {}}), "not a readable checkpoint"),
        "code.pt": (code.getvalue(), "not a readable checkpoint"),
    }
    foreign = {
        "foreign.pt": {"state_dict": {"weight": torch.zeros(2)}},
        "other-format.pt": {**example_payload(), "format": FORMAT + 1},
        "no-generator.pt": {"format": FORMAT},
        "a-list.pt": [torch.zeros(1)],
    }
    for name, value in foreign.items():
        buffer = io.BytesIO()
        torch.save(value, buffer)
        cases[name] = (buffer.getvalue(), "is not a recolor checkpoint")
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message) as error:
            load_checkpoint(path)
        assert str(path) in str(error.value), name
    assert not marker.exists(), "loading a checkpoint ran code from it"
    with pytest.raises(ValueError, match="checkpoint bytes"):
        load_checkpoint(b"junk")
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty-dir"):
        load_checkpoint(empty_dir)


# --- faults: uploads that fail, checkpoints that do not load ------------------------------------------


class FlakyUpload:
    """An upload into `destination` that fails its first `failures` attempts midway, leaving a partial file."""

    def __init__(self, source: Path, destination: Path, failures: int, error=OSError):
        self.source, self.destination, self.failures, self.error = source, destination, failures, error
        self.calls = 0

    def __call__(self) -> Path:
        self.calls += 1
        self.destination.mkdir(exist_ok=True)
        target = self.destination / CHECKPOINT_FILE
        data = self.source.read_bytes()
        if self.calls <= self.failures:
            target.write_bytes(data[: len(data) // 3])
            raise self.error(f"connection reset during attempt {self.calls}")
        target.write_bytes(data)
        return target


def discard_directory(directory: Path):
    def discard() -> None:
        for path in directory.glob("*"):
            path.unlink()
        directory.rmdir()

    return discard


def test_an_upload_that_fails_twice_is_retried_with_growing_waits_and_only_the_whole_copy_remains(
    tmp_path, caplog
) -> None:
    source = save_checkpoint(tmp_path, example_payload())
    destination = tmp_path / "runs" / "checkpoint_2025-01-01_00-00-00.000001"
    destination.parent.mkdir()
    upload = FlakyUpload(source, destination, failures=2)
    waits: list[float] = []
    with caplog.at_level("WARNING", logger="pipeline.train.checkpoint_store"):
        result = upload_with_retries(
            upload, str(destination), attempts=4, discard=discard_directory(destination), sleep=waits.append
        )
    assert result == destination / CHECKPOINT_FILE and upload.calls == 3
    assert waits == [1.0, 2.0]
    assert_same_payload(load_checkpoint(destination), example_payload())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    for attempt, message in enumerate(warnings, start=1):
        assert f"checkpoint upload to {destination} failed (attempt {attempt} of 4)" in message
        assert f"connection reset during attempt {attempt}" in message


def test_an_upload_that_keeps_failing_gives_up_after_the_last_attempt_with_a_clear_error(tmp_path) -> None:
    source = save_checkpoint(tmp_path, example_payload())
    destination = tmp_path / "checkpoint_2025-01-01_00-00-00.000001"
    upload = FlakyUpload(source, destination, failures=10)
    waits: list[float] = []
    with pytest.raises(CheckpointError) as error:
        upload_with_retries(
            upload,
            str(destination),
            attempts=3,
            discard=discard_directory(destination),
            backoff_s=0.5,
            sleep=waits.append,
        )
    assert str(error.value) == (
        f"checkpoint upload to {destination} failed 3 times; last error: connection reset during attempt 3"
    )
    assert isinstance(error.value.__cause__, OSError)
    assert upload.calls == 3 and waits == [0.5, 1.0]
    assert not destination.exists(), "the last partial copy was left behind"


def test_the_checkpoint_upload_failpoint_is_one_transient_failure(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(faults.ENV, "checkpoint_upload:1:raise")
    monkeypatch.setenv(faults.ONCE_ENV, str(tmp_path / "fired"))
    calls = []

    def upload() -> str:
        faults.maybe_fail("checkpoint_upload", 0)
        calls.append(1)
        return "uploaded"

    assert upload_with_retries(upload, "somewhere", attempts=2, sleep=lambda s: None) == "uploaded"
    assert len(calls) == 1 and (tmp_path / "fired").exists()


def test_errors_other_than_os_errors_are_not_retried(tmp_path) -> None:
    upload = FlakyUpload(save_checkpoint(tmp_path, example_payload()), tmp_path / "out", failures=1, error=TypeError)
    with pytest.raises(TypeError):
        upload_with_retries(upload, "out", attempts=4, sleep=lambda s: None)
    assert upload.calls == 1


def test_upload_attempts_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(UPLOAD_ATTEMPTS_ENV, raising=False)
    assert upload_attempts() == 4
    monkeypatch.setenv(UPLOAD_ATTEMPTS_ENV, "2")
    assert upload_attempts() == 2
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(UPLOAD_ATTEMPTS_ENV, bad)
        with pytest.raises(ValueError, match=UPLOAD_ATTEMPTS_ENV):
            upload_attempts()


def test_fallback_order_is_the_older_checkpoints_newest_first() -> None:
    latest = "checkpoint_2025-03-01_10-00-00.000300"
    names = [
        "checkpoint_2025-03-01_09-59-59.999999",
        latest,
        "checkpoint_2025-03-01_10-00-00.000400",  # newer than the latest: an upload never reported
        "checkpoint_2025-02-28_23-00-00.000000",
        ".validate_storage_marker",
        "checkpoint_manager_snapshot.json",
        "checkpoint_2025-03-01_10-00-00.000299",
    ]
    assert fallback_order(latest, names) == [
        "checkpoint_2025-03-01_10-00-00.000299",
        "checkpoint_2025-03-01_09-59-59.999999",
        "checkpoint_2025-02-28_23-00-00.000000",
    ]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, caplog) -> None:
    folders = {}
    for step in (2, 4, 6):
        folders[step] = tmp_path / f"step{step}"
        folders[step].mkdir()
        save_checkpoint(folders[step], {**example_payload(), "position": Position(0, 0, step, step).to_dict()})
    latest = folders[6] / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    (folders[4] / CHECKPOINT_FILE).write_bytes(b"garbage" * 100)
    requested: list[str] = []

    def candidates():
        for name in ("step6", "step4", "step2", "never-needed"):
            requested.append(name)
            yield name

    with caplog.at_level("WARNING", logger="pipeline.train.checkpoint_store"):
        name, payload = first_readable(candidates(), lambda name: load_checkpoint(tmp_path / name))
    assert name == "step2" and payload["position"]["global_step"] == 2
    assert requested == ["step6", "step4", "step2"]  # the older ones are looked up only when needed
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings[0].startswith("step6 is unreadable: ") and warnings[1].startswith("step4 is unreadable: ")
    assert warnings[2] == "resuming from step2 instead of the unreadable step6, step4"

    assert first_readable(["step2"], lambda name: load_checkpoint(tmp_path / name))[0] == "step2"
    with pytest.raises(
        CheckpointError,
        match=r"^no readable checkpoint to resume from \(step6: .*step6 is not a readable.*; step4: .*\)$",
    ):
        first_readable(["step6", "step4"], lambda name: load_checkpoint(tmp_path / name))


def test_missing_and_unreachable_checkpoints_in_the_fallback(tmp_path, caplog) -> None:
    save_checkpoint(tmp_path, example_payload())

    def load(name: str) -> dict:
        if name == "gone":
            raise FileNotFoundError("Path not found: runs/r/gone")  # what Ray's download raises
        if name == "partial":
            raise OSError("unexpected end of stream")
        return load_checkpoint(tmp_path)

    with caplog.at_level("WARNING", logger="pipeline.train.checkpoint_store"):
        assert first_readable(["gone", "partial", "whole"], load)[0] == "whole"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "gone is unreadable: FileNotFoundError: Path not found: runs/r/gone",
        "partial is unreadable: OSError: unexpected end of stream",
        "resuming from whole instead of the unreadable gone, partial",
    ]
    from ingest.storage import StorageError

    def unreachable(name: str) -> dict:
        raise StorageError("S3 endpoint http://127.0.0.1:1 unreachable")

    with pytest.raises(StorageError):  # a store that is down is not a reason to pass over every checkpoint
        first_readable(["a", "b"], unreachable)


def ray_snapshot(names: list[str], latest: str | None) -> dict:
    """Ray Train 2.60's `checkpoint_manager_snapshot.json`, reduced to the fields the repair touches."""

    def result(name: str) -> dict:
        return {"version": 0, "checkpoint_dir_name": name, "metrics": {"global_step": float(names.index(name))}}

    return {
        "ray_version": "2.60.0",
        "checkpoint_results": [result(name) for name in names],
        "checkpoint_report_indices": list(range(10, 10 + len(names))),
        "latest_checkpoint_result": result(latest) if latest else None,
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": 10 + len(names),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }


def test_a_rerun_after_lost_checkpoints_resumes_from_what_is_left_or_starts_over(tmp_path, caplog) -> None:
    import json

    run = tmp_path / "run"
    names = ["checkpoint_2025-01-01_00-00-01.000000", "checkpoint_2025-01-01_00-00-02.000000",
             "checkpoint_2025-01-01_00-00-03.000000"]  # fmt: skip
    for name in names:
        save_checkpoint((run / name).mkdir(parents=True) or run / name, example_payload())
    snapshot = run / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps(ray_snapshot(names, names[2])))
    cut_short = run / "checkpoint_2025-01-01_00-00-04.000000"  # an upload a crash cut short: never recorded
    cut_short.mkdir()
    (cut_short / CHECKPOINT_FILE).write_bytes(b"half")
    (run / "notes").mkdir()
    (run / "notes" / "keep.txt").write_text("not Ray's")
    assert repair_run_snapshot(str(run)) is None  # the record is whole: untouched
    assert json.loads(snapshot.read_text()) == ray_snapshot(names, names[2])
    assert not cut_short.exists() and (run / "notes" / "keep.txt").exists()

    (run / names[2] / CHECKPOINT_FILE).unlink()  # the latest, lost
    (run / names[0] / CHECKPOINT_FILE).unlink()
    with caplog.at_level("WARNING", logger="pipeline.train.checkpoint_store"):
        message = repair_run_snapshot(str(run))
    assert message == f"checkpoints {names[0]}, {names[2]} of {run} are missing: resuming from {names[1]}"
    assert message in caplog.messages
    repaired = json.loads(snapshot.read_text())
    assert [r["checkpoint_dir_name"] for r in repaired["checkpoint_results"]] == [names[1]]
    assert repaired["checkpoint_report_indices"] == [11]
    assert repaired["latest_checkpoint_result"]["checkpoint_dir_name"] == names[1]

    (run / names[1] / CHECKPOINT_FILE).unlink()
    message = repair_run_snapshot(str(run))
    assert message.startswith(f"none of the checkpoints recorded for {run} is left") and "first step" in message
    assert not snapshot.exists()  # Ray Train then starts the run afresh
    assert repair_run_snapshot(str(run)) is None

    snapshot.write_text('{"ray_version": "2.60.0", "checkpoint_res')  # torn
    with pytest.raises(CheckpointError, match=r"checkpoint_manager_snapshot.json is not readable JSON .*--name"):
        repair_run_snapshot(str(run))


def test_whole_checkpoints_newer_than_rays_record_are_the_resume_point_never_garbage(tmp_path, caplog) -> None:
    """The hostile pass's reproduction: a driver stopped by SIGTERM left Ray's record at step 65, while whole
    checkpoints of steps 78 and 91 were on disk; the rerun resumed at 65 and deleted both, at info level."""
    import json

    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    from pipeline.train.checkpoint_store import METRICS_FILE, delete_unrecorded, latest_recorded

    run = tmp_path / "run"
    names = [f"checkpoint_2026-12-04_10-00-{second:02d}.000000" for second in (52, 65, 78, 91, 99)]
    steps = dict(zip(names, (52, 65, 78, 91, 99), strict=True))
    for name in names[:4]:
        payload = example_payload()
        payload["position"] = {"stage": 0, "epoch": 1, "step_in_epoch": 3, "global_step": steps[name]}
        save_checkpoint((run / name).mkdir(parents=True) or run / name, payload)
    reported = {"global_step": 91.0, "global_batch": 4.0, "workers": 1.0, "epoch": 1.0, "stage": 0.0}
    (run / names[3] / METRICS_FILE).write_text(json.dumps(reported))  # 78 was written without it (older mains)
    (run / names[4]).mkdir()
    (run / names[4] / CHECKPOINT_FILE).write_bytes(b"half an upload")  # cut short: not whole
    record = ray_snapshot(names[:2], names[1])
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))

    with caplog.at_level("WARNING", logger="pipeline.train.checkpoint_store"):
        message = repair_run_snapshot(str(run))  # the driver, before any worker starts
    assert message.startswith(f"resuming {run}") and f"from {names[3]} (step 91)" in message
    assert names[2] in message and "kept" in message
    assert message in caplog.messages
    assert any(f"deleted {run / names[4]}" in line for line in caplog.messages)  # said, not logged at info
    assert not (run / names[4]).exists()
    assert latest_recorded(str(run)) == (names[3], reported)
    repaired = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    _CheckpointManagerState.parse_obj(repaired)  # Ray Train 2.60 reads the record it resumes by
    assert [r["checkpoint_dir_name"] for r in repaired["checkpoint_results"]] == names[:4]
    assert repaired["checkpoint_report_indices"] == [10, 11, 12, 13]
    assert repaired["current_report_index"] == 14
    assert repaired["checkpoint_results"][2]["metrics"] == {"global_step": 78.0, "stage": 0.0}  # from its position
    assert repair_run_snapshot(str(run)) is None  # nothing more to do
    delete_unrecorded(str(run))  # what rank 0 then does as the run starts: the adopted ones are recorded now
    assert all((run / name / CHECKPOINT_FILE).exists() for name in names[:4])

    # No record at all (stopped before Ray wrote its first): the whole checkpoint becomes the record's only one.
    (run / "checkpoint_manager_snapshot.json").unlink()
    for name in names[:3]:
        for item in (run / name).iterdir():
            item.unlink()
        (run / name).rmdir()
    assert repair_run_snapshot(str(run)).startswith(f"resuming {run} from {names[3]}")
    assert latest_recorded(str(run)) == (names[3], reported)


# --- a real trainer ------------------------------------------------------------------------------


def test_trainer_stops_at_max_steps_and_its_payload_restores_a_fresh_trainer(tiny_lake, tmp_path) -> None:
    lake, plan = tiny_lake
    config = tiny_config(lake, max_steps=3, checkpoint_every=1)
    recorder = Recorder(tmp_path, save_at=(2, 3))
    trainer = new_trainer(config, plan, recorder)
    before = states(trainer)
    assert trainer.run() == {}  # stopped by max_steps before any epoch ended
    assert trainer.position == Position(stage=0, epoch=0, step_in_epoch=3, global_step=3)
    assert [m["global_step"] for m in recorder.metrics] == [1, 2, 3]
    changed = [name for name, tensor in states(trainer).items() if not torch.equal(tensor, before[name])]
    assert any(name.startswith("G.") for name in changed)
    assert not any(name.startswith("D.") for name in changed)  # the L1-only stage leaves D alone

    payload = load_checkpoint(recorder.saved[2])
    assert payload["position"] == {"stage": 0, "epoch": 0, "step_in_epoch": 2, "global_step": 2}
    assert payload["config"] == config.to_dict()
    assert payload["format"] == 2
    assert payload["data"] == {"refs": plan.refs, "digests": plan.digests, "size": plan.size, "resize": plan.resize,
                               "read": {"version": 1, "interleave": 4, "global_batch": 2, "splits": [[1, 0]],
                                        "owned": False, "window": 8}}  # fmt: skip
    assert payload["opt_g"]["state"], "the generator's Adam moments are missing"
    assert payload["sched_g"]["last_epoch"] == 0

    # The last checkpoint holds the trainer's final state: a fresh trainer (other seed) loads it identically.
    torch.manual_seed(1234)
    fresh = ColorizerTrainer(
        config, plan, 0, 1, torch.device("cpu"), checkpoint_payload=load_checkpoint(recorder.saved[3])
    )
    assert fresh.position == trainer.position
    assert_same_states(states(fresh), states(trainer))
    assert not torch.equal(states(fresh)["G.down_blocks.0.weight"], before["G.down_blocks.0.weight"])


def test_cpu_amp_on_trains_the_cpu_step_in_bf16_channels_last_and_off_in_fp32(tiny_lake, monkeypatch) -> None:
    lake, plan = tiny_lake
    seen: dict[str, set] = {"on": set(), "off": set()}
    for mode in ("on", "off"):
        trainer = new_trainer(tiny_config(lake, max_steps=2, cpu_amp=mode), plan)
        trainer.plain_generator.register_forward_hook(
            lambda module, args, out, mode=mode: seen[mode].add((out.dtype, out.is_contiguous(
                memory_format=torch.channels_last)) if module.training else None)
        )  # fmt: skip
        trainer.run()
        assert all(torch.isfinite(tensor).all() for tensor in states(trainer).values() if tensor.is_floating_point())
    assert seen["on"] - {None} == {(torch.bfloat16, True)}
    assert seen["off"] - {None} == {(torch.float32, False)}
    with pytest.raises(ConfigError, match=r"cpu_amp must be one of \('off', 'auto', 'on'\), got 'yes'"):
        tiny_config(lake, cpu_amp="yes")


@pytest.fixture(scope="module")
def uninterrupted(tiny_lake, tmp_path_factory):
    """The whole tiny run (L1 stage of 1 epoch, GAN stage of 2 epochs), never interrupted."""
    lake, plan = tiny_lake
    recorder = Recorder()
    trainer = new_trainer(tiny_config(lake), plan, recorder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECOLOR_NO_PROGRESS", "1")
        trainer.run()
    return trainer, recorder


def test_uninterrupted_run_trains_every_stage_and_validates_each_epoch(uninterrupted, tiny_lake) -> None:
    trainer, recorder = uninterrupted
    _, plan = tiny_lake
    steps = plan.count("train") // 2
    assert trainer.position == Position(stage=2, epoch=0, step_in_epoch=0, global_step=3 * steps)
    assert [m["global_step"] for m in recorder.metrics] == list(range(1, 3 * steps + 1))
    epoch_ends = [m for m in recorder.metrics if m.get("epoch_end")]
    assert [m["global_step"] for m in epoch_ends] == [steps, 2 * steps, 3 * steps]
    assert all(m["val/count"] == plan.count("val") and m["data/bad_samples"] == 0 for m in epoch_ends)
    assert "train/loss_D" not in epoch_ends[0] and "train/loss_D" in epoch_ends[1]  # stage 1 is L1 only
    assert all(np.isfinite(m["train/loss_G"]) for m in recorder.metrics)


@pytest.mark.parametrize("where", ["mid L1 stage", "stage boundary", "mid GAN epoch 2 (decaying lr)"])
def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(uninterrupted, tiny_lake, tmp_path, where) -> None:
    reference, reference_recorder = uninterrupted
    lake, plan = tiny_lake
    steps = plan.count("train") // 2
    resume_at = {"mid L1 stage": 3, "stage boundary": steps, "mid GAN epoch 2 (decaying lr)": 2 * steps + 3}[where]

    first = Recorder(tmp_path, save_at=(resume_at,))
    new_trainer(tiny_config(lake, max_steps=resume_at), plan, first).run()
    assert first.metrics == reference_recorder.metrics[:resume_at]  # identical up to the interruption

    payload = load_checkpoint(recorder_path := first.saved[resume_at])
    assert payload["position"]["global_step"] == resume_at, recorder_path
    second = Recorder()
    torch.manual_seed(99)  # the resumed weights must come from the checkpoint, not from the seed
    resumed = ColorizerTrainer(
        tiny_config(lake), plan, 0, 1, torch.device("cpu"), report=second, checkpoint_payload=payload
    )
    resumed.run()
    assert resumed.position == reference.position
    assert [m["global_step"] for m in second.metrics] == list(range(resume_at + 1, 3 * steps + 1))
    assert second.metrics == reference_recorder.metrics[resume_at:]  # the same losses, step by step
    assert_same_states(states(resumed), states(reference))


# --- what limits a run: the loader's wait and MFU -------------------------------------------------------------


class ListLogger:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append((step, dict(metrics)))

    def log_image(self, png: bytes, artifact_path: str, key=None, step=None) -> None:
        pass

    def event(self, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def test_every_log_says_how_long_steps_waited_for_data_and_the_mfu_against_a_known_peak(tiny_lake, monkeypatch):
    from pipeline.train.throughput import step_flops_per_sample

    lake, plan = tiny_lake
    monkeypatch.setenv("RECOLOR_PEAK_TFLOPS", "0.5")  # a made-up peak: this CPU is in no table
    config = tiny_config(lake, max_steps=8, log_every=2)
    torch.manual_seed(config.seed)
    logger = ListLogger()
    trainer = ColorizerTrainer(config, plan, 0, 1, torch.device("cpu"), logger=logger)
    trainer.run()
    logs = [metrics for _, metrics in logger.logged if "train/images_per_s" in metrics]
    assert logs and all(metrics["data/wait_s"] >= 0 and 0 < metrics["train/mfu"] < 1 for metrics in logs)
    assert all(isinstance(metrics["train/loss_G"], float) for metrics in logs)  # tensors become floats at the log only
    gan = step_flops_per_sample(trainer.plain_generator, trainer.plain_discriminator, plan.size, True, trainer.device)
    l1 = step_flops_per_sample(trainer.plain_generator, trainer.plain_discriminator, plan.size, False, trainer.device)
    assert gan > l1 > 0
    for metrics in logs:  # the measured rate times the FLOPs of the step of its stage (L1 only, or with D)
        rate = metrics["train/images_per_s"]
        assert any(metrics["train/mfu"] == pytest.approx(rate * flops / 0.5e12) for flops in (gan, l1))

    monkeypatch.delenv("RECOLOR_PEAK_TFLOPS")
    logger = ListLogger()
    torch.manual_seed(config.seed)
    ColorizerTrainer(dataclasses.replace(config, max_steps=2), plan, 0, 1, torch.device("cpu"), logger=logger).run()
    logged = [metrics for _, metrics in logger.logged if "train/images_per_s" in metrics]
    assert logged and all("train/mfu" not in m and "data/wait_s" in m for m in logged)  # no peak, no MFU


# --- the read order of a resumed epoch ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_lake(tmp_path_factory, photo_writer) -> tuple[str, DataPlan]:
    """The tiny photos in shards of about three samples: the order of shards read at once matters."""
    root = tmp_path_factory.mktemp("sharded-lake")
    photo_writer(root / "photos", range(20), width=80, height=64)
    lake = str(root / "lake")
    run_ingest(IngestConfig(kind="folder", source=str(root / "photos"), dataset="tiny", lake=lake, size=64,
                            shard_size=3 * (3 * 64 * 64 + 1536), use_ray=False, progress=False))  # fmt: skip
    plan = resolve_data(["tiny"], lake)
    assert len(plan.train) >= 4
    return lake, plan


@pytest.mark.parametrize(
    "setting, began, resumed, old_checkpoint",
    [
        ("interleave", 1, 4, False),
        ("interleave", 1, 4, True),
        ("shard_ownership", "on", "off", False),
        ("shuffle_window", 2, 4, False),
    ],
    ids=["interleave", "interleave-old-checkpoint", "shard-ownership", "shuffle-window"],
)
def test_an_epoch_resumed_under_another_read_order_finishes_in_the_order_it_began(sharded_lake, tmp_path, setting,
                                                                                 began, resumed,
                                                                                 old_checkpoint) -> None:  # fmt: skip
    # data.interleave, data.shuffle_window or data.shard_ownership (or data.cache, which "auto" follows) changed
    # between a stop and its resume: the epoch in progress keeps the order it began with; the next one uses the new
    # setting.
    lake, plan = sharded_lake
    steps = plan.count("train") // 2
    one_stage = [StageConfig(name="l1", epochs=1, gan_mode=None)]

    def config(value, **overrides) -> TrainConfig:
        settings = {"shuffle_window": 2} | {setting: value}
        data = DataConfig(datasets=["tiny"], lake=lake, batch_size=2, prefetch_batches=0, flip=False, **settings)
        return tiny_config(lake, stages=one_stage, data=data, **overrides)

    as_begun, other = Recorder(), Recorder()
    new_trainer(config(began), plan, as_begun).run()
    new_trainer(config(resumed), plan, other).run()
    assert [m["train/loss_G"] for m in as_begun.metrics] != [m["train/loss_G"] for m in other.metrics]

    first = Recorder(tmp_path, save_at=(3,))
    new_trainer(config(began, max_steps=3), plan, first).run()
    payload = load_checkpoint(first.saved[3])
    key, value = {"interleave": ("interleave", 1), "shard_ownership": ("owned", True),
                  "shuffle_window": ("window", 2)}[setting]  # fmt: skip
    assert payload["data"]["read"][key] == value
    if old_checkpoint:  # format 1, written before the reader interleaved shards: it read one shard after the other
        torch.save(as_format_1(payload, without=key), tmp_path / "old.pt")
        payload = load_checkpoint(tmp_path / "old.pt")
    second = Recorder()
    ColorizerTrainer(config(resumed), plan, 0, 1, torch.device("cpu"), report=second, checkpoint_payload=payload).run()
    assert second.metrics == as_begun.metrics[3:steps]  # the epoch ends as it would have under its first setting


def test_local_checkpoint_folders_of_dead_workers_are_removed_and_live_ones_kept(tmp_path) -> None:
    """A failed run left `recolor-checkpoint-*` (6 MB) in the temporary folder: the next worker removes it."""
    import os
    import subprocess
    import sys

    from pipeline.train.worker import LOCAL_CHECKPOINT_PREFIX, remove_orphan_checkpoints

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{LOCAL_CHECKPOINT_PREFIX}{int(gone.stdout)}-abc"
    live = tmp_path / f"{LOCAL_CHECKPOINT_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{LOCAL_CHECKPOINT_PREFIX}notapid"
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / CHECKPOINT_FILE).write_bytes(b"x" * 1000)
    assert remove_orphan_checkpoints(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists()


def as_format_1(payload: dict, without: str | None = None) -> dict:
    """A format-2 payload as recolor wrote it before the read state had its own section (format 1, until
    2026-12-07): the read state's fields in "data" itself; `without` leaves one out, as checkpoints older than it."""
    old = {**payload, "format": 1, "data": dict(payload["data"])}
    read = old["data"].pop("read")
    old["data"] |= {name: value for name, value in read.items() if name not in ("version", without)}
    return old


def test_a_checkpoint_of_the_first_format_loads_and_resumes_where_it_was_taken() -> None:
    """tests/data/checkpoint-format1.pt was written by recolor's `build_payload` of format 1 (commit b196dfb): a U-Net
    of base width 2, mid-epoch (stage 0, epoch 1, step 3) on a group that had shrunk from 2 workers to 1, reading one
    shard at a time, ranks owning their shards. It loads as format 2, its read state whole, and a group of 2 resumes
    from it: its weights, its position, its samples a step, and the resize said. (That a format-1 checkpoint's epoch
    then reads on exactly as it began: `test_an_epoch_resumed_under_another_read_order_finishes_in_the_order_it_began`
    [interleave-old-checkpoint].)"""
    from pipeline.checkpoint import payload_config, read_state, restore_networks
    from pipeline.data.plan import DataPlan
    from pipeline.data.reader import EpochReader
    from pipeline.models import build_discriminator, build_generator

    path = Path(__file__).parents[1] / "data" / "checkpoint-format1.pt"
    payload = load_checkpoint(path)
    assert payload["format"] == FORMAT == 2
    assert read_state(payload) == {"version": 1, "interleave": 1, "global_batch": 4, "splits": [[2, 0], [1, 3]],
                                   "owned": True, "window": 0}  # fmt: skip
    config = payload_config(payload)
    generator = build_generator("unet_256", norm="batch", base_filters=2, num_downs=5)
    discriminator = build_discriminator(base_filters=2, norm="batch")
    assert restore_networks(payload, generator, discriminator) == Position(stage=0, epoch=1, step_in_epoch=3,
                                                                           global_step=11)  # fmt: skip
    assert all(torch.equal(generator.state_dict()[name], tensor) for name, tensor in payload["generator"].items())
    plan = DataPlan(refs=["tiny@1"], digests={"tiny@1": "0" * 64}, uris={"tiny@1": "/nowhere"}, size=32)
    reader = EpochReader(config, plan, 0, 2)
    reader.load_state_dict(read_state(payload))
    assert reader.global_batch == 4 and reader.resized_from() == 1  # the group of 1 that took it, now 2
    note = reader.resize_note(Position(stage=0, epoch=1, step_in_epoch=3, global_step=11))
    assert note == "worker group resized 1 -> 2 (stage 0, epoch 1, step 3 of the epoch); 4 samples a step, 2 a worker"
