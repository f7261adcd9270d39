"""A registered generator outside training: pickle-free loading, old pickled models, export, `mlflow models serve`.

The registry is an embedded MLflow (SQLite) holding an untrained, seeded U-Net in the saved-generator format;
serving is a real `mlflow models serve` process on loopback answering real HTTP requests.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bad_files import hue_picture
from PIL import Image

from infra.stack.s3_server import free_port
from ingest.errors import ConfigError
from ingest.lab import lightness
from pipeline.colorize.pixels import colorize_rgb
from pipeline.models.saved import SPEC_FILE, WEIGHTS_FILE, GeneratorSpec
from pipeline.tracking.registry import load_generator, log_generator

SIDE = 64


class RunsCode:
    """A pickle payload: unpickling it creates the file `path` (standing in for any code an attacker picks)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_store):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    uri = mlflow_store(root)
    client = MlflowClient(uri)
    experiment = client.create_experiment("serving", artifact_location=str(root / "artifacts"))
    torch.manual_seed(0)
    spec = GeneratorSpec("unet_256", "batch", 8, 5, SIDE)
    generator = spec.build()
    run = client.create_run(experiment)
    version = log_generator(generator, spec, run.info.run_id, uri, "colorizer", alias="champion")
    client.set_terminated(run.info.run_id)
    return SimpleNamespace(root=root, uri=uri, client=client, experiment=experiment, generator=generator,
                           spec=spec, version=version)  # fmt: skip


def model_folder(registry, tmp_path: Path) -> Path:
    return download(registry, "models:/colorizer@champion", tmp_path)


def download(registry, uri: str, folder: Path) -> Path:
    import mlflow.artifacts

    from pipeline.tracking.uri import fluent_tracking_uri

    with fluent_tracking_uri(registry.uri):
        return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder)))


def photo_bytes(seed: int, width: int, height: int, image_format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    hue_picture(seed, width, height).save(buffer, format=image_format, quality=92)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# --- the saved format: no pickle ---------------------------------------------------------------------------


def test_a_registered_generator_is_json_and_a_plain_state_dict(registry, tmp_path) -> None:
    folder = model_folder(registry, tmp_path)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert f"data/generator/{SPEC_FILE}" in files and f"data/generator/{WEIGHTS_FILE}" in files, files
    assert not [name for name in files if name.endswith((".pkl", ".pth", ".cloudpickle"))], files
    mlmodel = (folder / "MLmodel").read_text()
    assert "loader_module: pipeline.serving.pyfunc" in mlmodel and "pytorch:" not in mlmodel
    spec = json.loads((folder / "data/generator" / SPEC_FILE).read_text())
    assert spec == {"format": "recolor-generator", "format_version": 1, "arch": "unet_256", "norm": "batch",
                    "base_filters": 8, "num_downs": 5, "image_size": SIDE, "resize": "cover"}  # fmt: skip
    state = torch.load(folder / "data/generator" / WEIGHTS_FILE, weights_only=True)
    assert state.keys() == registry.generator.state_dict().keys()


def test_loading_from_the_registry_gives_the_logged_weights(registry) -> None:
    loaded = load_generator("models:/colorizer@champion", registry.uri)
    probe = torch.rand(2, 1, SIDE, SIDE) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(probe), registry.generator(probe))


def test_a_weights_file_carrying_code_is_refused_and_its_code_never_runs(registry, tmp_path, recolor) -> None:
    folder = model_folder(registry, tmp_path / "model")
    ran = tmp_path / "code-ran"
    torch.save({"layer.weight": RunsCode(ran)}, folder / "data/generator" / WEIGHTS_FILE)
    with pytest.raises(ConfigError, match=r"generator\.pt is not a plain state dict of tensors"):
        load_generator(str(folder))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_bytes(1, 40, 30))
    result = recolor("colorize", photo, "-o", tmp_path / "out", "--model", folder, "--no-progress")
    assert result.returncode == 2 and len(result.error_lines) == 1, result.stderr
    assert "is not a plain state dict of tensors" in result.stderr and "weights_only" not in result.stderr
    assert not ran.exists()


