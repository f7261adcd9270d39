"""`recolor colorize`: color photos with a generator, at their original resolution.

The network sees the photo's L at its own size (256 px by default: the whole frame, resized),
predicts ab there; ab is upsampled to the original size (bicubic; color varies slowly) and joined
with the original full-resolution L, so no detail of the input is lost. The output is a PNG whose
L channel is the input's.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ingest.errors import ConfigError
from ingest.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from ingest.lab import (
    AB_NORM,
    XYZ_FROM_RGB,
    lab8_to_network,
    lab_to_rgb_torch,
    lightness,
    linear_to_srgb_torch,
    rgb8_to_lab8,
    srgb_to_linear_torch,
)
from ingest.sources import SourceError, list_folder


@dataclass
class ColorizeSummary:
    written: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, "reason: detail")


def list_inputs(inputs: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Every image in the given files, folders (recursive) and s3:// prefixes, and the inputs that give none.

    Folders are listed as ingest's folder source lists them: image extensions, hidden files and folders
    skipped, sorted. A path that does not exist is listed as given: reading it fails, and it is reported
    like any unreadable input.

    Returns:
        ([(URI, output name)], [(input, "reason: detail")]): the output name is the path below the given
        folder with a .png extension; see `output_names` for clashes. A given folder without images fails
        with reason `no_images`; an input whose output another one already takes fails with `name_clash`.
    """
    found: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    for given in inputs:
        if given.startswith("s3://") or Path(given).is_dir():
            try:
                found += [(item.uri, item.name) for item in list_folder(given)]
            except SourceError as e:
                if not given.startswith("s3://"):
                    failed.append((given, f"no_images: {e}"))
                else:  # no image below the prefix: a single object
                    found.append((given, given.rstrip("/").rsplit("/", 1)[-1]))
        else:
            found.append((given, Path(given).name))
    items: list[tuple[str, str]] = []
    claimed: dict[str, str] = {}
    for (uri, _), target in zip(found, output_names([name for _, name in found]), strict=True):
        if target in claimed:
            failed.append((uri, f"name_clash: its output {target} is already that of {claimed[target]}"))
        else:
            claimed[target] = uri
            items.append((uri, target))
    return items, failed


OUTPUT_MARKER = ".recolor-colorized"  # in every output folder: the names written there, one a line


def guard_outputs(items: list[tuple[str, str]], inputs: list[str], out: Path) -> list[tuple[str, str]]:
    """Never write over an input, never colorize an earlier output: the inputs that may be colorized into `out`.

    Every output folder lists what `recolor colorize` wrote there (`OUTPUT_MARKER`); such files, found in a
    given folder (an earlier run into a subfolder of it), are left out silently: they are colorized pictures.

    Raises:
        ConfigError: `out` is a given folder (the originals and the colorized pictures would share names), an
            output would land on an input file, or a file named on the command line is an earlier output; one
            line naming both.
    """
    resolved_out = _real(out)
    for given in inputs:
        if not given.startswith("s3://") and Path(given).is_dir() and _real(Path(given)) == resolved_out:
            raise ConfigError(
                f"the output folder {out} is the input folder {given}: colorized pictures would replace or mix "
                "with the originals; pass another -o (a subfolder is fine)"
            )
    written = _WrittenOutputs()
    kept = []
    for uri, name in items:
        if not uri.startswith("s3://") and written.holds(Path(uri)):
            if uri in inputs:  # named on the command line: say why it is not colorized
                raise ConfigError(f"{uri} is a colorized picture (an output of recolor colorize): pass the photo")
            continue
        kept.append((uri, name))
    sources = {_real(Path(uri)): uri for uri, _ in kept if not uri.startswith("s3://")}
    for uri, name in kept:
        if _real(out / name) in sources:
            raise ConfigError(
                f"the output {out / name} of {uri} would overwrite the input {sources[_real(out / name)]}: "
                "pass another -o for the colorized pictures"
            )
    return kept


class _WrittenOutputs:
    """Which files earlier runs wrote: the names in the `OUTPUT_MARKER` of any folder above them."""

    def __init__(self):
        self._listed: dict[Path, set[str]] = {}

    def holds(self, path: Path) -> bool:
        path = _real(path)
        for folder in path.parents:
            if folder not in self._listed:
                marker = folder / OUTPUT_MARKER
                try:
                    self._listed[folder] = set(marker.read_text().splitlines()) if marker.is_file() else set()
                except (OSError, UnicodeDecodeError) as e:
                    raise ConfigError(f"{marker} (the list of an earlier run's outputs) cannot be read: {e}") from None
            if path.relative_to(folder).as_posix() in self._listed[folder]:
                return True
        return False


def _real(path: Path) -> Path:
    """The path with links followed, never raising (a symlink loop stays as it is: reading it refuses it)."""
    return Path(os.path.realpath(path))


def _record_output(out: Path, name: str) -> None:
    with open(out / OUTPUT_MARKER, "a") as marker:
        marker.write(name + "\n")


def output_names(names: list[str]) -> list[str]:
    """Output paths (POSIX, relative) for input names: `a/photo.jpg` -> `a/photo.png`.

    Where two different names would share an output (`photo.jpg` and `photo.png`), or an output would
    be the name of another's folder (`shot.jpg` beside a folder `shot.png/`), the input keeps its
    extension: `photo.jpg.png`, `photo.png.png`. The same name twice (one file name in two given
    folders) keeps one output; `list_inputs` reports the later input as a clash.
    """
    plain = [PurePosixPath(name).with_suffix(".png").as_posix() for name in names]
    sources: dict[str, set[str]] = defaultdict(set)
    for name, target in zip(names, plain, strict=True):
        sources[target].add(name)
    folders = {parent.as_posix() for target in plain for parent in PurePosixPath(target).parents}
    return [
        f"{name}.png" if len(sources[target]) > 1 or target in folders else target
        for name, target in zip(names, plain, strict=True)
    ]


