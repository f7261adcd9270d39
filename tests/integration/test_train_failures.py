"""`recolor train` when the workers fail or the run is stopped: the MLflow run ends FAILED or KILLED with the reason,
the CLI says why in one line, and a rerun of the same name takes the MLflow run up again and finishes it.

The runs are `fixtures.training`'s tiny ones (U-Net of base width 4, 64 px, batch 2) on its lake, tracked in an
embedded SQLite store in tmp_path, on one CPU worker: what fails or stops here is the run, not DDP (a worker killed
under DDP is `test_train_ray.py`'s and the soaks'), and a second worker would cost each of the five runs about 6 CPU
seconds more. The `train_step:2:raise` failpoint makes the second step raise `InjectedFault` (an OSError); with
`max_failures=0` Ray Train does not restart the worker. That CLI runs in this process (`pipeline.cli.main`), on the
session's Ray: a Ray started per command would take more time than the training. The stopped run is a real process
with a Ray of its own, as a user starts it.
"""

from __future__ import annotations

import pytest
from fixtures.training import BATCH, REPO, ingest_photos

from pipeline.checkpoint import load_checkpoint
from pipeline.cli import main as recolor
from pipeline.data.plan import resolve_data
from pipeline.tracking.runs import FAILURE_TAG, RUN_NAME_TAG

pytestmark = pytest.mark.slow

FAULT = "InjectedFault: injected fault at failpoint 'train_step'"


