"""Real Ray Train DDP with two CPU workers (gloo) on a tiny lake: identical ranks, exact resume, a killed worker.

Every run uses the session's local Ray (`ray_local`, which `run_training` reuses), a U-Net of base
width 4 on 64 px samples and batch 2 per worker, in deterministic mode, so two runs that train on the
same samples end with bit-identical weights. One epoch is `train samples // 4` steps. A Ray Train run
costs 15-25 s on two cores; the CLI test starts its own Ray in a subprocess.

Hooks (`on_worker_end`, `logger_factory`) travel to the workers by pickle: they are closures, which
cloudpickle ships by value (a function of this test module would be pickled by reference, and the
workers cannot import the test module).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ingest.driver import IngestConfig, run_ingest
from pipeline.checkpoint import load_checkpoint
from pipeline.config import DataConfig, ModelConfig, StageConfig, TrainConfig
from pipeline.dataplan import DataPlan, resolve_data
from pipeline.models import build_generator
from pipeline.train.driver import TrainResult, run_training

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BATCH, WORKERS = 2, 2


# --- hooks run on the workers ------------------------------------------------------------------------


def state_saver(folder: Path):
    """An `on_worker_end` hook: each rank saves both networks' state dicts to folder/rank{r}.pt."""
    folder = str(folder)

    def save(trainer) -> None:
        from pipeline.train.loop import unwrap

        states = {
            "generator": unwrap(trainer.generator).state_dict(),
            "discriminator": unwrap(trainer.discriminator).state_dict(),
            "position": trainer.position.to_dict(),
            # DDP's buffer broadcast before every forward breaks the two-forward discriminator step on older torch.
            "broadcast_buffers": [
                getattr(m, "broadcast_buffers", None) for m in (trainer.generator, trainer.discriminator)
            ],
        }
        torch.save(states, f"{folder}/rank{trainer.rank}.pt")

    return save


def start_recorder(path: Path):
    """A `logger_factory`: rank 0 appends the global step it starts from (0 or the checkpoint's) to `path`."""
    path = str(path)

    def factory(config, plan, payload):
        from pipeline.tracking.loggers import NullLogger

        with open(path, "a") as f:
            f.write(f"{payload['position']['global_step'] if payload else 0}\n")
        return NullLogger()

    return factory


