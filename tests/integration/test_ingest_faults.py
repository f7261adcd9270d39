"""Ingests that race each other, lose their object store, or die while writing to S3.

Every ingest here is a real `recolor ingest` process (in-process chunks, `--no-ray`, to keep two
of them at once affordable on a small machine) against a local folder or a real S3 server.
Failpoints (ingest/faults.py) put processes at a known point: `commit:1:barrier` holds each
racer just before it publishes its version until the other has arrived too.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from ingest.lake import Lake
from ingest.storage import open_storage

pytestmark = pytest.mark.slow

ARGS = ["--size", "64", "--no-progress", "--shard-size", "40k", "--no-ray"]


def ingest_args(source: Path, lake: str) -> list:
    return ["ingest", "folder", source, "--dataset", "photos", "--lake", lake, *ARGS]


def in_background(function, *args, **kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", function(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, box


def wait_for_files(folder: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (folder.exists() and sum(1 for _ in folder.iterdir()) >= count):
        assert time.monotonic() < deadline, f"nobody reached the barrier in {folder}"
        time.sleep(0.05)


def keys_of(lake: Lake, version: int) -> set[str]:
    return set(lake.manifest(lake.resolve(f"photos@{version}")).column("key").to_pylist())


# --- two ingests into one dataset at once ------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3-claims", "s3-conditional"])
def test_two_racing_ingests_take_one_version_number_each_and_lose_nothing(
    where, request, photo_writer, tmp_path, recolor, lake_check
) -> None:
    """Local folders publish with link(2); rclone (which ignores `If-None-Match`) takes the claim protocol;
    moto, like AWS S3 and MinIO, gets conditional PUTs, forced here so no claim can stand in for them."""
    first = photo_writer(tmp_path / "first", range(500, 508), width=80, height=64)
    second = photo_writer(tmp_path / "second", range(506, 514), width=80, height=64)  # two photos in both
    lake_uri = str(tmp_path / "lake") if where == "local" else "s3://faults/lake"
    barrier = tmp_path / "barrier"
    env = {"RECOLOR_FAILPOINT": "commit:1:barrier", "RECOLOR_FAILPOINT_BARRIER": f"{barrier}:2"}
    if where == "s3-claims":
        request.getfixturevalue("own_s3")
        assert not open_storage(lake_uri).conditional_writes()
        env["RECOLOR_S3_CONDITIONAL_WRITES"] = "off"
    elif where == "s3-conditional":
        request.getfixturevalue("moto_s3")
        assert open_storage(lake_uri).conditional_writes()  # the probe: moto refuses a PUT over an existing key
        env["RECOLOR_S3_CONDITIONAL_WRITES"] = "on"

    runs = [
        in_background(recolor, *ingest_args(folder, lake_uri), env=env)
        for folder in (first[0].parent, second[0].parent)
    ]
    for thread, _ in runs:
        thread.join()
    results = [box["result"] for _, box in runs]
    for result in results:
        assert result.returncode == 0, result.stderr
    committed = sorted(line for r in results for line in r.stdout.splitlines() if line.startswith("committed"))
    assert [line.split()[1] for line in committed] == ["photos@1", "photos@2"]  # each number taken once

    lake = Lake(lake_uri)
    assert lake.versions("photos") == [1, 2]
    v1, v2 = lake.resolve("photos@1"), lake.resolve("photos@2")
    assert v2.record["parent"] == 1  # the loser merged with the winner's version instead of replacing it
    assert len(lake_check(lake, v1)) == 8
    rows = lake_check(lake, v2)
    assert len(rows) == 14  # 8 + 8 photos, the two shared ones stored once: nothing lost, nothing twice
    assert keys_of(lake, 1) < keys_of(lake, 2)


# --- the object store goes away during an ingest -----------------------------------------------


@pytest.fixture
def outage_source(photo_writer, tmp_path) -> Path:
    photo_writer(tmp_path / "photos", range(600, 612), width=80, height=64)
    return tmp_path / "photos"


def clean_reference(recolor, source: Path) -> Lake:
    clean = recolor(*ingest_args(source, "s3://faults/clean"))
    assert clean.returncode == 0, clean.stderr
    return Lake("s3://faults/clean")


def assert_same_version(lake: Lake, clean: Lake, lake_check) -> None:
    ref, clean_ref = lake.resolve("photos"), clean.resolve("photos")
    rows, clean_rows = lake_check(lake, ref), lake_check(clean, clean_ref)
    assert {r["key"]: r["split"] for r in rows} == {r["key"]: r["split"] for r in clean_rows}
    assert ref.record["counts"] == clean_ref.record["counts"]
    assert ref.record["manifest_sha256"] == clean_ref.record["manifest_sha256"]


def test_an_ingest_waits_out_an_s3_outage_and_finishes(
    own_s3, restart_later, outage_source, tmp_path, recolor, lake_check
) -> None:
    clean = clean_reference(recolor, outage_source)
    barrier = tmp_path / "barrier"
    env = {"RECOLOR_FAILPOINT": "shard_upload:2:barrier", "RECOLOR_FAILPOINT_BARRIER": f"{barrier}:2"}
    thread, box = in_background(recolor, *ingest_args(outage_source, "s3://faults/lake"), env=env)
    wait_for_files(barrier, 1)  # the ingest has uploaded one shard and is about to upload the next
    own_s3.stop()
    (barrier / "test").touch()  # let it go on, into a store that is not there
    restarted = restart_later(own_s3, 4.0)
    thread.join()
    restarted.join()
    result = box["result"]
    assert result.returncode == 0, result.stderr
    assert "retrying for up to 120 s" in result.stderr
    assert "committed photos@1" in result.stdout
    assert_same_version(Lake("s3://faults/lake"), clean, lake_check)


def test_an_outage_past_the_deadline_fails_clearly_and_the_rerun_resumes(
    own_s3, outage_source, tmp_path, recolor, lake_check
) -> None:
    clean = clean_reference(recolor, outage_source)
    barrier = tmp_path / "barrier"
    env = {
        "RECOLOR_FAILPOINT": "shard_upload:3:barrier",
        "RECOLOR_FAILPOINT_BARRIER": f"{barrier}:2",
        "RECOLOR_S3_RETRY_SECONDS": "3",
    }
    thread, box = in_background(recolor, *ingest_args(outage_source, "s3://faults/lake"), env=env)
    wait_for_files(barrier, 1)
    own_s3.stop()
    (barrier / "test").touch()
    thread.join()
    failed = box["result"]
    assert failed.returncode == 2, (failed.stdout, failed.stderr)  # a one-line error, as for bad input
    assert failed.error_lines[-1].startswith(f"recolor: error: S3 endpoint {own_s3.endpoint} unreachable for 3 s")
    assert "rerunning the same command resumes where this one stopped" in failed.error_lines[-1]

    own_s3.start()
    rerun = recolor(*ingest_args(outage_source, "s3://faults/lake"))
    assert rerun.returncode == 0, rerun.stderr
    assert re.search(r"resumed: [1-9]\d* chunk\(s\) were already done by an earlier run", rerun.stdout)
    assert_same_version(Lake("s3://faults/lake"), clean, lake_check)


# --- killed while writing to S3 ----------------------------------------------------------------


@pytest.mark.parametrize("failpoint", ["upload_partial:2", "commit:1"])
def test_an_ingest_killed_while_writing_to_s3_leaves_nothing_readable_and_reruns_clean(
    failpoint, own_s3, outage_source, recolor, lake_check
) -> None:
    clean = clean_reference(recolor, outage_source)
    args = ingest_args(outage_source, "s3://faults/lake")
    killed = recolor(*args, env={"RECOLOR_FAILPOINT": failpoint})
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    lake = Lake("s3://faults/lake")
    assert lake.versions("photos") == []
    leftovers = gc_keys(recolor)
    if failpoint.startswith("commit"):
        assert any(key.endswith(".parquet") for key in leftovers)  # the manifest, written, named by no version

    rerun = recolor(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_version(lake, clean, lake_check)
    gc_keys(recolor, "--delete")
    assert gc_keys(recolor) == set()
    assert_same_version(lake, clean, lake_check)  # gc never touches what a version names


def gc_keys(recolor, *extra: str) -> set[str]:
    result = recolor("lake", "gc", "--lake", "s3://faults/lake", "--min-age", "0", "--json", *extra)
    assert result.returncode == 0, result.stderr
    return {item["key"] for item in json.loads(result.stdout)["unreferenced"]}