def _network_input(rgb: np.ndarray, size: int) -> torch.Tensor:
    from PIL import Image

    small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
    light, _ = lab8_to_network(rgb8_to_lab8(small))
    return torch.from_numpy(light)


def lab_to_rgb_keeping_lightness(lab: torch.Tensor) -> torch.Tensor:
    """Lab (N, 3, H, W) to sRGB in [0, 1] with every pixel's L kept.

    A predicted colour outside the sRGB gamut (a strong colour on a bright sky or in a deep shadow)
    is mixed, in linear light, with the gray of its own luminance until it fits: luminance, and so L,
    stays; only chroma goes. Clipping R, G and B one by one instead would change L by several units,
    and the output's L would no longer be the photo's.
    """
    rgb = lab_to_rgb_torch(lab, clip=False)
    outside = ((rgb < 0) | (rgb > 1)).any(dim=1)  # (N, H, W)
    if not outside.any():
        return rgb.clamp(0.0, 1.0)
    pixels = rgb.permute(0, 2, 3, 1)[outside]  # (P, 3), only the pixels to fix
    linear = srgb_to_linear_torch(pixels)
    luminance = torch.as_tensor(XYZ_FROM_RGB[1], dtype=linear.dtype, device=linear.device)
    gray = (linear @ luminance).clamp(0.0, 1.0)[:, None]  # Y: a function of L alone
    # The largest share t of the colour (gray + t * (colour - gray)) that keeps every channel in [0, 1].
    infinity = torch.full_like(linear, float("inf"))
    above = torch.where(linear > 1, (1 - gray) / (linear - gray), infinity)
    below = torch.where(linear < 0, gray / (gray - linear), infinity)
    share = torch.minimum(above, below).amin(dim=1, keepdim=True).clamp(0.0, 1.0)
    mapped = (gray + share * (linear - gray)).clamp(0.0, 1.0)
    fixed = linear_to_srgb_torch(mapped)
    rgb = rgb.permute(0, 2, 3, 1).clone()
    rgb[outside] = fixed
    return rgb.permute(0, 3, 1, 2).clamp(0.0, 1.0)


@torch.no_grad()
def colorize_rgb(generator, photos: list[np.ndarray], size: int, device: torch.device) -> list[np.ndarray]:
    """Color a batch of 8-bit RGB photos of any sizes; returns 8-bit RGB arrays of the same sizes."""
    batch = torch.stack([_network_input(rgb, size) for rgb in photos]).to(device)
    predicted = generator(batch).float()
    results = []
    for rgb, ab in zip(photos, predicted, strict=True):
        height, width = rgb.shape[:2]
        ab_full = torch.nn.functional.interpolate(ab[None], size=(height, width), mode="bicubic", align_corners=False)
        light = torch.from_numpy(lightness(rgb)).to(device)[None, None]
        lab = torch.cat([light, ab_full * AB_NORM], dim=1)
        out = lab_to_rgb_keeping_lightness(lab)[0].permute(1, 2, 0).cpu().numpy()
        results.append((out * 255.0 + 0.5).clip(0, 255).astype(np.uint8))
    return results


def colorize(
    model_uri: str,
    inputs: list[str],
    out_dir: str,
    size: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    tracking_uri: str | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ColorizeSummary:
    """Colorize every image of `inputs` into `out_dir` as PNGs (names from `list_inputs`).

    An input that cannot be colorized does not stop the others: it is listed in `summary.failed` with
    a reason (`empty`, `not_an_image`, `corrupt`, `too_large`, `missing`, `unreadable`, `no_images`,
    `name_clash`, `unwritable`) and a detail. Gray photos of any kind are colorized like the others.

    Args:
        max_pixels: refuse larger images (decompression bombs) with reason `too_large`.

    Raises:
        ValueError: the model cannot be loaded.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ingest.storage import read_uri
    from pipeline.tracking.registry import load_generator, min_side

    torch_device = torch.device(device)
    out = Path(out_dir)
    items, failed = list_inputs(inputs)
    items = guard_outputs(items, inputs, out)
    generator = load_generator(model_uri, tracking_uri, torch_device)
    size = max(size, min_side(generator))
    summary = ColorizeSummary(failed=failed)
    pending: list[tuple[str, str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        colored = colorize_rgb(generator, [rgb for _, _, rgb in pending], size, torch_device)
        for (uri, name, _), rgb in zip(pending, colored, strict=True):
            target = out / name
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                _record_output(out, name)  # before the picture: an output is never taken for a photo
                Image.fromarray(rgb).save(target, format="PNG")
            except OSError as e:  # a file where a folder should be, a full disk: this output only
                summary.failed.append((uri, f"unwritable: {target}: {e}"))
                if target.is_file():
                    target.unlink()  # no half-written picture left behind
                continue
            summary.written.append(str(target))
        pending.clear()

    with tqdm(total=len(items), unit="img", desc="colorize", disable=not progress) as bar:
        for uri, name in items:
            try:
                pending.append((uri, name, decode_image(read_uri(uri), size=None, max_pixels=max_pixels).rgb))
            except ImageRejected as e:
                summary.failed.append((uri, f"{e.reason}: {e.detail}"))
            except FileNotFoundError:
                summary.failed.append((uri, "missing: no such file or object"))
            except (OSError, RuntimeError) as e:
                summary.failed.append((uri, f"unreadable: {e}"))
            if len(pending) == batch_size:
                flush()
            bar.update(1)
        flush()
    return summary
