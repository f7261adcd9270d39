"""Hostile and careless input to `recolor ingest` and `recolor colorize`, as real processes: what would hang
(a FIFO named like an image) or abort (a symlink loop) is refused with a reason, and the other images go on.

Each command runs under `run_cli`'s timeout: a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os

import pytest
from bad_files import write_checkpoint

from ingest.lake import Lake

pytestmark = pytest.mark.slow

SIZE = 64


@pytest.fixture
def hostile_folder(tmp_path, photo_writer):
    """Two good photos, a FIFO `stuck.jpg`, a symlink loop `loop.jpg` and a link to nowhere `gone.jpg`."""
    folder = tmp_path / "hostile"
    photo_writer(folder, [11, 12], width=80, height=64)
    os.mkfifo(folder / "stuck.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink(tmp_path / "nowhere.jpg", folder / "gone.jpg")
    return folder


@pytest.mark.parametrize("use_ray", [False, True])
def test_ingest_refuses_fifos_and_symlink_loops_with_a_reason_and_keeps_the_rest(
    hostile_folder, recolor, tmp_path, use_ray
) -> None:
    lake_dir = tmp_path / "lake"
    ray = [] if use_ray else ["--no-ray"]
    result = recolor("ingest", "folder", hostile_folder, "--dataset", "hostile", "--lake", lake_dir, *ray,
                     "--size", str(SIZE), "--no-progress", "--workers", "1", timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lake = Lake(str(lake_dir))
    ref = lake.resolve("hostile")
    assert sum(ref.record["counts"].values()) == 2
    rejects = {os.path.basename(row["source_uri"]): row for row in lake.rejects(ref).to_pylist()}
    assert (
        rejects["stuck.jpg"]["reason"] == "unreadable"
        and "is a FIFO, not a regular file" in (rejects["stuck.jpg"]["detail"])
    )
    assert rejects["loop.jpg"]["reason"] == "unreadable" and "cannot be read" in rejects["loop.jpg"]["detail"]
    assert rejects["gone.jpg"]["reason"] == "missing"


def test_colorize_refuses_a_fifo_given_by_name_or_found_in_a_folder(hostile_folder, recolor, tmp_path) -> None:
    checkpoint = write_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    common = ["--model", checkpoint, "-o", out, "--size", str(SIZE), "--no-progress", "--device", "cpu"]
    named = recolor("colorize", hostile_folder / "stuck.jpg", hostile_folder / "img0011.jpg", *common, timeout=120)
    assert named.returncode == 1, named.stderr[-3000:]
    assert any("stuck.jpg" in line and "is a FIFO, not a regular file" in line for line in named.error_lines)
    assert (out / "img0011.png").is_file()
    walked = recolor("colorize", hostile_folder, *common, timeout=120)
    assert walked.returncode == 1, walked.stderr[-3000:]
    refused = [line for line in walked.error_lines if "stuck.jpg" in line or "loop.jpg" in line]
    assert len(refused) == 2, walked.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["img0011.png", "img0012.png"], walked.stderr
