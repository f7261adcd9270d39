"""`recolor colorize --ray`: the same colorization as a Ray Data job, for archives of millions of photos.

The driver lists the inputs, guards the originals and loads the model (so a bad model or output fails
before anything starts), exactly as the single-process command does. Then three stages stream:

    read + decode (CPU tasks) -> generator (actor pool, one GPU each with --gpu, bf16) -> compose + write (CPU tasks)

Reading, refusals, the network input, the prediction and the picture are the functions of
`pipeline.colorize.pixels`, so both paths give the same pixels and refuse the same files. A picture
is written whole (a renamed temporary file, or one PUT): a rerun skips what exists.

With CPU actors Ray Data fuses the decoding into the actors (one process does both, nothing to
ship between them); with `--gpu` the resources differ and decoding stays in CPU tasks.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ingest.images import DEFAULT_MAX_PIXELS
from pipeline.colorize.files import ColorizeOptions, ColorizeSummary

WRITTEN, REFUSED = "written", "refused"


def _decode(batch: dict, size: int, multiple: int, resize: str, max_pixels: int, environment=None) -> dict:
    """Stage 1: each photo's bytes and network input (shapes differ with the aspect), or why it is refused."""
    from ingest.cluster import open_environment
    from pipeline.colorize.pixels import PhotoRefused, decode_photo, network_input, read_uri_bytes

    if environment is not None:
        open_environment(environment)  # the driver's S3 settings and credentials, on any node

    lights, datas, errors, crops = [], [], [], []
    for uri in batch["uri"]:
        light, data, error = np.zeros((1, size, size), np.float32), b"", ""
        try:
            data = read_uri_bytes(uri)
            tensor, (height, width) = network_input(decode_photo(data, max_pixels), size, multiple, resize)
            light = tensor.numpy()
            crops.append((height, width))
        except PhotoRefused as e:
            error, data = e.reason, b""
            crops.append((size, size))
        lights.append(light)
        datas.append(data)
        errors.append(error)
    return {
        "uri": batch["uri"],
        "name": batch["name"],
        "data": np.array(datas, dtype=object),
        "light": _ragged(lights),
        "crop": np.array(crops, dtype=np.int64),
        "error": np.array(errors, dtype=object),
    }


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays of different shapes (Ray Data keeps it as a variable-shaped tensor column)."""
    column = np.empty(len(arrays), dtype=object)
    for index, array in enumerate(arrays):
        column[index] = array
    return column


class _Colorizer:
    """Stage 2, an actor: the generator, held once per actor, predicts ab for the photos that decoded."""

    def __init__(self, generator_ref, gpu: bool, dropout: bool = False):
        import ray

        from pipeline.models import set_inference_mode

        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        self.generator = set_inference_mode(ray.get(generator_ref[0]).to(self.device), dropout)
        torch.manual_seed(0)

    def __call__(self, batch: dict) -> dict:
        from pipeline.colorize.pixels import predict_photos

        lights, crops = batch.pop("light"), batch.pop("crop")
        inputs = [(torch.from_numpy(np.asarray(light, dtype=np.float32)), (int(h), int(w)))
                  for light, (h, w) in zip(lights, crops, strict=True)]  # fmt: skip
        ok = [index for index, error in enumerate(batch["error"]) if not error]
        predicted = predict_photos(self.generator, [inputs[i] for i in ok], self.device)
        abs_ = [np.zeros((2, 1, 1), np.float32) for _ in inputs]
        for index, ab in zip(ok, predicted, strict=True):
            abs_[index] = ab.numpy()
        batch["ab"] = _ragged(abs_)
        return batch


def _write(batch: dict, out_dir: str, picture_format: str, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS,
           environment=None) -> dict:  # fmt: skip
    """Stage 3: the full-resolution picture of each colorized photo, written; the outcome of every input."""
    from ingest.cluster import open_environment
    from ingest.storage import StorageError
    from pipeline.colorize.files import OutputFolder
    from pipeline.colorize.pixels import PhotoRefused, compose, decode_photo, encode_picture

    if environment is not None:
        open_environment(environment)  # the driver's S3 settings and credentials, on any node
    out = OutputFolder(out_dir)
    statuses, details = [], []
    for name, data, ab, error in zip(batch["name"], batch["data"], batch["ab"], batch["error"], strict=True):
        if error:
            statuses.append(REFUSED)
            details.append(error)
            continue
        try:
            ab = torch.from_numpy(np.array(ab, dtype=np.float32))  # a copy: Ray's object store hands it read-only
            picture = encode_picture(compose(decode_photo(data, max_pixels), ab), picture_format, quality)
            out.write(name, picture)
        except PhotoRefused as e:
            statuses.append(REFUSED)
            details.append(e.reason)
        except (OSError, StorageError) as e:
            statuses.append(REFUSED)
            details.append(f"unwritable: {out.target(name)}: {e}")
        else:
            statuses.append(WRITTEN)
            details.append(out.target(name))
    return {"uri": batch["uri"], "status": np.array(statuses, dtype=object), "detail": np.array(details, dtype=object)}


def _stages(todo: list[tuple[str, str]], decode: dict, generator_ref: list, write: dict, batch_size: int, actors: int,
            gpu: bool, dropout: bool):  # fmt: skip
    """The Ray Data job: decode (tasks) -> colorize (an actor pool, one model each) -> write (tasks)."""
    import ray.data

    return (
        ray.data.from_items([{"uri": uri, "name": name} for uri, name in todo])
        .map_batches(_decode, fn_kwargs=decode, batch_size=batch_size)
        .map_batches(
            _Colorizer,
            fn_constructor_kwargs={"generator_ref": generator_ref, "gpu": gpu, "dropout": dropout},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpu else 0,
        )
        .map_batches(_write, fn_kwargs=write, batch_size=batch_size)
    )


def _collect(dataset, total: int, summary: ColorizeSummary, progress: bool) -> None:
    """Run the job, counting each picture written or failed into `summary`, under one progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="img", desc="colorize", disable=not progress) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for uri, status, detail in zip(batch["uri"], batch["status"], batch["detail"], strict=True):
                if status == WRITTEN:
                    summary.written.append(str(detail))
                else:
                    summary.failed.append((str(uri), str(detail)))
            bar.update(len(batch["uri"]))


