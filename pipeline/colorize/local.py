"""`recolor colorize` in one process: read, colorize in batches, write; the Ray Data job is `cluster.py`."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ingest.errors import ConfigError
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
    that recolor did not write is refused as `not_ours` (with or without `overwrite`), unless `overwrite_any`."""
    items, failed = list_inputs(inputs, SUFFIXES[picture_format])
    listed = [uri for uri, _ in items]
    items = guard_outputs(items, inputs, out_dir)
    out = OutputFolder(out_dir)
    summary = ColorizeSummary(failed=failed, listed=listed)
    todo = []
    for uri, name in items:
        if not out.holds(name):
            todo.append((uri, name))
        elif not overwrite and out.wrote(name):
            summary.skipped.append(out.target(name))
        elif not overwrite:  # a file recolor did not write blocks this output: it is not done
            summary.failed.append((uri, f"not_ours: {out.target(name)} exists and recolor did not write it; "
                                        "--overwrite-any replaces it"))  # fmt: skip
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
    comparison = plan_side_by_side(options, inputs, out, todo, summary) if options.side_by_side else None
    generator, size, resize = load_model(model_uri, options.tracking_uri, torch_device, options.trust_pickle,
                                         options.size)  # fmt: skip
    set_inference_mode(generator, options.dropout)
    torch.manual_seed(0)
    if comparison is not None:
        try:
            comparison[0].record([comparison[1]])
        except ConfigError as e:
            raise ConfigError(f"--side-by-side {options.side_by_side}: {e}") from None
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
                if comparison is not None and len(compared) < SIDE_BY_SIDE_ROWS:
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
    if comparison is not None and compared:
        write_side_by_side(*comparison, compared, summary)
    return summary


def plan_side_by_side(options: ColorizeOptions, inputs: list[str], out: OutputFolder, todo: list[tuple[str, str]],
                      summary: ColorizeSummary) -> tuple[OutputFolder, str] | None:  # fmt: skip
    """Where the comparison picture goes, under the rules of every output: (its folder, its name), or None when it
    is not to be written (an earlier run's, kept without `overwrite`; a file recolor did not write, refused as
    `summary.side_by_side_error` unless `overwrite_any`).

    Raises:
        ConfigError: the picture would replace an input, or one of this run's colorized pictures.
    """
    from ingest.storage import is_s3

    target = options.side_by_side
    folder_uri, _, name = target.rstrip("/").rpartition("/")
    if not name or name in (".", ".."):
        raise ConfigError(f"--side-by-side {target}: name a file to write the comparison picture to")
    folder = OutputFolder(folder_uri or ".")
    given = set(summary.listed) | set(inputs)  # every image the inputs name (plan_outputs' one listing)
    if folder.target(name) in given or (not is_s3(target) and os.path.realpath(target) in {
            os.path.realpath(uri) for uri in given if not is_s3(uri)}):  # fmt: skip
        raise ConfigError(f"--side-by-side {target} is an input: the comparison picture never replaces a photo; "
                          "name another file")  # fmt: skip
    if folder.target(name) in {out.target(output) for _, output in todo}:
        raise ConfigError(f"--side-by-side {target} is one of this run's colorized pictures: name another file")
    if not folder.holds(name):
        return folder, name
    if folder.wrote(name) and not options.overwrite:
        summary.skipped.append(folder.target(name))
        return None
    if folder.wrote(name) or options.overwrite_any:
        return folder, name
    summary.side_by_side_error = (f"not_ours: --side-by-side {folder.target(name)} exists and recolor did not write "
                                  "it; --overwrite-any replaces it")  # fmt: skip
    return None


def thumbnail(rgb: np.ndarray, height: int = 256) -> np.ndarray:
    """`rgb` at most `height` pixels high, its aspect kept."""
    from PIL import Image

    if rgb.shape[0] <= height:
        return rgb
    width = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))


def write_side_by_side(folder: OutputFolder, name: str, compared: list[tuple[str, np.ndarray, np.ndarray]],
                       summary: ColorizeSummary) -> None:  # fmt: skip
    """The comparison picture (`side_by_side`) written whole (a temporary file renamed, or one PUT) into `folder`;
    a failure is `summary.side_by_side_error` (`unwritable`), after the pictures themselves were written."""
    try:
        folder.write(name, side_by_side(compared))
    except (OSError, StorageError) as e:
        summary.side_by_side_error = (
            f"unwritable: --side-by-side {folder.target(name)}: {getattr(e, 'strerror', None) or e}"
        )
    else:
        summary.side_by_side = folder.target(name)