def test_a_failing_worker_fails_the_mlflow_run_a_rerun_finishes_it_and_more_epochs_stay_on_its_data(
    ray_local, quiet_env, tmp_path, monkeypatch, capsys, caplog, mlflow_store
) -> None:
    """A run's life in one tracking store: its workers fail (FAILED, one line), the same command finishes it
    (FINISHED, registered), the lake grows, and a config asking for more epochs goes on from its checkpoint on the
    dataset versions it began with, as a new MLflow run linked to the finished one; asked for the new version by
    number, it is refused."""
    from mlflow import MlflowClient

    lake = str(tmp_path / "lake")  # a lake of its own: it grows
    ingest_photos(tmp_path / "photos", lake)
    plan = resolve_data(["photos"], lake)
    uri = mlflow_store(tmp_path)
    args = [
        "train", REPO / "configs" / "tiny.yaml", "--dataset", "photos", "--lake", lake, "--storage", tmp_path / "runs",
        "--name", "f", "--tracking-uri", uri, "--workers", "1", "model.num_downs=6", "model.base_filters=4",
        "stages.0.epochs=1", "stages.0.decay_epochs=0", "checkpoint_every=1000", "max_failures=0",
    ]  # fmt: skip
    args = [str(arg) for arg in args]

    with monkeypatch.context() as patch:
        patch.setenv("RECOLOR_FAILPOINT", "train_step:2:raise")
        assert recolor(args) == 1
    stderr = capsys.readouterr().err
    client = MlflowClient(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("recolor").experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'f'"
    )
    assert stderr.strip().splitlines()[-1] == (
        f"recolor: error: training failed: {FAULT}; MLflow run {run.info.run_id} marked FAILED; "
        "rerun the same command to resume"
    ), stderr[-3000:]
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags[FAILURE_TAG] == FAULT

    assert recolor(args) == 0
    stdout = capsys.readouterr().out
    assert f"run f: photos@1 -> {tmp_path / 'runs' / 'f'}" in stdout.splitlines()
    assert f"  MLflow run {run.info.run_id}; registered colorizer version 1 (alias candidate)" in stdout
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert FAILURE_TAG not in run.data.tags  # the run did not stop for that reason in the end
    [latest] = [line for line in stdout.splitlines() if line.startswith("  latest checkpoint: ")]
    steps = plan.count("train") // BATCH
    assert load_checkpoint(latest.removeprefix("  latest checkpoint: "))["position"]["global_step"] == steps
    # The failed attempt logged step 1 before it stopped; the rerun, without a checkpoint to resume from, all of them.
    logged = client.get_metric_history(run.info.run_id, "train/loss_G")
    assert sorted({m.step for m in logged}) == list(range(1, steps + 1))

    # The lake grows to photos@2.
    ingest_photos(tmp_path / "photos", lake, seeds=range(40, 48))
    more = [*args, "stages.0.epochs=2"]

    # Asked for photos@2 by version: refused, naming both ways on.
    assert recolor(["photos@2" if arg == "photos" else arg for arg in more]) == 2  # --dataset photos@2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "recolor: error: run 'f' was trained on photos@1, and this command asks for photos@2: to train on that data "
        "start a new run (--dataset photos@2 --name NEW_NAME); to go on with this one, pass --dataset photos@1"
    )

    # By name only: it goes on with photos@1, and says so.
    assert recolor(more) == 0
    stdout = capsys.readouterr().out
    assert f"run f: photos@1 -> {tmp_path / 'runs' / 'f'}" in stdout.splitlines()
    assert any("resumes on photos@1, the versions it started with (latest now: photos@2)" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    [summary] = [line for line in stdout.splitlines() if line.startswith("  MLflow run ")]
    continued = summary.split()[2].removesuffix(";")
    second = client.get_run(continued)
    assert continued != run.info.run_id
    assert second.data.tags["recolor.continues"] == run.info.run_id
    assert second.data.tags["mlflow.note.content"].startswith(f"Continues run {run.info.run_id} (FINISHED")
    assert second.data.tags["recolor.datasets"] == "photos@1"


def test_sigterm_ends_the_run_killed_with_its_checkpoints_kept_and_leaves_no_process(
    train_lake, tmp_path, ray_address, cli_runner, mlflow_store
) -> None:
    """What a scheduler, `ray job stop` or `timeout` sends: one line, exit 143, the MLflow run KILLED, no Ray process
    left behind, and the same command resumes and finishes the run. While the run goes, the same command in another
    shell is refused in seconds, naming it (one run of a name at a time); the finished rerun reports its validation
    and checkpoint, and frees the name."""
    import contextlib
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    import uuid

    import psutil
    from mlflow import MlflowClient

    lake, plan = train_lake
    uri = mlflow_store(tmp_path)
    args = [
        "train", REPO / "configs" / "tiny.yaml", "--dataset", "photos", "--lake", lake, "--storage", tmp_path / "runs",
        "--name", "stopped", "--tracking-uri", uri, "--workers", "1", "model.num_downs=6", "model.base_filters=4",
        "stages.0.epochs=1", "stages.0.decay_epochs=0", "checkpoint_every=2",
    ]  # fmt: skip
    command = [sys.executable, "-m", "pipeline.cli", *map(str, args)]
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RECOLOR_FAILPOINT")}
    env |= {"RECOLOR_NO_PROGRESS": "1", "RECOLOR_TEST_MARK": mark}
    # The workers wait before step 5 (`RECOLOR_TRAIN_PAUSE`), so the run is still going, with a checkpoint of step 2
    # or 4 behind it, whenever the signal comes, however slow the machine.
    pause = tmp_path / "pause"
    pause.write_text("4")
    process = subprocess.Popen(command, env=env | {"RECOLOR_TRAIN_PAUSE": str(pause)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        snapshot = tmp_path / "runs" / "stopped" / "checkpoint_manager_snapshot.json"

        def recorded() -> bool:  # Ray Train has recorded a checkpoint (of step 2 or 4)
            with contextlib.suppress(OSError, ValueError):
                return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
            return False

        # Stopped mid-run (its upload of step 4 maybe still going), once a checkpoint is recorded: what a rerun
        # resumes from.
        while not recorded():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.1)

        # The same command again, while the run holds its name: refused before a cluster starts, not after the first
        # one ends.
        started = time.monotonic()
        second = cli_runner(*args, cwd=tmp_path, env={"RECOLOR_NO_PROGRESS": "1"})
        assert time.monotonic() - started < 60
        assert second.returncode == 2, second.stderr
        assert "run 'stopped' is already running (pid" in second.error_lines[-1]
        assert "train under another --name" in second.error_lines[-1]
        assert process.poll() is None  # the refusal did not touch the run

        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "recolor: stopped by SIGTERM; rerun the same command to resume"
    # The driver's own lines (Ray prefixes what its actors print with "(Name pid=N)"): no signal dump, no traceback.
    own = [line for line in stderr.splitlines() if not re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", line)]
    assert not [line for line in own if "SIGTERM received" in line or "Traceback" in line], stderr[-6000:]
    time.sleep(2)
    left = []
    for other in psutil.process_iter():  # the run's session (start_new_session): its local Ray and workers
        try:
            if os.getsid(other.pid) == process.pid or other.environ().get("RECOLOR_TEST_MARK") == mark:
                left.append(other.cmdline())
        except (psutil.Error, OSError):
            continue
    assert not left, f"processes of the stopped run are still alive: {left}"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("recolor").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags[FAILURE_TAG] == "stopped by SIGTERM"

    # The rerun joins the session's Ray: what it tests is the resume, and the stopped run's own Ray start and end are
    # tested above.
    rerun = subprocess.run([*command, "--ray-address", ray_address], env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rank 0 resuming at" in rerun.stdout + rerun.stderr  # from the checkpoint of step 2 or 4, kept
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    # What `recolor train` reports when it ends: the run and its data, the validation, the checkpoint.
    lines = rerun.stdout.splitlines()
    assert f"run stopped: {plan.refs[0]} -> {tmp_path / 'runs' / 'stopped'}" in lines, rerun.stdout[-3000:]
    [validation] = [line for line in lines if line.startswith("  validation: ")]
    assert "val/l1_ab " in validation and "val/psnr " in validation and "val/ssim " in validation
    [latest] = [line for line in lines if line.startswith("  latest checkpoint: ")]
    checkpoint = latest.removeprefix("  latest checkpoint: ")
    assert load_checkpoint(checkpoint)["position"]["global_step"] == plan.count("train") // BATCH
    assert not (tmp_path / "runs" / "stopped" / ".recolor-run.lease").exists()  # the run is over: the name is free
