"""Every `bench/` script runs: its small mode (`--small`: seconds, generated data) as a user runs it, a process of
its own. A benchmark that breaks fails here, not on the day its figures are wanted. The Ray ones join the session's
Ray (`RAY_ADDRESS`, as on a cluster). `bench/gpu.py --small` is its CPU dry run, which runs `train_step.py` and
`loader.py` with their own `--small` too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(path.name for path in (REPO / "bench").glob("*.py") if path.name != "common.py")


def bench(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, f"bench/{script}", "--small", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})  # fmt: skip
    assert done.returncode == 0, (script, done.stdout[-2000:], done.stderr[-3000:])
    return done


def printed_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout[done.stdout.find("{") :])


def test_every_script_has_a_small_mode_that_a_test_runs() -> None:
    covered = {"gpu.py", "train_step.py", "loader.py", "mlflow_ui.py"} | {name for name, _ in CHEAP} | set(ON_RAY)
    assert set(SCRIPTS) == covered, set(SCRIPTS) ^ covered
    for script in SCRIPTS:
        assert "add_small(parser)" in (REPO / "bench" / script).read_text(), script


def test_the_gpu_script_runs_every_part_in_a_dry_run(tmp_path, ray_address) -> None:
    out = tmp_path / "gpu.json"
    # Its `recolor train` joins the session's Ray, as on a cluster.
    done = bench("gpu.py", "--out", str(out), env={"RAY_ADDRESS": ray_address})
    results = json.loads(out.read_text())
    for part in ("step_batch2", "step_batch4", "feed", "train", "quality", "colorize"):
        assert part in results and "error" not in results[part], (part, results.get(part))
    assert results["step_batch2"]["project_img_s"] > 0 and results["colorize"]["images"] == 4
    assert results["train"]["global_step"] > 0 and results["feed"]["cores_to_feed_the_step"] > 0
    assert results["feed"]["zstd"]["1"]["samples_s"] > 0 and results["feed"]["s3_samples_s"] > 0  # every loader row
    assert "| step_batch2 |" in done.stdout  # the markdown table for bench/RESULTS.md


def _class_mix(report: dict) -> None:
    assert {(r["order"], r["interleave"], r["workers"]) for r in report["results"]} == {
        (order, interleave, workers) for order in ("sorted", "shuffled") for interleave in (1, 4) for workers in (1, 2)
    }
    assert all(r["classes_per_batch"] >= 1 for r in report["results"])


def _cpu_step(report: dict) -> None:
    assert report["samples_per_s"] and None not in report["samples_per_s"].values(), report["samples_per_s"]
    assert "inception_unet/finetune" in report["samples_per_s"] and "resnet18_unet/side_x0.5" in report["vs_fp32"]


def _ingest(report: dict) -> None:
    assert report["ingested"] > 0 and report["ingest_vs_seed"] > 0 and report["bytes_ratio"] > 0


def _scale(report: dict) -> None:
    steps = report["catalog"]["1500"]
    assert set(steps) == {"list", "dedup", "commit", "plan", "ship", "show", "gc", "epoch"}
    assert all(step["seconds"] >= 0 and step["peak_mb"] > 0 for step in steps.values())
    for where in ("local", "s3"):  # the grown set re-ingests the one new photo only
        assert report["reingest"][where]["reingest_read"] == 1 and report["reingest"][where]["first_ingested"] == 20


CHEAP = [("class_mix.py", _class_mix), ("cpu_step.py", _cpu_step), ("ingest.py", _ingest), ("scale.py", _scale)]


@pytest.mark.parametrize(("script", "check"), CHEAP, ids=[name for name, _ in CHEAP])
def test_a_small_run_of(script, check) -> None:
    check(printed_json(bench(script, "--json")))


def test_mlflow_ui_small_answers_every_page() -> None:
    done = bench("mlflow_ui.py")
    shown = [line for line in done.stdout.splitlines() if line.split(":")[0] in (
        "run_overview", "run_metrics", "run_artifacts", "experiment_charts", "compare_runs")]  # fmt: skip
    assert len(shown) == 5 and "samples/gan/epoch_003.png" in done.stdout, done.stdout


ON_RAY = ["checkpoint_upload.py", "colorize.py", "ddp_scaling.py", "quality.py"]


def test_the_ray_benchmarks_run_small_on_the_sessions_ray(ray_address) -> None:
    """One test for the four that train or colorize on Ray: they share the session's Ray, one after another."""
    env = {"RAY_ADDRESS": ray_address}
    upload = printed_json(bench("checkpoint_upload.py", "--json", env=env))
    assert [r["mode"] for r in upload["results"]] == ["sync", "async"]
    assert upload["checkpoint_step_ratio_sync_over_async"] > 0 and upload["results"][0]["checkpoint_mb"] > 0

    ddp = printed_json(bench("ddp_scaling.py", "--json", env=env))
    assert ddp["one_worker_img_s"] > 0 and ddp["two_workers_img_s"] > 0 and ddp["speedup"] > 0

    photos = printed_json(bench("colorize.py", "--json", env=env))
    assert {"single_process", "ray_1_actor"} <= photos.keys() and photos["count"] == 4  # small: one actor
    films = printed_json(bench("colorize.py", "--video", "--json", env=env))
    assert {"still_plain", "still_temporal", "pan_plain", "pan_temporal"} <= films.keys()
    assert set(films["ray"]) == {"actors_1"}

    quality = printed_json(bench("quality.py", "--json", env=env))
    assert quality["training"]["l1_epochs"] == 1 and quality["training"]["gan_epochs"] == 1
    final = quality["metrics"]["final"]
    assert {"fid", "kid", "gray_fid", "psnr", "colorfulness"} <= final.keys() and "l1_stage" in quality["metrics"]
    assert Path(quality["grid"]).parent != REPO / "bench"  # a small run leaves the committed grid alone
