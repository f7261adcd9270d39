"""The serving model's signature and its parameters' defaults: one definition for what `log_generator` registers
and what `pipeline.serving.pyfunc` answers with."""

from __future__ import annotations

from ingest.images import DEFAULT_MAX_PIXELS

SERVING_DEFAULTS = {"format": "png", "quality": 95, "max_pixels": DEFAULT_MAX_PIXELS}


def serving_signature():
    """The model's signature: optional `image` (binary) and `path` (string) columns, the params above."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema(
        [ColSpec("string", "image"), ColSpec("long", "width"), ColSpec("long", "height"), ColSpec("string", "error")]
    )
    params = ParamSchema(
        [
            ParamSpec("format", "string", SERVING_DEFAULTS["format"]),
            ParamSpec("quality", "long", SERVING_DEFAULTS["quality"]),
            ParamSpec("max_pixels", "long", SERVING_DEFAULTS["max_pixels"]),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)
