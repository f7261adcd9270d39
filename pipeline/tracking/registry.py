"""Generators in the MLflow model registry: log, register with an alias, load back from any URI.

A model URI may be `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/generator`, an
MLflow model folder, or a training checkpoint (a `checkpoint.pt` file or the folder holding it,
local or... the latest one under a run's storage folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ingest.errors import ConfigError

MODEL_ARTIFACT = "generator"
DEFAULT_MODEL_NAME = "colorizer"


def generator_from_checkpoint(payload: dict) -> nn.Module:
    """Rebuild the generator a checkpoint was trained with, in eval mode."""
    from pipeline.checkpoint import payload_config
    from pipeline.models import build_generator

    model = payload_config(payload).model
    generator = build_generator(model.arch, norm=model.norm, base_filters=model.base_filters, num_downs=model.num_downs)
    generator.load_state_dict(payload["generator"])
    return generator.eval()


def min_side(generator: nn.Module) -> int:
    """The smallest input side the generator accepts (2**num_downs for the U-Net, 32 for the ResNet U-Net)."""
    if hasattr(generator, "down_blocks"):
        return 2 ** len(generator.down_blocks)
    return 32


def log_generator(
    generator: nn.Module,
    run_id: str,
    tracking_uri: str,
    registered_name: str | None = DEFAULT_MODEL_NAME,
    alias: str | None = "candidate",
    version_tags: dict[str, str] | None = None,
    image_size: int = 256,
):
    """Log the generator to a run with `mlflow.pytorch.log_model` and register it under `registered_name`.

    Signature: float32 (N, 1, H, W) L in [-1, 1] -> (N, 2, H, W) ab in [-1, 1] (times 110 for Lab units).
    Serialized as "pickle" (explicitly): loading needs this project's `pipeline` package, which is
    shipped with the model as code (`code_paths`), and trust in the registry it comes from.

    Returns:
        The registered model version (or None when `registered_name` is None).
    """
    import mlflow
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from pipeline.tracking.runs import fluent_tracking_uri

    generator = generator.cpu().eval()
    example = np.zeros((1, 1, image_size, image_size), dtype=np.float32)
    with torch.no_grad():
        output = generator(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    package = str(Path(__file__).resolve().parents[1])  # the `pipeline` package
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            generator,
            name=MODEL_ARTIFACT,
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            code_paths=[package],
            serialization_format="pickle",
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


def load_generator(uri: str, tracking_uri: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a generator from a registry/run URI, an MLflow model folder, or a training checkpoint.

    Raises:
        ValueError: the URI points at nothing loadable (the message says what was tried).
    """
    from pipeline.checkpoint import CHECKPOINT_FILE, load_checkpoint

    path = Path(uri)
    if uri.endswith(".pt") or (path.is_dir() and (path / CHECKPOINT_FILE).exists()):
        return generator_from_checkpoint(load_checkpoint(path)).to(device)
    if uri.startswith("s3://") and (uri.endswith(".pt") or "checkpoint_" in uri.rsplit("/", 1)[-1]):
        from ingest.storage import read_uri

        key = uri if uri.endswith(".pt") else f"{uri.rstrip('/')}/{CHECKPOINT_FILE}"
        return generator_from_checkpoint(load_checkpoint(read_uri(key))).to(device)
    if path.is_dir() and not (path / "MLmodel").exists():
        checkpoints = sorted(path.glob("checkpoint_*/" + CHECKPOINT_FILE))
        if checkpoints:  # a run's storage folder: its latest checkpoint
            return generator_from_checkpoint(load_checkpoint(checkpoints[-1])).to(device)
    import mlflow
    import mlflow.pytorch

    from pipeline.tracking.runs import fluent_tracking_uri, resolve_tracking_uri

    try:
        with fluent_tracking_uri(resolve_tracking_uri(tracking_uri)):
            model = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; the user needs one line
        raise ConfigError(
            f"cannot load a generator from {uri!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Use models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/generator or a checkpoint path."
        ) from None
    return model.eval()
