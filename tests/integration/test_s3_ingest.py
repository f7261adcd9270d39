"""The whole flow against a real S3 protocol server (`rclone serve s3` on loopback, fresh bucket per test)."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from ingest.driver import IngestConfig, run_ingest
from ingest.lake import Lake
from ingest.storage import make_s3_client

pytestmark = [pytest.mark.slow, pytest.mark.s3]

SMALL_SHARDS = ["--size", "64", "--shard-size", "40k", "--no-progress"]


def upload_tree(bucket: str, prefix: str, folder: Path) -> None:
    """Upload every file below `folder` to s3://bucket/prefix/..., through the S3 API."""
    client = make_s3_client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def bucket_keys(bucket: str) -> list[str]:
    pages = make_s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def test_folder_on_s3_into_a_lake_on_s3(s3_env, photo_folder, tmp_path, recolor, lake_check, ray_address) -> None:
    bucket = s3_env.bucket
    source, lake_uri = f"s3://{bucket}/sources/photos", f"s3://{bucket}/lakes/main"
    first = photo_folder(range(8), name="first", width=80, height=64)
    (first / "album").mkdir()
    (first / "album" / "broken.jpg").write_bytes(b"this is not a jpeg")
    upload_tree(bucket, "sources/photos", first)

    result = recolor("ingest", "folder", source, "--dataset", "photos", "--lake", lake_uri, *SMALL_SHARDS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("listed 9, ingested 8, duplicates 0, rejected: not_an_image 1")
    assert "committed photos@1" in result.stdout

    show = recolor("lake", "show", "photos", "--lake", lake_uri, "--json")
    assert show.returncode == 0, show.stderr
    summary = json.loads(show.stdout)
    assert summary["uri"] == f"{lake_uri}/photos/versions/000001.json"
    assert sum(summary["counts"].values()) == 8 and summary["sources"][0]["root"] == source
    assert [(r["source_uri"], r["reason"]) for r in summary["rejects"]] == [
        (f"{source}/album/broken.jpg", "not_an_image")
    ]

    lake = Lake(lake_uri)
    v1 = lake.resolve("photos")
    v1_rows = lake_check(lake, v1)
    assert all(row["source_uri"].startswith(f"{source}/img") for row in v1_rows)
    # Shards are plain tar objects: fetch with boto3, read with tarfile and numpy.
    client = make_s3_client()
    for split in ("train", "val"):
        for entry in lake.shards(v1, split):
            assert entry["uri"] == f"{lake_uri}/photos/{entry['path']}"
            body = client.get_object(Bucket=bucket, Key=f"lakes/main/photos/{entry['path']}")["Body"].read()
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                members = tar.getmembers()
                assert len(members) == 2 * entry["count"]
                for member in members:
                    if member.name.endswith(".lab.npy"):
                        lab8 = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                        assert lab8.shape == (3, 64, 64) and lab8.dtype == np.uint8
    assert all(key.startswith(("sources/photos/", "lakes/main/photos/")) for key in bucket_keys(bucket))

    # The folder grows by three photos and a renamed copy of an old one: v2 adds exactly the three. The nine
    # objects it knows (same size and ETag; the broken one rejected) are not downloaded again.
    second = photo_folder(range(8, 11), name="second", width=80, height=64)
    (second / "copy.jpg").write_bytes((first / "img0005.jpg").read_bytes())
    upload_tree(bucket, "sources/photos", second)
    # The first ingest started a Ray of its own (the embedded default); this one joins the session's.
    again = recolor("ingest", "folder", source, "--dataset", "photos", "--lake", lake_uri, *SMALL_SHARDS,
                    env={"RAY_ADDRESS": ray_address})  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("listed 13, unchanged 9 (not read again), ingested 3, duplicates 1, rejected: none")
    assert "committed photos@2" in again.stdout
    listing = recolor("lake", "ls", "--lake", lake_uri, "--json")
    assert listing.returncode == 0, listing.stderr
    [dataset] = json.loads(listing.stdout)["datasets"]
    assert dataset["dataset"] == "photos" and dataset["latest"] == 2 and sum(dataset["counts"].values()) == 11
    v2_rows = lake_check(lake, lake.resolve("photos@2"))
    assert v2_rows[:8] == v1_rows
    assert sorted(Path(row["source_uri"]).name for row in v2_rows[8:]) == ["img0008.jpg", "img0009.jpg", "img0010.jpg"]


@pytest.mark.parametrize("kind", ["imagenet", "coco"])
def test_imagenet_and_coco_layouts_on_s3(kind: str, s3_env, request, lake_check) -> None:
    """Source trees, the val CSV, the synset names and the COCO JSON are all read through S3."""
    bucket = s3_env.bucket
    tree = request.getfixturevalue(f"{kind}_tree")
    upload_tree(bucket, "src", tree.root)
    config = IngestConfig(
        kind=kind,
        source=f"s3://{bucket}/src",
        dataset=kind,
        lake=f"s3://{bucket}/lake",
        size=32,
        imagenet_splits=("train", "val"),
        annotations=f"s3://{bucket}/src/annotations/instances_val2017.json" if kind == "coco" else None,
        use_ray=False,
        progress=False,
    )
    summary = run_ingest(config)
    lake = Lake(config.lake)
    rows = lake_check(lake, lake.resolve(kind))
    assert all(row["source_uri"].startswith(f"s3://{bucket}/src/") for row in rows)
    if kind == "imagenet":
        assert summary.ingested == 18 and summary.rejected == {}
        for row in rows:
            name = row["source_uri"].rsplit("/", 1)[-1]
            label = tree.val.get(name) or name.split("_")[0]
            assert row["label"] == label and row["label_name"] == tree.names[label]
    else:
        assert summary.ingested == 6 and summary.rejected == {"missing": 1}
        assert {row["coco_id"]: tuple(row["categories"]) for row in rows} == tree.categories
        [reject] = lake.rejects(lake.resolve(kind)).to_pylist()
        assert reject["source_uri"] == f"s3://{bucket}/src/val2017/{tree.file_name(tree.missing_id)}"


def test_reader_polling_during_ingests_never_sees_a_partial_version(s3_env, photo_folder, lake_check) -> None:
    bucket = s3_env.bucket
    source, lake_uri = f"s3://{bucket}/photos", f"s3://{bucket}/lake"
    stop = threading.Event()
    checked: dict[int, int] = {}  # version -> manifest rows, once fully checked
    errors: list[str] = []
    polls = 0

    def poll(lake: Lake) -> None:
        nonlocal polls
        for version in lake.versions("photos"):
            if version not in checked:
                checked[version] = len(lake_check(lake, lake.resolve(f"photos@{version}")))
        if checked:
            latest = lake.resolve("photos")
            assert latest.version >= max(checked)
        polls += 1

    def reader() -> None:
        lake = Lake(lake_uri)  # its own S3 client
        while not stop.is_set():
            try:
                poll(lake)
            except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(f"{type(e).__name__}: {e}")
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for number, seeds in enumerate([range(0, 6), range(6, 12), range(12, 18)], start=1):
            upload_tree(bucket, "photos", photo_folder(seeds, name=f"batch{number}", width=64, height=48))
            config = IngestConfig(
                kind="folder",
                source=source,
                dataset="photos",
                lake=lake_uri,
                size=32,
                shard_size=2 * (3 * 32 * 32 + 1536),
                use_ray=False,
                progress=False,
            )
            assert run_ingest(config).version == number
    finally:
        stop.set()
        thread.join(timeout=60)
    assert errors == []
    poll(Lake(lake_uri))  # whatever the reader had not reached yet
    assert checked == {1: 6, 2: 12, 3: 18}
    assert polls > 3