def test_a_spec_naming_no_known_architecture_is_refused_naming_the_field(registry, tmp_path) -> None:
    folder = model_folder(registry, tmp_path)
    spec_path = folder / "data/generator" / SPEC_FILE
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "arch": "os.system"}))
    with pytest.raises(ConfigError, match=r"colorizer\.json: arch must be one of"):
        load_generator(str(folder))
    spec_path.write_text(json.dumps({k: v for k, v in spec.items() if k != "num_downs"}))
    with pytest.raises(ConfigError, match=r"colorizer\.json: field 'num_downs' is missing"):
        load_generator(str(folder))
    spec_path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"colorizer\.json is not readable JSON"):
        load_generator(str(folder))


# --- the old pickled format ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def old_model(registry):
    """The generator registered the way recolor did before the saved format: mlflow.pytorch, pickled."""
    import mlflow
    import mlflow.pytorch

    from pipeline.tracking.uri import fluent_tracking_uri

    package = str(Path(__file__).resolve().parents[2] / "pipeline")
    with fluent_tracking_uri(registry.uri), mlflow.start_run(experiment_id=registry.experiment):
        mlflow.pytorch.log_model(registry.generator, name="generator", serialization_format="pickle",
                                 code_paths=[package], registered_model_name="old-colorizer")  # fmt: skip
    return "models:/old-colorizer/1"


def test_an_old_pickled_model_is_refused_without_trust_pickle(registry, old_model, tmp_path, recolor) -> None:
    with pytest.raises(ConfigError, match=r"old pickled format: loading it runs code .* --trust-pickle"):
        load_generator(old_model, registry.uri)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_bytes(2, 40, 30))
    env = {"MLFLOW_TRACKING_URI": registry.uri}
    refused = recolor("colorize", photo, "-o", tmp_path / "out", "--model", old_model, "--no-progress", env=env)
    assert refused.returncode == 2 and len(refused.error_lines) == 1 and "--trust-pickle" in refused.stderr
    assert not (tmp_path / "out" / "photo.png").exists()
    trusted = recolor("colorize", photo, "-o", tmp_path / "out", "--model", old_model, "--no-progress",
                      "--trust-pickle", env=env)  # fmt: skip
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert "old pickled format, loaded because --trust-pickle was given" in trusted.stderr
    assert (tmp_path / "out" / "photo.png").is_file()


def test_a_model_folder_of_the_old_format_never_runs_its_pickle_untrusted(registry, old_model, tmp_path) -> None:
    folder = download(registry, old_model, tmp_path)
    [pickled] = list(folder.rglob("model.pth"))
    ran = tmp_path / "code-ran"
    torch.save(RunsCode(ran), pickled)
    with pytest.raises(ConfigError, match=r"old pickled format"):
        load_generator(str(folder))
    assert not ran.exists()


# --- export -------------------------------------------------------------------------------------------------