def starts(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def load_rank(folder: Path, rank: int) -> dict:
    return torch.load(folder / f"rank{rank}.pt", weights_only=True)


def differing(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    assert first.keys() == second.keys()
    return [name for name in first if not torch.equal(first[name], second[name])]


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_lake(tmp_path_factory, photo_writer) -> tuple[str, DataPlan]:
    """40 colourful photos at 64 px in small, uneven shards (one to two samples each)."""
    root = tmp_path_factory.mktemp("train-lake")
    photo_writer(root / "photos", range(40), width=80, height=64)
    lake = str(root / "lake")
    run_ingest(
        IngestConfig(
            kind="folder",
            source=str(root / "photos"),
            dataset="photos",
            lake=lake,
            size=64,
            shard_size=40_000,
            use_ray=False,
            progress=False,
        )
    )
    plan = resolve_data(["photos"], lake)
    assert len(plan.train) > WORKERS and plan.count("train") >= 4 * WORKERS * BATCH
    return lake, plan


def tiny_config(lake: str, storage: Path, name: str, **overrides) -> TrainConfig:
    values = dict(
        name=name,
        model=ModelConfig(base_filters=4, num_downs=6),
        stages=[StageConfig(name="gan", epochs=1)],
        data=DataConfig(datasets=["photos"], lake=lake, batch_size=BATCH, shuffle_window=8),
        workers=WORKERS,
        deterministic=True,
        storage=str(storage),
        checkpoint_every=1000,
        log_every=1,
        max_failures=2,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def quiet_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECOLOR_NO_PROGRESS", "1")
        # A worker's report blocks until Ray Train's controller has taken the previous one, and the controller
        # polls every 2 s by default: with checkpoints every few steps that, not compute, would set the pace.
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
        for name in ("RECOLOR_FAILPOINT", "RECOLOR_FAILPOINT_ONCE", "RAY_ADDRESS"):
            patch.delenv(name, raising=False)
        yield patch


@pytest.fixture(scope="module")
def uninterrupted(ray_local, quiet_env, train_lake, tmp_path_factory) -> tuple[TrainResult, Path, int]:
    """Run A: one whole epoch, never interrupted; each rank's final networks saved by the worker-end hook."""
    lake, plan = train_lake
    root = tmp_path_factory.mktemp("run-a")
    result = run_training(
        tiny_config(lake, root / "runs", "a"),
        on_worker_end=state_saver(root),
        logger_factory=start_recorder(root / "starts"),
    )
    return result, root, plan.count("train") // (WORKERS * BATCH)


# --- tests -------------------------------------------------------------------------------------------


def test_both_ranks_hold_identical_networks_after_training(uninterrupted) -> None:
    result, root, steps = uninterrupted
    rank0, rank1 = load_rank(root, 0), load_rank(root, 1)
    assert rank0["position"] == rank1["position"] == {"stage": 1, "epoch": 0, "step_in_epoch": 0, "global_step": steps}
    for network in ("generator", "discriminator"):
        assert not differing(rank0[network], rank1[network]), f"{network} differs between ranks"
    assert any("running_mean" in name for name in rank0["generator"])  # BatchNorm buffers were compared too
    # Two gloo ranks trained with DDP's buffer broadcast off, and the buffers above still agree (_sync_buffers).
    assert rank0["broadcast_buffers"] == rank1["broadcast_buffers"] == [False, False]

    # What rank 0 holds is what the run's last checkpoint holds; training did move the weights.
    payload = load_checkpoint(result.checkpoint)
    assert payload["position"]["global_step"] == steps == int(result.metrics["global_step"])
    assert not differing(payload["generator"], rank0["generator"])
    torch.manual_seed(0)  # the workers' initial weights (config.seed 0)
    initial = build_generator("unet_256", norm="batch", base_filters=4, num_downs=6).state_dict()
    moved = differing(initial, rank0["generator"])
    assert any(name.endswith("weight") for name in moved) and any("running_var" in name for name in moved)
    assert result.metrics["val/count"] == result.plan.count("val")
    assert starts(root / "starts") == [0]


def test_rerun_with_the_same_name_resumes_mid_epoch_and_matches_the_uninterrupted_run(
    uninterrupted, train_lake, tmp_path
) -> None:
    reference, reference_root, steps = uninterrupted
    lake, _ = train_lake
    stop_at = steps // 2 + 1  # mid-epoch, off the shuffle windows' edges
    storage = tmp_path / "runs"
    # Run B reads with 2 loader processes in each rank, run A in the rank's own process: the same batches.
    data = DataConfig(datasets=["photos"], lake=lake, batch_size=BATCH, shuffle_window=8, loader_workers=2)

    first = run_training(tiny_config(lake, storage, "b", max_steps=stop_at, checkpoint_every=stop_at, data=data))
    assert load_checkpoint(first.checkpoint)["position"] == {
        "stage": 0,
        "epoch": 0,
        "step_in_epoch": stop_at,
        "global_step": stop_at,
    }

    second = run_training(
        tiny_config(lake, storage, "b", checkpoint_every=stop_at, data=data),
        on_worker_end=state_saver(tmp_path),
        logger_factory=start_recorder(tmp_path / "starts"),
    )
    assert starts(tmp_path / "starts") == [stop_at], "the rerun did not start from the run's checkpoint"
    final = load_checkpoint(second.checkpoint)
    assert final["position"]["global_step"] == steps  # not stop_at + steps: nothing replayed
    assert final["position"]["epoch"] == 1 and final["position"]["step_in_epoch"] == 0

    expected = load_rank(reference_root, 0)
    for rank in range(WORKERS):
        resumed = load_rank(tmp_path, rank)
        for network in ("generator", "discriminator"):
            assert not differing(resumed[network], expected[network]), f"rank {rank} {network} differs from run A"
    reference_opt = load_checkpoint(reference.checkpoint)["opt_g"]
    assert float(final["opt_g"]["state"][0]["step"]) == float(reference_opt["state"][0]["step"]) == steps


def test_a_killed_worker_is_restarted_and_the_run_finishes_from_its_checkpoint(
    uninterrupted, train_lake, tmp_path, monkeypatch
) -> None:
    _, reference_root, steps = uninterrupted
    lake, _ = train_lake
    killed = tmp_path / "killed"
    # Rank 1 dies (SIGKILL) as it is about to run its 6th step; checkpoints were reported at steps 2 and 4.
    monkeypatch.setenv("RECOLOR_FAILPOINT", "train_step:6@1")
    monkeypatch.setenv("RECOLOR_FAILPOINT_ONCE", str(killed))
    # Synchronous uploads pin which checkpoint the restart begins from: in the background an upload may still be
    # in flight when the worker dies (the soak tests kill workers under asynchronous uploads).
    result = run_training(
        tiny_config(lake, tmp_path / "runs", "c", checkpoint_every=2, checkpoint_upload="sync"),
        on_worker_end=state_saver(tmp_path),
        logger_factory=start_recorder(tmp_path / "starts"),
    )
    assert killed.exists(), "the failpoint never fired"
    first_start, restart = starts(tmp_path / "starts")
    # Step 4's checkpoint unless the controller had not taken it in yet when the worker died.
    assert first_start == 0 and restart in (2, 4), f"the restarted group began at step {restart}, not a checkpoint"
    assert load_checkpoint(result.checkpoint)["position"]["global_step"] == steps
    # Deterministic mode: the crash and the restart changed nothing in the weights.
    for network in ("generator", "discriminator"):
        assert not differing(load_rank(tmp_path, 1)[network], load_rank(reference_root, 0)[network]), network


# --- the CLI ----------------------------------------------------------------------------------------


def test_recolor_train_cli_runs_end_to_end_and_reports_validation(train_lake, tmp_path, cli_runner,
                                                                  ray_address) -> None:  # fmt: skip
    lake, plan = train_lake
    env = {"RECOLOR_NO_PROGRESS": "1"}
    result = cli_runner(
        "train", REPO / "configs" / "tiny.yaml",
        "--dataset", "photos", "--lake", lake, "--storage", tmp_path / "runs", "--name", "cli",
        "model.num_downs=6", "model.base_filters=4", "stages.0.epochs=1", "stages.0.decay_epochs=0",
        "--workers", "2", "checkpoint_every=1000", "--no-tracking",  # MLflow has its own tests
        "--ray-address", ray_address,  # the session's Ray: a local instance's start is test_train_failures.py's
        cwd=tmp_path, env=env, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"run cli: {plan.refs[0]} -> {tmp_path / 'runs' / 'cli'}"
    [validation] = [line for line in lines if line.startswith("  validation: ")]
    assert "val/l1_ab " in validation and "val/psnr " in validation and "val/ssim " in validation
    [latest] = [line for line in lines if line.startswith("  latest checkpoint: ")]
    checkpoint = latest.removeprefix("  latest checkpoint: ")
    assert load_checkpoint(checkpoint)["position"]["global_step"] == plan.count("train") // (WORKERS * BATCH)


def test_recolor_train_with_a_missing_dataset_is_a_one_line_error(train_lake, tmp_path, cli_runner) -> None:
    lake, _ = train_lake
    result = cli_runner(
        "train", REPO / "configs" / "tiny.yaml", "--dataset", "nope", "--lake", lake, "--storage", tmp_path / "runs",
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert len(result.error_lines) == 1, result.stderr
    assert result.error_lines[0].startswith("recolor: error: ") and "nope" in result.error_lines[0]
    assert not (tmp_path / "runs").exists()


# --- resuming on another number of workers -----------------------------------------------------------


def trained_log(folder: Path) -> list[tuple[int, int, int, list[int]]]:
    """(epoch, step in epoch, workers, sample CRCs) of every step every rank trained (`RECOLOR_TRAINED_LOG`)."""
    steps = []
    for path in sorted(folder.glob("trained-rank*.txt")):
        for line in path.read_text().splitlines():
            _, epoch, step, workers, _, crcs = line.split()
            steps.append((int(epoch), int(step), int(workers), [int(c) for c in crcs.split(",")]))
    return steps


def epoch_sample_crcs(plan: DataPlan, seed: int, global_batch: int) -> list[int]:
    """The CRC-32 of each sample of the first epoch's global order (what one epoch must train, each once)."""
    import zlib

    from pipeline.epochs import epoch_segments
    from pipeline.reading import decode_sample, read_segments

    segments, _ = epoch_segments(plan.train, 0, seed, global_batch)
    return [zlib.crc32(decode_sample(data, plan.size).tobytes()) for _, _, data in read_segments(segments)]


@pytest.mark.parametrize(
    "first_workers, then_workers, global_batch", [(2, 1, 4), (1, 3, 6)], ids=["2-then-1", "1-then-3"]
)
def test_an_epoch_resumed_on_another_worker_count_trains_each_sample_once(
    uninterrupted, train_lake, tmp_path, quiet_env, first_workers, then_workers, global_batch
) -> None:
    _, reference_root, reference_steps = uninterrupted
    lake, plan = train_lake
    steps = plan.count("train") // global_batch
    stop_at = steps // 2 + 1  # mid-epoch, inside a shuffle window
    log_dir = tmp_path / "trained"
    log_dir.mkdir()
    quiet_env.setenv("RECOLOR_TRAINED_LOG", str(log_dir))
    storage = tmp_path / "runs"
    options = dict(data=DataConfig(datasets=["photos"], lake=lake, global_batch_size=global_batch, shuffle_window=8,
                                   flip=False), checkpoint_every=stop_at)  # fmt: skip

    run_training(tiny_config(lake, storage, "elastic", workers=first_workers, max_steps=stop_at, **options))
    second = run_training(tiny_config(lake, storage, "elastic", workers=then_workers, **options))

    final = load_checkpoint(second.checkpoint)
    assert final["position"]["global_step"] == steps  # as many steps as an uninterrupted epoch
    assert final["data"]["global_batch"] == global_batch
    if global_batch == WORKERS * BATCH:
        assert steps == reference_steps
    trained = trained_log(log_dir)
    assert {(workers, step <= stop_at) for _, step, workers, _ in trained} == {(first_workers, True),
                                                                              (then_workers, False)}  # fmt: skip
    per_step: dict[int, int] = {}
    for _, step, _, crcs in trained:
        per_step[step] = per_step.get(step, 0) + len(crcs)
    assert per_step == {step: global_batch for step in range(1, steps + 1)}  # the global batch, every step
    got = sorted(crc for *_, crcs in trained for crc in crcs)
    expected = sorted(epoch_sample_crcs(plan, 0, global_batch))
    assert len(set(expected)) == len(expected) == steps * global_batch  # the photos are all different
    assert got == expected, "a sample of the epoch was trained twice, or not at all"
