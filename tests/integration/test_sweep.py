"""`recolor sweep` end to end: Ray Tune over Ray Train V2 on the session's Ray (`recolor sweep --ray-address`, as
on a cluster; a local instance's start is `test_train_failures.py`'s), MLflow parent and child runs, the ranking on
the parent, early stopping by ASHA, and reruns that train nothing."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SMALL = ["model.num_downs=5", "stages.0.decay_epochs=0"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, photo_writer, cli_runner, ray_address, mlflow_store):
    root = tmp_path_factory.mktemp("sweep")
    photo_writer(root / "photos", range(24), width=80, height=64)
    ingest = cli_runner("ingest", "folder", root / "photos", "--dataset", "sw", "--no-ray", "--size", "32",
                        "--val-fraction", "0.25", "--no-progress", cwd=root)  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    from mlflow import MlflowClient

    uri = mlflow_store(root)

    def sweep(*args, timeout=420):
        return cli_runner("sweep", DEMO, "--dataset", "sw", *SMALL, *args, "--ray-address", ray_address, cwd=root,
                          env={"MLFLOW_TRACKING_URI": uri}, timeout=timeout)  # fmt: skip

    return SimpleNamespace(root=root, uri=uri, client=MlflowClient(uri), sweep=sweep)


def runs_of(workspace, sweep: str) -> dict[str, list]:
    experiment = workspace.client.get_experiment_by_name("recolor")
    found = workspace.client.search_runs([experiment.experiment_id], f"tags.`recolor.sweep` = '{sweep}'")
    roles: dict[str, list] = {"parent": [], "trial": []}
    for run in found:
        roles[run.data.tags["recolor.sweep.role"]].append(run)
    return roles


def ranking_rows(workspace, parent) -> list[dict]:
    text = workspace.client.download_artifacts(parent.info.run_id, "sweep/ranking.csv", str(workspace.root))
    return list(csv.DictReader(io.StringIO(Path(text).read_text())))


@pytest.fixture(scope="module")
def grid(workspace):
    """A grid over two settings (two learning rates, one normalization): two trials at once, then the same command
    again. Two trials, not four: each costs the machine a Ray Train run (about 25 CPU seconds before it trains), and
    the cross product of a grid's values is `test_sweep_space.py`'s."""
    args = ("--grid", "stages.0.lr=1e-4,2e-4", "--grid", "model.norm=instance", "stages.0.epochs=2",
            "--workers-per-trial", "1", "--max-concurrent", "2", "--name", "grid")  # fmt: skip
    first = workspace.sweep(*args)
    runs = runs_of(workspace, "grid")
    histories = {run.info.run_name: len(workspace.client.get_metric_history(run.info.run_id, "val/l1_ab"))
                 for run in runs["trial"]}  # fmt: skip
    checkpoints = sorted(p.name for p in (workspace.root / "ray_results").glob("grid-*/checkpoint_*"))
    again = workspace.sweep(*args)
    return SimpleNamespace(first=first, again=again, runs=runs, histories=histories, checkpoints=checkpoints)


def test_a_grid_sweep_runs_every_trial_as_a_child_run_ranked_on_the_parent(grid, workspace) -> None:
    assert grid.first.returncode == 0, grid.first.stdout[-2000:] + grid.first.stderr[-4000:]
    [parent], trials = grid.runs["parent"], grid.runs["trial"]
    assert parent.info.status == "FINISHED" and len(trials) == 2
    assert {run.info.status for run in trials} == {"FINISHED"}
    assert {run.data.tags["mlflow.parentRunId"] for run in trials} == {parent.info.run_id}
    tags = [run.data.tags for run in trials]
    overrides = {(tag["recolor.sweep.override.stages.0.lr"], tag["recolor.sweep.override.model.norm"]) for tag in tags}
    assert overrides == {("1e-4", "instance"), ("2e-4", "instance")}
    for run in trials:
        assert run.data.params["model.norm"] == run.data.tags["recolor.sweep.override.model.norm"]
        assert grid.histories[run.info.run_name] == 2  # two epochs: two validations

    rows = ranking_rows(workspace, parent)
    values = [float(row["val/l1_ab"]) for row in rows]
    assert values == sorted(values) and [row["rank"] for row in rows] == ["1", "2"]
    by_name = {run.info.run_name: run for run in trials}
    for row in rows:
        assert float(row["val/l1_ab"]) == pytest.approx(by_name[row["name"]].data.metrics["val/l1_ab"])
    assert parent.data.tags["recolor.sweep.best_trial"] == rows[0]["name"]
    assert parent.data.tags["recolor.sweep.best_run_id"] == rows[0]["run_id"]
    artifacts = {item.path for item in workspace.client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/ranking.csv", "sweep/metric_by_step.png"}
    candidate = workspace.client.get_model_version_by_alias("colorizer", "candidate")
    assert candidate.run_id == rows[0]["run_id"]
    assert f"best: {rows[0]['name']}" in grid.first.stdout


def test_runs_compare_prints_the_sweeps_ranking(grid, workspace, cli_runner) -> None:
    result = cli_runner("runs", "compare", "--sweep", "grid", cwd=workspace.root,
                        env={"MLFLOW_TRACKING_URI": workspace.uri})  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    names = [line.split()[1] for line in lines]
    assert names == [row["name"] for row in ranking_rows(workspace, grid.runs["parent"][0])]


def test_rerunning_the_sweep_trains_nothing(grid, workspace) -> None:
    assert grid.again.returncode == 0, grid.again.stderr[-4000:]
    assert "sweep grid finished earlier" in grid.again.stderr  # every trial done: no Tune run, no Train run starts
    runs = runs_of(workspace, "grid")
    assert len(runs["parent"]) == 1 and len(runs["trial"]) == 2  # no new runs
    for run in runs["trial"]:
        assert (
            len(workspace.client.get_metric_history(run.info.run_id, "val/l1_ab")) == grid.histories[run.info.run_name]
        )
    assert sorted(p.name for p in (workspace.root / "ray_results").glob("grid-*/checkpoint_*")) == grid.checkpoints
    assert len(workspace.client.search_model_versions("name = 'colorizer'")) == 1  # the best, registered once


def test_asha_stops_a_losing_trial_and_records_why(workspace) -> None:
    """A learning rate of 0.5 wrecks the U-Net at once: ASHA stops that trial at a validation and the run says so."""
    args = ("--grid", "stages.0.lr=2e-4,0.5", "stages.0.epochs=5", "--max-concurrent", "1", "--stop-early", "asha",
            "--workers-per-trial", "1",
            "--name", "asha", "--no-register")  # fmt: skip
    result = workspace.sweep(*args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    runs = runs_of(workspace, "asha")
    trials = {run.data.tags["recolor.sweep.override.stages.0.lr"]: run for run in runs["trial"]}
    good, bad = trials["2e-4"], trials["0.5"]
    assert good.info.status == "FINISHED" and "recolor.sweep.decision" not in good.data.tags
    assert bad.info.status == "KILLED"
    assert bad.data.tags["recolor.sweep.decision"].startswith("stopped early by asha at validation ")
    # Tune's decision comes with a validation before the last; how many more the run fits in before its Train run is
    # ended depends on Tune's polling (here usually 1 or 2 more).
    validations = len(workspace.client.get_metric_history(bad.info.run_id, "val/l1_ab"))
    rows = ranking_rows(workspace, runs["parent"][0])
    assert [row["name"] for row in rows] == [good.info.run_name, bad.info.run_name]
    again = workspace.sweep(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep asha finished earlier" in again.stderr  # one trial finished, one stopped early: nothing to run
    assert len(workspace.client.get_metric_history(bad.info.run_id, "val/l1_ab")) == validations  # stays stopped
    assert workspace.client.get_run(bad.info.run_id).info.status == "KILLED"


def test_bad_sweeps_are_one_line_before_anything_starts(workspace) -> None:
    for args, fragment in (
        (("--grid", "stages.0.lr"), "--grid 'stages.0.lr': expected KEY=VALUE"),
        (("--grid", "stages.0.lr=1e-4", "--metric", "val/nope"), "--metric must be a validation metric"),
        (("--grid", "model.norm=batch,bogus"), "trial 1 (model.norm=bogus): model.norm must be one of"),
    ):
        result = workspace.sweep(*args, timeout=60)
        assert result.returncode == 2, result.stderr[-2000:]
        assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