def test_export_to_onnx_has_a_dynamic_batch_and_matches_pytorch(registry, tmp_path, recolor) -> None:
    import onnx
    import onnxruntime

    target = tmp_path / "exports" / "colorizer.onnx"
    env = {"MLFLOW_TRACKING_URI": registry.uri}
    result = recolor("export", "--model", "models:/colorizer@champion", "--format", "onnx", "-o", target, env=env,
                     timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"input (N, 1, {SIDE}, {SIDE})" in result.stdout
    model = onnx.load(str(target))
    assert {entry.key for entry in model.metadata_props} >= {"producer", "model", "input", "output"}
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for batch in (2, 5):  # neither is the check batch of the export (1 and 3)
        light = rng.uniform(-1, 1, (batch, 1, SIDE, SIDE)).astype(np.float32)
        [ab] = session.run(["ab"], {"L": light})
        with torch.no_grad():
            expected = registry.generator(torch.from_numpy(light)).numpy()
        assert ab.shape == (batch, 2, SIDE, SIDE) and np.abs(ab - expected).max() <= 1e-4
    assert not [p.name for p in target.parent.iterdir() if p.name.startswith(".")]  # no partial file left


def test_export_to_pt2_has_a_dynamic_batch_and_matches_pytorch(registry, tmp_path, recolor) -> None:
    target = tmp_path / "colorizer.pt2"
    env = {"MLFLOW_TRACKING_URI": registry.uri}
    result = recolor("export", "--model", "models:/colorizer/1", "--format", "pt2", "-o", target, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    module = torch.export.load(str(target)).module()
    light = torch.rand(4, 1, SIDE, SIDE) * 2 - 1
    with torch.no_grad():
        assert (module(light) - registry.generator(light)).abs().max() <= 1e-4


def test_export_refuses_a_missing_model_and_a_folder_as_output_in_one_line(registry, tmp_path, recolor) -> None:
    env = {"MLFLOW_TRACKING_URI": registry.uri}
    missing = recolor("export", "--model", "models:/nobody@champion", "--format", "onnx", "-o", tmp_path / "x.onnx",
                      env=env)  # fmt: skip
    assert missing.returncode == 2 and len(missing.error_lines) == 1 and "nobody" in missing.stderr
    folder = recolor("export", "--model", "models:/colorizer/1", "--format", "onnx", "-o", tmp_path, env=env)
    assert folder.returncode == 2 and "is a folder: pass the file to write" in folder.stderr
    assert len(folder.error_lines) == 1


# --- serving ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    """`mlflow models serve -m models:/colorizer@champion --env-manager local` on a free loopback port (another
    port once if the first was taken meanwhile: other suites pick free ports too)."""
    root = tmp_path_factory.mktemp("serve")
    # MLflow starts `uvicorn` by name: the environment's bin folder must be on PATH, as in an activated venv.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri, "PATH": path}
    for attempt in (1, 2):
        port = free_port()
        log_path = root / f"serve-{attempt}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/colorizer@champion",
                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            if _wait_for_ping(url, process):
                yield SimpleNamespace(url=url, log=log_path)
                return
            if attempt == 2:
                raise AssertionError(f"mlflow models serve did not start:\n{log_path.read_text()[-3000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_for_ping(url: str, process, timeout_s: float = 240) -> bool:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def invoke(served, records: list[dict], params: dict | None = None) -> tuple[int, dict]:
    body = {"dataframe_records": records, **({"params": params} if params else {})}
    request = urllib.request.Request(f"{served.url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_colorized_photos_at_full_resolution(registry, served) -> None:
    photos = [photo_bytes(3, 150, 100), photo_bytes(4, 61, 97, "PNG")]
    status, answer = invoke(served, [{"image": base64.b64encode(photo).decode()} for photo in photos])
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == 2
    for photo, row in zip(photos, rows, strict=True):
        original = decoded(photo)
        produced = decoded(base64.b64decode(row["image"]))
        assert produced.shape == original.shape and (row["width"], row["height"]) == original.shape[1::-1]
        assert row["error"] == ""
        difference = np.abs(lightness(produced) - lightness(original))
        assert difference.max() <= 1.0 and difference.mean() <= 0.3
        # The same pixels as colorizing in this process: one code path for every way of colorizing.
        [expected] = colorize_rgb(registry.generator, [original], SIDE, torch.device("cpu"))
        assert np.abs(produced.astype(int) - expected).max() <= 1
        assert np.abs(produced.astype(int) - original).mean() > 1  # colorized, not the photo sent back


@pytest.mark.slow
def test_mlflow_models_serve_names_the_bad_rows_and_refuses_a_request_of_only_bad_ones(served) -> None:
    good = base64.b64encode(photo_bytes(5, 48, 40)).decode()
    broken = base64.b64encode(b"this is not a JPEG").decode()
    status, answer = invoke(served, [{"image": good}, {"image": broken}], params={"format": "jpeg", "quality": 80})
    assert status == 200, answer
    first, second = answer["predictions"]
    assert decoded(base64.b64decode(first["image"])).shape == (40, 48, 3) and first["error"] == ""
    assert second["image"] == "" and second["error"].startswith("row 1: not_an_image")
    status, answer = invoke(served, [{"image": broken}])
    assert status == 400 and "row 0: not_an_image" in answer["message"], answer