def colorize_on_ray(
    model_uri: str,
    inputs: list[str],
    out_dir: str,
    options: ColorizeOptions = ColorizeOptions(),
    actors: int = 1,
    gpu: bool = False,
    ray_address: str | None = None,
) -> ColorizeSummary:
    """`pipeline.colorize.local.colorize` as a Ray Data job (see the module's docstring); the same summary.

    Args:
        options: as for `colorize` (`batch_size` is per actor call).
        actors: generator actors (each holds one copy of the model; one GPU each with `gpu`).
        gpu: put each actor on a GPU and run the generator in bf16.
        ray_address: a cluster to run on; None uses $RAY_ADDRESS, else a local instance.

    Raises:
        ConfigError: the model cannot be loaded, or the outputs would overwrite the inputs.
    """
    from pathlib import Path

    from ingest.cluster import ensure_ray
    from ingest.storage import is_s3
    from pipeline.colorize.local import load_model, plan_outputs
    from pipeline.models.saved import min_side

    # Tasks run in other working directories (a cluster's nodes): local paths travel absolute.
    inputs = [given if is_s3(given) else str(Path(given).absolute()) for given in inputs]
    out_dir = out_dir if is_s3(str(out_dir)) else str(Path(out_dir).absolute())
    out, todo, summary = plan_outputs(inputs, out_dir, options.picture_format, options.overwrite, options.overwrite_any)
    generator, size, resize = load_model(model_uri, options.tracking_uri, "cpu", options.trust_pickle, options.size)
    out.record([name for _, name in todo])
    if not todo:
        return summary
    import ray
    import ray.data

    from ingest.cluster import ship_environment

    with ensure_ray(ray_address):
        environment = ship_environment()  # a cluster's nodes read and write with the driver's S3 settings
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # one bar, `_collect`'s, counts pictures (and Ray need not say so)
        context.print_on_execution_start = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        generator_ref = [ray.put(generator.cpu())]  # in a list: Ray passes a bare ref to the actor resolved
        max_pixels = options.max_pixels
        decode = {"size": size, "multiple": min_side(generator), "resize": resize, "max_pixels": max_pixels,
                  "environment": environment}  # fmt: skip
        # The photo is decoded again when written: the same pixel limit as in the first stage.
        write = {"out_dir": out_dir, "picture_format": options.picture_format, "quality": options.quality,
                 "max_pixels": max_pixels, "environment": environment}  # fmt: skip
        dataset = _stages(todo, decode, generator_ref, write, options.batch_size, actors, gpu, options.dropout)
        _collect(dataset, len(todo), summary, options.progress)
    return summary
