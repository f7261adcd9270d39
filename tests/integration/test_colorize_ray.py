"""`recolor colorize --ray`: the Ray Data job gives the single-process command's pixels and refusals, resumes,
writes JPEG on request and writes to s3://. Each command is a real CLI process that joins the session's Ray
(`--ray-address`, as on a cluster: the S3 credentials travel from the command to the job's tasks); one starts a
local instance of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bad_files import hue_picture, write_checkpoint
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six photos of different sizes (one in a subfolder), a gray one, and two files that are no photos."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    for seed, (width, height) in enumerate([(120, 80), (33, 71), (64, 64), (200, 150), (97, 61)]):
        hue_picture(seed, width, height).save(folder / f"photo{seed}.jpg", quality=92)
    hue_picture(9, 50, 40).convert("L").save(folder / "sub" / "gray.png")
    (folder / "broken.jpg").write_bytes(b"not a JPEG at all\n" * 10)
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def both(photos, checkpoint, cli_runner, tmp_path_factory, ray_address):
    """The same folder colorized by the single-process command and by the Ray Data job (two actors)."""
    root = tmp_path_factory.mktemp("outputs")
    common = ["--model", checkpoint, "--no-progress", "--batch-size", "3"]
    local = cli_runner("colorize", photos, "-o", root / "local", *common, cwd=root)
    ray = cli_runner("colorize", photos, "-o", root / "ray", "--ray", "--actors", "2", *common, "--ray-address",
                     ray_address, cwd=root, timeout=300)  # fmt: skip
    return root, local, ray


def skipped_lines(result) -> list[str]:
    return sorted(line.strip() for line in result.error_lines if line.strip().startswith("skipped"))


def test_the_ray_job_gives_the_single_process_pixels_and_refusals(both) -> None:
    root, local, ray = both
    assert local.returncode == 1 and ray.returncode == 1, ray.stderr[-3000:]
    assert "colorized 6 image(s)" in local.stdout and "colorized 6 image(s)" in ray.stdout, ray.stdout
    assert skipped_lines(ray) == skipped_lines(local)
    assert len(skipped_lines(ray)) == 2 and any("broken.jpg: not_an_image" in line for line in skipped_lines(ray))
    names = sorted(p.relative_to(root / "local").as_posix() for p in (root / "local").rglob("*.png"))
    assert names == sorted(p.relative_to(root / "ray").as_posix() for p in (root / "ray").rglob("*.png"))
    assert len(names) == 6 and "sub/gray.png" in names
    for name in names:
        single = np.asarray(Image.open(root / "local" / name)).astype(int)
        distributed = np.asarray(Image.open(root / "ray" / name)).astype(int)
        assert single.shape == distributed.shape and np.abs(single - distributed).max() <= 1, name


def test_a_rerun_of_the_ray_job_skips_the_pictures_it_wrote(both, photos, checkpoint, cli_runner) -> None:
    """This rerun starts a local Ray of its own: the command's default."""
    root, _, _ = both
    before = {p: p.stat().st_mtime_ns for p in (root / "ray").rglob("*.png")}
    again = cli_runner("colorize", photos, "-o", root / "ray", "--ray", "--model", checkpoint, "--no-progress",
                       cwd=root, timeout=300)  # fmt: skip
    assert again.returncode == 1 and "colorized 0 image(s)" in again.stdout and "6 already there" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (root / "ray").rglob("*.png")} == before
    assert len(skipped_lines(again)) == 2  # the bad files are refused again, with their reasons


def test_the_ray_job_writes_jpeg_to_s3(photos, checkpoint, cli_runner, s3_env, tmp_path, ray_address) -> None:
    from ingest.storage import open_storage

    out = f"s3://{s3_env.bucket}/colorized"
    result = cli_runner("colorize", photos / "photo0.jpg", photos / "sub", "-o", out, "--ray", "--model", checkpoint,
                        "--format", "jpeg", "--quality", "90", "--no-progress", "--ray-address", ray_address,
                        cwd=tmp_path, env=s3_env.env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stored = {info.key: info.size for info in open_storage(out).list()}
    assert set(stored) == {"photo0.jpg", "gray.jpg"}, stored
    import io

    with Image.open(io.BytesIO(open_storage(out).read_bytes("photo0.jpg"))) as picture:
        assert picture.format == "JPEG" and picture.size == (120, 80)


@pytest.mark.parametrize("use_ray", [False, True])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(photos, checkpoint, cli_runner, tmp_path,
                                                                      use_ray) -> None:  # fmt: skip
    (tmp_path / "a-file").write_text("not a folder")
    ray = ["--ray"] if use_ray else []
    result = cli_runner("colorize", photos / "photo0.jpg", "-o", tmp_path / "a-file" / "out", "--model", checkpoint,
                        *ray, "--no-progress", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and len(result.error_lines) == 1, result.stderr[-2000:]
    assert "a-file/out cannot be written" in result.stderr


def test_an_s3_output_in_a_missing_bucket_is_one_line(photos, checkpoint, cli_runner, s3_env, tmp_path) -> None:
    result = cli_runner("colorize", photos / "photo0.jpg", "-o", "s3://no-such-bucket-here/out", "--model", checkpoint,
                        "--no-progress", cwd=tmp_path, env=s3_env.env)  # fmt: skip
    assert result.returncode == 2 and len(result.error_lines) == 1, result.stderr[-2000:]
    assert "no-such-bucket-here" in result.stderr
