"""`recolor colorize` in one process: read, colorize in batches, write; the Ray Data job is `cluster.py`."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ingest.storage import StorageError
from pipeline.colorize.files import (
    SIDE_BY_SIDE_ROWS,
    ColorizeOptions,
    ColorizeSummary,
    OutputFolder,
    guard_outputs,
    list_inputs,
)
from pipeline.colorize.pixels import SUFFIXES, PhotoRefused, colorize_rgb, encode_picture, read_photo, side_by_side


def plan_outputs(
    inputs: list[str], out_dir: str, picture_format: str, overwrite: bool, overwrite_any: bool = False
) -> tuple[OutputFolder, list[tuple[str, str]], ColorizeSummary]:
    """List the inputs, guard the originals and leave out pictures an earlier run wrote whole (unless `overwrite`);
    returns (output folder, [(input URI, output name)] to do, summary so far). Record the names to do
    (`OutputFolder.record`) before writing any.

    `overwrite` replaces only pictures an earlier run wrote (listed in the folder's ledger); a file of the same name
    that recolor did not write is refused as `not_ours`, unless `overwrite_any`."""
    items, failed = list_inputs(inputs, SUFFIXES[picture_format])
    items = guard_outputs(items, inputs, out_dir)
    out = OutputFolder(out_dir)
    summary = ColorizeSummary(failed=failed)
    todo = []
    for uri, name in items:
        if not out.holds(name):
            todo.append((uri, name))
        elif not overwrite:
            summary.skipped.append(out.target(name))
        elif overwrite_any or out.wrote(name):
            todo.append((uri, name))
        else:
            summary.failed.append((uri, f"not_ours: {out.target(name)} exists and recolor did not write it; "
                                        "--overwrite-any replaces it"))  # fmt: skip
    return out, todo, summary


def load_model(model_uri: str, tracking_uri: str | None, device, trust_pickle: bool, size: int | None):
    """The generator (on `device`), the network side (`size`, else the training side; at least the network's
    minimum) and how its training samples were cut: what both colorize paths need of the model."""
    from pipeline.models.saved import min_side
    from pipeline.tracking.registry import load_generator_for_inference

    generator, trained_side, resize = load_generator_for_inference(model_uri, tracking_uri, device, trust_pickle)
    return generator, max(size or trained_side, min_side(generator)), resize


WRITERS = min(8, os.cpu_count() or 1)  # threads encoding and writing pictures


def write_picture(out: OutputFolder, uri: str, name: str, rgb: np.ndarray, picture_format: str,
                  quality: int) -> tuple[str, str | None]:  # fmt: skip
    """Encode and write one picture: (output, None), or (input URI, reason) for a failure, this input's only
    (`unwritable`)."""
    try:
        out.write(name, encode_picture(rgb, picture_format, quality))
    except (OSError, StorageError) as e:  # a file where a folder should be, a full disk, a refused PUT
        return uri, f"unwritable: {out.target(name)}: {e}"
    return out.target(name), None


def colorize(
    model_uri: str, inputs: list[str], out_dir: str, options: ColorizeOptions = ColorizeOptions(), device: str = "cpu"
) -> ColorizeSummary:
    """Colorize every image of `inputs` into `out_dir` (a folder or an s3:// prefix; names from `list_inputs`).

    An input that cannot be colorized does not stop the others: it is listed in `summary.failed` with
    a reason (`empty`, `not_an_image`, `corrupt`, `too_large`, `missing`, `unreadable`, `no_images`,
    `name_clash`, `unwritable`) and a detail. Gray photos of any kind are colorized like the others.
    A picture already in `out_dir` is an earlier run's, whole (pictures are written atomically): it is
    listed in `summary.skipped` and not done again unless `options.overwrite`.

    Raises:
        ConfigError: the model cannot be loaded, or the outputs would overwrite the inputs.
    """
    from tqdm.auto import tqdm

    from pipeline.models import set_inference_mode

    torch_device = torch.device(device)
    out, todo, summary = plan_outputs(inputs, out_dir, options.picture_format, options.overwrite, options.overwrite_any)
    generator, size, resize = load_model(model_uri, options.tracking_uri, torch_device, options.trust_pickle,
                                         options.size)  # fmt: skip
    set_inference_mode(generator, options.dropout)
    torch.manual_seed(0)
    out.record([name for _, name in todo])
    pending: list[tuple[str, str, np.ndarray]] = []
    compared: list[tuple[str, np.ndarray, np.ndarray]] = []  # (name, photo, colorized) for `side_by_side`
    # Encoding is most of a picture's time once the network is on a GPU (PNG: 16 ms a photo on one core): threads
    # encode and write while the main thread decodes and colorizes the next batch; results are taken in order.
    writers = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="recolor-write")
    writing: deque[Future] = deque()

    def flush() -> None:
        if pending:
            colored = colorize_rgb(generator, [rgb for _, _, rgb in pending], size, torch_device, resize)
            for (uri, name, photo), rgb in zip(pending, colored, strict=True):
                writing.append(writers.submit(write_picture, out, uri, name, rgb, options.picture_format,
                                              options.quality))  # fmt: skip
                if options.side_by_side and len(compared) < SIDE_BY_SIDE_ROWS:
                    compared.append((name, thumbnail(photo), thumbnail(rgb)))  # not 16 full-size photos
        pending.clear()
        while len(writing) > WRITERS * 4:  # a bounded queue: memory stays a few batches of pictures
            record(writing.popleft().result())

    def record(outcome: tuple[str, str | None]) -> None:
        written, failure = outcome
        if failure is None:
            summary.written.append(written)
        else:
            summary.failed.append((written, failure))

    try:
        with tqdm(total=len(todo), unit="img", desc="colorize", disable=not options.progress) as bar:
            for uri, name in todo:
                try:
                    pending.append((uri, name, read_photo(uri, options.max_pixels)))
                except PhotoRefused as e:
                    summary.failed.append((uri, e.reason))
                if len(pending) == options.batch_size:
                    flush()
                bar.update(1)
            flush()
            while writing:
                record(writing.popleft().result())
    finally:
        writers.shutdown(wait=True, cancel_futures=True)
    if options.side_by_side and compared:
        write_side_by_side(options.side_by_side, compared, summary)
    return summary


def thumbnail(rgb: np.ndarray, height: int = 256) -> np.ndarray:
    """`rgb` at most `height` pixels high, its aspect kept."""
    from PIL import Image

    if rgb.shape[0] <= height:
        return rgb
    width = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))


def write_side_by_side(target: str, compared: list[tuple[str, np.ndarray, np.ndarray]],
                       summary: ColorizeSummary) -> None:  # fmt: skip
    """The comparison picture (`side_by_side`) written whole to a path or s3:// URI; a failure is listed in
    `summary.failed` (`unwritable`), after the pictures themselves were written."""
    from ingest.storage import open_storage

    folder, _, name = target.rstrip("/").rpartition("/")
    try:
        open_storage(folder or ".").write_bytes(name, side_by_side(compared))
    except (OSError, StorageError) as e:
        summary.failed.append((target, f"unwritable: --side-by-side {target}: {e}"))
