"""The lake's own tools never corrupt it: gc against an ingest in flight, `lake check` and `lake repair` on a
damaged lake, as real `recolor` processes on a local folder and on S3."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ingest.lake import Lake

pytestmark = pytest.mark.slow

ARGS = ["--size", "64", "--no-progress", "--shard-size", "40k", "--no-ray"]


def ingest_args(source: Path, lake: str) -> list:
    return ["ingest", "folder", source, "--dataset", "photos", "--lake", lake, *ARGS]


def wait_for_files(folder: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (folder.exists() and sum(1 for _ in folder.iterdir()) >= count):
        assert time.monotonic() < deadline, f"nobody reached the barrier in {folder}"
        time.sleep(0.05)


def age_tree(folder: Path, seconds: float) -> None:
    """`touch -d '2 hours ago'` on every file below `folder`."""
    then = time.time() - seconds
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_gc_never_deletes_what_a_running_ingest_will_commit(where, request, photo_writer, tmp_path, recolor,
                                                          lake_check) -> None:  # fmt: skip
    """The reproduction of issue 21: an ingest killed after 5 chunks, its files aged two hours, resumed and parked
    before its commit; `lake gc --delete` (1 h on the local folder; 0 on S3, whose objects cannot be aged) runs;
    the ingest then commits a whole version."""
    source = photo_writer(tmp_path / "photos", range(700, 716), width=80, height=64)[0].parent
    if where == "s3":
        request.getfixturevalue("own_s3")
        lake_uri, min_age = "s3://faults/lake", "0"
    else:
        lake_uri, min_age = str(tmp_path / "lake"), "1h"
    killed = recolor(*ingest_args(source, lake_uri), env={"RECOLOR_FAILPOINT": "chunk_result:5:kill"})
    assert killed.returncode == -9, killed.stderr
    if where == "local":
        age_tree(tmp_path / "lake", 2 * 3600)

    barrier = tmp_path / "barrier"
    env = {"RECOLOR_FAILPOINT": "manifest:1:barrier", "RECOLOR_FAILPOINT_BARRIER": f"{barrier}:2"}
    import threading

    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", recolor(*ingest_args(source, lake_uri), env=env)))
    thread.start()
    wait_for_files(barrier, 1)  # every chunk done, four of them by the killed run: the commit is next
    gc = recolor("lake", "gc", "photos", "--lake", lake_uri, "--delete", "--min-age", min_age, "--json")
    assert gc.returncode == 0, gc.stderr
    report = json.loads(gc.stdout)
    assert report["unreferenced"] == [], report  # nothing of the running ingest is garbage
    assert len(report["in_use"]) == 1 and "renewed" in next(iter(report["in_use"].values()))
    (barrier / "test").touch()
    thread.join()
    result = box["r"]
    assert result.returncode == 0, result.stderr
    assert "committed photos@1" in result.stdout and "resumed: 4 chunk(s)" in result.stdout
    lake = Lake(lake_uri)
    assert (
        len(lake_check(lake, lake.resolve("photos@1")))
        + sum(json.loads(lake.storage.read_bytes("photos/versions/000001.json"))["stats"]["rejected"].values())
        == 16
    )

    # Once the ingest is over its lease is gone: its resume records are garbage, its shards are not.
    after = recolor("lake", "gc", "photos", "--lake", lake_uri, "--min-age", "0", "--json")
    listed = json.loads(after.stdout)
    assert listed["in_use"] == {} and listed["unreferenced"]
    assert all("/chunks/" in item["key"] for item in listed["unreferenced"]), listed


def test_a_commit_refuses_shards_that_vanished_and_the_rerun_writes_them_again(photo_writer, tmp_path, recolor,
                                                                             lake_check) -> None:  # fmt: skip
    """Shards deleted behind a resumed ingest's back (by hand, or a gc that could not see it): no version lists a
    missing shard; the error says to rerun, and the rerun gives a whole version."""
    source = photo_writer(tmp_path / "photos", range(720, 730), width=80, height=64)[0].parent
    lake_uri = str(tmp_path / "lake")
    killed = recolor(*ingest_args(source, lake_uri), env={"RECOLOR_FAILPOINT": "chunk_result:3:kill"})
    assert killed.returncode == -9
    for shard in (tmp_path / "lake").rglob("*.tar"):
        shard.unlink()  # what the old gc did to a running ingest
    refused = recolor(*ingest_args(source, lake_uri))
    assert refused.returncode != 0
    assert "shard(s) of this ingest vanished before the commit" in refused.error_lines[-1]
    assert "rerun the same command" in refused.error_lines[-1]
    lake = Lake(lake_uri)
    assert lake.versions("photos") == []
    rerun = recolor(*ingest_args(source, lake_uri))
    assert rerun.returncode == 0, rerun.stderr
    assert len(lake_check(lake, lake.resolve("photos@1"))) > 0


def test_gc_on_s3_deletes_only_the_lakes_own_objects(s3_env, photo_writer, tmp_path, recolor, lake_check) -> None:
    """On S3 as on a folder: ordinary objects beside or inside a dataset are unknown and stay; an abandoned
    ingest's shard, chunk record and claim go; the committed version stays whole."""
    from ingest.storage import open_storage

    lake_uri = f"s3://{s3_env.bucket}/lake"
    source = photo_writer(tmp_path / "photos", range(740, 744), width=80, height=64)[0].parent
    assert recolor(*ingest_args(source, lake_uri)).returncode == 0
    store = open_storage(lake_uri)
    ordinary = ["project/versions/notes.md", "project/ingests/setup.py", "photos/ingests/deadbeef0000/photo.jpg",
                "photos/README.md"]  # fmt: skip
    garbage = ["photos/ingests/deadbeef0000/shards/train-deadbeef0000-000001.tar",
               "photos/ingests/deadbeef0000/chunks/000001.json"]  # fmt: skip
    claim = "photos/versions/000009.json.claims/1700000000000000000-0123456789ab"  # young: may be a live commit's
    for key in ordinary + garbage + [claim]:
        store.write_bytes(key, b"data")
    result = recolor("lake", "gc", "--lake", lake_uri, "--delete", "--min-age", "0", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(ordinary) <= set(report["unknown"])
    assert set(garbage) <= {item["key"] for item in report["unreferenced"]}
    assert all(store.exists(key) for key in ordinary) and store.exists(claim)
    assert not any(store.exists(key) for key in garbage)
    lake = Lake(lake_uri)
    assert len(lake_check(lake, lake.resolve("photos"))) > 0


def test_check_and_repair_on_s3_through_ray_tasks(s3_env, photo_writer, tmp_path, recolor, lake_check,
                                                  ray_address) -> None:  # fmt: skip
    """A shard deleted through the S3 API and one overwritten with garbage: `check --deep` (Ray tasks) names both,
    exit 1; `repair` writes a whole new version; `check` then passes. Both commands join the session's Ray, as on
    a cluster (the S3 settings travel to the tasks with them)."""
    from ingest.storage import open_storage

    lake_uri = f"s3://{s3_env.bucket}/lake"
    source = photo_writer(tmp_path / "photos", range(760, 772), width=80, height=64)[0].parent
    assert recolor(*ingest_args(source, lake_uri)).returncode == 0
    lake = Lake(lake_uri)
    entries = lake.resolve("photos").record["shards"]["train"]
    store = open_storage(lake_uri)
    store.delete(f"photos/{entries[0]['path']}")
    store.write_bytes(f"photos/{entries[1]['path']}", b"\x01" * entries[1]["bytes"])
    on_ray = {"RAY_ADDRESS": ray_address}
    check = recolor("lake", "check", "photos", "--lake", lake_uri, "--deep", "--workers", "2", "--no-progress",
                    env=on_ray, timeout=300)  # fmt: skip
    assert check.returncode == 1, check.stderr
    assert f"missing   {lake.shard_uri('photos', entries[0]['path'])}" in check.stdout
    assert f"corrupt   {lake.shard_uri('photos', entries[1]['path'])}: unreadable" in check.stdout
    repair = recolor("lake", "repair", "photos", "--lake", lake_uri, "--workers", "2", "--no-progress", env=on_ray,
                     timeout=300)  # fmt: skip
    assert repair.returncode == 0, repair.stderr
    assert "into photos@2" in repair.stdout and "2 shard(s) rebuilt" in repair.stdout
    assert len(lake_check(lake, lake.resolve("photos@2"))) == sum(lake.resolve("photos@1").record["counts"].values())
    again = recolor("lake", "check", "photos", "--lake", lake_uri, "--deep", "--no-ray")
    assert again.returncode == 0 and "whole" in again.stdout
