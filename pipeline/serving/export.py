"""`recolor export`: a registered generator as an ONNX file or a `torch.export` program, checked on write.

Both take L in [-1, 1], float32 (N, 1, S, S), and give ab in [-1, 1], (N, 2, S, S) (times 110 for Lab
units); N is dynamic, S is the side the model was trained at (`recolor export` prints it). Each export
is run beside the PyTorch generator on the same batch before it is kept: ONNX through onnxruntime,
the pt2 program through `torch.export.load`; a difference over `tolerance` removes the file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ingest.errors import ConfigError
from pipeline.serving import EXPORT_FORMATS, TOLERANCE

ONNX_OPSET = 18


@dataclass
class ExportResult:
    path: Path
    export_format: str
    side: int
    max_abs_diff: float  # the export against PyTorch on a check batch


def export_generator(generator: nn.Module, side: int, export_format: str, path: str | Path,
                     tolerance: float = TOLERANCE, metadata: dict[str, str] | None = None,
                     overwrite: bool = False) -> ExportResult:  # fmt: skip
    """Export `generator` (eval mode, CPU, float32) for inputs of side `side` with a dynamic batch; check it.

    Raises:
        ConfigError: an unknown format, an output path that cannot be written, an existing file (without
            `overwrite`), or an export that differs from PyTorch by more than `tolerance` (the file is removed).
    """
    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    if export_format == "mlflow":
        return export_model_folder(generator, side, path, overwrite)
    if getattr(generator, "fusion", None) is not None:
        raise ConfigError(
            "this generator fuses a frozen Inception network (model.fusion: inception), which is not exported: "
            "serve it with `mlflow models serve` (its registered model) or colorize with `recolor colorize` instead"
        )
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: pass the file to write, e.g. {path / ('colorizer.' + export_format)}")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: pass --overwrite to replace it, or another -o")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the folder of {path}: {e.strerror or e}") from None
    generator = generator.cpu().float().eval()
    example = torch.zeros(2, 1, side, side)
    from ingest.storage.local import replaced_on_success

    try:
        with replaced_on_success(path, suffix=f".partial.{export_format}") as temp:  # torch.export.load wants it
            if export_format == "onnx":
                _write_onnx(generator, example, temp, metadata or {})
                run = _onnx_runner(temp)
            else:
                _write_pt2(generator, example, temp)
                run = _pt2_runner(temp)
            diff = _check(generator, run, side)
            if diff > tolerance:
                raise ConfigError(
                    f"the {export_format} export differs from PyTorch by {diff:.2e} on the ab output (tolerance "
                    f"{tolerance:.0e}): not written"
                )
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    return ExportResult(path, export_format, side, diff)


def export_model_folder(generator: nn.Module, side: int, path: str | Path, overwrite: bool = False) -> ExportResult:
    """Write `generator` (loaded, and so verified, by recolor) as a new MLflow model folder: recolor's serving module,
    its saved-generator data and pinned requirements, nothing copied from where the model came from. Served with
    `mlflow models serve -m PATH --env-manager local`, it runs the installed recolor and no other code. Written into
    a hidden folder beside `path`, loaded back through `load_generator` and compared, then renamed into place.

    Raises:
        ConfigError: `path` exists (without `overwrite`: only a folder this command wrote is replaced) or cannot be
            written, or the folder does not load back to the same outputs.
    """
    import shutil
    import tempfile
    import warnings

    import mlflow.pyfunc

    from pipeline.models.saved import GeneratorSpec, save_generator
    from pipeline.serving.signature import serving_signature
    from pipeline.tracking.registry import SERVING_MODULE, load_generator, serving_requirements

    path = Path(path)
    if path.exists():
        if not overwrite:
            raise ConfigError(f"{path} exists: pass --overwrite to replace it, or another -o")
        if not (path / "MLmodel").is_file() or not (path / EXPORT_MARKER).is_file():
            raise ConfigError(f"{path} exists and is not a model folder recolor export wrote: pass another -o")
    spec = getattr(generator, "recolor_spec", None)
    if not isinstance(spec, GeneratorSpec):
        raise ConfigError("this generator carries no saved spec (an old pickled model): export it as onnx or pt2")
    spec = dataclasses.replace(spec, image_size=side)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        data = save_generator(generator.cpu().float().eval(), spec, scratch / "generator")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            mlflow.pyfunc.save_model(
                str(scratch / "model"),
                loader_module=SERVING_MODULE,
                data_path=str(data),
                signature=serving_signature(),
                pip_requirements=serving_requirements(spec.fusion, spec.arch),
            )
        (scratch / "model" / EXPORT_MARKER).write_text("written by recolor export --format mlflow\n")
        loaded = load_generator(str(scratch / "model"))
        diff = _check(generator.cpu().float().eval(), lambda light: loaded(torch.from_numpy(light)).detach().numpy(),
                      side)  # fmt: skip
        if diff != 0.0:
            raise ConfigError(f"the model folder loads back {diff:.2e} away from the generator: not written")
        if path.exists():
            shutil.rmtree(path)
        os.replace(scratch / "model", path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(path, "mlflow", side, diff)


EXPORT_MARKER = "recolor-export.txt"  # in a model folder `export_model_folder` wrote: --overwrite may replace it


def _write_onnx(generator: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    import logging
    import warnings

    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # notes on its own internals (torchvision ops it skips)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                generator,
                (example,),
                input_names=["L"],
                output_names=["ab"],
                dynamic_shapes=({0: batch},),
                opset_version=ONNX_OPSET,
                dynamo=True,
                verbose=False,
            )
    finally:  # the caller's logging as it was, whether the export worked or not
        exporter_log.setLevel(level)
    model = program.model_proto
    for key, value in {"producer": "recolor", **metadata}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(path))


def _onnx_runner(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda light: session.run(["ab"], {"L": light})[0]


def _write_pt2(generator: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(generator, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def _pt2_runner(path: Path):
    module = torch.export.load(str(path)).module()
    return lambda light: module(torch.from_numpy(light)).detach().numpy()


def _check(generator: nn.Module, run, side: int) -> float:
    """Max abs difference of the export and PyTorch on batches of 1 and 3 seeded inputs (the batch is dynamic)."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch in (1, 3):
        light = rng.uniform(-1, 1, size=(batch, 1, side, side)).astype(np.float32)
        with torch.no_grad():
            expected = generator(torch.from_numpy(light)).numpy()
        got = np.asarray(run(light))
        if got.shape != expected.shape:
            raise ConfigError(f"the export answers shape {got.shape} for {light.shape}; PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
