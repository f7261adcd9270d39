"""An elastic worker group (`--workers 1-2`) on a real multi-node Ray cluster on loopback: a head without CPUs and
worker nodes of one CPU each, started with `ray start` as a user would on a cluster.

The run is steered with two test hooks of the trainer: `RECOLOR_TRAIN_PAUSE` (a file holding a global step: the
workers wait there, and say so) and `RECOLOR_TRAINED_LOG` (the CRC-32 of every sample each step trained). A node's
processes are SIGKILLed mid-epoch (a preempted machine), the run goes on with one worker from its latest checkpoint,
a node joins and the group grows back to two; the run finishes, and each epoch trained every one of its samples
exactly once, the global batch every step.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import psutil
import pytest

from pipeline.checkpoint import load_checkpoint
from pipeline.data.epochs import epoch_segments
from pipeline.data.plan import DataPlan
from pipeline.data.reading import decode_sample, read_segments

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
GLOBAL_BATCH = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackCluster:
    """A head and worker nodes, each started by `ray start` on 127.0.0.1 (no other Ray of the session is touched:
    every process of this cluster has its short temp folder in its command line)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Token authentication, as on a real cluster (and a stray ~/.ray/auth_token cannot lock this one out).
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))} | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_failure_threshold": "4",
            # A group restarted at once after a node died may ask for the dead node's CPUs (Ray Train's elastic
            # policy reads resources a moment old); its start then times out and the next start sees the truth.
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
        }

    def _ray(self, *args: str) -> None:
        done = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def start_head(self) -> None:
        self._ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", "--num-cpus=0",
                  f"--temp-dir={self.root}", "--include-dashboard=false", "--disable-usage-stats",
                  "--object-store-memory=100000000")  # fmt: skip

    def add_node(self, name: str) -> None:
        """A worker node of one CPU, told apart by its custom resource `name`."""
        self._ray("start", f"--address={self.address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                  f"--resources={json.dumps({name: 1})}", "--disable-usage-stats",
                  "--object-store-memory=100000000")  # fmt: skip

    def processes(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if str(self.root) in " ".join(process.info["cmdline"] or []):
                    found.append(process)
        return found

    def kill_node(self, name: str) -> int:
        """SIGKILL a worker node's raylet and every process under it (its workers): a preempted machine."""
        raylets = [p for p in self.processes() if p.name() == "raylet" and f"={name},1" in " ".join(p.cmdline())]
        assert len(raylets) == 1, [" ".join(p.cmdline())[:300] for p in self.processes() if "raylet" in p.name()]
        victims = [raylets[0], *raylets[0].children(recursive=True)]
        for process in victims:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        return len(victims)

    def stop(self) -> None:
        for _ in range(3):
            for process in self.processes():
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster():
    cluster = LoopbackCluster()
    try:
        cluster.start_head()
        cluster.add_node("node_a")
        cluster.add_node("node_b")
        yield cluster
    finally:
        cluster.stop()


def wait_for(what: str, condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def set_pause(path: Path, step: int | None) -> None:
    """Workers wait before training past global step `step` (None: go on to the end)."""
    if step is None:
        path.unlink(missing_ok=True)
        return
    temp = path.with_suffix(".tmp")
    temp.write_text(str(step))
    temp.replace(path)


def waiting(path: Path, workers: int, step: int) -> bool:
    return all(path.with_name(f"{path.name}.waiting-{workers}-{rank}-{step}").exists() for rank in range(workers))


def recorded_step(run_uri: str) -> int:
    """The global step of the run's latest checkpoint that Ray Train has recorded (0: none yet)."""
    from pipeline.train.checkpoint_store import latest_recorded

    latest = latest_recorded(run_uri)
    return int(latest[1].get("global_step", 0)) if latest else 0


def effective_steps(folder: Path) -> dict[tuple[int, int], tuple[int, list[int]]]:
    """(epoch, step) -> (workers, sample CRCs) of the group that trained the step last (a restarted group trains
    again the steps after its checkpoint; those count once, as the group that went on)."""
    lines: dict[tuple[int, int], dict[int, list]] = {}
    for path in folder.glob("trained-rank*.txt"):
        for line in path.read_text().splitlines():
            _, epoch, step, workers, started, crcs = line.split()
            group = lines.setdefault((int(epoch), int(step)), {})
            group.setdefault(int(started), [int(workers), []])[1].extend(int(c) for c in crcs.split(","))
    return {key: tuple(groups[max(groups)]) for key, groups in lines.items()}


def epoch_crcs(plan: DataPlan, epoch: int) -> list[int]:
    segments, _ = epoch_segments(plan.train, epoch, 0, GLOBAL_BATCH)
    return [zlib.crc32(decode_sample(data, plan.size).tobytes()) for _, _, data in read_segments(segments)]


def test_an_elastic_group_shrinks_when_a_node_dies_grows_when_one_joins_and_finishes_exact_epochs(
    cluster,
    train_lake,
    tmp_path,
    mlflow_store,
) -> None:
    lake, plan = train_lake
    steps = plan.count("train") // GLOBAL_BATCH
    assert steps >= 7
    pause, trained = tmp_path / "pause", tmp_path / "trained"
    trained.mkdir()
    set_pause(pause, 3)  # the group of two stops before step 4 (a checkpoint at step 2 behind it)
    tracking = mlflow_store(tmp_path)
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RECOLOR_FAILPOINT")} | {
        "RAY_ADDRESS": cluster.address, "RECOLOR_NO_PROGRESS": "1", "RECOLOR_TRAIN_PAUSE": str(pause),
        "RECOLOR_TRAINED_LOG": str(trained), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }  # fmt: skip
    command = [
        sys.executable, "-m", "pipeline.cli", "train", str(REPO / "configs" / "tiny.yaml"),
        "--dataset", "photos", "--lake", lake, "--storage", str(tmp_path / "runs"), "--name", "elastic",
        "--workers", "1-2", "--tracking-uri", tracking, "model.num_downs=6", "model.base_filters=4",
        "stages.0.epochs=2", "stages.0.decay_epochs=0", f"data.global_batch_size={GLOBAL_BATCH}", "data.flip=false",
        "data.rotate_degrees=0", "checkpoint_every=2", "elastic_resize_s=1", "max_failures=3", "deterministic=true",
    ]  # fmt: skip
    log = (tmp_path / "train.log").open("w")
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # fmt: skip
    run_uri = str(tmp_path / "runs" / "elastic")
    try:
        wait_for("two workers at step 3", lambda: waiting(pause, 2, 3), 240, run)
        # The step-2 checkpoint uploads in the background: a node killed before Ray recorded it would send the
        # next group back to step 0 (exact still, but not the resize this test is about).
        wait_for("the step-2 checkpoint recorded", lambda: recorded_step(run_uri) >= 2, 120, run)
        set_pause(pause, 5)  # the next group waits before step 6
        assert cluster.kill_node("node_b") >= 2  # the raylet and the training worker on it, at least
        wait_for("one worker at step 5", lambda: waiting(pause, 1, 5), 240, run)
        wait_for("the step-4 checkpoint recorded", lambda: recorded_step(run_uri) >= 4, 120, run)
        set_pause(pause, steps + 2)  # epoch 2's third step
        cluster.add_node("node_c")
        wait_for(f"two workers again at step {steps + 2}", lambda: waiting(pause, 2, steps + 2), 240, run)
        set_pause(pause, None)
        assert run.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        log.close()
    output = (tmp_path / "train.log").read_text()

    # Each epoch: every step trained the global batch once, by the group that went on, and all the epoch's samples.
    done = effective_steps(trained)
    assert sorted(done) == [(epoch, step) for epoch in range(2) for step in range(1, steps + 1)], output[-3000:]
    groups = [done[(0, step)][0] for step in range(1, steps + 1)] + [done[(1, s)][0] for s in range(1, steps + 1)]
    assert groups[:2] == [2, 2] and groups[2:5] == [1, 1, 1] and groups[-1] == 2, groups
    for epoch in range(2):
        got = sorted(crc for (e, _), (_, crcs) in done.items() if e == epoch for crc in crcs)
        assert all(len(done[(epoch, step)][1]) == GLOBAL_BATCH for step in range(1, steps + 1))
        assert got == sorted(epoch_crcs(plan, epoch)), f"epoch {epoch} trained a sample twice or missed one"

    final = load_checkpoint(_latest(tmp_path))
    assert final["position"]["global_step"] == 2 * steps

    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("recolor").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    counts = [int(m.value) for m in sorted(client.get_metric_history(mlflow_run.info.run_id, "train/workers"),
                                           key=lambda m: (m.step, m.timestamp))]  # fmt: skip
    assert 1 in counts and counts[0] == 2 and counts[-1] == 2, counts
    events = mlflow_run.data.tags["recolor.events"].splitlines()
    assert len(events) == 2 and "resized 2 -> 1" in events[0] and "resized 1 -> 2" in events[1], events
    assert "#### Events" in mlflow_run.data.tags["mlflow.note.content"]


def _latest(tmp_path: Path) -> Path:
    from pipeline.train.checkpoint_store import latest_recorded

    name, _ = latest_recorded(str(tmp_path / "runs" / "elastic"))
    return tmp_path / "runs" / "elastic" / name
