"""MLflow end to end: tracking, registry, promotion, colorize, runs compare, and no secret anywhere.

Two tiny Ray Train runs (U-Net of base width 4, 64 px samples, batch 2, one CPU worker: what is tracked is rank
0's, and a second worker would cost each run about 6 CPU seconds), one per tracking backend, each shared by the
whole module:
- the embedded default: no MLFLOW_TRACKING_URI, run from an empty folder, so `./mlflow.db` (registry
  included) and `./mlartifacts` are created there;
- a real `mlflow server` process on 127.0.0.1 (SQLite backend) whose artifacts go to the session's
  `rclone serve s3` bucket through the server (the client only speaks HTTP to MLflow).

Before training, the environment holds the S3 keys and one more made-up secret; the last test looks
for them in every param, tag, metric name, artifact, registered model file, database and log.

Long on purpose: two trained runs (module fixtures, the costly part) serve every test here.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from bad_files import hue_picture
from PIL import Image, ImageOps

from infra.stack.s3_server import free_port
from ingest.driver import IngestConfig, run_ingest
from pipeline.config import DataConfig, ModelConfig, StageConfig, TrainConfig, flatten
from pipeline.data.plan import resolve_data
from pipeline.tracking.runs import manifest_tag
from pipeline.tracking.uri import fluent_tracking_uri
from pipeline.train.driver import TrackingOptions, resolve_storage, run_training

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SIZE = 64  # the lake's sample side; num_downs 6 needs 2**6
BATCH, WORKERS = 2, 1
RECIPE_LOSSES = ("train/loss_D_fake", "train/loss_D_real", "train/loss_D", "train/loss_G_GAN", "train/loss_G_L1",
                 "train/loss_G")  # fmt: skip
VALIDATION = ("l1_ab", "psnr", "ssim", "colorfulness", "colorfulness_abs_diff", "auc")
MODEL = "colorizer"
GRID_GAP = 4  # pixels between the cells of a sample grid (pipeline.tracking.plots.sample_grid)


# --- helpers ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_to(path: Path):
    """Send what this process writes meanwhile to `path`: Python streams, file descriptors 1 and 2, and
    log records of level INFO and up (so the training driver's output can be searched for secrets)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    root = logging.getLogger()
    level = root.level
    with open(path, "a", buffering=1) as sink:
        handler = logging.StreamHandler(sink)
        handler.setLevel(logging.INFO)
        root.addHandler(handler)
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def tiny_config(lake: str, storage: Path, name: str, epochs: int = 1, **overrides) -> TrainConfig:
    values = dict(
        name=name,
        model=ModelConfig(base_filters=4, num_downs=6),
        stages=[StageConfig(name="gan", epochs=epochs)],
        data=DataConfig(datasets=["photos"], lake=lake, batch_size=BATCH, shuffle_window=8),
        workers=WORKERS,
        storage=str(storage),
        checkpoint_every=1000,
        log_every=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every byte: a truncated or corrupt PNG raises here
    assert image.format == "PNG"
    return image


def assert_sample_grid(image: Image.Image) -> None:
    """Three rows (gray input, generated, ground truth) of 64 px cells, one column per validation image."""
    width, height = image.size
    assert height == 3 * SIZE + 2 * GRID_GAP, image.size
    columns = (width + GRID_GAP) // (SIZE + GRID_GAP)
    assert 1 <= columns <= 8 and width == columns * SIZE + (columns - 1) * GRID_GAP, image.size
    pixels = np.asarray(image.convert("RGB")).astype(int)
    gray_row = pixels[:SIZE, :SIZE]
    assert np.abs(gray_row - gray_row[..., :1]).max() <= 2, "the first row is not the gray input"
    truth = pixels[2 * (SIZE + GRID_GAP) :, :SIZE]
    assert np.abs(truth - truth.mean(axis=-1, keepdims=True)).mean() > 5, "the ground-truth row has no colour"


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def bytes_of_tree(root: Path):
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path, path.read_bytes()


def lightness_of(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(rgb)[..., 0]


# --- fixtures: environment, data, the two trained runs ------------------------------------------------


@pytest.fixture(scope="module")
def secret_env(s3_server, tmp_path_factory):
    """The module's environment: the S3 keys of the session's rclone server plus a made-up secret,
    quiet training, fast system-metrics sampling, no tracking URI (so the embedded default applies)."""
    made_up = "recolor-test-secret-" + secrets.token_hex(12)
    url_password = "pw-" + secrets.token_hex(10)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            patch.delenv(name, raising=False)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RECOLOR_LAKE", "RAY_ADDRESS"):
            patch.delenv(name, raising=False)
        for name in ("RECOLOR_FAILPOINT", "RECOLOR_FAILPOINT_ONCE", "RECOLOR_STORAGE"):
            patch.delenv(name, raising=False)
        for name, value in s3_server.env().items():
            patch.setenv(name, value)
        patch.setenv("RECOLOR_TEST_SECRET", made_up)
        patch.setenv("RECOLOR_NO_PROGRESS", "1")
        # Ray Train's controller polls every 2 s by default; that, not compute, would set the pace.
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
        # MLflow samples system metrics every 10 s by default: far longer than a whole tiny run (2-3 s here).
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        yield SimpleNamespace(
            values=[s3_server.secret_key, s3_server.access_key, made_up, url_password],
            url_password=url_password,
            logs=tmp_path_factory.mktemp("logs"),
            started=time.time(),
        )


@pytest.fixture(scope="module")
def lake(tmp_path_factory, photo_writer, secret_env):
    """32 colourful photos at 64 px in one lake dataset `photos`, and its pinned plan."""
    root = tmp_path_factory.mktemp("mlflow-lake")
    photo_writer(root / "photos", range(32), width=80, height=64)
    lake = str(root / "lake")
    run_ingest(
        IngestConfig(kind="folder", source=str(root / "photos"), dataset="photos", lake=lake, size=SIZE,
                     shard_size=40_000, use_ray=False, progress=False)
    )  # fmt: skip
    plan = resolve_data(["photos"], lake)
    assert plan.size == SIZE and plan.val and plan.count("train") >= 2 * WORKERS * BATCH
    return SimpleNamespace(uri=lake, plan=plan, ref=plan.refs[0])


@pytest.fixture(scope="module")
def s3_lake(lake, secret_env, tmp_path_factory):
    """The same photos ingested into a lake on the rclone S3 server."""
    from ingest.storage import make_s3_client

    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    make_s3_client().create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/lake"
    source = Path(lake.uri).parent / "photos"
    run_ingest(IngestConfig(kind="folder", source=str(source), dataset="photos", lake=uri, size=SIZE,
                            shard_size=40_000, use_ray=False, progress=False))  # fmt: skip
    plan = resolve_data(["photos"], uri)
    return SimpleNamespace(uri=uri, plan=plan, ref=plan.refs[0])


@pytest.fixture(scope="module")
def embedded(ray_local, secret_env, lake, tmp_path_factory):
    """Training tracked by the embedded default, from an empty working folder (two epochs)."""
    root = tmp_path_factory.mktemp("embedded")
    config = tiny_config(lake.uri, root / "runs", "embedded", epochs=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        with output_to(secret_env.logs / "train-embedded.log"):
            result = run_training(config, tracking=TrackingOptions())
        # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; nothing may leave it pinned behind.
        assert "MLFLOW_TRACKING_URI" not in os.environ, os.environ["MLFLOW_TRACKING_URI"]
        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = client_for(uri)
        yield SimpleNamespace(
            root=root, config=config, result=result, uri=uri, client=client, run=client.get_run(result.run_id)
        )  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_server(s3_server, secret_env, tmp_path_factory):
    """`mlflow server` on a free loopback port: SQLite backend, artifacts proxied to a fresh rclone bucket."""
    from ingest.storage import make_s3_client

    root = tmp_path_factory.mktemp("mlflow-server")
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    make_s3_client().create_bucket(Bucket=bucket)  # through the API: rclone caches its bucket listing
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # As `recolor stack up` runs it: without MLflow 3's job runner and its Huey consumers, which poll all the time.
    env.update(s3_server.env(), MLFLOW_S3_ENDPOINT_URL=s3_server.endpoint, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log_path = secret_env.logs / "mlflow-server.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{bucket}/artifacts", "--workers", "1",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"mlflow server exited: {log_path.read_text()[-3000:]}"
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
            assert time.monotonic() < deadline, f"mlflow server did not answer: {log_path.read_text()[-3000:]}"
            time.sleep(0.3)
        yield SimpleNamespace(url=url, root=root, bucket_dir=s3_server.root / bucket, log=log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def served(ray_local, secret_env, s3_lake, mlflow_server, tmp_path_factory):
    """Training tracked by the MLflow server (one epoch) on the S3 lake.

    The session's Ray started before this module set the S3 keys, so its workers read the shards with
    the keys `run_training` hands them (not in their runtime env, which Ray logs)."""
    root = tmp_path_factory.mktemp("served")
    config = tiny_config(s3_lake.uri, root / "runs", "served")
    # A password in the tracking URI (the server takes any): the scan below looks for it everywhere too.
    with_password = mlflow_server.url.replace("http://", f"http://ann:{secret_env.url_password}@")
    with output_to(secret_env.logs / "train-served.log"):
        result = run_training(config, tracking=TrackingOptions(tracking_uri=with_password))
    assert "MLFLOW_TRACKING_URI" not in os.environ, os.environ["MLFLOW_TRACKING_URI"]
    client = client_for(mlflow_server.url)
    return SimpleNamespace(
        root=root, config=config, result=result, uri=mlflow_server.url, client=client,
        run=client.get_run(result.run_id), server=mlflow_server,
    )  # fmt: skip


# --- the embedded default --------------------------------------------------------------------------------


def test_embedded_default_creates_the_store_in_the_working_folder(embedded) -> None:
    assert (embedded.root / "mlflow.db").is_file()
    assert embedded.run.info.artifact_uri.startswith((embedded.root / "mlartifacts").as_uri())
    assert any((embedded.root / "mlartifacts").rglob("loss_curves.png"))
    assert embedded.run.info.status == "FINISHED"
    assert embedded.run.info.run_name == "embedded"


def test_run_has_the_recipe_losses_validation_and_throughput_metrics(embedded, lake) -> None:
    client, run_id = embedded.client, embedded.result.run_id
    steps_per_epoch = lake.plan.count("train") // (WORKERS * BATCH)
    for name in RECIPE_LOSSES:
        history = client.get_metric_history(run_id, name)
        steps = sorted(m.step for m in history)
        # log_every=1: one point per step of both epochs
        assert steps == list(range(1, 2 * steps_per_epoch + 1)), (name, steps)
        assert all(np.isfinite(m.value) for m in history), name
    for name in ("train/images_per_s", "train/step_time_s"):
        values = [m.value for m in client.get_metric_history(run_id, name)]
        assert len(values) == 2 * steps_per_epoch and min(values) > 0, name
    for name in VALIDATION:
        for metric in (f"val/{name}", f"val/gray_{name}"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, metric))
            assert steps == [steps_per_epoch, 2 * steps_per_epoch], (metric, steps)  # once per epoch
    metrics = embedded.run.data.metrics
    assert metrics["val/count"] == lake.plan.count("val")
    assert metrics["val/l1_ab"] == pytest.approx(embedded.result.metrics["val/l1_ab"])
    assert metrics["val/gray_l1_ab"] > 0


def test_run_params_are_the_full_flattened_config(embedded) -> None:
    expected = {k: "None" if v is None else str(v) for k, v in flatten(embedded.config.to_dict()).items()}
    assert embedded.run.data.params == expected
    assert {"model.base_filters", "stages.0.epochs", "data.datasets", "workers"} <= set(expected)


def test_run_tags_say_what_ran_where_on_which_data(embedded, lake) -> None:
    tags = embedded.run.data.tags
    assert tags["recolor.arch"] == "unet_256"
    assert tags["recolor.workers"] == str(WORKERS)
    assert tags["recolor.device"] == "cpu"
    assert tags["recolor.ray_run_name"] == "embedded"
    assert tags["recolor.storage"] == resolve_storage(embedded.config.storage)
    assert tags[manifest_tag(lake.ref)] == lake.plan.digests[lake.ref]
    assert re.fullmatch(r"[0-9a-f]{64}", tags[manifest_tag(lake.ref)])
    if (REPO / ".git").exists():
        commit = tags["mlflow.source.git.commit"]
        # Not compared with HEAD: other commits may land while the tests run.
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True)
        assert known.returncode == 0, f"tag mlflow.source.git.commit={commit!r} is no commit of this repository"


def test_run_inputs_are_the_dataset_version_for_training_and_validation(embedded, lake) -> None:
    inputs = {}
    for dataset_input in embedded.run.inputs.dataset_inputs:
        contexts = [tag.value for tag in dataset_input.tags if tag.key == "mlflow.data.context"]
        inputs[dataset_input.dataset.name] = (contexts, dataset_input.dataset)
    assert set(inputs) == {f"{lake.ref}/train", f"{lake.ref}/val"}
    for split, context in (("train", "training"), ("val", "validation")):
        contexts, dataset = inputs[f"{lake.ref}/{split}"]
        assert contexts == [context]
        assert dataset.digest and lake.plan.digests[lake.ref].startswith(dataset.digest)
        source = json.loads(dataset.source)
        assert lake.plan.uris[lake.ref] in json.dumps(source), source
        assert lake.plan.uris[lake.ref].endswith("photos/versions/000001.json")


def test_sample_grids_each_epoch_and_loss_curves_are_valid_pngs(embedded) -> None:
    client, run_id = embedded.client, embedded.result.run_id
    [stage_folder] = [f.path for f in client.list_artifacts(run_id, "samples")]
    grids = sorted(f.path for f in client.list_artifacts(run_id, stage_folder))
    assert grids == [f"{stage_folder}/epoch_001.png", f"{stage_folder}/epoch_002.png"]
    for grid in grids:
        local = client.download_artifacts(run_id, grid, str(embedded.root / "downloads"))
        assert_sample_grid(png(Path(local).read_bytes()))
    local = client.download_artifacts(run_id, "plots/loss_curves.png", str(embedded.root / "downloads"))
    curves = png(Path(local).read_bytes())
    assert curves.size == (1200, 400)  # two panels, 12 x 4 inches at 100 dpi
    colours = np.asarray(curves.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 50, "the loss plot is blank"


def test_generator_is_registered_as_candidate_and_predicts_through_pyfunc(embedded, lake) -> None:
    import mlflow.pyfunc

    client = embedded.client
    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert str(version.version) == str(embedded.result.model_version) == "1"
    assert version.run_id == embedded.result.run_id
    assert version.tags["run_id"] == embedded.result.run_id
    assert version.tags["datasets"] == lake.ref
    assert float(version.tags["val/l1_ab"]) == pytest.approx(embedded.result.metrics["val/l1_ab"], rel=1e-5)
    assert {"val/psnr", "val/ssim", "val/gray_l1_ab"} <= set(version.tags)
    with fluent_tracking_uri(embedded.uri):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
    assert [column.name for column in model.metadata.get_input_schema().inputs] == ["image", "path"]
    photos = [hue_picture(seed, width, height) for seed, (width, height) in enumerate([(70, 40), (33, 81)])]
    predicted = model.predict(pd.DataFrame({"image": [png_bytes(photo) for photo in photos]}))
    assert list(predicted["error"]) == ["", ""]
    for photo, encoded in zip(photos, predicted["image"], strict=True):
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as answer:
            assert_same_lightness("pyfunc", np.asarray(photo.convert("RGB")), np.asarray(answer.convert("RGB")))


def test_the_run_page_says_what_ran_and_how_it_went(embedded, lake) -> None:
    note = embedded.run.data.tags["mlflow.note.content"]
    assert note.startswith("**embedded**: unet_256") and "preset `defaults`" in note
    assert f"`{lake.ref}`" in note and f"{WORKERS} x cpu" in note and "gan: 2 epochs, vanilla, lr 0.0002" in note
    assert note.index("### Result") < note.index("### What ran")  # how it went first: seen without "Show more"
    result = note.split("### Result", 1)[1]
    final = embedded.run.data.metrics
    assert f"| L1 on ab | {final['val/l1_ab']:.4g} | {final['val/gray_l1_ab']:.4g} |" in result
    assert result.index("| colorfulness |") < result.index("| PSNR (dB) |") < result.index("| SSIM |")
    assert f"The photos' own colorfulness: {final['val/colorfulness_true']:.4g}." in result


def test_sample_grids_are_mlflow_images_by_step(embedded) -> None:
    """`mlflow.log_image(key=..., step=...)`: the run page's image view, one grid a validation."""
    images = [item.path for item in embedded.client.list_artifacts(embedded.result.run_id, "images")]
    grids = [path for path in images if path.split("/")[-1].startswith("val~samples+step+")]  # MLflow: "/" -> "~"
    steps = sorted({int(path.split("+step+")[1].split("+")[0]) for path in grids})
    assert len(steps) == 2 and steps[0] > 0, images  # two epochs: two validations, at their global steps


def test_the_experiments_chart_view_shows_the_last_sample_grid_without_run_parameters(embedded) -> None:
    """MLflow's default grid card shows step 0 (nothing logged there) under every run parameter: the saved view
    shows the last validation's grid, and the run's description links to it."""
    from pipeline.tracking.charts import VIEW_TAG, chart_view_route

    experiment = embedded.client.get_experiment(embedded.run.info.experiment_id)
    view = json.loads(experiment.tags[VIEW_TAG])
    [card] = [card for card in view["compareRunCharts"] if card["type"] == "IMAGE"]
    last = max(m.step for m in embedded.client.get_metric_history(embedded.result.run_id, "val/l1_ab"))
    assert card["imageKeys"] == ["val/samples"] and card["step"] == last and card["showRunParams"] is False
    assert card["metricSectionId"] in {section["uuid"] for section in view["compareRunSections"]}
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs
    note = embedded.client.get_run(embedded.result.run_id).data.tags["mlflow.note.content"]
    assert f"[chart view]({chart_view_route(experiment.experiment_id)})" in note


def test_system_metrics_are_logged_during_training(embedded) -> None:
    system = sorted(name for name in embedded.run.data.metrics if name.startswith("system/"))
    assert "system/cpu_utilization_percentage" in system, system
    assert "system/system_memory_usage_megabytes" in system, system
    # Sampled every 0.5 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, forwarded to rank 0) while rank 0 trains.
    history = embedded.client.get_metric_history(embedded.result.run_id, "system/cpu_utilization_percentage")
    assert history and all(0 <= m.value <= 100 * (os.cpu_count() or 1) for m in history), history


# --- a real MLflow server with artifacts on S3 ----------------------------------------------------------


def test_server_backend_tracks_the_same_and_keeps_artifacts_in_the_s3_bucket(served, s3_lake) -> None:
    lake = s3_lake
    client, run_id = served.client, served.result.run_id
    assert served.run.info.status == "FINISHED"
    assert served.run.info.artifact_uri.startswith("mlflow-artifacts:/"), served.run.info.artifact_uri
    steps_per_epoch = lake.plan.count("train") // (WORKERS * BATCH)
    for name in RECIPE_LOSSES:
        assert len(client.get_metric_history(run_id, name)) == steps_per_epoch, name
    assert {f"val/{n}" for n in VALIDATION} | {f"val/gray_{n}" for n in VALIDATION} <= set(served.run.data.metrics)
    assert served.run.data.params == {
        k: "None" if v is None else str(v) for k, v in flatten(served.config.to_dict()).items()
    }
    assert served.run.data.tags[manifest_tag(lake.ref)] == lake.plan.digests[lake.ref]
    sources = sorted(d.dataset.source for d in served.run.inputs.dataset_inputs)
    assert len(sources) == 2 and all(lake.plan.uris[lake.ref] in source for source in sources), sources
    assert lake.plan.uris[lake.ref].startswith("s3://")

    downloads = served.root / "downloads"
    grid = client.download_artifacts(run_id, "samples/0-gan/epoch_001.png", str(downloads))
    assert_sample_grid(png(Path(grid).read_bytes()))
    curves = client.download_artifacts(run_id, "plots/loss_curves.png", str(downloads))
    assert png(Path(curves).read_bytes()).size == (1200, 400)

    # The objects live in the rclone bucket, under the server's --artifacts-destination.
    stored = {path.name: path for path in (served.server.bucket_dir / "artifacts").rglob("*") if path.is_file()}
    assert {"epoch_001.png", "loss_curves.png", "MLmodel"} <= set(stored), sorted(stored)
    assert stored["loss_curves.png"].read_bytes() == Path(curves).read_bytes()
    assert not (served.root / "mlartifacts").exists()

    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert str(version.version) == str(served.result.model_version) and version.run_id == run_id
    from pipeline.tracking.registry import load_generator

    generator = load_generator(f"models:/{MODEL}@candidate", served.uri)  # read back through the server
    with torch.no_grad():
        assert generator(torch.zeros(1, 1, SIZE, SIZE)).shape == (1, 2, SIZE, SIZE)


# --- registry: a deliberately worse generator, promotion, runs compare --------------------------------------


@pytest.fixture(scope="module")
def worse(embedded, lake):
    """A second run in experiment `recolor` (another name and learning rate) holding the trained generator
    with its output layer forced to saturated colour (ab near +110 everywhere): far worse on every metric.
    Registered as a second version of `colorizer`, without an alias."""
    import mlflow

    from pipeline.evaluation.promote import compute_metrics
    from pipeline.models.saved import GeneratorSpec
    from pipeline.tracking.registry import load_generator, log_generator
    from pipeline.tracking.runs import start_or_resume_run

    generator = load_generator(embedded.result.checkpoint)
    output_layer = generator.up_blocks[-1][1]
    assert isinstance(output_layer, torch.nn.ConvTranspose2d) and output_layer.out_channels == 2
    with torch.no_grad():
        output_layer.weight.zero_()
        output_layer.bias.fill_(3.0)  # tanh(3) = 0.995
    config = dataclasses.replace(
        embedded.config, name="worse", stages=[dataclasses.replace(embedded.config.stages[0], lr=1e-3)]
    )
    run_id, resumed = start_or_resume_run(
        embedded.uri, "recolor", config, lake.plan, resolve_storage(config.storage), "cpu"
    )
    assert not resumed
    metrics = compute_metrics(generator, lake.plan, "val", 8, torch.device("cpu"))
    embedded.client.log_batch(
        run_id,
        metrics=[
            mlflow.entities.Metric(k.replace("eval/", "val/", 1), v, int(time.time() * 1000), 0)
            for k, v in metrics.items()
        ],
    )
    spec = GeneratorSpec.from_config(embedded.config, SIZE)
    version = log_generator(generator, spec, run_id, embedded.uri, MODEL, alias=None)
    embedded.client.set_terminated(run_id, "FINISHED")
    return SimpleNamespace(run_id=run_id, version=str(version.version), config=config)


@pytest.fixture(scope="module")
def promotions(embedded, worse, lake, cli_runner, secret_env):
    """Three promotions on the same data: the worse model with no champion yet, the trained model (through
    `recolor evaluate --promote`), then the worse one again."""
    from pipeline.evaluation.promote import evaluate

    def champion() -> str:
        return str(embedded.client.get_model_version_by_alias(MODEL, "champion").version)

    first = evaluate(f"models:/{MODEL}/{worse.version}", "photos", lake.uri, tracking_uri=embedded.uri, promote=True,
                     fid=False)  # fmt: skip
    after_first = champion()
    cli = cli_runner(
        "evaluate", "--model", f"models:/{MODEL}@candidate", "--dataset", "photos", "--lake", lake.uri,
        "--promote", "--json", "--device", "cpu",
        cwd=embedded.root, timeout=180,
    )  # fmt: skip
    (secret_env.logs / "evaluate-cli.log").write_text(cli.stdout + cli.stderr)
    assert cli.returncode == 0, cli.stderr[-3000:]
    second = json.loads(cli.stdout)
    after_second = champion()
    third = evaluate(f"models:/{MODEL}/{worse.version}", "photos", lake.uri, tracking_uri=embedded.uri, promote=True,
                     fid=False)  # fmt: skip
    return SimpleNamespace(
        first=first, after_first=after_first, second=second, after_second=after_second, third=third,
        after_third=champion(),
    )  # fmt: skip


def test_promote_sets_champion_when_there_is_none(promotions, worse) -> None:
    assert promotions.first.promotion["decision"] == "promoted"
    assert promotions.first.promotion["reason"] == "no champion yet"
    assert promotions.after_first == worse.version


def test_promote_moves_champion_to_a_better_model_and_not_to_a_worse_one(promotions, embedded, worse, lake) -> None:
    good = str(embedded.result.model_version)
    bad_value = promotions.first.metrics["eval/l1_ab"]
    second = promotions.second["promotion"]
    assert second["decision"] == "promoted", second
    assert second["champion_version"] == worse.version and second["candidate_version"] == good
    assert second["champion_value"] == pytest.approx(bad_value)
    assert second["candidate_value"] < bad_value / 2  # the saturated model is far worse
    assert promotions.after_second == good

    third = promotions.third.promotion
    assert third["decision"] == "kept", third
    assert third["champion_version"] == good
    assert third["champion_value"] == pytest.approx(second["candidate_value"])
    assert promotions.after_third == good  # unchanged

    # The decisions are recorded: on the evaluation runs and on the model versions.
    client = embedded.client
    run = client.get_run(promotions.third.run_id)
    assert run.data.tags["promotion.decision"] == "kept"
    assert float(run.data.tags["promotion.champion_value"]) == pytest.approx(second["candidate_value"])
    assert run.data.tags["recolor.model_version"] == worse.version
    assert run.data.metrics["eval/l1_ab"] == pytest.approx(bad_value)
    assert client.get_experiment(run.info.experiment_id).name == "recolor-evaluation"
    assert client.get_run(promotions.second["run_id"]).data.tags["promotion.decision"] == "promoted"
    key = f"eval.{lake.ref.replace('@', ':')}.val.l1_ab"
    assert float(client.get_model_version(MODEL, good).tags[key]) == pytest.approx(second["candidate_value"], rel=1e-5)
    assert float(client.get_model_version(MODEL, worse.version).tags[key]) == pytest.approx(bad_value, rel=1e-5)


def test_evaluate_scores_fid_and_kid_beside_gray_and_logs_each_image_and_the_worst(promotions, embedded) -> None:
    metrics = promotions.second["metrics"]  # `recolor evaluate` with FID (the default)
    assert all(np.isfinite(metrics[f"eval/{name}"]) for name in ("fid", "kid", "kid_std", "gray_fid", "gray_kid"))
    assert metrics["eval/fid"] > 0 and metrics["eval/gray_fid"] > 0 and metrics["eval/kid_std"] >= 0
    assert promotions.second["protocol"] == "crop-64"  # the lake's --resize cover, at 64 px
    assert "eval/fid" not in promotions.first.metrics  # fid=False
    run_id = promotions.second["run_id"]
    run = embedded.client.get_run(run_id)
    assert run.data.params["protocol"] == "crop-64" and run.data.metrics["eval/fid"] == pytest.approx(
        metrics["eval/fid"]
    )
    folder = Path(embedded.client.download_artifacts(run_id, ""))
    table = json.loads((folder / "per_image.json").read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(rows) == metrics["eval/count"] and all(row["shard"].endswith(".tar") and row["key"] for row in rows)
    assert [row["l1_ab"] for row in rows] == sorted((row["l1_ab"] for row in rows), reverse=True)  # worst first
    assert np.mean([row["psnr"] for row in rows]) == pytest.approx(metrics["eval/psnr"], rel=1e-6)
    with Image.open(folder / "worst_16.png") as grid:
        assert grid.width > grid.height  # one column an image (up to 16), three rows


@pytest.fixture(scope="module")
def compared(embedded, worse, cli_runner, secret_env):
    """`recolor runs compare --experiment recolor --json` in the embedded store's folder."""
    result = cli_runner("runs", "compare", "--experiment", "recolor", "--json", cwd=embedded.root, timeout=120)
    (secret_env.logs / "compare-cli.log").write_text(result.stdout + result.stderr)
    return result


def test_runs_compare_lists_the_runs_with_differing_params_and_final_metrics(compared, embedded, worse) -> None:
    assert compared.returncode == 0, compared.stderr[-3000:]
    report = json.loads(compared.stdout)
    assert report["experiment"] == "recolor"
    assert set(report["differing_params"]) == {"name", "stages.0.lr"}
    rows = {row["run_id"]: row for row in report["runs"]}
    assert set(rows) == {embedded.result.run_id, worse.run_id}
    trained = rows[embedded.result.run_id]
    assert trained["name"] == "embedded" and trained["status"] == "FINISHED"
    assert trained["params"] == {"name": "embedded", "stages.0.lr": "0.0002"}
    assert rows[worse.run_id]["params"] == {"name": "worse", "stages.0.lr": "0.001"}
    final = embedded.run.data.metrics
    # val/fid and val/kid lead the list where a run scored them (this one's fid_every is 0).
    assert set(trained["metrics"]) == {"val/colorfulness", "val/l1_ab", "val/psnr", "val/ssim", "val/auc",
                                       "val/colorfulness_abs_diff", "train/loss_G_L1", "train/loss_D"}  # fmt: skip
    for name, value in trained["metrics"].items():
        assert value == pytest.approx(final[name]), name
    assert rows[worse.run_id]["metrics"]["val/l1_ab"] > 2 * trained["metrics"]["val/l1_ab"]


# --- colorize ---------------------------------------------------------------------------------------------


def write_inputs(folder: Path, photo_writer) -> dict[str, np.ndarray]:
    """Photos of several kinds and sizes; returns {file name: the RGB the user sees} (EXIF applied,
    alpha over white as ingest composites it). Also an unreadable file, which is not returned."""
    (folder / "more").mkdir(parents=True)
    expected = {}

    def make_image(seed: int, width: int, height: int) -> Image.Image:
        [path] = photo_writer(folder.parent / "originals", [seed], width=width, height=height, ext=".png")
        return Image.open(path).convert("RGB")

    photo = make_image(1, 300, 200)
    photo.save(folder / "rgb.jpg", quality=90)
    gray = make_image(2, 130, 90).convert("L")
    gray.save(folder / "more" / "gray.png")
    alpha = make_image(3, 97, 61).convert("RGBA")
    alpha.putalpha(Image.fromarray(np.tile(np.linspace(40, 255, 97, dtype=np.uint8), (61, 1))))
    alpha.save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    make_image(4, 120, 80).save(folder / "rotated.jpg", quality=92, exif=exif)
    make_image(5, 150, 100).convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG at all\n" * 20)

    for name in ("rgb.jpg", "more/gray.png", "alpha.png", "rotated.jpg", "cmyk.jpg"):
        with Image.open(folder / name) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode == "RGBA":
                image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
            expected[name] = np.asarray(image.convert("RGB"))
    assert expected["rotated.jpg"].shape[:2] == (120, 80)  # displayed upright: 80 wide, 120 high
    return expected


@pytest.fixture(scope="module")
def colorized(embedded, cli_runner, photo_writer, secret_env, tmp_path_factory):
    """`recolor colorize --model models:/colorizer@candidate FOLDER -o OUT` with MLFLOW_TRACKING_URI set."""
    root = tmp_path_factory.mktemp("colorize")
    expected = write_inputs(root / "inputs", photo_writer)
    result = cli_runner(
        "colorize", "--model", f"models:/{MODEL}@candidate", root / "inputs", "-o", root / "out", "--no-progress",
        "--device", "cpu",
        cwd=root, env={"MLFLOW_TRACKING_URI": embedded.uri}, timeout=180,
    )  # fmt: skip
    (secret_env.logs / "colorize-cli.log").write_text(result.stdout + result.stderr)
    return SimpleNamespace(root=root, result=result, expected=expected)


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_same_lightness(name: str, expected: np.ndarray, produced: np.ndarray) -> None:
    assert produced.shape == expected.shape, (name, produced.shape, expected.shape)
    # 8-bit output: rounding R, G and B moves L by a little (measured: max 0.2, mean 0.11 at most, even for
    # colours far outside the sRGB gamut).
    difference = np.abs(lightness_of(produced) - lightness_of(expected))
    assert difference.max() <= 1.0 and difference.mean() <= 0.3, (name, difference.max(), difference.mean())


def test_colorize_keeps_each_inputs_size_and_lightness_and_reports_the_unreadable_one(colorized) -> None:
    result, out = colorized.result, colorized.root / "out"
    assert result.returncode == 1, result.stderr[-3000:]  # one input failed
    assert "colorized 5 image(s)" in result.stdout
    skipped = [line for line in result.error_lines if line.strip().startswith("skipped ")]
    assert len(skipped) == 1 and "broken.jpg" in skipped[0], result.stderr
    assert result.error_lines[-1] == "recolor: error: 1 input(s) could not be colorized"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["alpha.png", "cmyk.png", "more/gray.png", "rgb.png", "rotated.png"]
    for name, expected in colorized.expected.items():
        with Image.open((out / name).with_suffix(".png")) as image:
            assert image.mode == "RGB"
            produced = np.asarray(image)
        assert_same_lightness(name, expected, produced)


def test_colorize_keeps_lightness_under_strong_colours_outside_the_gamut(colorized, embedded, worse, tmp_path) -> None:
    # The tiny trained generator predicts nearly gray; the saturated one (ab near +110) puts most pixels
    # outside sRGB, where clipping R, G and B one by one would shift L by up to 30 units.
    from pipeline.colorize.files import ColorizeOptions
    from pipeline.colorize.local import colorize

    inputs = colorized.root / "inputs"
    options = ColorizeOptions(tracking_uri=embedded.uri, progress=False)
    summary = colorize(f"models:/{MODEL}/{worse.version}", [str(inputs)], str(tmp_path), options)
    assert len(summary.written) == 5 and [uri for uri, _ in summary.failed] == [str(inputs / "broken.jpg")]
    for name, expected in colorized.expected.items():
        produced = np.asarray(Image.open((tmp_path / name).with_suffix(".png")))
        assert_same_lightness(name, expected, produced)
        chroma = np.abs(produced.astype(int) - produced.mean(axis=-1, keepdims=True)).mean()
        assert chroma > 15, (name, chroma)  # strongly coloured indeed


def test_colorize_accepts_a_checkpoint_path_as_the_model(colorized, embedded, tmp_path) -> None:
    from pipeline.colorize.files import ColorizeOptions
    from pipeline.colorize.local import colorize

    inputs = colorized.root / "inputs"
    photos = [str(inputs / "rgb.jpg"), str(inputs / "cmyk.jpg")]
    summary = colorize(embedded.result.checkpoint, photos, str(tmp_path), ColorizeOptions(progress=False))
    assert not summary.failed and len(summary.written) == 2
    for name in ("rgb", "cmyk"):
        produced = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert_same_lightness(name, colorized.expected[f"{name}.jpg"], produced)
        # The checkpoint holds the registered weights: the same colours as the registry's model.
        registered = np.asarray(Image.open(colorized.root / "out" / f"{name}.png")).astype(int)
        assert np.abs(produced.astype(int) - registered).max() <= 1, name


# --- secrets ------------------------------------------------------------------------------------------------


def scan_store(uri: str, client, where: Path) -> dict[str, bytes]:
    """Everything an MLflow store shows about its runs and models, as {what: bytes} to search."""
    import mlflow.artifacts

    found: dict[str, bytes] = {}
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    assert runs, uri
    for run in runs:
        run_id = run.info.run_id
        found[f"{run_id} params"] = json.dumps(run.data.params).encode()
        found[f"{run_id} tags"] = json.dumps(run.data.tags).encode()
        found[f"{run_id} metric names"] = json.dumps(sorted(run.data.metrics)).encode()
        found[f"{run_id} inputs"] = json.dumps(
            [[d.dataset.name, d.dataset.source, d.dataset.digest] for d in run.inputs.dataset_inputs]
        ).encode()
        if client.list_artifacts(run_id):
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="", dst_path=str(where / run_id), tracking_uri=uri
            )
            for path, data in bytes_of_tree(Path(local)):
                found[f"{run_id} artifact {path.name}"] = data
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert versions, uri
    for version in versions:
        found[f"{MODEL} v{version.version} tags"] = json.dumps(version.tags).encode()
        with fluent_tracking_uri(uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{MODEL}/{version.version}", dst_path=str(where / f"model-{version.version}")
            )
        files = list(bytes_of_tree(Path(local)))
        assert any(path.name == "MLmodel" for path, _ in files)
        for path, data in files:
            found[f"{MODEL} v{version.version} file {path.relative_to(local)}"] = data
    return found


def test_no_secret_appears_in_params_tags_metrics_artifacts_models_or_logs(
    embedded, served, promotions, compared, colorized, secret_env, tmp_path
) -> None:
    import ray

    searched: dict[str, bytes] = {}
    searched.update(scan_store(embedded.uri, embedded.client, tmp_path / "embedded"))
    searched.update(scan_store(served.uri, served.client, tmp_path / "served"))
    # What is on disk: the embedded store's database and artifacts; the server's database and bucket.
    for folder in (embedded.root, served.server.root, served.server.bucket_dir):
        searched.update({str(path): data for path, data in bytes_of_tree(folder)})
    # Logs: the training drivers, the MLflow server, the CLI runs, and this Ray session's logs (workers).
    searched.update({str(path): data for path, data in bytes_of_tree(secret_env.logs)})
    assert {"train-embedded.log", "train-served.log", "mlflow-server.log", "evaluate-cli.log", "compare-cli.log",
            "colorize-cli.log"} <= {p.name for p in secret_env.logs.iterdir()}  # fmt: skip
    # Ray's own logs too (workers, raylet, GCS): its runtime env agent logs every runtime env, values included.
    ray_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    recent = [p for p in ray_logs.rglob("*") if p.is_file() and p.stat().st_mtime >= secret_env.started]
    assert any(p.name.startswith("worker-") for p in recent), ray_logs
    searched.update({str(path): path.read_bytes() for path in recent})

    assert len(searched) > 50 and any(b"train/loss_G_L1" in data for data in searched.values())
    for secret in secret_env.values:
        leaks = sorted(what for what, data in searched.items() if secret.encode() in data)
        assert not leaks, f"a secret ({secret[:4]}...) appears in: {leaks}"
