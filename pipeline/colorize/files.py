"""What `recolor colorize` reads and where it writes: inputs, output names, and the guard on the originals.

Shared by the single-process command (`pipeline.colorize.local`) and the Ray Data job
(`pipeline.colorize.cluster`), so both list, name, skip and refuse alike.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ingest.errors import ConfigError
from ingest.images import DEFAULT_MAX_PIXELS
from ingest.sources import SourceError, list_folder
from ingest.storage import is_s3

SIDE_BY_SIDE_ROWS = 16
# What the command line offers, here because this module imports no torch: `recolor --help`, `recolor lake ls`
# and every other command build the whole parser, and should not wait a second for torch.
PICTURE_FORMATS = ("png", "jpeg")
SUFFIXES = {"png": ".png", "jpeg": ".jpg"}
CHUNK_FRAMES = 240  # films on Ray: frames a chunk holds at least; 10 s at 24 fps: seconds on a GPU, minutes on a CPU
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".m4v", ".avi", ".webm"})
CODECS = {"h264": "libx264", "h265": "libx265", "vp9": "libvpx-vp9", "ffv1": "ffv1"}  # --codec: FFmpeg encoder
DEFAULT_CRF = 18  # x264's "visually lossless"


@dataclass(frozen=True)
class ColorizeOptions:
    """How `recolor colorize` reads, colorizes and writes: shared by the single-process and the Ray Data path.

    Attributes:
        size: the network's input side; None: the side the model trained at.
        batch_size: photos a generator call (per actor on Ray).
        tracking_uri: where `models:/` and `runs:/` model URIs resolve; None: the configured default.
        progress: show a progress bar in pictures.
        max_pixels: refuse larger images (decompression bombs) with reason `too_large`.
        picture_format: "png" (lossless) or "jpeg" (at `quality`).
        overwrite: redo pictures an earlier run wrote whole (else they are skipped).
        overwrite_any: with `overwrite`, also replace same-named files recolor did not write.
        trust_pickle: allow a model of the old pickled format (see `pipeline.tracking.registry.load_generator`).
        dropout: keep the generator's dropout on, as pix2pix tests (seeded: the same inputs give the same colours).
        side_by_side: also write this PNG: each photo's gray input, colorized picture and the photo, a row each
            (the single-process path; at most `SIDE_BY_SIDE_ROWS` photos).
    """

    size: int | None = None
    batch_size: int = 8
    tracking_uri: str | None = None
    progress: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    picture_format: str = "png"
    quality: int = 95
    overwrite: bool = False
    overwrite_any: bool = False
    trust_pickle: bool = False
    dropout: bool = False
    side_by_side: str | None = None


@dataclass
class ColorizeSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # outputs an earlier run wrote whole: not done again
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, "reason: detail")
    listed: list[str] = field(default_factory=list)  # every input image found, before the guard left any out
    side_by_side: str | None = None  # the comparison picture written
    side_by_side_error: str | None = None  # why it was not ("not_ours: ...", "unwritable: ...")


def list_inputs(inputs: list[str], suffix: str = ".png") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Every image in the given files, folders (recursive) and s3:// prefixes, and the inputs that give none.

    Folders are listed as ingest's folder source lists them: image extensions, hidden files and folders
    skipped, sorted. A path that does not exist is listed as given: reading it fails, and it is reported
    like any unreadable input.

    Returns:
        ([(URI, output name)], [(input, "reason: detail")]): the output name is the path below the given
        folder with the `suffix` extension; see `output_names` for clashes. A given folder without images fails
        with reason `no_images`; an input whose output another one already takes fails with `name_clash`.
    """
    found: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    for given in inputs:
        if is_s3(given) or Path(given).is_dir():
            try:
                found += [(item.uri, item.name) for item in list_folder(given)]
            except SourceError as e:
                if not is_s3(given):
                    failed.append((given, f"no_images: {e}"))
                else:  # no image below the prefix: a single object
                    found.append((given, given.rstrip("/").rsplit("/", 1)[-1]))
        else:
            found.append((given, Path(given).name))
    found, refused = _safe_names(found)
    failed += refused
    items: list[tuple[str, str]] = []
    claimed: dict[str, str] = {}
    for (uri, _), target in zip(found, output_names([name for _, name in found], suffix), strict=True):
        if target in claimed:
            failed.append((uri, f"name_clash: its output {target} is already that of {claimed[target]}"))
        else:
            claimed[target] = uri
            items.append((uri, target))
    return items, failed


OUTPUT_MARKER = ".recolor-colorized"  # in every output folder: the names written there, one a line


