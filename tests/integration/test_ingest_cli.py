"""The `recolor` CLI as a user runs it: real processes on a Ray cluster, SIGKILL and rerun.

Each ingest here is a `python -m pipeline.cli` subprocess in its own process group (killed in the
fixture's `finally`, so no process it started outlives a test). Those that use Ray join the session's
(`RAY_ADDRESS`, as on a cluster) instead of starting their own, which costs about 6 s each; a killed
driver leaves the cluster as it was (`test_ingest_ray.py` starts one of its own).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ingest.lake import Lake

pytestmark = pytest.mark.slow

SMALL = ["--size", "64", "--no-progress"]
# 64 px samples take ~13.8 kB: 40 KiB shards hold two training samples, so a chunk is two images.
SMALL_SHARDS = [*SMALL, "--shard-size", "40k"]
# The kill drills count writes: their items go into chunks in name order, so the N-th write is the same object on
# every run (the shuffled order hashes each item's URI, which holds pytest's numbered temporary folder).
KILL_SHARDS = [*SMALL_SHARDS, "--order", "sorted"]


def manifest_by_key(lake_dir: Path, dataset: str) -> dict[str, dict]:
    lake = Lake(str(lake_dir))
    rows = lake.manifest(lake.resolve(dataset)).to_pylist()
    return {row["key"]: row for row in rows}


def shard_files(lake_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(lake_dir)): p.read_bytes() for p in sorted(lake_dir.rglob("shards/*.tar"))}


# --- the happy path ----------------------------------------------------------------------------


def test_ingest_imagenet_then_lake_ls_and_show(imagenet_tree, make_photo, tmp_path, recolor, lake_check,
                                               ray_address) -> None:  # fmt: skip
    root = imagenet_tree.root
    (root / "train" / "n01440764" / "n01440764_99.JPEG").write_bytes(make_photo(50, gray=True))
    (root / "train" / "n02085620" / "n02085620_98.JPEG").write_text("<html>oops</html>")
    lake_dir = tmp_path / "lake"
    result = recolor(
        "ingest", "imagenet", root, "--source-split", "train,val", "--dataset", "imagenet-mini", "--lake", lake_dir,
        *SMALL_SHARDS, env={"RAY_ADDRESS": ray_address},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("listed 20, ingested 18, duplicates 0, rejected: grayscale 1, not_an_image 1  (")
    assert lines[-1].startswith("committed imagenet-mini@1 (train ")

    listing = recolor("lake", "ls", "--json", env={"RECOLOR_LAKE": str(lake_dir)})  # the lake from the environment
    assert listing.returncode == 0, listing.stderr
    ls = json.loads(listing.stdout)
    assert ls["lake"] == str(lake_dir)
    [entry] = ls["datasets"]
    assert entry["dataset"] == "imagenet-mini" and entry["latest"] == 1 and entry["versions"] == 1
    assert sum(entry["counts"].values()) == 18 and entry["bytes"] > 18 * 3 * 64 * 64

    show = recolor("lake", "show", "imagenet-mini@1", "--lake", lake_dir, "--json", "--rejects", "10")
    assert show.returncode == 0, show.stderr
    summary = json.loads(show.stdout)
    assert summary["dataset"] == "imagenet-mini" and summary["version"] == 1 and summary["versions"] == [1]
    assert summary["counts"] == entry["counts"] and summary["size"] == 64 and summary["encoding"] == "lab-uint8-v1"
    assert summary["stats"]["rejected"] == {"grayscale": 1, "not_an_image": 1}
    assert sorted((Path(r["source_uri"]).name, r["reason"]) for r in summary["rejects"]) == [
        ("n01440764_99.JPEG", "grayscale"),
        ("n02085620_98.JPEG", "not_an_image"),
    ]
    assert [(s["kind"], s["root"], s["ingested"]) for s in summary["sources"]] == [("imagenet", str(root), 18)]

    text = recolor("lake", "show", "imagenet-mini", "--lake", lake_dir)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("imagenet-mini@1  (")
    assert f"train     {entry['counts']['train']:>8} samples" in text.stdout
    assert "rejected grayscale" in text.stdout and "versions  1" in text.stdout

    lake = Lake(str(lake_dir))
    rows = lake_check(lake, lake.resolve("imagenet-mini"))
    for row in rows:
        name = Path(row["source_uri"]).name
        expected = imagenet_tree.val.get(name) or name.split("_")[0]
        assert row["label"] == expected and row["label_name"] == imagenet_tree.names[expected]


def test_ingest_coco_category_json_summary(coco_tree, tmp_path, recolor) -> None:
    lake_dir = tmp_path / "lake"
    result = recolor(
        "ingest", "coco", coco_tree.root, "--annotations", coco_tree.instances, "--category", "person,dog",
        "--dataset", "coco-people-dogs", "--lake", lake_dir, "--json", "--no-ray", *SMALL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    # 139 person, 285 dog, 632 cat+dog, 724 person+dog, and the listed-but-missing person.
    assert summary["listed"] == 5 and summary["ingested"] == 4 and summary["rejected"] == {"missing": 1}
    assert summary["version"] == 1 and sum(summary["counts"].values()) == 4
    rows = manifest_by_key(lake_dir, "coco-people-dogs").values()
    assert {row["coco_id"]: tuple(row["categories"]) for row in rows} == {
        image_id: coco_tree.categories[image_id] for image_id in (139, 285, 632, 724)
    }


# --- bad input: one line, exit code 2, nothing written -----------------------------------------


def bad_input_cases():
    return [
        ("missing-source", "source {tmp}/no-such-folder does not exist"),
        ("non-coco-json", "annotation file {tmp}/instances_val2017.json is not in COCO format"),
        ("ftp-lake", "bad lake URI 'ftp://x/lake'"),
        ("bad-dataset-name", "invalid dataset name '../up'"),
        ("no-images", "no images"),
        pytest.param("s3-wrong-secret", "S3 refused to list s3://{bucket}/lake", marks=pytest.mark.s3),
        pytest.param("s3-missing-bucket", "S3 bucket 'no-such-bucket' does not exist", marks=pytest.mark.s3),
        pytest.param("s3-missing-source-bucket", "S3 bucket 'no-such-bucket' does not exist", marks=pytest.mark.s3),
    ]


@pytest.mark.parametrize("case, message", bad_input_cases())
def test_bad_input_is_one_clear_line_and_writes_nothing(
    case: str, message: str, tmp_path, photo_folder, coco_tree, recolor, request
) -> None:
    kind, source, dataset, lake = ["folder"], str(photo_folder(range(3))), "photos", str(tmp_path / "lake")
    env: dict[str, str] = {}
    s3 = None
    if case.startswith("s3"):
        s3 = request.getfixturevalue("s3_env")
        lake = f"s3://{s3.bucket}/lake"
    if case == "missing-source":
        source = str(tmp_path / "no-such-folder")
    elif case == "non-coco-json":
        bad = tmp_path / "instances_val2017.json"
        bad.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
        kind, source = ["coco", "--annotations", str(bad)], str(coco_tree.root)
    elif case == "ftp-lake":
        lake = "ftp://x/lake"
    elif case == "bad-dataset-name":
        dataset = "../up"
    elif case == "no-images":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "readme.txt").write_text("hi")
        source = str(tmp_path / "docs")
    elif case == "s3-wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "s3-missing-bucket":
        lake = "s3://no-such-bucket/lake"
    elif case == "s3-missing-source-bucket":
        source = "s3://no-such-bucket/photos"
    args = ["ingest", *kind, source, "--dataset", dataset, "--lake", lake, *SMALL]
    result = recolor(*args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    bucket = s3.bucket if s3 else ""
    expected = message.format(tmp=tmp_path, bucket=bucket)
    assert len(result.error_lines) == 1, result.stderr
    assert result.error_lines[0].startswith("recolor: error: ") and expected in result.error_lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "lake").exists() and not (tmp_path / "ftp:").exists()
    if s3 is not None:
        assert list(s3.bucket_dir.iterdir()) == []
        assert not (s3.server.root / "no-such-bucket").exists()


def test_lake_show_of_a_missing_dataset_is_one_clear_line(tmp_path, recolor) -> None:
    result = recolor("lake", "show", "nothing-here", "--lake", tmp_path / "lake")
    assert result.returncode == 2
    assert result.error_lines == [
        f"recolor: error: dataset 'nothing-here' has no versions in lake {tmp_path / 'lake'} (datasets there: none); "
        "run `recolor ingest` first"
    ]


# --- kill an ingest midway and rerun -----------------------------------------------------------


@pytest.fixture(scope="module")
def kill_source(tmp_path_factory, photo_writer) -> Path:
    """Sixteen colour photos and a duplicate: nine chunks (of two images) at --shard-size 40k."""
    folder = tmp_path_factory.mktemp("kill") / "photos"
    paths = photo_writer(folder, range(300, 316), width=80, height=64)
    (folder / "zz-duplicate.jpg").write_bytes(paths[0].read_bytes())  # alone in the last chunk
    return folder


@pytest.fixture(scope="module")
def clean_lake(kill_source, tmp_path_factory, cli_runner, ray_address) -> Path:
    """The reference: the same ingest, uninterrupted, with Ray."""
    base = tmp_path_factory.mktemp("clean")
    args = ["ingest", "folder", kill_source, "--dataset", "photos", "--lake", base / "lake", *KILL_SHARDS]
    result = cli_runner(*args, cwd=base, env={"RAY_ADDRESS": ray_address})
    assert result.returncode == 0, result.stderr
    return base / "lake"


def assert_same_as_clean(lake_dir: Path, clean_lake: Path, lake_check) -> None:
    lake, clean = Lake(str(lake_dir)), Lake(str(clean_lake))
    assert lake.versions("photos") == [1]
    ref, clean_ref = lake.resolve("photos"), clean.resolve("photos")
    rows, clean_rows = lake_check(lake, ref), lake_check(clean, clean_ref)
    assert len(rows) == 16  # the duplicate is stored once, nothing is missing
    assert {r["key"]: r["split"] for r in rows} == {r["key"]: r["split"] for r in clean_rows}
    assert ref.record["counts"] == clean_ref.record["counts"] and ref.record["shards"] == clean_ref.record["shards"]
    assert ref.record["manifest_sha256"] == clean_ref.record["manifest_sha256"]
    assert ref.record["stats"] == clean_ref.record["stats"]
    assert shard_files(lake_dir) == shard_files(clean_lake)  # byte for byte


@pytest.mark.parametrize(
    "failpoint, ray, resumed",
    [
        # Driver-side points: the driver dies after every chunk finished; the rerun resumes them all.
        ("manifest:1", True, "9"),
        ("commit:1", True, "9"),
        # Task-side points with --no-ray: inside a Ray task the SIGKILL only kills a worker and Ray
        # retries the task (see the next test), so the run would not die; in-process it does.
        ("chunk_result:3", False, "2"),
        ("shard_upload:4", False, None),
        ("shard_write:5", False, None),  # a shard half written in the local spool
        ("upload_partial:3", False, None),  # a shard's bytes in a temporary file beside its place in the lake
    ],
)
def test_killed_ingest_rerun_equals_a_clean_run(
    failpoint: str, ray: bool, resumed: str | None, kill_source, clean_lake, tmp_path, recolor, lake_check, ray_address
) -> None:
    lake_dir = tmp_path / "lake"
    args = ["ingest", "folder", kill_source, "--dataset", "photos", "--lake", lake_dir, *KILL_SHARDS]
    if not ray:
        args.append("--no-ray")
    else:
        args += ["--ray-address", ray_address]
    killed = recolor(*args, env={"RECOLOR_FAILPOINT": failpoint})
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    assert "committed" not in killed.stdout
    assert Lake(str(lake_dir)).versions("photos") == []  # no half-written version is visible
    assert list(lake_dir.glob("photos/ingests/*/chunks/*.json"))  # but finished chunks are kept
    if failpoint.startswith("upload_partial"):
        temps = list(lake_dir.rglob(".*.tmp"))  # the killed writer's temporary file
        assert temps
        assert not any(key.endswith(".tmp") for key in gc_listing(recolor, lake_dir))  # young: maybe a live write
        for temp in temps:
            os.utime(temp, (time.time() - 600, time.time() - 600))
        assert any(key.endswith(".tmp") for key in gc_listing(recolor, lake_dir))  # 10 minutes old: garbage

    rerun = recolor(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "committed photos@1" in rerun.stdout
    if resumed is not None:
        assert f"resumed: {resumed} chunk(s) were already done by an earlier run" in rerun.stdout
    else:
        assert "resumed: " in rerun.stdout
    assert_same_as_clean(lake_dir, clean_lake, lake_check)
    assert_gc_leaves_the_version_whole(recolor, lake_dir, lake_check)


def gc_listing(recolor, lake_dir: Path, *extra: str) -> list[str]:
    result = recolor("lake", "gc", "--lake", lake_dir, "--json", "--min-age", "0", *extra)
    assert result.returncode == 0, result.stderr
    return [item["key"] for item in json.loads(result.stdout)["unreferenced"]]


def assert_gc_leaves_the_version_whole(recolor, lake_dir: Path, lake_check) -> None:
    """Whatever the killed run left is unreferenced: gc lists it, deletes it on request, and the version
    reads whole before and after."""
    lake = Lake(str(lake_dir))
    ref = lake.resolve("photos@1")
    named = {f"photos/{s['path']}" for entries in ref.record["shards"].values() for s in entries}
    named |= {f"photos/{ref.record['manifest']}", f"photos/{ref.record['rejects']}", "photos/versions/000001.json"}
    leftovers = gc_listing(recolor, lake_dir)
    assert not set(leftovers) & named
    assert gc_listing(recolor, lake_dir, "--delete") == leftovers
    assert gc_listing(recolor, lake_dir) == []
    assert len(lake_check(lake, lake.resolve("photos@1"))) == 16


def test_worker_killed_in_a_ray_task_is_retried(kill_source, clean_lake, tmp_path, recolor, lake_check,
                                                ray_address) -> None:  # fmt: skip
    """A worker SIGKILLed inside a chunk task (shards uploaded, result not written): Ray reruns the
    task in a fresh worker and the run finishes as a clean run would. RECOLOR_FAILPOINT_ONCE makes
    the failpoint fire in one worker only (it counts per process, and every worker would die)."""
    lake_dir = tmp_path / "lake"
    fired = tmp_path / "fired"
    args = ["ingest", "folder", kill_source, "--dataset", "photos", "--lake", lake_dir, *KILL_SHARDS,
            "--ray-address", ray_address]  # fmt: skip
    result = recolor(*args, env={"RECOLOR_FAILPOINT": "chunk_result:1", "RECOLOR_FAILPOINT_ONCE": str(fired)})
    assert result.returncode == 0, result.stderr
    assert fired.exists()  # a worker did die
    assert "worker died" in (result.stdout + result.stderr).lower()
    assert "committed photos@1" in result.stdout and "resumed" not in result.stdout
    assert_same_as_clean(lake_dir, clean_lake, lake_check)
