"""The registered generator as an MLflow pyfunc model: what `mlflow models serve` answers with.

MLflow imports this module (the model's `loader_module`) and calls `_load_pyfunc(DATA)` with the
model's data folder, a saved generator (`pipeline.models.saved`); no code comes from the registry.

    mlflow models serve -m models:/colorizer@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d "{\\"dataframe_records\\": [{\\"image\\": \\"$(base64 -w0 photo.jpg)\\"}]}"

Input: a table with a column `image` (the file's bytes; base64 in JSON) or `path` (a file or s3://
object below $RECOLOR_SERVE_PATH_ROOT, read with the server's access; refused when that is unset), a row
an image. Params: `format` (png or jpeg),
`quality` (jpeg), `max_pixels`. Output: a row per input with `image` (the colorized picture, base64,
at the input's full resolution with its L channel), `width`, `height`, and `error` (why a row could
not be colorized, else ""; such a row has an empty image and sizes 0). A request whose every row
fails is answered 400 with the reasons.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
import torch

from ingest.images import DEFAULT_MAX_PIXELS
from pipeline.colorize.pixels import PICTURE_FORMATS, PhotoRefused, colorize_rgb, decode_photo, encode_picture
from pipeline.serving.signature import SERVING_DEFAULTS

BATCH = 8  # photos through the network at once


def _load_pyfunc(data_path: str) -> ColorizerModel:
    return ColorizerModel(data_path)


class ColorizerModel:
    """A saved generator answering tables of images; see the module's docstring for the columns."""

    def __init__(self, folder: str, device: str | None = None):
        from pipeline.models.saved import load_saved_generator, min_side

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.generator, self.spec = load_saved_generator(folder, self.device)
        self.size = max(self.spec.image_size, min_side(self.generator))

    def predict(self, data, params: dict | None = None):
        import pandas as pd

        params = {**SERVING_DEFAULTS, **(params or {})}
        picture_format = str(params["format"]).lower()
        if picture_format not in PICTURE_FORMATS:
            _refuse(f"param 'format' must be one of {PICTURE_FORMATS}, got {params['format']!r}")
        if not isinstance(data, pd.DataFrame):
            data = pd.DataFrame(data)
        if not ({"image", "path"} & set(data.columns)):
            _refuse(f"the input needs a column 'image' (bytes or base64) or 'path'; got {list(data.columns)}")
        rows: list[dict] = []
        photos: list[tuple[int, np.ndarray]] = []
        # A request may lower the decompression-bomb limit, never raise it above the server's.
        max_pixels = min(int(params["max_pixels"]), DEFAULT_MAX_PIXELS)
        records = data.to_dict("records")

        def flush() -> None:
            colored = colorize_rgb(self.generator, [rgb for _, rgb in photos], self.size, self.device, self.spec.resize)
            for (index, _), rgb in zip(photos, colored, strict=True):
                picture = encode_picture(rgb, picture_format, int(params["quality"]))
                rows[index].update(
                    image=base64.b64encode(picture).decode("ascii"), width=rgb.shape[1], height=rgb.shape[0]
                )
            photos.clear()

        for index, record in enumerate(records):  # decoded a batch at a time: a long request holds one batch
            rows.append({"image": "", "width": 0, "height": 0, "error": ""})
            try:
                photos.append((index, self._photo(record, max_pixels)))
            except PhotoRefused as e:
                rows[index]["error"] = f"row {index}: {e.reason}"
            if len(photos) == BATCH:
                flush()
        if photos:
            flush()
        if rows and all(row["error"] for row in rows):  # every row either has its picture or its error
            _refuse("no image could be colorized: " + "; ".join(row["error"] for row in rows))
        return pd.DataFrame(rows, columns=["image", "width", "height", "error"])

    @staticmethod
    def _photo(record: dict, max_pixels: int) -> np.ndarray:
        image, path = record.get("image"), record.get("path")
        if isinstance(image, (bytes, bytearray, memoryview)) and len(image):
            return decode_photo(bytes(image), max_pixels)
        if isinstance(image, str) and image:
            try:
                return decode_photo(base64.b64decode(image, validate=True), max_pixels)
            except (binascii.Error, ValueError):
                raise PhotoRefused("not_base64: the 'image' string is not base64") from None
        if isinstance(path, str) and path:
            from pipeline.colorize.pixels import read_photo

            return read_photo(_allowed_path(path), max_pixels)
        raise PhotoRefused("empty: neither 'image' nor 'path' is given")


PATH_ROOT_ENV = "RECOLOR_SERVE_PATH_ROOT"


def _allowed_path(path: str) -> str:
    """A `path` row is read only below $RECOLOR_SERVE_PATH_ROOT (a folder or an s3:// prefix); without it, never:
    an endpoint must not read whatever its own credentials reach for anyone who can post to it."""
    import os
    from pathlib import Path

    root = os.environ.get(PATH_ROOT_ENV, "").strip()
    if not root:
        raise PhotoRefused(f"path_refused: reading paths is off on this server (set {PATH_ROOT_ENV} to allow a root)")
    if root.startswith("s3://") or path.startswith("s3://"):
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix) and "/../" not in path and not path.endswith("/.."):
            return path
    else:
        resolved = Path(os.path.realpath(path))
        if resolved.is_relative_to(Path(os.path.realpath(root))):
            return str(resolved)
    raise PhotoRefused(f"path_refused: {path} is not below the served root")


def _refuse(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