def _safe_names(found: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Names become output paths: one that is absolute or climbs (`/home/u/x.jpg`, `a/../../x.jpg`, from an odd
    S3 key) would write outside the output folder; it is refused as `bad_name`."""
    kept, refused = [], []
    for uri, name in found:
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or ".." in parts:
            refused.append((uri, f"bad_name: {name!r} would not stay inside the output folder"))
        else:
            kept.append((uri, name))
    return kept, refused


def guard_outputs(items: list[tuple[str, str]], inputs: list[str], out: str | Path) -> list[tuple[str, str]]:
    """Never write over an input, never colorize an earlier output: the inputs that may be colorized into `out`.

    Every local output folder lists what `recolor colorize` wrote there (`OUTPUT_MARKER`); such files, found
    in a given folder (an earlier run into a subfolder of it), are left out silently: they are colorized
    pictures. An s3:// output may not lie in an s3:// input prefix (its pictures would be listed as photos).

    Raises:
        ConfigError: `out` is a given folder (the originals and the colorized pictures would share names), an
            output would land on an input file, or a file named on the command line is an earlier output; one
            line naming both.
    """
    if is_s3(str(out)):
        _guard_s3_output(items, inputs, str(out))
        return items
    out = Path(out)
    resolved_out = _real(out)
    for given in inputs:
        if not is_s3(given) and Path(given).is_dir() and _real(Path(given)) == resolved_out:
            raise ConfigError(
                f"the output folder {out} is the input folder {given}: colorized pictures would replace or mix "
                "with the originals; pass another -o (a subfolder is fine)"
            )
    written = _WrittenOutputs()
    kept = []
    for uri, name in items:
        if not is_s3(uri) and written.holds(Path(uri)):
            if uri in inputs:  # named on the command line: say why it is not colorized
                raise ConfigError(f"{uri} is a colorized picture (an output of recolor colorize): pass the photo")
            continue
        kept.append((uri, name))
    sources = {_real(Path(uri)): uri for uri, _ in kept if not is_s3(uri)}
    for uri, name in kept:
        if _real(out / name) in sources:
            raise ConfigError(
                f"the output {out / name} of {uri} would overwrite the input {sources[_real(out / name)]}: "
                "pass another -o for the colorized pictures"
            )
    return kept


def _guard_s3_output(items: list[tuple[str, str]], inputs: list[str], out: str) -> None:
    prefix = out.rstrip("/") + "/"
    for given in inputs:
        if is_s3(given) and prefix.startswith(given.rstrip("/") + "/"):
            raise ConfigError(
                f"the output prefix {out} lies in the input prefix {given}: its pictures would be colorized again "
                "on the next run; pass an -o outside it"
            )
    given_objects = {uri for uri, _ in items if is_s3(uri)}
    for uri, name in items:
        if prefix + name in given_objects:
            raise ConfigError(f"the output {prefix + name} of {uri} would overwrite an input: pass another -o")


class OutputFolder:
    """Where the pictures go: a local folder or an s3:// prefix. A picture appears whole or not at all (a
    temporary file renamed into place, or one PUT), so a picture that exists is complete and a rerun skips it."""

    def __init__(self, uri: str | Path):
        from ingest.storage import open_storage

        self.uri = str(uri)
        self.storage = open_storage(self.uri)

    def target(self, name: str) -> str:
        return self.storage.uri(name)

    def holds(self, name: str) -> bool:
        return self.storage.exists(name)

    def wrote(self, name: str) -> bool:
        """Whether an earlier run of recolor colorize wrote `name` here (listed in the folder's `OUTPUT_MARKER`);
        always True for s3:// outputs, which keep no list."""
        if is_s3(self.uri):
            return True
        if not hasattr(self, "_written"):
            marker = Path(self.uri) / OUTPUT_MARKER
            try:
                self._written = set(marker.read_text().splitlines()) if marker.is_file() else set()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{marker} (the list of an earlier run's outputs) cannot be read: {e}") from None
        return name in self._written

    def record(self, names: list[str]) -> None:
        """List `names` in the folder's `OUTPUT_MARKER` before any is written: an output is never taken for a
        photo, even if the run stops halfway (s3:// outputs are kept apart by `guard_outputs` instead).

        Raises:
            ConfigError: the folder cannot be created or written (one line naming it).
            StorageError: an s3:// output whose bucket is missing or refuses these credentials.
        """
        if is_s3(self.uri):
            self.storage.check_access()  # a missing bucket or bad keys: one line now, not one per picture
            return
        if not names:
            return
        try:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
            with open(Path(self.uri) / OUTPUT_MARKER, "a") as marker:
                marker.write("".join(name + "\n" for name in names))
        except OSError as e:
            raise ConfigError(f"the output folder {self.uri} cannot be written: {e.strerror or e}") from None

    def write(self, name: str, data: bytes) -> None:
        """Raises: OSError or StorageError when this picture cannot be written."""
        self.storage.write_bytes(name, data)


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


def output_names(names: list[str], suffix: str = ".png") -> list[str]:
    """Output paths (POSIX, relative) for input names: `a/photo.jpg` -> `a/photo.png` (the `suffix`).

    Where two different names would share an output (`photo.jpg` and `photo.png`), or an output would
    be the name of another's folder (`shot.jpg` beside a folder `shot.png/`), the input keeps its
    extension: `photo.jpg.png`, `photo.png.png`. The same name twice (one file name in two given
    folders) keeps one output; `list_inputs` reports the later input as a clash.
    """
    plain = [PurePosixPath(name).with_suffix(suffix).as_posix() for name in names]
    sources: dict[str, set[str]] = defaultdict(set)
    for name, target in zip(names, plain, strict=True):
        sources[target].add(name)
    folders = {parent.as_posix() for target in plain for parent in PurePosixPath(target).parents}
    return [
        f"{name}{suffix}" if len(sources[target]) > 1 or target in folders else target
        for name, target in zip(names, plain, strict=True)
    ]
