"""Ray Train runs under faults: a checkpoint upload that fails once, a corrupt latest checkpoint, a corrupt shard.

The runs reuse `test_train_ray`'s tiny deterministic setup (two CPU workers, U-Net of base width 4, 64 px,
batch 2 per worker), its lake fixture and its worker hooks. The run whose one upload failed and was retried
never restarted, so it is also the uninterrupted reference that a resumed run's weights must match.

What the workers log is read back from the Ray session's Ray Train application logs (one JSON record
per line), where every worker's Python logging goes.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import test_train_ray as base
from test_train_ray import differing, load_rank, start_recorder, starts, state_saver, tiny_config

from pipeline.checkpoint import CHECKPOINT_FILE, load_checkpoint
from pipeline.config import DataConfig
from pipeline.dataplan import DataError, resolve_data
from pipeline.train.driver import run_training

pytestmark = pytest.mark.slow

# Shared with test_train_ray: module-scoped there, so built again for this module.
train_lake = base.train_lake
quiet_env = base.quiet_env


# --- helpers -----------------------------------------------------------------------------------------


def worker_log(ray_local) -> list[str]:
    """Every message the session's Ray Train workers logged so far."""
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    messages = []
    for path in sorted((session / "logs" / "train").glob("ray-train-app-worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.strip():
                messages.append(json.loads(line).get("message", ""))
    return messages


def metric_recorder(path: Path):
    """A `logger_factory`: rank 0 logs every metric as a JSON line {"step", name: value, ...} to `path`."""
    path = str(path)

    def factory(config, plan, payload):
        class FileLogger:
            def log(self, metrics: dict, step: int) -> None:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")

            def log_image(self, image, name: str, key=None, step=None) -> None:
                pass

            def event(self, text: str, step: int) -> None:
                pass

            def close(self) -> None:
                pass

        return FileLogger()

    return factory


def checkpoint_dirs(run: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (Ray Train names them by time)."""
    return sorted(path for path in run.glob("checkpoint_*") if path.is_dir())


# --- a checkpoint upload that fails once ----------------------------------------------------------------


@pytest.fixture(scope="module")
def retried_upload(ray_local, quiet_env, train_lake, tmp_path_factory):
    """Run U: the first checkpoint upload raises (a dropped connection) and is retried; nothing else happens."""
    lake, plan = train_lake
    root = tmp_path_factory.mktemp("run-u")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECOLOR_FAILPOINT", "checkpoint_upload:1:raise")
        patch.setenv("RECOLOR_FAILPOINT_ONCE", str(root / "fired"))
        result = run_training(
            tiny_config(lake, root / "runs", "u", checkpoint_every=2, keep_checkpoints=10),
            on_worker_end=state_saver(root),
            logger_factory=start_recorder(root / "starts"),
        )
    assert (root / "fired").exists(), "the failpoint never fired"
    return result, root, plan.count("train") // (base.WORKERS * base.BATCH)


def test_a_failed_checkpoint_upload_is_retried_without_restarting_the_workers(retried_upload, ray_local) -> None:
    result, root, steps = retried_upload
    assert starts(root / "starts") == [0], "the workers were restarted"
    assert load_checkpoint(result.checkpoint)["position"]["global_step"] == steps == int(result.metrics["global_step"])
    run = root / "runs" / "u"
    retries = [m for m in worker_log(ray_local) if m.startswith(f"checkpoint upload to {run}/checkpoint_")]
    assert len(retries) == 1, retries
    assert "failed (attempt 1 of 4): injected fault at failpoint 'checkpoint_upload'; retrying in 1 s" in retries[0]
    # Every checkpoint is there and whole, the retried one (the first, step 2) included.
    kept = checkpoint_dirs(run)
    assert Path(retries[0].split()[3]) == kept[0]
    assert [load_checkpoint(path)["position"]["global_step"] for path in kept] == list(range(2, steps + 1, 2))


# --- a corrupt latest checkpoint --------------------------------------------------------------------------


def test_a_corrupt_latest_checkpoint_resumes_from_the_one_before_and_matches_the_uninterrupted_run(
    retried_upload, train_lake, tmp_path, ray_local
) -> None:
    _, reference_root, steps = retried_upload
    lake, _ = train_lake
    storage = tmp_path / "runs"
    run_training(tiny_config(lake, storage, "k", max_steps=4, checkpoint_every=2))
    before, latest = checkpoint_dirs(storage / "k")[-2:]
    assert [load_checkpoint(path)["position"]["global_step"] for path in (before, latest)] == [2, 4]
    corrupt = latest / CHECKPOINT_FILE
    corrupt.write_bytes(corrupt.read_bytes()[:4096])  # a torn write

    second = run_training(
        tiny_config(lake, storage, "k", checkpoint_every=2),
        on_worker_end=state_saver(tmp_path),
        logger_factory=start_recorder(tmp_path / "starts"),
    )
    assert starts(tmp_path / "starts") == [2], "the rerun did not start from the checkpoint before the corrupt one"
    messages = worker_log(ray_local)
    assert any(m.startswith(f"{latest.name} is unreadable: {latest} is not a readable checkpoint") for m in messages)
    assert f"resuming from {before.name} instead of the unreadable {latest.name}" in messages
    assert load_checkpoint(second.checkpoint)["position"]["global_step"] == steps
    expected = load_rank(reference_root, 0)
    for rank in range(base.WORKERS):
        resumed = load_rank(tmp_path, rank)
        for network in ("generator", "discriminator"):
            assert not differing(resumed[network], expected[network]), f"rank {rank} {network} differs from run U"


# --- a corrupt shard ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corrupt_lake(train_lake, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A copy of the train lake in which the first sample of each of two training shards holds zeros, not a Lab array.

    Two: one training sample may sit out the epoch (33 samples, 4 a step), not both. Returns (lake, {key: shard}).
    """
    lake, plan = train_lake
    copy = tmp_path_factory.mktemp("corrupt-lake") / "lake"
    shutil.copytree(lake, copy)  # real copies: the original's shards may be hard links to ingest's files
    corrupt = {}
    for original in plan.train[:2]:
        shard = copy / Path(original.uri).relative_to(lake)
        with tarfile.open(shard) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".lab.npy"))
        data = bytearray(shard.read_bytes())
        data[member.offset_data : member.offset_data + member.size] = b"\x00" * member.size
        shard.unlink()
        shard.write_bytes(bytes(data))
        corrupt[member.name.partition(".")[0]] = str(shard)
    assert [s.uri for s in resolve_data(["photos"], str(copy)).train[:2]] == list(corrupt.values())
    return str(copy), corrupt


def test_corrupt_samples_are_skipped_counted_and_named(corrupt_lake, quiet_env, ray_local, tmp_path) -> None:
    lake, corrupt = corrupt_lake
    data = DataConfig(datasets=["photos"], lake=lake, batch_size=base.BATCH, shuffle_window=8, max_bad_fraction=0.5)
    result = run_training(
        tiny_config(lake, tmp_path / "runs", "s", data=data), logger_factory=metric_recorder(tmp_path / "metrics")
    )
    steps = resolve_data(["photos"], lake).count("train") // (base.WORKERS * base.BATCH)
    assert int(result.metrics["global_step"]) == steps
    logged = [json.loads(line) for line in (tmp_path / "metrics").read_text().splitlines()]
    [bad] = [row["data/bad_samples"] for row in logged if "data/bad_samples" in row]  # one epoch, both ranks'
    assert bad == result.metrics["data/bad_samples"] >= 1
    messages = set(worker_log(ray_local))
    named = [key for key, shard in corrupt.items() if f"skipping corrupt sample {key} in shard {shard}" in messages]
    assert len(named) == bad


def test_too_many_corrupt_samples_stop_the_run_with_a_one_line_data_error(corrupt_lake, quiet_env, tmp_path) -> None:
    lake, corrupt = corrupt_lake
    with pytest.raises(DataError) as error:
        run_training(tiny_config(lake, tmp_path / "runs", "t", max_failures=0))  # data.max_bad_fraction 0.01
    message = str(error.value)
    assert "\n" not in message and "exceed data.max_bad_fraction=0.01; last: " in message, message
    assert any(f"last: {key} in {shard}. `recolor lake check NAME --deep`" in message for key, shard in corrupt.items())
