"""The soak of a long training run: `test_stack.py`'s main job runs it as a Ray job through the local stack, with the
lake, the run's storage and Ray Train's run state on the stack's S3, which the outage stops.

One run of the demo preset on 60 generated photos (64 px, two CPU workers, batch 2 each): 2 epochs of about 11
steps, a checkpoint every 2 steps and at each epoch's end, `keep_checkpoints=2`, so Ray rotates checkpoints about
ten times (as many as with 100 photos and a checkpoint every 5 steps, in a third of the steps). Meanwhile rank 1 is
SIGKILLed mid-epoch by a failpoint (once: the restarted worker goes on) and the S3 server holding the lake (and the
checkpoints, where they are on S3) is stopped for a few seconds. Then the same command is run again, with nothing
left to train.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ingest.storage import open_storage
from pipeline.checkpoint import load_checkpoint
from pipeline.train.checkpoint_store import RAY_CHECKPOINT_DIR

PHOTOS = 60
EPOCHS = 2
WORKERS, BATCH = 2, 2
KEEP = 2
KILL_STEP = 17  # rank 1's 17th step: in the middle of the second epoch
OUTAGE_S = 4.0

OVERRIDES = [
    "model.num_downs=6", "data.batch_size=2", f"stages.0.epochs={EPOCHS}", "stages.0.decay_epochs=1",
    "checkpoint_every=2", f"keep_checkpoints={KEEP}", "max_failures=3",
]  # fmt: skip


def failpoint_env(tmp_path: Path) -> dict[str, str]:
    return {
        "RECOLOR_FAILPOINT": f"train_step:{KILL_STEP}@1:kill",
        "RECOLOR_FAILPOINT_ONCE": str(tmp_path / "killed-once"),
        "RECOLOR_NO_PROGRESS": "1",
    }


def checkpoint_folders(run_uri: str) -> list[str]:
    """The names of a run's checkpoint folders: local folders, or on S3 the prefixes that hold an object (an S3
    server may keep empty directories on its disk: readers never see them)."""
    store = open_storage(run_uri)
    names = {item.key.split("/")[0] for item in store.list("")}
    return sorted(name for name in names if RAY_CHECKPOINT_DIR.match(name))


@dataclass
class Outage:
    """Stop an S3 server for `OUTAGE_S` seconds once the run has written `after` checkpoints, in a thread."""

    run_uri: str
    stop: Callable[[], None]
    start: Callable[[], None]
    after: int = 2
    seen: set[str] = field(default_factory=set)
    began: float | None = None
    ended: float | None = None

    def __post_init__(self):
        self._halt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # Also counts every checkpoint folder that ever appears: the rotations.
        while not self._halt.is_set():
            with contextlib.suppress(Exception):  # the server is down: this thread stopped it
                self.seen |= set(checkpoint_folders(self.run_uri))
            if self.began is None and len(self.seen) >= self.after:
                self.began = time.monotonic()
                self.stop()
                time.sleep(OUTAGE_S)
                self.start()
                self.ended = time.monotonic()
            time.sleep(0.05)

    def join(self) -> None:
        self._halt.set()
        self.thread.join(timeout=60)


def expected_steps(train_samples: int) -> int:
    return EPOCHS * (train_samples // (WORKERS * BATCH))


def check_soaked_run(
    run_uri: str,
    train_samples: int,
    outage: Outage,
    finished_at: float,
    kill_marker: Path,
    mlflow_client,
    run_name: str,
) -> list[str]:
    """What a user relies on after a long run; returns the checkpoint folder names."""
    assert kill_marker.exists(), "the failpoint never killed rank 1"
    assert outage.ended is not None and outage.ended < finished_at, "the S3 outage did not happen during the run"
    steps = expected_steps(train_samples)
    folders = checkpoint_folders(run_uri)
    assert len(folders) == KEEP, folders
    store = open_storage(run_uri)
    payloads = [load_checkpoint(store.read_bytes(f"{folder}/checkpoint.pt")) for folder in folders]
    assert max(p["position"]["global_step"] for p in payloads) == steps  # as many steps as an uninterrupted run
    assert len(outage.seen | set(folders)) >= KEEP + 5, "fewer than 5 rotations"

    experiment = mlflow_client.get_experiment_by_name("recolor")
    named = f"tags.`recolor.run_name` = '{run_name}'"
    runs = mlflow_client.search_runs([experiment.experiment_id], filter_string=named)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    logged = sorted({m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train/loss_G")})
    assert logged == list(range(1, steps + 1))  # every step once or (after the kill) twice, none missing
    versions = mlflow_client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert len(versions) == 1
    assert mlflow_client.get_model_version_by_alias(versions[0].name, "candidate").version == versions[0].version
    return folders


def check_rerun(result, run_uri: str, folders_before: list[str], mlflow_client, run_name: str) -> None:
    """The same command again after the run finished: nothing trained, nothing registered, nothing deleted."""
    output = result.stdout + result.stderr  # a job's own output comes on stdout of `recolor submit`
    assert result.returncode == 0, output[-3000:]
    assert f"run {run_name} finished earlier at step" in output, output[-3000:]
    assert checkpoint_folders(run_uri) == folders_before
    experiment = mlflow_client.get_experiment_by_name("recolor")
    named = f"tags.`recolor.run_name` = '{run_name}'"
    runs = mlflow_client.search_runs([experiment.experiment_id], filter_string=named)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(mlflow_client.search_model_versions(f"run_id = '{runs[0].info.run_id}'")) == 1
