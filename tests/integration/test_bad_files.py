"""The zoo of odd and broken files (`tests/bad_files.py`) through `recolor ingest folder` and `recolor colorize`.

Every file is accepted correctly or refused with a named reason, and no run crashes. Ingest refuses
gray pictures (they teach a colorizer to desaturate); colorize takes them, being what it is for.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from bad_files import OK, ROTATED_BOTTOM, ROTATED_TOP, Case, write_checkpoint, write_zoo
from PIL import Image, ImageFile

from ingest.images import ImageRejected, decode_image
from ingest.lab import decode_lab8, lab_to_rgb, lightness
from ingest.lake import Lake
from pipeline.colorize.files import OUTPUT_MARKER

pytestmark = pytest.mark.slow

SIZE = 64
COLORIZE = ["--size", str(SIZE), "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bad-files") / "zoo"
    cases = write_zoo(root)
    return SimpleNamespace(root=root, cases=cases, checkpoint=write_checkpoint(root.parent / "model"))


def near(pixel, color, tolerance: int = 40) -> bool:
    return bool(np.abs(np.asarray(pixel, dtype=int) - color).max() <= tolerance)


# --- ingest ----------------------------------------------------------------------------------------


def stored_rgb(lake: Lake, dataset: str, row: dict) -> np.ndarray:
    """The sample as stored in its shard, back to 8-bit RGB (H, W, 3)."""
    data = lake.storage.read_bytes(f"{dataset}/{row['shard']}")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        lab8 = np.load(io.BytesIO(tar.extractfile(f"{row['key']}.lab.npy").read()))
    return (lab_to_rgb(decode_lab8(lab8)) * 255 + 0.5).astype(np.uint8)


def test_ingest_stores_or_names_a_reason_for_every_file(zoo, recolor, tmp_path) -> None:
    lake_dir = tmp_path / "lake"
    result = recolor("ingest", "folder", zoo.root, "--dataset", "zoo", "--lake", lake_dir, "--no-ray",
                     "--size", str(SIZE), "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(
        "listed 18, ingested 11, duplicates 0, rejected: corrupt 1, empty 1, grayscale 2, not_an_image 2, too_large 1"
    ), result.stdout

    lake = Lake(str(lake_dir))
    ref = lake.resolve("zoo")

    def by_name(table) -> dict[str, dict]:
        return {Path(row["source_uri"]).relative_to(zoo.root).as_posix(): row for row in table.to_pylist()}

    stored, rejected = by_name(lake.manifest(ref)), by_name(lake.rejects(ref))
    listed = {name for name, case in zoo.cases.items() if case.ingest is not None}
    assert set(stored) | set(rejected) == listed and not set(stored) & set(rejected)
    assert "empty-folder.jpg" not in listed  # a folder named like an image is walked, never read as one
    for name, case in zoo.cases.items():
        if case.ingest == OK:
            row = stored[name]
            assert (row["width"], row["height"]) == case.size, name
        elif case.ingest is not None:
            assert rejected[name]["reason"] == case.ingest, (name, rejected[name])
            assert rejected[name]["detail"], name
    assert "30000x30000" in rejected["bomb.png"]["detail"]
    assert "mode I;16" in rejected["gray-16bit.png"]["detail"] and "mode LA" in rejected["gray-alpha.png"]["detail"]

    upright = stored_rgb(lake, "zoo", stored["rotated-exif6.jpg"])  # stored red left, blue right; EXIF 6
    assert upright.shape == (SIZE, SIZE, 3)
    assert near(upright[: SIZE // 4].mean((0, 1)), ROTATED_TOP)
    assert near(upright[-SIZE // 4 :].mean((0, 1)), ROTATED_BOTTOM)


def test_the_bomb_is_refused_from_its_header_without_decoding(zoo, monkeypatch) -> None:
    def no_decoding(self):
        raise AssertionError("the bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    data = (zoo.root / "bomb.png").read_bytes()
    assert len(data) < 200_000  # 900 million pixels in ~110 kB
    for size in (SIZE, None):  # as ingest and as colorize decode
        with pytest.raises(ImageRejected) as caught:
            decode_image(data, size=size)
        assert caught.value.reason == "too_large", caught.value.detail


# --- colorize --------------------------------------------------------------------------------------


def skipped_lines(stderr: str) -> dict[str, str]:
    """{input: "reason: detail"} from colorize's `  skipped INPUT: REASON: DETAIL` lines."""
    found = {}
    for line in stderr.splitlines():
        if line.strip().startswith("skipped "):
            uri, _, reason = line.strip().removeprefix("skipped ").partition(": ")
            found[uri] = reason
    return found


def check_output(path: Path, source: Path, case: Case) -> None:
    """The output has the input's displayed size and its lightness (EXIF applied, alpha over white)."""
    with Image.open(path) as image:
        assert image.mode == "RGB", path
        produced = np.asarray(image)
    width, height = case.size
    assert produced.shape == (height, width, 3), (path, produced.shape)
    expected = decode_image(source.read_bytes(), size=None).rgb
    assert np.abs(lightness(produced) - lightness(expected)).max() <= 1.0, path


def test_colorize_every_zoo_entry_given_by_name(zoo, recolor, tmp_path) -> None:
    entries = sorted(zoo.root.iterdir())  # as a shell's zoo/* gives them: both folders included
    out = tmp_path / "out"
    result = recolor("colorize", *entries, "--model", zoo.checkpoint, "-o", out, *COLORIZE)
    assert result.returncode == 1, result.stderr[-3000:]  # some inputs were skipped: not a crash
    assert "Traceback" not in result.stderr

    # A folder given by name is colorized into OUT with the names below it.
    outputs = {name: name.split("/")[-1] for name in zoo.cases}
    accepted = {name: case for name, case in zoo.cases.items() if case.colorize == OK}
    refused = {str(zoo.root / name): case.colorize for name, case in zoo.cases.items() if case.colorize != OK}
    skipped = skipped_lines(result.stderr)
    assert {uri: reason.split(":")[0] for uri, reason in skipped.items()} == refused
    assert all(reason.split(": ", 1)[1] for reason in skipped.values())  # and a detail
    assert f"colorized {len(accepted)} image(s) into {out}" in result.stdout
    assert result.error_lines[-1] == f"recolor: error: {len(refused)} input(s) could not be colorized"

    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER)
    assert written == sorted(str(Path(outputs[name]).with_suffix(".png")) for name in accepted)
    assert "café photo ü.png" in written and "inside.png" in written
    for name, case in accepted.items():
        check_output(out / Path(outputs[name]).with_suffix(".png"), zoo.root / name, case)

    upright = lightness(np.asarray(Image.open(out / "rotated-exif6.png")))  # 80 wide, 120 high: red above blue
    top, bottom = lightness(np.array([[ROTATED_TOP]], np.uint8)), lightness(np.array([[ROTATED_BOTTOM]], np.uint8))
    assert np.abs(upright[10:50].mean() - top.item()) < 2 and np.abs(upright[70:110].mean() - bottom.item()) < 2


def test_colorize_the_zoo_folder(zoo, recolor, tmp_path) -> None:
    out = tmp_path / "out"
    result = recolor("colorize", zoo.root, "--model", zoo.checkpoint, "-o", out, *COLORIZE)
    assert result.returncode == 1, result.stderr[-3000:]
    # Below a given folder, a folder named like an image is walked; an empty one is no input of its own.
    refused = {
        str(zoo.root / name): case.colorize
        for name, case in zoo.cases.items()
        if case.colorize != OK and case.ingest is not None
    }
    assert {uri: reason.split(":")[0] for uri, reason in skipped_lines(result.stderr).items()} == refused
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER)
    accepted = [name for name, case in zoo.cases.items() if case.colorize == OK]
    assert written == sorted(str(Path(name).with_suffix(".png")) for name in accepted)
    assert "folder.jpg/inside.png" in written
